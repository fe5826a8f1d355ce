"""
The FETCH renderings workers share (L{maild.imap.sharedcache}): what one
writes the others read, and anything they cannot trust is a miss, never
another message's rendering.
"""

from __future__ import annotations

import mmap
import os

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from maild.imap.sharedcache import SharedRenderings, makeShared


class SharedRenderingsTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.fd = makeShared(3, slots=16, ring=4096)
        self.addCleanup(os.close, self.fd)
        self.first = SharedRenderings(self.fd, 0)
        self.second = SharedRenderings(self.fd, 1)

    def test_othersRead(self):
        """
        What one worker stores, the others find under the same key; a
        worker does not look in its own segment (it keeps its own
        renderings itself), and an unknown key is a miss.
        """
        self.first.put(b"INBOX\0 1\0 7\0ENVELOPE", b"(NIL)")
        third = SharedRenderings(self.fd, 2)
        self.assertEqual(self.second.get(b"INBOX\0 1\0 7\0ENVELOPE"), b"(NIL)")
        self.assertEqual(third.get(b"INBOX\0 1\0 7\0ENVELOPE"), b"(NIL)")
        self.assertIsNone(self.first.get(b"INBOX\0 1\0 7\0ENVELOPE"))
        self.assertIsNone(self.second.get(b"INBOX\0 1\0 8\0ENVELOPE"))

    def test_slotTakenByAnotherKey(self):
        """
        Two keys of one slot: the later one is found, the earlier one is a
        miss rather than the later one's value.
        """
        keys = [b"key %d" % i for i in range(200)]
        for key in keys:
            self.first.put(key, key.upper())
        found = {key: self.second.get(key) for key in keys}
        self.assertEqual({k: v for k, v in found.items() if v is not None and v != k.upper()}, {})
        self.assertGreater(sum(v is None for v in found.values()), 0)

    def test_overwrittenRingIsAMiss(self):
        """
        Once the ring came round over an entry, its key is a miss, even
        though its slot still points there.
        """
        self.first.put(b"old", b"o" * 100)
        for i in range(60):
            self.first.put(b"filler %d" % (i % 3), b"f" * 100)
        self.assertIsNone(self.second.get(b"old"))
        self.assertEqual(self.second.get(b"filler 2"), b"f" * 100)

    def test_damagedEntryIsAMiss(self):
        """
        An entry whose value does not match its checksum (a copy torn by a
        write, a stray byte) is a miss.
        """
        self.first.put(b"key", b"value")
        view = mmap.mmap(self.fd, 0)
        self.addCleanup(view.close)
        at = view.find(b"value")
        view[at : at + 1] = b"V"
        self.assertIsNone(self.second.get(b"key"))

    def test_tooBigNotStored(self):
        """
        A value bigger than an eighth of the ring is not stored.
        """
        self.first.put(b"big", b"b" * 600)
        self.assertIsNone(self.second.get(b"big"))

    def test_restartedWriterGoesOn(self):
        """
        A worker started again in the place of one that died writes on from
        where it was: what its predecessor stored stays readable until the
        ring comes round.
        """
        self.first.put(b"before", b"1")
        again = SharedRenderings(self.fd, 0)
        again.put(b"after", b"2")
        self.assertEqual(self.second.get(b"before"), b"1")
        self.assertEqual(self.second.get(b"after"), b"2")

    def test_notARenderingsFile(self):
        """
        A descriptor of anything else, or a worker number without a
        segment, is refused.
        """
        self.assertRaises(ValueError, SharedRenderings, self.fd, 3)
        other = os.memfd_create("other")
        self.addCleanup(os.close, other)
        os.ftruncate(other, 1 << 16)
        self.assertRaises(ValueError, SharedRenderings, other, 0)

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 40), st.binary(max_size=300)), max_size=80))
    def test_neverAnotherKeysValue(self, puts):
        """
        Whatever was stored, a read gives the latest value stored under that
        key, or nothing.
        """
        fd = makeShared(2, slots=8, ring=2048)
        try:
            writer, reader = SharedRenderings(fd, 0), SharedRenderings(fd, 1)
            latest = {}
            for number, value in puts:
                key = b"k%d" % number
                writer.put(key, value)
                if len(value) + len(key) + 8 <= 2048 // 8:
                    latest[key] = value
                for k in latest:
                    got = reader.get(k)
                    self.assertIn(got, (None, latest[k]))
        finally:
            os.close(fd)


class WorkerViewTests(unittest.SynchronousTestCase):
    def test_unusableFileLogged(self):
        """
        A worker handed a descriptor it cannot use logs why and renders for
        itself: FETCH still works.
        """
        from maild.imap import cache
        from maild.imap.sharedcache import RENDERINGS_FD_ENV

        other = os.memfd_create("other")
        self.addCleanup(os.close, other)
        os.ftruncate(other, 4096)
        self.patch(os, "environ", {RENDERINGS_FD_ENV: f"{other}:0"})
        self.patch(cache, "_shared", [])
        self.assertIsNone(cache._sharedRenderings())
        [error] = self.flushLoggedErrors(ValueError)
        self.assertIn("not a renderings file", str(error.value))
