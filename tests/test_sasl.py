"""
The one SASL decoder (maild.auth.PasswordExchange) that SMTP, POP3 and IMAP
use for PLAIN and LOGIN.
"""

from __future__ import annotations

from base64 import b64encode

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from maild.auth import Cancelled, NotBase64, OtherIdentity, PasswordExchange, SASLError


class PasswordExchangeTests(unittest.SynchronousTestCase):
    def test_plain(self):
        """
        PLAIN: an empty challenge, then the response; or the initial response
        at once.
        """
        exchange = PasswordExchange(b"PLAIN")
        self.assertEqual(exchange.start(None), b"")
        self.assertIsNone(exchange.respond(b64encode(b"\0alice\0pw")))
        self.assertEqual((exchange.credentials.username, exchange.credentials.password), (b"alice", b"pw"))
        exchange = PasswordExchange(b"PLAIN")
        self.assertIsNone(exchange.start(b64encode(b"alice\0alice\0pw")))
        self.assertEqual(exchange.credentials.username, b"alice")

    def test_login(self):
        """
        LOGIN: two prompts; an initial response is the user name (RFC 4954
        section 4), so only the password is asked for.
        """
        exchange = PasswordExchange(b"LOGIN")
        self.assertEqual(exchange.start(None), b"Username:")
        self.assertEqual(exchange.respond(b64encode(b"alice")), b"Password:")
        self.assertIsNone(exchange.respond(b64encode(b"pw")))
        self.assertEqual((exchange.credentials.username, exchange.credentials.password), (b"alice", b"pw"))
        exchange = PasswordExchange(b"LOGIN")
        self.assertEqual(exchange.start(b64encode(b"alice")), b"Password:")
        self.assertIsNone(exchange.respond(b""))
        self.assertEqual((exchange.credentials.username, exchange.credentials.password), (b"alice", b""))

    def test_emptyInitialResponse(self):
        """
        "=" as the initial response is an empty response.
        """
        exchange = PasswordExchange(b"LOGIN")
        self.assertEqual(exchange.start(b"="), b"Password:")
        self.assertRaises(SASLError, PasswordExchange(b"PLAIN").start, b"=")

    def test_errors(self):
        """
        Cancellation, bad base64 and another identity are told apart.
        """
        self.assertRaises(Cancelled, PasswordExchange(b"LOGIN").respond, b"*")
        self.assertRaises(NotBase64, PasswordExchange(b"LOGIN").respond, b"a!b")
        self.assertRaises(OtherIdentity, PasswordExchange(b"PLAIN").respond, b64encode(b"bob\0alice\0pw"))


class PasswordExchangePropertyTests(unittest.SynchronousTestCase):
    @given(
        st.sampled_from([b"PLAIN", b"LOGIN"]),
        st.one_of(st.none(), st.binary(max_size=40), st.binary(max_size=30).map(b64encode)),
        st.lists(st.one_of(st.binary(max_size=40), st.binary(max_size=30).map(b64encode)), max_size=3),
    )
    @settings(max_examples=500, deadline=None)
    def test_anyResponses(self, mechanism, initial, responses):
        """
        Whatever the client sends, each step gives a challenge, or
        credentials, or a SASLError: never another exception.
        """
        exchange = PasswordExchange(mechanism)
        try:
            challenge = exchange.start(initial)
            for response in responses:
                if challenge is None:
                    break
                challenge = exchange.respond(response)
        except SASLError:
            return
        if challenge is None:
            self.assertIsInstance(exchange.credentials.username, bytes)
            self.assertIsInstance(exchange.credentials.password, bytes)
        else:
            self.assertIn(challenge, (b"", b"Username:", b"Password:"))
