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

import socket

from twisted.internet import defer
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
    def flood(self, name: str, command: bytes):
        """
        Send C{command} 400,000 times (as much as the connection takes until
        it blocks for a second) without reading, then return the server's
        session.
        """

        def send():
            client = socket.create_connection(("127.0.0.1", self.port(name)))
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(1)
            data = command * 400_000
            sent = 0
            try:
                while sent < len(data):
                    sent += client.send(data[sent : sent + 65536])
            except socket.timeout:
                pass
            return client, sent

        client, sent = yield self.inThread(send)
        self.addCleanup(client.close)
        [session] = self.service.listeners[name].factory.sessions
        return session, sent, len(command) * 400_000

    @defer.inlineCallbacks
    def test_smtp(self):
        """
        EHLO x 400,000 on the MX port: the session's replies stop at the
        transport's limit, and it stops reading.
        """
        session, sent, total = yield self.flood("smtp", b"EHLO x\r\n")
        # The client's sends may all fit in the kernel's buffers: the
        # server reads on at its own pace until its reader is full.  Its
        # replies must first fill the kernel's send buffer (megabytes, tens
        # of thousands of EHLOs), which a loaded machine takes more than
        # ten seconds to do.
        yield waitUntil(lambda: session._readingPaused, timeout=60)
        self.assertTrue(session._outputPaused)
        # (What the kernel's socket buffers hold is not the server's.)
        self.assertLess(session.reader.pending, 256 * 1024)

    @defer.inlineCallbacks
    def test_imap(self):
        """
        CAPABILITY x 400,000 on IMAP: the same.
        """
        session, sent, total = yield self.flood("imap", b"a CAPABILITY\r\n")
        yield waitUntil(lambda: session._paused, timeout=60)
        self.assertTrue(session._outputPaused)
        self.assertLess(session.framer.pending, 2 * 1024 * 1024)
