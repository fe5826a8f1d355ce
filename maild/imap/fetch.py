"""
FETCH (RFC 3501 section 6.4.5): parsing the attributes, and writing the
responses for a range of messages.

Responses are produced message by message into batches that a
L{maild.imap.producer.ResponseProducer} writes while the client reads
them, so a slow reader never makes us hold more than a batch or two.
The general path renders any attribute; two fast paths cover what
Thunderbird sends most (C{UID FETCH 1:* (FLAGS)} and whole bodies) and are
tested to give the same octets as the general path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from maild.imap import wire
from maild.imap.cache import folderCache
from maild.imap.mailbox import SelectedFolder
from maild.imap.mime import MessagePart, envelope, selectFields
from maild.imap.parser import Atom, BadCommand, parseNumber
from maild.store import MessageGone

_MACROS = {
    b"ALL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"],
    b"FAST": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"],
    b"FULL": [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"],
}
_SIMPLE = {
    b"UID",
    b"FLAGS",
    b"INTERNALDATE",
    b"RFC822.SIZE",
    b"ENVELOPE",
    b"BODY",
    b"BODYSTRUCTURE",
    b"RFC822",
    b"RFC822.HEADER",
    b"RFC822.TEXT",
}
_SECTION_ATT = re.compile(rb"(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d+)\.(\d+)>)?\Z", re.I)
_SECTION_TEXT = re.compile(rb"(HEADER\.FIELDS(?:\.NOT)?)\s*\((.*)\)\Z|(HEADER|TEXT|MIME)\Z", re.I | re.S)
# Batches handed to the transport.
BATCH = 64 * 1024


@dataclass
class FetchItem:
    """
    One attribute to fetch.

    @ivar name: C{UID}, C{FLAGS}, ... or C{BODY[]} for a section.
    @ivar parts: the section's part numbers.
    @ivar text: C{HEADER}, C{HEADER.FIELDS}, C{HEADER.FIELDS.NOT}, C{TEXT},
        C{MIME} or C{b""} for the whole part.
    @ivar label: how the response names it (C{BODY[HEADER.FIELDS (From)]}).
    """

    name: bytes
    parts: list[int] = field(default_factory=list)
    text: bytes = b""
    fields: list[bytes] = field(default_factory=list)
    partial: tuple[int, int] | None = None
    peek: bool = True
    label: bytes = b""

    @property
    def setsSeen(self) -> bool:
        # RFC 3501 6.4.5: BODY[...] (not BODY.PEEK), RFC822 and RFC822.TEXT.
        return (self.name == b"BODY[]" and not self.peek) or self.name in (b"RFC822", b"RFC822.TEXT")


def parseItems(tokens: Any) -> list[FetchItem]:
    """
    The attributes of a FETCH: one atom, a macro, or a list.

    @raise BadCommand: for an unknown or malformed attribute.
    """
    if isinstance(tokens, Atom) and tokens.upper() in _MACROS:
        return [FetchItem(name) for name in _MACROS[tokens.upper()]]
    if isinstance(tokens, Atom):
        tokens = [tokens]
    if not isinstance(tokens, list) or not tokens:
        raise BadCommand("Bad fetch attributes")
    return [parseItem(t) for t in tokens]


def parseItem(token: Any) -> FetchItem:
    if not isinstance(token, Atom):
        raise BadCommand("Bad fetch attribute")
    upper = token.upper()
    if upper in _SIMPLE:
        return FetchItem(upper)
    m = _SECTION_ATT.match(token)
    if m is None:
        raise BadCommand("Unknown fetch attribute")
    peek = m.group(1).upper() == b"BODY.PEEK"
    section = m.group(2)
    item = FetchItem(b"BODY[]", peek=peek)
    if m.group(3) is not None:
        item.partial = (parseNumber(m.group(3), "partial"), parseNumber(m.group(4), "partial"))
    rest = section
    while rest:
        number, dot, remainder = rest.partition(b".")
        if not number.isdigit():
            break
        if len(number) > 5 or int(number) == 0:
            raise BadCommand("Bad section part")
        item.parts.append(int(number))
        rest = remainder
        if not dot:
            break
    if rest:
        t = _SECTION_TEXT.match(rest)
        if t is None:
            raise BadCommand("Bad section")
        if t.group(1):
            item.text = t.group(1).upper()
            names = [n.strip(b'"') for n in t.group(2).split()]
            if not names or any(not n or b"(" in n or b")" in n for n in names):
                raise BadCommand("Bad header field list")
            item.fields = names
            shown = item.text + b" (" + t.group(2).strip() + b")"
        else:
            item.text = t.group(3).upper()
            shown = item.text
        if item.text == b"MIME" and not item.parts:
            raise BadCommand("MIME needs a part number")
        numbers = b".".join(b"%d" % n for n in item.parts)
        sectionLabel = numbers + b"." + shown if numbers else shown
    else:
        sectionLabel = b".".join(b"%d" % n for n in item.parts)
    item.label = b"BODY[" + sectionLabel + b"]"
    if item.partial is not None:
        item.label += b"<%d>" % item.partial[0]
    return item


class MessageData:
    """
    What FETCH reads of one message, loaded when first needed; what is
    derived from its octets comes from the folder's cache when another
    FETCH (of any session) made it before.
    """

    __slots__ = ("folder", "uid", "_index", "_data", "_part")

    def __init__(self, folder, index: int) -> None:
        self.folder = folder
        self.uid = folder.uids[index]
        self._index = index
        self._data: bytes | None = None
        self._part: MessagePart | None = None

    @property
    def index(self) -> int:
        """
        The message's index in the folder now.  Reading a file that
        another process renamed or removed lists the folder again
        (L{maild.store.folder.Folder.read}), and what that listing learnt
        (expunges, messages numbered below others) may move every index:
        one taken before the read may name another message after it.

        @raise MessageGone: if the message was expunged meanwhile.
        """
        uids = self.folder.uids
        i = self._index
        if i >= len(uids) or uids[i] != self.uid:
            i = self.folder.position(self.uid)
            if i is None:
                raise MessageGone(self.uid)
            self._index = i
        return i

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self.folder.readCRLF(self.index)
        return self._data

    @property
    def part(self) -> MessagePart:
        if self._part is None:
            self._part = MessagePart(self.data)
        return self._part

    def rendered(self, name: bytes, make) -> bytes:
        """
        The rendering C{name} of this message, from the folder's cache.
        """
        return folderCache(self.folder).get(self.uid, name, make)

    @property
    def header(self) -> bytes:
        return self.rendered(b"HEADER", lambda: self.part.header)


def sectionContent(item: FetchItem, message: MessageData) -> bytes | None:
    """
    The octets of a BODY[section], or None for a part that does not exist.
    """
    if not item.parts:
        if item.text == b"":
            content = message.data
        elif item.text == b"TEXT":
            content = message.part.body
        else:
            content = _headerOf(item, message.header)
    else:
        try:
            node = message.part.subPart(item.parts)
        except LookupError:
            return None
        if item.text == b"":
            content = node.body
        elif item.text == b"MIME":
            content = node.header
        else:
            inner = node.embedded
            content = _textOf(item, inner) if inner is not None else b""
    if item.partial is not None:
        start, length = item.partial
        content = content[start : start + length]
    return content


def _textOf(item: FetchItem, part: MessagePart) -> bytes:
    if item.text == b"TEXT":
        return part.body
    return _headerOf(item, part.header)


def _headerOf(item: FetchItem, header: bytes) -> bytes:
    if item.text == b"HEADER":
        return header
    return selectFields(header, item.fields, negate=item.text.endswith(b".NOT"))


def render(item: FetchItem, view: SelectedFolder, message: MessageData) -> bytes:
    """
    One attribute of one message, as it appears in the FETCH response.
    """
    folder = view.folder
    name = item.name
    # Asked for each attribute: reading the message for the one before
    # may have moved it in the folder (MessageData.index).
    index = message.index
    if name == b"UID":
        return b"UID %d" % folder.uids[index]
    if name == b"FLAGS":
        return b"FLAGS " + view.flagList(index)
    if name == b"RFC822.SIZE":
        return b"RFC822.SIZE %d" % folder.sizes(index)[1]
    if name == b"INTERNALDATE":
        return b"INTERNALDATE " + wire.internalDate(folder.internalDate(index))
    if name == b"ENVELOPE":
        return b"ENVELOPE " + message.rendered(name, lambda: wire.collapse(envelope(message.part)))
    if name == b"BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + message.rendered(name, lambda: wire.collapse(message.part.bodyStructure(True)))
    if name == b"BODY":
        return b"BODY " + message.rendered(name, lambda: wire.collapse(message.part.bodyStructure(False)))
    if name == b"RFC822":
        return b"RFC822 " + wire.literal(message.data)
    if name == b"RFC822.HEADER":
        return b"RFC822.HEADER " + wire.literal(message.header)
    if name == b"RFC822.TEXT":
        return b"RFC822.TEXT " + wire.literal(message.part.body)
    content = sectionContent(item, message)
    return item.label + b" " + (b"NIL" if content is None else wire.literal(content))


@dataclass
class FetchRequest:
    """
    A FETCH to answer: the view, the session positions (merged spans),
    the items, whether it is a UID FETCH, and the folder indexes whose
    \\Seen flag this FETCH just set (their FLAGS are added).
    """

    view: SelectedFolder
    spans: list[tuple[int, int]]
    items: list[FetchItem]
    uid: bool
    seenSet: set[int] = field(default_factory=set)
    missing: int = 0

    def __post_init__(self) -> None:
        names = {i.name for i in self.items}
        if self.uid and b"UID" not in names:
            self.items.insert(0, FetchItem(b"UID"))

    def positions(self) -> Iterator[int]:
        for start, stop in self.spans:
            yield from range(start, stop)

    def responses(self) -> Iterator[bytes]:
        """
        The FETCH responses, in batches of about L{BATCH} octets.
        """
        names = [i.name for i in self.items]
        if set(names) <= {b"UID", b"FLAGS"}:
            return self._flagsOnly(names)
        if self._bodyFastPath():
            return self._bodies()
        return self._general()

    def _general(self) -> Iterator[bytes]:
        return _batched(self._generalLines())

    def _generalLines(self) -> Iterator[bytes]:
        view = self.view
        items = self.items
        hasFlags = any(i.name == b"FLAGS" for i in items)
        for p in self.positions():
            i = view.index(p)
            if i is None:
                self.missing += 1
                continue
            message = MessageData(view.folder, i)
            try:
                rendered = [render(item, view, message) for item in items]
                i = message.index
            except (MessageGone, FileNotFoundError):
                self.missing += 1
                continue
            if i in self.seenSet and not hasFlags:
                rendered.append(b"FLAGS " + view.flagList(i))
            yield b"* %d FETCH (%b)\r\n" % (p + 1, b" ".join(rendered))

    def _flagsOnly(self, names: list[bytes]) -> Iterator[bytes]:
        """
        Fast path: UID and FLAGS only, formatted in a tight loop.
        """
        view = self.view
        flagList = view.flagList
        formats = {
            (b"UID", b"FLAGS"): lambda seq, uid, i: b"* %d FETCH (UID %d FLAGS %b)\r\n" % (seq, uid, flagList(i)),
            (b"FLAGS", b"UID"): lambda seq, uid, i: b"* %d FETCH (FLAGS %b UID %d)\r\n" % (seq, flagList(i), uid),
            (b"FLAGS",): lambda seq, uid, i: b"* %d FETCH (FLAGS %b)\r\n" % (seq, flagList(i)),
            (b"UID",): lambda seq, uid, i: b"* %d FETCH (UID %d)\r\n" % (seq, uid),
        }
        line = formats.get(tuple(names))
        if line is None:
            yield from self._general()
            return
        index = view.index
        sessionUids = view.uids
        batch: list[bytes] = []
        for start, stop in self.spans:
            for p in range(start, stop):
                # Someone may expunge while we produce: look again each time.
                i = p if view.synced else index(p)
                if i is None:
                    self.missing += 1
                    continue
                batch.append(line(p + 1, sessionUids[p], i))
                if len(batch) >= 1024:
                    yield b"".join(batch)
                    batch = []
        if batch:
            yield b"".join(batch)

    def _bodyFastPath(self) -> bool:
        """
        Whether only UID, FLAGS, RFC822.SIZE and whole bodies (BODY[],
        BODY.PEEK[], RFC822) are asked for.
        """
        for item in self.items:
            if item.name in (b"UID", b"FLAGS", b"RFC822.SIZE", b"RFC822"):
                continue
            if item.name == b"BODY[]" and not item.parts and not item.text and item.partial is None:
                continue
            return False
        return True

    def _bodies(self) -> Iterator[bytes]:
        """
        Fast path: whole messages, read and framed inline.
        """
        return _batched(self._bodyLines())

    def _bodyLines(self) -> Iterator[bytes]:
        view = self.view
        folder = view.folder
        items = self.items
        kinds = [(item.name, item.label) for item in items]
        hasFlags = any(name == b"FLAGS" for name, _ in kinds)
        flagList = view.flagList
        for p in self.positions():
            i = view.index(p)
            if i is None:
                self.missing += 1
                continue
            message = MessageData(folder, i)
            try:
                data = message.data
                # Where the read left it (MessageData.index).
                i = message.index
            except (MessageGone, FileNotFoundError):
                self.missing += 1
                continue
            pieces = []
            for name, label in kinds:
                if name == b"UID":
                    pieces.append(b"UID %d" % folder.uids[i])
                elif name == b"FLAGS":
                    pieces.append(b"FLAGS " + flagList(i))
                elif name == b"RFC822.SIZE":
                    pieces.append(b"RFC822.SIZE %d" % folder.sizes(i)[1])
                elif name == b"RFC822":
                    pieces.append(b"RFC822 {%d}\r\n%b" % (len(data), data))
                else:
                    pieces.append(b"%b {%d}\r\n%b" % (label, len(data), data))
            if i in self.seenSet and not hasFlags:
                pieces.append(b"FLAGS " + flagList(i))
            yield b"* %d FETCH (%b)\r\n" % (p + 1, b" ".join(pieces))


def _batched(lines: Iterator[bytes]) -> Iterator[bytes]:
    """
    Lines joined into pieces of about L{BATCH} octets: one write each.
    """
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= BATCH:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)
