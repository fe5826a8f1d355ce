"""
DKIM verification in child processes (C{[mx] dkim_processes}), so that
the checks of signed mail use another core: maild is one process, and
DKIM's canonicalizations, hashes and signature arithmetic are most of
what the checks cost (some 0.3 ms of CPU a signature).

The daemon sends each child a batch of messages to verify (those that
arrived while the child's previous batch was being verified, see
L{maild.trust.dkim.BatchVerifier}) with the key records it has already
looked up, and gets one list of results per message back; the child never
asks DNS.  Framing on the child's stdin and stdout: a 4-octet big-endian
length, then a batch pickled (from the daemon: the child trusts its
parent) or the results as JSON (from the child: the daemon parses nothing
richer from a process that handles hostile mail).  A child that dies is
replaced, and the batches it had are verified in a thread instead:
nothing waits on a dead process.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import struct
import sys
from collections import deque
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, error, protocol, threads
from twisted.logger import Logger

import maild
from maild.trust.dkim import DKIMResult, verifyBatch

log = Logger()

_LENGTH = struct.Struct(">I")

# Octets a pipe to a child may hold (see _widenPipe).
PIPE_SIZE = 1024 * 1024

# Seconds a child may take to finish its batches once told to stop.
STOP_GRACE = 10.0


class _Child(protocol.ProcessProtocol):
    """
    One child process: batches in flight, in order, with their Deferreds.
    """

    def __init__(self, pool: "VerifierProcesses") -> None:
        self.pool = pool
        self.pending: deque[tuple[list, defer.Deferred]] = deque()
        self._buffer = bytearray()
        self.answered = 0
        self.ended: defer.Deferred = defer.Deferred()

    def send(self, work: list) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((work, d))
        payload = pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_LENGTH.pack(len(payload)) + payload)
        return d

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if len(self._buffer) < _LENGTH.size + length:
                return
            payload = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            work, d = self.pending.popleft()
            try:
                results = [[DKIMResult(*fields) for fields in one] for one in json.loads(payload)]
            except (ValueError, TypeError):
                log.error("DKIM process sent an unreadable answer: verifying in a thread")
                self.transport.signalProcess("KILL")
                self.pool.inThread(work).chainDeferred(d)
                continue
            self.answered += 1
            d.callback(results)

    def processEnded(self, reason) -> None:
        if not reason.check(error.ProcessDone) or self.pending:
            log.warn("DKIM process ended: {why}", why=reason.getErrorMessage())
        self.pool.childEnded(self)
        # What it had not answered is verified here instead.
        while self.pending:
            work, d = self.pending.popleft()
            self.pool.inThread(work).chainDeferred(d)
        self.ended.callback(None)


class VerifierProcesses(service.Service):
    """
    Up to C{count} child processes verifying batches of messages, started
    at the first batch (a daemon that never sees signed mail starts none),
    each given one batch at a time.

    @param inThread: runs a blocking callable in a thread; what a batch
        falls back to when its child dies.
    """

    def __init__(self, reactor, count: int, inThread=threads.deferToThread) -> None:
        self.reactor = reactor
        self.count = count
        self._inThread = inThread
        self._children: list[_Child] = []
        self._next = 0

    def inThread(self, work: list) -> defer.Deferred:
        return self._inThread(verifyBatch, work)

    def verify(self, work: list) -> defer.Deferred:
        """
        Verify a batch: a list of C{(message, headerLength, signatures,
        keys)} (see L{maild.trust.dkim.verifyBatch}).

        @return: a Deferred firing with one list of L{DKIMResult} per
            message.
        """
        if not self.running or not self.count:
            return self.inThread(work)
        if len(self._children) < self.count:
            self._children.append(self._spawn())
        child = min(self._children, key=lambda c: len(c.pending))
        return child.send(work)

    def _spawn(self) -> _Child:
        child = _Child(self)
        env = os.environ.copy()
        # This maild, wherever it was imported from (a checkout, a test
        # run): "python -m" puts the working directory first on the path,
        # so the child starts in the folder holding this maild, whatever
        # other maild the daemon's working directory may hold.
        home = str(Path(maild.__file__).parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, env.get("PYTHONPATH")]))
        process = self.reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-m", "maild.trust.dkimprocess"],
            env=env,
            path=home,
            childFDs={0: "w", 1: "r", 2: 2},
        )
        # The transport of a POSIX reactor's process has its pipes.
        toChild = getattr(process, "pipes", {}).get(0)
        if toChild is not None:
            _widenPipe(toChild.fileno())
        return child

    def childEnded(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
        if not child.answered and self.running:
            # One that cannot even start (no interpreter, no maild on its
            # path): starting more would only fail again, at each batch.
            log.error("DKIM processes cannot start: verifying in threads")
            self.count = 0

    def stopService(self):
        """
        Close every child's input: each ends once it has answered (or is
        killed after L{STOP_GRACE} seconds, its batches then verified in a
        thread).
        """
        service.Service.stopService(self)
        ended = []
        for child in list(self._children):
            ended.append(child.ended)
            child.transport.closeStdin()
            kill = self.reactor.callLater(STOP_GRACE, child.transport.signalProcess, "KILL")
            child.ended.addBoth(lambda result, kill=kill: kill.active() and kill.cancel())
        return defer.gatherResults(ended)


def _widenPipe(fd: int) -> None:
    """
    Let the pipe to a child hold a batch of messages at once (1 MiB, the
    most Linux lets a process ask for by default, against 64 KiB): a batch
    then goes in a few writes rather than one per 64 KiB, each waking the
    child.  Where the system refuses, the pipe stays as it is.
    """
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass


def main() -> int:
    """
    The child: read batches from stdin, answer each on stdout, until stdin
    closes.
    """
    # The daemon ends it by closing its input; a ^C or SIGHUP sent to the
    # daemon's process group is the daemon's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = source.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return 0
        (length,) = _LENGTH.unpack(header)
        work = pickle.loads(source.read(length))
        answer = json.dumps(
            [[[r.result, r.domain, r.selector, r.signature, r.reason] for r in one]
             for one in verifyBatch(work)]
        ).encode("utf-8")
        sink.write(_LENGTH.pack(len(answer)) + answer)
        sink.flush()


if __name__ == "__main__":
    sys.exit(main())
