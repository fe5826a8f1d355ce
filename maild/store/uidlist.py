"""
The per-folder UID list, in Dovecot's C{dovecot-uidlist} version 3 format
so that UIDs survive a move of the Maildir between maild and Dovecot::

    3 V<uidvalidity> N<uidnext> G<guid>
    <uid> :<base name>
    ...

New records are appended (as Dovecot does); the file is rewritten only to
drop records of expunged messages.  The header's C{N} may therefore be
older than the records: the next UID is the larger of C{N} and the last
record's UID plus one.  All changes happen under Dovecot's own dot-lock,
C{dovecot-uidlist.lock} (L{maild.store.locking.dotLocked}), after reading
what the other holders (Dovecot, other maild processes) wrote, so that both
servers can number one folder's messages at the same time; a rewrite
replaces the file atomically.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Collection

from maild.store.files import replaceFile
from maild.store.locking import DOVECOT_MAILDIR, DotLockSettings, dotLocked, locked

FILE_NAME = "dovecot-uidlist"


class CorruptUidList(Exception):
    pass


def _closeHeld(held: list) -> None:
    if held[0] is not None:
        held[0].close()


class UidValidities:
    """
    Where the UIDVALIDITY of every folder of one user comes from: a
    counter in the user's root, raised under a lock, so that a folder that
    appears under a name (created after a delete, renamed onto a deleted
    name, made in the same second as another) never gets a value that name
    had: the value is at least the time and more than any given before
    (RFC 3501 section 2.3.1.1).
    """

    FILE_NAME = "maild-uidvalidity"
    LOCK_NAME = "maild-uidvalidity.lock"

    def __init__(self, root: Path) -> None:
        self.path = root / self.FILE_NAME
        self.lockPath = root / self.LOCK_NAME

    def allocate(self, above: int = 0) -> int:
        """
        A new UIDVALIDITY, greater than any given before and than C{above}.
        """
        with locked(self.lockPath):
            try:
                last = int(self.path.read_text("ascii").strip() or 0)
            except (FileNotFoundError, ValueError):
                last = 0
            value = max(int(time.time()), last + 1, above + 1)
            replaceFile(self.path, b"%d\n" % value)
        return value


@dataclass
class UidListState:
    """
    What the file said when last read: the UID of each base name, and
    where the file ended so that later appends can be read alone.
    """

    uidvalidity: int
    uidnext: int
    guid: str
    uids: dict[str, int] = field(default_factory=dict)
    inode: int = 0
    offset: int = 0


def _parseHeader(line: str) -> tuple[int, int, str]:
    parts = line.split()
    if not parts or parts[0] != "3":
        raise CorruptUidList(f"unsupported uidlist header {line!r}")
    uidvalidity = uidnext = 0
    guid = ""
    for part in parts[1:]:
        key, value = part[:1], part[1:]
        if key == "V":
            uidvalidity = int(value)
        elif key == "N":
            uidnext = int(value)
        elif key == "G":
            guid = value
    if uidvalidity <= 0 or uidnext <= 0:
        raise CorruptUidList(f"uidlist header lacks V or N: {line!r}")
    return uidvalidity, uidnext, guid


_SIMPLE_RECORD = re.compile(r"^(\d+) :(.*)$", re.M)


def _parseRecords(text: str, state: UidListState) -> None:
    """
    Read C{<uid> [extension fields] :<base name>} lines into C{state}.  A
    line that makes no sense is skipped: its file gets a new UID.
    """
    uids = state.uids
    uidnext = state.uidnext
    simple = _SIMPLE_RECORD.findall(text)
    if len(simple) == text.count("\n") + (0 if text.endswith("\n") or not text else 1):
        # Every record is "<uid> :<base>" (what we write): parsed in bulk,
        # which matters when a folder of 100,000 messages is opened.
        pairs = [(base, int(uid)) for uid, base in simple]
        uids.update(pairs)
        if pairs:
            state.uidnext = max(uidnext, max(uid for _, uid in pairs) + 1)
        return
    for line in text.splitlines():
        # Dovecot puts extension fields between the UID and the name
        # ("12 W300 S290 :name"): the UID is the first word.
        head, sep, base = line.partition(" :")
        uid = head.split(" ", 1)[0]
        if not sep or not uid.isdigit() or not base:
            continue
        uid = int(uid)
        uids[base] = uid
        if uid >= uidnext:
            uidnext = uid + 1
    state.uidnext = uidnext


class UidList:
    """
    The UID list of one folder directory, and what this process last read
    of it.

    @cvar FORGOTTEN_KEPT: how many expunged base names L{forgotten} keeps.
    """

    FORGOTTEN_KEPT = 10_000

    def __init__(
        self,
        folderPath: Path,
        uidValidities: UidValidities | None = None,
        lockSettings: DotLockSettings = DOVECOT_MAILDIR,
    ) -> None:
        self.path = folderPath / FILE_NAME
        self.uidValidities = uidValidities
        self.lockSettings = lockSettings
        self.state: UidListState | None = None
        self._held: list[IO[bytes] | None] = [None]
        # The UIDs of the latest expunged files, by base name.
        self.forgotten: dict[str, int] = {}
        weakref.finalize(self, _closeHeld, self._held)

    def locked(self):
        """
        Hold the folder's UID list lock (Dovecot's C{dovecot-uidlist.lock}),
        which also guards C{dovecot-keywords}.
        """
        return dotLocked(self.path, self.lockSettings)

    @property
    def uidvalidity(self) -> int:
        return self.refresh().uidvalidity

    def refresh(self) -> UidListState:
        """
        Catch up with the file: read only what was appended when it is
        still the same file, all of it otherwise.  A missing or corrupt list
        starts a new UIDVALIDITY.
        """
        previous = self.state
        held = self._held[0]
        try:
            st = os.stat(self.path)
            if (
                previous is not None
                and held is not None
                and previous.inode == st.st_ino
                and previous.offset <= st.st_size
            ):
                # Still the file we read: the one we hold open, whose inode
                # no replacement can reuse (Dovecot rewrites the list by
                # renaming a new file over it, and does so often).
                if previous.offset < st.st_size:
                    # pread: no shared file position for threads to race on.
                    tail = os.pread(held.fileno(), st.st_size - previous.offset, previous.offset)
                    complete = tail[: tail.rfind(b"\n") + 1]
                    _parseRecords(complete.decode("utf-8", "replace"), previous)
                    previous.offset += len(complete)
                return previous
            f = open(self.path, "rb")
        except FileNotFoundError:
            self.state = self._create()
            return self.state
        self._hold(f)
        st = os.fstat(f.fileno())
        data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        header, _, records = complete.decode("utf-8", "replace").partition("\n")
        try:
            uidvalidity, uidnext, guid = _parseHeader(header)
            state = UidListState(uidvalidity, uidnext, guid, inode=st.st_ino)
            _parseRecords(records, state)
            state.offset = len(complete)
        except (CorruptUidList, ValueError):
            # A list we cannot trust means UIDs may have changed: clients
            # must be told so with a new UIDVALIDITY (RFC 3501 section 2.3.1.1).
            state = self._create(replaceCorrupt=True)
        self.state = state
        return state

    def _create(self, replaceCorrupt: bool = False) -> UidListState:
        with self.locked():
            if not replaceCorrupt and self.path.exists():
                # Another process created it while we waited for the lock.
                self.state = None
                return self._readLocked()
            state = UidListState(
                uidvalidity=self._newUidValidity(), uidnext=1, guid=uuid.uuid4().hex
            )
            self._writeAll(state)
            return state

    def _hold(self, f) -> None:
        """
        Keep C{f}, the version of the file last read, open (closing the
        one held before).
        """
        previous, self._held[0] = self._held[0], f
        if previous is not None:
            previous.close()

    def _newUidValidity(self, known: int = 0) -> int:
        """
        A UIDVALIDITY greater than this list ever had (as far as this
        process knows, and as far as the user's counter knows).
        """
        if self.state is not None:
            known = max(known, self.state.uidvalidity)
        if self.uidValidities is not None:
            return self.uidValidities.allocate(above=known)
        return max(int(time.time()), known + 1)

    def renew(self) -> None:
        """
        Give the folder a new UIDVALIDITY, keeping its UIDs: it now lives
        under a name that may have had any value before (RENAME).
        """
        with self.locked():
            try:
                state = self._readLocked()
            except FileNotFoundError:
                return  # made with a fresh value when first opened
            except (CorruptUidList, ValueError):
                state = UidListState(uidvalidity=0, uidnext=1, guid=uuid.uuid4().hex)
            state.uidvalidity = self._newUidValidity(state.uidvalidity)
            self._writeAll(state)
            self.state = state

    def _readLocked(self) -> UidListState:
        f = open(self.path, "rb")
        self._hold(f)
        data = f.read()
        inode = os.fstat(f.fileno()).st_ino
        complete = data[: data.rfind(b"\n") + 1]
        header, _, records = complete.decode("utf-8", "replace").partition("\n")
        uidvalidity, uidnext, guid = _parseHeader(header)
        state = UidListState(uidvalidity, uidnext, guid, inode=inode)
        _parseRecords(records, state)
        state.offset = len(complete)
        return state

    def assign(self, bases: list[str], renumber: Collection[int] = ()) -> list[int]:
        """
        Give new UIDs to C{bases} (in that order), after catching up with
        whatever another process appended.  A base that already has a UID
        keeps it (another process, Dovecot say, numbered it first), unless
        that UID is in C{renumber}: a message seen expunged whose file came
        back is numbered again, since UIDs only grow.

        @return: the UID of each base.
        """
        if not bases:
            return []
        with self.locked():
            state = self.refresh()
            lines = []
            result = []
            for base in bases:
                uid = state.uids.get(base)
                if uid is None or uid in renumber:
                    uid = state.uidnext
                    state.uidnext += 1
                    state.uids[base] = uid
                    lines.append(f"{uid} :{base}\n")
                result.append(uid)
            if lines:
                with open(self.path, "ab") as f:
                    f.write("".join(lines).encode("utf-8"))
                    state.offset = f.tell()
        return result

    def forget(self, bases: list[str]) -> None:
        """
        Drop the records of expunged messages, and compact the file once
        most of its records are dead.
        """
        state = self.refresh()
        forgotten = self.forgotten
        for base in bases:
            uid = state.uids.pop(base, None)
            if uid is not None:
                forgotten[base] = uid
        if len(forgotten) > self.FORGOTTEN_KEPT:
            for base in list(forgotten)[: len(forgotten) - self.FORGOTTEN_KEPT]:
                del forgotten[base]
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return
        # A record costs about 64 octets: rewrite when the file is more than
        # twice what the live records need.
        if size > 64 * 1024 and size > 2 * 64 * (len(state.uids) + 1):
            gone = set(bases)
            with self.locked():
                state = self.refresh()
                state.uids = {b: u for b, u in state.uids.items() if b not in gone}
                self._writeAll(state)
                self.state = state

    def _writeAll(self, state: UidListState) -> None:
        """
        Replace the file with C{state}.  The caller holds the lock.
        """
        lines = [f"3 V{state.uidvalidity} N{state.uidnext} G{state.guid}\n"]
        lines.extend(
            f"{uid} :{base}\n"
            for base, uid in sorted(state.uids.items(), key=lambda item: item[1])
        )
        data = "".join(lines).encode("utf-8")
        replaceFile(self.path, data)
        f = open(self.path, "rb")
        self._hold(f)
        state.inode = os.fstat(f.fileno()).st_ino
        state.offset = len(data)
