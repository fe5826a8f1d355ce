"""
The header section of an arriving message, as the checks need it: the
fields as (name, value) pairs, read without the email package (a message
with broken headers still gets results, never a traceback), and the
filter that removes forged Authentication-Results fields on the way to
the store.
"""

from __future__ import annotations

import re

# How much of a header section is held back for filtering: past this,
# what is held is filtered and passed on, and the rest goes as it comes.
MAX_HEADER_SECTION = 256 * 1024

_AUTHSERV_ID = re.compile(rb"\s*(?:\([^)]*\)\s*)*([^\s;()]+)")


def splitFields(section: bytes) -> list[bytes]:
    """
    The fields of a header section (CRLF line ends), each with its
    continuation lines and line end.
    """
    fields: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def unfold(value: bytes) -> bytes:
    """
    C{value} without its line breaks: every LF, and the CR before it if
    any (RFC 5322 section 2.2.3), as C{re.sub(rb"\r?\n", b"", value)}
    gives it, without an expression tried at every octet.
    """
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"").replace(b"\n", b"")


def parseFields(section: bytes) -> list[tuple[str, str]]:
    """
    The fields of a header section as C{(lower-case name, unfolded value)},
    decoded as UTF-8 with replacement; lines without a colon are skipped.
    """
    parsed = []
    for field in splitFields(section):
        name, colon, value = field.partition(b":")
        if not colon:
            continue
        text = unfold(value).decode("utf-8", "replace").strip()
        parsed.append((name.strip().decode("ascii", "replace").lower(), text))
    return parsed


def isOurResults(field: bytes, hostname: str) -> bool:
    """
    Whether C{field} is an Authentication-Results field whose authserv-id
    is C{hostname}: one that claims to be ours (RFC 8601 section 5).
    """
    name, colon, value = field.partition(b":")
    if not colon or name.strip().lower() != b"authentication-results":
        return False
    match = _AUTHSERV_ID.match(unfold(value))
    return bool(match) and match.group(1).lower() == hostname.lower().encode("utf-8", "replace")


class HeaderFilter:
    """
    Passes message content on, holding the header section back until it is
    complete so that fields claiming our C{hostname} in an
    Authentication-Results field can be removed.

    @ivar section: the header section as received (once complete).
    @ivar removed: how many fields were removed.
    """

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self._held = bytearray()
        self.done = False
        self.section = b""
        self.removed = 0

    def feed(self, content: bytes) -> bytes:
        """
        @return: what may be written now.
        """
        if self.done:
            return content
        start = max(0, len(self._held) - 3)
        self._held += content
        if self._held.startswith(b"\r\n"):
            end = 0
        else:
            end = self._held.find(b"\r\n\r\n", start)
            if end >= 0:
                end += 2
        if end < 0:
            if len(self._held) <= MAX_HEADER_SECTION:
                return b""
            end = len(self._held)
        return self._release(end)

    def finish(self) -> bytes:
        """
        The end of the message: whatever is still held back.
        """
        if self.done:
            return b""
        return self._release(len(self._held))

    def _release(self, end: int) -> bytes:
        held, self._held = bytes(self._held), bytearray()
        self.done = True
        self.section = held[:end]
        kept = []
        for field in splitFields(self.section):
            if isOurResults(field, self.hostname):
                self.removed += 1
            else:
                kept.append(field)
        return b"".join(kept) + held[end:]
