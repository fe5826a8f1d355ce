"""
DNS answers for the trust checks, as plain values: the one place where
twisted.names replies, CNAME chains and DNS errors are turned into what
the SPF, DKIM and DMARC code reasons about.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import TimeoutError as InternetTimeout
from twisted.names import dns, error

# The record types the checks ask for, by the names pyspf uses.
TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "PTR": dns.PTR,
    "TXT": dns.TXT,
}

# How many CNAMEs are followed from one name (pyspf's MAX_CNAME).
MAX_CNAME = 10


class TemporaryDNSError(Exception):
    """
    The answer could not be had now (timeout, SERVFAIL, refused, a reply
    we cannot read): RFC 7208 section 2.6.6 "temperror", RFC 7489
    section 6.6.3 "temperror".
    """


Lookup = Callable[[str, str], "defer.Deferred[list[Any]]"]


def _value(record: dns.RRHeader) -> Any:
    """
    The data of one record, as pyspf expects it: addresses and names as
    text (no trailing dot), MX as C{(preference, exchange)}, TXT as a tuple
    of the record's byte strings.
    """
    payload = record.payload
    if record.type in (dns.A, dns.AAAA):
        return payload.dottedQuad() if record.type == dns.A else _ipv6Text(payload)
    if record.type == dns.MX:
        return (payload.preference, payload.name.name.decode("ascii", "replace").rstrip("."))
    if record.type == dns.PTR:
        return payload.name.name.decode("ascii", "replace").rstrip(".")
    if record.type == dns.TXT:
        return tuple(payload.data)
    raise ValueError(record.type)


def _ipv6Text(payload: dns.Record_AAAA) -> str:
    return socket.inet_ntop(socket.AF_INET6, payload.address)


def _recordName(record: dns.RRHeader) -> str:
    return record.name.name.decode("ascii", "replace").rstrip(".").lower()


def makeLookup(resolver, timeout: float) -> Lookup:
    """
    A lookup function over C{resolver} (an C{IResolver}).

    C{lookup(name, qtype)} fires with the list of the values of the
    C{qtype} records of C{name} (following CNAMEs, in the answer or by
    asking again), C{[]} when there are none (NXDOMAIN or no data), or
    fails with L{TemporaryDNSError}.

    @param timeout: seconds to wait for one answer, retries included.
    """
    # Two tries over UDP, the second waiting longer (a lost datagram).
    tries = (timeout / 3, timeout * 2 / 3)

    @defer.inlineCallbacks
    def lookup(name: str, qtype: str):
        wanted = TYPES[qtype]
        current = name.lower().rstrip(".")
        seen = {current}
        for _ in range(MAX_CNAME + 1):
            try:
                query = dns.Query(_wireName(current), wanted, dns.IN)
            except UnicodeError:
                # A name DNS cannot carry (a label over 63 octets...).
                return []
            try:
                answers, _, _ = yield resolver.query(query, tries)
            except (error.DNSNameError, dns.AuthoritativeDomainError):
                return []
            except (error.DomainError, error.DNSQueryTimeoutError, defer.TimeoutError,
                    InternetTimeout) as e:
                # SERVFAIL, REFUSED, FORMERR, NOTIMP, an unknown code, or
                # no answer in time.
                raise TemporaryDNSError(f"{qtype} {current}: {type(e).__name__}")
            byName: dict[str, list[dns.RRHeader]] = {}
            for record in answers:
                byName.setdefault(_recordName(record), []).append(record)
            # Follow the CNAME chain as far as this answer carries it, then
            # ask for the rest.
            while True:
                records = byName.get(current, [])
                values = [_value(r) for r in records if r.type == wanted]
                if values:
                    return values
                cname = next((r for r in records if r.type == dns.CNAME), None)
                if cname is None:
                    return []
                current = _targetName(cname)
                if current in seen:
                    # A CNAME loop: no data.
                    return []
                seen.add(current)
                if current not in byName:
                    break
        raise TemporaryDNSError(f"{qtype} {name}: CNAME chain too long")

    return lookup


def _targetName(cname: dns.RRHeader) -> str:
    return cname.payload.name.name.decode("ascii", "replace").rstrip(".").lower()


def _wireName(name: str) -> bytes:
    """
    C{name} for a query; IDNA only for names that need it (the codec
    refuses the underscores of C{_dmarc} and C{_domainkey} labels in
    some versions).

    @raise UnicodeError: for a name DNS cannot carry.
    """
    labels = name.split(".")
    if not all(0 < len(label) <= 63 for label in labels):
        raise UnicodeError("bad label length")
    return name.encode("ascii") if name.isascii() else name.encode("idna")
