"""
DMARC (RFC 7489): the policy of the From: domain (or of its
organizational domain, found with the public suffix list of the
C{publicsuffixlist} package: no network fetch), and whether SPF or DKIM
passed for an aligned domain.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from email.utils import getaddresses

from publicsuffixlist import PublicSuffixList
from twisted.internet import defer

from maild.trust.dkim import DKIMResult
from maild.trust.lookup import Lookup, TemporaryDNSError
from maild.trust.spf import SPFResult

POLICIES = ("none", "quarantine", "reject")
# From: domains checked at most per message.
MAX_FROM_DOMAINS = 10


@functools.lru_cache(maxsize=1)
def _suffixes() -> PublicSuffixList:
    # The list bundled with the package (loading it takes some 100 ms).
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organizationalDomain(domain: str) -> str:
    """
    RFC 7489 section 3.2: the registered domain of C{domain} (one label
    below its public suffix), or C{domain} itself when it is a suffix or
    has a single label.
    """
    domain = domain.lower().rstrip(".")
    return _suffixes().privatesuffix(domain) or domain


@dataclass(frozen=True)
class DMARCRecord:
    policy: str
    subdomainPolicy: str | None = None
    percent: int = 100
    # "r" relaxed or "s" strict (RFC 7489 section 3.1).
    dkimAlignment: str = "r"
    spfAlignment: str = "r"


@functools.lru_cache(maxsize=1024)
def parseRecord(text: str) -> DMARCRecord | None:
    """
    A DMARC record (RFC 7489 section 6.3), or None when C{text} is not one.
    A record whose C{p=} is missing or unknown counts as C{p=none} if it
    has C{rua=} (section 6.6.3), else it is no record.  Kept per text (the
    record is frozen): a domain's record comes with much of its mail.
    """
    tags: dict[str, str] = {}
    for index, part in enumerate(text.split(";")):
        name, equals, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if index == 0:
            if name != "v" or value != "DMARC1":
                return None
            continue
        if equals and name and name not in tags:
            tags[name] = value
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        if "rua" not in tags:
            return None
        policy = "none"
    subdomainPolicy = tags.get("sp", "").lower()
    try:
        percent = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        percent = 100
    return DMARCRecord(
        policy,
        subdomainPolicy if subdomainPolicy in POLICIES else None,
        percent,
        "s" if tags.get("adkim", "r").lower() == "s" else "r",
        "s" if tags.get("aspf", "r").lower() == "s" else "r",
    )


def fromDomains(fields: list[tuple[str, str]]) -> list[str] | None:
    """
    The domains of the From: addresses (RFC 7489 section 6.6.1), without
    repeats; None when there is no From: field or no address with a
    domain in it.
    """
    domains = _domainsOf(tuple(value for name, value in fields if name == "from"))
    return list(domains) if domains else None


@functools.lru_cache(maxsize=1024)
def _domainsOf(values: tuple[str, ...]) -> tuple[str, ...]:
    # Kept per From: field: a sender's mail repeats it, and the email
    # package's address parser is slow.
    domains: list[str] = []
    for _, address in getaddresses(values):
        local, at, domain = address.rpartition("@")
        domain = domain.strip().lower().rstrip(".")
        if at and domain and domain not in domains:
            domains.append(domain)
    return tuple(domains)


def policyNames(domains: list[str] | None) -> list[str]:
    """
    The DNS names where the From: domains' DMARC records are (to ask
    early; the organizational domains' only if these have none).
    """
    if not domains or len(domains) > MAX_FROM_DOMAINS:
        return []
    return [f"_dmarc.{domain}" for domain in domains]


def aligned(domain: str, fromDomain: str, mode: str) -> bool:
    domain, fromDomain = domain.lower().rstrip("."), fromDomain.lower()
    if mode == "s":
        return domain == fromDomain
    return organizationalDomain(domain) == organizationalDomain(fromDomain)


@dataclass(frozen=True)
class DMARCResult:
    """
    @ivar result: C{pass fail none temperror permerror}.
    @ivar domain: the From: domain.
    @ivar policy: the policy that applies to a failure (after C{sp=} and
        C{pct=}): C{none quarantine reject}.
    @ivar published: the policy published (C{p=} or C{sp=}), for the record.
    @ivar dependsOnTemporary: a temporary DNS error may have turned a pass
        into this fail: whether the result could change on a new attempt.
    """

    result: str
    domain: str = ""
    policy: str = "none"
    published: str = ""
    reason: str = ""
    dependsOnTemporary: bool = False


async def _discover(lookup: Lookup, domain: str) -> tuple[DMARCRecord | None, bool]:
    """
    RFC 7489 section 6.6.3: the record of C{domain}, else of its
    organizational domain.

    @return: the record and whether it came from the organizational
        domain (its C{sp=} then applies).
    @raise TemporaryDNSError: if a lookup failed.
    """
    orgDomain = organizationalDomain(domain)
    for name, fromOrg in ((domain, False), (orgDomain, True)):
        if fromOrg and orgDomain == domain:
            break
        records = await lookup(f"_dmarc.{name}", "TXT")
        texts = [b"".join(r).decode("utf-8", "replace") for r in records]
        parsed = [r for r in map(parseRecord, texts) if r is not None]
        if len(parsed) == 1:
            return parsed[0], fromOrg
        if parsed:
            # Several records: DMARC does not apply.
            return None, fromOrg
    return None, False


async def checkDMARC(
    lookup: Lookup,
    domains: list[str] | None,
    spf: SPFResult,
    dkim: list[DKIMResult],
    sample=random.random,
) -> DMARCResult:
    """
    The DMARC result of a message from C{domains} (L{fromDomains}).
    With several From: domains (section 6.6.1), each is checked and the
    worst result stands.

    @param sample: a number in [0, 1) for C{pct=} sampling.
    """
    if domains is None:
        return DMARCResult("none", reason="no From: domain")
    if len(domains) > MAX_FROM_DOMAINS:
        # Each would cost lookups: a From: listing many domains is refused
        # the checks (section 6.6.1 lets the receiver reject it).
        return DMARCResult("permerror", domains[0], reason="too many From: domains")
    if len(domains) == 1:
        return await _checkDomain(lookup, domains[0], spf, dkim, sample)
    results = await defer.gatherResults(
        [defer.ensureDeferred(_checkDomain(lookup, d, spf, dkim, sample)) for d in domains]
    )
    rank = {"pass": 0, "none": 1, "temperror": 2, "fail": 3}
    return max(results, key=lambda r: (rank.get(r.result, 1), POLICIES.index(r.policy)))


async def _checkDomain(lookup, domain, spf, dkim, sample) -> DMARCResult:
    try:
        record, fromOrg = await _discover(lookup, domain)
    except TemporaryDNSError:
        passes = _alignedPass(domain, spf, dkim, DMARCRecord("none"))
        return DMARCResult(
            "temperror", domain, reason="policy lookup failed", dependsOnTemporary=not passes
        )
    if record is None:
        return DMARCResult("none", domain)
    published = record.policy
    if fromOrg and record.subdomainPolicy:
        published = record.subdomainPolicy
    if _alignedPass(domain, spf, dkim, record):
        return DMARCResult("pass", domain, "none", published)
    policy = published
    if record.percent < 100 and sample() * 100 >= record.percent:
        # RFC 7489 section 6.6.4: outside the sample, the next milder policy.
        policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    temporary = (
        spf.result == "temperror" and aligned(spf.domain, domain, record.spfAlignment)
    ) or any(
        d.result == "temperror" and aligned(d.domain, domain, record.dkimAlignment) for d in dkim
    )
    return DMARCResult(
        "fail", domain, policy, published, "no aligned pass", dependsOnTemporary=temporary
    )


def _alignedPass(domain: str, spf: SPFResult, dkim: list[DKIMResult], record: DMARCRecord) -> bool:
    # RFC 7489 section 3.1.2: the MAIL FROM identity, or the HELO one
    # when the reverse-path is null.
    spfPass = spf.result == "pass" and aligned(spf.domain, domain, record.spfAlignment)
    return spfPass or any(
        d.result == "pass" and d.domain and aligned(d.domain, domain, record.dkimAlignment)
        for d in dkim
    )
