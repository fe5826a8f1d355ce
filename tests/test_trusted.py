"""
Trusted networks (C{[limits] trusted_networks}): a webmail or the host's
own applications, which speak for many users from one address.  Here
127.0.0.2 is the trusted network and 127.0.0.1 stands for the Internet.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from maild.connections import TrustedNetworks
from tests.support import PASSWORD, IMAPClient, RawClient, ServerTestCase

TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.1"


class TrustedNetworksTests(unittest.SynchronousTestCase):
    def test_membership(self):
        """
        Addresses match the configured networks, IPv4-mapped IPv6 addresses
        as their IPv4 selves; a transport without an IP (a UNIX socket) is
        local, and trusted.
        """
        trusted = TrustedNetworks(["127.0.0.0/8", "::1/128", "192.0.2.0/24"])
        for host in ("127.0.0.1", "127.9.9.9", "::1", "192.0.2.200", "::ffff:192.0.2.1", "UNIXAddress('/run/maild')"):
            self.assertIn(host, trusted)
        for host in ("198.51.100.1", "::2", "2001:db8::1", "10.0.0.1"):
            self.assertNotIn(host, trusted)


class TrustedNetworksPropertyTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(), st.ip_addresses().map(str)))
    def test_anyHostAnswered(self, host):
        """
        Any peer description (an address, a UNIX socket's, garbage) gets
        an answer, never an exception.
        """
        self.assertIn(host in TrustedNetworks(["127.0.0.0/8", "::1/128"]), (True, False))


class TrustedTestCase(ServerTestCase):
    listeners = ("smtp", "submission", "pop3", "imap")
    limits = {
        "connections_per_ip": 1,
        "trusted_networks": (TRUSTED + "/32",),
        "auth_failure_delay": 0.01,
        "auth_failure_delay_max": 100.0,
    }

    def setUp(self):
        d = ServerTestCase.setUp(self)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.delays: list[tuple[str, float]] = []
        throttle = self.service.authenticator.throttle
        failed = throttle.failed

        def recordingFailed(key):
            delay = failed(key)
            self.delays.append((key, delay))
            return delay

        throttle.failed = recordingFailed
        return d

    def logged(self, prefix: str) -> list[str]:
        return [
            e["log_format"].format(**e)
            for e in self.events
            if e.get("log_format", "").startswith(prefix)
        ]


class ConnectionLimitTests(TrustedTestCase):
    @defer.inlineCallbacks
    def test_trustedExempt(self):
        """
        Clients in a trusted network may open more connections than the
        per-address limit, on every protocol; others are still refused
        past it.
        """

        def run():
            opened = []
            greetings = []
            for name in ("smtp", "submission", "pop3", "imap"):
                for _ in range(3):
                    client = RawClient(self.port(name), source=TRUSTED)
                    opened.append(client)
                    greetings.append(client.readLine()[:4])
            first = RawClient(self.port("smtp"), source=UNTRUSTED)
            first.readLine()
            second = RawClient(self.port("smtp"), source=UNTRUSTED)
            refused = second.readLine()
            for client in opened + [first, second]:
                client.close()
            return greetings, refused

        greetings, refused = yield self.inThread(run)
        self.assertEqual(greetings, [b"220 "] * 6 + [b"+OK "] * 3 + [b"* OK"] * 3)
        self.assertEqual(refused[:9], b"421 4.7.0")


class ThrottleTests(TrustedTestCase):
    def failLogins(self, source: str, users: list[str]) -> defer.Deferred:
        """
        One failed POP3 login per user in C{users}, each on its own
        connection from C{source}.
        """

        def run():
            replies = []
            for user in users:
                client = RawClient(self.port("pop3"), source=source)
                client.readLine()
                client.send(b"USER " + user.encode() + b"\r\n")
                client.readLine()
                client.send(b"PASS wrong\r\n")
                replies.append(client.readLine()[:4])
                client.close()
            assert replies == [b"-ERR"] * len(users), replies

        return self.inThread(run)

    @defer.inlineCallbacks
    def test_perUserFromTrusted(self):
        """
        From a trusted network, failed logins are delayed per user name:
        one user's mistakes do not slow another user's login through the
        same webmail.  From elsewhere they are delayed per address.
        """
        yield self.failLogins(TRUSTED, ["alice@localhost", "alice@localhost", "bob@example.org"])
        self.assertEqual(
            self.delays,
            [("user alice@localhost", 0.01), ("user alice@localhost", 0.02), ("user bob@example.org", 0.01)],
        )
        del self.delays[:]
        yield self.failLogins(UNTRUSTED, ["alice@localhost", "alice@localhost", "bob@example.org"])
        self.assertEqual(self.delays, [(UNTRUSTED, 0.01), (UNTRUSTED, 0.02), (UNTRUSTED, 0.04)])


class OriginatingAddressTests(TrustedTestCase):
    def imap(self, source: str, commands: list[bytes]) -> defer.Deferred:
        def run():
            client = IMAPClient(self.port("imap"), source=source)
            client.readLine()
            replies = [client.command(command)[1] for command in commands]
            client.close()
            return replies

        return self.inThread(run)

    @defer.inlineCallbacks
    def test_idFromTrusted(self):
        """
        A webmail in a trusted network that names its user's address in
        ID x-originating-ip (as Roundcube does) has that address logged
        and throttled for the session; it may still log in without TLS
        from loopback.
        """
        replies = yield self.imap(
            TRUSTED,
            [
                b'a ID ("name" "Roundcube" "x-originating-ip" "192.0.2.7")',
                b"b LOGIN alice@localhost wrong",
                b'c LOGIN alice@localhost "' + PASSWORD.encode() + b'"',
            ],
        )
        self.assertEqual([r.split(b" ")[1] for r in replies], [b"OK", b"NO", b"OK"])
        self.assertEqual(self.delays, [("192.0.2.7", 0.01)])
        self.assertIn(
            "login failed: service=imap user=<alice@localhost> method=LOGIN rip=192.0.2.7",
            self.logged("login failed"),
        )
        self.assertIn(
            "login: service=imap user=<alice@localhost> method=LOGIN rip=192.0.2.7",
            self.logged("login:"),
        )

    @defer.inlineCallbacks
    def test_idFromElsewhereIgnored(self):
        """
        From outside the trusted networks (and with a value that is not an
        address) x-originating-ip changes nothing: a client cannot pick the
        address it is throttled by.
        """
        yield self.imap(
            UNTRUSTED,
            [b'a ID ("x-originating-ip" "192.0.2.7")', b"b LOGIN alice@localhost wrong"],
        )
        yield self.imap(
            TRUSTED,
            [b'a ID ("x-originating-ip" "not an address")', b"b LOGIN alice@localhost wrong"],
        )
        self.assertEqual(self.delays, [(UNTRUSTED, 0.01), ("user alice@localhost", 0.01)])

    @defer.inlineCallbacks
    def test_oddIdLists(self):
        """
        ID lists of any shape from a trusted peer (an odd count, a nested
        list, NIL, an address in a literal, an empty value) are answered
        OK and leave the address as it was.
        """
        replies = yield self.imap(
            TRUSTED,
            [
                b'a ID ("x-originating-ip")',
                b'b ID ("x-originating-ip" ("192.0.2.7"))',
                b'c ID ("x-originating-ip" NIL)',
                b'd ID ("x-originating-ip" "")',
                b"e ID NIL",
                b"f LOGIN alice@localhost wrong",
            ],
        )
        self.assertEqual([r.split(b" ")[1] for r in replies], [b"OK"] * 5 + [b"NO"])
        self.assertEqual(self.delays, [("user alice@localhost", 0.01)])
