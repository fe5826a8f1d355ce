"""
Locks that hold between processes (and over NFS, through lockd): POSIX
record locks on a lock file beside the data they protect.  The kernel
drops them when their holder dies, so a crash never leaves a folder locked.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class _Held:
    """
    This process's hold on one lock file.
    """

    def __init__(self) -> None:
        self.threadLock = threading.RLock()
        self.fd: int | None = None
        self.depth = 0


_held: dict[str, _Held] = {}
_heldGuard = threading.Lock()


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
    with _heldGuard:
        held = _held.setdefault(key, _Held())
    with held.threadLock:
        if held.depth == 0:
            fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                fd, held.fd = held.fd, None
                os.close(fd)


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
