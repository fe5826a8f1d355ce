"""
POP3 over real sockets: a whole session with poplib against mail that came
in over SMTP, the exact bytes of RETR and TOP, the maildrop lock, UIDL
across restarts, flags on disk, bad input, limits, SASL PLAIN, STLS and
POP3S.
"""

from __future__ import annotations

import base64
import io
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet import ssl as twistedSSL
from twisted.internet.protocol import ClientCreator
from twisted.mail.pop3 import AdvancedPOP3Client
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from maild.auth import plaintextLoginAllowed
from maild.pop3 import BadUidlFormat, Maildrop, messageResponse, uidlFormatter
from maild.store import MailStore
from maild.store.mailstore import MAILDROP_LOCK
from maild.store.folder import Folder
from tests.support import PASSWORD, RawClient, ServerTestCase, waitUntil

ALICE = "alice@localhost"


def message(subject: str = "Hello", body: str = "Hi there.\r\n") -> bytes:
    return (
        f"From: Carol <carol@remote.test>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n{body}"
    ).encode("utf-8")


def withoutTrace(data: bytes) -> bytes:
    """
    A message as served (CRLF) without the Return-Path: and Received:
    headers that SMTP added.
    """
    assert data.startswith(b"Return-Path: "), data[:100]
    received = data.index(b"\r\nReceived: ")
    end = data.index(b"\r\n", data.index(b"\r\n\t", data.index(b";", received)) + 2)
    return data[end + 2 :]


def unstuff(wire: bytes) -> bytes:
    """
    The message carried by a multi-line response's body (after the status
    line), up to and without the end marker.
    """
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n", wire[-20:]
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def plain(user: str, password: str = PASSWORD, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class POPClient(RawClient):
    """
    A raw POP3 client: one line per reply, or a whole multi-line response.
    """

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.readLine()

    def readMultiline(self) -> bytes:
        """
        The wire bytes of a multi-line response's body, end marker included.
        """
        while not (self.buffer.startswith(b".\r\n") or b"\r\n.\r\n" in self.buffer):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        if self.buffer.startswith(b".\r\n"):
            end = 3
        else:
            end = self.buffer.index(b"\r\n.\r\n") + 5
        body, self.buffer = self.buffer[:end], self.buffer[end:]
        return body

    def stls(self, context: ssl.SSLContext) -> bytes:
        """
        STLS, then TLS, verifying the certificate for the loopback address.
        """
        reply = self.command(b"STLS")
        self.startTLS(context, hostname="127.0.0.1")
        return reply

    def login(self, user: str = ALICE) -> bytes:
        greeting = self.readLine()
        assert greeting.startswith(b"+OK"), greeting
        self.command(b"USER " + user.encode())
        return self.command(b"PASS " + PASSWORD.encode())


class POP3TestCase(ServerTestCase):
    listeners = ("smtp", "pop3", "pop3s")
    limits = {"auth_failure_delay": 0.05, "auth_failure_delay_max": 0.1}

    def deliver(self, *messages: bytes, to: str = ALICE) -> defer.Deferred:
        def send():
            with smtplib.SMTP("127.0.0.1", self.port("smtp")) as client:
                for data in messages:
                    client.sendmail("carol@remote.test", [to], data)

        return self.inThread(send)

    def client(self) -> POPClient:
        return POPClient(self.port("pop3"))

    def tryLogin(self, user: str = ALICE) -> bytes:
        """
        The reply to a login on a new connection, which is then closed
        (blocking: call it in a thread).
        """
        client = self.client()
        try:
            return client.login(user)
        finally:
            client.close()

    def session(self, f, user: str = ALICE) -> defer.Deferred:
        """
        Run C{f(client)} in a thread on a raw session logged in as C{user}.
        """

        def run():
            client = self.client()
            try:
                reply = client.login(user)
                assert reply.startswith(b"+OK"), reply
                return f(client)
            finally:
                client.close()

        return self.inThread(run)

    def poplib(self) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=10)
        client.user(ALICE)
        client.pass_(PASSWORD)
        return client

    def tlsContext(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.service.localCA.certPath))


class MessageResponseTests(unittest.SynchronousTestCase):
    """
    How a message file becomes a RETR or TOP response, piece by piece.
    """

    def response(self, data: bytes, bodyLines=None, size: int = 4) -> list[bytes]:
        return list(messageResponse(io.BytesIO(data), b"+OK\r\n", bodyLines, size))

    def test_dotStuffingAndLineEndsAcrossPieces(self):
        """
        LF on disk becomes CRLF, every line starting with a dot gets another
        (the first line too, and where a piece boundary falls just before
        the dot), and the end marker follows; the same for every piece size.
        """
        data = b".one\n..two\nthree\n.\nfour.\n"
        expected = b"+OK\r\n..one\r\n...two\r\nthree\r\n..\r\nfour.\r\n.\r\n"
        for size in range(1, len(data) + 2):
            self.assertEqual(b"".join(self.response(data, size=size)), expected, size)

    def test_crlfOnDisk(self):
        """
        A file written with CRLF (by another Maildir tool) is sent with CRLF,
        never CR CR LF, whatever the piece boundaries.
        """
        data = b"Subject: x\r\n\r\n.dot\r\nend\r\n"
        for size in range(1, len(data) + 2):
            self.assertEqual(
                b"".join(self.response(data, size=size)),
                b"+OK\r\nSubject: x\r\n\r\n..dot\r\nend\r\n.\r\n",
                size,
            )

    def test_noFinalLineEnd(self):
        """
        A message whose last line has no line end gets one before the end
        marker; an empty message is just the end marker.
        """
        self.assertEqual(b"".join(self.response(b"a\nb")), b"+OK\r\na\r\nb\r\n.\r\n")
        self.assertEqual(b"".join(self.response(b"")), b"+OK\r\n.\r\n")

    def test_smallMessageInOneWrite(self):
        """
        A message smaller than a piece is one write: status line, message and
        end marker together (no small last segment to stall on a delayed
        ACK).
        """
        pieces = self.response(b"Subject: x\n\nbody\n", size=1024)
        self.assertEqual(pieces, [b"+OK\r\nSubject: x\r\n\r\nbody\r\n.\r\n"])

    def test_largeMessageInPieces(self):
        """
        A large message goes out in pieces of about the piece size; the end
        marker rides with the last one.
        """
        data = b"x" * 99 + b"\n"
        pieces = list(messageResponse(io.BytesIO(data * 1000), b"+OK\r\n", None, 10_000))
        self.assertEqual(len(pieces), 10)
        self.assertTrue(all(len(p) <= 10_200 for p in pieces))
        self.assertTrue(pieces[-1].endswith(b"\r\n.\r\n"))
        self.assertEqual(
            b"".join(pieces), b"+OK\r\n" + (data * 1000).replace(b"\n", b"\r\n") + b".\r\n"
        )

    def test_top(self):
        """
        TOP sends the header, the blank line and that many body lines, for
        any piece size; 0 lines is the header alone, more lines than the
        body has is the whole message, and a message without a body is
        sent whole.
        """
        data = b"A: 1\nB: 2\n\n.l1\nl2\nl3\n"
        cases = {
            0: b"A: 1\r\nB: 2\r\n\r\n",
            1: b"A: 1\r\nB: 2\r\n\r\n..l1\r\n",
            2: b"A: 1\r\nB: 2\r\n\r\n..l1\r\nl2\r\n",
            10**18: b"A: 1\r\nB: 2\r\n\r\n..l1\r\nl2\r\nl3\r\n",
        }
        for lines, expected in cases.items():
            for size in range(1, len(data) + 2):
                self.assertEqual(
                    b"".join(self.response(data, lines, size)), b"+OK\r\n" + expected + b".\r\n"
                )
        self.assertEqual(
            b"".join(self.response(b"A: 1\nB: 2\n", 0)), b"+OK\r\nA: 1\r\nB: 2\r\n.\r\n"
        )
        self.assertEqual(b"".join(self.response(b"\nbody\nmore\n", 1)), b"+OK\r\n\r\nbody\r\n.\r\n")

    def test_fileClosed(self):
        """
        The file is closed when the response ends, and when it is abandoned
        half-way (the client went away).
        """
        done = io.BytesIO(b"a\n")
        list(messageResponse(done, b"+OK\r\n"))
        self.assertTrue(done.closed)
        abandoned = io.BytesIO(b"a\n" * 100)
        response = messageResponse(abandoned, b"+OK\r\n", None, 10)
        next(response)
        response.close()
        self.assertTrue(abandoned.closed)


class PlaintextPolicyTests(unittest.SynchronousTestCase):
    def test_policy(self):
        """
        Before TLS a password may be sent from loopback only (by default),
        from anywhere under "always", from nowhere under "never"; with TLS
        always.
        """
        self.assertTrue(plaintextLoginAllowed("loopback", "127.0.0.1", False))
        self.assertTrue(plaintextLoginAllowed("loopback", "::1", False))
        self.assertFalse(plaintextLoginAllowed("loopback", "192.0.2.7", False))
        self.assertTrue(plaintextLoginAllowed("loopback", "192.0.2.7", True))
        self.assertTrue(plaintextLoginAllowed("always", "192.0.2.7", False))
        self.assertFalse(plaintextLoginAllowed("never", "127.0.0.1", False))
        self.assertTrue(plaintextLoginAllowed("never", "127.0.0.1", True))


class POP3SessionTests(POP3TestCase):
    """
    Sessions with Python's poplib and Twisted's client, on mail delivered
    over SMTP.
    """

    @defer.inlineCallbacks
    def test_poplibSession(self):
        """
        STAT, LIST, UIDL, TOP, RETR, DELE, RSET and QUIT with poplib: sizes
        are CRLF octet counts, message numbers stay put after DELE, RSET
        unmarks, and the deletion happens at QUIT; the messages left were
        all retrieved, so they are \\Seen.
        """
        sent = [message(subject=f"number {n}", body=f"Body {n}.\r\n" * (n + 1)) for n in range(3)]
        yield self.deliver(*sent)

        def run():
            client = self.poplib()
            stat = client.stat()
            listing = client.list()[1]
            uidl = client.uidl()[1]
            one = client.list(2)
            top = client.top(2, 1)[1]
            retrieved = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)]
            client.dele(2)
            afterDele = client.stat(), client.list()[1]
            relisted = client.rset(), client.stat()
            client.dele(1)
            bye = client.quit()
            return stat, listing, uidl, one, top, retrieved, afterDele, relisted, bye

        stat, listing, uidl, one, top, retrieved, afterDele, relisted, bye = yield self.inThread(
            run
        )
        sizes = [len(r) for r in retrieved]
        self.assertEqual([withoutTrace(r) for r in retrieved], sent)
        self.assertEqual(stat, (3, sum(sizes)))
        self.assertEqual(listing, [b"%d %d" % (n + 1, size) for n, size in enumerate(sizes)])
        self.assertEqual(one, b"+OK 2 %d" % sizes[1])
        self.assertEqual([line.split()[0] for line in uidl], [b"1", b"2", b"3"])
        self.assertEqual(len({line.split()[1] for line in uidl}), 3)
        self.assertEqual(top[-3:], [b"Message-ID: <number.1@remote.test>", b"", b"Body 1."])
        self.assertEqual(
            afterDele, ((2, sizes[0] + sizes[2]), [b"1 %d" % sizes[0], b"3 %d" % sizes[2]])
        )
        self.assertEqual(relisted[1], (3, sum(sizes)))
        self.assertTrue(bye.startswith(b"+OK"))
        remaining = self.messages(ALICE)
        self.assertEqual(len(remaining), 2)
        self.assertEqual([p.name.endswith(":2,S") for p in remaining], [True, True])
        self.assertEqual(
            sorted(withoutTrace(p.read_bytes().replace(b"\n", b"\r\n")) for p in remaining),
            [sent[1], sent[2]],
        )

    @defer.inlineCallbacks
    def test_retrBytes(self):
        """
        RETR sends exactly the stored message: what the SMTP client sent,
        after our Return-Path: and Received: headers, with CRLF line ends,
        lines starting with a dot stuffed, and the size in the +OK line
        equal to the octets sent.  TOP with a line count past any body
        (however many digits) sends the same.
        """
        sent = message(body=".dot first\r\n..two dots\r\n\r\n.\r\nx" + "y" * 3000 + "\r\nlast\r\n")
        yield self.deliver(sent)

        def run(client):
            status = client.command(b"RETR 1")
            wire = client.readMultiline()
            client.command(b"TOP 1 " + b"9" * 40)
            return status, wire, client.readMultiline()

        status, wire, top = yield self.session(run)
        self.assertEqual(top, wire)
        data = unstuff(wire)
        self.assertEqual(withoutTrace(data), sent)
        self.assertEqual(status, b"+OK %d octets" % len(data))
        self.assertIn(b"\r\n...two dots\r\n", wire)
        self.assertIn(b"\r\n..\r\n", wire)
        [path] = self.messages(ALICE)
        self.assertEqual(data, path.read_bytes().replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_largeMessage(self):
        """
        A 3 MiB message comes through whole and exact (streamed from its
        file in pieces).
        """
        line = "0123456789" * 7 + "\r\n"
        sent = message(body="".join(f".{n:06d}{line}" for n in range(43_000)))
        yield self.deliver(sent)

        def run(client):
            status = client.command(b"RETR 1")
            return status, client.readMultiline(), client.command(b"NOOP")

        status, wire, noop = yield self.session(run)
        data = unstuff(wire)
        self.assertEqual(withoutTrace(data), sent)
        self.assertEqual(status, b"+OK %d octets" % len(data))
        self.assertEqual(noop, b"+OK")

    @defer.inlineCallbacks
    def test_pipelinedCommands(self):
        """
        Commands sent in one write are answered in order, a RETR's message
        before the replies that follow it.
        """
        yield self.deliver(message(subject="one"), message(subject="two"))

        def run(client):
            client.send(b"STAT\r\nRETR 1\r\nUIDL 2\r\nRETR 2\r\nDELE 1\r\nLIST\r\nNOOP\r\n")
            stat = client.readLine()
            first = client.readLine(), client.readMultiline()
            uidl = client.readLine()
            second = client.readLine(), client.readMultiline()
            dele = client.readLine()
            listing = client.readLine(), client.readMultiline()
            return stat, first, uidl, second, dele, listing, client.readLine()

        stat, first, uidl, second, dele, listing, noop = yield self.session(run)
        self.assertTrue(stat.startswith(b"+OK 2 "))
        self.assertIn(b"Subject: one", first[1])
        self.assertTrue(uidl.startswith(b"+OK 2 "))
        self.assertIn(b"Subject: two", second[1])
        self.assertEqual(dele, b"+OK Message 1 deleted.")
        self.assertTrue(listing[0].startswith(b"+OK 1 messages"))
        self.assertTrue(listing[1].startswith(b"2 "))
        self.assertEqual(noop, b"+OK")

    @defer.inlineCallbacks
    def test_deepPipeline(self):
        """
        1000 RETRs in one write from a client that does not read yet: the
        session stops answering once the transport's buffer is full (its
        memory stays bounded), and when the client reads, every response
        comes back whole and in order.
        """
        sent = message(body=("z" * 70 + "\r\n") * 150)
        yield self.deliver(sent)

        def login():
            client = self.client()
            # Small enough that the kernel's buffers cannot take it all.
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.login()
            client.send(b"RETR 1\r\n" * 1000 + b"NOOP\r\n")
            return client

        def readAll(client):
            replies = [(client.readLine(), client.readMultiline()) for _ in range(1000)]
            return replies, client.readLine()

        client = yield self.inThread(login)
        self.addCleanup(client.close)
        [session] = self.service.listeners["pop3"].factory.sessions
        transport = session.transport
        yield waitUntil(lambda: session._outputPaused)
        self.assertLess(len(transport.dataBuffer) + transport._tempDataLen, 1_000_000)
        replies, noop = yield self.inThread(readAll, client)
        self.assertEqual({withoutTrace(unstuff(wire)) for _, wire in replies}, {sent})
        self.assertEqual(len({status for status, _ in replies}), 1)
        self.assertEqual(noop, b"+OK")

    @defer.inlineCallbacks
    def test_twistedClient(self):
        """
        Twisted's own POP3 client upgrades with STLS, verifying the
        certificate, logs in (with USER/PASS: the greeting offers no APOP
        challenge), lists and retrieves.
        """
        yield self.deliver(message())
        trust = twistedSSL.Certificate.loadPEM(self.service.localCA.certPath.read_bytes())
        client = yield ClientCreator(reactor, GreetedClient).connectTCP(
            "127.0.0.1", self.port("pop3")
        )
        yield client.greeted
        yield client.startTLS(twistedSSL.optionsForClientTLS("mx.test", trustRoot=trust))
        yield client.login(ALICE.encode(), PASSWORD.encode())
        sizes = yield client.listSize()
        uids = yield client.listUID()
        lines = yield client.retrieve(0)
        yield client.quit()
        self.assertIsNone(client.serverChallenge)
        self.assertEqual(len(sizes), 1)
        self.assertEqual(len(uids), 1)
        self.assertEqual(sizes[0], sum(len(line) + 2 for line in lines))
        self.assertIn(b"Subject: Hello", lines)


class GreetedClient(AdvancedPOP3Client):
    """
    Twisted's POP3 client, with a Deferred for the greeting.
    """

    def __init__(self) -> None:
        self.greeted = defer.Deferred()

    def serverGreeting(self, greeting: bytes) -> None:
        self.greeted.callback(greeting)


class MaildropTests(POP3TestCase):
    """
    What a session does to the store, and when.
    """

    @defer.inlineCallbacks
    def test_deletionsOnlyAtQuit(self):
        """
        DELE marks only: the file stays while the session lasts and is
        removed at QUIT; the others stay.
        """
        yield self.deliver(message(subject="one"), message(subject="two"))

        def run(client):
            dele = client.command(b"DELE 1")
            during = len(self.messages(ALICE))
            return dele, during, client.command(b"QUIT")

        dele, during, quit = yield self.session(run)
        self.assertEqual(dele, b"+OK Message 1 deleted.")
        self.assertEqual(during, 2)
        self.assertEqual(quit, b"+OK Logging out, 1 messages deleted.")
        [path] = self.messages(ALICE)
        self.assertIn(b"Subject: two", path.read_bytes())

    @defer.inlineCallbacks
    def test_droppedConnectionDeletesNothing(self):
        """
        A session that ends without QUIT deletes nothing, and its lock is
        released: the next session sees every message.
        """
        yield self.deliver(message(subject="one"), message(subject="two"))

        def run(client):
            client.command(b"DELE 1")
            client.command(b"DELE 2")

        yield self.session(run)
        self.assertEqual(len(self.messages(ALICE)), 2)

        def again(client):
            return client.command(b"STAT")

        stat = yield self.session(again)
        self.assertTrue(stat.startswith(b"+OK 2 "))

    @defer.inlineCallbacks
    def test_inUse(self):
        """
        While one session holds the maildrop, another login gets
        -ERR [IN-USE]; once the first QUITs, a new session gets in at once.
        """

        def run():
            first = self.client()
            ok = first.login()
            refused = self.tryLogin()
            first.command(b"QUIT")
            first.close()
            return ok, refused, self.tryLogin()

        ok, refused, again = yield self.inThread(run)
        self.assertEqual(ok, b"+OK Logged in.")
        self.assertEqual(refused, b"-ERR [IN-USE] Mailbox is locked by another POP3 session.")
        self.assertEqual(again, b"+OK Logged in.")

    @defer.inlineCallbacks
    def test_inUseByAnotherProcess(self):
        """
        The maildrop lock holds between processes: while another process
        holds it, login gets -ERR [IN-USE].
        """
        lockPath = self.maildir(ALICE) / MAILDROP_LOCK
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; "
                "from maild.store.locking import ExclusiveHold; "
                "hold = ExclusiveHold.tryAcquire(Path(sys.argv[1])); "
                "print('held' if hold else 'free', flush=True); sys.stdin.read()",
                str(lockPath),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        state = yield self.inThread(holder.stdout.readline)
        self.assertEqual(state, b"held\n")

        refused = yield self.inThread(self.tryLogin)
        self.assertTrue(refused.startswith(b"-ERR [IN-USE]"))

    @defer.inlineCallbacks
    def test_uidlStableAcrossRestart(self):
        """
        UIDL gives each message its IMAP UID and the folder's UIDVALIDITY
        exactly as Dovecot's default %08Xu%08Xv writes them (lower-case
        hexadecimal), the same after the daemon restarts.
        """
        yield self.deliver(message(subject="one"), message(subject="two"))

        def uidl(client):
            client.command(b"UIDL")
            return client.readMultiline()

        before = yield self.session(uidl)
        yield self.stopServer()
        yield self.startServer()
        after = yield self.session(uidl)
        self.assertEqual(before, after)
        folder = self.service.store.mailbox(ALICE).folder("INBOX")
        folder.refresh()
        expected = b"".join(
            b"%d %08x%08x\r\n" % (n + 1, uid, folder.uidvalidity)
            for n, uid in enumerate(folder.uids)
        )
        self.assertEqual(after, expected + b".\r\n")

    @defer.inlineCallbacks
    def test_uidlFormatConfigured(self):
        """
        [pop3] uidl_format takes Dovecot's pop3_uidl_format syntax, for a
        site that changed Dovecot's default: %u.%v gives decimal UID and
        UIDVALIDITY.
        """
        yield self.stopServer()
        yield self.startServer(pop3={"uidl_format": "%u.%v"})
        yield self.deliver(message(subject="one"))

        def uidl(client):
            client.command(b"UIDL")
            return client.readMultiline()

        listing = yield self.session(uidl)
        folder = self.service.store.mailbox(ALICE).folder("INBOX")
        folder.refresh()
        self.assertEqual(listing, b"1 %d.%d\r\n.\r\n" % (folder.uids[0], folder.uidvalidity))

    @defer.inlineCallbacks
    def test_retrSetsSeen(self):
        """
        RETR marks the message \\Seen in the store (its file moves to cur/
        with the S flag): soon, while the session goes on, and at the
        latest when the session ends, with or without QUIT.  TOP does not.
        """
        yield self.deliver(message(subject="one"), message(subject="two"), message(subject="six"))

        def seen() -> list[str]:
            return sorted(p.name for p in self.messages(ALICE) if p.name.endswith(":2,S"))

        def read(client, *commands: bytes) -> None:
            for command in commands:
                client.command(command)
                client.readMultiline()

        client = yield self.inThread(self.client)
        self.addCleanup(client.close)
        yield self.inThread(client.login)
        yield self.inThread(read, client, b"RETR 1", b"TOP 2 0")
        yield waitUntil(lambda: len(seen()) >= 1)
        during = seen()
        yield self.inThread(read, client, b"RETR 3")
        # Without QUIT.
        client.close()
        yield waitUntil(lambda: len(seen()) >= 2)
        after = seen()
        self.assertEqual(len(during), 1)
        self.assertEqual(len(after), 2)
        names = {p.read_bytes().split(b"Subject: ")[1][:3]: p for p in self.messages(ALICE)}
        self.assertEqual(names[b"one"].parent.name, "cur")
        self.assertTrue(names[b"one"].name.endswith(":2,S"))
        self.assertEqual(names[b"two"].parent.name, "new")
        self.assertTrue(names[b"six"].name.endswith(":2,S"))

    @defer.inlineCallbacks
    def test_expungedElsewhere(self):
        """
        A message expunged by another client (IMAP) during the session keeps
        its number; RETR of it gets -ERR and the session goes on.
        """
        yield self.deliver(message(subject="one"), message(subject="two"))

        def login():
            client = self.client()
            client.login()
            return client

        client = yield self.inThread(login)
        self.addCleanup(client.close)
        folder = self.service.store.mailbox(ALICE).folder("INBOX")
        folder.expunge([folder.uids[0]])

        def rest():
            return client.command(b"RETR 1"), client.command(b"RETR 2"), client.readMultiline()

        gone, status, wire = yield self.inThread(rest)
        self.assertEqual(gone, b"-ERR Message 1 was removed by another session.")
        self.assertTrue(status.startswith(b"+OK "))
        self.assertIn(b"Subject: two", wire)

    @defer.inlineCallbacks
    def test_storageError(self):
        """
        When the store cannot be read, login gets -ERR [SYS/TEMP] and the
        maildrop is not left locked.
        """

        failing = [True]
        refresh = Folder.refresh

        def broken(folder):
            if failing[0]:
                raise PermissionError(13, "Permission denied")
            return refresh(folder)

        self.patch(Folder, "refresh", broken)

        def run():
            reply = self.tryLogin()
            failing[0] = False
            return reply, self.tryLogin()

        reply, again = yield self.inThread(run)
        self.assertEqual(reply, b"-ERR [SYS/TEMP] Cannot open the mailbox, try again later.")
        self.assertEqual(again, b"+OK Logged in.")
        self.flushLoggedErrors(PermissionError)


class BadInputTests(POP3TestCase):
    """
    Every bad argument and command gets -ERR with a reason, and the session
    goes on.
    """

    @defer.inlineCallbacks
    def test_badArguments(self):
        """
        Arguments that are not numbers, negative, zero, out of range, absurdly
        long, missing or too many; deleted messages; unknown commands and
        junk; each gets its -ERR and the session goes on.
        """
        yield self.deliver(message())
        commands = [
            (b"RETR abc", b"-ERR Invalid message number: not a number."),
            (b"RETR -1", b"-ERR Invalid message number: negative numbers are not allowed."),
            (b"RETR 0", b"-ERR There is no message 0."),
            (b"RETR 2", b"-ERR There is no message 2."),
            (b"RETR 99999999999999999999", b"-ERR There is no message 99999999999999999999."),
            (b"RETR " + b"9" * 500, b"-ERR There is no message 99999999999999999999...."),
            (b"RETR 1.5", b"-ERR Invalid message number: not a number."),
            (b"RETR", b"-ERR Syntax: RETR message-number"),
            (b"RETR 1 2", b"-ERR Syntax: RETR message-number"),
            (b"DELE 0", b"-ERR There is no message 0."),
            (b"DELE", b"-ERR Syntax: DELE message-number"),
            (b"LIST x", b"-ERR Invalid message number: not a number."),
            (b"LIST 7", b"-ERR There is no message 7."),
            (b"UIDL -3", b"-ERR Invalid message number: negative numbers are not allowed."),
            (b"TOP 1", b"-ERR Syntax: TOP message-number lines"),
            (b"TOP 1 x", b"-ERR Invalid line count: not a number."),
            (b"TOP 1 -1", b"-ERR Invalid line count: negative numbers are not allowed."),
            (b"TOP 9 1", b"-ERR There is no message 9."),
            (b"STAT 1", b"-ERR Syntax: STAT"),
            (b"NOOP x", b"-ERR Syntax: NOOP"),
            (b"FROBNICATE", b"-ERR Unknown command."),
            (b"", b"-ERR Unknown command."),
            (b"\xff\xfe\x00", b"-ERR Unknown command."),
            (b"LAST", b"-ERR Unknown command."),
            (b"USER bob", b"-ERR Already logged in."),
            (b"STLS", b"-ERR Already logged in."),
            (b"DELE 1", b"+OK Message 1 deleted."),
            (b"DELE 1", b"-ERR Message 1 is deleted."),
            (b"RETR 1", b"-ERR Message 1 is deleted."),
            (b"LIST 1", b"-ERR Message 1 is deleted."),
            (b"RSET", b"+OK 1 messages (%d octets)."),
            (b"noop", b"+OK"),
        ]

        def run(client):
            return [client.command(line) for line, _ in commands]

        replies = yield self.session(run)
        [path] = self.messages(ALICE)
        data = path.read_bytes()
        size = len(data) + data.count(b"\n")
        expected = [reply.replace(b"%d", b"%d" % size) for _, reply in commands]
        self.assertEqual(replies, expected)
        self.assertEqual(len(self.messages(ALICE)), 1)

    @defer.inlineCallbacks
    def test_beforeLogin(self):
        """
        Before login, the mailbox commands get -ERR Not logged in, APOP is
        refused, and PASS needs USER first; the greeting has no APOP
        timestamp.
        """

        def run():
            client = self.client()
            greeting = client.readLine()
            replies = [
                client.command(line)
                for line in (
                    b"STAT",
                    b"RETR 1",
                    b"NOOP",
                    b"APOP alice 0123456789abcdef",
                    b"PASS x",
                    b"USER",
                )
            ]
            replies.append(client.command(b"QUIT"))
            return greeting, replies, client.closed()

        greeting, replies, closed = yield self.inThread(run)
        self.assertEqual(greeting, b"+OK mx.test POP3 maild ready.")
        self.assertEqual(
            replies,
            [
                b"-ERR Not logged in.",
                b"-ERR Not logged in.",
                b"-ERR Not logged in.",
                b"-ERR APOP is not supported; use USER/PASS or AUTH PLAIN over TLS.",
                b"-ERR Send USER first.",
                b"-ERR Syntax: USER name",
                b"+OK Bye.",
            ],
        )
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_overlongLine(self):
        """
        A line over the limit gets -ERR Line too long, whether it comes whole
        or in pieces, and the session goes on.
        """

        def run(client):
            long = client.command(b"NOOP " + b"x" * 5000)
            client.send(b"NOOP " + b"y" * 100_000)
            client.send(b"y" * 100_000 + b"\r\n")
            huge = client.readLine()
            return long, huge, client.command(b"NOOP")

        long, huge, after = yield self.session(run)
        self.assertEqual(long, b"-ERR Line too long.")
        self.assertEqual(huge, b"-ERR Line too long.")
        self.assertEqual(after, b"+OK")


class AuthenticationTests(POP3TestCase):
    """
    USER/PASS and AUTH PLAIN, through the shared throttling.
    """

    @defer.inlineCallbacks
    def test_capabilities(self):
        """
        CAPA before login lists TOP, UIDL, RESP-CODES, AUTH-RESP-CODE,
        PIPELINING, USER, SASL PLAIN LOGIN, STLS and IMPLEMENTATION; after login
        the ones that no longer apply (USER, SASL, STLS) are gone.
        """

        def run():
            client = self.client()
            client.readLine()
            before = client.command(b"CAPA"), client.readMultiline()
            client.command(b"USER " + ALICE.encode())
            client.command(b"PASS " + PASSWORD.encode())
            after = client.command(b"capa"), client.readMultiline()
            client.close()
            return before, after

        before, after = yield self.inThread(run)
        self.assertEqual(before[0], b"+OK Capability list follows")
        self.assertEqual(
            before[1].split(b"\r\n"),
            [
                b"TOP",
                b"UIDL",
                b"RESP-CODES",
                b"AUTH-RESP-CODE",
                b"PIPELINING",
                b"USER",
                b"SASL PLAIN LOGIN",
                b"STLS",
                b"IMPLEMENTATION maild",
                b".",
                b"",
            ],
        )
        self.assertEqual(
            after[1].split(b"\r\n"),
            [
                b"TOP",
                b"UIDL",
                b"RESP-CODES",
                b"AUTH-RESP-CODE",
                b"PIPELINING",
                b"IMPLEMENTATION maild",
                b".",
                b"",
            ],
        )

    @defer.inlineCallbacks
    def test_authPlain(self):
        """
        AUTH PLAIN works with an initial response and, as Thunderbird sends
        it, without one (after a "+ " continuation); "*" cancels, and bad
        base64, a malformed response or another authorization identity get
        -ERR without ending the session.
        """

        def attempt(*lines):
            client = self.client()
            client.readLine()
            replies = [client.command(line) for line in lines]
            client.close()
            return replies

        def run():
            return [
                attempt(b"AUTH PLAIN " + plain(ALICE)),
                attempt(b"AUTH PLAIN", plain(ALICE)),
                attempt(
                    b"AUTH plain",
                    b"*",
                    b"AUTH PLAIN =",
                    b"AUTH PLAIN !!!",
                    b"AUTH PLAIN " + base64.b64encode(b"a\0b"),
                    b"AUTH PLAIN " + plain(ALICE, authzid="bob@example.org"),
                    b"AUTH CRAM-MD5",
                    b"AUTH",
                ),
            ]

        initial, continued, bad = yield self.inThread(run)
        self.assertEqual(initial, [b"+OK Logged in."])
        self.assertEqual(continued, [b"+ ", b"+OK Logged in."])
        self.assertEqual(
            bad,
            [
                b"+ ",
                b"-ERR Authentication cancelled.",
                b"-ERR Invalid PLAIN response.",
                b"-ERR Invalid base64 data.",
                b"-ERR Invalid PLAIN response.",
                b"-ERR [AUTH] Logging in as another user is not supported.",
                b"-ERR Unsupported authentication mechanism.",
                b"+OK",
            ],
        )

    @defer.inlineCallbacks
    def test_authLogin(self):
        """
        AUTH LOGIN asks for the user name and the password; with an initial
        response (RFC 5034 section 4) that is the user name.
        """

        def attempt(*lines):
            client = self.client()
            client.readLine()
            replies = [client.command(line) for line in lines]
            client.close()
            return replies

        user, password = base64.b64encode(ALICE.encode()), base64.b64encode(PASSWORD.encode())

        def run():
            return attempt(b"AUTH LOGIN", user, password), attempt(b"AUTH LOGIN " + user, password)

        prompted, initial = yield self.inThread(run)
        self.assertEqual(prompted, [b"+ VXNlcm5hbWU6", b"+ UGFzc3dvcmQ6", b"+OK Logged in."])
        self.assertEqual(initial, [b"+ UGFzc3dvcmQ6", b"+OK Logged in."])

    @defer.inlineCallbacks
    def test_tooManyFailures(self):
        """
        After the per-connection limit of failed logins the connection is
        closed.
        """
        yield self.stopServer()
        yield self.startServer(limits={**self.limits, "auth_failures_per_connection": 2})

        def run():
            client = self.client()
            client.readLine()
            first = client.command(b"AUTH PLAIN " + plain(ALICE, "wrong"))
            second = client.command(b"AUTH PLAIN " + plain(ALICE, "wrong"))
            return first, second, client.closed()

        first, second, closed = yield self.inThread(run)
        self.assertEqual(first, b"-ERR [AUTH] Authentication failed.")
        self.assertEqual(second, b"-ERR [AUTH] Authentication failed; too many failures, closing.")
        self.assertTrue(closed)


class TLSTests(POP3TestCase):
    """
    STLS (RFC 2595) and POP3S (RFC 8314).
    """

    @defer.inlineCallbacks
    def test_stls(self):
        """
        poplib upgrades with STLS, verifying the certificate; CAPA then no
        longer offers STLS, and a second STLS is refused.
        """
        yield self.deliver(message())

        def run():
            client = poplib.POP3("127.0.0.1", self.port("pop3"), timeout=10)
            client.stls(self.tlsContext())
            capabilities = client.capa()
            try:
                client._shortcmd("STLS")
            except poplib.error_proto as e:
                again = e.args[0]
            client.user(ALICE)
            client.pass_(PASSWORD)
            stat = client.stat()
            client.quit()
            return capabilities, again, stat

        capabilities, again, stat = yield self.inThread(run)
        self.assertNotIn("STLS", capabilities)
        self.assertIn("USER", capabilities)
        self.assertEqual(again, b"-ERR TLS is already active.")
        self.assertEqual(stat[0], 1)

    @defer.inlineCallbacks
    def test_stlsInjection(self):
        """
        Commands sent in plaintext behind STLS, in the same write, are
        dropped: inside TLS there is no answer to them.
        """

        def run():
            client = self.client()
            client.readLine()
            client.send(b"STLS\r\nCAPA\r\n")
            ready = client.readLine()
            leftover = client.buffer
            client.startTLS(self.tlsContext(), hostname="127.0.0.1")
            client.sock.settimeout(0.3)
            try:
                injected = client.sock.recv(1000)
            except (TimeoutError, ssl.SSLError, OSError):
                injected = b""
            client.sock.settimeout(10)
            noop = client.command(b"QUIT")
            client.close()
            return ready, leftover, injected, noop

        ready, leftover, injected, noop = yield self.inThread(run)
        self.assertEqual(ready, b"+OK Begin TLS negotiation.")
        self.assertEqual((leftover, injected), (b"", b""))
        self.assertEqual(noop, b"+OK Bye.")

    @defer.inlineCallbacks
    def test_pop3s(self):
        """
        POP3S speaks TLS from the first byte: poplib.POP3_SSL logs in and
        retrieves, and CAPA does not offer STLS.
        """
        yield self.deliver(message())

        def run():
            client = poplib.POP3_SSL(
                "127.0.0.1", self.port("pop3s"), context=self.tlsContext(), timeout=10
            )
            capabilities = client.capa()
            client.user(ALICE)
            client.pass_(PASSWORD)
            lines = client.retr(1)[1]
            client.quit()
            return capabilities, lines

        capabilities, lines = yield self.inThread(run)
        self.assertNotIn("STLS", capabilities)
        self.assertIn("USER", capabilities)
        self.assertIn(b"Subject: Hello", lines)

    @defer.inlineCallbacks
    def test_thunderbirdSequence(self):
        """
        Thunderbird's sequence (CAPA, STLS, CAPA again, AUTH PLAIN without
        initial response, STAT, LIST, UIDL, then RETR and DELE per message,
        QUIT) downloads and removes every message.
        """
        yield self.deliver(message(subject="one"), message(subject="two"))

        def run():
            client = self.client()
            client.readLine()
            client.command(b"CAPA")
            before = client.readMultiline()
            client.stls(self.tlsContext())
            client.command(b"CAPA")
            after = client.readMultiline()
            challenge = client.command(b"AUTH PLAIN")
            loggedIn = client.command(plain(ALICE))
            stat = client.command(b"STAT")
            client.command(b"LIST")
            client.readMultiline()
            client.command(b"UIDL")
            client.readMultiline()
            bodies = []
            for n in (b"1", b"2"):
                client.command(b"RETR " + n)
                bodies.append(client.readMultiline())
                client.command(b"DELE " + n)
            bye = client.command(b"QUIT")
            client.close()
            return before, after, challenge, loggedIn, stat, bodies, bye

        before, after, challenge, loggedIn, stat, bodies, bye = yield self.inThread(run)
        self.assertIn(b"STLS\r\n", before)
        self.assertNotIn(b"STLS", after)
        self.assertIn(b"SASL PLAIN LOGIN\r\n", after)
        self.assertEqual((challenge, loggedIn), (b"+ ", b"+OK Logged in."))
        self.assertTrue(stat.startswith(b"+OK 2 "))
        self.assertIn(b"Subject: one", bodies[0])
        self.assertIn(b"Subject: two", bodies[1])
        self.assertEqual(bye, b"+OK Logging out, 2 messages deleted.")
        self.assertEqual(self.messages(ALICE), [])


class PlaintextRefusedTests(POP3TestCase):
    """
    With auth.plaintext = "never" (what every non-loopback client gets by
    default), passwords are refused before TLS and accepted after.
    """

    configValues = {"plaintext_auth": "never"}

    @defer.inlineCallbacks
    def test_refusedBeforeTLS(self):
        """
        Before TLS, CAPA offers neither USER nor SASL, and USER and AUTH get
        -ERR [AUTH]; after STLS, login works; on POP3S it works at once.
        """

        def run():
            client = self.client()
            client.readLine()
            client.command(b"CAPA")
            capabilities = client.readMultiline()
            replies = [
                client.command(b"USER " + ALICE.encode()),
                client.command(b"AUTH PLAIN " + plain(ALICE)),
                client.command(b"AUTH PLAIN"),
            ]
            client.command(b"AUTH")
            mechanisms = client.readMultiline()
            client.stls(self.tlsContext())
            client.command(b"CAPA")
            afterTLS = client.readMultiline()
            client.command(b"USER " + ALICE.encode())
            loggedIn = client.command(b"PASS " + PASSWORD.encode())
            client.close()
            implicit = poplib.POP3_SSL(
                "127.0.0.1", self.port("pop3s"), context=self.tlsContext(), timeout=10
            )
            implicit.user(ALICE)
            implicitReply = implicit.pass_(PASSWORD)
            implicit.quit()
            return capabilities, replies, mechanisms, afterTLS, loggedIn, implicitReply

        capabilities, replies, mechanisms, afterTLS, loggedIn, implicitReply = yield self.inThread(
            run
        )
        self.assertNotIn(b"USER", capabilities)
        self.assertNotIn(b"SASL", capabilities)
        self.assertIn(b"STLS", capabilities)
        refusal = (
            b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
        )
        self.assertEqual(replies, [refusal] * 3)
        self.assertEqual(mechanisms, b".\r\n")
        self.assertIn(b"USER\r\nSASL PLAIN LOGIN\r\n", afterTLS)
        self.assertEqual(loggedIn, b"+OK Logged in.")
        self.assertEqual(implicitReply, b"+OK Logged in.")


class ConnectionLimitTests(POP3TestCase):
    # Loopback clients stand for remote ones here (loopback is trusted by default).
    limits = {"connections_per_ip": 1, "trusted_networks": ()}

    @defer.inlineCallbacks
    def test_connectionLimit(self):
        """
        Past the per-address connection limit a connection gets
        -ERR [SYS/TEMP] and is closed.
        """

        def run():
            first = self.client()
            first.readLine()
            second = self.client()
            refused = second.readLine()
            closed = second.closed()
            first.close()
            return refused, closed

        refused, closed = yield self.inThread(run)
        self.assertEqual(refused, b"-ERR [SYS/TEMP] Too many connections from your address.")
        self.assertTrue(closed)


class TimeoutTests(POP3TestCase):
    """
    Deadlines, idle timers and login delays at their default values, on a
    clock the tests advance.
    """

    useClock = True
    limits = {"auth_failure_delay": 2.0, "auth_failure_delay_max": 15.0}

    def greeted(self) -> POPClient:
        client = self.client()
        client.readLine()
        return client

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        """
        A logged-in session that sends nothing for the idle timeout (10
        minutes) is told so and closed; it lives until then.
        """
        client = yield self.inThread(self.client)
        self.addCleanup(client.close)
        self.assertEqual((yield self.inThread(client.login)), b"+OK Logged in.")
        self.clock.advance(599)
        [session] = self.sessions("pop3")
        self.assertFalse(session.transport.disconnecting)
        self.clock.advance(1)
        said, closed = yield self.inThread(client.rest)
        self.assertTrue(closed)
        self.assertEqual(said, b"-ERR Disconnected for inactivity.\r\n")

    @defer.inlineCallbacks
    def test_loginTimeoutWhileTrickling(self):
        """
        A session that does not log in within the login timeout (3
        minutes) is closed, although it keeps sending a byte every 10 s.
        """
        client = yield self.inThread(self.greeted)
        self.addCleanup(client.close)
        sent = yield self.trickle(client, [b"N", b"O", b"O", b"P", b"\r\n"] * 20, 10.0, "pop3")
        self.assertEqual(sent, 18)
        said, closed = yield self.inThread(client.rest)
        self.assertTrue(said.endswith(b"-ERR Disconnected: no login in time.\r\n"), said)
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password gets -ERR [AUTH] only after the throttling delay,
        which doubles for the next (2 s, 4 s), the same for USER/PASS and
        AUTH PLAIN and for an unknown user (here counted apart, per user
        name: loopback is a trusted network); the right password then works
        on the same connection.
        """
        client = yield self.inThread(self.greeted)
        self.addCleanup(client.close)
        yield self.inThread(client.command, b"USER " + ALICE.encode())
        wrong = yield self.delayedReply(lambda: client.command(b"PASS wrong"))
        again = yield self.delayedReply(lambda: client.command(b"AUTH PLAIN " + plain(ALICE, "wrong")))
        unknown = yield self.delayedReply(lambda: client.command(b"AUTH PLAIN " + plain("nobody@localhost")))
        failed = b"-ERR [AUTH] Authentication failed."
        self.assertEqual([wrong, again, unknown], [(failed, 2.0), (failed, 4.0), (failed, 2.0)])
        yield self.inThread(client.command, b"USER " + ALICE.encode())
        self.assertEqual((yield self.inThread(client.command, b"PASS " + PASSWORD.encode())), b"+OK Logged in.")

    @defer.inlineCallbacks
    def test_stopDuringRetr(self):
        """
        When the daemon stops in the middle of a long RETR, the response is
        cut short, the client is told and the connection closed, without
        waiting for the grace period.
        """
        yield self.deliver(message(body=("x" * 78 + "\r\n") * 100_000))

        def start():
            client = self.client()
            client.login()
            client.send(b"RETR 1\r\n")
            client.readLine()
            return client

        def readToEnd(client):
            client.closed(wait=10)
            client.close()
            return client.buffer

        client = yield self.inThread(start)
        reading = self.inThread(readToEnd, client)
        stopped = self.stopServer()
        # The grace period runs on self.clock, which does not move: the
        # stop must not need it.
        yield waitUntil(lambda: stopped.called)
        rest = yield reading
        self.assertTrue(rest.endswith(b"-ERR [SYS/TEMP] Server shutting down.\r\n"), rest[-100:])
        self.assertLess(len(rest), 8_000_000)


class UidlFormatTests(unittest.SynchronousTestCase):
    def test_dovecotForms(self):
        """
        Dovecot's pop3_uidl_format forms: zero-padded lower-case hex, long
        variable names, the base name, and %% for a percent sign.
        """
        self.assertEqual(uidlFormatter("%08Xu%08Xv")(10, 0x6B0E06E6, "b"), b"0000000a6b0e06e6")
        self.assertEqual(uidlFormatter("%{uid}-%{uidvalidity}")(3, 4, "b"), b"3-4")
        self.assertEqual(uidlFormatter("%f")(3, 4, "1.M2P3.host"), b"1.M2P3.host")
        self.assertEqual(uidlFormatter("%%%u{}")(1, 2, "b"), b"%1{}")

    @settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(st.text(max_size=30))
    def test_anyTemplate(self, template):
        """
        Any template either is refused with BadUidlFormat or makes ids.
        """
        try:
            uidl = uidlFormatter(template)
        except BadUidlFormat:
            return
        self.assertIsInstance(uidl(1, 2, "base"), bytes)



class MaildropOpenTests(unittest.SynchronousTestCase):
    """
    Taking the maildrop's view while another process changes the INBOX.
    """

    def test_sizesOfMessagesMovedWhileOpening(self):
        """
        Another process expunges the first message and renames the
        second's file just after the maildrop's look at the folder: reading
        the second's size (its name, as Dovecot may write it, does not
        carry it) lists the folder again, which moves every index after the
        expunged message; each size is still its own message's.
        """
        mailbox = MailStore(Path(self.mktemp())).mailbox("alice@localhost")
        mailbox.ensureExists()
        cur = mailbox.folderPath("INBOX") / "cur"
        texts = [b"Subject: %d\n\n%s\n" % (n, body) for n, body in enumerate((b"a", b"bb" * 50, b"ccc" * 300), 1)]
        # The first carries its sizes in its name, the others do not.
        names = [cur / f"1700000001.M1P9Q1.other,S={len(texts[0])},W={len(texts[0]) + 3}:2,S"]
        names += [cur / f"170000000{n}.M{n}P9Q{n}.other:2,S" for n in (2, 3)]
        for name, text in zip(names, texts):
            name.write_bytes(text)
        folder = mailbox.folder("INBOX")
        folder.refresh()
        refresh = folder.refresh

        def refreshThenAnotherProcess():
            folder.refresh = refresh
            change = refresh()
            os.rename(names[1], names[1].with_name(names[1].name.replace(":2,S", ":2,RS")))
            os.unlink(names[0])
            return change

        folder.refresh = refreshThenAnotherProcess
        drop = Maildrop(mailbox)
        drop.open()
        self.addCleanup(drop.logout)
        self.assertEqual(drop.sizes, [len(text) + text.count(b"\n") for text in texts])
