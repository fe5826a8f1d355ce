"""
The MIME structure of a message, byte-exact, as FETCH needs it: header
and body sections (RFC 3501 section 6.4.5), BODYSTRUCTURE and ENVELOPE
(section 7.4.2).

Twisted's helpers rebuild headers from a dict (losing order, repeated
fields and the original bytes) and cannot encode 8-bit header values, so
sections are cut from the message's own octets here.
"""

from __future__ import annotations

import email.utils
import io
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.mail.imap4 import IMessagePart
from zope.interface import implementer

from maild.imap.wire import Adjacent

_headerParser = BytesHeaderParser(policy=compat32)
# Nesting beyond any real message's: MIME parts (multiparts and messages
# inside messages) and comments in address fields.
MAX_DEPTH = 50
MAX_COMMENT_DEPTH = 50
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
        self._parsed: Message | None = None
        self._parts: list[MessagePart] | None = None

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

    @property
    def parsed(self) -> Message:
        if self._parsed is None:
            self._parsed = _headerParser.parsebytes(self.header)
        return self._parsed

    def field(self, name: bytes) -> bytes | None:
        """
        The unfolded value of the first field C{name}, or None.
        """
        for fieldName, raw in headerFields(self.header):
            if fieldName == name:
                return unfold(raw)
        return None

    @property
    def contentType(self) -> str:
        value = self.parsed.get("content-type")
        if value is None:
            return self.defaultType
        ctype = self.parsed.get_content_type()
        if "/" not in value.split(";", 1)[0]:
            return "text/plain"
        return ctype

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
            boundary = self.parsed.get_param("boundary") if self.isMultipart() else None
            if isinstance(boundary, tuple):
                boundary = email.utils.collapse_rfc2231_value(boundary)
            if boundary:
                childType = "message/rfc822" if self.contentType == "multipart/digest" else "text/plain"
                self._parts = [MessagePart(p, childType) for p in _splitMultipart(self.body, boundary.encode("utf-8", "replace"))]
        return self._parts

    @property
    def embedded(self) -> "MessagePart | None":
        """
        The message inside a message/rfc822 part.
        """
        if self.contentType == "message/rfc822":
            return MessagePart(self.body)
        return None

    def subPart(self, numbers: list[int]) -> "MessagePart":
        """
        The part named by a section's part numbers (C{[1, 2]} is
        C{BODY[1.2]}).  Part 1 of a non-multipart entity is its body; the
        parts of a message/rfc822 part are those of the message inside it
        (RFC 3501 section 6.4.5).

        @raise LookupError: when there is no such part.
        """
        part = self
        for n in numbers:
            if part.isMultipart():
                if not 1 <= n <= len(part.parts):
                    raise LookupError(n)
                part = part.parts[n - 1]
            elif part is not self and part.contentType == "message/rfc822":
                inner = part.embedded
                if inner.isMultipart():
                    if not 1 <= n <= len(inner.parts):
                        raise LookupError(n)
                    part = inner.parts[n - 1]
                elif n == 1:
                    part = inner
                else:
                    raise LookupError(n)
            elif n != 1:
                raise LookupError(n)
        return part

    def bodyStructure(self, extended: bool, depth: int = 0) -> list:
        """
        BODY / BODYSTRUCTURE as nested lists for L{maild.imap.wire.collapse}.

        Parts nested deeper than L{MAX_DEPTH} (multiparts or messages
        inside messages) are described as opaque leaves: anyone can send
        a message of 600 nested multiparts, and its BODYSTRUCTURE must
        neither exhaust the stack nor fail the rest of a FETCH.
        """
        if depth >= MAX_DEPTH and (self.isMultipart() or self.contentType == "message/rfc822"):
            return ["application", "octet-stream", None, None, None, "7bit", len(self.body)]
        if self.isMultipart():
            parts = self.parts
            if not parts:
                return ["text", "plain", ["charset", "us-ascii"], None, None, "7bit", len(self.body), self.body.count(b"\n")]
            children = [p.bodyStructure(extended, depth + 1) for p in parts]
            result: list = [Adjacent(children), self.contentType.split("/", 1)[1]]
            if extended:
                result += [self._params(exclude=()), self._disposition(), self._language(), self._location()]
            return result
        main, sub = self.contentType.split("/", 1)
        result = [
            main,
            sub,
            self._params(exclude=()) or (["charset", "us-ascii"] if main == "text" else None),
            self._str(b"content-id"),
            self._str(b"content-description"),
            (self._str(b"content-transfer-encoding") or "7bit"),
            len(self.body),
        ]
        if main == "text":
            result.append(self.body.count(b"\n"))
        elif self.contentType == "message/rfc822":
            inner = self.embedded
            result += [envelope(inner), inner.bodyStructure(extended, depth + 1), self.body.count(b"\n")]
        if extended:
            result += [self._str(b"content-md5"), self._disposition(), self._language(), self._location()]
        return result

    def _str(self, name: bytes) -> bytes | None:
        return self.field(name)

    def _params(self, exclude) -> list | None:
        params = self.parsed.get_params(header="content-type")
        if not params:
            return None
        out = []
        for key, value in params[1:]:
            if isinstance(value, tuple):
                value = email.utils.collapse_rfc2231_value(value)
            out += [key, email.utils.unquote(value) if isinstance(value, str) else value]
        return out or None

    def _disposition(self) -> list | None:
        if self.parsed.get("content-disposition") is None:
            return None
        params = self.parsed.get_params(header="content-disposition") or []
        if not params:
            return None
        kind = params[0][0]
        rest = []
        for key, value in params[1:]:
            if isinstance(value, tuple):
                value = email.utils.collapse_rfc2231_value(value)
            rest += [key, value]
        return [kind, rest or None]

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


def _commentDepth(value: bytes) -> int:
    """
    How deeply RFC 5322 comments nest in a header value (parentheses
    outside quoted strings).
    """
    deepest = depth = 0
    quoted = escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif c == 0x5C:  # backslash
            escaped = True
        elif quoted:
            quoted = c != 0x22
        elif c == 0x22:
            quoted = True
        elif c == 0x28:
            depth += 1
            deepest = max(deepest, depth)
        elif c == 0x29 and depth:
            depth -= 1
    return deepest


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
    if not value or _commentDepth(value) > MAX_COMMENT_DEPTH:
        # The email package parses comments recursively: a From: of 3,000
        # "(" (anyone can deliver one) would exhaust the stack.  The field
        # shows as NIL instead.
        return None
    text = value.decode("utf-8", "surrogateescape")
    out = []
    for name, address in email.utils.getaddresses([text]):
        if not name and not address:
            continue
        mailbox, _, host = address.rpartition("@") if "@" in address else (address, "", "")
        out.append([name or None, None, mailbox or None, host or None])
    return out or None
