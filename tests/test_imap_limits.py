"""
IMAP limits, bad input and TLS: literal caps, line length, nesting,
timeouts, streaming of big APPENDs, STARTTLS and IMAPS.
"""

from __future__ import annotations

import resource
import socket
import ssl

from twisted.internet import defer, reactor, task

from tests.support import IMAPClient, IMAPTestCase, sampleMessage, waitForEmptySpool, waitUntil


def clientContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class LiteralLimitTests(IMAPTestCase):
    limits = {"imap_line_length": 4096, "preauth_literal_size": 1024}

    @defer.inlineCallbacks
    def test_hugeLiteralRefusedUnread(self):
        """
        `APPEND INBOX {4294967295}` gets NO [TOOBIG] at once, with no
        continuation: the client never sends the data, and the session
        goes on; the non-synchronizing form, whose data is coming anyway,
        ends the session rather than reading 4 GB.
        """

        def run(client):
            refused = client.command(b"a APPEND INBOX {4294967295}")
            noop = client.command(b"b NOOP")
            client.send(b"c APPEND INBOX {4294967295+}\r\n" + b"x" * 1000)
            return refused, noop, client.closed(), client.buffer

        refused, noop, closed, rest = yield self.session(run)
        self.assertEqual(refused, ([], b"a NO [TOOBIG] Message too big"))
        self.assertEqual(noop, ([], b"b OK NOOP completed"))
        self.assertTrue(closed)
        self.assertEqual(rest, b"c NO [TOOBIG] Message too big\r\n* BYE Literal too big\r\n")

    @defer.inlineCallbacks
    def test_preauthLiteralCap(self):
        """
        Before login a literal above preauth_literal_size is refused: NO
        for {n} (nothing is read), BYE and close for {n+}.
        """

        def run(client):
            refused = client.command(b"a LOGIN {2000}")
            ok = client.command(b"b NOOP")
            client.send(b"c LOGIN {2000+}\r\n" + b"x" * 2000 + b" y\r\n")
            return refused, ok, client.closed(), client.buffer

        refused, ok, closed, rest = yield self.session(run, login=False)
        self.assertEqual(refused, ([], b"a NO [TOOBIG] Literal too big before login"))
        self.assertEqual(ok, ([], b"b OK NOOP completed"))
        self.assertTrue(closed)
        self.assertEqual(rest, b"* BYE Literal too big before login\r\n")

    @defer.inlineCallbacks
    def test_literalLogin(self):
        """
        LOGIN with literals (both forms) works before login within the cap.
        """

        def run(client):
            client.send(b"a LOGIN {15}\r\n")
            client.readLine()
            client.send(b"alice@localhost {28+}\r\ncorrect horse battery staple\r\n")
            return client.readUntilTagged(b"a")[1]

        reply = yield self.session(run, login=False)
        self.assertTrue(reply.startswith(b"a OK [CAPABILITY"), reply)

    @defer.inlineCallbacks
    def test_postauthLiteralCap(self):
        """
        After login, a literal that is not an APPEND message is capped by
        the line length: {n+} over it is answered NO [TOOBIG] and its data
        skipped, so the next command is understood.
        """

        def run(client):
            client.send(b"a SELECT {5000+}\r\n" + b"y" * 5000 + b"\r\nb NOOP\r\n")
            return client.readUntilTagged(b"a"), client.readUntilTagged(b"b")

        refused, noop = yield self.session(run)
        self.assertEqual(refused, ([], b"a NO [TOOBIG] Literal too big"))
        self.assertEqual(noop, ([], b"b OK NOOP completed"))

    @defer.inlineCallbacks
    def test_lineTooLong(self):
        """
        A command line over imap_line_length gets BAD (with its tag when it
        has one), a {n+} literal at its end is skipped, and the session goes on.
        """

        def run(client):
            client.send(b"a NOOP " + b"x" * 10000 + b"\r\n")
            long = client.readUntilTagged(b"a")
            client.send(b"b APPEND INBOX " + b"z" * 10000 + b" {6+}\r\nb NOOP\r\nc NOOP\r\n")
            skipped = client.readUntilTagged(b"b")
            return long, skipped, client.readUntilTagged(b"c")

        long, skipped, after = yield self.session(run)
        self.assertEqual(long, ([], b"a BAD Command line too long"))
        self.assertEqual(skipped, ([], b"b BAD Command line too long"))
        self.assertEqual(after, ([], b"c OK NOOP completed"))

    @defer.inlineCallbacks
    def test_malformedCommands(self):
        """
        Every malformed command gets BAD and the session continues.
        """
        yield self.deliver(sampleMessage("one"))
        nested = b"(" * 40 + b"ALL" + b")" * 40
        bad = [
            b"a1 SEARCH " + nested,
            b"a2 SEARCH (ALL",
            b"a3 SEARCH ALL)",
            b'a4 LIST "unterminated',
            b'a5 LIST "bad\\escape" *',
            b"a6 FETCH 0 FLAGS",
            b"a7 FETCH 1:x FLAGS",
            b"a8 FETCH 1 (FLAGS",
            b"a9 FETCH 1 BODY[HEADER.FIELDS ()]",
            b"a10 FETCH 1 BODY[1.MIMEX]",
            b"a11 FETCH 1 NOSUCH",
            b"a12 STORE 1 +FLAGS",
            b"a13 UID FROB 1",
            b"a14 UID",
            b"a15 SELECT",
            b"a16 STATUS INBOX",
            b"a17 COPY 1",
            b"a18 FETCH 9 FLAGS",
            b"a19 SEARCH",
            b"a20 ID",
            b"a21 ENABLE",
            b"a22 SEARCH UID",
            b"a23 FETCH 4294967296 FLAGS",
            b"a24 EXPUNGE now",
        ]

        def run(client):
            replies = [client.command(line)[1] for line in bad]
            return replies, client.command(b"z NOOP")

        replies, noop = yield self.session(run, select=b"INBOX")
        for line, reply in zip(bad, replies):
            tag = line.split(b" ", 1)[0]
            self.assertTrue(reply.startswith(tag + b" BAD "), (line, reply))
        self.assertEqual(noop, ([], b"z OK NOOP completed"))


class PipeliningTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_pipelinedCommandsAnsweredInOrder(self):
        """
        Commands sent in one write, some answered at once and some after a
        FETCH streamed or an APPEND stored, are answered in order.
        """
        yield self.deliver(*(sampleMessage(f"m{i}") for i in range(20)))
        message = sampleMessage("appended")

        def run(client):
            client.send(
                b"a FETCH 1:* (FLAGS BODY.PEEK[])\r\nb NOOP\r\n"
                b"c APPEND INBOX {%d+}\r\n%b\r\nd UID FETCH 21 (UID)\r\ne STATUS INBOX (MESSAGES)\r\n"
                % (len(message), message)
            )
            lines = []
            while not lines or not lines[-1].startswith(b"e "):
                lines.append(client.readResponse())
            return [line.split(b" ", 2)[:2] for line in lines if not line.startswith(b"* ")]

        tagged = yield self.session(run, select=b"INBOX")
        self.assertEqual(tagged, [[b"a", b"OK"], [b"b", b"OK"], [b"c", b"OK"], [b"d", b"OK"], [b"e", b"OK"]])

    @defer.inlineCallbacks
    def test_droppedDuringAppend(self):
        """
        A connection lost in the middle of an APPEND literal leaves nothing
        behind: no message, no spool file.
        """

        def run(client):
            client.send(b"a APPEND INBOX {100000}\r\n")
            # The continuation says the server is reading the literal.
            assert client.readLine().startswith(b"+ "), client.buffer
            client.send(b"x" * 5000)

        yield self.session(run)
        factory = self.service.listeners["imap"].factory
        yield waitUntil(lambda: not factory.sessions)
        self.assertEqual(self.messages("alice@localhost"), [])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])


class TimeoutTests(IMAPTestCase):
    """
    The login deadline and the idle timer at their default values, on a
    clock the tests advance.
    """

    useClock = True
    limits = {"login_timeout": 180.0, "imap_idle_timeout": 1800.0}

    def greeted(self) -> IMAPClient:
        client = IMAPClient(self.port("imap"))
        client.readLine()
        return client

    @defer.inlineCallbacks
    def test_loginTimeoutDespiteTrickle(self):
        """
        A session that does not log in within login_timeout (3 minutes) is
        closed with BYE, however it trickles bytes (one every 10 s).
        """
        client = yield self.inThread(self.greeted)
        self.addCleanup(client.close)
        pieces = [b"a NOOP\r\n"[i : i + 1] for i in range(8)] * 10
        sent = yield self.trickle(client, pieces, 10.0, "imap")
        self.assertEqual(sent, 18)
        rest, closed = yield self.inThread(client.rest)
        self.assertTrue(closed)
        self.assertIn(b"* BYE Login time exceeded\r\n", rest)

    @defer.inlineCallbacks
    def test_idleTimeoutAfterLogin(self):
        """
        A logged-in session idle longer than imap_idle_timeout (30
        minutes) gets BYE and is closed; a command before then starts the
        wait again, and the login deadline no longer applies.
        """

        def login():
            client = self.greeted()
            client.login()
            return client

        client = yield self.inThread(login)
        self.addCleanup(client.close)
        self.clock.advance(1000)
        alive = yield self.inThread(client.command, b"b NOOP")
        self.clock.advance(1799)
        [session] = self.sessions("imap")
        self.assertFalse(session.transport.disconnecting)
        self.clock.advance(1)
        rest, closed = yield self.inThread(client.rest)
        self.assertEqual(alive, ([], b"b OK NOOP completed"))
        self.assertTrue(closed)
        self.assertEqual(rest, b"* BYE Autologout; connection idle too long\r\n")


class StreamingTests(IMAPTestCase):
    limits = {"message_size": 200 * 1024 * 1024}

    @defer.inlineCallbacks
    def test_bigAppendStreamed(self):
        """
        A 100 MB APPEND literal is written to the store as it arrives: the
        session never holds more than a little of it, memory stays flat,
        and the stored message has every octet (LF on disk).
        """
        size = 100 * 1024 * 1024
        line = b"y" * 1022 + b"\r\n"
        chunk = line * 256
        samples = []

        def sample():
            for session in self.service.listeners["imap"].factory.sessions:
                samples.append(session.framer.pending)

        sampler = task.LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(0.01)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def run(client):
            client.send(b"a APPEND Archive {%d+}\r\n" % size)
            sent = 0
            while sent < size:
                client.sock.sendall(chunk)
                sent += len(chunk)
            client.send(b"\r\n")
            return client.readUntilTagged(b"a")

        untagged, tagged = yield self.session(run)
        sampler.stop()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        self.assertTrue(tagged.startswith(b"a OK [APPENDUID "), tagged)
        [stored] = self.messages("alice@localhost", ".Archive")
        self.assertEqual(stored.stat().st_size, size - size // 1024)
        self.assertLess(max(samples), 2 * 1024 * 1024)
        self.assertLess(grown, 30 * 1024)  # kilobytes


class StartTLSTests(IMAPTestCase):
    configValues = {"plaintext_auth": "never"}

    @defer.inlineCallbacks
    def test_loginDisabledBeforeTLS(self):
        """
        With plaintext_auth = never, the greeting advertises LOGINDISABLED
        (no AUTH=PLAIN), LOGIN and AUTHENTICATE are refused before TLS, and
        after STARTTLS AUTH=PLAIN is offered and LOGIN works.
        """

        def run():
            client = IMAPClient(self.port("imap"))
            greeting = client.readLine()
            login = client.command(b"a LOGIN alice@localhost x")[1]
            auth = client.command(b"b AUTHENTICATE PLAIN")[1]
            starttls = client.command(b"c STARTTLS")[1]
            client.startTLS(clientContext())
            caps = client.command(b"d CAPABILITY")[0]
            client.login()
            client.close()
            return greeting, login, auth, starttls, caps

        greeting, login, auth, starttls, caps = yield self.inThread(run)
        self.assertIn(b" LOGINDISABLED", greeting)
        self.assertIn(b" STARTTLS", greeting)
        self.assertNotIn(b"AUTH=PLAIN", greeting)
        self.assertEqual(login, b"a NO [PRIVACYREQUIRED] Plaintext login is disabled before STARTTLS")
        self.assertTrue(auth.startswith(b"b NO [PRIVACYREQUIRED]"))
        self.assertEqual(starttls, b"c OK Begin TLS negotiation now")
        self.assertIn(b" AUTH=PLAIN", caps[0])
        self.assertNotIn(b"STARTTLS", caps[0])

    @defer.inlineCallbacks
    def test_plaintextBehindStartTLSDiscarded(self):
        """
        `a STARTTLS\\r\\nb CAPABILITY\\r\\n` in one write: b, sent in
        plaintext, gets no answer inside TLS.
        """

        def run():
            client = IMAPClient(self.port("imap"))
            client.readLine()
            client.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
            ok = client.readLine()
            client.startTLS(clientContext())
            client.send(b"c NOOP\r\n")
            first = client.readLine()
            client.close()
            return ok, first

        ok, first = yield self.inThread(run)
        self.assertEqual(ok, b"a OK Begin TLS negotiation now")
        self.assertEqual(first, b"c OK NOOP completed")

    @defer.inlineCallbacks
    def test_imapsIsSecure(self):
        """
        On the IMAPS listener the session knows it is secure: no STARTTLS,
        AUTH=PLAIN offered, LOGIN accepted under plaintext_auth = never;
        FETCH streams bodies through TLS.
        """
        body = "z" * 70 + "\r\n"
        yield self.deliver(*(sampleMessage(f"m{i}", body=body * 300) for i in range(40)))

        def run():
            raw = socket.create_connection(("127.0.0.1", self.port("imaps")), timeout=10)
            client = IMAPClient.__new__(IMAPClient)
            client.sock = clientContext().wrap_socket(raw, server_hostname="mx.test")
            client.buffer = b""
            greeting = client.readLine()
            login = client.login()
            client.command(b"s SELECT INBOX")
            fetched = client.command(b"f UID FETCH 1:* (BODY.PEEK[])")
            client.close()
            return greeting, login, fetched

        greeting, login, (untagged, tagged) = yield self.inThread(run)
        self.assertNotIn(b"STARTTLS", greeting)
        self.assertIn(b" AUTH=PLAIN", greeting)
        self.assertTrue(login.startswith(b"L OK"))
        self.assertEqual(tagged, b"f OK FETCH completed")
        self.assertEqual(len(untagged), 40)
        self.assertTrue(all(line.endswith((body * 300).encode() + b")") for line in untagged))
