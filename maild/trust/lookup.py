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
from twisted.python.failure import Failure

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


class CachingLookup:
    """
    Lookups over C{resolver} (an C{IResolver}), their answers kept for their
    TTL: the checks of one message ask the same names several times, and
    mail from one domain comes in bursts.

    C{lookup(name, qtype)} fires with the list of the values of the
    C{qtype} records of C{name} (following CNAMEs, in the answer or by
    asking again), C{[]} when there are none (NXDOMAIN or no data), or
    fails with L{TemporaryDNSError} (never kept).  A question already on
    its way is not asked twice.

    @param timeout: seconds to wait for one answer, retries included.
    @param clock: an C{IReactorTime} for the TTLs.
    @param negativeTTL: how long "no such records" is kept when the reply
        carries no SOA to say (RFC 2308).
    """

    def __init__(
        self,
        resolver,
        timeout: float,
        clock,
        maxEntries: int = 10000,
        maxTTL: float = 3600.0,
        negativeTTL: float = 60.0,
    ) -> None:
        self.resolver = resolver
        # Two tries over UDP, the second waiting longer (a lost datagram).
        self.tries = (timeout / 3, timeout * 2 / 3)
        self.clock = clock
        self.maxEntries = maxEntries
        self.maxTTL = maxTTL
        self.negativeTTL = negativeTTL
        self._answers: dict[tuple[str, str], tuple[float, list]] = {}
        self._waiting: dict[tuple[str, str], list[defer.Deferred]] = {}

    def __call__(self, name: str, qtype: str) -> defer.Deferred:
        key = (name.lower().rstrip("."), qtype)
        kept = self._answers.get(key)
        if kept is not None:
            if kept[0] > self.clock.seconds():
                return defer.succeed(list(kept[1]))
            del self._answers[key]
        waiting = self._waiting.get(key)
        if waiting is not None:
            d: defer.Deferred = defer.Deferred()
            waiting.append(d)
            return d
        self._waiting[key] = []
        d = self._ask(*key)
        d.addBoth(self._answered, key)
        return d

    def cached(self, name: str, qtype: str) -> list | None:
        """
        The answer kept for this question, if there is one still fresh.
        """
        kept = self._answers.get((name.lower().rstrip("."), qtype))
        if kept is not None and kept[0] > self.clock.seconds():
            return list(kept[1])
        return None

    def _answered(self, result, key):
        waiting = self._waiting.pop(key)
        if isinstance(result, Failure):
            for d in waiting:
                d.errback(result)
            return result
        values, ttl = result
        if ttl > 0:
            if len(self._answers) >= self.maxEntries:
                # The oldest entry goes.
                del self._answers[next(iter(self._answers))]
            self._answers[key] = (self.clock.seconds() + min(ttl, self.maxTTL), values)
        for d in waiting:
            d.callback(list(values))
        return list(values)

    @defer.inlineCallbacks
    def _ask(self, name: str, qtype: str):
        """
        @return: the values and how long they may be kept.
        """
        wanted = TYPES[qtype]
        current = name
        seen = {current}
        ttl = self.maxTTL
        for _ in range(MAX_CNAME + 1):
            try:
                query = dns.Query(_wireName(current), wanted, dns.IN)
            except UnicodeError:
                # A name DNS cannot carry (a label over 63 octets...).
                return [], self.maxTTL
            try:
                asked = self.resolver.query(query, self.tries)
                # Whatever the resolver does, the question ends in time (the
                # resolver's own timeout comes first when it keeps to it).
                asked.addTimeout(sum(self.tries) * 1.5, self.clock)
                answers, authority, _ = yield asked
            except (error.DNSNameError, dns.AuthoritativeDomainError) as e:
                message = e.args[0] if e.args else None
                authority = getattr(message, "authority", [])
                return [], min(ttl, self._negativeTTL(authority))
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
                found = [r for r in records if r.type == wanted]
                if found:
                    ttl = min([ttl] + [r.ttl for r in found])
                    return [_value(r) for r in found], ttl
                cname = next((r for r in records if r.type == dns.CNAME), None)
                if cname is None:
                    return [], min(ttl, self._negativeTTL(authority))
                ttl = min(ttl, cname.ttl)
                current = _targetName(cname)
                if current in seen:
                    # A CNAME loop: no data.
                    return [], min(ttl, self.negativeTTL)
                seen.add(current)
                if current not in byName:
                    break
        raise TemporaryDNSError(f"{qtype} {name}: CNAME chain too long")

    def _negativeTTL(self, authority) -> float:
        # RFC 2308 section 5: the SOA's TTL, capped by its MINIMUM field.
        for record in authority or ():
            if record.type == dns.SOA:
                return min(record.ttl, record.payload.minimum)
        return self.negativeTTL


def makeLookup(resolver, timeout: float, clock=None) -> Lookup:
    """
    A L{CachingLookup} over C{resolver}.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    return CachingLookup(resolver, timeout, clock)


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
