"""
The trust checks' parts on their own: the header filter, DMARC records
and domains, the Authentication-Results field, the policy's decisions,
the DNS answer cache, and property tests that any input gets a defined
result, never an exception.
"""

from __future__ import annotations

import base64
import re

import dkim
import nacl.signing
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, task
from twisted.names import dns
from twisted.trial import unittest

from maild.trust.checker import DEFER, TrustChecker, ENFORCE, INBOX, JUNK, QUARANTINE, REJECT, REPORT, decide
from maild.trust.dkim import BatchVerifier, DKIMResult, readSignatures, verifyDKIM
from maild.trust.dmarc import (
    DMARCRecord,
    checkDMARC,
    DMARCResult,
    aligned,
    fromDomains,
    organizationalDomain,
    parseRecord,
)
from maild.trust.headers import HeaderFilter, parseFields, splitFields
from maild.trust.lookup import CachingLookup, TemporaryDNSError
from maild.trust.results import authenticationResults
from maild.trust.spf import RecentResults, SPFResult, checkSPF
from tests.dnsserver import ZoneResolver

SETTINGS = settings(max_examples=200, deadline=None)

headerText = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FF), max_size=60
)


def fieldLines():
    names = st.sampled_from(
        ["Authentication-Results", "authentication-results", "From", "Subject", "X-Y", "DKIM-Signature"]
    )
    values = st.sampled_from(
        [" mx.test; spf=pass", " MX.test;dkim=fail", " (c) mx.test; x", " other.test; spf=pass",
         " mx.testing; a=b", "", " mx.test"]
    )
    continuation = st.sampled_from(["", "\r\n\tmore", "\r\n continued; x=y"])
    return st.builds(lambda n, v, c: f"{n}:{v}{c}\r\n".encode(), names, values, continuation)


def _claimsUs(field: bytes) -> bool:
    """
    Independently of the code under test: an Authentication-Results
    field whose first token (after a comment) is mx.test.
    """
    name, _, value = field.partition(b":")
    if name.lower() != b"authentication-results":
        return False
    value = value.split(b"\r\n")[0].strip()
    if value.startswith(b"("):
        value = value.partition(b")")[2].strip()
    return value.split(b";")[0].split()[:1] == [b"mx.test"] or value.lower().split(b";")[0].strip() == b"mx.test"


def _balanced(text: str) -> bool:
    """
    RFC 5322 structure: quoted strings closed, comments nested properly
    (a quote inside a comment is text).
    """
    depth, quoted, escaped = 0, False, False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == '"' and depth == 0:
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quoted and not escaped


class HeaderFilterTests(unittest.TestCase):
    def filtered(self, message: bytes, cuts: list[int] = ()) -> tuple[bytes, HeaderFilter]:
        f = HeaderFilter("mx.test")
        out, last = [], 0
        for cut in sorted(set(cuts)) + [len(message)]:
            out.append(f.feed(message[last:cut]))
            last = cut
        out.append(f.finish())
        return b"".join(out), f

    def test_removesOnlyOurs(self):
        """
        Fields whose authserv-id is our host name (any case, after a
        comment) go; other hosts' and look-alikes stay; the body is kept.
        """
        message = (
            b"Authentication-Results: mx.test; spf=pass\r\n"
            b"Subject: hi\r\n"
            b"Authentication-Results: (forged) MX.TEST;\r\n\tdkim=pass\r\n"
            b"Authentication-Results: mx.testing; spf=pass\r\n"
            b"\r\nAuthentication-Results: mx.test; in the body\r\n"
        )
        out, f = self.filtered(message)
        self.assertEqual(
            out,
            b"Subject: hi\r\nAuthentication-Results: mx.testing; spf=pass\r\n"
            b"\r\nAuthentication-Results: mx.test; in the body\r\n",
        )
        self.assertEqual(f.removed, 2)

    @SETTINGS
    @given(st.lists(fieldLines(), max_size=8), st.binary(max_size=40), st.lists(st.integers(0, 400)))
    def test_anySplitSameResult(self, fields, body, cuts):
        """
        However the message arrives in pieces, the output is the message
        without the removed fields, in order, and nothing else changes.
        """
        message = b"".join(fields) + b"\r\n" + body
        whole, f = self.filtered(message)
        pieces, _ = self.filtered(message, [c % (len(message) + 1) for c in cuts])
        self.assertEqual(whole, pieces)
        kept = [x for x in fields if not _claimsUs(x)]
        self.assertEqual(len(fields) - f.removed, len(kept))
        self.assertTrue(whole.endswith(b"\r\n" + body))

    @SETTINGS
    @given(st.binary(max_size=300))
    def test_anyBytes(self, data):
        """
        Any input passes through the parsers without an exception.
        """
        out, f = self.filtered(data)
        self.assertLessEqual(len(out), len(data))
        parseFields(data)
        self.assertEqual(b"".join(splitFields(data)), data)

    @SETTINGS
    @given(st.lists(st.sampled_from([b"A: x", b"\r", b"\n", b"\r\n", b" ", b"\t", b"y", b":",
                                     b"\xc3\xa9", b"B:"]), max_size=30).map(b"".join))
    def test_unfoldedValues(self, section):
        """
        Each value is unfolded exactly as removing every LF, with the CR
        before it if any, would (RFC 5322 section 2.2.3), then decoded.
        """
        expected = []
        for field in splitFields(section):
            name, colon, value = field.partition(b":")
            if colon:
                text = re.sub(rb"\r?\n", b"", value).decode("utf-8", "replace").strip()
                expected.append((name.strip().decode("ascii", "replace").lower(), text))
        self.assertEqual(parseFields(section), expected)


class DMARCRecordTests(unittest.TestCase):
    def test_parse(self):
        """
        Tags are read case-insensitively; v=DMARC1 must come first; a
        missing p= is none when rua= is there, else no record.
        """
        record = parseRecord("v=DMARC1; p=Reject; sp=none; pct=50; adkim=s")
        self.assertEqual(record, DMARCRecord("reject", "none", 50, "s", "r"))
        self.assertIsNone(parseRecord("p=reject; v=DMARC1"))
        self.assertIsNone(parseRecord("v=DMARC1; p=bogus"))
        self.assertEqual(parseRecord("v=DMARC1; rua=mailto:x@y").policy, "none")
        self.assertEqual(parseRecord("v=DMARC1; p=quarantine; pct=x").percent, 100)

    @SETTINGS
    @given(headerText)
    def test_anyRecord(self, text):
        """
        Any text is a record or not one, never an exception.
        """
        for candidate in (text, "v=DMARC1;" + text):
            record = parseRecord(candidate)
            if record is not None:
                self.assertIn(record.policy, ("none", "quarantine", "reject"))
                self.assertTrue(0 <= record.percent <= 100)

    def test_organizationalDomain(self):
        """
        The registered domain, from the public suffix list in the package.
        """
        self.assertEqual(organizationalDomain("a.b.example.co.uk"), "example.co.uk")
        self.assertEqual(organizationalDomain("Mail.Example.COM."), "example.com")
        self.assertEqual(organizationalDomain("co.uk"), "co.uk")
        self.assertEqual(organizationalDomain("localhost"), "localhost")
        self.assertTrue(aligned("mail.example.com", "example.com", "r"))
        self.assertFalse(aligned("mail.example.com", "example.com", "s"))
        self.assertFalse(aligned("example.co.uk", "other.co.uk", "r"))

    def test_fromDomains(self):
        """
        RFC 7489 section 6.6.1: every domain of every From: address; None
        when there is none.
        """
        self.assertEqual(fromDomains([("from", "A <a@X.test>, b@y.test, c@x.test")]), ["x.test", "y.test"])
        self.assertIsNone(fromDomains([("subject", "x")]))
        self.assertIsNone(fromDomains([("from", "undisclosed")]))

    @SETTINGS
    @given(headerText)
    def test_anyFrom(self, text):
        """
        Any From: value gives domains or None.
        """
        domains = fromDomains([("from", text)])
        self.assertTrue(domains is None or all(domains))


class AlignmentTests(unittest.TestCase):
    def check(self, record: str, fromDomain: str, dkimDomain: str, spfDomain: str = "other.test"):
        zone = ZoneResolver({"_dmarc.org.test": [("TXT", record)]})
        lookup = CachingLookup(zone, 1.0, task.Clock())
        spf = SPFResult("pass", "mailfrom", spfDomain)
        dkim = [DKIMResult("pass", dkimDomain, "s", "b")]
        d = defer.ensureDeferred(checkDMARC(lookup, [fromDomain], spf, dkim, lambda: 0.5))
        return self.successResultOf(d)

    def test_dkimAlignment(self):
        """
        adkim=r: a signature of the organizational domain aligns with a
        subdomain's From:; adkim=s: only the same domain does.  An SPF pass
        for an unrelated domain never aligns.
        """
        self.assertEqual(self.check("v=DMARC1; p=reject", "mail.org.test", "org.test").result, "pass")
        strict = self.check("v=DMARC1; p=reject; adkim=s", "mail.org.test", "org.test")
        self.assertEqual((strict.result, strict.policy), ("fail", "reject"))
        self.assertEqual(self.check("v=DMARC1; p=reject; adkim=s", "org.test", "org.test").result, "pass")

    def test_subdomainPolicy(self):
        """
        A From: subdomain without a record of its own gets the
        organizational domain's sp= (p= when there is no sp=).
        """
        failing = self.check("v=DMARC1; p=reject; sp=quarantine", "a.org.test", "elsewhere.test")
        self.assertEqual((failing.policy, failing.published), ("quarantine", "quarantine"))
        failing = self.check("v=DMARC1; p=reject", "a.org.test", "elsewhere.test")
        self.assertEqual(failing.policy, "reject")
        own = self.check("v=DMARC1; p=none; sp=reject", "org.test", "elsewhere.test")
        self.assertEqual(own.policy, "none")


class DecisionTests(unittest.TestCase):
    def test_table(self):
        """
        The [mx] dmarc policies: enforce rejects p=reject and files
        p=quarantine into Junk; quarantine files both; report only records;
        a temporary error the outcome depends on defers (451 4.4.3); a From:
        with too many domains to check goes to Junk.
        """
        reject = DMARCResult("fail", "x.test", "reject", "reject")
        quarantine = DMARCResult("fail", "x.test", "quarantine", "quarantine")
        none = DMARCResult("fail", "x.test", "none", "none")
        temporary = DMARCResult("fail", "x.test", "reject", "reject", dependsOnTemporary=True)
        unknown = DMARCResult("temperror", "x.test", dependsOnTemporary=True)
        passed = DMARCResult("temperror", "x.test")
        unreadable = DMARCResult("permerror", "x.test")
        cases = {
            (ENFORCE, reject): REJECT,
            (ENFORCE, quarantine): JUNK,
            (ENFORCE, none): INBOX,
            (ENFORCE, temporary): DEFER,
            (ENFORCE, unknown): DEFER,
            (ENFORCE, passed): INBOX,
            (ENFORCE, unreadable): JUNK,
            (REPORT, unreadable): INBOX,
            (QUARANTINE, reject): JUNK,
            (QUARANTINE, quarantine): JUNK,
            (QUARANTINE, unknown): DEFER,
            (REPORT, reject): INBOX,
            (REPORT, unknown): INBOX,
        }
        for (policy, result), action in cases.items():
            got, reply = decide(policy, result)
            self.assertEqual(got, action, (policy, result))
            if action == REJECT:
                self.assertEqual(reply[0], 550)
                self.assertTrue(reply[1].startswith(b"5.7.1 "))
            elif action == DEFER:
                self.assertEqual(reply[0], 451)
                self.assertTrue(reply[1].startswith(b"4.4.3 "))
            else:
                self.assertIsNone(reply)


class ResultsFieldTests(unittest.TestCase):
    @SETTINGS
    @given(headerText, headerText, headerText, headerText)
    def test_alwaysOneWellFormedField(self, sender, domain, reason, selector):
        """
        Whatever the names and reasons, the field is one header field
        (continuation lines only), its comments balanced.
        """
        field = authenticationResults(
            "mx.test",
            SPFResult("fail", "mailfrom", domain),
            sender,
            [DKIMResult("permerror", domain, selector, "abc", reason)],
            DMARCResult("none", domain, reason=reason),
        )
        lines = field.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        self.assertTrue(all(line.startswith(b"\t") for line in lines[1:-1]))
        self.assertNotIn(b"\n", field.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", field.replace(b"\r\n", b""))
        self.assertTrue(_balanced(field.decode("utf-8")), field)


class CachingLookupTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.zone = ZoneResolver(
            {
                "a.test": [("TXT", "one"), ("A", "192.0.2.1")],
                "alias.test": [("CNAME", "a.test")],
                "fail.test": ["SERVFAIL"],
            }
        )
        self.lookup = CachingLookup(self.zone, 1.0, self.clock)

    def test_keptForTTL(self):
        """
        An answer is kept for its TTL (60 s here), then asked again.
        """
        self.assertEqual(self.successResultOf(self.lookup("a.test", "TXT")), [(b"one",)])
        self.assertEqual(self.successResultOf(self.lookup("A.TEST.", "TXT")), [(b"one",)])
        self.assertEqual(len(self.zone.queries), 1)
        self.clock.advance(61)
        self.successResultOf(self.lookup("a.test", "TXT"))
        self.assertEqual(len(self.zone.queries), 2)

    def test_negativeAndCNAME(self):
        """
        NXDOMAIN and no-data answers are empty lists (kept too); a CNAME is
        followed.
        """
        self.assertEqual(self.successResultOf(self.lookup("none.test", "TXT")), [])
        self.assertEqual(self.successResultOf(self.lookup("a.test", "MX")), [])
        self.assertEqual(self.successResultOf(self.lookup("alias.test", "A")), ["192.0.2.1"])
        self.successResultOf(self.lookup("none.test", "TXT"))
        self.assertEqual(self.zone.queries.count(("none.test", "TXT")), 1)

    def test_temporaryErrorsNotKept(self):
        """
        SERVFAIL is a TemporaryDNSError, asked again next time.
        """
        self.failureResultOf(self.lookup("fail.test", "TXT"), TemporaryDNSError)
        self.failureResultOf(self.lookup("fail.test", "TXT"), TemporaryDNSError)
        self.assertEqual(len(self.zone.queries), 2)

    def test_sharedInFlight(self):
        """
        A question already asked is not asked again while its answer is on
        the way; everyone waiting gets it.
        """
        pending = defer.Deferred()

        class Slow:
            queries = 0

            def query(self, query, timeout):
                Slow.queries += 1
                return pending

        lookup = CachingLookup(Slow(), 1.0, self.clock)
        first, second = lookup("x.test", "A"), lookup("x.test", "A")
        record = dns.RRHeader(b"x.test", dns.A, dns.IN, 30, dns.Record_A("192.0.2.9"))
        pending.callback(([record], [], []))
        self.assertEqual(self.successResultOf(first), ["192.0.2.9"])
        self.assertEqual(self.successResultOf(second), ["192.0.2.9"])
        self.assertEqual(Slow.queries, 1)


class SPFTimeoutTests(unittest.TestCase):
    def test_neverAnswered(self):
        """
        A resolver that never answers: the lookup's own timeout ends the
        evaluation with temperror (driven by a Clock, no real wait).
        """
        clock = task.Clock()

        class Silent:
            def query(self, query, timeout):
                d = defer.Deferred()
                return d.addTimeout(sum(timeout), clock)

        lookup = CachingLookup(Silent(), 1.0, clock)
        d = checkSPF(lookup, "192.0.2.1", "a@silent.test", "h.test")
        clock.advance(2)
        self.assertEqual(self.successResultOf(d).result, "temperror")


class RecentSPFResultsTests(unittest.TestCase):
    """
    An SPF result is given again for the same client, sender and HELO name
    only while every answer it was drawn from still stands.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.resolver = ZoneResolver({"x.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]})
        self.lookup = CachingLookup(self.resolver, 1.0, self.clock)
        self.recent = RecentResults()

    def check(self, ip="192.0.2.1"):
        return self.successResultOf(
            checkSPF(self.lookup, ip, "a@x.test", "h.test", recent=self.recent)
        ).result

    def test_keptWhileAnswersStand(self):
        """
        A second message from the same client and sender within the
        record's TTL gets the kept result (the evaluation is not run, so it
        does not see a record changed behind the cache's back); another
        client is evaluated on its own.
        """
        self.assertEqual(self.check(), "pass")
        self.resolver.zone["x.test"] = [("TXT", "v=spf1 ?all")]
        self.assertEqual(
            self.recent.get(("192.0.2.1", "a@x.test", "h.test", "unknown"), self.lookup.cached),
            SPFResult("pass", "mailfrom", "x.test", "sender SPF authorized"),
        )
        self.assertEqual(self.check(), "pass")
        self.assertEqual(self.check("198.51.100.1"), "fail")

    def test_expiredAnswerEvaluatedAgain(self):
        """
        Once an answer the result was drawn from has expired, the record
        is asked for again and the result follows it.
        """
        self.assertEqual(self.check(), "pass")
        self.resolver.zone["x.test"] = [("TXT", "v=spf1 ?all")]
        self.clock.advance(61)
        self.assertEqual(self.check(), "neutral")

    def test_failNotKept(self):
        """
        A fail is evaluated every time: its explanation may name the time.
        """
        self.assertEqual(self.check("198.51.100.1"), "fail")
        self.assertIsNone(
            self.recent.get(("198.51.100.1", "a@x.test", "h.test", "unknown"), self.lookup.cached)
        )

    def test_oldestGoes(self):
        """
        The results kept are bounded.
        """
        self.recent = RecentResults(maxEntries=2)
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.assertEqual(self.check(ip), "pass")
        kept = [
            self.recent.get((ip, "a@x.test", "h.test", "unknown"), self.lookup.cached)
            for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")
        ]
        self.assertEqual([k is not None for k in kept], [False, True, True])


class ExemptTests(unittest.TestCase):
    def test_trustedNetworks(self):
        """
        Clients in the trusted networks are exempt, IPv4-mapped IPv6
        addresses included; anything unreadable is checked.
        """
        checker = TrustChecker(object, "mx.test", ENFORCE, task.Clock(),
                               trustedNetworks=("192.0.2.0/24", "2001:db8::/32"))
        self.assertTrue(checker.exempt("192.0.2.7"))
        self.assertTrue(checker.exempt("::ffff:192.0.2.7"))
        self.assertTrue(checker.exempt("2001:db8::1"))
        self.assertFalse(checker.exempt("198.51.100.1"))
        self.assertFalse(checker.exempt("?"))


class SPFRoundsTests(unittest.TestCase):
    def test_longRecordWithinRounds(self):
        """
        A record that uses every lookup it may (8 a: terms, an mx with 10
        exchanges, a ptr with 10 names) gets pyspf's result, not a
        temperror for running out of rounds: the addresses of MX and PTR
        names are asked for together.
        """
        zone = {
            "x.test": [("TXT", "v=spf1 " + " ".join(f"a:h{i}.x.test" for i in range(8)) + " mx ptr -all")],
            "1.2.0.192.in-addr.arpa": [("PTR", f"p{i}.x.test") for i in range(10)],
        }
        zone["x.test"] += [("MX", (i, f"m{i}.x.test")) for i in range(10)]
        for i in range(8):
            zone[f"h{i}.x.test"] = [("A", "192.0.2.99")]
        for i in range(10):
            zone[f"m{i}.x.test"] = [("A", "192.0.2.98")]
            zone[f"p{i}.x.test"] = [("A", "192.0.2.1" if i == 9 else "192.0.2.97")]
        lookup = CachingLookup(ZoneResolver(zone), 1.0, task.Clock())
        result = self.successResultOf(checkSPF(lookup, "192.0.2.1", "a@x.test", "h.test"))
        self.assertEqual(result.result, "pass")


class SilentResolverTests(unittest.TestCase):
    def test_verdictInTime(self):
        """
        A resolver that never answers nor fails: every question ends soon
        after the DNS timeout, SPF, DKIM and DMARC are temperror, and the verdict
        defers the message (DMARC may have refused it) rather than hang.
        """
        clock = task.Clock()

        class Silent:
            def query(self, query, timeout):
                return defer.Deferred()

        checker = TrustChecker(Silent, "mx.test", ENFORCE, clock, dnsTimeout=1.0,
                               inThread=defer.maybeDeferred)
        checks = checker.begin("192.0.2.1", "h.test", "a@x.test")
        message = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=AA==\r\n"
        checks.feed(message + b"From: a@x.test\r\n\r\nHi\r\n")
        checks.finish()
        d = checks.verdict()
        clock.advance(1.5)
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.action, DEFER)
        self.assertEqual(
            verdict.summary, "spf=temperror(mailfrom:x.test) dkim=temperror:x.test dmarc=temperror(x.test)"
        )


class BatchVerifierTests(unittest.TestCase):
    """
    Where DKIM verification runs: small messages at once, in the reactor
    thread; bigger ones in a worker thread, in batches.
    """

    key = base64.b64encode(bytes(nacl.signing.SigningKey(b"b" * 32).verify_key)).decode()

    def setUp(self):
        self.trips: list[defer.Deferred] = []
        self.work: list = []

        def inThread(f):
            # A worker thread that runs when the test says.
            d = defer.Deferred()
            self.trips.append(d)
            self.work.append(f)
            return d

        self.verifier = BatchVerifier(inThread, inlineWork=1000)

    def verify(self, size: int) -> defer.Deferred:
        message = _signed(b"x" * size)
        fields = parseFields(message.split(b"\r\n\r\n")[0] + b"\r\n")
        keys = {"s._domainkey.d.test": f"v=DKIM1; k=ed25519; p={self.key}".encode()}
        return self.verifier.verify(message, None, readSignatures(fields), keys)

    def finishTrip(self, index: int) -> None:
        self.trips[index].callback(self.work[index]())

    def test_smallAtOnce(self):
        """
        A message within inlineWork is verified before verify() returns,
        with no trip to a thread.
        """
        (result,) = self.successResultOf(self.verify(100))
        self.assertEqual(result.result, "pass")
        self.assertEqual(self.trips, [])

    def test_bigInBatches(self):
        """
        Bigger messages go to the thread; those arriving while a trip is
        under way go together in the next one, and each gets its result.
        """
        first = self.verify(2000)
        self.assertEqual(len(self.trips), 1)
        second, third = self.verify(2000), self.verify(3000)
        self.assertEqual(len(self.trips), 1)
        self.assertNoResult(first)
        self.finishTrip(0)
        self.assertEqual(self.successResultOf(first)[0].result, "pass")
        self.assertEqual(len(self.trips), 2)
        self.assertNoResult(second)
        self.finishTrip(1)
        self.assertEqual(
            [self.successResultOf(d)[0].result for d in (second, third)], ["pass", "pass"]
        )
        self.assertEqual(len(self.trips), 2)


def _signed(body: bytes) -> bytes:
    message = b"From: a@d.test\r\nSubject: s\r\n\r\n" + body + b"\r\n"
    return dkim.sign(
        message, b"s", b"d.test", base64.b64encode(b"b" * 32),
        signature_algorithm=b"ed25519-sha256", linesep=b"\r\n",
    ) + message


class ChildCodeTests(unittest.TestCase):
    """
    The DKIM child runs the daemon's own maild, wherever the daemon was
    started from.
    """

    @defer.inlineCallbacks
    def test_notTheWorkingDirectorysMaild(self):
        """
        A daemon started in a folder holding another maild (an older
        checkout, say) still gets its own code's answers: C{python -m}
        puts the working directory first on the path, so the child is
        started in the folder of the daemon's maild.
        """
        import os
        from pathlib import Path

        from twisted.internet import reactor

        from maild.trust.dkimprocess import VerifierProcesses

        other = Path(self.mktemp())
        (other / "maild" / "trust").mkdir(parents=True)
        (other / "maild" / "__init__.py").write_text("")
        (other / "maild" / "trust" / "__init__.py").write_text("")
        # Another maild's child: it answers every signature "fail".
        (other / "maild" / "trust" / "dkimprocess.py").write_text(
            "import json, struct, sys\n"
            "while True:\n"
            "    head = sys.stdin.buffer.read(4)\n"
            "    if len(head) < 4:\n"
            "        break\n"
            "    sys.stdin.buffer.read(struct.unpack('>I', head)[0])\n"
            "    answer = json.dumps([[['fail', 'd.test', 's', '', 'other maild']]]).encode()\n"
            "    sys.stdout.buffer.write(struct.pack('>I', len(answer)) + answer)\n"
            "    sys.stdout.buffer.flush()\n"
        )
        here = os.getcwd()
        os.chdir(other)
        self.addCleanup(os.chdir, here)
        processes = VerifierProcesses(reactor, 1)
        processes.startService()
        self.addCleanup(processes.stopService)
        message = _signed(b"x")
        signatures = readSignatures(parseFields(message.split(b"\r\n\r\n")[0] + b"\r\n"))
        keys = {"s._domainkey.d.test": f"v=DKIM1; k=ed25519; p={BatchVerifierTests.key}".encode()}
        (results,) = yield processes.verify([(message, None, signatures, keys)])
        self.assertEqual([r.result for r in results], ["pass"])


class AnyRecordTests(unittest.TestCase):
    @SETTINGS
    @given(st.text(alphabet=st.sampled_from(list("v=spf1 :/.%{}-+~?_ail4x6includerdmp0123")), max_size=60))
    def test_anySPFRecord(self, record):
        """
        Any SPF record text gets one of RFC 7208's results, never an
        exception.
        """
        zone = ZoneResolver({"x.test": [("TXT", "v=spf1 " + record)], "y.test": [("TXT", record)]})
        lookup = CachingLookup(zone, 1.0, task.Clock())
        for domain in ("x.test", "y.test"):
            result = self.successResultOf(checkSPF(lookup, "192.0.2.1", f"a@{domain}", "h.test"))
            self.assertIn(
                result.result,
                ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"),
            )

    @SETTINGS
    @given(st.text(alphabet=st.sampled_from(list("abvdhsl=;: +/AZ09\t-")), max_size=80))
    def test_anyDKIMSignature(self, tags):
        """
        Any DKIM-Signature field gets a result per signature, never an
        exception.
        """
        key = base64.b64encode(b"k" * 32).decode()
        zone = ZoneResolver({"s._domainkey.d.test": [("TXT", f"v=DKIM1; k=ed25519; p={key}")]})
        lookup = CachingLookup(zone, 1.0, task.Clock())
        message = f"DKIM-Signature: d=d.test; s=s; {tags}\r\nFrom: a@d.test\r\n\r\nbody\r\n".encode()
        fields = parseFields(message.split(b"\r\n\r\n")[0] + b"\r\n")
        d = defer.ensureDeferred(
            verifyDKIM(lookup, readSignatures(fields), message, BatchVerifier(defer.maybeDeferred))
        )
        (result,) = self.successResultOf(d)
        self.assertIn(result.result, ("pass", "fail", "permerror", "temperror", "policy"))


class VerifierProcessesTests(unittest.TestCase):
    """
    The DKIM child processes' pool (maild.trust.dkimprocess), with a
    reactor whose children the test plays.
    """

    class Reactor:
        def __init__(self):
            self.spawned = []

        def spawnProcess(self, child, executable, args, env, path, childFDs):
            transport = VerifierProcessesTests.Transport()
            child.makeConnection(transport)
            self.spawned.append((child, transport))
            return transport

    class Transport:
        def __init__(self):
            self.written = b""

        def write(self, data):
            self.written += data

        def signalProcess(self, signal):
            pass

    def setUp(self):
        from maild.trust.dkimprocess import VerifierProcesses

        self.reactor = self.Reactor()
        self.processes = VerifierProcesses(self.reactor, 1, inThread=defer.maybeDeferred)
        self.processes.startService()
        message = _signed(b"x")
        signatures = readSignatures(parseFields(message.split(b"\r\n\r\n")[0] + b"\r\n"))
        keys = {"s._domainkey.d.test": f"v=DKIM1; k=ed25519; p={BatchVerifierTests.key}".encode()}
        self.work = [(message, None, signatures, keys)]

    def test_answerReadInPieces(self):
        """
        The child's answer, however it arrives in pieces, gives the batch
        its results.
        """
        d = self.processes.verify(self.work)
        (child, transport), = self.reactor.spawned
        self.assertTrue(transport.written.startswith(b"\0\0"))
        answer = b'[[["pass", "d.test", "s", "abc", ""]]]'
        framed = len(answer).to_bytes(4, "big") + answer
        for octet in framed:
            self.assertNoResult(d)
            child.outReceived(bytes([octet]))
        self.assertEqual(self.successResultOf(d), [[DKIMResult("pass", "d.test", "s", "abc")]])

    def test_deadChildsBatchVerifiedHere(self):
        """
        A child that dies with a batch unanswered: the batch is verified
        here instead; a child that never answered at all means children
        cannot start, and later batches are verified here without one.
        """
        from twisted.internet.error import ProcessTerminated
        from twisted.python.failure import Failure

        d = self.processes.verify(self.work)
        (child, _), = self.reactor.spawned
        child.processEnded(Failure(ProcessTerminated(1)))
        self.assertEqual([r.result for r in self.successResultOf(d)[0]], ["pass"])
        again = self.successResultOf(self.processes.verify(self.work))
        self.assertEqual([r.result for r in again[0]], ["pass"])
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_unreadableAnswer(self):
        """
        An answer that is not the expected JSON: the child is killed and
        the batch verified here.
        """
        d = self.processes.verify(self.work)
        (child, _), = self.reactor.spawned
        child.outReceived(b"\0\0\0\x02{[")
        self.assertEqual([r.result for r in self.successResultOf(d)[0]], ["pass"])


class ReadSignaturesTests(unittest.TestCase):
    def test_signaturePrefixUnfolded(self):
        """
        What a signature is known by (RFC 6008 header.b): the first 8
        characters of its b= value, its folding white space dropped.
        """
        fields = parseFields(
            b"DKIM-Signature: v=1; d=D.test; s=Sel; b=ab c\r\n\td\r\n e fgh ijk\r\nFrom: a@d.test\r\n"
        )
        (signature,) = readSignatures(fields)
        self.assertEqual(
            (signature.domain, signature.selector, signature.signature, signature.keyName),
            ("d.test", "sel", "abcdefgh", "sel._domainkey.d.test"),
        )
