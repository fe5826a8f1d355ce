"""
One Maildir folder as this process knows it: a compact index shared by
every session that has the folder open.

The index holds, in UID order, an C{array} of UIDs, a C{bytearray} of flag
bits and a list of base names; keywords (rare) sit in a dict.  It is built
from the UID list and one listing of C{new/} and C{cur/}: no message file
is read to open a folder.  Changes made through this object update the
index at once and are announced to its listeners; changes made by anyone
else (another process, a Maildir tool) are found by L{Folder.refresh},
which lists the directories again only when what C{stat} says of one
moved (its modification time, size or inode: L{_stamp}) or the UID list
numbers files no listing found.

Shared with Dovecot, the folder follows Dovecot's rules (maildir-sync.c):
message files are renamed (flags, C{new/} to C{cur/}) only under the UID
list lock, C{dovecot-uidlist.lock}, and a file a listing lacks is taken
for expunged only when a listing under that lock lacks it too.  A readdir
that runs while another process renames a file may return neither name;
under the lock nobody renames.
"""

from __future__ import annotations

import bisect
import functools
import os
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Protocol, Sequence

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from maild.store import maildir
from maild.store.changelog import ChangeLog, formatOps
from maild.store.delivery import FolderMissing
from maild.store.files import folderMustExist
from maild.store.interfaces import IFolder
from maild.store.keywords import Keywords, TooManyKeywords
from maild.store.locking import DOTLOCK_SUFFIX
from maild.store.maildir import HAS_KEYWORDS, IN_NEW, INFO_SEPARATOR
from maild.store.uidlist import UidList, UidValidities

log = Logger()

_READ_SIZE = 64 * 1024
# Put before the info of a file listed in new/: a "/" is in no file name.
_IN_NEW_MARK = "/"
# The time of a directory that is not there.
_MISSING = -2

# Flags a client may set or clear (IN_NEW and HAS_KEYWORDS are ours).
SETTABLE = (
    maildir.SEEN
    | maildir.ANSWERED
    | maildir.FLAGGED
    | maildir.DELETED
    | maildir.DRAFT
    | maildir.FORWARDED
)


@dataclass
class FolderChange:
    """
    What changed in a folder, by UID.

    @ivar origin: the session that made the change, if any (so that it
        can tell its client in its own way).
    @ivar reset: the UIDVALIDITY changed: every UID the listener knew is
        void.
    @ivar gone: the folder was deleted or renamed: nothing of it is left
        under its name.
    """

    added: list[int] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    origin: object | None = None
    reset: bool = False
    gone: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.expunged or self.flagged or self.reset or self.gone)


class FolderListener(Protocol):
    def folderChanged(self, folder: "Folder", change: FolderChange) -> None: ...


class MessageGone(Exception):
    """
    The message was expunged (by someone else) before it could be read.
    """


@implementer(IFolder)
class Folder:
    """
    The shared index of one folder.

    @cvar GONE_KEPT: how many expunged UIDs to remember.
    @cvar nowNs: the wall clock, in nanoseconds, against which directory
        times are judged settled (a test replaces it).

    @ivar name: the IMAP name (C{INBOX}, C{Sent}, C{Lists/Python}).
    @ivar path: the folder's directory (holding C{cur new tmp}).
    @ivar store: the L{maild.store.MailStore} that places messages here
        and watches the folder (None for a folder only read and changed).
    """

    GONE_KEPT = 100_000
    nowNs = staticmethod(time.time_ns)

    def __init__(self, name: str, path: Path, store=None, uidValidities: UidValidities | None = None) -> None:
        self.name = name
        self.path = path
        self.store = store
        self._dir = str(path) + os.sep
        self.uidList = UidList(path, uidValidities)
        self.keywords = Keywords(path)
        # What other maild processes changed here (L{maild.store.changelog}).
        self.changes = ChangeLog(path)
        # The renames of the change in progress, for the change log.
        self._renamed: list[tuple[int, str, str]] | None = None
        # The stamps a listing disturbed by a change started from: the
        # change log may tell what changed since (L{_FOLLOW_LOG}).
        self._followFrom: dict[str, Stamp] | None = None
        self._lockPath = os.fspath(self.uidList.path) + DOTLOCK_SUFFIX
        # The last look was put off while another process changed the
        # folder (L{_changeInProgress}): whoever watches it looks again
        # soon, since the end of that change may make no event.
        self.lookAgainSoon = False
        self.uids = array("I")
        self.flags = bytearray()
        self.bases: list[str] = []
        self.keywordLetters: dict[int, str] = {}
        self.uidvalidity = 0
        self._sizes: dict[int, tuple[int, int]] = {}
        self._listeners: list[FolderListener] = []
        # What stat said of new/ and cur/ (L{_stamp}) when last listed, or
        # after a change of ours that nobody else's came between.
        self._mtimes: dict[str, Stamp] = {"new": -1, "cur": -1}
        # A stamp too recent to trust (L{UNSETTLED_NS}) is trusted all the
        # same, and the directory owes one more listing once its time has
        # settled: by then (wall-clock nanoseconds) it is listed, changed
        # or not.  0: nothing owed.
        self._listBy: dict[str, int] = {"new": 0, "cur": 0}
        # Every UID below this was given to a file a listing of ours found,
        # or one we placed: a UID list that numbers more calls for a listing.
        self._listedUidnext = 0
        # How deep this process is in holds of the folder's UID list lock.
        self._lockDepth = 0
        self._loaded = False
        self._expungedUids: dict[int, None] = {}
        # The last look found the folder deleted or renamed.
        self.missing = False
        # Called after each change this process makes (not those it finds
        # on disk), to tell other processes (L{maild.store.watch}).
        self.onOwnChange: Callable[["Folder"], None] | None = None

    # Reading the index ----------------------------------------------------

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def uidnext(self) -> int:
        highest = (self.uids[-1] + 1) if self.uids else 1
        try:
            return max(self.uidList.refresh().uidnext, highest)
        except FileNotFoundError:
            if self.path.is_dir():
                raise
            return highest  # gone: the next refresh says so

    def position(self, uid: int) -> int | None:
        """
        The index (0-based) of C{uid}, or None if the folder lacks it.
        """
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i
        return None

    def fileName(self, i: int) -> str:
        """
        The current file name (relative to the folder) of message C{i}.
        """
        bits = self.flags[i]
        letters = self.keywordLetters.get(self.uids[i], "") if bits & HAS_KEYWORDS else ""
        if bits & IN_NEW:
            # A message copied or appended with flags waits in new/ with
            # them (it is \Recent all the same); one delivered has none.
            if bits & SETTABLE or letters:
                return "new/" + maildir.curFileName(self.bases[i], bits, letters)
            return "new/" + self.bases[i]
        return "cur/" + maildir.curFileName(self.bases[i], bits, letters)

    def filePath(self, i: int) -> str:
        """
        The path of message C{i}, as a string: FETCH opens thousands of
        files a second, and pathlib would cost a third of that.
        """
        return self._dir + self.fileName(i)

    def keywordNames(self, i: int) -> list[str]:
        """
        The keywords of message C{i}, with $Forwarded for an older file's
        Maildir letter P.
        """
        bits = self.flags[i]
        names = []
        if bits & HAS_KEYWORDS:
            names = self.keywords.names(self.keywordLetters.get(self.uids[i], ""))
        if bits & maildir.FORWARDED and not any(n.lower() == "$forwarded" for n in names):
            names.append("$Forwarded")
        return names

    def positionsWith(self, bit: int) -> list[int]:
        """
        The indexes of the messages whose flag byte has C{bit}, found at C
        speed (a SELECT of 100,000 messages must not loop over them).
        """
        mask = self.flags.translate(bitTable(bit))
        out = []
        find = mask.find
        i = find(1)
        while i >= 0:
            out.append(i)
            i = find(1, i + 1)
        return out

    def countWith(self, bit: int, wanted: bool = True) -> int:
        """
        How many messages have C{bit} set (or clear, when not C{wanted}).
        """
        return self.flags.translate(bitTable(bit, wanted)).count(1)

    def sizes(self, i: int) -> tuple[int, int]:
        """
        The on-disk (LF) size and the CRLF size of message C{i}, from its
        name when the name carries them.
        """
        size, crlfSize = maildir.sizesFromBase(self.bases[i])
        if size is not None and crlfSize is not None:
            return size, crlfSize
        uid = self.uids[i]
        known = self._sizes.get(uid)
        if known is None:
            # Served with CRLF: each LF gains a CR, unless it has one already
            # (a file written with CRLF by another tool).
            with self.open(i) as f:
                size = crlfSize = 0
                afterCR = False
                while chunk := f.read(1 << 16):
                    size += len(chunk)
                    crlfSize += len(chunk) + chunk.count(b"\n") - chunk.count(b"\r\n")
                    if afterCR and chunk.startswith(b"\n"):
                        crlfSize -= 1
                    afterCR = chunk.endswith(b"\r")
            known = self._sizes[uid] = (size, crlfSize)
        return known

    def internalDate(self, i: int) -> float:
        """
        When the message arrived: its file's modification time, as Dovecot
        keeps it.
        """
        return self._stat(i).st_mtime

    def _stat(self, i: int) -> os.stat_result:
        uid = self.uids[i]
        try:
            return os.stat(self.filePath(i))
        except FileNotFoundError:
            i = self._relocate(uid)
            return os.stat(self.filePath(i))

    def open(self, i: int) -> IO[bytes]:
        """
        Open message C{i} for reading (LF line endings).

        @raise MessageGone: if it was expunged by someone else.
        """
        uid = self.uids[i]
        # os.path.join, not Path's "/": this runs for every message served,
        # and pathlib's parsing cost a sixth of a POP3 RETR.
        try:
            return open(self.filePath(i), "rb", buffering=0)
        except FileNotFoundError:
            i = self._relocate(uid)
            return open(self.filePath(i), "rb", buffering=0)

    def read(self, i: int) -> bytes:
        """
        The whole of message C{i} (LF line endings), read with as few
        system calls as its size allows: FETCH of bodies reads thousands
        of files a second.

        @raise MessageGone: if it was expunged by someone else.
        """
        uid = self.uids[i]
        try:
            fd = os.open(self.filePath(i), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            i = self._relocate(uid)
            fd = os.open(self.filePath(i), os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Most messages fit one read of this size (below malloc's mmap
            # threshold, so the buffer costs nothing to shrink).
            data = os.read(fd, _READ_SIZE)
            if len(data) < _READ_SIZE:
                return data
            pieces = [data]
            while chunk := os.read(fd, 1 << 20):
                pieces.append(chunk)
            return b"".join(pieces)
        finally:
            os.close(fd)

    def readCRLF(self, i: int) -> bytes:
        """
        Message C{i} as it is served, with CRLF line ends: our files have
        LF, and one that another tool wrote with CRLF is served the same
        rather than with CR CR LF.
        """
        data = self.read(i)
        if data.find(b"\r") >= 0:
            data = data.replace(b"\r\n", b"\n")
        return data.replace(b"\n", b"\r\n")

    def _relocate(self, uid: int) -> int:
        """
        Another process renamed or removed the file: look again (the
        change log may tell where it went), else list the folder again.
        """
        self.refresh()
        i = self.position(uid)
        if i is not None and os.path.exists(self.filePath(i)):
            return i
        self._mtimes = {"new": -1, "cur": -1}
        self.refresh()
        i = self.position(uid)
        if i is None:
            raise MessageGone(uid)
        return i

    # Keeping up with the disk ---------------------------------------------

    def addListener(self, listener: FolderListener) -> None:
        self._listeners.append(listener)

    def removeListener(self, listener: FolderListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def listeners(self) -> Sequence[FolderListener]:
        return tuple(self._listeners)

    def _announce(self, change: FolderChange, own: bool = True) -> None:
        if change:
            for listener in tuple(self._listeners):
                listener.folderChanged(self, change)
            if own and self.onOwnChange is not None:
                self.onOwnChange(self)

    def _dirMtimes(self) -> dict[str, Stamp]:
        """
        The stamps (L{_stamp}) of C{new/} and C{cur/}.
        """
        # Every command of every session asks: string paths, not pathlib's
        # joins, which cost more than the stats.
        return {"new": _stamp(self._dir + "new"), "cur": _stamp(self._dir + "cur")}

    def refresh(self) -> FolderChange:
        """
        Bring the index up to date with the disk (cheap when nothing
        changed: three stats) and tell the listeners what changed.
        """
        try:
            return self._refresh()
        except FileNotFoundError:
            # Deleted or renamed by another process while we read it.
            if not self.path.is_dir():
                return self._gone()
        # Deleted and made again meanwhile: look once more.
        self._mtimes = {"new": -1, "cur": -1}
        return self._refresh()

    def _refresh(self) -> FolderChange:
        self.lookAgainSoon = False
        mtimes = self._dirMtimes()
        due = self._listingsDue()
        if self._loaded and mtimes == self._mtimes and not due:
            if not self._numberedUnlisted():
                return FolderChange()
            # Another process numbered files that a directory time we trust
            # hides (placed within the clock tick of a change of ours).
            self._mtimes = {"new": _LIST_AGAIN, "cur": _LIST_AGAIN}
        if mtimes["cur"] == mtimes["new"] == _MISSING and not self.path.is_dir():
            return self._gone()
        if self._loaded and not due:
            followed = self._followLog()
            if followed is not None:
                return followed
        changed = {sub for sub in mtimes if mtimes[sub] != self._mtimes[sub]} | due
        if "cur" in changed:
            # A file may move from new/ to cur/ between two listings: one of
            # cur/ alone could miss it in both (Dovecot lists both as well).
            changed.add("new")
        return self._scanAndAnnounce(mtimes, changed if self._loaded else {"new", "cur"})

    def _followLog(self) -> FolderChange | None:
        """
        Learn from the change log what other maild processes did since the
        index was last in step with the directories, without listing them.

        @return: what changed, when the log explains the directories'
            present stamps (C{cur/}'s at least: C{new/}, where deliveries
            are not logged, is then listed alone); None when it does not,
            and the folder must be listed.
        """
        at = dict(self._mtimes)
        if _FOLLOW_LOG in at.values() and self._followFrom is not None:
            at = dict(self._followFrom)
        if not (isinstance(at["new"], tuple) and isinstance(at["cur"], tuple)):
            return None
        mark = self.changes.tell()
        lines = self.changes.unread()
        if not lines:
            if lines is not None and self._dirMtimes()["cur"] != at["cur"] and self._changeInProgress():
                return FolderChange()
            return None
        newFollowed = True
        flagged: dict[int, tuple[str, str]] = {}
        removed: dict[int, str] = {}
        for line in lines:
            if line is None or line.uidvalidity != self.uidvalidity:
                return None
            if line.before["cur"] == at["cur"]:
                at["cur"] = line.after["cur"]
            elif line.after["cur"] != at["cur"]:
                return None  # cur/ changed in a way no line tells
            if line.before["new"] == at["new"]:
                at["new"] = line.after["new"]
            elif line.after["new"] != at["new"]:
                newFollowed = False
            for kind, uid, base, info in line.ops:
                if kind == "f":
                    flagged[uid] = (base, info)
                else:
                    flagged.pop(uid, None)
                    removed[uid] = base
        now = self._dirMtimes()
        if at["cur"] != now["cur"]:
            if self._changeInProgress():
                # Its line is still to come: read it at the next look.
                self.changes.rewind(mark)
                return FolderChange()
            return None
        gone = self._expungedUids
        highest = self.uids[-1] if self.uids else 0
        fresh = []
        for uid, (base, _) in flagged.items():
            i = self.position(uid)
            if i is not None:
                if self.bases[i] != base:
                    return None  # another message's UID: the index is wrong
            elif uid not in gone:
                fresh.append(uid)
        for uid, base in removed.items():
            i = self.position(uid)
            if i is not None and self.bases[i] != base:
                return None
        if fresh:
            # Placed (and moved to cur/) by another process before we
            # listed new/: taken from the line, in UID order, unless UIDs
            # we know nothing of lie below them (sessions learn messages
            # in UID order: then a listing finds them all).
            fresh.sort()
            if fresh[0] <= highest or self._gapsBelow(highest, fresh):
                return None
        change = FolderChange()
        for uid, (_, info) in flagged.items():
            i = self.position(uid)
            if i is None or uid in fresh:
                continue
            bits, letters = infoBits(info)
            if bits != self.flags[i] or letters != self.keywordLetters.get(uid, ""):
                self.flags[i] = bits
                if letters:
                    self.keywordLetters[uid] = letters
                else:
                    self.keywordLetters.pop(uid, None)
                change.flagged.append(uid)
        for uid in fresh:
            base, info = flagged[uid]
            bits, letters = infoBits(info)
            self.uids.append(uid)
            self.flags.append(bits)
            self.bases.append(base)
            if letters:
                self.keywordLetters[uid] = letters
            change.added.append(uid)
        expunged = {uid for uid in removed if self.position(uid) is not None}
        if expunged:
            change.expunged, goneBases = self._drop(expunged)
            self.uidList.forget(goneBases)
        self._announce(change, own=False)
        if not newFollowed or at["new"] != now["new"]:
            # Deliveries into new/ are not logged: list it alone.
            return _merged(change, self._scanAndAnnounce(now, {"new"}))
        self._trust(now)
        if self._numberedUnlisted():
            return _merged(change, self._scanAndAnnounce(self._dirMtimes(), {"new", "cur"}))
        return change

    def _changeInProgress(self) -> bool:
        """
        Whether another process (or a thread of ours) holds the UID list
        lock, taken less than L{UNSETTLED_NS} ago: it may be renaming or
        removing files, and write its line when it is done.  A folder whose
        listing is put off for that owes one within L{UNSETTLED_NS}, so that
        a lock taken again and again cannot hide a change nobody logged.
        """
        if self._lockDepth:
            return False
        try:
            taken = os.lstat(self._lockPath).st_mtime_ns
        except FileNotFoundError:
            return False
        now = self.nowNs()
        if taken <= now - UNSETTLED_NS:
            return False
        if not self._listBy["cur"]:
            self._listBy["cur"] = now + UNSETTLED_NS
        self.lookAgainSoon = True
        return True

    def _scanAndAnnounce(self, mtimes: dict[str, Stamp], subs: set[str]) -> FolderChange:
        change = self._scan(mtimes, subs)
        self._announce(change, own=False)
        return change

    def _listingsDue(self) -> set[str]:
        """
        The directories whose owed listing (L{_listBy}) is due: their
        stamp, trusted while recent, has settled since.
        """
        listBy = self._listBy
        if not (listBy["new"] or listBy["cur"]):
            return set()
        now = self.nowNs()
        return {sub for sub, by in listBy.items() if by and by <= now}

    def _trust(self, stamps: dict[str, Stamp]) -> None:
        """
        Take C{stamps} for what the index shows of the directories.  A
        stamp whose time is too recent to prove that nothing else changed
        within its clock tick (L{UNSETTLED_NS}) is trusted too, so that a
        busy folder is not listed at every command, but the directory owes
        a listing once that time has settled; an earlier debt stands, so a
        folder that never rests is still listed about once a
        L{UNSETTLED_NS}.
        """
        self._mtimes = dict(stamps)
        recent = self.nowNs() - UNSETTLED_NS
        for sub, stamp in stamps.items():
            if isinstance(stamp, tuple) and stamp[0] > recent and not self._listBy[sub]:
                self._listBy[sub] = stamp[0] + UNSETTLED_NS

    def _numberedUnlisted(self) -> bool:
        """
        Whether the UID list numbers files that no listing of ours saw, or
        has a new UIDVALIDITY: it is read at every look, as Dovecot checks
        C{dovecot-uidlist} along with the directories' times.
        """
        state = self.uidList.refresh()
        if state.uidvalidity != self.uidvalidity:
            return True
        if state.uidnext > self._listedUidnext:
            # Numbered since our last listing: by us (deliveries, files a
            # listing of new/ found), or by others for files we hold or saw
            # expunged, as a rule; any other calls for a listing.
            gone = self._expungedUids
            for uid in range(self._listedUidnext, state.uidnext):
                if uid not in gone and not _holds(self.uids, uid):
                    return True
            self._listedUidnext = state.uidnext
        return False

    def _gone(self) -> FolderChange:
        """
        The folder was deleted or renamed (by anyone): forget its index,
        so that a folder made later under this name is read afresh, and
        tell the listeners.
        """
        self._forgetMessages()
        self._mtimes = {"new": -1, "cur": -1}
        self._loaded = False
        self.changes.skipToEnd()
        self.uidList.state = None
        self.missing = True
        change = FolderChange(gone=True)
        self._announce(change)
        return change

    def _forgetMessages(self) -> None:
        """
        Forget everything known of the folder's messages: it is gone, or
        another folder (a new UIDVALIDITY) is now under its name.  The
        UIDs seen expunged go too: kept, they would make the new folder's
        messages that reuse those UIDs look like expunged ones come back,
        and number them a second time (seen with two workers, when one
        deleted and made again a folder the other had open).
        """
        self.uids, self.flags, self.bases = array("I"), bytearray(), []
        self.keywordLetters = {}
        self._sizes = {}
        self._expungedUids = {}
        self._listedUidnext = 0
        self.uidList.forgotten = {}

    def _listDir(self, sub: str) -> list[str]:
        try:
            return os.listdir(self.path / sub)
        except FileNotFoundError:
            return []

    def _listing(self, subs: set[str]) -> dict[str, str]:
        """
        The base name and info of every file in the directories C{subs};
        the info of a file in C{new/} starts with L{_IN_NEW_MARK}.
        """
        listing: dict[str, str] = {}
        if "new" in subs:
            for name in self._listDir("new"):
                if not name.startswith("."):
                    base, info = maildir.splitFileName(name)
                    listing[base] = _IN_NEW_MARK + info
        if "cur" in subs:
            names = [n for n in self._listDir("cur") if not n.startswith(".")]
            # (base, ":2,", info) -> base: info, without a call per file.
            listing.update(n.partition(INFO_SEPARATOR)[::2] for n in names)
        return listing

    def _scan(self, mtimes: dict[str, Stamp], subs: set[str]) -> FolderChange:
        """
        List the directories C{subs} (those whose time moved) and reconcile
        the index with them; entries in the other directory stay as they are.
        """
        # Record the times first: a change made while we list is seen next time.
        # What the change log says so far, the listing shows too.
        self.changes.skipToEnd()
        self._followFrom = None
        for sub in subs:
            self._listBy[sub] = 0
        self._trust(mtimes)
        self.missing = False
        # What the UID list numbered before we list: all of it is placed.
        listedUidnext = self.uidList.refresh().uidnext
        onDisk = self._listing(subs)
        if subs == {"new"} and self._goneFromNew(onDisk):
            # Messages left new/ while cur/ did not move: expunged or taken
            # away (RENAME INBOX), not read.  Listing cur/ as well settles
            # it now, instead of keeping them as "perhaps in cur/" until the
            # next look (a STATUS would count them meanwhile).
            subs = {"new", "cur"}
            onDisk.update(self._listing({"cur"}))
        # A directory that changed while we listed it (a rename by another
        # process) may have been listed without a file: one it seems to
        # lack is not taken for expunged until a listing is undisturbed.
        after = self._dirMtimes()
        disturbed = {sub for sub in subs if after[sub] != mtimes[sub]}
        if disturbed:
            # Listed again at the next look, unless the change log tells
            # every change since these stamps (then what the listing lacked
            # or had under an old name is known from it).
            self._followFrom = dict(mtimes)
            for sub in disturbed:
                self._mtimes[sub] = _FOLLOW_LOG
        state = self.uidList.refresh()
        change = FolderChange()
        if self._loaded and state.uidvalidity != self.uidvalidity:
            change.reset = True
            self._forgetMessages()
        self.uidvalidity = state.uidvalidity

        keptUids = array("I")
        keptFlags = bytearray()
        keptBases: list[str] = []
        keywordLetters: dict[int, str] = {}
        goneBases = []
        listedNew, listedCur = "new" in subs, "cur" in subs
        uncertain = False
        for uid, bits, base in zip(self.uids, self.flags, self.bases):
            oldLetters = self.keywordLetters.get(uid, "")
            if base in onDisk:
                # Where we knew it, or moved from new/ to cur/ by another
                # process (seen in cur/ before new/ was listed again).
                info = onDisk.pop(base)
                newBits, letters = infoBits(info)
                if newBits != bits or letters != oldLetters:
                    change.flagged.append(uid)
            elif not (listedNew if bits & IN_NEW else listedCur):
                newBits, letters = bits, oldLetters
            elif disturbed or (bits & IN_NEW and not listedCur):
                # Perhaps moved (to cur/, by another process) where we did
                # not look: decided when both are listed, at the next refresh.
                newBits, letters = bits, oldLetters
                uncertain = True
            else:
                change.expunged.append(uid)
                goneBases.append(base)
                continue
            keptUids.append(uid)
            keptFlags.append(newBits)
            keptBases.append(base)
            if letters:
                keywordLetters[uid] = letters
        if goneBases and not self._lockDepth:
            # A file another process renamed while we listed may be missing
            # from the listing although the directory's time did not show it
            # (the same clock tick, NFS): Dovecot renames only under the UID
            # list lock, and so does maild, so a listing under it tells what
            # is really gone (Dovecot's own rule, maildir-sync.c).
            with self._uidListLocked():
                return self._scan(self._dirMtimes(), {"new", "cur"})
        if uncertain:
            again = _FOLLOW_LOG if self._followFrom is not None else _LIST_AGAIN
            self._mtimes = {sub: again for sub in self._mtimes}
        if goneBases:
            self.uidList.forget(goneBases)
            for uid in change.expunged:
                self._sizes.pop(uid, None)
            self._rememberGone(change.expunged)

        # Files we did not know: those the UID list numbers keep their UID
        # (another process, Dovecot say, numbered them: a second UID would
        # make one message two), in its order; the others are numbered now,
        # in delivery order (their names start with the delivery time).
        if onDisk:
            known = state.uids
            gone = self._expungedUids
            # Opening a folder of 100,000 messages must stay cheap: the
            # files the list numbers come in its order (sorted as plain
            # tuples); only the others need their names parsed.
            numbered = [
                (uid, base) for base, uid in known.items() if base in onDisk and uid not in gone
            ]
            numbered.sort()
            if keptUids and numbered and numbered[0][0] <= keptUids[-1]:
                # A UID we hold for another file is no UID for this one.
                numbered = [(u, b) for u, b in numbered if not _holds(keptUids, u)]
            unnumbered: list[str] = []
            if len(numbered) < len(onDisk):
                numberedBases = {base for _, base in numbered}
                unnumbered = sorted(
                    (base for base in onDisk if base not in numberedBases), key=_deliveryOrder
                )
            newUids = [uid for uid, _ in numbered]
            newBases = [base for _, base in numbered]
            if unnumbered:
                # A file whose UID we saw expunged came back: it gets a new
                # one (UIDs are never reused, RFC 3501 section 2.3.1.1).
                held = {known[b] for b in unnumbered if b in known}
                assigned = self.uidList.assign(unnumbered, renumber=held)
                # Some may have been numbered meanwhile by another process,
                # below the UIDs given to the others: keep UID order.
                pairs = sorted(zip(newUids + assigned, newBases + unnumbered))
                newUids = [uid for uid, _ in pairs]
                newBases = [base for _, base in pairs]
            # Not looked for at the first reading, nor after a new
            # UIDVALIDITY (no session has been told of any UID then), nor
            # when the UIDs lie too far apart to be one change.
            gaps = []
            floor = keptUids[-1] if keptUids else max(self._expungedUids, default=0)
            if self._loaded and not change.reset and newUids and newUids[-1] - floor <= len(newUids) + 10001:
                gaps = self._gapsBelow(floor, newUids)
            if gaps:
                if not self._lockDepth:
                    # UIDs given (by another process) between what we hold
                    # and what we add, to files this listing did not see:
                    # one moved from new/ to cur/ while we listed, say.
                    # Sessions learn messages in UID order, and one told of
                    # a higher UID would never see these: list both
                    # directories under the lock, where nothing moves and
                    # every numbered file that is not expunged is found.
                    with self._uidListLocked():
                        return self._scan(self._dirMtimes(), {"new", "cur"})
                # Not there under the lock: expunged before we saw them.
                self._rememberGone(gaps)
            infos = list(map(onDisk.__getitem__, newBases))
            parsed = {info: infoBits(info) for info in set(infos)}
            bitsOf = {info: bits for info, (bits, _) in parsed.items()}
            newFlags = bytes(map(bitsOf.__getitem__, infos))
            if keptUids and newUids and newUids[0] < keptUids[-1]:
                # Numbered by another process below UIDs we had: in place.
                merged = sorted(
                    list(zip(keptUids, keptFlags, keptBases)) + list(zip(newUids, newFlags, newBases))
                )
                keptUids = array("I", (u for u, _, _ in merged))
                keptFlags = bytearray(f for _, f, _ in merged)
                keptBases = [b for _, _, b in merged]
            else:
                keptUids.extend(newUids)
                keptFlags += newFlags
                keptBases.extend(newBases)
            if any(letters for _, letters in parsed.values()):
                for uid, info in zip(newUids, infos):
                    if parsed[info][1]:
                        keywordLetters[uid] = parsed[info][1]
            change.added.extend(newUids)
        self.uids, self.flags, self.bases = keptUids, keptFlags, keptBases
        self.keywordLetters = keywordLetters
        if subs == {"new", "cur"}:
            self._listedUidnext = listedUidnext
        self._loaded = True
        return change

    def _goneFromNew(self, listedNew: dict[str, str]) -> bool:
        """
        Whether a message the index has in C{new/} is missing from this
        listing of it.
        """
        bases = self.bases
        return any(bases[i] not in listedNew for i in self.positionsWith(IN_NEW))

    def _gapsBelow(self, highest: int, adding: Sequence[int]) -> list[int]:
        """
        The UIDs above C{highest} and below the last of C{adding} (sorted)
        that C{adding} lacks and that we did not see expunged: given to
        files we have not seen.
        """
        if not adding:
            return []
        added = set(adding)
        gone = self._expungedUids
        return [u for u in range(highest + 1, adding[-1]) if u not in added and u not in gone]

    def _rememberGone(self, uids: Iterable[int]) -> None:
        """
        Remember UIDs seen expunged (the latest L{GONE_KEPT}): a file that
        comes back under one gets a new UID.
        """
        gone = self._expungedUids
        for uid in uids:
            gone[uid] = None
        if len(gone) > self.GONE_KEPT:
            for uid in list(gone)[: len(gone) - self.GONE_KEPT]:
                del gone[uid]

    # Changing the folder --------------------------------------------------

    def _ownChange(self, logged: bool = True) -> tuple[dict[str, Stamp], bool]:
        """
        Remember the directory times before a change of ours, so that
        L{_ownChangeDone} can tell whether anybody else changed them; when
        C{logged} (the caller holds the UID list lock), the renames until
        then are written to the change log.

        @return: the stamps, and whether they are the ones the index shows.
        """
        before = self._dirMtimes()
        # (A change that failed half-way left its renames unlogged: they
        # are not this change's.)
        self._renamed = [] if logged else None
        return before, before == self._mtimes

    def _ownChangeDone(
        self, before: dict[str, Stamp], unchanged: bool, removed: Sequence[tuple[int, str]] = ()
    ) -> None:
        # The index already shows our own change: listing a big cur/ again
        # after each flag change of ours would cost more than the command.
        # A change another process makes within our rename's clock tick is
        # found by the listing owed once that tick has settled (L{_trust}).
        after = self._dirMtimes()
        renamed, self._renamed = self._renamed, None
        if renamed or removed:
            ops = formatOps(renamed or (), removed)
            written = self.changes.append(self.uidvalidity, before, after, ops) if ops is not None else None
            if unchanged:
                self.changes.skipOwn(written)
        if unchanged:
            self._trust(after)

    @contextmanager
    def _uidListLocked(self) -> Iterator[None]:
        """
        Hold the folder's UID list lock (Dovecot's C{dovecot-uidlist.lock}),
        which Dovecot holds while it lists, renames or removes message files.

        @raise FolderMissing: if the folder was deleted or renamed (by
            another session or process).
        """
        with folderMustExist(self.path), self.uidList.locked():
            self._lockDepth += 1
            try:
                yield
            finally:
                self._lockDepth -= 1

    def setFlags(
        self,
        positions: Sequence[int],
        bits: int,
        keywordLetters: str = "",
        mode: int = 0,
        origin: object | None = None,
    ) -> list[int]:
        """
        Change the flags of messages (by index): C{mode} 0 replaces them,
        1 adds, -1 removes.  The files are renamed in C{cur/} (a message
        in C{new/} moves to C{cur/}).

        @return: the indexes whose flags really changed (after any
            expunge this learnt of).
        @raise FolderMissing: if the folder was deleted or renamed.
        """
        if not positions:
            return []
        bits &= SETTABLE
        changed: list[int] = []
        # Dovecot renames message files only under the UID list lock, and
        # lists the folder under it: a rename of ours while it lists could
        # hide the file from it, and it would expunge the UID and number
        # the file again (maildir-sync.c, "Locking, locking, locking").
        with self._uidListLocked():
            before, unchanged = self._ownChange()
            lost = [self.uids[i] for i in positions if not self._changeFlags(i, bits, keywordLetters, mode, changed)]
            if lost:
                # Renamed (flags) or removed by another process since we
                # last looked: look again (under the lock nothing moves
                # meanwhile) and change the file under its new name, from
                # its new flags; one removed is gone (RFC 2180 section 4.2).
                unchanged = False
                self._mtimes = {"new": -1, "cur": -1}
                self.refresh()
                for uid in lost:
                    i = self.position(uid)
                    if i is not None:
                        self._changeFlags(i, bits, keywordLetters, mode, changed)
            self._ownChangeDone(before, unchanged)
        if changed:
            self._announce(FolderChange(flagged=changed, origin=origin))
        return [i for uid in changed if (i := self.position(uid)) is not None]

    def _changeFlags(self, i: int, bits: int, keywordLetters: str, mode: int, changed: list[int]) -> bool:
        """
        Set the flags of message C{i} as L{setFlags} does; add its UID to
        C{changed} if they changed.

        @return: False if its file was not where the index said.
        """
        old = self.flags[i]
        uid = self.uids[i]
        oldLetters = self.keywordLetters.get(uid, "") if old & HAS_KEYWORDS else ""
        if mode == 0:
            new, letters = bits, keywordLetters
        elif mode > 0:
            new = (old & SETTABLE) | bits
            letters = "".join(sorted(set(oldLetters) | set(keywordLetters)))
        else:
            new = (old & SETTABLE) & ~bits
            letters = "".join(sorted(set(oldLetters) - set(keywordLetters)))
        if new & maildir.FORWARDED:
            new, letters = self._forwardedAsKeyword(
                new, letters, removing=mode < 0 and self._forwardedIn(keywordLetters)
            )
        if letters:
            new |= HAS_KEYWORDS
        if new == (old & ~IN_NEW) and letters == oldLetters and not old & IN_NEW:
            return True
        if not self._rename(i, new, letters):
            return False
        if new & SETTABLE != old & SETTABLE or letters != oldLetters:
            changed.append(uid)
        return True

    def _forwardedIn(self, letters: str) -> bool:
        forwarded = self.keywords.letters(["$Forwarded"], create=False)
        return bool(forwarded) and forwarded in letters

    def _forwardedAsKeyword(self, bits: int, letters: str, removing: bool) -> tuple[int, str]:
        """
        Flags as they are to be written when an older file carries
        $Forwarded as the Maildir letter P: the letter goes, and the
        keyword takes its place (as Dovecot stores it) unless this change
        removes it.  With all 26 keyword letters taken the P stays.
        """
        if removing:
            return bits & ~maildir.FORWARDED, letters
        try:
            forwarded = self.keywords.letters(["$Forwarded"])
        except TooManyKeywords:
            return bits, letters
        return bits & ~maildir.FORWARDED, "".join(sorted(set(letters) | set(forwarded)))

    def _rename(self, i: int, bits: int, letters: str) -> bool:
        old = self.filePath(i)
        newName = "cur/" + maildir.curFileName(self.bases[i], bits, letters)
        try:
            os.rename(old, self._dir + newName)
        except FileNotFoundError:
            return False
        self.flags[i] = bits
        uid = self.uids[i]
        if self._renamed is not None:
            self._renamed.append((uid, self.bases[i], newName.partition(INFO_SEPARATOR)[2]))
        if letters:
            self.keywordLetters[uid] = letters
        else:
            self.keywordLetters.pop(uid, None)
        return True

    def claimRecent(self, positions: Sequence[int] | None = None) -> list[int]:
        """
        Move messages from C{new/} to C{cur/}: the caller is the session
        that reports them \\Recent (RFC 3501 section 2.3.2: one session
        only).

        @return: the UIDs this caller claimed.
        """
        if positions is None:
            positions = self.positionsWith(IN_NEW)
        else:
            # Most new messages a session learns of were claimed already, by
            # the first session of this process (or of another, as the log
            # told) to see them: no lock for nothing to move.
            positions = [i for i in positions if self.flags[i] & IN_NEW]
        if not positions:
            return []
        claimed = []
        # A rename: under the UID list lock, as Dovecot moves files (see
        # setFlags).  One another process moved first is its claim.
        with self._uidListLocked():
            before, unchanged = self._ownChange()
            for i in positions:
                bits = self.flags[i]
                if bits & IN_NEW:
                    letters = self.keywordLetters.get(self.uids[i], "") if bits & HAS_KEYWORDS else ""
                    if self._rename(i, bits & ~IN_NEW, letters):
                        claimed.append(self.uids[i])
            self._ownChangeDone(before, unchanged)
        return claimed

    def expunge(self, uids: Iterable[int], origin: object | None = None) -> list[int]:
        """
        Remove messages for good.

        @return: the UIDs removed (the others were already gone).
        """
        uids = [uid for uid in uids if self.position(uid) is not None]
        before, unchanged = self._ownChange(logged=False)
        missing = self._unlink(uids)
        if missing:
            # Renamed (flags) or removed by another process: look again,
            # then remove those that are still there under their new name.
            unchanged = False
            self._mtimes = {"new": -1, "cur": -1}
            self.refresh()
            self._unlink([uid for uid in missing if self.position(uid) is not None])
        self._ownChangeDone(before, unchanged)
        gone = {uid for uid in uids if self.position(uid) is not None}
        if not gone:
            return []
        expunged, goneBases = self._forget(gone, origin)
        self.uidList.forget(goneBases)
        return expunged

    def expungeInThread(self, uids: Iterable[int], origin: object | None = None) -> "defer.Deferred[list[int]]":
        """
        As L{expunge}, but the files are removed by a worker thread: a
        removal waits for the file system's journal behind other threads'
        fsyncs (milliseconds each, measured under imaptest's stress), and
        every session of the process would wait with it.  Under the UID
        list lock this thread only moves the files out of the folder, into
        its C{tmp/} (renames, made and logged as flag changes are: see
        L{maild.store.changelog}); the removal from there holds no lock,
        so nothing else waits for it.  The index forgets the messages at
        once; the UID list forgets them, and the Deferred fires with their
        UIDs, once the files are gone.
        """
        uids = [uid for uid in uids if self.position(uid) is not None]
        if not uids:
            return defer.succeed([])
        try:
            with self._uidListLocked():
                moved = self._moveOut(uids)
        except FolderMissing:
            moved = []  # deleted meanwhile: its files went with it
        expunged, bases = self._forget({uid for uid in uids if self.position(uid) is not None}, origin)

        def removed(result):
            try:
                self.uidList.forget(bases)
            except FileNotFoundError:
                pass  # the folder was deleted meanwhile, its UID list with it
            return result

        d = threads.deferToThread(_unlinkAll, moved)
        return d.addCallback(lambda _: expunged).addBoth(removed)

    def _moveOut(self, uids: list[int]) -> list[str]:
        """
        Move the files of C{uids} into the folder's C{tmp/}, where no
        reader of the folder looks, and log it.  The caller holds the UID
        list lock.  A file another process renamed or removed since we
        looked is looked for again (from the change log, else a listing).

        @return: the paths the files now have.
        """
        before, unchanged = self._ownChange()
        moved: list[str] = []
        done: list[tuple[int, str]] = []
        missing = self._moveFiles(uids, moved, done)
        if missing:
            unchanged = False
            self.refresh()
            missing = self._moveFiles([uid for uid in missing if self.position(uid) is not None], moved, done)
        if missing:
            self._mtimes = {"new": -1, "cur": -1}
            self.refresh()
            self._moveFiles([uid for uid in missing if self.position(uid) is not None], moved, done)
        self._ownChangeDone(before, unchanged, removed=done)
        return moved

    def _moveFiles(self, uids: list[int], moved: list[str], done: list[tuple[int, str]]) -> list[int]:
        """
        Rename the files of C{uids} into C{tmp/}, adding their new paths
        to C{moved} and their UIDs and base names to C{done}.

        @return: the UIDs whose file was not where the index said.
        """
        missing = []
        tmp = self._dir + "tmp/"
        for uid in uids:
            i = self.position(uid)
            source, target = self.filePath(i), tmp + self.bases[i]
            try:
                os.rename(source, target)
            except FileNotFoundError:
                if not os.path.exists(source):
                    missing.append(uid)
                    continue
                os.makedirs(tmp, exist_ok=True)  # a folder some tool made without tmp/
                os.rename(source, target)
            moved.append(target)
            done.append((uid, self.bases[i]))
        return missing

    def _forget(self, gone: set[int], origin: object | None) -> tuple[list[int], list[str]]:
        """
        Drop the messages C{gone} from the index and tell the listeners.

        @return: their UIDs, sorted, and their base names.
        """
        expunged, goneBases = self._drop(gone)
        self._announce(FolderChange(expunged=expunged, origin=origin))
        return expunged, goneBases

    def _drop(self, gone: set[int]) -> tuple[list[int], list[str]]:
        """
        Drop the messages C{gone} from the index (and remember them gone).

        @return: their UIDs, sorted, and their base names.
        """
        keep = [j for j, uid in enumerate(self.uids) if uid not in gone]
        goneBases = [self.bases[j] for j, uid in enumerate(self.uids) if uid in gone]
        self.uids = array("I", (self.uids[j] for j in keep))
        self.flags = bytearray(self.flags[j] for j in keep)
        self.bases = [self.bases[j] for j in keep]
        for uid in gone:
            self.keywordLetters.pop(uid, None)
            self._sizes.pop(uid, None)
        self._rememberGone(gone)
        return sorted(gone), goneBases

    def _unlink(self, uids: list[int]) -> list[int]:
        """
        Remove the files of C{uids}.

        @return: the UIDs whose file was not where the index said.
        """
        missing = []
        for uid in uids:
            try:
                os.unlink(self.filePath(self.position(uid)))
            except FileNotFoundError:
                missing.append(uid)
        return missing

    def addPlaced(self, paths: Sequence[Path], origin: object | None = None) -> list[int]:
        """
        Take into the index files this process just put into the folder
        (by delivery, APPEND or COPY), numbering them in this order, so that
        nobody waits for a listing of a big folder.

        @return: their UIDs.
        @raise FolderMissing: if the folder was deleted or renamed (by
            another session) since the files were placed: they went with it.
        """
        try:
            return self._addPlaced(paths, origin)
        except FileNotFoundError:
            if not self.path.is_dir():
                self._gone()
            elif any(os.path.exists(p) for p in paths):
                raise
            # Deleted (and perhaps made again) meanwhile: the files went
            # with the folder that was.
            raise FolderMissing(str(self.path)) from None

    def _addPlaced(self, paths: Sequence[Path], origin: object | None) -> list[int]:
        state = self.uidList.refresh()
        if not self._loaded or state.uidvalidity != self.uidvalidity:
            # Not read yet, or made anew under this name since (deleted and
            # created again): what we hold of it is void.
            self.refresh()
            state = self.uidList.refresh()
        result: dict[str, int] = {}
        fresh: list[tuple[str, str | None]] = []
        for path in paths:
            base, info = maildir.splitFileName(path.name)
            uid = state.uids.get(base)
            i = self.position(uid) if uid is not None else None
            if i is not None and self.bases[i] == base:
                result[base] = uid  # a listing found it first
            elif base in self.uidList.forgotten:
                # A listing found it first, and another session or process
                # expunged it since: it had its UID, it needs no other.
                result[base] = self.uidList.forgotten[base]
            else:
                fresh.append((base, _IN_NEW_MARK + info if path.parent.name == "new" else info))
        # These files are new (their names are ours): a UID the list already
        # has for one was given by another process (Dovecot) that saw the
        # file first, and is its UID; numbering it again would give the
        # message two UIDs.
        uids = self.uidList.assign([base for base, _ in fresh])
        if uids and self._gapsBelow(self.uids[-1] if self.uids else 0, [min(uids)]):
            # Another process numbered files we have not listed below
            # these: list them first, so that sessions learn the messages
            # in UID order (one told of a higher UID would never see them).
            self._mtimes = {sub: _LIST_AGAIN for sub in self._mtimes}
            self.refresh()
        change = FolderChange(origin=origin)
        for uid, (base, info) in sorted(zip(uids, fresh)):
            bits, letters = infoBits(info)
            result[base] = uid
            i = bisect.bisect_left(self.uids, uid)
            if i < len(self.uids) and self.uids[i] == uid:
                continue  # taken in meanwhile by a listing
            self.uids.insert(i, uid)
            self.flags.insert(i, bits)
            self.bases.insert(i, base)
            if letters:
                self.keywordLetters[uid] = letters
            change.added.append(uid)
        self._announce(change)
        return [result[maildir.splitFileName(p.name)[0]] for p in paths]


    # Adding messages and watching: through the store --------------------

    def append(
        self,
        message,
        bits: int = 0,
        keywords: Sequence[str] = (),
        internalDate: float | None = None,
        origin: object | None = None,
    ):
        """
        Store C{message} (a L{maild.store.IncomingMessage}) here durably,
        with flags and keywords, and its INTERNALDATE set before the file is
        visible to anyone.

        @return: a Deferred firing with C{(UIDVALIDITY, UID)} of the new
            message, or failing with L{maild.store.DeliveryFailed} (then
            nothing is stored; C{noFolder} when the folder was deleted
            meanwhile).
        @raise maild.store.keywords.TooManyKeywords: if no letter is left
            for a keyword (nothing is stored).
        @raise ValueError: for a date the store cannot keep.
        """
        from maild.store.delivery import Target, storageFailure

        if internalDate is not None and not MIN_INTERNALDATE <= internalDate <= MAX_INTERNALDATE:
            raise ValueError(f"INTERNALDATE out of range: {internalDate!r}")
        try:
            letters = self.keywords.letters(list(keywords)) if keywords else ""
        except FileNotFoundError:
            # Deleted since it was looked up: nothing to name keywords in.
            return defer.fail(storageFailure(FolderMissing(str(self.path))))
        bits &= SETTABLE
        info = maildir.infoString(bits, letters) if (bits or letters) else None
        message.internalDate = internalDate
        target = Target(self.path, info, create=self.name == maildir.INBOX)
        d = self.store.place(message, [target], origin=origin)

        def placed(paths):
            try:
                uids = self.addPlaced(paths, origin=origin)
            except FolderMissing as e:
                raise storageFailure(e)
            return self.uidvalidity, uids[0]

        return d.addCallback(placed)

    def copyTo(self, indexes: Sequence[int], destination: "Folder", origin: object | None = None):
        """
        Copy messages (by index) into C{destination}, with their flags,
        keywords and INTERNALDATE.

        @return: a Deferred firing with C{(UIDVALIDITY of the destination,
            [(source UID, destination UID), ...])}.
        """
        d = self.store.copy(self, indexes, destination, origin=origin)
        return d.addCallback(lambda pairs: (destination.uidvalidity, pairs))

    def watch(self) -> None:
        """
        Notice other programs' changes at once (while a session waits in
        IDLE), until L{unwatch}.
        """
        self.store.watcher.watch(self)

    def unwatch(self) -> None:
        self.store.watcher.unwatch(self)


# IMAP's date-time has four digits of year: from year 1 to the last second
# of 9999.  (A file system may keep less: ext4 clamps to 1901-2446.)
MIN_INTERNALDATE = -62135596800
MAX_INTERNALDATE = 253402300799


@functools.lru_cache(maxsize=4096)
def infoBits(info: str) -> tuple[int, str]:
    """
    The flag byte and keyword letters of a listed file's info (marked
    with L{_IN_NEW_MARK} when the file is in C{new/}: then \\Recent).
    """
    bits, letters = maildir.flagBits(info)
    if info.startswith(_IN_NEW_MARK):
        bits |= IN_NEW
    return bits, letters


# A directory time this close to now may be shared by a change still to come
# (file systems keep times in ticks, NFS servers with their own clock), so
# it proves nothing yet: the directory is listed once more when its time has
# settled (Folder._trust), changed or not.  Dovecot's Maildir code waits the
# same second (MAILDIR_SYNC_SECS) before it trusts a directory's time, which
# is what lets both servers share a folder.  (Listing at every refresh until
# then, as maild did, cost 1.4 listings of new/ and cur/ per IMAP command on
# a busy INBOX, whose times never settle.)
UNSETTLED_NS = 1_000_000_000
_LIST_AGAIN = -3
# List again, unless the change log explains every change since
# Folder._followFrom.
_FOLLOW_LOG = -4

# What stat says of a directory: (st_mtime_ns, st_size, st_ino), or
# _MISSING.  A modification time alone can stay put across a change: file
# systems keep times in ticks, and an NFS client caches attributes (actimeo)
# and may be handed a server's time that does not move within its second.
# The size moves when files are added or removed (with every one on tmpfs
# and btrfs, when the directory grows a block on ext4; over NFS, as the
# exported file system counts), and the inode when a directory is replaced
# by another (a folder deleted and made again).  No stamp can see through an
# attribute cache that has not expired: that is what the mount options in
# the README bound.
Stamp = tuple[int, int, int] | int


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _MISSING
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _merged(first: FolderChange, second: FolderChange) -> FolderChange:
    """
    Two changes found one after the other, as one (each was announced).
    """
    return FolderChange(
        added=first.added + second.added,
        expunged=first.expunged + second.expunged,
        flagged=first.flagged + second.flagged,
        reset=first.reset or second.reset,
        gone=first.gone or second.gone,
    )


def _holds(uids: array, uid: int) -> bool:
    i = bisect.bisect_left(uids, uid)
    return i < len(uids) and uids[i] == uid


@functools.lru_cache(maxsize=16)
def bitTable(bit: int, wanted: bool = True) -> bytes:
    """
    A C{bytes.translate} table that turns flag bytes into 1 where C{bit}
    is set (or clear, when not C{wanted}) and 0 elsewhere: counting and
    finding then run at C speed over 100,000 messages.
    """
    return bytes(1 if bool(b & bit) == wanted else 0 for b in range(256))


def _deliveryOrder(base: str) -> tuple[int, int, str]:
    """
    Sort key from a Maildir base name: seconds, microseconds, then the name.
    """
    sec, _, rest = base.partition(".")
    usec = 0
    if rest.startswith("M"):
        digits = rest[1:].split("P", 1)[0]
        usec = int(digits) if digits.isdigit() else 0
    return (int(sec) if sec.isdigit() else 0, usec, base)


def _unlinkAll(paths: list[str]) -> None:
    """
    In a worker thread: remove the files C{paths}.
    """
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
