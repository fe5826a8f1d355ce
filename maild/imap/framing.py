"""
Cutting the client's byte stream into IMAP commands: lines, literals
(synchronizing C{{n}} and RFC 7888 non-synchronizing C{{n+}}), the line
length cap, and literals streamed to a sink instead of being held in
memory (an APPEND of 100 MB costs no more memory than one of 1 KB).

Lines and counted octets come from L{maild.lines.LineReader}, the reader
under every protocol (a read cursor, overlong lines dropped as they
come, discard after STARTTLS); this module adds what is IMAP's: literals,
and a running count of each command's octets and literals, so that the
cost of a command is linear in its size however many lines it spans and
the protocol can bound it (L{CommandSink.literalAnnounced}).
"""

from __future__ import annotations

from typing import Callable, Protocol

from maild.imap.parser import LITERAL_SPEC, Literal
from maild.lines import LineReader, Overlong


class CommandSink(Protocol):
    """
    What the framer calls back: the protocol.
    """

    def literalAnnounced(self, parts: list, size: int, synchronizing: bool) -> "LiteralDecision": ...

    def commandReceived(self, parts: list) -> None: ...

    def lineTooLong(self, start: bytes) -> None: ...

    def commandDropped(self, parts: list) -> None:
        """
        The command whose C{parts} were received so far will not be run
        (refused, or its next line was too long): release what its
        literals hold.
        """

    def literalTooBigToSkip(self, size: int) -> None:
        """
        A refused command's non-synchronizing literal is bigger than
        L{CommandFramer.skipLimit}: reading past it would tie the session
        up for nothing; the framer stops reading.
        """


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

    @param lineLimit: the longest command line (without its literals).
    @ivar skipLimit: the biggest non-synchronizing literal of a refused
        command that is read past; a bigger one stops the framer.
    @ivar commandSize: octets of the command being received so far: its
        lines and the literals held in memory (not those given to a sink).
    @ivar literalCount: literals of the command being received so far.
    """

    def __init__(self, sink: CommandSink, lineLimit: int, skipLimit: int = 2**63) -> None:
        self.sink = sink
        self.reader = LineReader(lineLimit)
        self.skipLimit = skipLimit
        self.parts: list = []
        self.commandSize = 0
        self.literalCount = 0
        self.literalLeft = 0
        self.literalChunks: list[bytes] | None = None
        self.literalSink = None
        self.literalSize = 0
        # The rest of a refused command's line, after its skipped literal.
        self.discardLine = False
        # When set, the next line goes here instead of being a command
        # (AUTHENTICATE responses, IDLE's DONE).
        self.lineHandler: Callable[[bytes], None] | None = None
        self.held = False

    @property
    def pending(self) -> int:
        """
        Octets received and not yet used.
        """
        return self.reader.pending

    def discardBuffered(self) -> None:
        """
        Forget what was received but not yet used (after STARTTLS).
        """
        self.reader.discard()

    def stop(self) -> None:
        """
        Take nothing more: the session is closing.
        """
        self._dropCommand()
        self.discardBuffered()
        self.held = True

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)
        self.process()

    def process(self) -> None:
        while self.reader.pending and not self.held:
            if self.literalLeft:
                self._literalData()
            elif not self._line():
                break

    def _literalData(self) -> None:
        take = self.reader.read(self.literalLeft)
        self.literalLeft -= len(take)
        if self.literalSink is not None:
            self.literalSink.write(take)
        elif self.literalChunks is not None:
            self.literalChunks.append(take)
        if self.literalLeft:
            return
        self._literalComplete()

    def _literalComplete(self) -> None:
        if self.literalSink is not None:
            self.parts.append(Literal(message=self.literalSink, size=self.literalSize))
        elif self.literalChunks is not None:
            self.parts.append(Literal(b"".join(self.literalChunks)))
        else:
            self.discardLine = True
        self.literalSink = self.literalChunks = None

    def _line(self) -> bool:
        """
        Take one line from the reader.

        @return: whether a line was complete.
        """
        line = self.reader.readLine()
        if line is None:
            return False
        if self.discardLine:
            self.discardLine = False
            self._skipAnnouncedLiteral(line.tail if isinstance(line, Overlong) else line)
            return True
        if isinstance(line, Overlong):
            # A continuation line is reported with its command's tag.
            start = self.parts[0] if self.parts else line.start
            self._dropCommand()
            self.sink.lineTooLong(start)
            self._skipAnnouncedLiteral(line.tail)
            return True
        if self.lineHandler is not None and not self.parts:
            handler, self.lineHandler = self.lineHandler, None
            handler(line)
            # A continuation line is no command: a literal it announces
            # is data to read past, never a command to run.
            self._skipAnnouncedLiteral(line)
            return True
        self.commandSize += len(line) + 2
        m = LITERAL_SPEC.search(line)
        if m is None:
            parts, self.parts = self.parts + [line], []
            self.commandSize = self.literalCount = 0
            self.sink.commandReceived(parts)
            return True
        size, synchronizing = int(m.group(1)), not m.group(2)
        self.parts.append(line)
        decision = self.sink.literalAnnounced(self.parts, size, synchronizing)
        if decision.close:
            self.stop()
        elif decision.accept:
            self.literalCount += 1
            self.literalLeft = size
            self.literalSize = size
            self.literalSink = decision.sink
            if decision.sink is None:
                self.literalChunks = []
                self.commandSize += size
            else:
                self.literalChunks = None
            if not size:
                self._literalComplete()
        else:
            self._dropCommand()
            if not synchronizing:
                # Read past the data without keeping it.
                self._skipAnnouncedLiteral(line)
        return True

    def _dropCommand(self) -> None:
        parts, self.parts = self.parts, []
        self.commandSize = self.literalCount = 0
        if self.literalSink is not None:
            # Stopped in the middle of a literal that was being stored.
            parts.append(Literal(message=self.literalSink, size=self.literalSize))
            self.literalSink = None
            self.literalLeft = 0
        if any(isinstance(p, Literal) for p in parts):
            self.sink.commandDropped(parts)

    def _skipAnnouncedLiteral(self, line: bytes) -> None:
        m = LITERAL_SPEC.search(line)
        if m is None or not m.group(2):
            return
        # The dropped line announced a literal that is coming anyway.
        size = int(m.group(1))
        if size > self.skipLimit:
            self.stop()
            self.sink.literalTooBigToSkip(size)
            return
        self.literalLeft = size
        self.literalChunks = None
        self.literalSink = None
        if not size:
            self.discardLine = True
