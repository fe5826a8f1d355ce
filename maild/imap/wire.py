"""
Formatting IMAP response data (RFC 3501 section 4): strings, lists,
mailbox names, dates and flags.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from maild.store import maildir

_MONTHS = [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"]
_MONTH_NUMBERS = {m.lower(): i + 1 for i, m in enumerate(_MONTHS)}


# Octets a quoted string cannot hold (RFC 3501 section 9: QUOTED-CHAR).
_NOT_QUOTABLE = re.compile(rb"[\x00\r\n\x80-\xff]")


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n%b" % (len(data), data)


def string(value: bytes | str | None) -> bytes:
    """
    An nstring: NIL, a quoted string, or a literal when the value holds
    octets a quoted string cannot (8-bit, CR, LF, NUL).
    """
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if _NOT_QUOTABLE.search(value):
        return literal(value)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class Adjacent(list):
    """
    Items written one after the other with no space between them (the
    body parts of a multipart BODYSTRUCTURE).
    """


def collapse(items: Any) -> bytes:
    """
    A parenthesized list of nested items: None is NIL, int a number,
    bytes/str a string, lists are nested lists (an empty list is C{()}).
    """
    if items is None:
        return b"NIL"
    if isinstance(items, int):
        return b"%d" % items
    if isinstance(items, (bytes, str)):
        return string(items)
    if isinstance(items, Adjacent):
        return b"".join(collapse(i) for i in items)
    return b"(" + b" ".join(collapse(i) for i in items) + b")"


@functools.lru_cache(maxsize=4096)
def mailboxName(name: str) -> bytes:
    """
    A folder name as it goes on the wire: modified UTF-7, quoted (kept:
    every LIST and STATUS of every session writes the same few names).
    """
    import twisted.mail.imap4  # noqa: F401  (registers "imap4-utf-7")

    return string(name.encode("imap4-utf-7"))


def internalDate(seconds: float) -> bytes:
    """
    RFC 3501 date-time: C{"17-Jul-1996 02:44:25 -0700"}, in local time.
    """
    t = time.localtime(seconds)
    offset = t.tm_gmtoff // 60
    sign = b"+" if offset >= 0 else b"-"
    offset = abs(offset)
    return b'"%02d-%s-%04d %02d:%02d:%02d %s%02d%02d"' % (
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
        sign,
        offset // 60,
        offset % 60,
    )


def parseDateTime(value: bytes) -> float | None:
    """
    Seconds since the epoch for an APPEND date-time
    (C{" 7-Jul-1996 02:44:25 -0700"}), or None if malformed.
    """
    import calendar

    try:
        date, clock, zone = value.strip().split(b" ")
        day, month, year = date.split(b"-")
        hour, minute, second = (int(x) for x in clock.split(b":"))
        monthNumber = _MONTH_NUMBERS[month.lower()]
        if len(zone) != 5 or zone[:1] not in b"+-" or not zone[1:].isdigit():
            return None
        offset = (int(zone[1:3]) * 60 + int(zone[3:5])) * 60
        if zone[:1] == b"-":
            offset = -offset
        stamp = calendar.timegm((int(year), monthNumber, int(day), hour, minute, second))
    except (ValueError, KeyError, OverflowError):
        return None
    return stamp - offset


def parseSearchDate(value: bytes) -> tuple[int, int, int] | None:
    """
    An RFC 3501 C{date} (C{1-Feb-1994}) as (year, month, day).
    """
    try:
        day, month, year = value.split(b"-")
        return int(year), _MONTH_NUMBERS[month.lower()], int(day)
    except (ValueError, KeyError):
        return None


# Flags ----------------------------------------------------------------------

SYSTEM_FLAGS = (
    (maildir.ANSWERED, b"\\Answered"),
    (maildir.FLAGGED, b"\\Flagged"),
    (maildir.DELETED, b"\\Deleted"),
    (maildir.SEEN, b"\\Seen"),
    (maildir.DRAFT, b"\\Draft"),
    # Maildir's P ("passed"), which Dovecot maps to this keyword.
    (maildir.FORWARDED, b"$Forwarded"),
)
FLAG_BITS = {name.lower(): bit for bit, name in SYSTEM_FLAGS}
RECENT = b"\\Recent"


def flagNames(bits: int, keywords: list[str], recent: bool) -> bytes:
    """
    The FLAGS list of a message.
    """
    names = [name for bit, name in SYSTEM_FLAGS if bits & bit]
    names.extend(k.encode("utf-8") for k in keywords)
    if recent:
        names.append(RECENT)
    return b"(" + b" ".join(names) + b")"
