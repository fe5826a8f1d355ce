"""
Locks that hold between processes (and over NFS, through lockd): POSIX
record locks on a lock file beside the data they protect.  The kernel
drops them when their holder dies, so a crash never leaves a folder locked.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """
    Hold an exclusive lock on C{path} (created if missing) for the
    duration of the block.  Blocks until the lock is free.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
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
