"""
Locks that hold between processes.

L{dotLocked} guards the files maild shares with Dovecot
(C{dovecot-uidlist}, C{dovecot-keywords}): a POSIX record lock that maild
processes and nodes meet in, then Dovecot's own dot-lock, so that both
servers may serve one Maildir at the same time.  L{locked} is a POSIX record lock
on a lock file, for maild's own files (the users file); the kernel drops it
when its holder dies.  L{tryLockOpenFile} locks one open file for as long
as it stays open (the outbound queue's claim on a message).
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


class _Held:
    """
    This process's hold on one lock file.

    @ivar token: what took the lock gave back (the locked descriptor, or
        the record lock file and the dot-lock file's inode), for giving it
        back.
    """

    def __init__(self) -> None:
        self.threadLock = threading.RLock()
        self.token: object = None
        self.depth = 0


_held: dict[str, _Held] = {}
_heldGuard = threading.Lock()


@contextmanager
def _heldOnce(
    table: dict[str, _Held], key: str, acquire: Callable[[], object], release: Callable[[object], None]
) -> Iterator[None]:
    """
    Hold the lock C{key} of C{table} for the block, taking it with
    C{acquire} only for the outermost hold of this process and giving it
    back with C{release} (passed what C{acquire} returned) when that hold
    ends; this process's threads take turns on it.
    """
    with _heldGuard:
        held = table.setdefault(key, _Held())
    with held.threadLock:
        if held.depth == 0:
            held.token = acquire()
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                token, held.token = held.token, None
                release(token)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """
    Hold an exclusive lock on C{path} (created if missing) for the
    duration of the block.  Blocks until the lock is free.

    The lock may be taken again inside the block.  POSIX locks belong to
    the process and closing any descriptor of the file drops them all, so
    a nested hold must reuse the first one's descriptor rather than open
    the file again (which would release the outer lock when it ends); and
    they do not keep this process's threads apart, which a thread lock
    does.
    """
    key = os.fspath(path)

    def acquire() -> int:
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    with _heldOnce(_held, key, acquire, os.close):
        yield


class ExclusiveHold:
    """
    A lock taken without waiting and held until L{release}: the POP3
    maildrop lock (RFC 1939 section 8) is one.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def tryAcquire(cls, path: Path) -> "ExclusiveHold | None":
        """
        Take the lock on C{path}, or return None if another session or
        process holds it.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # fcntl locks belong to the process, so a second session of this
            # same process would be granted the lock again: flock() locks
            # belong to the open file and do conflict within a process.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def tryLockOpenFile(fd: int) -> bool:
    """
    Lock the whole file open as C{fd} (opened for writing) without
    waiting, until C{fd} is closed.

    The lock is an open file description lock (C{F_OFD_SETLK}, Linux 3.15
    and later): a POSIX record lock, which NFSv4, CephFS and GlusterFS pass
    on to the other nodes, but one that belongs to this open file rather
    than to the process.  So another open of the same file in this process
    conflicts with it too, closing another descriptor of the file (reading
    it with C{Path.read_bytes}, say) does not drop it, and the kernel drops
    it when C{fd} is closed or the process dies.  Where there are no OFD
    locks, C{flock} (which Linux also passes to NFS, unless it is mounted
    with C{local_lock=flock} or C{all}).

    @return: whether the lock was taken (False: someone else holds it).
    """
    return _tryWholeFileLock(fd, fcntl.flock)


# struct flock: l_type, l_whence, l_start, l_len (0: to the end, whatever
# it grows to), l_pid (0, as OFD locks require).
_FLOCK = "hhqqi4x"


def _setOpenFileLock(fd: int, lockType: int) -> None:
    """
    Set (C{F_WRLCK}) or clear (C{F_UNLCK}) an open file description lock
    on the whole file, without waiting.
    """
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, lockType, os.SEEK_SET, 0, 0, 0))


def _tryWholeFileLock(fd: int, fallback: Callable[[int, int], None]) -> bool:
    """
    Lock the whole file open as C{fd} without waiting: an open file
    description lock where there are (Linux 3.15 and later), else
    C{fallback} (C{fcntl.flock} or C{fcntl.lockf}).

    @return: whether the lock was taken (False: someone else holds it).
    """
    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            _setOpenFileLock(fd, fcntl.F_WRLCK)
        else:
            fallback(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


# Dovecot's dot-lock -----------------------------------------------------------
#
# The protocol of Dovecot's lib/file-dotlock.c, as its Maildir storage uses
# it (dotlock_use_excl = yes, its default): the lock on FILE is the file
# FILE.lock, created with O_EXCL and holding "<pid>:<hostname>"; removing it
# releases the lock.  A waiter overrides a lock whose holder is a process of
# this host that no longer exists (once the lock is 2 seconds old), or a
# lock that neither it nor the file it protects changed for the stale
# timeout (2 minutes for dovecot-uidlist and dovecot-keywords).

DOTLOCK_SUFFIX = ".lock"
# Dovecot reads the holder's pid only from a lock at least this old.
_PID_CHECK_AGE = 2.0


class LockTimeout(OSError):
    """
    A dot-lock stayed held, and fresh, for longer than the timeout.
    """


@dataclass(frozen=True)
class DotLockSettings:
    """
    @ivar staleAfter: seconds without a change to the lock or the file it
        protects after which the lock is taken over.
    @ivar timeout: seconds to wait at most.
    @ivar firstWait: the first pause between two tries, in seconds; it
        grows by half each time up to C{maxWait}.
    @ivar sleep: waits (a parameter, so that tests do not sleep).
    @ivar clock: the current time, in seconds since the epoch.
    """

    staleAfter: float = 120.0
    timeout: float = 122.0
    # Short: the reactor waits, and the other holder (a second worker, a
    # node, Dovecot) keeps the lock only for a rename or a short write.
    # From 2 ms up to 200 ms, two workers on one busy folder served 1.06
    # times one worker's IMAP commands; from 0.2 ms up to 20 ms, 1.33 times.
    firstWait: float = 0.0002
    maxWait: float = 0.02
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    clock: Callable[[], float] = field(default=time.time, compare=False)


# What Dovecot's maildir storage uses for dovecot-uidlist and
# dovecot-keywords (MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT, KEYWORDS_LOCK_STALE_TIMEOUT).
DOVECOT_MAILDIR = DotLockSettings()

_dotHeld: dict[str, _Held] = {}


@contextmanager
def dotLocked(path: Path, settings: DotLockSettings = DOVECOT_MAILDIR) -> Iterator[None]:
    """
    Hold the lock on C{path} for the duration of the block: first maild's
    record lock on the file L{recordLockPath} names, then Dovecot's
    dot-lock (the file C{path.lock}), waiting while another process holds
    either.  Taken again inside the block by this process, it is held
    once: both are given back when the outermost block ends.

    maild processes and nodes meet in the record lock, an C{fcntl} lock:
    NFSv4, CephFS and GlusterFS pass it to every node, and the kernel (or
    the file server, for a node that is gone) drops the lock of a process
    that dies, at once, where a dead holder's dot-lock is overridden only
    after its age and pid are checked (2 seconds), or its stale time (2
    minutes) for another host's.  Holding it, a maild process finds the
    dot-lock free unless Dovecot holds it.

    @raise LockTimeout: when a lock stays held, and not stale, longer
        than C{settings.timeout}.
    """
    lockPath = os.fspath(path) + DOTLOCK_SUFFIX
    recordPath = recordLockPath(os.fspath(path))

    def acquire() -> tuple[_RecordFile, int]:
        deadline = settings.clock() + settings.timeout
        # The holder file is written before the record lock is taken: the
        # other maild processes wait only for the link.
        own, inode = _writeHolder(lockPath)
        try:
            record = _takeRecordLock(recordPath, settings, deadline, _recordFiles.checkout(recordPath))
            try:
                _linkDotLock(own, lockPath, os.fspath(path), settings, deadline)
            except BaseException:
                _recordFiles.checkin(record)
                raise
        finally:
            _unlinkQuietly(own)
        return record, inode

    def release(token: tuple[_RecordFile, int]) -> None:
        record, inode = token
        try:
            _removeDotLock(lockPath, inode)
        finally:
            _recordFiles.checkin(record)

    with _heldOnce(_dotHeld, lockPath, acquire, release):
        yield


def recordLockPath(path: str) -> str:
    """
    The maild-only file whose record lock guards C{path}:
    C{maild-uidlist.lock} beside C{dovecot-uidlist}.
    """
    directory, name = os.path.split(path)
    return os.path.join(directory, "maild-" + name.removeprefix("dovecot-") + DOTLOCK_SUFFIX)


@dataclass
class _RecordFile:
    """
    A record lock file kept open: its path, descriptor and identity.
    """

    path: str
    fd: int
    identity: tuple[int, int]


class _OpenRecordFiles:
    """
    The record lock files of the folders used last, kept open and
    unlocked between holds: opening and closing one at every hold cost
    more than the lock itself.  A file is taken out while it is held, so
    only files nobody holds are ever closed to make room.
    """

    def __init__(self, kept: int = 64) -> None:
        self.kept = kept
        self._files: dict[str, _RecordFile] = {}
        self._guard = threading.Lock()

    def checkout(self, path: str) -> "_RecordFile | None":
        with self._guard:
            return self._files.pop(path, None)

    def checkin(self, record: _RecordFile) -> None:
        """
        Unlock C{record} and keep it open for the next hold (closing the
        least recently used file past C{kept}).
        """
        try:
            _unlockRecord(record.fd)
        except OSError:
            os.close(record.fd)
            return
        with self._guard:
            previous = self._files.pop(record.path, None)
            self._files[record.path] = record
            evicted = [previous] if previous is not None else []
            while len(self._files) > self.kept:
                evicted.append(self._files.pop(next(iter(self._files))))
        for old in evicted:
            os.close(old.fd)


_recordFiles = _OpenRecordFiles()


def _tryRecordLock(fd: int) -> bool:
    """
    Lock the whole file open as C{fd} without waiting: an open file
    description lock where there are (Linux), which belongs to this open
    file, so this process's other descriptors of it neither share nor drop
    it; a process-wide C{lockf} lock elsewhere.

    @return: whether the lock was taken.
    """
    return _tryWholeFileLock(fd, fcntl.lockf)


def _unlockRecord(fd: int) -> None:
    if hasattr(fcntl, "F_OFD_SETLK"):
        _setOpenFileLock(fd, fcntl.F_UNLCK)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _takeRecordLock(
    path: str, settings: DotLockSettings, deadline: float, record: "_RecordFile | None" = None
) -> _RecordFile:
    """
    Take the record lock on C{path} (created if missing; C{record}: the
    file as this process last had it open), trying again on the dot-lock's
    schedule until C{deadline}.  A blocking wait (F_SETLKW) would wake at
    the release, but over NFSv4.0 the client only polls a blocked lock,
    backing off up to 30 seconds, and a stopped holder would stop the
    waiting reactor for good.

    @return: the locked file (unlocking or closing it releases the lock).
    @raise LockTimeout: past C{deadline}.
    """
    wait = settings.firstWait
    while True:
        if record is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            record = _RecordFile(path, fd, (st.st_ino, st.st_dev))
        try:
            while not _tryRecordLock(record.fd):
                if settings.clock() >= deadline:
                    raise LockTimeout(errno.EAGAIN, "lock held too long", path)
                settings.sleep(wait * (1 + random.random()))
                wait = min(wait * 1.5, settings.maxWait)
            try:
                named = os.stat(path)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(record.fd)
            raise
        if named is not None and (named.st_ino, named.st_dev) == record.identity:
            return record
        # Removed (or replaced, the folder deleted and made again) since we
        # opened it: a lock on a file no longer at that name keeps nobody out.
        os.close(record.fd)
        record = None


def _writeHolder(lockPath: str) -> tuple[str, int]:
    """
    Write a file naming this process as the lock's holder, to be linked to
    the lock's name: the lock then appears with its holder already written
    in it (Dovecot's try_create_lock_hardlink; link() fails when the name
    exists, on NFS too).  Created empty and then written, a lock whose
    holder was killed in between named nobody, and others could only wait
    it out for the stale time, two minutes of a blocked reactor.

    @return: the file's path and inode.
    """
    own = f"{lockPath}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, _holderId())
        return own, os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _linkDotLock(own: str, lockPath: str, path: str, settings: DotLockSettings, deadline: float) -> None:
    """
    Link the holder file C{own} to the lock's name, waiting for (or
    overriding) another holder until C{deadline}.
    """
    wait = settings.firstWait
    watch = _StaleWatch(lockPath, path, settings)
    while True:
        try:
            os.link(own, lockPath)
        except FileExistsError:
            pass
        else:
            return
        if watch.overrideIfStale():
            continue
        if settings.clock() >= deadline:
            raise LockTimeout(errno.EAGAIN, "lock held too long", lockPath)
        settings.sleep(wait * (1 + random.random()))
        wait = min(wait * 1.5, settings.maxWait)


def _unlinkQuietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _removeDotLock(lockPath: str, inode: int | None) -> None:
    try:
        if os.lstat(lockPath).st_ino != inode:
            # Someone took it over as stale: theirs now, leave it.
            return
        os.unlink(lockPath)
    except FileNotFoundError:
        pass


def _holderId() -> bytes:
    return f"{os.getpid()}:{socket.gethostname()}".encode()


class _StaleWatch:
    """
    What a waiter saw of a lock held by someone else, to tell when it is
    stale (Dovecot's check_lock()).
    """

    def __init__(self, lockPath: str, path: str, settings: DotLockSettings) -> None:
        self.lockPath = lockPath
        self.path = path
        self.settings = settings
        self.seen: tuple | None = None
        self.fileSeen: tuple | None = None
        self.lastChange = 0.0

    def _changed(self, st: os.stat_result, previous: tuple | None, now: float) -> tuple:
        state = (st.st_ino, st.st_dev, st.st_size, st.st_mtime, st.st_ctime)
        if state != previous:
            if previous is None:
                # First look: the lock's (or file's) own time of change.
                changed = min(max(st.st_mtime, st.st_ctime), now)
            else:
                changed = now
            self.lastChange = max(self.lastChange, changed)
        return state

    def overrideIfStale(self) -> bool:
        """
        Remove the lock file if its holder is gone or it went stale.

        @return: whether to try to create the lock again at once.
        """
        now = self.settings.clock()
        try:
            st = os.lstat(self.lockPath)
        except FileNotFoundError:
            return True
        self.seen = self._changed(st, self.seen, now)
        if st.st_mtime < now - _PID_CHECK_AGE and _holderGone(self.lockPath):
            return self._override(st)
        if now > self.lastChange + self.settings.staleAfter:
            try:
                self.fileSeen = self._changed(os.stat(self.path), self.fileSeen, now)
            except FileNotFoundError:
                pass
            if now > self.lastChange + self.settings.staleAfter:
                return self._override(st)
        return False

    def _override(self, st: os.stat_result) -> bool:
        try:
            if os.lstat(self.lockPath).st_ino == st.st_ino:
                os.unlink(self.lockPath)
        except FileNotFoundError:
            pass
        self.seen = None
        return True


def _holderGone(lockPath: str) -> bool:
    """
    Whether the lock names a process of this host that no longer exists.
    """
    try:
        with open(lockPath, "rb") as f:
            content = f.read(512).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return False
    pid, sep, host = content.partition(":")
    if not sep or host != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return False
    if int(pid) == os.getpid():
        # A lock of ours that no hold of ours knows: left by a process of
        # ours that had our pid before (Dovecot overrides it too).
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
