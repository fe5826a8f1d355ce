"""
TLS across the protocols, with the standard library's clients trusting
the certificate the daemon made: STARTTLS/STLS and implicit TLS on each,
and the TLS versions every implicit-TLS listener accepts.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import ssl

from twisted.internet import defer

from tests.support import PASSWORD, ServerTestCase, clientContext


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
