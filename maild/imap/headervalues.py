"""
Structured header field values, read from their raw (unfolded) octets:
address lists (RFC 5322 section 3.4, with the obsolete source routes of
section 4.4) and MIME types with their parameters (RFC 2045 section 5.1,
continued and encoded as RFC 2231 allows).

The standard library's parsers either drop groups and source routes
(C{email.utils.getaddresses}) or read folded and continued parameters
wrongly, and decode what IMAP must serve as sent; these small lexers keep
the octets.  Nothing here recurses: a value with thousands of nested
comments costs one pass.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

_WHITESPACE = b" \t\r\n"
# RFC 5322 section 3.2.3 specials, less "." (a dot joins the words of a
# local part, a domain or an obsolete phrase) and the quote and
# parentheses the lexer reads itself.
_ADDRESS_DELIMITERS = b"<>[]:;@\\,"
# RFC 2045 section 5.1 tspecials, less the quote and parentheses.
_MIME_DELIMITERS = b"<>@,;:\\/[]?="


def _lex(value: bytes, delimiters: bytes, domainLiterals: bool) -> list[tuple[str, bytes]]:
    """
    The tokens of a structured value as (kind, octets): C{"atom"},
    C{"quoted"} (escapes removed), C{"comment"} (the outermost comment's
    text), C{"literal"} (a domain literal, brackets kept) or a delimiter
    character as its own kind with empty octets.
    """
    tokens: list[tuple[str, bytes]] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in _WHITESPACE:
            i += 1
        elif c == 0x28:  # (: comments nest (RFC 5322 section 3.2.2)
            depth, j, text = 1, i + 1, bytearray()
            while j < n:
                d = value[j]
                if d == 0x5C and j + 1 < n:
                    text.append(value[j + 1])
                    j += 2
                    continue
                j += 1
                if d == 0x28:
                    depth += 1
                elif d == 0x29:
                    depth -= 1
                    if depth == 0:
                        break
                text.append(d)
            tokens.append(("comment", bytes(text)))
            i = j
        elif c == 0x22:  # "
            j, text = i + 1, bytearray()
            while j < n and value[j] != 0x22:
                if value[j] == 0x5C and j + 1 < n:
                    j += 1
                text.append(value[j])
                j += 1
            tokens.append(("quoted", bytes(text)))
            i = j + 1
        elif c == 0x5B and domainLiterals:  # [
            j = value.find(b"]", i)
            j = n if j < 0 else j + 1
            tokens.append(("literal", value[i:j]))
            i = j
        elif c in delimiters:
            tokens.append((chr(c), b""))
            i += 1
        else:
            j = i + 1
            while j < n and value[j] not in delimiters and value[j] not in b' \t\r\n"(':
                j += 1
            tokens.append(("atom", value[i:j]))
            i = j
    return tokens


# Addresses ----------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """
    One entry of an ENVELOPE address list (RFC 3501 section 7.4.2):
    display name, source route, mailbox (local part) and host.  A group
    is announced by an entry with only a mailbox (the group's name) and
    ended by an entry of four NILs.
    """

    name: bytes | None
    route: bytes | None
    mailbox: bytes | None
    host: bytes | None

    def asList(self) -> list:
        return [self.name, self.route, self.mailbox, self.host]


GROUP_END = Address(None, None, None, None)


def parseAddressList(value: bytes) -> list[Address]:
    """
    The addresses of an address-list field (From, To, Cc...), groups
    marked as ENVELOPE marks them.  Comments are never part of an address;
    the first comment of an address without a display name stands in for
    it (C{user@domain (Real Name)}).
    """
    tokens = _lex(value, _ADDRESS_DELIMITERS, domainLiterals=True)
    out: list[Address] = []
    inGroup = False
    i, n = 0, len(tokens)
    while i < n:
        kind = tokens[i][0]
        if kind == ",":
            i += 1
            continue
        if kind == ";":
            if inGroup:
                out.append(GROUP_END)
                inGroup = False
            i += 1
            continue
        # One address runs to the next "," ";" or ":" outside angle brackets.
        j = i
        while j < n and tokens[j][0] not in (",", ";", ":"):
            if tokens[j][0] == "<":
                while j < n and tokens[j][0] != ">":
                    j += 1
            j += 1
        j = min(j, n)
        if j < n and tokens[j][0] == ":" and not inGroup:
            # RFC 5322 section 3.4: group = display-name ":" [group-list] ";"
            out.append(Address(None, None, _phrase(tokens[i:j]) or b"", None))
            inGroup = True
        else:
            address = _mailbox(tokens[i:j])
            if address is not None:
                out.append(address)
        i = j + 1 if j < n and tokens[j][0] == ":" else j
    if inGroup:
        out.append(GROUP_END)
    return out


def _mailbox(tokens: list[tuple[str, bytes]]) -> Address | None:
    words = [t for t in tokens if t[0] != "comment"]
    if not words:
        return None
    kinds = [kind for kind, _ in words]
    route = None
    if "<" in kinds:
        # name-addr: [display-name] "<" [obs-route] addr-spec ">"
        opening = kinds.index("<")
        name = _phrase(words[:opening])
        inside = words[opening + 1 :]
        insideKinds = [kind for kind, _ in inside]
        if ">" in insideKinds:
            inside = inside[: insideKinds.index(">")]
            insideKinds = insideKinds[: insideKinds.index(">")]
        if insideKinds[:1] == ["@"] and ":" in insideKinds:
            colon = insideKinds.index(":")
            route = _joined(inside[:colon])
            inside = inside[colon + 1 :]
        mailbox, host = _addrSpec(inside)
    else:
        # addr-spec, perhaps followed by a comment that names it, as
        # Dovecot reads it (user@domain (Real Name)).
        last = max(i for i, (kind, _) in enumerate(tokens) if kind != "comment")
        trailing = [text for kind, text in tokens[last + 1 :] if kind == "comment"]
        name = trailing[0] if trailing else None
        mailbox, host = _addrSpec(words)
    if mailbox is None and host is None and name is None:
        return None
    # A NIL host would read as the start of a group (RFC 3501 section
    # 7.4.2): what is missing is named, as Dovecot names it.
    return Address(name or None, route, mailbox or b"MISSING_MAILBOX", host or b"MISSING_DOMAIN")


def _addrSpec(tokens: list[tuple[str, bytes]]) -> tuple[bytes | None, bytes | None]:
    kinds = [kind for kind, _ in tokens]
    if "@" in kinds:
        at = len(kinds) - 1 - kinds[::-1].index("@")
        return _joined(tokens[:at]) or None, _joined(tokens[at + 1 :]) or None
    return _joined(tokens) or None, None


def _joined(tokens: list[tuple[str, bytes]]) -> bytes:
    """
    A local part, domain or route: its words with no space between them.
    """
    return b"".join(text if kind in ("atom", "quoted", "literal") else kind.encode() for kind, text in tokens)


def _phrase(tokens: list[tuple[str, bytes]]) -> bytes | None:
    """
    A display name: its words separated by single spaces.
    """
    words = [text for kind, text in tokens if kind in ("atom", "quoted")]
    return b" ".join(words) if words else None


def addressText(address: Address) -> bytes:
    """
    An address as SEARCH FROM/TO/CC/BCC compare it, its comments left
    out: C{name <mailbox@host>}.
    """
    spec = b"@".join(p for p in (address.mailbox, address.host) if p)
    return (address.name + b" <" + spec + b">") if address.name else spec


# MIME types and parameters -------------------------------------------------

_SECTION = re.compile(rb"(.*?)\*(\d{1,3})(\*?)\Z|(.*?)\*\Z", re.S)


@dataclass(frozen=True)
class ContentValue:
    """
    A Content-Type (C{value} is C{b"type/subtype"}, lower case) or a
    Content-Disposition (C{value} is the disposition type), and its
    parameters in order of appearance.

    RFC 2231 continuations (C{name*0}, C{name*1}...) are joined into one
    parameter; an encoded one keeps its C{name*} and its
    C{charset'language'percent-encoded} value, as Dovecot serves it in
    BODYSTRUCTURE (an IMAP string stays 7-bit, and the charset is not
    lost).  L{ContentValue.get} decodes a value.
    """

    value: bytes | None
    params: tuple[tuple[bytes, bytes], ...]

    def get(self, name: bytes) -> bytes | None:
        """
        The value of a parameter, percent-decoded if it was encoded
        (the charset's octets, not decoded to text).
        """
        name = name.lower()
        for key, value in self.params:
            if key == name:
                return value
            if key == name + b"*":
                return urllib.parse.unquote_to_bytes(value.split(b"'", 2)[-1])
        return None


def parseContentValue(value: bytes, typed: bool) -> ContentValue:
    """
    A Content-Type (C{typed}: C{type/subtype} expected, else None) or
    Content-Disposition value.
    """
    tokens = [t for t in _lex(value, _MIME_DELIMITERS, domainLiterals=False) if t[0] != "comment"]
    kinds = [kind for kind, _ in tokens]
    head = None
    i = 0
    if typed:
        if kinds[:3] == ["atom", "/", "atom"]:
            head = tokens[0][1].lower() + b"/" + tokens[2][1].lower()
            i = 3
    elif kinds[:1] == ["atom"]:
        head = tokens[0][1].lower()
        i = 1
    raw: list[tuple[bytes, bytes]] = []
    n = len(tokens)
    while i < n:
        # ";" attribute "=" value; anything else is skipped
        if kinds[i : i + 3] == [";", "atom", "="] and i + 3 < n and kinds[i + 3] in ("atom", "quoted"):
            raw.append((tokens[i + 1][1].lower(), tokens[i + 3][1]))
            i += 4
        else:
            i += 1
    return ContentValue(head, tuple(_joinContinuations(raw)))


def _joinContinuations(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    RFC 2231 section 3 and 4: C{name*0}, C{name*1*}... joined in the order
    of their numbers; the parameter is encoded (C{name*}) when its first
    section is.
    """
    order: list[tuple[bytes, bool]] = []
    plain: dict[bytes, bytes] = {}
    sections: dict[bytes, dict[int, tuple[bytes, bool]]] = {}
    for key, value in raw:
        m = _SECTION.match(key)
        if m is None:
            if key not in plain:
                order.append((key, False))
                plain[key] = value
            continue
        if m.group(1) is not None:
            base, number, encoded = m.group(1), int(m.group(2)), bool(m.group(3))
        else:
            base, number, encoded = m.group(4), 0, True
        if base not in sections:
            order.append((base, True))
        sections.setdefault(base, {}).setdefault(number, (value, encoded))
    out = []
    for key, continued in order:
        if not continued:
            out.append((key, plain[key]))
        elif 0 in sections[key]:
            parts = sections[key]
            joined = b"".join(parts[k][0] for k in sorted(parts))
            out.append((key + b"*" if parts[0][1] else key, joined))
    return out
