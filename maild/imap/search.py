"""
SEARCH (RFC 3501 section 6.4.4): parsing the keys into a tree and
evaluating it over the session's messages.

A result is a mask (one 0/1 byte per message, in session order).  Keys on
flags, sequence numbers and UIDs are computed for all messages at once
with C-speed byte operations, so C{UID SEARCH UNSEEN} on 100,000 messages
takes milliseconds; keys that must read messages (headers, bodies, dates)
look only at the messages the cheaper keys left in.
"""

from __future__ import annotations

import binascii
import bisect
import datetime
import email.header
import email.utils
import quopri
import re
from dataclasses import dataclass
from itertools import compress
from typing import Any, Callable, Iterator

from maild.imap import wire
from maild.imap.fetch import MessageData
from maild.imap.mailbox import SelectedFolder
from maild.imap.headervalues import addressText, parseAddressList
from maild.imap.mime import MAX_DEPTH, headerFields, unfold
from maild.imap.parser import Atom, BadCommand, Literal, SequenceSet, parseNumber, parseSequenceSet
from maild.store import MessageGone
from maild.store.maildir import ANSWERED, DELETED, DRAFT, FLAGGED, FORWARDED, HAS_KEYWORDS, SEEN

_FLAG_KEYS = {
    b"ANSWERED": (ANSWERED, True),
    b"DELETED": (DELETED, True),
    b"DRAFT": (DRAFT, True),
    b"FLAGGED": (FLAGGED, True),
    b"SEEN": (SEEN, True),
    b"UNANSWERED": (ANSWERED, False),
    b"UNDELETED": (DELETED, False),
    b"UNDRAFT": (DRAFT, False),
    b"UNFLAGGED": (FLAGGED, False),
    b"UNSEEN": (SEEN, False),
}
_HEADER_KEYS = {b"BCC": b"bcc", b"CC": b"cc", b"FROM": b"from", b"SUBJECT": b"subject", b"TO": b"to"}
_ADDRESS_FIELDS = {b"bcc", b"cc", b"from", b"to"}
_DATE_KEYS = {b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"}
# Marks, in a flag byte string, a message someone else expunged.
GONE = 0xFF
CHARSETS = (b"US-ASCII", b"UTF-8")
# Messages read between two pauses of a search that reads messages.
_PAUSE_EVERY = 50


# How deeply NOT, OR and parenthesized lists may nest in a search
# program (once OR chains are flattened and double negations removed):
# evaluation recurses that deep.
MAX_DEPTH = 64


@dataclass
class Key:
    """
    One node of the search tree: C{and} and C{or} hold a list of keys in
    C{arg}, C{not} one key.
    """

    kind: str
    arg: Any = None
    arg2: Any = None
    depth: int = 1

    @property
    def cheap(self) -> bool:
        if self.kind in ("and", "or"):
            return all(k.cheap for k in self.arg)
        if self.kind == "not":
            return self.arg.cheap
        return self.kind in ("all", "flag", "keyword", "recent", "set")


def _node(kind: str, children: list[Key]) -> Key:
    """
    An C{and}, C{or} or C{not} node over C{children}: nested nodes of the
    same kind are merged (C{OR a OR b c} is one C{or} of three) and
    C{NOT NOT a} is C{a}, so that the chains clients build stay shallow.

    @raise BadCommand: if the program nests deeper than L{MAX_DEPTH}.
    """
    if kind == "not":
        [child] = children
        if child.kind == "not":
            return child.arg
        key = Key("not", child, depth=child.depth + 1)
    else:
        # The biggest node of the same kind is grown in place (nodes are
        # never shared): a chain of 2,000 ORs is merged in linear time.
        same = [c for c in children if c.kind == kind]
        key = max(same, key=lambda c: len(c.arg)) if same else Key(kind, [], depth=1)
        for child in children:
            if child is key:
                continue
            grafted = child.arg if child.kind == kind else [child]
            key.arg.extend(grafted)
            key.depth = max(key.depth, 1 + max(k.depth for k in grafted))
        if len(key.arg) == 1:
            return key.arg[0]
    if key.depth > MAX_DEPTH:
        raise BadCommand("Search program too deeply nested")
    return key


def parseKeys(tokens: list[Any]) -> Key:
    """
    The search tree of a SEARCH's keys (all of them must match).

    @raise BadCommand: for an unknown key or a missing argument.
    """
    if not tokens:
        raise BadCommand("Missing search keys")
    return _parseList(_Reader(tokens))


def _parseList(reader: "_Reader") -> Key:
    keys = []
    while reader.more():
        keys.append(_parseKey(reader))
    if not keys:
        raise BadCommand("Empty search list")
    return _node("and", keys)


class _Reader:
    def __init__(self, tokens: list[Any]) -> None:
        self.tokens = tokens
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.tokens)

    def next(self) -> Any:
        if not self.more():
            raise BadCommand("Missing search argument")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def string(self) -> bytes:
        token = self.next()
        if isinstance(token, Literal):
            return token.data
        if isinstance(token, list):
            raise BadCommand("Expected a string")
        return bytes(token)

    def atom(self) -> bytes:
        token = self.next()
        if not isinstance(token, Atom):
            raise BadCommand("Expected an atom")
        return bytes(token)


def _parseKey(reader: _Reader) -> Key:
    """
    One search key, with the keys NOT and OR take: read with a stack of
    pending operators rather than by recursion, so that C{NOT NOT ...}
    or C{OR ALL OR ALL ...} thousands deep is refused by L{_node}, not by
    the interpreter's stack.  (Parenthesized lists recurse, bounded by
    the tokenizer's nesting limit.)
    """
    pending: list[tuple[str, list[Key], int]] = []
    while True:
        token = reader.next()
        if isinstance(token, Atom) and token.upper() in (b"NOT", b"OR"):
            kind = token.upper().decode().lower()
            pending.append((kind, [], 1 if kind == "not" else 2))
            continue
        key = _parseSimpleKey(token, reader)
        while pending:
            kind, children, wanted = pending[-1]
            children.append(key)
            if len(children) < wanted:
                break
            pending.pop()
            key = _node(kind, children)
        else:
            return key


def _parseSimpleKey(token: Any, reader: _Reader) -> Key:
    """
    A key other than NOT and OR.
    """
    if isinstance(token, list):
        return _parseList(_Reader(token))
    if not isinstance(token, Atom):
        raise BadCommand("Bad search key")
    name = token.upper()
    if name == b"ALL":
        return Key("all")
    if name in _FLAG_KEYS:
        return Key("flag", *_FLAG_KEYS[name])
    if name in (b"NEW", b"OLD", b"RECENT"):
        recent = Key("recent")
        if name == b"NEW":
            return _node("and", [recent, Key("flag", SEEN, False)])
        return recent if name == b"RECENT" else _node("not", [recent])
    if name in (b"KEYWORD", b"UNKEYWORD"):
        flag = reader.atom()
        if not wire.isKeyword(flag):
            raise BadCommand("Keywords must be atoms")
        keyword = Key("keyword", flag.decode("ascii"))
        return keyword if name == b"KEYWORD" else _node("not", [keyword])
    if name == b"UID":
        return Key("set", SequenceSet(tuple(parseSequenceSet(reader.atom())), True))
    if name in _HEADER_KEYS:
        return Key("header", _HEADER_KEYS[name], _text(reader.string()))
    if name == b"HEADER":
        field = reader.string().lower()
        return Key("header", field, _text(reader.string()))
    if name in (b"BODY", b"TEXT"):
        return Key(name.decode().lower(), _text(reader.string()))
    if name in (b"LARGER", b"SMALLER"):
        value = reader.atom()
        if not value.isdigit():
            raise BadCommand("Bad size")
        return Key(name.decode().lower(), parseNumber(value, "size"))
    if name in _DATE_KEYS:
        date = wire.parseSearchDate(reader.string())
        if date is None:
            raise BadCommand("Bad date")
        return Key("date", name, date)
    if token[:1].isdigit() or token[:1] == b"*":
        return Key("set", SequenceSet(tuple(parseSequenceSet(bytes(token))), False))
    raise BadCommand("Unknown search key")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace").casefold()


class Search:
    """
    Evaluates a search tree over a session's view.
    """

    def __init__(self, view: SelectedFolder) -> None:
        self.view = view
        self.count = len(view.uids)
        self.flags = view.flagBytes()
        self.ones = b"\x01" * self.count

    def run(self, key: Key, uid: bool) -> list[int]:
        """
        The sequence numbers (or UIDs) of the matching messages, at once.
        """
        for _ in self.steps(key, uid):
            pass
        return self.result

    def steps(self, key: Key, uid: bool) -> Iterator[None]:
        """
        Evaluate C{key}, pausing (yielding) every few messages read, so
        that a search through the bodies of a big folder can share the
        reactor (L{twisted.internet.task.cooperate}); the answer is then in
        C{self.result}.
        """
        present = self.flags.translate(_table(lambda b: b != GONE))
        mask = self._and((yield from self._eval(key, present)), present)
        values = self.view.uids if uid else range(1, self.count + 1)
        self.result = list(compress(values, mask))

    def _and(self, a: bytes, b: bytes) -> bytes:
        return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(self.count, "little")

    def _or(self, a: bytes, b: bytes) -> bytes:
        return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(self.count, "little")

    def _not(self, a: bytes) -> bytes:
        return (int.from_bytes(a, "little") ^ int.from_bytes(self.ones, "little")).to_bytes(self.count, "little")

    def _eval(self, key: Key, candidates: bytes) -> Iterator[None]:
        kind = key.kind
        if kind == "all":
            return self.ones
        if kind == "and":
            mask = candidates
            for child in sorted(key.arg, key=lambda k: not k.cheap):
                mask = self._and(mask, (yield from self._eval(child, mask)))
            return mask
        if kind == "or":
            mask = bytes(self.count)
            for child in key.arg:
                mask = self._or(mask, (yield from self._eval(child, candidates)))
            return mask
        if kind == "not":
            return self._not((yield from self._eval(key.arg, candidates)))
        if kind == "flag":
            bit, wanted = key.arg, key.arg2
            return self.flags.translate(_table(lambda b: b != GONE and bool(b & bit) == wanted))
        if kind == "recent":
            return self._fromPositions(self._sessionPositions(self.view.recent))
        if kind == "set":
            mask = bytearray(self.count)
            try:
                spans = key.arg.positions(self.view.uids)
            except BadCommand:
                if key.arg.uid:
                    raise
                # A sequence number beyond the mailbox matches nothing.
                spans = _clippedSpans(key.arg, self.count)
            for start, stop in spans:
                mask[start:stop] = self.ones[start:stop]
            return bytes(mask)
        if kind == "keyword":
            return (yield from self._perMessage(candidates, self._keywordTest(key.arg), needsMessage=False))
        needsMessage = kind not in ("larger", "smaller") and not (
            kind == "date" and key.arg in (b"BEFORE", b"ON", b"SINCE")
        )
        return (yield from self._perMessage(candidates, self._messageTest(key), needsMessage))

    def _sessionPositions(self, uids) -> list[int]:
        sessionUids = self.view.uids
        out = []
        for uid in uids:
            p = bisect.bisect_left(sessionUids, uid)
            if p < len(sessionUids) and sessionUids[p] == uid:
                out.append(p)
        return out

    def _fromPositions(self, positions: list[int]) -> bytes:
        mask = bytearray(self.count)
        for p in positions:
            mask[p] = 1
        return bytes(mask)

    def _perMessage(self, candidates: bytes, test: Callable, needsMessage: bool) -> Iterator[None]:
        mask = bytearray(self.count)
        view = self.view
        p = candidates.find(1)
        done = 0
        while p >= 0:
            done += 1
            if not done % _PAUSE_EVERY:
                yield None
            i = view.index(p)
            if i is not None:
                try:
                    if test(i, MessageData(view.folder, i) if needsMessage else None):
                        mask[p] = 1
                except (MessageGone, FileNotFoundError):
                    pass
            p = candidates.find(1, p + 1)
        return bytes(mask)

    def _keywordTest(self, name: str) -> Callable:
        folder = self.view.folder
        letters = folder.keywords.letters([name], create=False)
        # Older files carry $Forwarded as the Maildir letter P.
        legacy = FORWARDED if name.lower() == "$forwarded" else 0

        def test(i, message) -> bool:
            if folder.flags[i] & legacy:
                return True
            if not letters or not folder.flags[i] & HAS_KEYWORDS:
                return False
            return letters in folder.keywordLetters.get(folder.uids[i], "")

        return test

    def _messageTest(self, key: Key) -> Callable:
        folder = self.view.folder
        kind = key.kind
        if kind == "larger":
            return lambda i, m: folder.sizes(i)[1] > key.arg
        if kind == "smaller":
            return lambda i, m: folder.sizes(i)[1] < key.arg
        if kind == "header":
            field, text = key.arg, key.arg2

            def header(i, message) -> bool:
                part = message.part
                values = [v for name, v in _fields(part) if name == field]
                if not text:
                    return bool(values)
                if any(text in _decodeHeader(v) for v in values):
                    return True
                # An address field also matches its addresses written
                # without their comments (<user (c)@ (c) host> is user@host).
                return field in _ADDRESS_FIELDS and any(
                    text in _decodeHeader(addressText(a)) for v in values for a in parseAddressList(v)
                )

            return header
        if kind == "body":
            return lambda i, m: key.arg in _bodyText(m)
        if kind == "text":
            return lambda i, m: key.arg in _bodyText(m) or key.arg in _decodeHeader(m.part.header)
        if kind == "date":
            which, wanted = key.arg, key.arg2

            def date(i, message) -> bool:
                if which in (b"BEFORE", b"ON", b"SINCE"):
                    day = datetime.datetime.fromtimestamp(folder.internalDate(i)).date()
                else:
                    sent = message.part.field(b"date")
                    parsed = email.utils.parsedate_tz(sent.decode("ascii", "replace")) if sent else None
                    if parsed is None:
                        return False
                    try:
                        day = datetime.date(*parsed[:3])
                    except ValueError:
                        # A Date: field naming no real day (31 Feb).
                        return False
                if which.endswith(b"BEFORE"):
                    return day < wanted
                if which.endswith(b"ON"):
                    return day == wanted
                return day >= wanted

            return date
        raise BadCommand("Unknown search key")


def _clippedSpans(sequenceSet: SequenceSet, count: int) -> list[tuple[int, int]]:
    spans = []
    for low, high in sequenceSet.ranges:
        low, high = low or count, high or count
        if low > high:
            low, high = high, low
        high = min(high, count)
        if low <= high:
            spans.append((low - 1, high))
    return spans


def _table(test: Callable[[int], bool]) -> bytes:
    return bytes(1 if test(b) else 0 for b in range(256))


def _fields(part) -> list[tuple[bytes, bytes]]:
    return [(name, unfold(raw)) for name, raw in headerFields(part.header)]


def _decodeHeader(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    try:
        text = str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        pass
    return text.casefold()


def _bodyText(message: MessageData) -> str:
    """
    The text of a message's body for BODY and TEXT: leaf parts decoded
    from their transfer encoding and charset, messages inside messages
    included.

    The parts are maild's own (L{maild.imap.mime.MessagePart}), walked with
    a stack no deeper than BODYSTRUCTURE opens them (deeper ones are
    searched whole): the email package took 0.2 s of the reactor for one
    message of 600 nested multiparts.
    """
    texts = []
    stack = [(message.part, 0)]
    while stack:
        part, depth = stack.pop()
        if depth < MAX_DEPTH:
            if part.isMultipart():
                stack.extend((child, depth + 1) for child in reversed(part.parts))
                continue
            inner = part.embedded
            if inner is not None:
                stack.append((inner, depth + 1))
                continue
        # A leaf, or a part too deep to open: searched as it is.
        texts.append(_decodedBody(part))
    return "\n".join(texts).casefold()


_CHARSET = re.compile(rb'charset\s*=\s*"?([^";\s]+)', re.I)


def _decodedBody(part) -> str:
    encoding = (part.field(b"content-transfer-encoding") or b"").strip().lower()
    payload = part.body
    if encoding == b"base64":
        try:
            payload = binascii.a2b_base64(payload)
        except binascii.Error:
            pass
    elif encoding == b"quoted-printable":
        payload = quopri.decodestring(payload)
    charset = _CHARSET.search(part.field(b"content-type") or b"")
    try:
        return payload.decode(charset.group(1).decode("ascii", "replace") if charset else "utf-8", "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")
