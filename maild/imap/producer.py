"""
Writing a long response (FETCH of many messages) at the pace the client
reads it: a streaming producer that writes batches until the transport
asks it to pause, and goes on when it is drained.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# Written per reactor turn at most, and the longest a turn may take, so
# that other sessions are served too (ENVELOPE or BODYSTRUCTURE of many
# messages produces few octets for much work).
TURN_BUDGET = 1024 * 1024
TURN_SECONDS = 0.02
# A bigger transport buffer and send size while we stream: fewer reactor
# turns per megabyte (Twisted's defaults are 64 KiB and 128 KiB).
BUFFER_SIZE = 512 * 1024
SEND_LIMIT = 1024 * 1024


@implementer(IPushProducer)
class ResponseProducer:
    """
    Writes the chunks of C{chunks} to C{transport}, then calls C{done}
    (with the exception if producing them failed).  The session, which is
    its transport's producer, passes the transport's pause and resume on.
    """

    def __init__(self, transport, chunks: Iterator[bytes], done: Callable, clock) -> None:
        self.transport = transport
        self.chunks = chunks
        self.done = done
        self.clock = clock
        self.paused = False
        self.finished = False
        self._scheduled = None
        self._tuned = _tune(transport)

    def start(self) -> None:
        if not self.paused:
            self._produce()

    def _produce(self) -> None:
        self._scheduled = None
        written = 0
        write = self.transport.write
        deadline = time.monotonic() + TURN_SECONDS
        try:
            while not self.paused and not self.finished:
                chunk = next(self.chunks, None)
                if chunk is None:
                    self._finish(None)
                    return
                write(chunk)
                written += len(chunk)
                if (written >= TURN_BUDGET or time.monotonic() > deadline) and not self.paused:
                    self._scheduled = self.clock.callLater(0, self._produce)
                    return
        except Exception as e:
            self._finish(e)

    def _finish(self, error) -> None:
        if self.finished:
            return
        self.finished = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        _untune(self.transport, self._tuned)
        self.done(error)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.finished:
            return
        self.paused = False
        if self._scheduled is None:
            self._produce()

    def stopProducing(self) -> None:
        # The connection is gone: nothing more to write, nobody to answer.
        self.finished = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()


def _tune(transport):
    if not hasattr(transport, "SEND_LIMIT") or not hasattr(transport, "bufferSize"):
        return None
    saved = (transport.__dict__.get("SEND_LIMIT"), transport.__dict__.get("bufferSize"))
    transport.SEND_LIMIT = SEND_LIMIT
    transport.bufferSize = BUFFER_SIZE
    return saved


def _untune(transport, saved) -> None:
    if saved is None:
        return
    for name, value in zip(("SEND_LIMIT", "bufferSize"), saved):
        if value is None:
            transport.__dict__.pop(name, None)
        else:
            setattr(transport, name, value)
