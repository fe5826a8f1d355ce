"""
Hostile IMAP input (issue 9): every command, however built, gets a tagged
reply or BYE, costs time and memory in proportion to its size, and breaks
nothing for other clients or other messages.
"""

from __future__ import annotations

from twisted.internet import defer

from maild.imap.account import PatternMatcher
from tests.support import IMAPTestCase


class ListPatternTests(IMAPTestCase):
    # Before the fix, the first LIST below ran for hours: a test that hangs
    # fails here.
    timeout = 60

    @defer.inlineCallbacks
    def test_wildcardRunsAreLinear(self):
        """
        `LIST "" "**…**y"` (50 `*`) and `%*%*…` runs are answered at once
        with the right names, and a second session is served meanwhile;
        a pattern longer than MAX_PATTERN gets BAD.
        """

        def run(client):
            for name in (b"Projects/2026/" + b"a" * 66 + b"y", b"Lists"):
                client.command(b"c CREATE " + name)
            stars = client.command(b'a LIST "" "' + b"*" * 50 + b'y"')
            mixed = client.command(b'b LIST "" "' + b"%*" * 40 + b'y"')
            percent = client.command(b'd LIST "" "' + b"%" * 60 + b'y"')
            other = self.connect()
            try:
                served = other.command(b"o NOOP")
            finally:
                other.close()
            long = client.command(b'e LIST "" "' + b"a" * 2000 + b'"')
            return stars, mixed, percent, served, long

        stars, mixed, percent, served, long = yield self.session(run)
        deep = b'* LIST (\\HasNoChildren) "/" "Projects/2026/' + b"a" * 66 + b'y"'
        self.assertEqual(stars, ([deep], b"a OK LIST completed"))
        self.assertEqual(mixed, ([deep], b"b OK LIST completed"))
        self.assertEqual(percent, ([], b"d OK LIST completed"))
        self.assertEqual(served, ([], b"o OK NOOP completed"))
        self.assertEqual(long, ([], b"e BAD Mailbox pattern too long"))

    def test_matcherSemantics(self):
        """
        `*` crosses the delimiter, `%` does not, either may match nothing,
        and only the INBOX prefix matches in any case.
        """
        cases = [
            ("*", "a/b", True),
            ("%", "a/b", False),
            ("%/%", "a/b", True),
            ("a%", "a", True),
            ("a*%b", "a/x/b", True),
            ("a%*b", "a/x/b", True),
            ("a%%b", "a/b", False),
            ("inbox", "INBOX", True),
            ("INBOX/%", "inbox/Sub", True),
            ("Inbox/sub", "INBOX/Sub", False),
            ("Sent", "sent", False),
            ("", "", True),
            ("*x", "", False),
            ("a.b", "a.b", True),
            ("a.b", "axb", False),
        ]
        for pattern, name, expected in cases:
            self.assertEqual(PatternMatcher(pattern).match(name), expected, (pattern, name))
