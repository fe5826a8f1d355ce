"""
The one reader of a client's byte stream under every protocol: it hands
out command lines and counted runs of octets (IMAP literals, SMTP DATA)
from what was received, with

 - a read cursor: what was taken is dropped once per L{LineReader.feed},
   never by copying the rest of the input per line (which makes a burst
   of pipelined commands cost the square of its size);
 - overlong lines skipped: a line over the limit is not held; it is
   dropped as it comes and reported once, as L{Overlong}, when its end
   arrives, so the session can refuse it and go on;
 - a hold limit: L{LineReader.full} says when so much is waiting that the
   protocol should stop reading from the client (a reply is pending, or
   the client does not read its replies);
 - L{LineReader.discard} for STARTTLS/STLS: whatever was sent behind the
   command came in plaintext and must not be taken as said inside TLS
   (CVE-2011-0411, the STARTTLS injection class of bugs).

The reader knows nothing of any protocol: the caller decides what a line
means (an IMAP line ending in C{{n}} announces n octets, which the caller
then takes with L{LineReader.read}).
"""

from __future__ import annotations

from dataclasses import dataclass

# How much unparsed input a session holds by default before it should stop
# reading from its client.
HOLD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Overlong:
    """
    A line longer than the limit, dropped.

    @ivar start: its first octets (an IMAP tag, an SMTP verb).
    @ivar tail: its last octets, without the line end (where an IMAP
        literal announcement would be).
    """

    start: bytes
    tail: bytes


class LineReader:
    """
    Lines and octets from a byte stream, in order.

    @param lineLimit: the longest line, without its line end, that
        L{readLine} gives; longer ones come as L{Overlong}.
    @param holdLimit: how much input may wait before L{full} is true.
    """

    # How much of a dropped line is kept for L{Overlong}.
    START = 64
    TAIL = 32

    def __init__(self, lineLimit: int, holdLimit: int = HOLD_LIMIT) -> None:
        self.lineLimit = lineLimit
        self.holdLimit = holdLimit
        self._buffer = bytearray()
        # Where unread input starts in _buffer.
        self._pos = 0
        # Where to look for the next line end: no LF before it.
        self._scan = 0
        # A line over the limit is being dropped: what was kept of it.
        self._dropStart: bytes | None = None
        self._dropTail = b""

    @property
    def pending(self) -> int:
        """
        How many octets were received and not yet read.
        """
        return len(self._buffer) - self._pos

    @property
    def partial(self) -> bool:
        """
        Whether a line has begun and not ended (its octets may have been
        dropped for being too long).
        """
        return self.pending > 0 or self._dropStart is not None

    @property
    def full(self) -> bool:
        """
        Whether more is waiting than the hold limit allows: the protocol
        should pause reading until it has taken some.
        """
        return self.pending > self.holdLimit

    def feed(self, data: bytes) -> None:
        """
        Add what was received.
        """
        if self._pos:
            # One compaction per feed (bytearray drops its front in place).
            del self._buffer[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buffer += data

    def discard(self) -> None:
        """
        Forget everything received and not yet read, and any line being
        dropped (after STARTTLS: RFC 3207 section 4, RFC 2595 section 3.1).
        """
        self._buffer = bytearray()
        self._pos = self._scan = 0
        self._dropStart = None
        self._dropTail = b""

    def readLine(self) -> bytes | Overlong | None:
        """
        The next line, without its line end (LF or CR LF); an L{Overlong}
        for a line over the limit, once its end has come; None until a
        whole line is there.
        """
        buffer = self._buffer
        end = buffer.find(b"\n", max(self._scan, self._pos))
        if end < 0:
            self._scan = len(buffer)
            # (+1: a line of exactly the limit may wait for the LF of its CR LF.)
            if self.pending > self.lineLimit + 1:
                self._dropPending()
            return None
        start, self._pos = self._pos, end + 1
        self._scan = self._pos
        if end > start and buffer[end - 1] == 0x0D:
            end -= 1
        if self._dropStart is not None:
            rest = bytes(buffer[start:end])
            overlong = Overlong(
                (self._dropStart + rest[: self.START])[: self.START],
                (self._dropTail + rest)[-self.TAIL :],
            )
            self._dropStart, self._dropTail = None, b""
            return overlong
        if end - start > self.lineLimit:
            return Overlong(
                bytes(buffer[start : min(end, start + self.START)]),
                bytes(buffer[max(start, end - self.TAIL) : end]),
            )
        return self._copy(start, end)

    def _dropPending(self) -> None:
        buffer = self._buffer
        # Keep a CR that may be the start of the line end.
        cut = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        dropped = bytes(buffer[self._pos : cut])
        start = self._dropStart or b""
        self._dropStart = start + dropped[: self.START - len(start)]
        self._dropTail = (self._dropTail + dropped[-self.TAIL :])[-self.TAIL :]
        del buffer[self._pos : cut]
        self._scan = self._pos

    def read(self, size: int) -> bytes:
        """
        Up to C{size} octets as they come (an announced literal: the caller
        counts what is left); C{b""} when nothing is waiting.
        """
        start = self._pos
        end = min(len(self._buffer), start + size)
        self._pos = end
        self._scan = max(self._scan, end)
        return self._copy(start, end)

    def peek(self) -> bytes:
        """
        Everything waiting, without reading it (for a decoder that takes
        what it can and says how much with L{skip}).
        """
        return self._copy(self._pos, len(self._buffer))

    def _copy(self, start: int, end: int) -> bytes:
        # One copy (slicing the bytearray first would make two); the view
        # is released at once, so the buffer can grow again.
        with memoryview(self._buffer) as view:
            return bytes(view[start:end])

    def skip(self, size: int) -> None:
        """
        Read C{size} octets of what L{peek} gave, without copying them.
        """
        if not 0 <= size <= self.pending:
            raise ValueError(f"cannot skip {size} of {self.pending} octets")
        self._pos += size
        self._scan = max(self._scan, self._pos)
