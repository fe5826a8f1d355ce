"""
SMTP receiving (MX) over real sockets: commands, replies, limits, bad
input, durability, and the clients people use.
"""

from __future__ import annotations

import dataclasses
import email
import os
import smtplib
import subprocess
import threading
from io import BytesIO
from pathlib import Path

from twisted.internet import defer, reactor, ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import smtp as twistedSMTP
from twisted.trial import unittest

from maild.smtp import DataDecoder, SMTPServer
from tests.support import RawClient, ServerTestCase, waitForEmptySpool, waitUntil, writeUsers


def message(subject: str = "Hello", body: str = "Hi there.\r\n", extra: str = "") -> bytes:
    return (
        f"From: Carol <carol@remote.test>\r\nTo: alice@localhost\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n{extra}\r\n{body}"
    ).encode("utf-8")


def storedBody(path) -> bytes:
    """
    A stored message with our trace headers removed, in CRLF form.
    """
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: "), data[:100]
    received = data.index(b"\nReceived: ")
    end = data.index(b"\n", data.index(b"\n\t", data.index(b";", received)) + 1)
    return data[end + 1 :].replace(b"\n", b"\r\n")


class DataDecoderTests(unittest.SynchronousTestCase):
    """
    The DATA decoder alone: end marker, dot removal, bare line ends, pieces.
    """

    def decodeAll(self, pieces: list[bytes]) -> tuple[bytes, bytes, DataDecoder]:
        decoder = DataDecoder()
        buffer, content = b"", b""
        for piece in pieces:
            buffer += piece
            while True:
                out, used, done = decoder.decode(buffer)
                content += out
                buffer = buffer[used:]
                if done:
                    return content, buffer, decoder
                if not used:
                    break
        raise AssertionError("no end marker")

    def test_endMarkerAndRest(self):
        """
        The message ends at CRLF.CRLF; what follows is left for commands.
        """
        content, rest, _ = self.decodeAll([b"a\r\nb\r\n.\r\nQUIT\r\n"])
        self.assertEqual(content, b"a\r\nb\r\n")
        self.assertEqual(rest, b"QUIT\r\n")

    def test_dotStuffingRemovedAcrossPieces(self):
        """
        A leading dot is removed from every line, also when the line starts
        in a new piece, and the end marker may be split anywhere.
        """
        wire = b"..one\r\n.two\r\nthree\r\n..\r\n.\r\n"
        for cut in range(1, len(wire)):
            content, rest, decoder = self.decodeAll([wire[:cut], wire[cut:]])
            self.assertEqual(content, b".one\r\ntwo\r\nthree\r\n.\r\n", cut)
            self.assertEqual(rest, b"")
            self.assertFalse(decoder.bareLineEnding)

    def test_emptyMessage(self):
        content, rest, _ = self.decodeAll([b".\r\n"])
        self.assertEqual((content, rest), (b"", b""))

    def test_bareLineEndsDoNotEndTheMessage(self):
        """
        LF.LF, CR.CR and LF.CRLF are not the end of the message, and are
        noticed as bare line ends.
        """
        for smuggled in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"):
            content, rest, decoder = self.decodeAll([b"a" + smuggled + b"MAIL FROM:<x@y>\r\n.\r\n"])
            self.assertTrue(decoder.bareLineEnding, smuggled)
            self.assertIn(b"MAIL FROM", content)
            self.assertEqual(rest, b"")

    def test_longLineInPieces(self):
        """
        A line longer than the piece size is passed on in pieces; a CR at the
        end of a piece is kept until its LF comes.
        """
        line = b"x" * 200_000
        content, _, decoder = self.decodeAll([line + b"\r", b"\n.\r\n"])
        self.assertEqual(content, line + b"\r\n")
        self.assertFalse(decoder.bareLineEnding)


class SMTPCommandTests(ServerTestCase):
    """
    Each command and each error reply, over a raw socket.
    """

    def session(self, ehlo: bool = True) -> RawClient:
        client = RawClient(self.port())
        code, lines = client.readReply()
        assert code == 220, lines
        if ehlo:
            client.command(b"EHLO client.test")
        return client

    def inSession(self, f):
        return ServerTestCase.inSession(self, self.session, f)

    @defer.inlineCallbacks
    def test_greetingAndEhlo(self):
        """
        The greeting names the host; EHLO lists SIZE with the limit,
        8BITMIME, PIPELINING and ENHANCEDSTATUSCODES, and no AUTH on the MX.
        """

        def run():
            client = RawClient(self.port())
            greeting = client.readReply()
            ehlo = client.command(b"EHLO client.test")
            client.close()
            return greeting, ehlo

        (code, greeting), (ehloCode, lines) = yield self.inThread(run)
        self.assertEqual(code, 220)
        self.assertTrue(greeting[0].startswith(b"mx.test ESMTP"))
        self.assertEqual(ehloCode, 250)
        self.assertEqual(lines[0], b"mx.test Hello [127.0.0.1]")
        self.assertIn(b"SIZE %d" % self.config.limits.message_size, lines)
        for keyword in (b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES"):
            self.assertIn(keyword, lines)
        self.assertFalse([line for line in lines if line.startswith(b"AUTH")])

    @defer.inlineCallbacks
    def test_simpleCommands(self):
        """
        HELO, NOOP, RSET, VRFY, EXPN, HELP, QUIT and unknown commands get
        their replies, with enhanced status codes.
        """

        def run(client):
            replies = [
                client.command(b"HELO client.test"),
                client.command(b"HELO"),
                client.command(b"EHLO"),
                client.command(b"NOOP"),
                client.command(b"RSET"),
                client.command(b"VRFY alice"),
                client.command(b"VRFY"),
                client.command(b"EXPN staff"),
                client.command(b"HELP"),
                client.command(b"FROBNICATE"),
                client.command(b"\xff\xfe"),
                client.command(b""),
                client.command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
                client.command(b"QUIT"),
            ]
            return replies, client.closed()

        replies, closed = yield self.inSession(run)
        codes = [(code, lines[-1].split(b" ", 1)[0]) for code, lines in replies]
        self.assertEqual(
            codes,
            [
                (250, b"mx.test"),
                (501, b"5.5.4"),
                (501, b"5.5.4"),
                (250, b"2.0.0"),
                (250, b"2.0.0"),
                (252, b"2.5.2"),
                (501, b"5.5.4"),
                (502, b"5.5.1"),
                (214, b"2.0.0"),
                (500, b"5.5.2"),
                (500, b"5.5.2"),
                (500, b"5.5.2"),
                (503, b"5.5.1"),
                (221, b"2.0.0"),
            ],
        )
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_sequenceErrors(self):
        """
        RCPT before MAIL, DATA before RCPT and a nested MAIL get 503; DATA
        with no accepted recipient gets 554.
        """

        def run(client):
            return [
                client.command(b"RCPT TO:<alice@localhost>"),
                client.command(b"DATA"),
                client.command(b"MAIL FROM:<carol@remote.test>"),
                client.command(b"MAIL FROM:<carol@remote.test>"),
                client.command(b"DATA"),
                client.command(b"RCPT TO:<nobody@localhost>"),
                client.command(b"DATA"),
            ]

        replies = yield self.inSession(run)
        self.assertEqual(
            [(code, lines[0][:5]) for code, lines in replies],
            [
                (503, b"5.5.1"),
                (503, b"5.5.1"),
                (250, b"2.1.0"),
                (503, b"5.5.1"),
                (554, b"5.5.1"),
                (550, b"5.1.1"),
                (554, b"5.5.1"),
            ],
        )

    @defer.inlineCallbacks
    def test_mailParameters(self):
        """
        MAIL FROM syntax errors, bad senders (a NUL: the command line is
        refused), SIZE over the limit, BODY and unknown parameters get their
        own replies; the null sender is fine.
        """
        limit = self.config.limits.message_size

        def run(client):
            replies = []
            for line in (
                b"MAIL FROM carol@remote.test",
                b"MAIL FROM:<carol@@remote.test>",
                b"MAIL FROM:<car\x00ol@remote.test>",
                b"MAIL FROM:<carol@remote.test> SIZE=%d" % (limit + 1),
                b"MAIL FROM:<carol@remote.test> SIZE=big",
                b"MAIL FROM:<carol@remote.test> BODY=BINARYMIME",
                b"MAIL FROM:<carol@remote.test> SMTPUTF8",
                b"MAIL FROM:<carol@remote.test> SIZE=%d BODY=8BITMIME" % limit,
            ):
                replies.append(client.command(line))
            client.command(b"RSET")
            replies.append(client.command(b"MAIL FROM:<>"))
            return replies

        replies = yield self.inSession(run)
        self.assertEqual(
            [(code, lines[0][:5]) for code, lines in replies],
            [
                (501, b"5.5.4"),
                (501, b"5.1.7"),
                (500, b"5.5.2"),
                (552, b"5.3.4"),
                (501, b"5.5.4"),
                (501, b"5.5.4"),
                (555, b"5.5.4"),
                (250, b"2.1.0"),
                (250, b"2.1.0"),
            ],
        )

    @defer.inlineCallbacks
    def test_recipients(self):
        """
        Local users and the role accounts are accepted; unknown users get
        550 5.1.1, other domains 554 5.7.1 (never a relay), and names that
        could reach outside the data folder 501 5.1.3 (500 5.5.2 for a NUL,
        refused in any command line).
        """

        def run(client):
            client.command(b"MAIL FROM:<carol@remote.test>")
            return [
                client.command(b"RCPT TO:<" + rcpt + b">")
                for rcpt in (
                    b"alice@localhost",
                    b"Bob@Example.ORG",
                    b"postmaster@example.org",
                    b"postmaster",
                    b"abuse@localhost",
                    b"nobody@localhost",
                    b"alice@elsewhere.test",
                    b"alice@localhost.elsewhere.test",
                    b"../alice@localhost",
                    b"a/b@localhost",
                    b"alice@../localhost",
                    b"al\x00ice@localhost",
                    b"%s@localhost" % (b"a" * 65),
                    b'"a b"@localhost',
                )
            ]

        replies = yield self.inSession(run)
        self.assertEqual(
            [(code, lines[0][:5]) for code, lines in replies],
            [(250, b"2.1.5")] * 5
            + [(550, b"5.1.1"), (554, b"5.7.1"), (554, b"5.7.1")]
            + [(501, b"5.1.3")] * 3
            + [(500, b"5.5.2")]
            + [(501, b"5.1.3")] * 2,
        )
        self.assertEqual(os.listdir(self.dataDir / "mail"), sorted(os.listdir(self.dataDir / "mail")))
        self.assertEqual(sorted(os.listdir(self.dataDir / "mail")), ["example.org", "localhost"])

    @defer.inlineCallbacks
    def test_tooManyRecipients(self):
        """
        Past the recipient limit, RCPT gets 452 4.5.3 and the message still
        goes to the recipients accepted before.
        """
        yield self.stopServer()
        yield self.startServer(limits={"recipients": 2})

        def run(client):
            client.command(b"MAIL FROM:<carol@remote.test>")
            replies = [
                client.command(b"RCPT TO:<%s>" % r)
                for r in (b"alice@localhost", b"bob@example.org", b"postmaster@localhost")
            ]
            client.command(b"DATA")
            client.send(message() + b".\r\n")
            return replies, client.readReply()

        replies, final = yield self.inSession(run)
        self.assertEqual([code for code, _ in replies], [250, 250, 452])
        self.assertEqual(replies[2][1][0][:5], b"4.5.3")
        self.assertEqual(final[0], 250)
        self.assertEqual(len(self.messages("alice@localhost")), 1)
        self.assertEqual(len(self.messages("bob@example.org")), 1)

    @defer.inlineCallbacks
    def test_overlongCommandLine(self):
        """
        A command line over the limit gets 500 5.5.2 and the session goes on.
        """

        def run(client):
            long = client.command(b"MAIL FROM:<" + b"a" * 5000 + b"@remote.test>")
            huge = client.command(b"NOOP " + b"x" * 200_000)
            return long, huge, client.command(b"NOOP")

        long, huge, after = yield self.inSession(run)
        self.assertEqual((long[0], long[1][0][:5]), (500, b"5.5.2"))
        self.assertEqual((huge[0], huge[1][0][:5]), (500, b"5.5.2"))
        self.assertEqual(after[0], 250)


    @defer.inlineCallbacks
    def test_eightBitAddresses(self):
        """
        Without SMTPUTF8, an 8-bit byte anywhere in MAIL or RCPT (a quoted
        local part, a quoted-pair, the domain) gets 553 5.6.7 (RFC 6531
        section 3.5), and a message with ASCII addresses then goes through
        on the same session.
        """

        def run(client):
            replies = [
                client.command(b'MAIL FROM:<"\xe9"@example.com>'),
                client.command(b"MAIL FROM:<a\\\xe9@example.com>"),
                client.command(b"MAIL FROM:<a@\xe9xample.com>"),
                client.command(b"MAIL FROM:<carol@remote.test>"),
                client.command(b'RCPT TO:<"\xe9"@localhost>'),
                client.command(b"RCPT TO:<alice@localhost>"),
                client.command(b"DATA"),
            ]
            client.send(message() + b".\r\n")
            replies.append(client.readReply())
            return replies

        replies = yield self.inSession(run)
        self.assertEqual(
            [(code, lines[0][:5]) for code, lines in replies],
            [(553, b"5.6.7")] * 3
            + [(250, b"2.1.0"), (553, b"5.6.7"), (250, b"2.1.5"), (354, b"End d"), (250, b"2.0.0")],
        )

    @defer.inlineCallbacks
    def test_startTLSWithParameters(self):
        """
        STARTTLS with a parameter gets 501 5.5.4 (RFC 3207 section 4) and the
        session goes on in plaintext.
        """

        def run(client):
            return client.command(b"STARTTLS x"), client.command(b"NOOP")

        refused, after = yield self.inSession(run)
        self.assertEqual((refused[0], refused[1][0][:5]), (501, b"5.5.4"))
        self.assertEqual(after[0], 250)

    @defer.inlineCallbacks
    def test_controlCharactersInCommands(self):
        """
        A CR or NUL inside a command line is refused (500 5.5.2), so a CR
        in an address never reaches the stored Return-Path: header.
        """

        def run(client):
            replies = [
                client.command(b'MAIL FROM:<"a\rX-Injected: yes"@example.com>'),
                client.command(b"MAIL FROM:<carol\0@remote.test>"),
                client.command(b"NO\rOP"),
                client.command(b"MAIL FROM:<carol@remote.test>"),
                client.command(b"RCPT TO:<alice@localhost>"),
                client.command(b"DATA"),
            ]
            client.send(message() + b".\r\n")
            replies.append(client.readReply())
            return replies

        replies = yield self.inSession(run)
        self.assertEqual(
            [(code, lines[0][:5]) for code, lines in replies],
            [(500, b"5.5.2")] * 3 + [(250, b"2.1.0"), (250, b"2.1.5"), (354, b"End d"), (250, b"2.0.0")],
        )
        [path] = self.messages("alice@localhost")
        self.assertNotIn(b"X-Injected", path.read_bytes())


class SMTPDeliveryTests(ServerTestCase):
    """
    What is stored, and when.
    """

    @defer.inlineCallbacks
    def test_smtplibDelivery(self):
        """
        A message sent with smtplib lands in new/ byte for byte (LF on disk),
        after a Return-Path: and a Received: header naming the client and
        the queue id, with S= and W= sizes in its name.
        """
        sent = message(body="line one\r\n.leading dot\r\n\r\nlast\r\n")

        def send():
            with smtplib.SMTP("127.0.0.1", self.port()) as client:
                client.ehlo("client.test")
                client.sendmail("carol@remote.test", ["alice@localhost"], sent)
                return client.noop()

        yield self.inThread(send)
        [path] = self.messages("alice@localhost")
        self.assertEqual(path.parent.name, "new")
        data = path.read_bytes()
        self.assertNotIn(b"\r\n", data)
        self.assertEqual(storedBody(path), sent)
        parsed = email.message_from_bytes(data)
        self.assertEqual(parsed["Return-Path"], "<carol@remote.test>")
        received = " ".join(parsed["Received"].split())
        self.assertRegex(
            received,
            r"^from client\.test \(\[127\.0\.0\.1\]\) by mx\.test \(maild\) with ESMTP "
            r"id [0-9A-F]{12} for <alice@localhost>; \w{3}, ",
        )
        self.assertIn(f",S={len(data)},", path.name)
        crlfSize = len(data) + data.count(b"\n")
        self.assertTrue(path.name.endswith(f",W={crlfSize}"))

    @defer.inlineCallbacks
    def test_twistedClient(self):
        """
        Twisted's own ESMTP client delivers through maild, upgrading to TLS
        with STARTTLS and verifying the certificate made for the host name
        (it takes LF line ends and sends CRLF).
        """
        sent = message(subject="From Twisted")
        trust = ssl.Certificate.loadPEM(self.service.localCA.certPath.read_bytes())
        result = defer.Deferred()
        factory = twistedSMTP.ESMTPSenderFactory(
            None,
            None,
            "carol@remote.test",
            ["bob@example.org"],
            BytesIO(sent.replace(b"\r\n", b"\n")),
            result,
            contextFactory=ssl.optionsForClientTLS("mx.test", trustRoot=trust),
            requireAuthentication=False,
            requireTransportSecurity=True,
        )
        reactor.connectTCP("127.0.0.1", self.port(), factory)
        accepted, recipients = yield result
        self.assertEqual(accepted, 1)
        [path] = self.messages("bob@example.org")
        self.assertEqual(storedBody(path), sent)
        self.assertIn(b"with ESMTPS id", path.read_bytes())

    @defer.inlineCallbacks
    def test_severalRecipientsOneFile(self):
        """
        A message for several local users is written once and hard-linked
        into each Maildir; the Received: header then names no recipient.
        """

        def send():
            with smtplib.SMTP("127.0.0.1", self.port()) as client:
                client.sendmail(
                    "carol@remote.test", ["alice@localhost", "bob@example.org"], message()
                )

        yield self.inThread(send)
        [a] = self.messages("alice@localhost")
        [b] = self.messages("bob@example.org")
        self.assertEqual(os.stat(a).st_ino, os.stat(b).st_ino)
        self.assertEqual(os.stat(a).st_nlink, 2)
        self.assertNotIn(b"for <", a.read_bytes().split(b"\n\n")[0])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

    @defer.inlineCallbacks
    def test_headerlessMessage(self):
        """
        A message without headers keeps its first line out of the header
        section.
        """

        def send():
            client = RawClient(self.port())
            client.readReply()
            for line in (b"HELO c", b"MAIL FROM:<>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(b"just a body line\r\n.\r\n")
            return client.readReply()

        code, _ = yield self.inThread(send)
        self.assertEqual(code, 250)
        [path] = self.messages("alice@localhost")
        parsed = email.message_from_bytes(path.read_bytes())
        self.assertEqual(parsed.get_payload(), "just a body line\n")

    @defer.inlineCallbacks
    def test_pipelinedSession(self):
        """
        A whole pipelined session in one write gets its replies in order:
        the 250 for the message comes before QUIT's 221, although storing
        the message is asynchronous.
        """

        def run():
            client = RawClient(self.port())
            client.readReply()
            client.send(
                b"EHLO c\r\nMAIL FROM:<carol@remote.test>\r\nRCPT TO:<alice@localhost>\r\n"
                b"RCPT TO:<nobody@localhost>\r\nDATA\r\n"
            )
            replies = [client.readReply() for _ in range(5)]
            client.send(
                message() + b".\r\nMAIL FROM:<carol@remote.test>\r\n"
                b"RCPT TO:<bob@example.org>\r\nDATA\r\n"
            )
            replies += [client.readReply() for _ in range(4)]
            client.send(message(subject="Second") + b".\r\nQUIT\r\n")
            replies += [client.readReply() for _ in range(2)]
            return [code for code, _ in replies], client.closed()

        codes, closed = yield self.inThread(run)
        self.assertEqual(codes, [250, 250, 250, 550, 354, 250, 250, 250, 354, 250, 221])
        self.assertTrue(closed)
        self.assertEqual(len(self.messages("alice@localhost")), 1)
        self.assertEqual(len(self.messages("bob@example.org")), 1)

    @defer.inlineCallbacks
    def test_messageTooBig(self):
        """
        A message that grows past the size limit during DATA is read to its
        end, stored nowhere and answered 552 5.3.4; the session goes on.
        """
        yield self.stopServer()
        yield self.startServer(limits={"message_size": 10_000})

        def run():
            client = RawClient(self.port())
            client.readReply()
            for line in (b"EHLO c", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(message(body="x" * 70 + "\r\n") * 200 + b".\r\n")
            big = client.readReply()
            for line in (b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(message() + b".\r\n")
            return big, client.readReply()

        big, after = yield self.inThread(run)
        self.assertEqual((big[0], big[1][0][:5]), (552, b"5.3.4"))
        self.assertEqual(after[0], 250)
        self.assertEqual(len(self.messages("alice@localhost")), 1)
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

    @defer.inlineCallbacks
    def test_bareLineEndsRejected(self):
        """
        SMTP smuggling: a message with a bare LF or CR (here LF.LF followed
        by a second, forged transaction) is refused whole with 550 5.6.0;
        the forged commands are never run and nothing is stored.
        """

        def run():
            client = RawClient(self.port())
            client.readReply()
            for line in (b"EHLO c", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(
                b"Subject: one\r\n\r\nbody\n.\nMAIL FROM:<admin@localhost>\n"
                b"RCPT TO:<bob@example.org>\nDATA\nSubject: forged\n\r\n.\r\n"
            )
            return client.readReply(), client.command(b"NOOP")

        refused, noop = yield self.inThread(run)
        self.assertEqual((refused[0], refused[1][0][:5]), (550, b"5.6.0"))
        self.assertEqual(noop[0], 250)
        self.assertEqual(self.messages("alice@localhost"), [])
        self.assertEqual(self.messages("bob@example.org"), [])

    @defer.inlineCallbacks
    def test_disconnectMidData(self):
        """
        A client that disconnects during DATA leaves nothing in new/ and
        nothing in the spool.
        """

        def run():
            client = RawClient(self.port())
            client.readReply()
            for line in (b"EHLO c", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(message() * 100)
            client.close()

        yield self.inThread(run)
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])
        self.assertEqual(self.messages("alice@localhost"), [])

    @defer.inlineCallbacks
    def test_disconnectBeforeTheReply(self):
        """
        A client that sends a whole message and leaves before the 250: the
        message is stored, and the closed session sets no idle timer when
        the store answers (which would keep a dead session alive).
        """

        def run():
            client = RawClient(self.port())
            client.readReply()
            for line in (b"EHLO c", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(message() + b".\r\n")
            client.close()

        yield self.inThread(run)
        yield waitUntil(lambda: self.messages("alice@localhost"))
        self.assertEqual(len(self.messages("alice@localhost")), 1)

        def timers():
            return [c for c in reactor.getDelayedCalls() if "TimeoutMixin" in repr(c.func)]

        # A leaked session timer would stay (for minutes): this fails then.
        yield waitUntil(lambda: not timers())

    @defer.inlineCallbacks
    def test_concurrentDeliveries(self):
        """
        20 connections delivering 500 messages in all: each lands exactly
        once, byte for byte.
        """
        sent = {}

        def worker(n):
            with smtplib.SMTP("127.0.0.1", self.port()) as client:
                for i in range(25):
                    subject = f"msg {n}-{i}"
                    body = message(subject=subject, body=f"worker {n} message {i}\r\n" * (i + 1))
                    sent[subject] = body
                    client.sendmail("carol@remote.test", ["alice@localhost"], body)

        yield defer.gatherResults([self.inThread(worker, n) for n in range(20)])
        stored = {}
        for path in self.messages("alice@localhost"):
            body = storedBody(path)
            subject = email.message_from_bytes(body)["Subject"]
            self.assertNotIn(subject, stored)
            stored[subject] = body
        self.assertEqual(len(stored), 500)
        self.assertEqual(stored, sent)


class DurabilityTests(ServerTestCase):
    """
    250 means on disk.
    """

    @defer.inlineCallbacks
    def test_replyOnlyAfterSync(self):
        """
        The 250 to DATA is sent only after the file is in new/ and synced:
        while the sync step is held back, the client has no reply; once it
        completes, the reply comes and the file is there.
        """
        entered = threading.Event()
        proceed = threading.Event()
        synced = []

        def syncHook(paths):
            entered.set()
            proceed.wait(10)
            synced.extend(paths)

        yield self.stopServer()
        yield self.startServer(syncHook=syncHook)

        def run():
            client = RawClient(self.port())
            client.readReply()
            for line in (b"EHLO c", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(message() + b".\r\n")
            entered.wait(10)
            client.sock.settimeout(0.3)
            try:
                early = client.sock.recv(100)
            except OSError:
                early = b""
            inNew = [p.name for p in (self.maildir("alice@localhost") / "new").iterdir()]
            proceed.set()
            client.sock.settimeout(10)
            return early, inNew, client.readReply()

        early, inNew, reply = yield self.inThread(run)
        self.assertEqual(early, b"")
        self.assertEqual(len(inNew), 1)
        self.assertEqual(reply[0], 250)
        self.assertEqual([p.name for p in synced], inNew)

    @defer.inlineCallbacks
    def test_storageErrorIsTemporary(self):
        """
        When the disk is full (fsync fails with ENOSPC), DATA gets 452 4.3.1,
        nothing is left in new/ or the spool, and the next message is
        accepted once space returns.
        """
        import errno

        realFsync = os.fsync
        failing = [True]

        def fsync(fd):
            if failing[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return realFsync(fd)

        self.patch(os, "fsync", fsync)

        def run():
            client = RawClient(self.port())
            client.readReply()
            replies = []
            for attempt in range(2):
                for line in (b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                    client.command(line)
                client.send(message(subject=f"attempt {attempt}") + b".\r\n")
                replies.append(client.readReply())
                failing[0] = False
            return replies

        full, ok = yield self.inThread(run)
        self.assertEqual((full[0], full[1][0][:5]), (452, b"4.3.1"))
        self.assertEqual(ok[0], 250)
        [path] = self.messages("alice@localhost")
        self.assertIn(b"Subject: attempt 1", path.read_bytes())
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])


class DiskFullTests(ServerTestCase):
    """
    A real full disk: the data folder on a small tmpfs (needs the right to
    mount, as root in CI; skipped otherwise).
    """

    def setUp(self):
        self.dataDir = Path(self.mktemp()).resolve()
        self.dataDir.mkdir(parents=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(self.dataDir)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            raise unittest.SkipTest("cannot mount a tmpfs here")
        self.addCleanup(subprocess.run, ["umount", "-l", str(self.dataDir)])
        writeUsers(self.dataDir, self.users)
        return self.startServer()

    @defer.inlineCallbacks
    def test_diskFull(self):
        """
        Messages are accepted until the disk is full; then DATA gets 452
        4.3.1, nothing incomplete is in new/, the session goes on, and mail
        is accepted again once space is freed.
        """
        filler = self.dataDir / "filler"

        def run():
            client = RawClient(self.port())
            client.readReply()
            client.command(b"EHLO c")
            replies = []
            for n in range(40):
                for line in (b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                    client.command(line)
                client.send(message(subject=f"n{n}", body=("z" * 76 + "\r\n") * 600) + b".\r\n")
                replies.append(client.readReply())
                if replies[-1][0] != 250:
                    break
            noop = client.command(b"NOOP")
            filler.unlink()
            for line in (b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            client.send(message(subject="after") + b".\r\n")
            return replies, noop, client.readReply()

        filler.write_bytes(b"f" * 100_000)
        replies, noop, after = yield self.inThread(run)
        codes = [code for code, _ in replies]
        self.assertGreater(codes.count(250), 0)
        self.assertEqual((codes[-1], replies[-1][1][0][:5]), (452, b"4.3.1"))
        self.assertEqual(noop[0], 250)
        self.assertEqual(after[0], 250)
        stored = self.messages("alice@localhost")
        self.assertEqual(len(stored), codes.count(250) + 1)
        for path in stored[:-1]:
            self.assertTrue(storedBody(path).endswith(("z" * 76 + "\r\n").encode() * 600), path.name)
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])


class DeadlineTests(ServerTestCase):
    """
    The command and DATA deadlines at their default values, on a clock the
    tests advance.
    """

    useClock = True
    # The idle timer is longer, so only the deadlines can end the sessions.
    limits = {"command_timeout": 300.0, "data_timeout": 600.0, "idle_timeout": 1000.0}

    def greeted(self) -> RawClient:
        client = RawClient(self.port())
        client.readReply()
        return client

    @defer.inlineCallbacks
    def test_tricklingCommandHitsDeadline(self):
        """
        A command line sent a byte every 10 s (well within the idle
        timeout) is cut off with 421 4.4.2 at the command deadline, 300 s
        after its first byte, although bytes keep coming.
        """
        client = yield self.inThread(self.greeted)
        self.addCleanup(client.close)
        text = b"NOOP and then some more bytes that never end" * 2
        sent = yield self.trickle(client, [bytes([byte]) for byte in text], 10.0)
        self.assertEqual(sent, 30)
        buffer, closed = yield self.inThread(client.rest)
        self.assertTrue(buffer.startswith(b"421 4.4.2 "), buffer)
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_tricklingDataHitsDeadline(self):
        """
        DATA sent in pieces every 20 s, fast enough for the minimum data
        rate, is cut off at the DATA deadline (600 s) and nothing is stored.
        """

        def start():
            client = self.greeted()
            for line in (b"EHLO c", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                client.command(line)
            return client

        client = yield self.inThread(start)
        self.addCleanup(client.close)
        # 20 KB every 20 s: above the minimum data rate (500 octets/s).
        line = b"x" * 998 + b"\r\n"
        sent = yield self.trickle(client, [line * 20] * 100, 20.0)
        self.assertEqual(sent, 30)
        buffer, closed = yield self.inThread(client.rest)
        self.assertTrue(buffer.startswith(b"421 4.4.2 "), buffer)
        self.assertTrue(closed)
        self.assertEqual(self.messages("alice@localhost"), [])


class LimitTests(ServerTestCase):
    # Loopback is trusted (exempt from the connection limit) by default;
    # here these clients stand for remote ones.
    limits = {"connections_per_ip": 2, "trusted_networks": ()}

    @defer.inlineCallbacks
    def test_connectionLimitPerAddress(self):
        """
        Past the per-address limit a connection gets 421 4.7.0 and is
        closed, while another client address is still served.
        """

        def run():
            first, second = RawClient(self.port()), RawClient(self.port())
            first.readReply(), second.readReply()
            third = RawClient(self.port())
            refused = third.readReply()
            closed = third.closed()
            other = RawClient(self.port(), source="127.0.0.2")
            greeting = other.readReply()
            for c in (first, second, other):
                c.close()
            return refused, closed, greeting

        refused, closed, greeting = yield self.inThread(run)
        self.assertEqual((refused[0], refused[1][0][:5]), (421, b"4.7.0"))
        self.assertTrue(closed)
        self.assertEqual(greeting[0], 220)





class DataRateTests(ServerTestCase):
    """
    The minimum DATA rate ([limits] min_data_rate, counted after
    min_data_rate_after), driven by a Clock.
    """

    limits = {"min_data_rate": 100, "min_data_rate_after": 10.0}

    def session(self):
        clock = task.Clock()
        factory = self.service.listeners["smtp"].factory
        settings = dataclasses.replace(factory.settings, clock=clock)
        session = SMTPServer(settings)
        session.clientAddress = "127.0.0.1"
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        session.makeConnection(transport)
        self.addCleanup(lambda: session.transport and session.connectionLost(None))
        session.dataReceived(b"EHLO c\r\nMAIL FROM:<carol@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n")
        self.assertIn(b"354 ", transport.value())
        transport.clear()
        return session, transport, clock

    def test_trickleClosed(self):
        """
        A byte every 3 seconds averages far below the rate: once the window
        has passed the session gets 421 4.4.2 and is closed, and nothing is
        stored.
        """
        session, transport, clock = self.session()
        for _ in range(3):
            session.dataReceived(b"x")
            clock.advance(3)
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        self.assertTrue(transport.value().startswith(b"421 4.4.2 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.messages("alice@localhost"), [])

    def test_steadySenderGoesOn(self):
        """
        A client sending above the rate is never cut off, however long DATA
        takes; the check follows what it has sent.
        """
        session, transport, clock = self.session()
        for _ in range(100):
            session.dataReceived(b"y" * 150 + b"\r\n")
            clock.advance(1)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        # Then it stops: below the average rate soon enough.
        clock.advance(60)
        self.assertTrue(transport.value().startswith(b"421 4.4.2 "))
