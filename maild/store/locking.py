"""
Locks that hold between processes.

L{dotLocked} is Dovecot's own dot-lock, taken on the files maild shares
with Dovecot (C{dovecot-uidlist}, C{dovecot-keywords}): both servers may
then serve one Maildir at the same time.  L{locked} is a POSIX record lock
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
        the dot-lock file's inode), for giving it back.
    """

    def __init__(self) -> None:
        self.threadLock = threading.RLock()
        self.token: int | None = None
        self.depth = 0


_held: dict[str, _Held] = {}
_heldGuard = threading.Lock()


@contextmanager
def _heldOnce(
    table: dict[str, _Held], key: str, acquire: Callable[[], int], release: Callable[[int], None]
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
    command = getattr(fcntl, "F_OFD_SETLK", None)
    try:
        if command is None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            # struct flock: l_type, l_whence, l_start, l_len (0: to the
            # end, whatever it grows to), l_pid (0, as OFD locks require).
            fcntl.fcntl(fd, command, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
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
    Hold Dovecot's dot-lock on C{path} (the file C{path.lock}) for the
    duration of the block, waiting while another process (Dovecot, or
    another maild) holds it.  Taken again inside the block by this
    process, it is held once: the lock file is removed when the outermost
    block ends.

    @raise LockTimeout: when the lock stays held, and not stale, longer
        than C{settings.timeout}.
    """
    lockPath = os.fspath(path) + DOTLOCK_SUFFIX
    with _heldOnce(
        _dotHeld,
        lockPath,
        lambda: _createDotLock(lockPath, os.fspath(path), settings),
        lambda inode: _removeDotLock(lockPath, inode),
    ):
        yield


def _createDotLock(lockPath: str, path: str, settings: DotLockSettings) -> int:
    """
    Create the lock file, waiting for (or overriding) another holder.

    The lock appears with its holder already written in it: a file of
    ours is written first and linked to the lock's name (Dovecot's
    try_create_lock_hardlink; link() fails when the name exists, on NFS
    too).  Created empty and then written, a lock whose holder was killed
    in between named nobody, and others could only wait it out for the
    stale time, two minutes of a blocked reactor.

    @return: the lock file's inode, to check at release that it is still
        ours.
    """
    deadline = settings.clock() + settings.timeout
    wait = settings.firstWait
    watch = _StaleWatch(lockPath, path, settings)
    holder = _holderId()
    own = f"{lockPath}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, holder)
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    try:
        while True:
            try:
                os.link(own, lockPath)
            except FileExistsError:
                pass
            else:
                return inode
            if watch.overrideIfStale():
                continue
            if settings.clock() >= deadline:
                raise LockTimeout(errno.EAGAIN, "lock held too long", lockPath)
            settings.sleep(wait * (1 + random.random()))
            wait = min(wait * 1.5, settings.maxWait)
    finally:
        try:
            os.unlink(own)
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
