"""
The durable outbound queue in C{<data>/queue/}.

Each message is two files side by side: C{<id>.msg}, the message as the
store keeps it (LF line ends, the trace headers first), and C{<id>.env},
its envelope in JSON (sender, each recipient with its own state, attempts,
next try, arrival time).  The envelope is written and synced first, then
the message joins the store's group commit, which syncs the queue folder
with the users' folders: when submission answers 250, both are on disk.
An envelope without its message was never acknowledged (or was being
deleted) and is removed; anything unreadable is moved into C{corrupt/}.

Per-recipient state is rewritten (atomically, synced) after each remote
reply, so a recipient the remote server acknowledged is not sent again
after a crash; rewrites and removals are grouped, one folder sync each.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from maild.store.delivery import (
    Committer,
    DeliveryFailed,
    IncomingMessage,
    Target,
    fsyncDirectory,
)
from maild.store.locking import tryLockOpenFile

log = Logger()

QUEUED, SENT, BOUNCED = "queued", "sent", "bounced"

# A temporary file this old was left by a process that died (an envelope
# is written within moments).
ABANDONED_AFTER = 3600.0

_sequence = itertools.count()
# Tells this process's ids from those of every other process sharing the
# queue, on any node: process ids repeat across nodes (containers start
# maild as pid 1); 24 random bits at start do not, in practice, and an
# envelope is never written over another's (L{OutboundQueue.enqueue}).
_PROCESS_TAG = os.urandom(3).hex().upper()


def newQueueId(smtpId: str = "") -> str:
    """
    A queue id no other process sharing the queue chooses: the id the
    SMTP server gave the transaction (12 hex digits, unique in this
    process; seconds and a sequence number when there is none, for a DSN),
    then this process's tag.  So the id of C{250 2.0.0 Ok: queued as X}
    begins every C{delivery id=...} line of that message: one grep follows
    it.
    """
    base = smtpId or f"{int(time.time()) & 0xFFFFFFFF:08X}{next(_sequence) & 0xFFFF:04X}"
    return base + _PROCESS_TAG


def validQueueId(text: str) -> bool:
    return 0 < len(text) <= 32 and all(c in "0123456789ABCDEF" for c in text)


@dataclass
class Recipient:
    """
    One recipient of a queued message and where its delivery stands.
    """

    address: str
    state: str = QUEUED
    attempts: int = 0
    # The last reply or error, as logged.
    reply: str = ""

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass
class QueueEntry:
    """
    A queued message's envelope.

    @ivar sender: the envelope sender ("" for the null sender of a DSN,
        which is never bounced: RFC 5321 section 4.5.5).
    @ivar headers: header lines to put first when sending (the Date: and
        Message-ID: submission adds when the client left them out).
    @ivar warned: whether the sender was told of the delay.
    @ivar signatures: the DKIM-Signature fields (CRLF line ends), made
        once when the message is accepted; empty until then.
    """

    id: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    nextTry: float
    user: str = ""
    headers: list[str] = field(default_factory=list)
    warned: bool = False
    signatures: str = ""

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == QUEUED]

    def toJSON(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def fromJSON(cls, data: bytes) -> "QueueEntry":
        """
        @raise ValueError: if C{data} is not a valid envelope.
        """
        try:
            raw = json.loads(data)
        except RecursionError:
            raise ValueError("nested too deeply")
        if not isinstance(raw, dict) or not validQueueId(str(raw.get("id"))):
            raise ValueError("not an envelope")
        try:
            recipients = [Recipient(**r) for r in raw.pop("recipients")]
            entry = cls(recipients=recipients, **raw)
        except (TypeError, KeyError) as e:
            raise ValueError(f"bad envelope: {e}")
        number = (int, float)
        valid = (
            all(
                isinstance(r.address, str) and r.state in (QUEUED, SENT, BOUNCED)
                and isinstance(r.attempts, int) and isinstance(r.reply, str)
                for r in recipients
            )
            and isinstance(entry.sender, str) and isinstance(entry.user, str)
            and isinstance(entry.arrival, number) and isinstance(entry.nextTry, number)
            and isinstance(entry.headers, list) and all(isinstance(h, str) for h in entry.headers)
            and isinstance(entry.warned, bool) and isinstance(entry.signatures, str)
        )
        if not valid:
            raise ValueError("bad envelope fields")
        return entry


class OutboundQueue:
    """
    The queue's files.  Blocking work runs in the committer's threads.
    """

    def __init__(self, path: Path, committer: Committer | None) -> None:
        self.path = path
        self.committer = committer
        self._batch: list[tuple[Callable[[], None], defer.Deferred]] = []
        self._writing = False
        self._settled: list[defer.Deferred] = []

    def messagePath(self, queueId: str) -> Path:
        return self.path / f"{queueId}.msg"

    def envelopePath(self, queueId: str) -> Path:
        return self.path / f"{queueId}.env"

    @property
    def corruptPath(self) -> Path:
        return self.path / "corrupt"

    def enqueue(
        self, message: IncomingMessage, entry: QueueEntry, localTargets: Sequence[Target]
    ) -> defer.Deferred:
        """
        Store C{message} durably: its envelope, then the message in the
        same group commit as its local copies (C{localTargets}).

        @return: a Deferred firing when all of it is on disk, or failing
            with L{maild.store.DeliveryFailed} (nothing then stays queued).
        """
        d = self.committer.callInPool(self._writeNewEnvelope, entry)

        def commit(writing: int):
            targets = list(localTargets) + [Target(self.path, name=f"{entry.id}.msg")]

            def written(result):
                os.close(writing)
                return result

            return self.committer.commit(message, targets).addBoth(written)

        def envelopeFailed(reason):
            message.discard()
            reason.trap(OSError)
            raise DeliveryFailed(f"cannot queue: {reason.value.strerror}")

        def withdraw(reason):
            d = self.committer.callInPool(_unlinkQuietly, self.envelopePath(entry.id))
            return d.addCallback(lambda _: reason)

        d.addCallbacks(commit, envelopeFailed)
        d.addErrback(withdraw)
        return d

    def _writeNewEnvelope(self, entry: QueueEntry) -> int:
        """
        Write the envelope of a message being accepted, locked (see
        L{tryLockOpenFile}) until its message is committed too: a process
        starting meanwhile (L{load}) sees it is not one a crash left.

        @return: the envelope's descriptor, holding the lock: close it once
            the message is committed (or not).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.envelopePath(entry.id)
        temporary = target.with_suffix(".tmp")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            tryLockOpenFile(fd)
            with open(fd, "wb", closefd=False) as f:
                f.write(entry.toJSON())
            os.fsync(fd)
            # Never over another's envelope: a link fails if the name exists.
            os.link(temporary, target)
        except BaseException:
            os.close(fd)
            raise
        finally:
            _unlinkQuietly(temporary)
        return fd

    def _writeEnvelope(self, entry: QueueEntry) -> None:
        target = self.envelopePath(entry.id)
        if not self.messagePath(entry.id).exists():
            # Deleted meanwhile (`maild queue delete`): do not bring it back.
            _unlinkQuietly(target)
            return
        temporary = target.with_suffix(".tmp")
        with open(temporary, "wb") as f:
            f.write(entry.toJSON())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)

    def save(self, entry: QueueEntry) -> defer.Deferred:
        """
        Rewrite C{entry}'s envelope, durably (grouped with other changes).
        """
        return self._grouped(lambda: self._writeEnvelope(entry))

    def remove(self, queueId: str, claim: int | None = None) -> defer.Deferred:
        """
        Remove a message that is done with, durably (grouped).

        @param claim: the lock L{claim} gave on the message, closed once
            its files are gone (never before: another process could take
            it and send it again).  Closed here, in the committer's thread,
            because closing the last descriptor of an unlinked file frees
            its inode: a journal write that waits behind other processes'
            commits, which blocked the reactor for milliseconds at a time.
        """

        def unlink():
            _unlinkQuietly(self.messagePath(queueId))
            _unlinkQuietly(self.envelopePath(queueId))
            _unlinkQuietly(self.path / "flush" / queueId)
            if claim is not None:
                os.close(claim)

        return self._grouped(unlink)

    def settled(self) -> defer.Deferred:
        """
        A Deferred firing once every change asked for is on disk.
        """
        if not self._writing and not self._batch:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._settled.append(d)
        return d

    def _batchDone(self) -> None:
        self._writing = False
        if self._batch:
            self._writeBatch()
            return
        settled, self._settled = self._settled, []
        for d in settled:
            d.callback(None)

    def claim(self, entry: QueueEntry) -> int | None:
        """
        Take C{entry} for one attempt, against other processes sharing the
        queue (C{--workers}, nodes on shared storage): an exclusive lock on
        its message file (which, unlike the envelope, keeps its inode for
        its whole life), see L{tryLockOpenFile}.  Once it holds the message
        the caller reads it again (L{reread}).

        @return: the lock's file descriptor (to close when the attempt is
            over), or None if another process holds it.
        @raise FileNotFoundError: if the message is gone (delivered by
            another process, or deleted).
        """
        fd = os.open(self.messagePath(entry.id), os.O_RDWR | os.O_CLOEXEC)
        try:
            if tryLockOpenFile(fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def reread(self, entry: QueueEntry) -> None:
        """
        Update C{entry} from its envelope as the last attempt, by whichever
        process, left it: its recipients' state, whether the sender was
        warned, its next try, its signatures.  (An envelope that cannot be
        read leaves C{entry} as it is; the next start moves it aside.)

        @raise FileNotFoundError: if the message is gone.
        """
        try:
            stored = QueueEntry.fromJSON(readWithoutAtime(self.envelopePath(entry.id)))
        except ValueError:
            return
        entry.recipients = stored.recipients
        entry.warned = stored.warned
        entry.nextTry = stored.nextTry
        entry.signatures = entry.signatures or stored.signatures

    def envelopeIds(self) -> set[str]:
        """
        The ids of the messages in the queue (blocking: a directory
        listing): those with both an envelope and a message, so not one
        another process is still writing.
        """
        try:
            names = set(os.listdir(self.path))
        except FileNotFoundError:
            return set()
        stems = {name[:-4] for name in names if name.endswith(".env")}
        return {stem for stem in stems if f"{stem}.msg" in names}

    def read(self, queueId: str) -> QueueEntry | None:
        """
        One envelope from disk (blocking), or None if it is gone or
        unreadable (L{load} at the next start moves those aside).
        """
        try:
            entry = QueueEntry.fromJSON(self.envelopePath(queueId).read_bytes())
        except (ValueError, OSError):
            return None
        return entry if entry.id == queueId else None

    def _grouped(self, change: Callable[[], None]) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._batch.append((change, d))
        if not self._writing:
            self._writeBatch()
        return d

    def _writeBatch(self) -> None:
        batch, self._batch = self._batch, []
        self._writing = True

        def run():
            # One change failing (a full disk) does not keep the others
            # from being made: a removal also closes its message's lock.
            problems = []
            for change, _ in batch:
                try:
                    change()
                except Exception:
                    problems.append(Failure())
                else:
                    problems.append(None)
            fsyncDirectory(self.path)
            return problems

        def done(problems):
            for (_, d), problem in zip(batch, problems):
                if problem is None:
                    d.callback(None)
                else:
                    log.failure("cannot update the queue", problem)
                    d.errback(problem)
            self._batchDone()

        def failed(reason):
            log.failure("cannot update the queue", reason)
            for _, d in batch:
                d.errback(reason)
            self._batchDone()

        self.committer.callInPool(run).addCallbacks(done, failed)

    def readMessage(self, queueId: str) -> defer.Deferred:
        """
        The message's bytes as stored (LF line ends); fails with
        C{FileNotFoundError} if it was deleted.

        A message the page cache holds (as one just queued is) is read at
        once; only one that needs the disk is read in a thread: the hop
        there and back cost more CPU than all the rest of sending it.
        """
        path = self.messagePath(queueId)
        try:
            cached = readIfCached(path)
        except OSError:
            return defer.fail()
        if cached is not None:
            return defer.succeed(cached)
        return self.committer.callInPool(readWithoutAtime, path)

    def entries(self) -> list[QueueEntry]:
        """
        The readable envelopes, changing nothing (the command line lists
        a queue a daemon is working on).
        """
        found = []
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        for name in names:
            if name.endswith(".env"):
                try:
                    found.append(QueueEntry.fromJSON((self.path / name).read_bytes()))
                except (ValueError, OSError):
                    continue
        return found

    def load(self, now: float | None = None) -> list[QueueEntry]:
        """
        Every queued message, from disk (blocking: at start, or for the
        command line).  Unreadable envelopes, and messages without one,
        are moved into C{corrupt/}; envelopes without a message (never
        acknowledged, or being deleted) are removed, unless another process
        sharing the queue is accepting that message now (it holds a lock on
        the envelope); temporary files go once they are L{ABANDONED_AFTER}
        seconds old.
        """
        entries = []
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []
        present = set(names)
        abandoned = (time.time() if now is None else now) - ABANDONED_AFTER
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if suffix == "tmp":
                _unlinkIfOlder(self.path / name, abandoned)
            elif suffix == "env":
                if f"{stem}.msg" not in present:
                    if _unlinkIfUnlocked(self.path / name):
                        log.info("queue: removed {id}, never accepted", id=stem)
                    continue
                try:
                    entry = QueueEntry.fromJSON((self.path / name).read_bytes())
                    if entry.id != stem:
                        raise ValueError("id differs from the file name")
                except (ValueError, OSError) as e:
                    log.error("queue: {id} cannot be read ({error}), moved to corrupt/", id=stem, error=str(e))
                    self._moveAside(stem)
                    continue
                entries.append(entry)
            elif suffix == "msg" and f"{stem}.env" not in present:
                log.error("queue: {id} has no envelope, moved to corrupt/", id=stem)
                self._moveAside(stem)
        return entries

    def _moveAside(self, stem: str) -> None:
        self.corruptPath.mkdir(parents=True, exist_ok=True)
        for suffix in ("env", "msg"):
            source = self.path / f"{stem}.{suffix}"
            if source.exists():
                os.replace(source, self.corruptPath / source.name)

    def corrupt(self) -> list[str]:
        """
        The names of the files moved aside as unreadable.
        """
        try:
            return sorted(os.listdir(self.corruptPath))
        except FileNotFoundError:
            return []

    def count(self) -> int:
        try:
            return sum(1 for name in os.listdir(self.path) if name.endswith(".env"))
        except FileNotFoundError:
            return 0


def readIfCached(path: Path) -> bytes | None:
    """
    The whole file if it can be read without waiting for the disk
    (C{preadv2} with C{RWF_NOWAIT}, Linux 4.14), or None: some of it is
    not in the page cache, or the file system cannot tell (tmpfs, NFS).
    """
    noWait = getattr(os, "RWF_NOWAIT", None)
    if noWait is None:
        return None
    fd = _openWithoutAtime(path)
    try:
        size = os.fstat(fd).st_size
        buffer = bytearray(size)
        try:
            read = os.preadv(fd, [buffer], 0, noWait)
        except OSError:
            return None
        return bytes(buffer) if read == size else None
    finally:
        os.close(fd)


def readWithoutAtime(path: Path) -> bytes:
    """
    The whole file, read without updating its access time (see
    L{_openWithoutAtime}).
    """
    fd = _openWithoutAtime(path)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _openWithoutAtime(path: Path) -> int:
    """
    Open C{path} to read it, with C{O_NOATIME} where allowed (the owner of
    the file, or root).  A queue file is read once or twice and then
    removed: updating its access time (which C{relatime} does at the first
    read after a write) is a journal write for each, in the reactor
    thread, that waits behind whatever the disk is committing.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    noAtime = getattr(os, "O_NOATIME", 0)
    if noAtime:
        try:
            return os.open(path, flags | noAtime)
        except PermissionError:
            # Not the file's owner (a queue shared between users).
            pass
    return os.open(path, flags)


def _unlinkIfUnlocked(path: Path) -> bool:
    """
    Remove C{path} unless another open of it holds a lock on it.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not tryLockOpenFile(fd):
            return False
        os.unlink(path)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _unlinkIfOlder(path: Path, before: float) -> bool:
    """
    Remove C{path} if it was last changed before C{before}.
    """
    try:
        if os.stat(path).st_mtime >= before:
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def _unlinkQuietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
