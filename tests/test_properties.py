"""
Property-based tests (Hypothesis) for what clients send: SMTP commands and
addresses (MX and submission), DATA decoding, and POP3 commands.  Whatever
the input, the session answers and raises nothing; afterwards it is either
still usable (it answers NOOP) or closed after a last reply saying why.

Sessions run over a StringTransport with a Clock and a store and login
that answer at once, so each example is a pure run of the state machine.
"""

from __future__ import annotations

import base64
import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred import error as credError
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import pop3
from twisted.mail.smtp import IMessageDelivery
from twisted.trial import unittest

from maild.pop3 import Maildrop, POP3Server, POP3Settings
from maild.smtp import DataDecoder, SMTPServer, SMTPSettings
from maild.submission import SubmissionDelivery, SubmissionServer
from tests.support import ServerTestCase

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


class InstantMessage:
    """
    A message being received that the store would keep: only its size.
    """

    def __init__(self) -> None:
        self.crlfSize = 0

    def write(self, data: bytes) -> None:
        self.crlfSize += len(data)

    def discard(self) -> None:
        pass


class InstantStore:
    """
    A store that delivers at once (the state machine, not the disk, is
    under test).
    """

    def incoming(self, headers: bytes = b"") -> InstantMessage:
        return InstantMessage()

    def deliver(self, message, recipients):
        return defer.succeed([])


class InstantLogin:
    """
    The Authenticator's interface, answering at once: the password "pw" is
    right for every user.
    """

    def __init__(self, avatar) -> None:
        self.avatar = avatar

    def login(self, creds, clientAddress, service, method, *interfaces):
        if creds.password != b"pw" or not creds.username:
            return defer.fail(credError.UnauthorizedLogin())
        user = creds.username.decode("utf-8", "replace")
        return defer.succeed((interfaces[0], self.avatar(user), lambda: None))


# What clients send -----------------------------------------------------------

addressText = st.one_of(
    st.sampled_from(
        [b"alice@localhost", b"<>", b'"a b"@localhost', b"postmaster", b"a\\@b@localhost",
         b"bob@example.org", b"x@[127.0.0.1]", b"\xe9@localhost", b'"\xe9"@x', b"a@b@c"]
    ),
    st.binary(max_size=20),
)
smtpLine = st.one_of(
    st.tuples(
        st.sampled_from([b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP",
                         b"QUIT", b"VRFY", b"EXPN", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN",
                         b"AUTH", b"BDAT", b"mail from:<", b""]),
        st.sampled_from([b"", b" ", b"<", b">", b" SIZE=10", b" BODY=8BITMIME", b" x"]),
        addressText,
        st.sampled_from([b"", b">", b"> SIZE=99999999999", b"> AUTH=<>", b"> SMTPUTF8"]),
    ).map(b"".join),
    st.binary(max_size=60),
    st.sampled_from([base64.b64encode(b"\0alice@localhost\0pw"), base64.b64encode(b"alice@localhost"),
                     base64.b64encode(b"pw"), b"*", b"=", b".", b"..", b"x" * 3000]),
    # Header lines, for when the session is in DATA.
    st.tuples(st.sampled_from([b"From: ", b"Sender: ", b"From: Name <", b"From: ("]), addressText).map(b"".join),
)
lineEnd = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])
smtpInput = st.lists(st.tuples(smtpLine, lineEnd).map(b"".join), max_size=25).map(b"".join)

pop3Line = st.one_of(
    st.tuples(
        st.sampled_from([b"USER", b"PASS", b"APOP", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"STAT",
                         b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP", b"QUIT", b"CAPA",
                         b"STLS", b"retr", b""]),
        st.sampled_from([b"", b" ", b" 1", b" 2", b" 0", b" -1", b" 1 1", b" 99999999999999999999",
                         b" alice@localhost", b" pw", b" x"]),
    ).map(b"".join),
    st.binary(max_size=60),
    st.sampled_from([base64.b64encode(b"\0alice@localhost\0pw"), base64.b64encode(b"alice@localhost"),
                     base64.b64encode(b"pw"), b"*", b"=", b"x" * 3000]),
)
pop3Input = st.lists(st.tuples(pop3Line, lineEnd).map(b"".join), max_size=25).map(b"".join)


def lastLine(output: bytes) -> bytes:
    return output.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


class SMTPPropertyTests(ServerTestCase):
    listeners = ("smtp",)

    def session(self, submission: bool) -> tuple[SMTPServer, StringTransport]:
        base = self.service.listeners["smtp"].factory.settings
        settings = dataclasses.replace(
            base,
            store=InstantStore(),
            clock=task.Clock(),
            delivery=None if submission else base.delivery,
            authenticator=InstantLogin(lambda user: SubmissionDelivery(base.addresses, user)),
            plaintextAuth=True,
        )
        session = (SubmissionServer if submission else SMTPServer)(settings)
        session.clientAddress = "127.0.0.1"
        transport = StringTransport(peerAddress=PEER)
        session.makeConnection(transport)
        return session, transport

    def check(self, submission: bool, data: bytes, cuts: list[int]) -> None:
        session, transport = self.session(submission)
        try:
            pos = 0
            for cut in cuts + [len(data)]:
                session.dataReceived(data[pos : pos + cut])
                pos += cut
            # Leave DATA or an AUTH exchange if in one, then ask.
            session.dataReceived(b"\r\n.\r\n*\r\nNOOP\r\n")
            output = transport.value()
            self.assertTrue(output.startswith(b"220 "))
            self.assertTrue(output.endswith(b"\r\n"), output[-200:])
            last = lastLine(output)
            if transport.disconnecting:
                self.assertTrue(last[:4] in (b"221 ", b"421 "), last)
            else:
                self.assertEqual(last, b"250 2.0.0 Ok")
            # Every reply is ASCII, with a code (RFC 5321 section 4.2).
            for line in output.rstrip(b"\r\n").split(b"\r\n"):
                self.assertTrue(line.isascii() and line[:3].isdigit() and line[3:4] in (b" ", b"-"), line)
        finally:
            session.connectionLost(None)

    @given(smtpInput, st.lists(st.integers(1, 200), max_size=5))
    @EXAMPLES
    def test_mx(self, data, cuts):
        """
        Any input to the MX port gets ASCII replies and no exception; the
        session then still answers NOOP, or it was closed with 221 or 421.
        """
        self.check(False, b"EHLO c\r\n" + data, cuts)

    @given(st.booleans(), smtpInput, st.lists(st.integers(1, 200), max_size=5))
    @EXAMPLES
    def test_submission(self, inData, data, cuts):
        """
        The same on submission, logged in first (AUTH PLAIN) so MAIL, RCPT
        and DATA reach the sender and header checks (half the time the
        input starts inside DATA, as the header section).
        """
        login = b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\0alice@localhost\0pw") + b"\r\n"
        if inData:
            login += b"MAIL FROM:<alice@localhost>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        self.check(True, login + data, cuts)


class DataDecoderPropertyTests(unittest.SynchronousTestCase):
    @given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10))
    @settings(max_examples=500, deadline=None)
    def test_anyInput(self, data, cuts):
        """
        Any input, in any pieces: the decoder never raises, never uses more
        than it was given, and stops at the first end marker.
        """
        decoder = DataDecoder()
        buffer = b""
        pos = 0
        for cut in cuts + [len(data)]:
            buffer += data[pos : pos + cut]
            pos += cut
            while True:
                content, used, done = decoder.decode(buffer)
                self.assertLessEqual(used, len(buffer))
                buffer = buffer[used:]
                if done:
                    return
                if not used:
                    break

    @given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30),
           st.lists(st.integers(1, 40), max_size=10))
    @settings(max_examples=500, deadline=None)
    def test_roundTrip(self, lines, cuts):
        """
        A message dot-stuffed as a client sends it (RFC 5321 section
        4.5.2) decodes to itself, however it is cut, and the input after
        the end marker is left for the next command.
        """
        message = b"".join(line + b"\r\n" for line in lines)
        wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        wire += b".\r\nQUIT\r\n"
        decoder = DataDecoder()
        buffer, out, pos = b"", b"", 0
        for cut in cuts + [len(wire)]:
            buffer += wire[pos : pos + cut]
            pos += cut
            while True:
                content, used, done = decoder.decode(buffer)
                out += content
                buffer = buffer[used:]
                if done or not used:
                    break
            if done:
                break
        self.assertTrue(done)
        self.assertEqual(out, message)
        self.assertEqual(buffer + wire[pos:], b"QUIT\r\n")
        self.assertFalse(decoder.bareLineEnding)


class POP3PropertyTests(ServerTestCase):
    listeners = ("pop3",)

    def session(self) -> tuple[POP3Server, StringTransport]:
        store = self.service.store
        settings = POP3Settings(
            hostname="mx.test",
            limits=self.config.limits,
            authenticator=InstantLogin(lambda user: Maildrop(store.mailbox("alice@localhost"))),
            clock=task.Clock(),
            plaintextAuth="always",
        )
        session = POP3Server(settings)
        session.clientAddress = "127.0.0.1"
        transport = StringTransport(peerAddress=PEER)
        session.makeConnection(transport)
        return session, transport

    @given(pop3Input, st.lists(st.integers(1, 200), max_size=5))
    @EXAMPLES
    def test_anyInput(self, data, cuts):
        """
        Any input gets +OK or -ERR answers and no exception; the session
        then still answers NOOP (+OK logged in, -ERR before), or it was
        closed after a last response.
        """
        session, transport = self.session()
        try:
            pos = 0
            for cut in cuts + [len(data)]:
                session.dataReceived(data[pos : pos + cut])
                pos += cut
            session.dataReceived(b"\r\n*\r\nNOOP\r\n")
            output = transport.value()
            self.assertTrue(output.startswith(b"+OK "))
            self.assertTrue(output.endswith(b"\r\n"))
            last = lastLine(output)
            if transport.disconnecting:
                self.assertTrue(last.startswith((b"+OK", b"-ERR")), last)
            else:
                self.assertIn(last, (b"+OK", b"-ERR Not logged in."))
        finally:
            session.connectionLost(None)
