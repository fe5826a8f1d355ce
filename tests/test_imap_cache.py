"""
The per-folder cache of what FETCH derives from message octets
(L{maild.imap.cache}), and FETCH through it over a socket.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from maild.imap.cache import FolderCache, folderCache
from tests.support import IMAPTestCase, sampleMessage


class FakeFolder:
    uidvalidity = 7


class FolderCacheTests(unittest.SynchronousTestCase):
    def test_madeOnce(self):
        """
        A rendering is made the first time it is asked for, then reused.
        """
        cache = FolderCache(1)
        made = []
        for _ in range(3):
            value = cache.get(5, b"ENVELOPE", lambda: made.append(1) or b"(NIL)")
        self.assertEqual((value, made), (b"(NIL)", [1]))

    def test_leastRecentlyUsedForgotten(self):
        """
        Beyond its limit, the message used least recently is forgotten.
        """
        cache = FolderCache(1, limit=2)
        cache.get(1, b"X", lambda: b"1")
        cache.get(2, b"X", lambda: b"2")
        cache.get(1, b"X", lambda: b"again")
        cache.get(3, b"X", lambda: b"3")
        self.assertEqual(cache.get(1, b"X", lambda: b"new"), b"1")
        self.assertEqual(cache.get(2, b"X", lambda: b"new"), b"new")

    def test_newUidValidity(self):
        """
        A folder made anew (another UIDVALIDITY) starts an empty cache.
        """
        folder = FakeFolder()
        folderCache(folder).get(1, b"X", lambda: b"old")
        folder.uidvalidity = 8
        self.assertEqual(folderCache(folder).get(1, b"X", lambda: b"new"), b"new")


class SharedFetchTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_sessionsAgree(self):
        """
        Two sessions fetching ENVELOPE, BODYSTRUCTURE and header fields get
        the same octets, the second from what the first rendered.
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"))
        command = b"f FETCH 1:2 (ENVELOPE BODYSTRUCTURE BODY BODY.PEEK[HEADER.FIELDS (Subject)] RFC822.HEADER)"
        first = yield self.session(lambda c: c.command(command), select=b"INBOX")
        second = yield self.session(lambda c: c.command(command), select=b"INBOX")
        self.assertEqual(first, second)
        self.assertIn(b'"two"', first[0][1])
        self.assertIn(b"BODY[HEADER.FIELDS (Subject)] {16}\r\nSubject: two\r\n\r\n", first[0][1])
