"""
Formatting IMAP response data (RFC 3501 section 4): strings, lists,
mailbox names, dates and flags.
"""

from __future__ import annotations

import datetime
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


# RFC 3501 section 9: date-time = DQUOTE date-day-fixed "-" date-month "-"
# date-year SP time SP zone DQUOTE, date-day-fixed = (SP DIGIT) / 2DIGIT
# (a lone digit is taken too).  Fixed widths: no number of a thousand
# digits ever reaches int().
_DATE_TIME = re.compile(
    rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})\Z"
)
# date = date-text / DQUOTE date-text DQUOTE, date-text = date-day "-"
# date-month "-" date-year, date-day = 1*2DIGIT.
_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z")


def parseDateTime(value: bytes) -> float | None:
    """
    Seconds since the epoch for an APPEND date-time
    (C{" 7-Jul-1996 02:44:25 -0700"}), or None if malformed or if it
    names no real moment (31-Feb, hour 25, zone minutes over 59).
    """
    m = _DATE_TIME.match(value)
    if m is None:
        return None
    day, month, year, hour, minute, second, sign, zoneHours, zoneMinutes = m.groups()
    monthNumber = _MONTH_NUMBERS.get(month.lower())
    if monthNumber is None or int(zoneMinutes) > 59:
        return None
    try:
        moment = datetime.datetime(
            int(year), monthNumber, int(day), int(hour), int(minute), int(second), tzinfo=datetime.timezone.utc
        )
    except ValueError:
        return None
    offset = (int(zoneHours) * 60 + int(zoneMinutes)) * 60
    return moment.timestamp() - (offset if sign == b"+" else -offset)


def parseSearchDate(value: bytes) -> datetime.date | None:
    """
    An RFC 3501 C{date} (C{1-Feb-1994}), or None if malformed or not a
    real day.
    """
    m = _DATE.match(value)
    if m is None:
        return None
    day, month, year = m.groups()
    monthNumber = _MONTH_NUMBERS.get(month.lower())
    if monthNumber is None:
        return None
    try:
        return datetime.date(int(year), monthNumber, int(day))
    except ValueError:
        return None


# Flags ----------------------------------------------------------------------

SYSTEM_FLAGS = (
    (maildir.ANSWERED, b"\\Answered"),
    (maildir.FLAGGED, b"\\Flagged"),
    (maildir.DELETED, b"\\Deleted"),
    (maildir.SEEN, b"\\Seen"),
    (maildir.DRAFT, b"\\Draft"),
)
FLAG_BITS = {name.lower(): bit for bit, name in SYSTEM_FLAGS}
RECENT = b"\\Recent"
# A keyword like any other, stored in dovecot-keywords as Dovecot stores
# it; files from older maild versions carry it as the Maildir letter P
# instead (the FORWARDED bit), shown under the same name.
FORWARDED = b"$Forwarded"


# RFC 3501 section 9: flag-keyword = atom; ATOM-CHAR is any CHAR (7-bit)
# but the atom-specials ( ) { SP CTL % * " \ ].
_KEYWORD = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+\Z')


def isKeyword(name: bytes) -> bool:
    """
    Whether C{name} may be a keyword: an atom, so that it can go back to
    every client inside FLAGS and PERMANENTFLAGS.
    """
    return _KEYWORD.match(name) is not None


def keywordNames(keywords: list[str]) -> list[bytes]:
    """
    The keywords that can be shown, as octets: a name another program
    wrote in C{dovecot-keywords} that is no atom would break the response
    for every client, and is left out.
    """
    names = (k.encode("utf-8", "replace") for k in keywords)
    return [name for name in names if isKeyword(name)]


def flagNames(bits: int, keywords: list[str], recent: bool) -> bytes:
    """
    The FLAGS list of a message.
    """
    names = [name for bit, name in SYSTEM_FLAGS if bits & bit]
    names.extend(keywordNames(keywords))
    if bits & maildir.FORWARDED and not any(k.lower() == "$forwarded" for k in keywords):
        names.append(FORWARDED)
    if recent:
        names.append(RECENT)
    return b"(" + b" ".join(names) + b")"
