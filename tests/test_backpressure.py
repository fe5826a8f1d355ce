"""
Backpressure in every protocol: a client that pipelines commands and never
reads its replies makes the session stop taking commands, then stop
reading, so the server's memory for it stays bounded (issue 8, item 7).

The sessions are driven through a StringTransport standing for a TCP
connection whose client does not read: it pauses the session (as a real
transport does once its buffer passes its limit) and stops calling
dataReceived once the session pauses it.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.support import ServerTestCase, waitUntil

# What a session may hold for a client that does not read: its reader's
# hold limit (IMAP: 1 MiB), one read of input, and the replies to it.
BOUND = 2 * 1024 * 1024


class BackpressureTests(ServerTestCase):
    listeners = ("smtp", "submission", "pop3", "imap")

    def connect(self, name: str):
        factory = self.service.listeners[name].factory
        session = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        session.makeConnection(transport)
        self.addCleanup(session.connectionLost, None)
        return session, transport

    def flood(self, name: str, command: bytes, login: bytes = b"") -> tuple:
        """
        Send C{command} 400,000 times in reads of 64 KiB to a session whose
        client reads nothing, as long as the session keeps reading.

        @return: how many octets the session took in, and how many it wrote.
        """
        session, transport = self.connect(name)
        if login:
            session.dataReceived(login)
        written = len(transport.value())
        # The client's replies fill the transport's buffer: it pauses us.
        session.pauseProducing()
        data = command * 400_000
        taken = 0
        while taken < len(data) and transport.producerState != "paused":
            session.dataReceived(data[taken : taken + 65536])
            taken += 65536
        return session, transport, taken, len(transport.value()) - written

    def assertBounded(self, name: str, command: bytes, login: bytes = b"") -> None:
        session, transport, taken, written = self.flood(name, command, login)
        self.assertEqual(transport.producerState, "paused", f"{name} never stopped reading")
        self.assertLess(taken, BOUND)
        self.assertLess(written, BOUND)
        # Once the client reads again, the session goes on.
        transport.clear()
        session.resumeProducing()
        self.assertTrue(transport.value())

    def test_smtp(self):
        """
        EHLO x 400,000 on the MX port: the session stops reading within a
        bounded amount of input and output.
        """
        self.assertBounded("smtp", b"EHLO x\r\n")

    def test_submission(self):
        """
        The same on the submission port.
        """
        self.assertBounded("submission", b"NOOP\r\n")

    def test_pop3(self):
        """
        CAPA x 400,000 on POP3.
        """
        self.assertBounded("pop3", b"CAPA\r\n")

    def test_imap(self):
        """
        CAPABILITY x 400,000 on IMAP.
        """
        self.assertBounded("imap", b"a CAPABILITY\r\n")


class RealSocketBackpressureTests(ServerTestCase):
    """
    The same over a real TCP connection: the transport pauses the session
    and the session pauses the transport.
    """

    listeners = ("smtp", "imap")

    @defer.inlineCallbacks
    def flood(self, name: str, command: bytes, paused):
        """
        Send C{command} over and over without reading any reply, until
        C{paused(session)} holds for the server's session (or a minute has
        passed), then return that session.

        The client sends for as long as it takes rather than a fixed
        amount: how much the kernel's buffers hold (hence how many replies
        it takes before the server's transport is full) differs from
        machine to machine, and a loaded one reads slowly.
        """
        stop = threading.Event()
        # A small receive buffer, set before connecting so that the window
        # the client offers (and its scale) is small from the start.
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", self.port(name)))
        client.settimeout(0.2)
        data = command * 8192
        progress = {"sent": 0, "lastSend": time.monotonic(), "error": None}

        def send():
            # Whole commands only: a sendall that times out has sent an
            # unknown part of its data, and sending it all again would cut
            # a command in two; the server answers BAD (500) to the pieces
            # and, past its error limit, closes the connection.
            sent = 0
            try:
                while not stop.is_set():
                    try:
                        n = client.send(data[sent:])
                    except socket.timeout:
                        # The server does not read: keep trying until
                        # told to stop, the connection stays open.
                        continue
                    progress["sent"] += n
                    progress["lastSend"] = time.monotonic()
                    sent = (sent + n) % len(data)
            except OSError as e:
                progress["error"] = e
                raise

        sending = self.inThread(send)
        try:
            yield waitUntil(lambda: self.service.listeners[name].factory.sessions, timeout=60)
            [session] = self.service.listeners[name].factory.sessions
            # The server's kernel send buffer kept small too (autotuning
            # lets it grow to megabytes on some machines): what is tested
            # is the session's own buffering, not the kernel's.
            session.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            try:
                yield waitUntil(lambda: paused(session), timeout=60)
            except AssertionError as e:
                raise AssertionError(f"{e}; {_describeStall(session, client, progress)}") from None
        finally:
            stop.set()
            yield sending
        return session

    @defer.inlineCallbacks
    def test_smtp(self):
        """
        EHLO x over and over on the MX port: the session's replies stop at
        the transport's limit, and it stops reading.
        """
        session = yield self.flood("smtp", b"EHLO x\r\n", lambda s: s._readingPaused)
        self.assertTrue(session._outputPaused)
        # (What the kernel's socket buffers hold is not the server's.)
        self.assertLess(session.reader.pending, 256 * 1024)

    @defer.inlineCallbacks
    def test_imap(self):
        """
        CAPABILITY over and over on IMAP: the same.
        """
        session = yield self.flood("imap", b"a CAPABILITY\r\n", lambda s: s._paused)
        self.assertTrue(session._outputPaused)
        self.assertLess(session.framer.pending, 2 * 1024 * 1024)


def _queued(sock, request: int) -> int:
    """
    What a socket's kernel holds: unread octets (FIONREAD) or octets not yet
    acknowledged by the peer (TIOCOUTQ).
    """
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    except OSError:
        return -1


def _describeStall(session, client: socket.socket, progress: dict) -> str:
    """
    Where the octets are when a flood did not make the session pause: in
    the client's kernel, the server's kernel, the session's reader or its
    transport, and whether the reactor still reads the connection.
    """
    state = {
        key: value for key, value in vars(session).items()
        if key in ("_outputPaused", "_answering", "closing", "_errors", "mode", "state")
    }
    reader = getattr(session, "framer", None) or session.reader
    # (The session's transport is the metering wrapper; the socket is under it.)
    transport = session.transport
    handle = transport.getHandle()
    reading = any(getattr(r, "socket", None) is handle for r in reactor.getReaders())
    toWrite = len(getattr(transport, "dataBuffer", b"")) + getattr(transport, "_tempDataLen", 0)
    return (
        f"session {state}, {reader.pending} octets in its reader, {toWrite} to write,"
        f" reading {reading}; server kernel: {_queued(handle, termios.FIONREAD)} unread;"
        f" client kernel: {_queued(client, termios.TIOCOUTQ)} unsent or unacknowledged,"
        f" {_queued(client, termios.FIONREAD)} unread; client sent {progress['sent']} octets,"
        f" the last {time.monotonic() - progress['lastSend']:.1f} s ago, error {progress['error']!r}"
    )
