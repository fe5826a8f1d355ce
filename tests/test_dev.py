"""
The developer's catch-all mode: mail for any address of any domain, any
login, one shared mailbox read over IMAP, POP3 and the JSON API; loopback
only unless made public.
"""

from __future__ import annotations

import email
import imaplib
import json
import poplib
import smtplib

from twisted.internet import defer
from twisted.trial import unittest

from maild.config import ConfigError, configFromOptions
from tests.support import RawClient, ServerTestCase
from tests.test_web import fetch

MULTIPART = (
    b"From: App <noreply@shop.example>\r\nTo: customer@gmail.com\r\n"
    b"Subject: Your order\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b'--b1\r\nContent-Type: multipart/alternative; boundary="b2"\r\n\r\n'
    b"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThanks for your order.\r\n"
    b"--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Thanks for your order.</p>\r\n"
    b"--b2--\r\n"
    b'--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="invoice.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
)


class DevModeTests(ServerTestCase):
    listeners = ("smtp", "submission", "imap", "pop3", "http")
    users = {}
    configValues = {"dev": {"enabled": True}}

    def api(self, path: str, method: str = "GET"):
        def call():
            status, headers, body = fetch(self.port("http"), path, method=method)
            return status, (json.loads(body) if "json" in headers.get("Content-Type", "") else body)

        return self.inThread(call)

    def sendTwo(self):
        with smtplib.SMTP("127.0.0.1", self.port("smtp")) as s:
            s.sendmail("noreply@shop.example", ["customer@gmail.com"], MULTIPART)
            s.sendmail(
                "alerts@monitor.example", ["ops@other.test"],
                b"From: alerts@monitor.example\r\nTo: ops@other.test\r\nSubject: Disk full\r\n\r\nsda1\r\n",
            )

    @defer.inlineCallbacks
    def test_everythingInOneMailbox(self):
        """
        Mail for two unrelated domains is accepted on the MX port and read
        by any login over IMAP and POP3, and listed by the JSON API, newest
        first.
        """
        yield self.inThread(self.sendTwo)

        def readIMAP():
            imap = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            imap.login("whoever", "anything")
            imap.select("INBOX")
            _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            imap.logout()
            return sorted(part[1].strip() for part in data if isinstance(part, tuple))

        subjects = yield self.inThread(readIMAP)
        self.assertEqual(subjects, [b"Subject: Disk full", b"Subject: Your order"])

        def readPOP3():
            pop = poplib.POP3("127.0.0.1", self.port("pop3"))
            pop.user("someone@else.test")
            pop.pass_("x")
            count, _ = pop.stat()
            pop.quit()
            return count

        count = yield self.inThread(readPOP3)
        self.assertEqual(count, 2)

        status, listed = yield self.api("/api/messages")
        self.assertEqual(status, 200)
        self.assertEqual([m["subject"] for m in listed], ["Disk full", "Your order"])
        self.assertEqual(listed[1]["to"], ["customer@gmail.com"])
        self.assertEqual(listed[1]["from"], ["noreply@shop.example"])

    @defer.inlineCallbacks
    def test_apiFiltersDetailsRawDelete(self):
        """
        The API filters by to, from and subject; gives a message's text and
        HTML parts and lists its attachments; serves it raw; deletes one or
        all, and IMAP sees them gone.
        """
        yield self.inThread(self.sendTwo)
        _, found = yield self.api("/api/messages?to=GMAIL.com")
        self.assertEqual([m["subject"] for m in found], ["Your order"])
        _, found = yield self.api("/api/messages?from=monitor&subject=disk")
        self.assertEqual([m["subject"] for m in found], ["Disk full"])
        _, found = yield self.api("/api/messages?subject=nothing-like-this")
        self.assertEqual(found, [])

        _, listed = yield self.api("/api/messages")
        order = listed[1]["id"]
        status, details = yield self.api(f"/api/messages/{order}")
        self.assertEqual(status, 200)
        self.assertEqual(details["text"].strip(), "Thanks for your order.")
        self.assertEqual(details["html"].strip(), "<p>Thanks for your order.</p>")
        self.assertEqual(
            details["attachments"],
            [{"filename": "invoice.pdf", "content_type": "application/pdf", "size": 9}],
        )
        self.assertIn(["Subject", "Your order"], details["headers"])
        status, raw = yield self.api(f"/api/messages/{order}/raw")
        self.assertEqual(status, 200)
        self.assertEqual(email.message_from_bytes(raw)["Subject"], "Your order")
        status, _ = yield self.api("/api/messages/999999")
        self.assertEqual(status, 404)

        status, result = yield self.api(f"/api/messages/{order}", method="DELETE")
        self.assertEqual((status, result), (200, {"deleted": 1}))
        status, result = yield self.api("/api/messages", method="DELETE")
        self.assertEqual((status, result), (200, {"deleted": 1}))
        _, listed = yield self.api("/api/messages")
        self.assertEqual(listed, [])

        def countIMAP():
            imap = imaplib.IMAP4("127.0.0.1", self.port("imap"))
            imap.login("a", "b")
            _, data = imap.select("INBOX")
            imap.logout()
            return int(data[0])

        count = yield self.inThread(countIMAP)
        self.assertEqual(count, 0)

    @defer.inlineCallbacks
    def test_submissionAnyLoginNeverRelays(self):
        """
        Submission takes any login (on loopback, even before TLS) and any
        sender, and files mail for a remote domain in the shared mailbox
        instead of relaying it.
        """

        def send():
            with smtplib.SMTP("127.0.0.1", self.port("submission")) as s:
                s.login("app", "secret")
                s.sendmail("someone@anywhere.example", ["friend@gmail.com"], b"Subject: hi\r\n\r\nx\r\n")

        yield self.inThread(send)
        _, listed = yield self.api("/api/messages")
        self.assertEqual([m["subject"] for m in listed], ["hi"])
        self.assertFalse((self.dataDir / "queue").exists() and any((self.dataDir / "queue").iterdir()))


class DevModeOffTests(ServerTestCase):
    listeners = ("smtp", "http")

    @defer.inlineCallbacks
    def test_noAPIWithoutDevMode(self):
        """
        Without the developer mode there is no API and other domains are
        refused as ever.
        """
        status, _, _ = yield self.inThread(fetch, self.port("http"), "/api/messages")
        self.assertEqual(status, 404)

        def send():
            client = RawClient(self.port("smtp"))
            client.readReply()
            client.command(b"HELO x")
            client.command(b"MAIL FROM:<a@b.example>")
            reply = client.command(b"RCPT TO:<someone@gmail.com>")
            client.close()
            return reply

        code, _ = yield self.inThread(send)
        self.assertEqual(code, 554)


class HelloTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_helloIsHelo(self):
        """
        C{HELLO} (sent by some teaching clients) is taken as C{HELO}; mail
        then flows as usual.
        """

        def talk():
            client = RawClient(self.port("smtp"))
            client.readReply()
            replies = [
                client.command(b"HELLO client.test")[0],
                client.command(b"MAIL FROM:<carol@remote.test>")[0],
                client.command(b"RCPT TO:<alice@localhost>")[0],
                client.command(b"DATA")[0],
                client.command(b"Subject: hello\r\n\r\nx\r\n.")[0],
                client.command(b"QUIT")[0],
            ]
            client.close()
            return replies

        replies = yield self.inThread(talk)
        self.assertEqual(replies, [250, 250, 250, 354, 250, 221])
        self.assertEqual(len(self.messages("alice@localhost")), 1)


class DevModeConfigTests(unittest.SynchronousTestCase):
    def test_loopbackByDefault(self):
        """
        In the developer mode the default listeners bind to 127.0.0.1 only.
        """
        config = configFromOptions({"dev": True})
        for name, ep in config.enabledListeners().items():
            self.assertTrue(ep.endswith(":interface=127.0.0.1"), (name, ep))

    def test_publicListenerRefused(self):
        """
        A listener on every interface is refused in the developer mode,
        unless C{--dev-public} is given.
        """
        with self.assertRaises(ConfigError) as caught:
            configFromOptions({"dev": True, "imap": "tcp:1143"})
        self.assertIn("listen.imap", caught.exception.problems[0])
        self.assertIn("--dev-public", caught.exception.problems[0])
        config = configFromOptions({"dev": True, "dev_public": True, "imap": "tcp:1143"})
        self.assertEqual(config.listeners["imap"], "tcp:1143")
        config = configFromOptions({"dev": True, "imap": "tcp6:1143:interface=\\:\\:1"})
        self.assertEqual(config.listeners["imap"], "tcp6:1143:interface=\\:\\:1")
