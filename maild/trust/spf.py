"""
SPF (RFC 7208), evaluated by pyspf over answers fetched asynchronously.

pyspf knows the whole record language (mechanisms, macros, C{exp},
the lookup limits) but asks DNS with blocking calls.  Here it never asks
DNS: L{checkSPF} runs pyspf's evaluation over the answers gathered so far;
when the evaluation needs one it does not have, the evaluation stops, the
answer is fetched through twisted.names, and the evaluation runs again
from the start.  Every run is a pure computation over known answers, so
the reactor never waits on DNS, and the result is pyspf's own.

Being pure, an evaluation need not run again while its answers stand:
L{RecentResults} gives a result again for the same client, sender and
HELO name as long as every answer it was drawn from is still the one the
lookup keeps (a sender's mail mostly comes in runs from the same
servers).
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


class RecentResults:
    """
    Recent SPF results, by client address, sender, HELO name and receiver,
    each with the DNS answers its evaluation read.  A result is given again
    only while the lookup still keeps every one of those answers, fresh
    (within its TTL) and unchanged: then a new evaluation would read the
    same answers and, being a pure function of them, reach the same
    result.  Not kept: results drawn from a temporary DNS error (the
    lookup keeps no such answer) and C{fail}, whose explanation (an
    C{exp=} text) may name the time (macro C{%{t}}, RFC 7208 section 7.3).

    @param maxEntries: results kept at most (the oldest goes first).
    """

    def __init__(self, maxEntries: int = 4096) -> None:
        self.maxEntries = maxEntries
        self._results: dict[tuple, tuple[SPFResult, dict]] = {}

    def get(self, key: tuple, cached) -> SPFResult | None:
        """
        The result kept for C{key} if its answers still stand in
        C{cached} (the lookup's C{cached(name, qtype)}).
        """
        kept = self._results.get(key)
        if kept is None:
            return None
        result, answers = kept
        for (name, qtype), answer in answers.items():
            if cached(name, qtype) != answer:
                del self._results[key]
                return None
        return result

    def put(self, key: tuple, result: SPFResult, answers: dict) -> None:
        if result.result == "fail" or any(
            isinstance(answer, TemporaryDNSError) for answer in answers.values()
        ):
            return
        if len(self._results) >= self.maxEntries:
            del self._results[next(iter(self._results))]
        # A question of a type DNS is never asked (pyspf's SPF type) has
        # an empty answer for good: nothing to check again.
        self._results[key] = (
            result,
            {key: answer for key, answer in answers.items() if key[1] in TYPES},
        )


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
    recent: RecentResults | None = None,
) -> defer.Deferred[SPFResult]:
    """
    The SPF result for mail from C{sender} (the MAIL FROM address, "" for
    the null sender: the HELO identity is checked then, RFC 7208 section
    2.4) sent from C{ip}, the client having said C{helo}.

    @param answers: the DNS answers known already (tests, or a cache
        shared between the identities of one message); filled in.
    @param recent: where results are kept and looked for first (needs a
        lookup that keeps answers: L{maild.trust.lookup.CachingLookup}).
    """
    cached = getattr(lookup, "cached", None)
    if recent is not None and cached is not None and answers is None:
        key = (ip, sender, helo, receiver)
        result = recent.get(key, cached)
        if result is not None:
            return defer.succeed(result)
        answers = {}
        d = defer.ensureDeferred(_check(lookup, ip, sender, helo, receiver, answers))
        return d.addCallback(_remember, recent, key, answers)
    return defer.ensureDeferred(_check(lookup, ip, sender, helo, receiver, answers))


def _remember(result: SPFResult, recent: RecentResults, key: tuple, answers: dict) -> SPFResult:
    recent.put(key, result, answers)
    return result


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
