"""
Trust checks on the MX, end to end: mail from loopback (no trusted
networks) to a daemon whose resolver asks a private DNS server in the test
process; SPF, DKIM and DMARC results in the Authentication-Results field,
and the [mx] dmarc policy acted on.
"""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from maild import metrics
from tests.dnsserver import SERVFAIL, TIMEOUT, TRUNCATED, WRONG_NAME, DNSServer
from tests.support import PASSWORD, ServerTestCase, clientContext, sampleMessage, waitForEmptySpool

ED25519 = nacl.signing.SigningKey(b"k" * 32)
ED25519_PRIVATE = base64.b64encode(bytes(ED25519))
ED25519_PUBLIC = base64.b64encode(bytes(ED25519.verify_key)).decode()

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)
RSA_PRIVATE = _RSA.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
RSA_PUBLIC = base64.b64encode(
    _RSA.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()

# The client is 127.0.0.1.
ZONE = {
    "good.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all"), ("MX", (10, "mx.good.test"))],
    "ed._domainkey.good.test": [("TXT", f"v=DKIM1; k=ed25519; p={ED25519_PUBLIC}")],
    # A key too long for one TXT string, in two.
    "rsa._domainkey.good.test": [
        ("TXT", ("v=DKIM1; k=rsa; p=" + RSA_PUBLIC[:100], RSA_PUBLIC[100:]))
    ],
    "_dmarc.good.test": [("TXT", "v=DMARC1; p=reject")],
    "spoof.test": [("TXT", "v=spf1 -all")],
    "_dmarc.spoof.test": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@spoof.test")],
    "quarantine.test": [("TXT", "v=spf1 -all")],
    "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
    "pctzero.test": [("TXT", "v=spf1 -all")],
    "_dmarc.pctzero.test": [("TXT", "v=DMARC1; p=reject; pct=0")],
    "org.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "_dmarc.org.test": [("TXT", "v=DMARC1; p=none; sp=reject; aspf=s")],
    "nopolicy.test": [("TXT", "v=spf1 -all")],
    "softfail.test": [("TXT", "v=spf1 ~all")],
    "neutral.test": [("TXT", "v=spf1 ?all")],
    "none.test": [("A", "192.0.2.1")],
    "perm.test": [("TXT", "v=spf1 ip4:127.0.0.1 bogus:thing -all")],
    "temp.test": [SERVFAIL],
    "_dmarc.temp.test": [("TXT", "v=DMARC1; p=reject")],
    "slow.test": [("TXT", TIMEOUT)],
    "slowpolicy.test": [("TXT", TIMEOUT)],
    "_dmarc.slowpolicy.test": [("TXT", "v=DMARC1; p=reject")],
    "tempdmarc.test": [("TXT", "v=spf1 -all")],
    "_dmarc.tempdmarc.test": [SERVFAIL],
    "big.test": [TRUNCATED, ("TXT", ("v=spf1 ip4:127.0.0.1 ", "a:x.big.test " * 19, "-all"))],
    "wrong.test": [WRONG_NAME, ("A", "192.0.2.1")],
    "loop.test": [("TXT", "v=spf1 include:loop.test -all")],
}


def signed(message: bytes, selector: bytes = b"ed", domain: bytes = b"good.test", **kwargs) -> bytes:
    if selector == b"ed":
        key, algorithm = ED25519_PRIVATE, b"ed25519-sha256"
    else:
        key, algorithm = RSA_PRIVATE, b"rsa-sha256"
    signature = dkim.sign(
        message, selector, domain, key, signature_algorithm=algorithm,
        include_headers=[b"from", b"subject", b"to"], **kwargs,
    )
    return signature + message


def fromDomain(domain: str, subject: str = "Hello", body: str = "Hi there.\r\n") -> bytes:
    return sampleMessage(subject, body, sender=f"ceo@{domain}")


class TrustTestCase(ServerTestCase):
    limits = {"trusted_networks": []}
    mx: dict = {"checks": True, "dns_timeout": 0.3}

    def setUp(self):
        self.dns = DNSServer(ZONE)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.configValues = {"dns": {"nameservers": [self.dns.nameserver]}, "mx": self.mx}
        return ServerTestCase.setUp(self)

    def send(self, sender: str, message: bytes, recipient: str = "alice@localhost"):
        """
        Send in a thread; fires with C{(code, reply text)} of the end of DATA.
        """

        def run():
            with smtplib.SMTP("127.0.0.1", self.port()) as client:
                client.ehlo("client.good.test")
                try:
                    client.sendmail(sender, [recipient], message)
                except smtplib.SMTPDataError as e:
                    return e.smtp_code, e.smtp_error.decode()
                return 250, ""

        return self.inThread(run)

    def stored(self, folder: str = "") -> list[bytes]:
        return [p.read_bytes() for p in self.messages("alice@localhost", folder)]

    def results(self, message: bytes) -> str:
        """
        Our Authentication-Results field (the first field), unfolded.
        """
        first = message.split(b"\n\t", 1)[0]
        self.assertTrue(first.startswith(b"Authentication-Results: mx.test;"), message[:200])
        head = message.split(b"\n")
        lines = [head[0]]
        for line in head[1:]:
            if not line.startswith(b"\t"):
                break
            lines.append(line)
        return b" ".join(lines).decode()


class DKIMTests(TrustTestCase):
    """
    DKIM verified in the daemon ([mx] dkim_processes = 0).
    """

    mx = dict(TrustTestCase.mx, dkim_processes=0)

    @defer.inlineCallbacks
    def test_ed25519SignaturePasses(self):
        """
        A message signed with an ed25519 key published in DNS verifies:
        dkim=pass, and with an aligned SPF pass, dmarc=pass; it goes to the
        INBOX with our field on top.
        """
        code, _ = yield self.send("bounce@good.test", signed(fromDomain("good.test")))
        self.assertEqual(code, 250)
        (message,) = self.stored()
        results = self.results(message)
        self.assertIn("spf=pass smtp.mailfrom=bounce@good.test", results)
        self.assertIn("dkim=pass header.d=good.test header.s=ed", results)
        self.assertIn("dmarc=pass (p=reject) header.from=good.test", results)

    @defer.inlineCallbacks
    def test_rsaSignaturePassesAlone(self):
        """
        An RSA signature (its key split over two TXT strings) passes, and
        makes DMARC pass although SPF fails (the envelope is another domain).
        """
        code, _ = yield self.send("x@nopolicy.test", signed(fromDomain("good.test"), b"rsa"))
        self.assertEqual(code, 250)
        results = self.results(self.stored()[0])
        self.assertIn("spf=fail", results)
        self.assertIn("dkim=pass header.d=good.test header.s=rsa", results)
        self.assertIn("dmarc=pass", results)

    @defer.inlineCallbacks
    def test_alteredMessageFails(self):
        """
        The same message with its body changed after signing: dkim=fail;
        with no aligned pass either, DMARC p=reject refuses it.
        """
        message = signed(fromDomain("good.test")).replace(b"Hi there.", b"Pay now.")
        code, text = yield self.send("x@nopolicy.test", message)
        self.assertEqual(code, 550)
        self.assertIn("5.7.1", text)
        self.assertEqual(self.stored(), [])

    @defer.inlineCallbacks
    def test_badSignatures(self):
        """
        Signatures that cannot be read (bad base64, a length past the body,
        a selector with no key) get permerror or fail, never a traceback,
        and the message is delivered per policy.
        """
        message = fromDomain("nopolicy.test")
        bad = (
            b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test; s=rsa; h=from; bh=!!!; b=@@@\r\n"
            + signed(message, b"rsa", length=True).replace(b"l=", b"l=99999999999999999999")
        )
        bad = b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test; s=nokey; h=from; bh=AAAA; b=AAAA\r\n" + bad
        code, _ = yield self.send("x@nopolicy.test", bad)
        self.assertEqual(code, 250)
        results = self.results(self.stored()[0])
        self.assertEqual(results.count("dkim="), 3, results)
        self.assertIn("dkim=permerror (no key) header.d=good.test header.s=nokey", results)
        self.assertIn("dkim=permerror (bad signature", results)
        self.assertIn("dkim=fail", results)

    @defer.inlineCallbacks
    def test_bigSignedMessage(self):
        """
        A signed message bigger than what the store keeps in memory is
        verified whole, and our field still goes on top.
        """
        body = "".join(f"line {i} of a long message\r\n" for i in range(20000))
        code, _ = yield self.send("bounce@good.test", signed(fromDomain("good.test", body=body)))
        self.assertEqual(code, 250)
        (message,) = self.stored()
        self.assertIn("dkim=pass", self.results(message))
        self.assertTrue(message.endswith(b"line 19999 of a long message\n"))


class DKIMProcessTests(DKIMTests):
    """
    The same, with DKIM verified in a child process ([mx]
    dkim_processes): the same results.
    """

    mx = dict(TrustTestCase.mx, dkim_processes=1)

    @defer.inlineCallbacks
    def test_childReplacedWhenItDies(self):
        """
        A child that dies is replaced by the next message's, and a message
        verified after it still gets its result.
        """
        code, _ = yield self.send("bounce@good.test", signed(fromDomain("good.test")))
        self.assertEqual(code, 250)
        (child,) = self.dkimChildren()
        ended = child.ended
        child.transport.signalProcess("KILL")
        yield ended
        self.assertEqual(self.dkimChildren(), [])
        code, _ = yield self.send("bounce@good.test", signed(fromDomain("good.test", "Again")))
        self.assertEqual(code, 250)
        self.assertEqual(len(self.dkimChildren()), 1)
        self.assertEqual([self.results(m).count("dkim=pass") for m in self.stored()], [1, 1])

    @defer.inlineCallbacks
    def test_pipeHoldsABatch(self):
        """
        The pipe to the child holds a batch of messages (1 MiB, or as much
        as the system allows), not Linux's default 64 KiB: a batch goes in
        one write instead of one per 64 KiB.
        """
        import fcntl

        from maild.trust.dkimprocess import PIPE_SIZE

        code, _ = yield self.send("bounce@good.test", signed(fromDomain("good.test")))
        self.assertEqual(code, 250)
        (child,) = self.dkimChildren()
        size = fcntl.fcntl(child.transport.pipes[0].fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
        allowed = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        self.assertGreaterEqual(size, min(PIPE_SIZE, allowed))

    def dkimChildren(self) -> list:
        from maild.trust.dkimprocess import VerifierProcesses

        (processes,) = [s for s in self.service if isinstance(s, VerifierProcesses)]
        return list(processes._children)


class SPFTests(TrustTestCase):
    @defer.inlineCallbacks
    def test_results(self):
        """
        Each SPF result is recorded for the envelope sender's domain; with
        no DMARC policy the message is delivered whatever it is.
        """
        expected = {
            "good.test": "pass",
            "nopolicy.test": "fail",
            "softfail.test": "softfail",
            "neutral.test": "neutral",
            "none.test": "none",
            "perm.test": "permerror",
            "loop.test": "permerror",
            "wrong.test": "none",
            "big.test": "pass",
        }
        for domain, result in expected.items():
            code, _ = yield self.send(f"x@{domain}", fromDomain("nopolicy.test", subject=domain))
            self.assertEqual(code, 250, domain)
        stored = self.stored()
        self.assertEqual(len(stored), len(expected))
        for message, (domain, result) in zip(stored, expected.items()):
            self.assertIn(f"spf={result} smtp.mailfrom=x@{domain};", self.results(message))

    @defer.inlineCallbacks
    def test_temperrorRecorded(self):
        """
        A lookup that times out gives spf=temperror; no policy depends on
        it, so the message is delivered.
        """
        code, _ = yield self.send("x@slow.test", fromDomain("nopolicy.test"))
        self.assertEqual(code, 250)
        self.assertIn("spf=temperror", self.results(self.stored()[0]))

    @defer.inlineCallbacks
    def test_nullSenderChecksHelo(self):
        """
        With the null sender, SPF checks the HELO name (RFC 7208 section 2.3).
        """
        code, _ = yield self.send("", fromDomain("nopolicy.test"))
        self.assertEqual(code, 250)
        self.assertIn("spf=none smtp.helo=client.good.test", self.results(self.stored()[0]))


class DMARCTests(TrustTestCase):
    @defer.inlineCallbacks
    def test_rejectIs550(self):
        """
        A From: domain with p=reject, and neither SPF nor DKIM aligned:
        550 5.7.1 at the end of DATA, nothing stored.
        """
        code, text = yield self.send("ceo@spoof.test", fromDomain("spoof.test"))
        self.assertEqual(code, 550)
        self.assertIn("5.7.1", text)
        self.assertEqual(self.stored(), [])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

    @defer.inlineCallbacks
    def test_quarantineGoesToJunk(self):
        """
        p=quarantine failures go to the recipient's Junk folder, not the INBOX.
        """
        code, _ = yield self.send("ceo@quarantine.test", fromDomain("quarantine.test"))
        self.assertEqual(code, 250)
        self.assertEqual(self.stored(), [])
        (message,) = self.stored(".Junk")
        self.assertIn("dmarc=fail (p=quarantine) header.from=quarantine.test", self.results(message))

    @defer.inlineCallbacks
    def test_noPolicyGoesToInbox(self):
        """
        No DMARC record: SPF -all is recorded, not refused.
        """
        code, _ = yield self.send("ceo@nopolicy.test", fromDomain("nopolicy.test"))
        self.assertEqual(code, 250)
        results = self.results(self.stored()[0])
        self.assertIn("spf=fail", results)
        self.assertIn("dkim=none", results)
        self.assertIn("dmarc=none header.from=nopolicy.test", results)

    @defer.inlineCallbacks
    def test_percentSampling(self):
        """
        pct=0: a failure outside the sample gets the next milder policy
        (RFC 7489 section 6.6.4): quarantine instead of reject.
        """
        code, _ = yield self.send("ceo@pctzero.test", fromDomain("pctzero.test"))
        self.assertEqual(code, 250)
        self.assertEqual(len(self.stored(".Junk")), 1)

    @defer.inlineCallbacks
    def test_subdomainPolicyAndStrictAlignment(self):
        """
        A subdomain without a record of its own takes the organizational
        domain's sp=; with aspf=s, SPF passing for the parent is not aligned.
        """
        code, _ = yield self.send("x@org.test", fromDomain("mail.org.test"))
        self.assertEqual(code, 550)

    @defer.inlineCallbacks
    def test_forgedResultsRemoved(self):
        """
        An Authentication-Results field claiming our host name is removed
        (RFC 8601 section 5); another host's stays.
        """
        message = (
            b"Authentication-Results: MX.TEST; dmarc=pass header.from=spoof.test\r\n"
            b"Authentication-Results: other.example; spf=pass\r\n" + fromDomain("nopolicy.test")
        )
        code, _ = yield self.send("ceo@nopolicy.test", message)
        self.assertEqual(code, 250)
        (stored,) = self.stored()
        self.assertNotIn(b"MX.TEST", stored)
        self.assertEqual(stored.count(b"Authentication-Results: mx.test;"), 1)
        self.assertIn(b"Authentication-Results: other.example; spf=pass\n", stored)

    @defer.inlineCallbacks
    def test_fromWithSeveralAddresses(self):
        """
        RFC 7489 section 6.6.1: a From: with addresses in several domains is
        checked for each, the worst result standing: one with p=reject
        refuses the message.
        """
        message = b"From: a@nopolicy.test, b@spoof.test\r\nSubject: x\r\n\r\nHi\r\n"
        code, _ = yield self.send("x@nopolicy.test", message)
        self.assertEqual(code, 550)

    @defer.inlineCallbacks
    def test_fromWithTooManyDomains(self):
        """
        A From: naming more domains than are checked (10) is not looked up
        at all: dmarc=permerror, and the message goes to Junk.
        """
        addresses = ", ".join(f"a@d{i}.test" for i in range(11))
        message = f"From: {addresses}\r\nSubject: x\r\n\r\nHi\r\n".encode()
        code, _ = yield self.send("x@nopolicy.test", message)
        self.assertEqual(code, 250)
        (stored,) = self.stored(".Junk")
        self.assertIn("dmarc=permerror (too many From: domains)", self.results(stored))
        self.assertNotIn(("_dmarc.d0.test", "TXT"), self.dns.resolver.queries)

    @defer.inlineCallbacks
    def test_noFrom(self):
        """
        No From: field at all: dmarc=none, delivered.
        """
        code, _ = yield self.send("x@spoof.test", b"Subject: x\r\n\r\nHi\r\n")
        self.assertEqual(code, 250)
        self.assertIn("dmarc=none (no From: domain)", self.results(self.stored()[0]))

    @defer.inlineCallbacks
    def test_temporaryErrorDefers(self):
        """
        When the DMARC policy cannot be looked up now and nothing aligned
        passed, the answer is 451 4.4.3 and nothing is stored.
        """
        code, text = yield self.send("x@tempdmarc.test", fromDomain("tempdmarc.test"))
        self.assertEqual(code, 451)
        self.assertIn("4.4.3", text)
        self.assertEqual(self.stored() + self.stored(".Junk"), [])

    @defer.inlineCallbacks
    def test_temporarySPFErrorDefersAlignedFailure(self):
        """
        SPF temperror for the From: domain itself, p=reject: the policy
        depends on the lookup that failed, so 451 4.4.3 rather than 550.
        """
        code, text = yield self.send("x@temp.test", fromDomain("temp.test"))
        self.assertEqual((code, text[:5]), (451, "4.4.3"))

    @defer.inlineCallbacks
    def test_timeoutDefersAlignedFailure(self):
        """
        The SPF lookup of the From: domain times out and its DMARC policy
        is reject: 451 4.4.3, the sender tries again.
        """
        code, text = yield self.send("x@slowpolicy.test", fromDomain("slowpolicy.test"))
        self.assertEqual((code, text[:5]), (451, "4.4.3"))
        self.assertEqual(self.stored() + self.stored(".Junk"), [])

    @defer.inlineCallbacks
    def test_oneLogLinePerMessage(self):
        """
        Each message gets one log line with the three results.
        """
        lines = []
        observer = lambda event: lines.append(event)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        yield self.send("ceo@spoof.test", fromDomain("spoof.test"))
        yield self.send("bounce@good.test", fromDomain("good.test"))
        from twisted.logger import formatEvent

        texts = [formatEvent(e) for e in lines if "spf=" in formatEvent(e)]
        self.assertEqual(len(texts), 2, texts)
        self.assertTrue(texts[0].startswith("refused"))
        self.assertIn("dmarc=fail(spoof.test p=reject)", texts[0])
        self.assertTrue(texts[1].startswith("accepted"))
        self.assertIn("spf=pass(mailfrom:good.test) dkim=none dmarc=pass", texts[1])


    @defer.inlineCallbacks
    def test_counted(self):
        """
        Each result is counted for the metrics (maild_trust_results_total).
        """
        def count(check, result):
            value = metrics.REGISTRY.get_sample_value(
                "maild_trust_results_total", {"check": check, "result": result}
            )
            return value or 0

        before = [count("spf", "fail"), count("dkim", "none"), count("dmarc", "fail")]
        yield self.send("ceo@spoof.test", fromDomain("spoof.test"))
        after = [count("spf", "fail"), count("dkim", "none"), count("dmarc", "fail")]
        self.assertEqual([a - b for a, b in zip(after, before)], [1, 1, 1])


class QuarantinePolicyTests(TrustTestCase):
    mx = {"checks": True, "dns_timeout": 0.3, "dmarc": "quarantine"}

    @defer.inlineCallbacks
    def test_rejectGoesToJunk(self):
        """
        [mx] dmarc = "quarantine": p=reject failures go to Junk too.
        """
        code, _ = yield self.send("ceo@spoof.test", fromDomain("spoof.test"))
        self.assertEqual(code, 250)
        self.assertEqual(len(self.stored(".Junk")), 1)


class ReportPolicyTests(TrustTestCase):
    mx = {"checks": True, "dns_timeout": 0.3, "dmarc": "report"}

    @defer.inlineCallbacks
    def test_onlyRecorded(self):
        """
        [mx] dmarc = "report": failures are recorded and delivered to the
        INBOX; temporary errors do not defer.
        """
        for domain in ("spoof.test", "quarantine.test", "tempdmarc.test"):
            code, _ = yield self.send(f"x@{domain}", fromDomain(domain))
            self.assertEqual(code, 250)
        stored = self.stored()
        self.assertEqual(len(stored), 3)
        self.assertIn("dmarc=fail (p=reject)", self.results(stored[0]))
        self.assertIn("dmarc=temperror", self.results(stored[2]))


class TrustedNetworkTests(TrustTestCase):
    limits = {"trusted_networks": ["127.0.0.0/8"]}

    @defer.inlineCallbacks
    def test_trustedNotChecked(self):
        """
        Mail from a trusted network is not checked: no field, no refusal.
        """
        code, _ = yield self.send("ceo@spoof.test", fromDomain("spoof.test"))
        self.assertEqual(code, 250)
        self.assertNotIn(b"Authentication-Results", self.stored()[0])
        self.assertEqual(self.dns.resolver.queries, [])


class SubmissionTests(TrustTestCase):
    listeners = ("smtp", "submission")

    @defer.inlineCallbacks
    def test_authenticatedNotChecked(self):
        """
        Mail from an authenticated user (submission) is not checked, even
        from a network that is not trusted: no field, no lookup.
        """

        def run():
            with smtplib.SMTP("127.0.0.1", self.port("submission")) as client:
                client.starttls(context=clientContext(self.service))
                client.login("alice@localhost", PASSWORD)
                client.sendmail(
                    "alice@localhost", ["alice@localhost"],
                    b"From: alice@localhost\r\nSubject: x\r\n\r\nHi\r\n",
                )

        yield self.inThread(run)
        (message,) = self.stored()
        self.assertNotIn(b"Authentication-Results", message)
        self.assertEqual(self.dns.resolver.queries, [])
