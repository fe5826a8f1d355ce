"""
Cutting the client's byte stream into IMAP commands: lines, literals
(synchronizing C{{n}} and RFC 7888 non-synchronizing C{{n+}}), the line
length cap, and literals streamed to a sink instead of being held in
memory (an APPEND of 100 MB costs no more memory than one of 1 KB).
"""

from __future__ import annotations

from typing import Callable, Protocol

from maild.imap.parser import LITERAL_SPEC, Literal


class CommandSink(Protocol):
    """
    What the framer calls back: the protocol.
    """

    def literalAnnounced(self, parts: list, size: int, synchronizing: bool) -> "LiteralDecision": ...

    def commandReceived(self, parts: list) -> None: ...

    def lineTooLong(self, start: bytes) -> None: ...


class LiteralDecision:
    """
    What to do with an announced literal.

    @ivar accept: read it (into memory, or into C{sink} when given).
    @ivar sink: an object with C{write(bytes)} that takes the octets as
        they come (the APPEND message).
    @ivar skip: the command was refused; a non-synchronizing literal must
        still be read past, and is thrown away as it comes.
    @ivar close: the literal is refused and cannot be read past safely:
        the session ends.
    """

    def __init__(self, accept=False, sink=None, skip=False, close=False) -> None:
        self.accept = accept
        self.sink = sink
        self.skip = skip
        self.close = close


ACCEPT = LiteralDecision(accept=True)
REFUSE = LiteralDecision(skip=True)
CLOSE = LiteralDecision(close=True)


class CommandFramer:
    """
    Frames commands for C{sink} from the bytes given to L{feed}.

    @ivar lineLimit: the longest command line (without its literals).
    """

    # A line we drop for being too long is remembered only by its tail,
    # where a literal announcement would be.
    _TAIL = 32

    def __init__(self, sink: CommandSink, lineLimit: int) -> None:
        self.sink = sink
        self.lineLimit = lineLimit
        self.buffer = b""
        self.parts: list = []
        self.literalLeft = 0
        self.literalChunks: list[bytes] | None = None
        self.literalSink = None
        self.literalSize = 0
        self.skipping = False
        # The rest of a refused command's line, after its skipped literal.
        self.discardLine = False
        self.skippedTail = b""
        self.skipStart = b""
        # When set, the next line goes here instead of being a command
        # (AUTHENTICATE responses, IDLE's DONE).
        self.lineHandler: Callable[[bytes], None] | None = None
        self.held = False

    def discardBuffered(self) -> None:
        """
        Forget what was received but not yet used (after STARTTLS).
        """
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        if self.buffer:
            self.buffer += data
        else:
            self.buffer = data
        self.process()

    def process(self) -> None:
        while self.buffer and not self.held:
            if self.literalLeft:
                self._literalData()
            elif not self._line():
                break

    def _literalData(self) -> None:
        take = self.buffer[: self.literalLeft]
        self.buffer = self.buffer[len(take) :]
        self.literalLeft -= len(take)
        if self.literalSink is not None:
            self.literalSink.write(take)
        elif self.literalChunks is not None:
            self.literalChunks.append(take)
        if self.literalLeft:
            return
        if self.literalSink is not None:
            self.parts.append(Literal(message=self.literalSink, size=self.literalSize))
        elif self.literalChunks is not None:
            self.parts.append(Literal(b"".join(self.literalChunks)))
        else:
            self.discardLine = True
        self.literalSink = self.literalChunks = None

    def _line(self) -> bool:
        """
        Take one line from the buffer.

        @return: whether a line was complete.
        """
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > self.lineLimit:
                self._startSkipping()
            return False
        line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        if self.skipping:
            self._endSkipping(line)
            return True
        if self.discardLine:
            self.discardLine = False
            self._skipAnnouncedLiteral(line)
            return True
        if len(line) > self.lineLimit:
            self.skipStart = line[:64]
            self._endSkipping(line)
            return True
        if self.lineHandler is not None and not self.parts:
            handler, self.lineHandler = self.lineHandler, None
            handler(line)
            return True
        m = LITERAL_SPEC.search(line)
        if m is None:
            parts, self.parts = self.parts + [line], []
            self.sink.commandReceived(parts)
            return True
        size, synchronizing = int(m.group(1)), not m.group(2)
        self.parts.append(line)
        decision = self.sink.literalAnnounced(self.parts, size, synchronizing)
        if decision.close:
            self.parts = []
            self.buffer = b""
            self.held = True
        elif decision.accept:
            self.literalLeft = size
            self.literalSize = size
            self.literalSink = decision.sink
            self.literalChunks = None if decision.sink is not None else []
            if not size:
                self._literalData()
        else:
            self.parts = []
            if not synchronizing:
                # Read past the data without keeping it.
                self._skipAnnouncedLiteral(line)
        return True

    def _startSkipping(self) -> None:
        if not self.skipping:
            self.skipStart = self.buffer[:64]
            self.skipping = True
        self.skippedTail = (self.skippedTail + self.buffer)[-self._TAIL :]
        self.buffer = b""

    def _endSkipping(self, line: bytes) -> None:
        tail = (self.skippedTail + line)[-self._TAIL :]
        start = self.skipStart
        self.skipping = False
        self.skippedTail = self.skipStart = b""
        self.parts = []
        self.sink.lineTooLong(start)
        self._skipAnnouncedLiteral(tail)

    def _skipAnnouncedLiteral(self, line: bytes) -> None:
        m = LITERAL_SPEC.search(line)
        if m is not None and m.group(2):
            # The dropped line announced a literal that is coming anyway.
            self.literalLeft = int(m.group(1))
            self.literalChunks = None
            self.literalSink = None
            if not self.literalLeft:
                self.discardLine = True
