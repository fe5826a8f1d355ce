"""
A folder's change log, C{maild-changes}: how maild processes sharing a
folder (workers, nodes) learn each other's flag changes, moves out of
C{new/} and expunges without listing the folder again.

Each process that renames or removes message files does so holding the
folder's UID list lock (C{dovecot-uidlist.lock}), and before letting go
appends one line saying what C{stat} said of C{new/} and C{cur/} before and
after, and what it did::

    1 <uidvalidity> <new before> <cur before> <new after> <cur after>\\t<op>\\t<op>...

where a stamp is C{mtime_ns.size.inode} and an op is C{f<uid>/<base>/<info>}
(the file is now C{cur/<base>:2,<info>}) or C{x<uid>/<base>} (removed).
Another process whose view was taken at the stamps a line starts from
takes that line's changes as its own and moves on to its end stamps; when
the lines lead to the stamps the directories have now, it has learnt every
change without a listing (Dovecot's processes share a transaction log the
same way, and list a Maildir only when its directories' times say that
something they did not log happened).  Any writer that does not log
(Dovecot, a Maildir tool, a delivery into C{new/}) leaves stamps no line
explains, and the folder is listed as before; a change made within the
clock tick of a logged one is found by the listing a folder owes once a
recent time has settled (L{maild.store.folder.UNSETTLED_NS}), as for a
process's own changes.

Nothing here must survive a crash: a process that starts lists its
folders, and a line lost or torn only means a listing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "maild-changes"
_VERSION = "1"
# Past this size the next writer starts a new file (the old one stays
# readable by whoever holds it open until they have read its end).
ROTATE_AT = 1 << 20


@dataclass(frozen=True)
class LoggedChange:
    """
    One line of the log: the directories' stamps before and after a
    change, by C{new} and C{cur}, the folder's UIDVALIDITY and the ops.
    """

    uidvalidity: int
    before: dict
    after: dict
    ops: list


def _formatStamp(stamp) -> str:
    return "%d.%d.%d" % stamp


def _parseStamp(text: str) -> tuple[int, int, int]:
    mtime, size, inode = text.split(".")
    return (int(mtime), int(size), int(inode))


def formatOps(flagged, removed) -> list[str] | None:
    """
    The ops of a line: C{flagged} as (UID, base, info) and C{removed} as
    (UID, base).  None when a name cannot be written on one line (a
    Maildir tool may use any name): that change is then not logged, and
    the others list the folder.
    """
    ops = [f"f{uid}/{base}/{info}" for uid, base, info in flagged]
    ops += [f"x{uid}/{base}" for uid, base in removed]
    if any("\t" in op or "\n" in op for op in ops):
        return None
    return ops


def _parseLine(line: str) -> LoggedChange | None:
    head, *ops = line.split("\t")
    fields = head.split(" ")
    if len(fields) != 6 or fields[0] != _VERSION:
        return None
    try:
        stamps = [_parseStamp(f) for f in fields[2:]]
        uidvalidity = int(fields[1])
    except ValueError:
        return None
    parsed = []
    for op in ops:
        kind, rest = op[:1], op[1:]
        if kind == "f":
            uid, sep1, tail = rest.partition("/")
            base, sep2, info = tail.partition("/")
            if not (sep1 and sep2 and uid.isdigit() and base):
                return None
            parsed.append(("f", int(uid), base, info))
        elif kind == "x":
            uid, sep, base = rest.partition("/")
            if not (sep and uid.isdigit() and base):
                return None
            parsed.append(("x", int(uid), base, None))
        else:
            return None
    return LoggedChange(
        uidvalidity,
        {"new": stamps[0], "cur": stamps[1]},
        {"new": stamps[2], "cur": stamps[3]},
        parsed,
    )


class ChangeLog:
    """
    One folder's change log, as this process writes and reads it.

    Reading is done by the reactor thread only; writing by whoever holds
    the folder's UID list lock (which keeps this process's threads, and
    every other process, from writing at the same time).
    """

    def __init__(self, folderPath: Path) -> None:
        self.path = os.fspath(folderPath / FILE_NAME)
        # The file being read (its descriptor and inode) and how far.
        self._fd: int | None = None
        self._inode = 0
        self.offset = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    # Writing (under the UID list lock) -----------------------------------

    def append(self, uidvalidity: int, before: dict, after: dict, ops: list[str]) -> tuple[int, int, int] | None:
        """
        Write one line.  The caller holds the UID list lock, and made the
        change C{ops} describe between the C{before} and C{after} stamps.

        @return: the file's inode and where the line starts and ends in
            it, or None if nothing was written.
        """
        stamps = (before["new"], before["cur"], after["new"], after["cur"])
        if not all(isinstance(s, tuple) for s in stamps):
            return None
        line = " ".join([_VERSION, str(uidvalidity), *map(_formatStamp, stamps)])
        data = "\t".join([line, *ops]).encode("utf-8", "surrogateescape") + b"\n"
        # Opened for each line: over NFS, an open is what fetches the size
        # other nodes left it at (close-to-open consistency).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_size >= ROTATE_AT:
                os.close(fd)
                fd = self._startAnew()
                st = os.fstat(fd)
            written = os.write(fd, data)
            if written != len(data):
                # A torn line (disk full) is skipped by readers, who list.
                return None
            return st.st_ino, st.st_size, st.st_size + written
        finally:
            os.close(fd)

    def _startAnew(self) -> int:
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.replace(tmp, self.path)
        return fd

    # Reading ---------------------------------------------------------------

    def _forgetFile(self) -> None:
        # No file: nothing read, nothing to read from.
        self.close()
        self._inode = 0
        self.offset = 0

    def _open(self) -> os.stat_result | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forgetFile()
            return None
        self.close()
        self._fd = fd
        st = os.fstat(fd)
        self._inode = st.st_ino
        self.offset = 0
        return st

    def skipToEnd(self) -> None:
        """
        Take every line written so far as known (before a listing: what
        it finds includes them).
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._forgetFile()
            return
        if st.st_ino != self._inode or self._fd is None:
            st = self._open() or st
        self.offset = st.st_size

    def skipOwn(self, written: tuple[int, int, int] | None) -> None:
        """
        Our own line, just C{written} (L{append}'s answer), is known: when
        it is the next to read, read past it.
        """
        if written is not None and written[0] == self._inode and written[1] == self.offset:
            self.offset = written[2]

    def tell(self) -> tuple[int, int]:
        """
        Where reading stands, for L{rewind}.
        """
        return self._inode, self.offset

    def rewind(self, mark: tuple[int, int]) -> None:
        """
        Read again from C{mark} (L{tell}'s answer) next time, unless the
        file was replaced since.
        """
        if mark[0] == self._inode:
            self.offset = mark[1]

    def unread(self) -> list[LoggedChange | None] | None:
        """
        The lines written since the last read (None for one that makes no
        sense), in order.  None: lines may have been missed (the file was
        replaced more than once, or removed), so they prove nothing.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None if self._inode else []
        lines: list[bytes] = []
        if st.st_ino != self._inode:
            if self._fd is not None:
                # Replaced by a writer: the rest of the old file first.
                lines += self._read(self._fd, os.fstat(self._fd).st_size)
            elif self._inode:
                return None
            fresh = self._open()
            if fresh is None or fresh.st_ino != st.st_ino:
                return None  # replaced again meanwhile, or removed
            st = fresh
        lines += self._read(self._fd, st.st_size)
        return [_parseLine(line.decode("utf-8", "surrogateescape")) for line in lines]

    def _read(self, fd: int, size: int) -> list[bytes]:
        if size <= self.offset:
            return []
        data = os.pread(fd, size - self.offset, self.offset)
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.splitlines()
