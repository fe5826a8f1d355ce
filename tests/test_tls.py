"""
TLS across the protocols, with the standard library's clients trusting
the certificate the daemon made: STARTTLS/STLS and implicit TLS on each,
and the TLS versions every implicit-TLS listener accepts.
"""

from __future__ import annotations

import dataclasses
import imaplib
import poplib
import smtplib
import socket
import ssl

from twisted.internet import defer, reactor

from maild.service import MailService
from tests.support import PASSWORD, RawClient, ServerTestCase, clientContext, makeConfig


class TLSTests(ServerTestCase):
    listeners = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps")
    configValues = {"plaintext_auth": "never"}

    @defer.inlineCallbacks
    def test_upgradeThenLogIn(self):
        """
        With passwords refused before TLS (even from loopback), each
        protocol's standard-library client upgrades with STARTTLS or STLS,
        verifying the certificate, and then logs in.
        """
        context = clientContext(self.service)

        def run():
            with smtplib.SMTP("127.0.0.1", self.port("submission")) as smtp:
                smtp.starttls(context=context)
                smtp.login("alice@localhost", PASSWORD)
            pop = poplib.POP3("127.0.0.1", self.port("pop3"))
            try:
                pop.user("alice@localhost")
                refused = False
            except poplib.error_proto:
                refused = True
            pop.stls(context)
            pop.user("alice@localhost")
            pop.pass_(PASSWORD)
            pop.quit()
            imap = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            disabled = "LOGINDISABLED" in imap.capabilities
            imap.starttls(context)
            imap.login("alice@localhost", PASSWORD)
            imap.logout()
            return refused, disabled

        refused, disabled = yield self.inThread(run)
        self.assertTrue(refused)
        self.assertTrue(disabled)

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        """
        SMTPS, POP3S and IMAPS speak TLS from the first byte and take
        passwords at once.
        """
        context = clientContext(self.service)

        def run():
            with smtplib.SMTP_SSL("127.0.0.1", self.port("smtps"), context=context) as smtp:
                smtp.login("alice@localhost", PASSWORD)
            pop = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), context=context)
            pop.user("alice@localhost")
            pop.pass_(PASSWORD)
            count = pop.stat()[0]
            pop.quit()
            imap = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"), ssl_context=context)
            imap.login("alice@localhost", PASSWORD)
            status = imap.select("INBOX")[0]
            imap.logout()
            return count, status

        self.assertEqual((yield self.inThread(run)), (0, "OK"))

    @defer.inlineCallbacks
    def test_versions(self):
        """
        Every implicit-TLS listener refuses TLS 1.0 and 1.1 and accepts 1.2
        and 1.3.
        """

        def handshake(port: int, version: ssl.TLSVersion) -> bool:
            context = clientContext(self.service)
            # Let the client offer the old versions at all: the refusal
            # must come from the server.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = context.maximum_version = version
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname="mx.test"):
                        return True
            except (ssl.SSLError, OSError):
                return False

        versions = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
        for name in ("smtps", "pop3s", "imaps"):
            accepted = []
            for version in versions:
                accepted.append((yield self.inThread(handshake, self.port(name), version)))
            self.assertEqual(accepted, [False, False, True, True], name)


class LastReplyTests(ServerTestCase):
    """
    The last reply before the server closes reaches the client on every
    listener, plain and TLS (issue 8, item 1).
    """

    listeners = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps")

    def tlsClient(self, name: str) -> RawClient:
        client = RawClient(self.port(name))
        client.startTLS(clientContext(self.service))
        return client

    @defer.inlineCallbacks
    def test_smtpQuit(self):
        """
        smtplib's quit() gets its 221 over SMTPS and after STARTTLS on the MX
        and submission ports, and on plain connections.
        """
        context = clientContext(self.service)

        def run():
            replies = []
            smtp = smtplib.SMTP_SSL("127.0.0.1", self.port("smtps"), context=context)
            smtp.ehlo()
            replies.append(smtp.quit()[0])
            for name in ("smtp", "submission"):
                smtp = smtplib.SMTP("127.0.0.1", self.port(name))
                smtp.starttls(context=context)
                smtp.ehlo()
                replies.append(smtp.quit()[0])
                smtp = smtplib.SMTP("127.0.0.1", self.port(name))
                replies.append(smtp.quit()[0])
            return replies

        self.assertEqual((yield self.inThread(run)), [221] * 5)

    @defer.inlineCallbacks
    def test_smtpTooManyErrors(self):
        """
        The 421 that ends a session of bad commands reaches the client over
        TLS before the close.
        """

        def run(client):
            client.readReply()
            for _ in range(19):
                client.command(b"BOGUS")
            client.send(b"BOGUS\r\n")
            return client.readReply(), client.readReply(), client.closed()

        first, last, closed = yield self.inSession(lambda: self.tlsClient("smtps"), run)
        self.assertEqual(first[0], 500)
        self.assertEqual(last[0], 421)
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_pop3Quit(self):
        """
        POP3's +OK to QUIT arrives over POP3S and after STLS.
        """
        context = clientContext(self.service)

        def run():
            pop = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), context=context)
            first = pop.quit()
            pop = poplib.POP3("127.0.0.1", self.port("pop3"))
            pop.stls(context)
            pop.user("alice@localhost")
            pop.pass_(PASSWORD)
            return first, pop.quit()

        first, second = yield self.inThread(run)
        self.assertTrue(first.startswith(b"+OK"))
        self.assertTrue(second.startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_imapLogout(self):
        """
        IMAP's BYE and the tagged OK to LOGOUT both arrive over IMAPS.
        """

        def run(client):
            client.readLine()
            client.send(b"a LOGOUT\r\n")
            return client.readLine(), client.readLine(), client.closed()

        bye, ok, closed = yield self.inSession(lambda: self.tlsClient("imaps"), run)
        self.assertTrue(bye.startswith(b"* BYE"))
        self.assertTrue(ok.startswith(b"a OK"))
        self.assertTrue(closed)


class LastReplyLimitsTests(ServerTestCase):
    """
    The refusals and goodbyes that end a session reach the client over TLS.
    """

    listeners = ("smtps", "pop3s", "imaps")
    # Loopback is trusted (exempt from the connection limit) by default;
    # here these clients stand for remote ones.
    limits = {"connections_per_ip": 1, "trusted_networks": ()}

    def tlsClient(self, name: str) -> RawClient:
        client = RawClient(self.port(name))
        client.startTLS(clientContext(self.service))
        return client

    @defer.inlineCallbacks
    def test_connectionLimitRefusal(self):
        """
        Past the per-address limit, each implicit-TLS listener's refusal
        arrives through TLS before the close.
        """

        def run():
            lines = []
            for name in ("smtps", "pop3s", "imaps"):
                first = self.tlsClient(name)
                first.readLine()
                second = self.tlsClient(name)
                lines.append(second.readLine())
                second.close()
                first.close()
            return lines

        smtp, pop, imap = yield self.inThread(run)
        self.assertTrue(smtp.startswith(b"421 4.7.0 "), smtp)
        self.assertTrue(pop.startswith(b"-ERR [SYS/TEMP]"), pop)
        self.assertTrue(imap.startswith(b"* BYE"), imap)

    @defer.inlineCallbacks
    def test_shutdownGoodbye(self):
        """
        When the daemon stops, an SMTPS session is told 421 4.3.2 through
        TLS before the close.
        """
        client = yield self.inThread(self.tlsClient, "smtps")
        greeting = yield self.inThread(client.readLine)
        self.assertTrue(greeting.startswith(b"220 "))
        stopping = self.stopServer()
        goodbye = yield self.inThread(client.readLine)
        # (The server waits for the client's side of the TLS close.)
        closed = yield self.inThread(client.closed)
        client.close()
        yield stopping
        self.assertTrue(closed)
        self.assertTrue(goodbye.startswith(b"421 4.3.2 "), goodbye)


class HAProxyTLSTests(ServerTestCase):
    """
    Implicit TLS behind HAProxy's PROXY protocol (`haproxy:tcp:...`).
    """

    listeners = ()

    @defer.inlineCallbacks
    def setUp(self):
        yield ServerTestCase.setUp(self)
        yield self.stopServer()
        self.config = makeConfig(self.dataDir, ())
        self.config = dataclasses.replace(
            self.config,
            listeners={"smtps": "haproxy:tcp:0:interface=127.0.0.1", "pop3s": "haproxy:tcp:0:interface=127.0.0.1"},
        )
        self.service = MailService(self.config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        yield defer.gatherResults([lst.ready for lst in self.service.listeners.values()])

    @defer.inlineCallbacks
    def test_greetsInTLS(self):
        """
        After the PROXY header, SMTPS and POP3S speak TLS.
        """

        def greet(name):
            client = RawClient(self.port(name))
            client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 465\r\n")
            client.startTLS(clientContext(self.service))
            line = client.readLine()
            client.close()
            return line

        self.assertTrue((yield self.inThread(greet, "smtps")).startswith(b"220 "))
        self.assertTrue((yield self.inThread(greet, "pop3s")).startswith(b"+OK"))
