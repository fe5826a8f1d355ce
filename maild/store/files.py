"""
Small files the store rewrites whole (the UID list, keywords,
subscriptions, the users file): each is replaced by one helper, so that a
crash or a full disk leaves either the old file or the new one, never a
truncated one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsyncDirectory(path: Path) -> None:
    """
    Make the names in directory C{path} durable (a rename into it, say).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replaceFile(
    path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> os.stat_result:
    """
    Replace C{path} with C{data}: write a temporary file beside it, sync
    it, rename it over C{path}, and sync the directory.  The caller holds
    the lock that keeps other writers of C{path} out (the temporary file's
    name is fixed, so that a crash leaves one, not one per process).

    @param owner: the user and group the new file gets, with exactly
        C{mode}, before it takes the old one's place: the owner only when
        running as root, the group when allowed.

    @return: the new file's status (its inode and time tell readers that
        it changed).
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        if owner is not None:
            try:
                os.fchown(fd, owner[0] if os.geteuid() == 0 else -1, owner[1])
            except PermissionError:
                pass  # not root, nor in the file's group: it gets ours
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        _unlinkQuietly(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlinkQuietly(tmp)
        raise
    fsyncDirectory(path.parent)
    return st


@contextmanager
def folderMustExist(folder: Path) -> Iterator[None]:
    """
    Within the block, a file that cannot be found because C{folder} itself
    was deleted or renamed meanwhile (by another process) is reported as
    L{maild.store.delivery.FolderMissing}, which the protocols answer as
    a missing folder; any other is left as it is.
    """
    from maild.store.delivery import FolderMissing

    try:
        yield
    except FileNotFoundError as e:
        if isinstance(e, FolderMissing) or folder.is_dir():
            raise
        raise FolderMissing(str(folder)) from e


def _unlinkQuietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
