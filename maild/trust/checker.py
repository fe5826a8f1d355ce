"""
The checks of one MX transaction, from MAIL FROM to the end of DATA, and
the verdict the C{[mx] dmarc} policy draws from them.

SPF starts as soon as the envelope sender is known; the message passes
through L{MessageChecks.feed} on its way to the store (forged
Authentication-Results fields are removed there, and a copy is kept for
DKIM when the message is signed); at the end of DATA L{MessageChecks.verdict}
verifies DKIM, looks DMARC up, and says where the message goes.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from maild import metrics
from maild.trust.dkim import BatchVerifier, DKIMResult, keyNames, readSignatures, verifyDKIM
from maild.trust.dmarc import DMARCResult, checkDMARC, fromDomains, policyNames
from maild.trust.headers import HeaderFilter, parseFields
from maild.trust.lookup import Lookup, makeLookup
from maild.trust.results import authenticationResults, logSummary
from maild.trust.spf import RecentResults, SPFResult, checkSPF

log = Logger()

# The [mx] dmarc policies.
ENFORCE, QUARANTINE, REPORT = "enforce", "quarantine", "report"

INBOX, JUNK, REJECT, DEFER = "inbox", "junk", "reject", "defer"


@dataclass(frozen=True)
class Verdict:
    """
    @ivar action: L{INBOX}, L{JUNK} (the recipients' Junk folder),
        L{REJECT} or L{DEFER} (both with C{reply}).
    @ivar header: the Authentication-Results field to put on top.
    @ivar summary: the results on one line, for the log.
    """

    action: str
    header: bytes
    summary: str
    reply: tuple[int, bytes] | None = None


class TrustChecker:
    """
    What every MX session shares: the resolver, the policy, the limits.

    @param makeResolver: makes the C{IResolver} to ask
        (L{maild.resolver.makeResolver}); called on first use, since the
        system's resolver polls C{/etc/resolv.conf} from then on.
    @param policy: L{ENFORCE}, L{QUARANTINE} or L{REPORT}.
    @param dnsTimeout: seconds for one DNS answer.
    @param spfTimeout: seconds for a whole SPF evaluation (RFC 7208
        section 4.6.4 suggests 20 at least).
    @param trustedNetworks: clients in these networks are not checked.
    @param inThread: runs a blocking callable in a worker thread.
    @param dkimProcesses: if given, the child processes that verify DKIM
        (L{maild.trust.dkimprocess.VerifierProcesses}), every signed
        message going to them.
    @param sample: a number in [0, 1), for DMARC C{pct=}.
    """

    def __init__(
        self,
        makeResolver: Callable[[], object],
        hostname: str,
        policy: str,
        clock,
        dnsTimeout: float = 5.0,
        spfTimeout: float = 20.0,
        trustedNetworks: tuple[str, ...] = (),
        inThread: Callable[..., defer.Deferred] = threads.deferToThread,
        sample: Callable[[], float] = random.random,
        dkimProcesses=None,
    ) -> None:
        self._makeResolver = makeResolver
        self._lookup: Lookup | None = None
        self.dnsTimeout = dnsTimeout
        self.hostname = hostname
        self.policy = policy
        self.clock = clock
        self.spfTimeout = spfTimeout
        if dkimProcesses is None:
            self.verifier = BatchVerifier(inThread)
        else:
            self.verifier = BatchVerifier(
                inThread, inlineWork=0, elsewhere=dkimProcesses.verify,
                inFlight=dkimProcesses.count,
            )
        self.sample = sample
        self.recentSPF = RecentResults()
        self.trustedNetworks = [ipaddress.ip_network(n, strict=False) for n in trustedNetworks]

    @property
    def lookup(self) -> Lookup:
        if self._lookup is None:
            self._lookup = makeLookup(self._makeResolver(), self.dnsTimeout, self.clock)
        return self._lookup

    def exempt(self, clientAddress: str) -> bool:
        """
        Whether mail from C{clientAddress} goes unchecked (a trusted network).
        """
        try:
            address = ipaddress.ip_address(clientAddress)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.trustedNetworks)

    def begin(self, clientAddress: str, helo: str, sender: str) -> "MessageChecks":
        """
        Start the checks of a transaction: SPF at once.
        """
        return MessageChecks(self, clientAddress, helo, sender)


class MessageChecks:
    """
    The checks of one transaction (made by L{TrustChecker.begin}).
    """

    def __init__(self, checker: TrustChecker, clientAddress: str, helo: str, sender: str):
        self.checker = checker
        self.sender = sender
        self._filter = HeaderFilter(checker.hostname)
        # The message as received, in pieces, kept for DKIM while it may
        # be signed.
        self._raw: list[bytes] | None = []
        self._signatures: list = []
        self._fromDomains: list[str] | None = None
        self._spf = checkSPF(
            checker.lookup, clientAddress, sender, helo, receiver=checker.hostname,
            recent=checker.recentSPF,
        )
        if not self._spf.called:
            # (A result kept from a recent evaluation has no time to run out.)
            self._spf.addTimeout(checker.spfTimeout, checker.clock)
            self._spf.addErrback(self._spfFailed, sender, helo)

    @staticmethod
    def _spfFailed(reason, sender: str, helo: str) -> SPFResult:
        identity = "mailfrom" if sender else "helo"
        domain = sender.rpartition("@")[2] if sender else helo
        if reason.check(defer.TimeoutError):
            return SPFResult("temperror", identity, domain, "SPF evaluation timed out")
        log.failure("SPF evaluation failed", reason)
        return SPFResult("temperror", identity, domain, "internal error")

    def feed(self, content: bytes) -> bytes:
        """
        Take a piece of the message (CRLF line ends).

        @return: what to store of it now.
        """
        wasDone = self._filter.done
        if self._raw is not None:
            self._raw.append(content)
        out = self._filter.feed(content)
        if self._filter.done and not wasDone:
            self._headersComplete()
        return out

    def finish(self) -> bytes:
        """
        The end of the message: whatever is still to be stored.
        """
        wasDone = self._filter.done
        out = self._filter.finish()
        if not wasDone:
            self._headersComplete()
        return out

    def _headersComplete(self) -> None:
        fields = parseFields(self._filter.section)
        self._signatures = readSignatures(fields)
        self._fromDomains = fromDomains(fields)
        if not self._signatures:
            self._raw = None
        # Ask for the DKIM keys and DMARC records while the body arrives:
        # the answers wait in the lookup's cache for the verdict.
        for name in keyNames(self._signatures) + policyNames(self._fromDomains):
            self.checker.lookup(name, "TXT").addErrback(lambda _: None)

    def verdict(self) -> defer.Deferred[Verdict]:
        """
        After L{finish}: verify DKIM, look DMARC up, decide.
        """
        return defer.ensureDeferred(self._verdict())

    async def _verdict(self) -> Verdict:
        checker = self.checker
        spf: SPFResult = await self._spf
        dkim: list[DKIMResult] = []
        if self._raw is not None:
            message, self._raw = b"".join(self._raw), None
            dkim = await verifyDKIM(
                checker.lookup, self._signatures, message, checker.verifier,
                len(self._filter.section),
            )
        dmarc = await checkDMARC(checker.lookup, self._fromDomains, spf, dkim, checker.sample)
        _count(spf, dkim, dmarc)
        header = authenticationResults(checker.hostname, spf, self.sender, dkim, dmarc)
        action, reply = decide(checker.policy, dmarc)
        return Verdict(action, header, logSummary(spf, dkim, dmarc), reply)


def _count(spf: SPFResult, dkim: list[DKIMResult], dmarc: DMARCResult) -> None:
    _counter("spf", spf.result).inc()
    for result in dkim or [DKIMResult("none")]:
        _counter("dkim", result.result).inc()
    _counter("dmarc", dmarc.result).inc()


@functools.lru_cache(maxsize=None)
def _counter(check: str, result: str):
    # Results are a fixed set of words (RFC 8601 section 2.7): bounded
    # labels, each looked up once.
    return metrics.trustResults.labels(check, result)


def decide(policy: str, dmarc: DMARCResult) -> tuple[str, tuple[int, bytes] | None]:
    """
    Where a message goes under the C{[mx] dmarc} C{policy}, given its
    DMARC result.

    @return: the action and, for L{REJECT} and L{DEFER}, the reply.
    """
    if policy == REPORT:
        return INBOX, None
    if dmarc.result == "temperror" and dmarc.dependsOnTemporary:
        return DEFER, _TRY_LATER
    if dmarc.result == "permerror":
        # A From: too many domains to check: suspect, not refused.
        return JUNK, None
    if dmarc.result != "fail" or dmarc.policy == "none":
        return INBOX, None
    if dmarc.dependsOnTemporary:
        # A lookup that failed for now might have made it pass.
        return DEFER, _TRY_LATER
    if dmarc.policy == "reject" and policy == ENFORCE:
        domain = dmarc.domain.encode("ascii", "replace")
        return REJECT, (550, b"5.7.1 Message rejected: DMARC policy of " + domain + b" is reject")
    return JUNK, None


_TRY_LATER = (451, b"4.4.3 Temporary DNS failure during authentication checks, try again later")
