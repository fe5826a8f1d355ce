"""
SPF (RFC 7208), evaluated by pyspf over answers fetched asynchronously.

pyspf knows the whole record language (mechanisms, macros, C{exp},
the lookup limits) but asks DNS with blocking calls.  Here it never asks
DNS: L{checkSPF} runs pyspf's evaluation over the answers gathered so far;
when the evaluation needs one it does not have, the evaluation stops, the
answer is fetched through twisted.names, and the evaluation runs again
from the start.  Every run is a pure computation over known answers, so
the reactor never waits on DNS, and the result is pyspf's own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import spf as pyspf
from twisted.internet import defer

from maild.trust.lookup import TYPES, Lookup, TemporaryDNSError

# RFC 7208 section 4.6.4: at most 10 MX (or PTR) names are looked up;
# their addresses are asked for together with the MX (PTR) answer.
_MX_NAMES = 10
# Evaluations of one check at most: each asks DNS once or more, and the
# lookup limits end a real record's evaluation long before this.
_MAX_ROUNDS = 60


@dataclass(frozen=True)
class SPFResult:
    """
    @ivar result: C{pass fail softfail neutral none permerror temperror}.
    @ivar identity: C{"mailfrom"} or C{"helo"}.
    @ivar domain: the domain checked.
    @ivar explanation: pyspf's explanation (the C{exp} text for a fail).
    """

    result: str
    identity: str
    domain: str
    explanation: str = ""


class _NeedsAnswer(Exception):
    """
    The evaluation reached a question not yet answered.
    """


class _ReplayQuery(pyspf.query):
    """
    A pyspf query whose DNS is a dictionary of answers fetched before.
    Questions it cannot answer are listed in C{unanswered} (pyspf swallows
    some exceptions, around C{exp} for one, so the list is what counts).
    """

    def __init__(self, answers: dict, cached, **kwargs: Any) -> None:
        pyspf.query.__init__(self, **kwargs)
        self.answers = answers
        self.cached = cached
        self.unanswered: list[tuple[str, str]] = []

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            # Not a name DNS can hold: no records (as pyspf).
            return []
        key = (name, qtype)
        if key not in self.answers:
            # An answer the lookup keeps saves a round.
            kept = self.cached(name, qtype) if qtype in TYPES else None
            if kept is None:
                self.unanswered.append(key)
                raise _NeedsAnswer(key)
            self.answers[key] = kept
        result = self.answers[key]
        if isinstance(result, TemporaryDNSError):
            raise pyspf.TempError(f"DNS {result}")
        if not result and not ignore_void:
            # RFC 7208 section 4.6.4: at most two lookups without records.
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(
                    f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded"
                )
        # pyspf sorts MX lists in place.
        return list(result)


async def _fetch(lookup: Lookup, answers: dict, key: tuple[str, str], addressType: str) -> None:
    name, qtype = key
    if qtype not in ("A", "AAAA", "MX", "PTR", "TXT"):
        answers[key] = []
        return
    try:
        answers[key] = await lookup(name, qtype)
    except TemporaryDNSError as e:
        answers[key] = e
        return
    if qtype in ("MX", "PTR"):
        # The addresses of the exchanges (or of the names a PTR record
        # gives, to validate them) come next: ask for them now.
        if qtype == "MX":
            hosts = [host for _, host in sorted(answers[key])[:_MX_NAMES]]
        else:
            hosts = answers[key][:_MX_NAMES]
        missing = [
            (host.lower(), addressType)
            for host in hosts
            if (host.lower(), addressType) not in answers
        ]
        await defer.gatherResults(
            [defer.ensureDeferred(_fetch(lookup, answers, k, addressType)) for k in missing]
        )


def checkSPF(
    lookup: Lookup,
    ip: str,
    sender: str,
    helo: str,
    receiver: str = "unknown",
    answers: dict | None = None,
) -> defer.Deferred[SPFResult]:
    """
    The SPF result for mail from C{sender} (the MAIL FROM address, "" for
    the null sender: the HELO identity is checked then, RFC 7208 section
    2.4) sent from C{ip}, the client having said C{helo}.

    @param answers: the DNS answers known already (tests, or a cache
        shared between the identities of one message); filled in.
    """
    return defer.ensureDeferred(_check(lookup, ip, sender, helo, receiver, answers))


async def _check(lookup, ip, sender, helo, receiver, answers) -> SPFResult:
    answers = {} if answers is None else answers
    cached = getattr(lookup, "cached", lambda name, qtype: None)
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return SPFResult("none", "mailfrom", "", "no valid client address")
    for _ in range(_MAX_ROUNDS):
        query = _ReplayQuery(answers, cached, i=ip, s=sender, h=helo, receiver=receiver)
        # "A" or "AAAA" as pyspf sees the client (IPv4-mapped is IPv4).
        addressType = query.A
        identity = query.ident
        domain = query.o if identity == "mailfrom" else helo
        try:
            result, _, explanation = query.check()
        except _NeedsAnswer:
            result = explanation = None
        if not query.unanswered:
            return SPFResult(result, identity, domain, explanation or "")
        await defer.gatherResults(
            [
                defer.ensureDeferred(_fetch(lookup, answers, key, addressType))
                for key in dict.fromkeys(query.unanswered)
            ]
        )
    return SPFResult("temperror", identity, domain, "too many DNS round trips")
