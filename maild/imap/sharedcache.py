"""
FETCH renderings shared by the workers of one machine.

Each worker keeps what it rendered of a message (L{maild.imap.cache}); with
several workers on one busy folder, each rendered every message again for
itself: two workers under imaptest on one INBOX spent 0.04 ms more CPU per
command on it than one process (27,400 renderings against 12,000, about
0.1 ms each).  Here each worker also writes its renderings into its own
segment of one shared memory file, which the parent makes (C{memfd}) and
hands to every worker, and looks in the others' segments before rendering.

A segment has one writer and no lock.  Entries are appended to a ring;
a table of slots, one per hash of the key, points at the latest entry of
that hash.  A reader trusts what it copied only if the whole key is in the
entry, its value matches the checksum written with it, and the writer had
not reserved that part of the ring again by the time the copy ended (the
writer publishes how far it has written before it writes there).  Anything
else (a slot taken by another key, an entry overwritten while it was read)
is a miss, and the worker renders the message itself.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

RENDERINGS_FD_ENV = "MAILD_RENDERINGS_FD"

_MAGIC = b"maildrc1"
_HEADER = struct.Struct("<8sIII")  # magic, writers, slots, ring size
_HEADER_SIZE = 64
_HEAD = struct.Struct("<Q")  # how far the segment's writer has reserved
_SEGMENT_HEADER_SIZE = 64
_SLOT = struct.Struct("<IIQ")  # key hash, entry length, entry position
_ENTRY = struct.Struct("<II")  # key length, value checksum

SLOTS = 1 << 15
RING = 16 << 20


def sharedSize(writers: int, slots: int = SLOTS, ring: int = RING) -> int:
    return _HEADER_SIZE + writers * (_SEGMENT_HEADER_SIZE + slots * _SLOT.size + ring)


def makeShared(writers: int, slots: int = SLOTS, ring: int = RING) -> int:
    """
    A new shared memory file for C{writers} workers (its descriptor, to
    pass on to them).  Its pages take memory only once written.
    """
    fd = os.memfd_create("maild-renderings", os.MFD_CLOEXEC)
    os.ftruncate(fd, sharedSize(writers, slots, ring))
    os.pwrite(fd, _HEADER.pack(_MAGIC, writers, slots, ring), 0)
    return fd


class SharedRenderings:
    """
    One worker's view of the shared file: it writes segment C{writer} and
    reads the others.
    """

    def __init__(self, fd: int, writer: int) -> None:
        self._map = mmap.mmap(fd, 0)
        magic, self.writers, self.slots, self.ring = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or not 0 <= writer < self.writers:
            raise ValueError("not a renderings file, or no segment for this worker")
        if len(self._map) < sharedSize(self.writers, self.slots, self.ring):
            raise ValueError("renderings file too short")
        self.writer = writer
        self._segments = [self._segment(i) for i in range(self.writers)]
        self._others = [s for i, s in enumerate(self._segments) if i != writer]
        # A restarted worker goes on from where its predecessor was: an
        # entry its predecessor left must not seem newer than it is.
        self._head = _HEAD.unpack_from(self._map, self._segments[writer][0])[0]

    @classmethod
    def fromEnvironment(cls) -> "SharedRenderings | None":
        """
        The file the parent handed this worker, if any (C{fd:writer} in
        L{RENDERINGS_FD_ENV}).
        """
        value = os.environ.get(RENDERINGS_FD_ENV)
        if not value:
            return None
        fd, _, writer = value.partition(":")
        return cls(int(fd), int(writer))

    def _segment(self, i: int) -> tuple[int, int, int]:
        start = _HEADER_SIZE + i * (_SEGMENT_HEADER_SIZE + self.slots * _SLOT.size + self.ring)
        slots = start + _SEGMENT_HEADER_SIZE
        return start, slots, slots + self.slots * _SLOT.size

    def get(self, key: bytes) -> bytes | None:
        """
        The value another worker stored under C{key}, or None.
        """
        hashed = zlib.crc32(key)
        for segment in self._others:
            value = self._read(segment, key, hashed)
            if value is not None:
                return value
        return None

    def _read(self, segment: tuple[int, int, int], key: bytes, hashed: int) -> bytes | None:
        headAt, slots, ring = segment
        m = self._map
        slotHash, length, position = _SLOT.unpack_from(m, slots + (hashed % self.slots) * _SLOT.size)
        if slotHash != hashed or not _ENTRY.size + len(key) <= length <= self.ring:
            return None
        start = position % self.ring
        if start + length > self.ring:
            return None
        entry = m[ring + start : ring + start + length]
        head = _HEAD.unpack_from(m, headAt)[0]
        if position + length > head or head - position > self.ring:
            return None  # not written yet, or written over since
        keyLength, checksum = _ENTRY.unpack_from(entry, 0)
        if keyLength != len(key) or entry[_ENTRY.size : _ENTRY.size + keyLength] != key:
            return None
        value = entry[_ENTRY.size + keyLength :]
        if zlib.crc32(value) != checksum:
            return None
        return value

    def put(self, key: bytes, value: bytes) -> None:
        """
        Store C{value} under C{key} for the other workers (too big a value
        is not stored).
        """
        length = _ENTRY.size + len(key) + len(value)
        if length > self.ring // 8:
            return
        headAt, slots, ring = self._segments[self.writer]
        m = self._map
        position = self._head
        if position % self.ring + length > self.ring:
            position += self.ring - position % self.ring  # to the start of the next lap
        self._head = position + length
        # Reserve before writing: a reader that copied bytes being
        # overwritten then sees a head that voids its copy.
        _HEAD.pack_into(m, headAt, self._head)
        start = ring + position % self.ring
        _ENTRY.pack_into(m, start, len(key), zlib.crc32(value))
        end = start + _ENTRY.size
        m[end : end + len(key)] = key
        m[end + len(key) : end + len(key) + len(value)] = value
        hashed = zlib.crc32(key)
        _SLOT.pack_into(m, slots + (hashed % self.slots) * _SLOT.size, hashed, length, position)
