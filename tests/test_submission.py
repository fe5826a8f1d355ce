"""
Submission (RFC 6409) and SMTPS (RFC 8314): STARTTLS, AUTH, sender
checks, no relaying; certificate reloading.  (TLS versions, for every
implicit-TLS listener, are in test_tls.)
"""

from __future__ import annotations

import base64
import gc
import smtplib
import ssl
import weakref

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from maild.submission import SubmissionDelivery, headerAddresses, headerValues
from maild.tls import fingerprint
from tests.support import PASSWORD, RawClient, ServerTestCase, clientContext


def plain(user: str, password: str = PASSWORD, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def message(sender: str = "alice@localhost", subject: str = "Hi") -> bytes:
    return f"From: Alice <{sender}>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n\r\nHello Bob.\r\n".encode()


class RecipientMemoryTests(unittest.SynchronousTestCase):
    """
    What submission keeps of a recipient once it is checked: nothing.
    """

    class OtherDomains:
        def isLocalDomain(self, domain):
            return False

    class Relay:
        def acceptRecipient(self, user, dest):
            return str(dest)

    def userKeptAfter(self, relay) -> bool:
        from twisted.mail import smtp

        delivery = SubmissionDelivery(self.OtherDomains(), "alice@localhost", relay)
        user = smtp.User(b"<bob@example.org>", b"helo", None, b"<alice@localhost>")
        try:
            delivery.validateTo(user)
        except smtp.SMTPServerError:
            pass
        kept = weakref.ref(user)
        del user
        gc.collect()
        return kept() is not None

    def test_remoteRecipientNotKept(self):
        """
        A recipient in another domain, taken by the relay, is not kept
        alive by the check (a shared exception's growing traceback once
        held every recipient's frames, and through them each session:
        about 15 KB per message queued).
        """
        self.assertFalse(self.userKeptAfter(self.Relay()))
        self.assertFalse(self.userKeptAfter(self.Relay()))

    def test_refusedRecipientNotKept(self):
        """
        Without a relay, the refusal of a recipient in another domain does
        not keep it alive either.
        """
        self.assertFalse(self.userKeptAfter(None))
        self.assertFalse(self.userKeptAfter(None))


class HeaderValuesTests(unittest.SynchronousTestCase):
    def test_unfoldedValues(self):
        """
        Folded fields are unfolded; names match whatever their case; other
        fields and the body are left alone.
        """
        headers = (
            b"Subject: from: not this\r\nFROM: Alice\r\n <alice@localhost>,\r\n\tbob@example.org\r\n"
            b"X-From: no\r\nsender: =?utf-8?q?S=C3=A9?= <s@localhost>\r\n\r\n"
        )
        self.assertEqual(
            headerValues(headers, ("from", "sender")),
            [" Alice <alice@localhost>,\tbob@example.org", " =?utf-8?q?S=C3=A9?= <s@localhost>"],
        )


class HeaderAddressesTests(unittest.SynchronousTestCase):
    def test_addresses(self):
        """
        Angle addresses, bare addr-specs, groups and routes give their
        addresses; display names and comments (nested, with quoted-pairs)
        are left out.
        """
        self.assertEqual(
            headerAddresses(' "Doe, J" <j@x> (a (nested \\) comment) <no@x>), k@y'),
            ["j@x", "k@y"],
        )
        self.assertEqual(headerAddresses(" team: a@x, b@y;, <@relay:c@z>"), ["a@x", "b@y", "c@z"])
        self.assertEqual(headerAddresses(" alice@localhost (Alice)"), ["alice@localhost"])
        self.assertEqual(headerAddresses(" undisclosed-recipients:;"), [])

    def test_deepNesting(self):
        """
        A value of thousands of "(", ":" or "<" is read in one pass: no
        RecursionError (the email package's parser recursed).
        """
        for char in "(:<,\\\"":
            self.assertIsInstance(headerAddresses(char * 100_000), list)

    @given(st.text(alphabet='ab@.,:;<>()"\\ \t', max_size=200))
    @settings(max_examples=500, deadline=None)
    def test_anyValue(self, value):
        """
        Any header value gives a list of addresses without spaces.
        """
        for address in headerAddresses(value):
            self.assertTrue(address)
            self.assertFalse(any(c.isspace() for c in address))


class SubmissionTests(ServerTestCase):
    listeners = ("submission", "smtps")
    limits = {"auth_failure_delay": 0.2, "auth_failure_delay_max": 0.4, "auth_failures_per_connection": 3}
    configValues = {"aliases": {"sales@localhost": "alice@localhost"}}

    def session(self, tls: bool = True) -> RawClient:
        client = RawClient(self.port("submission"))
        client.readReply()
        client.command(b"EHLO client.test")
        if tls:
            assert client.command(b"STARTTLS")[0] == 220
            client.startTLS(clientContext(self.service))
            client.command(b"EHLO client.test")
        return client

    def inSession(self, f):
        return ServerTestCase.inSession(self, self.session, f)

    @defer.inlineCallbacks
    def test_authOnlyAfterTLS(self):
        """
        Before TLS, EHLO offers STARTTLS and no AUTH, AUTH gets 538 5.7.11
        and MAIL gets 530 5.7.0, even from loopback; after STARTTLS, EHLO
        offers AUTH PLAIN LOGIN and no STARTTLS.
        """

        def run():
            client = RawClient(self.port("submission"))
            client.readReply()
            before = client.command(b"EHLO client.test")[1]
            auth = client.command(b"AUTH PLAIN " + plain("alice@localhost"))
            mail = client.command(b"MAIL FROM:<alice@localhost>")
            client.command(b"STARTTLS")
            client.startTLS(clientContext(self.service))
            after = client.command(b"EHLO client.test")[1]
            client.close()
            return before, auth, mail, after

        before, auth, mail, after = yield self.inThread(run)
        self.assertIn(b"STARTTLS", before)
        self.assertFalse([line for line in before if line.startswith(b"AUTH")])
        self.assertEqual((auth[0], auth[1][0][:6]), (538, b"5.7.11"))
        self.assertEqual((mail[0], mail[1][0][:5]), (530, b"5.7.0"))
        self.assertIn(b"AUTH PLAIN LOGIN", after)
        self.assertNotIn(b"STARTTLS", after)

    @defer.inlineCallbacks
    def test_smtplibSubmission(self):
        """
        smtplib with STARTTLS and login sends mail to local users; it is
        stored with "ESMTPSA" in its Received: header and logged with the
        user.
        """

        def run():
            with smtplib.SMTP("127.0.0.1", self.port("submission")) as client:
                client.starttls(context=clientContext(self.service))
                client.login("alice@localhost", PASSWORD)
                client.sendmail("alice@localhost", ["bob@example.org"], message())

        yield self.inThread(run)
        [path] = self.messages("bob@example.org")
        self.assertRegex(path.read_bytes(), rb"\n\tby mx\.test \(maild\) with ESMTPSA id ")

    @defer.inlineCallbacks
    def test_mechanisms(self):
        """
        AUTH PLAIN with an initial response, PLAIN after a 334, and LOGIN
        with its two prompts all work; "*" aborts.
        """

        def run(mechanism):
            client = self.session()
            try:
                if mechanism == "plain-ir":
                    return [client.command(b"AUTH PLAIN " + plain("alice@localhost"))]
                if mechanism == "plain":
                    return [client.command(b"AUTH PLAIN"), client.command(plain("alice@localhost"))]
                if mechanism == "login":
                    return [
                        client.command(b"AUTH LOGIN"),
                        client.command(base64.b64encode(b"alice@localhost")),
                        client.command(base64.b64encode(PASSWORD.encode())),
                    ]
                return [client.command(b"AUTH LOGIN"), client.command(b"*"), client.command(b"NOOP")]
            finally:
                client.close()

        self.assertEqual([c for c, _ in (yield self.inThread(run, "plain-ir"))], [235])
        replies = yield self.inThread(run, "plain")
        self.assertEqual([c for c, _ in replies], [334, 235])
        replies = yield self.inThread(run, "login")
        self.assertEqual([c for c, _ in replies], [334, 334, 235])
        self.assertEqual([base64.b64decode(r[1][0]) for r in replies[:2]], [b"Username:", b"Password:"])
        replies = yield self.inThread(run, "abort")
        self.assertEqual([c for c, _ in replies], [334, 501, 250])

    @defer.inlineCallbacks
    def test_loginInitialResponse(self):
        """
        AUTH LOGIN with an initial response (RFC 4954 section 4) takes it as
        the user name and asks only for the password; a wrong password gets
        535 5.7.8 and the session goes on; smtplib's login, which sends
        LOGIN this way, works.
        """

        def run(client):
            user = base64.b64encode(b"alice@localhost")
            first = client.command(b"AUTH LOGIN " + user)
            wrong = client.command(base64.b64encode(b"wrong"))
            noop = client.command(b"NOOP")
            again = client.command(b"AUTH LOGIN " + user)
            right = client.command(base64.b64encode(PASSWORD.encode()))
            return first, wrong, noop, again, right

        first, wrong, noop, again, right = yield self.inSession(run)
        self.assertEqual((first[0], base64.b64decode(first[1][0])), (334, b"Password:"))
        self.assertEqual((wrong[0], wrong[1][0][:5]), (535, b"5.7.8"))
        self.assertEqual(noop[0], 250)
        self.assertEqual((again[0], right[0]), (334, 235))

        def smtplibLogin():
            with smtplib.SMTP("127.0.0.1", self.port("submission")) as client:
                client.starttls(context=clientContext(self.service))
                client.ehlo()
                client.esmtp_features["auth"] = "LOGIN"
                return client.login("alice@localhost", PASSWORD)[0]

        self.assertEqual((yield self.inThread(smtplibLogin)), 235)

    @defer.inlineCallbacks
    def test_senderMustBeTheUser(self):
        """
        The envelope sender and the From: header must be the user's own
        address or one of their aliases (553 5.7.1); nothing refused is
        stored or queued.  (Other domains go to the outbound queue:
        tests/test_relay.py.)
        """

        def run(client):
            client.command(b"AUTH PLAIN " + plain("alice@localhost"))
            replies = [
                client.command(b"MAIL FROM:<bob@example.org>"),
                client.command(b"MAIL FROM:<>"),
                client.command(b"MAIL FROM:<sales@localhost>"),
                client.command(b"RCPT TO:<someone@elsewhere.test>"),
                client.command(b"RCPT TO:<bob@example.org>"),
                client.command(b"DATA"),
            ]
            client.send(message(sender="bob@example.org") + b".\r\n")
            replies.append(client.readReply())
            for line in (b"MAIL FROM:<alice@localhost>", b"RCPT TO:<bob@example.org>", b"DATA"):
                client.command(line)
            client.send(message(sender="sales@localhost", subject="From the alias") + b".\r\n")
            replies.append(client.readReply())
            return replies

        replies = yield self.inSession(run)
        self.assertEqual(
            [(code, lines[0][:5]) for code, lines in replies],
            [
                (553, b"5.7.1"),
                (553, b"5.7.1"),
                (250, b"2.1.0"),
                (250, b"2.1.5"),
                (250, b"2.1.5"),
                (354, b"End d"),
                (553, b"5.7.1"),
                (250, b"2.0.0"),
            ],
        )
        [path] = self.messages("bob@example.org")
        self.assertIn(b"Subject: From the alias", path.read_bytes())
        self.assertEqual(list((self.dataDir / "queue").glob("*.msg")), [])

    @defer.inlineCallbacks
    def test_deeplyNestedHeader(self):
        """
        A Sender: header of 1,000 "(" (and a From: of 1,000 ":") is refused
        or accepted like any other, without dropping the session.
        """

        def run(client):
            client.command(b"AUTH PLAIN " + plain("alice@localhost"))
            replies = []
            for header in (b"Sender: " + b"(" * 1000, b"From: " + b":" * 1000):
                for line in (b"MAIL FROM:<alice@localhost>", b"RCPT TO:<bob@example.org>", b"DATA"):
                    client.command(line)
                client.send(header + b"\r\nFrom: alice@localhost\r\n\r\nHi.\r\n.\r\n")
                replies.append(client.readReply())
            replies.append(client.command(b"NOOP"))
            return replies

        replies = yield self.inSession(run)
        self.assertEqual([code for code, _ in replies], [250, 250, 250])

    @defer.inlineCallbacks
    def test_eightBitFromHeader(self):
        """
        A From: header address with 8-bit bytes is refused with an ASCII
        553 5.7.1 (found by fuzzing: the reply and its log line raised
        UnicodeDecodeError and dropped the session).
        """

        def run(client):
            client.command(b"AUTH PLAIN " + plain("alice@localhost"))
            for line in (b"MAIL FROM:<alice@localhost>", b"RCPT TO:<bob@example.org>", b"DATA"):
                client.command(line)
            client.send(b"From: \xef\xbf\xbd\xff@localhost\r\n\r\nHi.\r\n.\r\n")
            return client.readReply(), client.command(b"NOOP")

        refused, after = yield self.inSession(run)
        self.assertEqual((refused[0], refused[1][0][:5]), (553, b"5.7.1"))
        self.assertTrue(refused[1][0].isascii())
        self.assertEqual(after[0], 250)

    @defer.inlineCallbacks
    def test_startTLSInjection(self):
        """
        A command sent in the same packet as STARTTLS is never run inside
        TLS (CVE-2011-0411): the first reply in TLS is to our own EHLO.
        """

        def run():
            client = RawClient(self.port("submission"))
            client.readReply()
            client.command(b"EHLO client.test")
            client.send(b"STARTTLS\r\nRSET\r\n")
            ready = client.readReply()
            client.startTLS(clientContext(self.service))
            client.send(b"NOOP\r\n")
            first = client.readReply()
            client.close()
            return ready, first

        ready, first = yield self.inThread(run)
        self.assertEqual(ready[0], 220)
        self.assertEqual(first, (250, [b"2.0.0 Ok"]))

    @defer.inlineCallbacks
    def test_smtps(self):
        """
        SMTPS speaks TLS from the first byte and offers AUTH at once.
        """

        def run():
            with smtplib.SMTP_SSL("127.0.0.1", self.port("smtps"), context=clientContext(self.service)) as client:
                code, ehlo = client.ehlo()
                client.login("alice", PASSWORD)
                client.sendmail("alice@localhost", ["bob@example.org"], message())
                return ehlo

        ehlo = yield self.inThread(run)
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo)
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertEqual(len(self.messages("bob@example.org")), 1)

    @defer.inlineCallbacks
    def test_certificateReload(self):
        """
        After reload, new connections get the new certificate; a broken new
        file keeps the old one in use.
        """
        tls = self.service.tls

        def served():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client = RawClient(self.port("smtps"))
            client.startTLS(context)
            der = client.sock.getpeercert(binary_form=True)
            client.close()
            return der

        before = yield self.inThread(served)
        self.service.localCA.renew()
        self.assertTrue(tls.reload())
        after = yield self.inThread(served)
        self.assertNotEqual(before, after)
        good = fingerprint(tls.certPath)
        tls.certPath.write_text("not a certificate")
        self.assertFalse(tls.reload())
        still = yield self.inThread(served)
        self.assertEqual(still, after)
        self.assertTrue(good)


class LoginDelayTests(ServerTestCase):
    """
    Failed logins on submission, with the throttle's delays at their
    defaults on a clock the tests advance.
    """

    listeners = ("submission",)
    useClock = True
    limits = {"auth_failure_delay": 2.0, "auth_failure_delay_max": 15.0, "auth_failures_per_connection": 3}
    session = SubmissionTests.session

    @defer.inlineCallbacks
    def test_badPasswordDelayed(self):
        """
        A wrong password gets 535 5.7.8 only after the throttling delay
        (2 s, doubling); a different authorization identity is refused
        with 535 too; after the per-connection limit the session is closed
        with 421.
        """
        client = yield self.inThread(self.session)
        self.addCleanup(client.close)
        first = yield self.delayedReply(lambda: client.command(b"AUTH PLAIN " + plain("alice@localhost", "wrong")))
        secondReply = yield self.inThread(
            client.command, b"AUTH PLAIN " + plain("alice@localhost", authzid="bob@example.org")
        )
        third = yield self.delayedReply(lambda: client.command(b"AUTH PLAIN " + plain("nobody@localhost")))
        rest, closed = yield self.inThread(client.rest)
        (firstReply, firstDelay), (thirdReply, _) = first, third
        self.assertEqual(((firstReply[0], firstReply[1][0][:5]), firstDelay), ((535, b"5.7.8"), 2.0))
        self.assertEqual(secondReply[0], 535)
        self.assertEqual((thirdReply[0], thirdReply[1][0][:5]), (535, b"5.7.8"))
        self.assertTrue(closed)
        self.assertTrue(rest.startswith(b"421 4.7.0 "), rest)
