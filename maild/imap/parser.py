"""
IMAP command syntax (RFC 3501 section 9): turning the parts of one
command (its lines and the literals between them) into tokens, and the
argument readers every command handler uses.

Framing, literals and limits are the reader's business
(L{maild.imap.framing}); this module only sees complete commands.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Sequence

from maild.names import InvalidName
from maild.store.maildir import INBOX, validateFolderName


class BadCommand(Exception):
    """
    The command is malformed: answered with a tagged BAD.
    """


class Atom(bytes):
    """
    An atom (including C{NIL} and fetch attributes such as
    C{BODY[HEADER]<0.100>}).
    """


class Quoted(bytes):
    """
    A quoted string, with its escapes removed.
    """


class Literal:
    """
    A literal: its octets, or for the message of an APPEND, the store's
    L{maild.store.IncomingMessage} they were streamed into.
    """

    def __init__(self, data: bytes = b"", message=None, size: int = 0) -> None:
        self.data = data
        self.message = message
        self.size = size if message is not None else len(data)


# RFC 3501 section 9: atom-specials are ( ) { SP CTL % * " \ ]; "[" is an
# ATOM-CHAR and "]" an ASTRING-CHAR, so both may be part of a word.
_ATOM_END = re.compile(rb"[ ()\[]")
# The FETCH attributes whose "[" opens a section that runs to its "]",
# spaces and parentheses included (BODY[HEADER.FIELDS (A B)]).
_SECTION_PREFIXES = (b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE")
_LONGEST_PREFIX = max(map(len, _SECTION_PREFIXES))
_TAG = re.compile(rb"[\x21-\x7e]+\Z")
_BAD_TAG_CHARS = re.compile(rb'[(){%*"\\+]')
LITERAL_SPEC = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")


def tokenize(parts: Sequence[bytes | Literal], maxDepth: int) -> list[Any]:
    """
    The tokens of a command: L{Atom}, L{Quoted}, L{Literal} and lists of
    tokens for parenthesized lists.

    @param parts: the command's line segments, each but the last ending
        with a literal announcement and followed by that L{Literal}.
    @raise BadCommand: for unbalanced parentheses or quotes, or lists
        nested deeper than C{maxDepth}.
    """
    top: list[Any] = []
    stack = [top]
    index = 0
    while index < len(parts):
        segment = parts[index]
        index += 1
        pos, end = 0, len(segment)
        while pos < end:
            c = segment[pos]
            if c == 0x20:
                pos += 1
            elif c == 0x28:  # (
                if len(stack) > maxDepth:
                    raise BadCommand("Too deeply nested parentheses")
                inner: list[Any] = []
                stack[-1].append(inner)
                stack.append(inner)
                pos += 1
            elif c == 0x29:  # )
                if len(stack) == 1:
                    raise BadCommand("Unbalanced parentheses")
                stack.pop()
                pos += 1
            elif c == 0x22:  # "
                value, pos = _quoted(segment, pos)
                stack[-1].append(value)
            elif c == 0x7B and LITERAL_SPEC.match(segment, pos):  # {
                if index >= len(parts) or not isinstance(parts[index], Literal):
                    raise BadCommand("Literal without data")
                stack[-1].append(parts[index])
                index += 1
                pos = end
            else:
                value, pos = _atom(segment, pos)
                stack[-1].append(value)
    if len(stack) != 1:
        raise BadCommand("Unbalanced parentheses")
    return top


def _quoted(segment: bytes, pos: int) -> tuple[Quoted, int]:
    out = bytearray()
    pos += 1
    end = len(segment)
    while pos < end:
        c = segment[pos]
        if c == 0x5C:  # backslash: only \" and \\ are allowed
            if pos + 1 < end and segment[pos + 1] in (0x22, 0x5C):
                out.append(segment[pos + 1])
                pos += 2
                continue
            raise BadCommand("Bad escape in quoted string")
        if c == 0x22:
            return Quoted(out), pos + 1
        if c in (0x0A, 0x0D, 0x00):
            break
        out.append(c)
        pos += 1
    raise BadCommand("Unterminated quoted string")


def _atom(segment: bytes, pos: int) -> tuple[Atom, int]:
    start = pos
    end = len(segment)
    while True:
        m = _ATOM_END.search(segment, pos)
        if m is None:
            pos = end
            break
        pos = m.start()
        if segment[pos] != 0x5B:  # [
            break
        if pos - start > _LONGEST_PREFIX or segment[start:pos].upper() not in _SECTION_PREFIXES:
            pos += 1
            continue
        close = segment.find(b"]", pos)
        if close < 0:
            raise BadCommand("Unterminated section")
        pos = close + 1
    value = segment[start:pos]
    if not value or any(b < 0x20 or b == 0x7F for b in value):
        raise BadCommand("Bad atom")
    return Atom(value), pos


def splitTag(line: bytes) -> tuple[bytes | None, bytes | None, bytes]:
    """
    The tag, the command name (upper case) and the rest of a command's
    first line; None for what is missing or malformed.
    """
    words = line.split(b" ", 2)
    tag = words[0]
    if not tag or not _TAG.match(tag) or _BAD_TAG_CHARS.search(tag):
        return None, None, b""
    if len(words) < 2 or not words[1]:
        return tag, None, b""
    name = words[1]
    if not name.isalpha():
        return tag, None, b""
    return tag, name.upper(), words[2] if len(words) > 2 else b""


# Sequence sets ------------------------------------------------------------

_SET_ELEMENT = re.compile(rb"(\d+|\*)(?::(\d+|\*))?\Z")


def parseSequenceSet(text: bytes) -> list[tuple[int, int]]:
    """
    The ranges of a sequence set (RFC 3501 section 9, C{sequence-set}),
    each as C{(low, high)} with C{*} as 0, in the order given.  Linear in
    the length of the set (Twisted's parser is quadratic).

    @raise BadCommand: if it is malformed or holds a zero.
    """
    ranges = []
    for element in text.split(b","):
        m = _SET_ELEMENT.match(element)
        if m is None:
            raise BadCommand("Invalid sequence set")
        a, b = m.group(1), m.group(2)
        low = 0 if a == b"*" else int(a)
        high = low if b is None else (0 if b == b"*" else int(b))
        if (a != b"*" and low == 0) or (b is not None and b != b"*" and high == 0):
            raise BadCommand("Invalid sequence set: 0")
        if low > 0xFFFFFFFF or high > 0xFFFFFFFF:
            raise BadCommand("Invalid sequence set: number too big")
        ranges.append((low, high))
    return ranges


@dataclass(frozen=True)
class SequenceSet:
    """
    A parsed set and whether it names UIDs or sequence numbers.
    """

    ranges: tuple[tuple[int, int], ...]
    uid: bool

    def positions(self, uids: Sequence[int]) -> list[tuple[int, int]]:
        """
        Merged half-open intervals of the 0-based positions this set
        selects among C{uids} (ascending): the session's view.

        For UIDs C{*} is the highest UID, so C{N:*} with N above it still
        names the last message (RFC 3501 section 6.4.8).  Sequence numbers
        beyond the mailbox are an error.

        @raise BadCommand: for sequence numbers out of range.
        """
        count = len(uids)
        spans = []
        if self.uid:
            if not count:
                return []
            star = uids[-1]
            for low, high in self.ranges:
                low, high = low or star, high or star
                if low > high:
                    low, high = high, low
                start = bisect.bisect_left(uids, low)
                stop = bisect.bisect_right(uids, high)
                if start < stop:
                    spans.append((start, stop))
        else:
            for low, high in self.ranges:
                low, high = low or count, high or count
                if low > high:
                    low, high = high, low
                if high > count or low < 1:
                    raise BadCommand("Invalid sequence number")
                spans.append((low - 1, high))
        return mergeSpans(spans)


def mergeSpans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, stop in spans:
        if merged and start <= merged[-1][1]:
            if stop > merged[-1][1]:
                merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def formatUidSet(uids: Sequence[int]) -> bytes:
    """
    A compact sequence set (C{1:3,7}) for UIDs in the given order, as
    COPYUID and APPENDUID need it (RFC 4315: the order pairs source and
    destination UIDs).
    """
    out = []
    i = 0
    n = len(uids)
    while i < n:
        j = i
        while j + 1 < n and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(b"%d" % uids[i] if i == j else b"%d:%d" % (uids[i], uids[j]))
        i = j + 1
    return b",".join(out)


# Argument readers ---------------------------------------------------------


def decodeMailbox(raw: bytes) -> str:
    """
    The folder name for a mailbox argument: modified UTF-7 decoded, then
    validated (RFC 3501 section 5.1.3).

    @raise InvalidName: for a name that is not valid.
    """
    import twisted.mail.imap4  # noqa: F401  (registers "imap4-utf-7")

    try:
        name = raw.decode("imap4-utf-7")
        # Twisted's decoder is lenient: only the canonical form is a name.
        canonical = name.encode("imap4-utf-7") == raw
    except (UnicodeError, ValueError):
        canonical = False
    if not canonical:
        raise InvalidName("mailbox name is not valid modified UTF-7")
    if name.upper() == INBOX:
        return INBOX
    return validateFolderName(name)


class Arguments:
    """
    Reads a command's arguments from its tokens, in order.
    """

    def __init__(self, tokens: list[Any]) -> None:
        self.tokens = tokens
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.tokens)

    def peek(self) -> Any:
        return self.tokens[self.pos] if self.more() else None

    def next(self, what: str = "argument") -> Any:
        if not self.more():
            raise BadCommand(f"Missing {what}")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def end(self) -> None:
        if self.more():
            raise BadCommand("Too many arguments")

    def astring(self, what: str = "argument") -> bytes:
        token = self.next(what)
        if isinstance(token, Literal):
            return token.data
        if isinstance(token, (Atom, Quoted)):
            return bytes(token)
        raise BadCommand(f"Bad {what}")

    def atom(self, what: str = "argument") -> bytes:
        token = self.next(what)
        if not isinstance(token, Atom):
            raise BadCommand(f"Bad {what}")
        return bytes(token)

    def number(self, what: str = "number") -> int:
        token = self.atom(what)
        if not token.isdigit() or len(token) > 10:
            raise BadCommand(f"Bad {what}")
        return int(token)

    def mailbox(self) -> bytes:
        """
        The raw mailbox argument (decode with L{decodeMailbox}, whose
        refusal is a NO rather than a BAD).
        """
        return self.astring("mailbox name")

    def list(self, what: str = "list") -> list[Any]:
        token = self.next(what)
        if not isinstance(token, list):
            raise BadCommand(f"Expected a parenthesized {what}")
        return token

    def sequenceSet(self, uid: bool) -> SequenceSet:
        token = self.atom("sequence set")
        return SequenceSet(tuple(parseSequenceSet(token)), uid)


def atomList(tokens: list[Any], what: str) -> list[bytes]:
    """
    A list that may hold only atoms (flags, status items).
    """
    out = []
    for token in tokens:
        if not isinstance(token, Atom):
            raise BadCommand(f"Bad {what}")
        out.append(bytes(token))
    return out
