"""
The MIME structure of a message, byte-exact, as FETCH needs it: header
and body sections (RFC 3501 section 6.4.5), BODYSTRUCTURE and ENVELOPE
(section 7.4.2).

Twisted's helpers rebuild headers from a dict (losing order, repeated
fields and the original bytes) and cannot encode 8-bit header values, so
sections are cut from the message's own octets here.
"""

from __future__ import annotations

import io
import re

from twisted.mail.imap4 import IMessagePart
from zope.interface import implementer

from maild.imap.headervalues import ContentValue, parseAddressList, parseContentValue
from maild.imap.wire import Adjacent

_FIELD_NAME = re.compile(rb"([^:\s]+)[ \t]*:")


def splitHeader(data: bytes) -> tuple[bytes, bytes]:
    """
    The header (with the blank line that ends it) and the body of a
    message or part in CRLF form.
    """
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 4], data[end + 4 :]


def headerFields(header: bytes) -> list[tuple[bytes, bytes]]:
    """
    The fields of a header as (lower-case name, raw octets including the
    continuation lines and the final CRLF).
    """
    fields: list[tuple[bytes, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
            continue
        m = _FIELD_NAME.match(line)
        fields.append((m.group(1).lower() if m else b"", line))
    return fields


def selectFields(header: bytes, names: list[bytes], negate: bool) -> bytes:
    """
    HEADER.FIELDS / HEADER.FIELDS.NOT: the chosen fields, in their order,
    then the blank line.
    """
    wanted = {n.lower() for n in names}
    chosen = [raw for name, raw in headerFields(header) if (name in wanted) != negate]
    return b"".join(chosen) + b"\r\n"


def unfold(raw: bytes) -> bytes:
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    return re.sub(rb"\r?\n[ \t]", b" ", value).strip()


@implementer(IMessagePart)
class MessagePart:
    """
    One MIME entity (a whole message or a body part), over its octets in
    CRLF form.
    """

    def __init__(self, data: bytes, defaultType: str = "text/plain") -> None:
        self.data = data
        self.header, self.body = splitHeader(data)
        self.defaultType = defaultType
        self._contentValue: ContentValue | None = None
        self._parts: list[MessagePart] | None = None
        self._embedded: MessagePart | None = None
        self._firstFields: dict[bytes, bytes] | None = None

    # IMessagePart -----------------------------------------------------------

    def getHeaders(self, negate, *names):
        wanted = {n.lower() if isinstance(n, str) else n.decode().lower() for n in names}
        headers = {}
        for name, raw in headerFields(self.header):
            key = name.decode("ascii", "replace")
            if (key in wanted) != negate:
                headers[key] = unfold(raw).decode("utf-8", "replace")
        return headers

    def getBodyFile(self):
        return io.BytesIO(self.body)

    def getSize(self) -> int:
        return len(self.data)

    def isMultipart(self) -> bool:
        return self.mainType == "multipart"

    def getSubPart(self, part: int) -> "MessagePart":
        return self.parts[part]

    # Structure --------------------------------------------------------------

    def field(self, name: bytes) -> bytes | None:
        """
        The unfolded value of the first field C{name}, or None.
        """
        if self._firstFields is None:
            first: dict[bytes, bytes] = {}
            for fieldName, raw in headerFields(self.header):
                first.setdefault(fieldName, raw)
            self._firstFields = first
        raw = self._firstFields.get(name)
        return None if raw is None else unfold(raw)

    @property
    def contentValue(self) -> ContentValue:
        """
        The Content-Type and its parameters; without a Content-Type, the
        default type of where the part is (RFC 2046 section 5.1.5), and
        one that cannot be read is text/plain (RFC 2045 section 5.2).
        """
        if self._contentValue is None:
            raw = self.field(b"content-type")
            if raw is None:
                self._contentValue = ContentValue(self.defaultType.encode(), ())
            else:
                value = parseContentValue(raw, typed=True)
                if value.value is None:
                    value = ContentValue(b"text/plain", value.params)
                self._contentValue = value
        return self._contentValue

    @property
    def contentType(self) -> str:
        return self.contentValue.value.decode("ascii", "replace")

    @property
    def mainType(self) -> str:
        return self.contentType.split("/", 1)[0]

    @property
    def parts(self) -> list["MessagePart"]:
        """
        The body parts of a multipart entity (empty for others).
        """
        if self._parts is None:
            self._parts = []
            boundary = self.contentValue.get(b"boundary") if self.isMultipart() else None
            if boundary:
                childType = "message/rfc822" if self.contentType == "multipart/digest" else "text/plain"
                self._parts = [MessagePart(p, childType) for p in _splitMultipart(self.body, boundary)]
        return self._parts

    @property
    def embedded(self) -> "MessagePart | None":
        """
        The message inside a message/rfc822 part.
        """
        if self._embedded is None and self.contentType == "message/rfc822":
            self._embedded = MessagePart(self.body)
        return self._embedded

    @property
    def children(self) -> list["MessagePart"]:
        """
        The parts that section numbers name one level below this one
        (RFC 3501 section 6.4.5): the body parts of a multipart; for a
        message/rfc822 part, those of the message inside it, which is
        itself part 1 when it is not a multipart (so C{BODY[2.1]} of a
        message/rfc822 part 2 holding a text message is that text).
        """
        if self.isMultipart():
            return self.parts
        inner = self.embedded
        if inner is None:
            return []
        return inner.parts if inner.isMultipart() else [inner]

    def subPart(self, numbers: list[int]) -> "MessagePart":
        """
        The part named by a section's part numbers (C{[1, 2]} is
        C{BODY[1.2]}).  Part 1 of a message that is not a multipart is the
        message itself (its body is C{BODY[1]}); below it, numbers walk
        L{children}.  As Dovecot does, 1 below a part with no children
        names that part again.

        @raise LookupError: when there is no such part.
        """
        part = self
        for depth, n in enumerate(numbers):
            if depth == 0:
                candidates = self.parts if self.isMultipart() else [self]
            else:
                candidates = part.children
            if not candidates and n == 1:
                continue
            if not 1 <= n <= len(candidates):
                raise LookupError(n)
            part = candidates[n - 1]
        return part

    def bodyStructure(self, extended: bool) -> list:
        """
        BODY / BODYSTRUCTURE as nested lists for L{maild.imap.wire.collapse}.
        """
        if self.isMultipart():
            parts = self.parts
            if not parts:
                return ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", len(self.body), self.body.count(b"\n")]
            result: list = [Adjacent([p.bodyStructure(extended) for p in parts]), self.contentType.split("/", 1)[1]]
            if extended:
                result += [self._params(), self._disposition(), self._language(), self._location()]
            return result
        main, sub = self.contentType.split("/", 1)
        result = [
            main,
            sub,
            self._params(),
            self._str(b"content-id"),
            self._str(b"content-description"),
            (self._str(b"content-transfer-encoding") or "7bit"),
            len(self.body),
        ]
        if main == "text":
            result.append(self.body.count(b"\n"))
        elif self.contentType == "message/rfc822":
            inner = self.embedded
            result += [envelope(inner), inner.bodyStructure(extended), self.body.count(b"\n")]
        if extended:
            result += [self._str(b"content-md5"), self._disposition(), self._language(), self._location()]
        return result

    def _str(self, name: bytes) -> bytes | None:
        return self.field(name)

    def _params(self) -> list | None:
        params = self.contentValue.params
        out = [item for pair in params for item in pair]
        # RFC 2045 section 5.2: text is us-ascii unless it says otherwise.
        if self.mainType == "text" and not any(key in (b"charset", b"charset*") for key, _ in params):
            out += [b"charset", b"us-ascii"]
        return out or None

    def _disposition(self) -> list | None:
        raw = self.field(b"content-disposition")
        if raw is None:
            return None
        disposition = parseContentValue(raw, typed=False)
        if disposition.value is None:
            return None
        params = [item for pair in disposition.params for item in pair]
        return [disposition.value, params or None]

    def _language(self) -> bytes | None:
        return self.field(b"content-language")

    def _location(self) -> bytes | None:
        return self.field(b"content-location")


def _splitMultipart(body: bytes, boundary: bytes) -> list[bytes]:
    delimiter = b"--" + boundary
    parts = []
    pos = 0
    start = None
    while True:
        found = body.find(delimiter, pos)
        if found < 0:
            break
        if found != 0 and body[found - 2 : found] != b"\r\n":
            pos = found + len(delimiter)
            continue
        lineEnd = body.find(b"\r\n", found)
        if lineEnd < 0:
            lineEnd = len(body)
        after = body[found + len(delimiter) : found + len(delimiter) + 2]
        if start is not None:
            parts.append(body[start : max(start, found - 2)])
        if after == b"--":
            start = None
            break
        start = lineEnd + 2
        pos = start
    if start is not None and start <= len(body):
        parts.append(body[start:])
    return parts


def envelope(part: MessagePart) -> list:
    """
    ENVELOPE (RFC 3501 section 7.4.2): the raw header values, addresses
    split into (name adl mailbox host).
    """
    fromField = _addresses(part.field(b"from"))
    sender = _addresses(part.field(b"sender")) or fromField
    replyTo = _addresses(part.field(b"reply-to")) or fromField
    return [
        part.field(b"date"),
        part.field(b"subject"),
        fromField,
        sender,
        replyTo,
        _addresses(part.field(b"to")),
        _addresses(part.field(b"cc")),
        _addresses(part.field(b"bcc")),
        part.field(b"in-reply-to"),
        part.field(b"message-id"),
    ]


def _addresses(value: bytes | None) -> list | None:
    if not value:
        return None
    return [address.asList() for address in parseAddressList(value)] or None
