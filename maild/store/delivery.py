"""
Durable delivery: a message is streamed into a spool file as it arrives,
and a L{Committer} makes it durable in every recipient's C{new/} before
anyone is told it was accepted.

The committer groups work: it takes every message waiting, syncs their
files, links each into its recipients' C{new/} folders, syncs each of
those folders once, and only then fires all their Deferreds.  The syncs run
in worker threads, so a slow disk never stalls the reactor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from maild import metrics
from maild.store.files import fsyncDirectory
from maild.store.maildir import newBaseName

log = Logger()


class DeliveryFailed(Exception):
    """
    The message could not be stored; C{temporary} says whether trying
    again later may work (disk full) or not.
    """

    def __init__(self, reason: str, temporary: bool = True, noSpace: bool = False, noFolder: bool = False):
        super().__init__(reason)
        self.temporary = temporary
        self.noSpace = noSpace
        self.noFolder = noFolder


def storageFailure(e: OSError) -> DeliveryFailed:
    if isinstance(e, FolderMissing):
        return DeliveryFailed("the folder does not exist", temporary=False, noFolder=True)
    noSpace = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return DeliveryFailed(f"storage error: {e.strerror}", noSpace=noSpace)


class FolderMissing(FileNotFoundError):
    """
    A folder was deleted or renamed (by another session or process) while
    it was being written: the operation cannot be done under that name.
    """


class Spool:
    """
    The folder where messages are received.

    Creating, writing or removing a file can wait for the file system's
    journal, which the committer's syncs keep busy: the reactor thread
    never does any of it.  Small messages stay in memory until they are
    committed; larger ones are written out in pieces by worker threads.
    """

    def __init__(self, path: Path, reactor) -> None:
        self.path = path
        self.reactor = reactor

    def create(self) -> tuple[Path, Any]:
        """
        A new spool file (path and unbuffered binary file).  Blocking: call
        it from a worker thread.
        """
        path = self.path / newBaseName()
        try:
            return path, open(path, "xb", buffering=0)
        except FileNotFoundError:
            self.path.mkdir(parents=True, exist_ok=True)
            return path, open(path, "xb", buffering=0)

    def inThread(self, f, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)


class IncomingMessage:
    """
    A message being received.  Data is given with CRLF line endings and
    stored with LF; up to L{SPILL} octets are kept in memory, and more is
    written to a spool file by worker threads, one piece after another, so
    a big message never sits whole in memory.

    @ivar size: octets on disk so far.
    @ivar crlfSize: octets the message has when served with CRLF endings.
    @ivar path: the spool file, once there is one.
    @ivar internalDate: when the message is said to have arrived (seconds
        since the epoch; None for now): the file's modification time,
        set before the file is placed anywhere (IMAP APPEND's date).
    """

    SPILL = 128 * 1024

    def __init__(self, spool: Spool, head: bytes = b"") -> None:
        self.spool = spool
        self.path: Path | None = None
        self._file = None
        self.size = 0
        self.crlfSize = 0
        self.error: DeliveryFailed | None = None
        self.internalDate: float | None = None
        self._pendingCR = False
        self._pieces: list[bytes] = []
        self._buffered = 0
        # Spills run one after another, in this chain.
        self._spilled = defer.succeed(None)
        self._gone = False
        # Whether any piece went (or is going) to the spool file.
        self._spilling = False
        if head:
            self.write(head)

    def write(self, data: bytes) -> None:
        """
        Append C{data}; an error is remembered and reported by L{close}.
        """
        if self.error is not None or self._gone or not data:
            return
        if self._pendingCR:
            data = b"\r" + data
            self._pendingCR = False
        if data.endswith(b"\r"):
            # Its LF may come with the next piece.
            data = data[:-1]
            self._pendingCR = True
        self._keep(data.replace(b"\r\n", b"\n"))

    def _keep(self, stored: bytes) -> None:
        self._pieces.append(stored)
        self._buffered += len(stored)
        self.size += len(stored)
        self.crlfSize += len(stored) + stored.count(b"\n")
        if self._buffered >= self.SPILL:
            pieces, self._pieces, self._buffered = self._pieces, [], 0
            self._spilling = True
            self._spilled.addCallback(lambda _: self.spool.inThread(self._writeOut, pieces))

    def _writeOut(self, pieces: list[bytes]) -> None:
        """
        Append pieces to the spool file, making it first if need be.  Runs in
        a worker thread; errors are kept for L{close}.
        """
        if self.error is not None or self._gone:
            return
        try:
            if self._file is None:
                self.path, self._file = self.spool.create()
            _writeAll(self._file, b"".join(pieces))
        except OSError as e:
            self.error = storageFailure(e)
        except Exception:
            log.failure("cannot write a spool file")
            self.error = DeliveryFailed("internal error while storing")

    def prepend(self, data: bytes) -> None:
        """
        Put C{data} (CRLF line ends) before everything written so far: a
        header field added once the whole message is known.  While the
        message is in memory this costs nothing; once part of it is in the
        spool file, a worker thread writes a new spool file.
        """
        if self.error is not None or self._gone or not data:
            return
        stored = data.replace(b"\r\n", b"\n")
        self.size += len(stored)
        self.crlfSize += len(stored) + stored.count(b"\n")
        if not self._spilling:
            self._pieces.insert(0, stored)
            self._buffered += len(stored)
            return
        self._spilled.addCallback(lambda _: self.spool.inThread(self._rewriteWith, stored))

    def _rewriteWith(self, first: bytes) -> None:
        """
        Replace the spool file by one holding C{first} and then its
        content.  Runs in a worker thread; errors are kept for L{close}.
        """
        if self.error is not None or self._gone:
            return
        oldPath, old = self.path, self._file
        try:
            self.path, self._file = self.spool.create()
            self._file.write(first)
            with open(oldPath, "rb") as content:
                while chunk := content.read(1024 * 1024):
                    self._file.write(chunk)
        except OSError as e:
            self.error = _failure(e)
        finally:
            old.close()
            _unlinkQuietly(oldPath)

    def close(self) -> defer.Deferred:
        """
        Finish receiving: wait for pieces on their way to the spool file.

        @return: a Deferred that fires when they are written, or fails with
            L{DeliveryFailed} (the message then discarded) if anything could
            not be stored.
        """
        if self._pendingCR:
            self._pendingCR = False
            self._keep(b"\r")
        closed: defer.Deferred = defer.Deferred()

        def check(_):
            if self.error is None:
                closed.callback(None)
            else:
                error = self.error
                self.discard()
                closed.errback(error)

        self._spilled.addCallback(check)
        return closed

    def writeRemaining(self, sync: bool = True) -> None:
        """
        Write what is still in memory, and sync the file unless told not
        to.  Runs in a worker thread (the committer's).

        @raise OSError: if that fails.
        """
        pieces, self._pieces, self._buffered = self._pieces, [], 0
        if self._file is None:
            self.path, self._file = self.spool.create()
        _writeAll(self._file, b"".join(pieces))
        if self.internalDate is not None:
            # After the last write (which sets the time) and before the file
            # is synced and placed: no reader ever sees it without its date.
            os.utime(self._file.fileno(), (self.internalDate, self.internalDate))
        if sync:
            os.fsync(self._file.fileno())

    def discard(self) -> None:
        """
        Throw the message away: nothing of it stays anywhere.
        """
        if self._gone:
            return
        self._gone = True
        self._pieces = []
        # After any spill in progress, in a worker thread.
        self._spilled.addCallback(lambda _: self.spool.inThread(self.removeNow))
        self._spilled.addErrback(lambda reason: log.failure("cannot remove a spool file", reason))

    def removeNow(self) -> None:
        """
        Remove the spool file at once (in a worker thread).
        """
        self.closeFile()
        if self.path is not None:
            _unlinkQuietly(self.path)

    def closeFile(self) -> None:
        """
        Close the spool file (it was renamed where it belongs, or is about
        to be removed); the message is done with.
        """
        self._gone = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass


@dataclass(frozen=True)
class Target:
    """
    Where to put a copy: C{folder}'s C{new/} when it is C{recent} (as
    delivery, APPEND and COPY make it, RFC 3501 section 2.3.2), else its
    C{cur/}; with the flag letters C{info}, if any.  Or, when C{name} is
    given, C{folder/name} (the outbound queue names its files itself).
    """

    folder: Path
    info: str | None = None
    recent: bool = True
    # Made when missing (a user's INBOX); a folder deleted meanwhile is not
    # brought back by an APPEND.
    create: bool = True
    name: str | None = None


@dataclass
class _Job:
    message: IncomingMessage
    targets: Sequence[Target]
    deferred: defer.Deferred
    placed: list[Path] | None = None
    error: Exception | None = None


def _libcSyncfs() -> Callable[[int], None]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def syncfs(fd: int) -> None:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs


class Committer:
    """
    Makes messages durable in groups.

    @param dataDir: the data folder (for C{syncfs} mode, its file system is
        the one synced).
    @param mode: C{"fsync"} syncs each file and each target folder, in
        parallel threads; C{"syncfs"} syncs the data folder's whole file
        system, links every message of the group, and syncs it again (Linux
        only; fastest when the data folder has a file system of its own,
        since every other dirty file on it is flushed too).
    @param syncHook: called in the worker thread after each group is
        durable and before any Deferred fires (tests observe it).
    """

    def __init__(
        self,
        reactor,
        dataDir: Path,
        mode: str = "fsync",
        threads: int = 8,
        syncHook: Callable[[list[Path]], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.dataDir = dataDir
        self.mode = mode
        self.syncHook = syncHook
        self._waiting: list[_Job] = []
        self._running = False
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="maild-sync")
        self._threads = threads
        self._started = False
        self._syncfs = _libcSyncfs() if mode == "syncfs" else None

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._pool.stop()
            self._started = False

    def commit(
        self, message: IncomingMessage, targets: Sequence[Target]
    ) -> defer.Deferred:
        """
        Make C{message} durable in every target folder.

        @return: a Deferred that fires with the list of the paths of the
            copies once every copy is on disk, or fails with
            L{DeliveryFailed}; either way the spool file is gone.
        """
        d: defer.Deferred = defer.Deferred()

        def closed(_):
            self._waiting.append(_Job(message, list(targets), d))
            if not self._running:
                self._runGroup()

        message.close().addCallbacks(closed, d.errback)
        return d

    def _runGroup(self) -> None:
        self.start()
        group, self._waiting = self._waiting, []
        self._running = True
        metrics.commitGroupSize.observe(len(group))
        started = time.perf_counter()
        d = self._syncGroup(group)
        d.addBoth(self._groupDone, group, started)

    def _groupDone(self, result, group: list[_Job], started: float) -> None:
        metrics.commitSyncSeconds.observe(time.perf_counter() - started)
        if isinstance(result, Failure):
            log.failure("delivery group failed", result)
            for job in group:
                if job.error is None and job.placed is None:
                    job.error = DeliveryFailed("internal error while storing")
        for job in group:
            if job.error is not None:
                job.message.discard()
                job.deferred.errback(job.error)
            else:
                job.deferred.callback(job.placed)
        self._running = False
        if self._waiting:
            self._runGroup()

    def _inPool(self, f, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self._pool, f, *args)

    def callInPool(self, f, *args) -> defer.Deferred:
        """
        Run blocking file work (links, directory syncs) in the committer's
        threads, off the reactor thread.
        """
        self.start()
        return self._inPool(f, *args)

    @defer.inlineCallbacks
    def _syncGroup(self, group: list[_Job]):
        if self.mode == "syncfs":
            yield self._inPool(self._linkAndSyncfs, group)
            return
        if len(group) > 2:
            # Sync the files in parallel: concurrent fsyncs share journal
            # commits.  A small group is synced in the same thread as the
            # rest of its work: each hop to a thread costs more than it saves.
            shares = [group[i :: self._threads] for i in range(self._threads)]
            yield defer.gatherResults(
                [self._inPool(self._syncFiles, share) for share in shares if share]
            )
        yield self._inPool(self._placeGroup, group, len(group) <= 2)

    def _placeGroup(self, group: list[_Job], syncFilesFirst: bool) -> None:
        """
        Link the synced messages into their folders and sync each folder
        once; then tell the sync hook.
        """
        if syncFilesFirst:
            self._syncFiles(group)
        self._syncFolders(sorted(self._link(group).items()))
        _withdrawFailed(group)
        if self.syncHook is not None:
            self.syncHook(self._placed(group))

    @staticmethod
    def _placed(group: list[_Job]) -> list[Path]:
        return [p for job in group if job.placed for p in job.placed]

    @staticmethod
    def _syncFiles(jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                job.message.writeRemaining()
            except OSError as e:
                job.error = storageFailure(e)

    @staticmethod
    def _link(group: list[_Job]) -> dict[Path, list[_Job]]:
        """
        Put each synced message into its target folders, with unique names:
        the spool file is renamed into the first, and hard-linked from there
        into the others (a rename is one change of the file system where a
        link and an unlink are two).  Where a folder lives on another file
        system, the message is copied there instead (L{placeFile}).

        @return: the directories touched, and the jobs in each.
        """
        touched: dict[Path, list[_Job]] = {}
        for job in group:
            if job.error is not None:
                continue
            message = job.message
            placed: list[Path] = []
            spoolFileMoved = False
            try:
                for target in job.targets:
                    base = newBaseName(message.size, message.crlfSize)
                    if target.name is not None:
                        path = target.folder / target.name
                    else:
                        name = base if target.info is None else base + ":2," + target.info
                        path = target.folder / ("new" if target.recent else "cur") / name
                    source = placed[0] if placed else message.path
                    try:
                        moved = placeFile(source, path, move=not placed)
                    except FileNotFoundError:
                        if target.name is not None:
                            path.parent.mkdir(parents=True, exist_ok=True)
                        elif not target.create:
                            raise FolderMissing(str(target.folder))
                        else:
                            for sub in ("cur", "new", "tmp"):
                                (target.folder / sub).mkdir(parents=True, exist_ok=True)
                        moved = placeFile(source, path, move=not placed)
                    spoolFileMoved = spoolFileMoved or moved
                    placed.append(path)
                    touched.setdefault(path.parent, []).append(job)
            except OSError as e:
                job.error = storageFailure(e)
                for path in placed:
                    _unlinkQuietly(path)
                continue
            job.placed = placed
            message.closeFile()
            if not spoolFileMoved:
                # Copied to another file system: the spool's copy goes.
                _unlinkQuietly(message.path)
        return touched

    @staticmethod
    def _syncFolders(folders: list[tuple[Path, list[_Job]]]) -> None:
        for new, jobs in folders:
            try:
                fsyncDirectory(new)
            except OSError as e:
                failure = storageFailure(e)
                for job in jobs:
                    job.error = failure

    def _linkAndSyncfs(self, group: list[_Job]) -> None:
        """
        Write, sync the file system, link, sync again: a crash can then never
        leave a link to a file whose data was not yet on disk.
        """
        for job in group:
            try:
                job.message.writeRemaining(sync=False)
            except OSError as e:
                job.error = storageFailure(e)
        fd = os.open(self.dataDir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._syncfsGroup(fd, group)
            touched = self._link(group)
            self._syncfsGroup(fd, group)
            # Folders on other file systems than the data folder's are not
            # covered by its syncfs.
            dataDevice = os.fstat(fd).st_dev
            self._syncFolders(
                [(d, jobs) for d, jobs in sorted(touched.items()) if os.stat(d).st_dev != dataDevice]
            )
        finally:
            os.close(fd)
        _withdrawFailed(group)
        if self.syncHook is not None:
            self.syncHook(self._placed(group))

    def _syncfsGroup(self, fd: int, group: list[_Job]) -> None:
        try:
            self._syncfs(fd)
        except OSError as e:
            failure = storageFailure(e)
            for job in group:
                job.error = job.error or failure


def placeFile(source: Path | str, path: Path, move: bool) -> bool:
    """
    Make the message file C{source} appear as C{path}, in one step that
    another reader never sees half done: a rename (when C{move}) or a hard
    link where both are on one file system; elsewhere a copy written and
    synced in the target folder's C{tmp/}, with the source's modification
    time (the INTERNALDATE), then renamed into place.  The caller syncs
    C{path}'s directory.

    @return: whether C{source} was moved (it stays when it was copied, or
        when not C{move}).
    @raise OSError: if that fails (C{ENOSPC} when the target's disk is
        full); nothing is left in the target folder then.
    """
    try:
        if move:
            os.rename(source, path)
        else:
            os.link(source, path)
        return move
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = path.parent.parent / "tmp" / path.name.partition(":")[0]
    with open(source, "rb", buffering=0) as src:
        st = os.fstat(src.fileno())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            remaining = st.st_size
            while remaining > 0:
                sent = os.sendfile(fd, src.fileno(), None, min(remaining, 1 << 30))
                if sent == 0:
                    break
                remaining -= sent
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlinkQuietly(tmp)
            raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlinkQuietly(tmp)
        raise
    return False


def _withdrawFailed(group: list[_Job]) -> None:
    """
    Remove the copies of messages whose folder sync failed: they will be
    refused (and sent again by the client), so they must not stay.
    """
    for job in group:
        if job.error is not None and job.placed:
            for path in job.placed:
                _unlinkQuietly(path)
            job.placed = None


def _writeAll(file, data: bytes) -> None:
    """
    Write all of C{data} to an unbuffered file: a raw write may write only
    part (a file system filling up does that before it fails with
    ENOSPC), and the rest must not be silently lost.
    """
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written:]


def _unlinkQuietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
