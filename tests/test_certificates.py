"""
The certificates maild makes when none is configured: a local CA in
C{<data>/tls/} that signs the server's certificate, renewal before it
expires, the upgrade from the single self-signed certificate of older
versions, and the TLS 1.2 suites offered (Mozilla's "intermediate").
"""

from __future__ import annotations

import datetime
import imaplib
import ipaddress
import poplib
import smtplib
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from maild.service import MailService
from maild.tls import LocalCA, RENEW_BEFORE, certificateFingerprint, fingerprint
from tests.support import PASSWORD, RawClient, ServerTestCase, makeConfig, writeUsers

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.timezone.utc)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def extension(certificate: x509.Certificate, kind):
    return certificate.extensions.get_extension_for_class(kind)


def writeOldSelfSigned(directory: Path, hostname: str) -> None:
    """
    What maild made before it had a local CA: one self-signed certificate
    with CA:TRUE, serving as the server's own.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


class LocalCATests(unittest.SynchronousTestCase):
    def setUp(self):
        self.directory = Path(self.mktemp()).resolve() / "tls"
        self.authority = LocalCA(self.directory, "mail.example.org")

    def test_extensions(self):
        """
        The CA lives 10 years, is CA:TRUE (path length 0) with keyCertSign
        and may sign only for the host's names; the server certificate it
        signs is CA:FALSE, for serverAuth, names the host, localhost and
        the loopback addresses, lives 825 days, and verifies under the CA
        (OpenSSL's own chain check, name constraints included).  Keys are
        readable by their owner only.
        """
        self.assertTrue(self.authority.ensure(NOW))
        ca = load(self.authority.certPath)
        server = load(self.authority.serverCertPath)

        self.assertEqual(ca.not_valid_after_utc - ca.not_valid_before_utc, datetime.timedelta(days=3650, minutes=5))
        constraints = extension(ca, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual((constraints.value.ca, constraints.value.path_length), (True, 0))
        usage = extension(ca, x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign)
        self.assertTrue(usage.value.crl_sign)
        self.assertFalse(usage.value.digital_signature)
        permitted = extension(ca, x509.NameConstraints).value.permitted_subtrees
        self.assertEqual(
            set(permitted),
            {
                x509.DNSName("mail.example.org"),
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
                x509.IPAddress(ipaddress.ip_network("::1/128")),
            },
        )
        self.assertEqual(ca.issuer, ca.subject)

        self.assertEqual(server.issuer, ca.subject)
        server.verify_directly_issued_by(ca)
        self.assertEqual(server.not_valid_after_utc - server.not_valid_before_utc, datetime.timedelta(days=825, minutes=5))
        constraints = extension(server, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertFalse(constraints.value.ca)
        self.assertEqual(list(extension(server, x509.ExtendedKeyUsage).value), [ExtendedKeyUsageOID.SERVER_AUTH])
        usage = extension(server, x509.KeyUsage)
        self.assertTrue(usage.value.digital_signature)
        self.assertFalse(usage.value.key_cert_sign)
        names = extension(server, x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["mail.example.org", "localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertEqual(
            extension(server, x509.AuthorityKeyIdentifier).value.key_identifier,
            extension(ca, x509.SubjectKeyIdentifier).value.digest,
        )

        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(ca))
        store.set_time((NOW + datetime.timedelta(days=1)).replace(tzinfo=None))
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(server)).verify_certificate()

        for key in (self.authority.keyPath, self.authority.serverKeyPath):
            self.assertEqual(key.stat().st_mode & 0o777, 0o600)

    def test_keptUntilDue(self):
        """
        The next checks change nothing while the server certificate has
        more than RENEW_BEFORE left; then it is replaced by a new one from
        that day (new key, full lifetime) signed by the same CA, which
        users keep trusting.
        """
        self.authority.ensure(NOW)
        ca = self.authority.certPath.read_bytes()
        first = load(self.authority.serverCertPath)
        firstKey = self.authority.serverKeyPath.read_bytes()
        dueAt = first.not_valid_after_utc - RENEW_BEFORE
        self.assertFalse(self.authority.ensure(NOW + datetime.timedelta(days=1)))
        self.assertFalse(self.authority.ensure(dueAt - datetime.timedelta(hours=1)))
        self.assertEqual(load(self.authority.serverCertPath), first)

        self.assertTrue(self.authority.ensure(dueAt + datetime.timedelta(hours=1)))
        second = load(self.authority.serverCertPath)
        self.assertNotEqual(second.serial_number, first.serial_number)
        self.assertNotEqual(self.authority.serverKeyPath.read_bytes(), firstKey)
        self.assertGreater(second.not_valid_after_utc, first.not_valid_after_utc + datetime.timedelta(days=700))
        self.assertEqual(self.authority.certPath.read_bytes(), ca)
        second.verify_directly_issued_by(load(self.authority.certPath))

    def test_caNearItsEnd(self):
        """
        A server certificate never outlives its CA; a CA near its own end
        is replaced, with a new server certificate under it.
        """
        self.authority.ensure(NOW)
        ca = load(self.authority.certPath)
        late = ca.not_valid_after_utc - datetime.timedelta(days=100)
        self.assertTrue(self.authority.ensure(late))
        self.assertEqual(load(self.authority.serverCertPath).not_valid_after_utc, ca.not_valid_after_utc)
        self.assertTrue(self.authority.ensure(ca.not_valid_after_utc - datetime.timedelta(days=10)))
        newCA = load(self.authority.certPath)
        self.assertNotEqual(newCA.serial_number, ca.serial_number)
        load(self.authority.serverCertPath).verify_directly_issued_by(newCA)

    def test_upgradeFromSelfSigned(self):
        """
        A data folder from an older version holds one self-signed CA:TRUE
        certificate as the server's: it is replaced by a CA:FALSE one
        signed by a new local CA.
        """
        writeOldSelfSigned(self.directory, "mail.example.org")
        old = self.directory.joinpath("cert.pem").read_bytes()
        self.assertTrue(self.authority.ensure(NOW))
        self.assertNotEqual(self.authority.serverCertPath.read_bytes(), old)
        server = load(self.authority.serverCertPath)
        self.assertFalse(extension(server, x509.BasicConstraints).value.ca)
        server.verify_directly_issued_by(load(self.authority.certPath))
        self.assertFalse(self.authority.ensure(NOW))

    def test_hostNameChanged(self):
        """
        When the host name changes, the next start makes a certificate
        for the new one (and a new CA, since the old one may sign only
        for the old name).
        """
        self.authority.ensure(NOW)
        renamed = LocalCA(self.directory, "mx.example.net")
        self.assertTrue(renamed.ensure(NOW))
        names = extension(load(renamed.serverCertPath), x509.SubjectAlternativeName).value
        self.assertIn("mx.example.net", names.get_values_for_type(x509.DNSName))
        load(renamed.serverCertPath).verify_directly_issued_by(load(renamed.certPath))


class ServedCertificateTests(ServerTestCase):
    listeners = ("smtps", "pop3s", "imaps")

    def trustingOnlyCA(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dataDir / "tls/ca.pem"))

    @defer.inlineCallbacks
    def test_clientTrustingTheCA(self):
        """
        A client that trusts only the exported CA certificate (the
        standard library's defaults: chain and host name verified) logs in
        over SMTPS, POP3S and IMAPS by the host name and by 127.0.0.1;
        another host name is refused.
        """
        context = self.trustingOnlyCA()

        def verified(name: str, host: str) -> str | None:
            try:
                with socket.create_connection(("127.0.0.1", self.port(name)), timeout=10) as raw:
                    context.wrap_socket(raw, server_hostname=host).close()
            except ssl.SSLCertVerificationError as e:
                return e.verify_message
            return None

        def run():
            with smtplib.SMTP_SSL("127.0.0.1", self.port("smtps"), context=context) as smtp:
                smtp.login("alice@localhost", PASSWORD)
            pop = poplib.POP3_SSL("127.0.0.1", self.port("pop3s"), context=context)
            pop.user("alice@localhost")
            pop.pass_(PASSWORD)
            pop.quit()
            imap = imaplib.IMAP4_SSL("127.0.0.1", self.port("imaps"), ssl_context=context)
            imap.login("alice@localhost", PASSWORD)
            imap.logout()
            return {
                (name, host): verified(name, host)
                for name in self.listeners
                for host in ("mx.test", "localhost", "::1", "other.test")
            }

        results = yield self.inThread(run)
        for name in self.listeners:
            for host in ("mx.test", "localhost", "::1"):
                self.assertIsNone(results[name, host], (name, host))
            self.assertIn("Hostname mismatch", results[name, "other.test"])

    def handshake(self, name: str, ciphers: str | None, version: ssl.TLSVersion) -> str | None:
        """
        The suite agreed on with listener C{name}, or None if refused.
        """
        context = self.trustingOnlyCA()
        context.minimum_version = context.maximum_version = version
        if ciphers is not None:
            context.set_ciphers(ciphers)
        try:
            with socket.create_connection(("127.0.0.1", self.port(name)), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="mx.test") as tls:
                    return tls.cipher()[0]
        except ssl.SSLError:
            return None

    @defer.inlineCallbacks
    def test_intermediateSuites(self):
        """
        TLS 1.2 offers AEAD suites only (Mozilla's "intermediate"
        profile): a client that offers only CBC suites is refused, one
        that offers GCM or ChaCha20 gets them; TLS 1.3 is on.
        """
        cbc = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384"
        for name in ("smtps", "pop3s", "imaps"):
            tls12 = ssl.TLSVersion.TLSv1_2
            self.assertIsNone((yield self.inThread(self.handshake, name, cbc, tls12)), name)
            self.assertEqual(
                (yield self.inThread(self.handshake, name, "ECDHE-ECDSA-CHACHA20-POLY1305", tls12)),
                "ECDHE-ECDSA-CHACHA20-POLY1305",
            )
            self.assertIn("GCM", (yield self.inThread(self.handshake, name, None, tls12)))
            self.assertIsNotNone((yield self.inThread(self.handshake, name, None, ssl.TLSVersion.TLSv1_3)))

    @defer.inlineCallbacks
    def test_renewalWhileServing(self):
        """
        When the daemon's daily check finds its certificate due, it makes a
        new one and serves it to new connections, while a session opened
        before goes on over the old one.
        """
        authority = self.service.localCA
        ca = (load(authority.certPath), serialization.load_pem_private_key(authority.keyPath.read_bytes(), None))
        now = datetime.datetime.now(datetime.timezone.utc)
        # A certificate made 800 days ago: 25 days left.
        authority.issue(ca, now - datetime.timedelta(days=800))
        self.assertTrue(self.service.tls.reload())
        before = self.service.tls.fingerprint

        context = self.trustingOnlyCA()
        def connect() -> RawClient:
            client = RawClient(self.port("imaps"))
            client.startTLS(context)
            return client

        opened = yield self.inThread(connect)
        self.addCleanup(opened.close)
        greeting = yield self.inThread(opened.readLine)
        self.assertTrue(greeting.startswith(b"* OK"))

        self.assertTrue(self.service.renewCertificate())
        self.assertFalse(self.service.renewCertificate())
        after = self.service.tls.fingerprint
        self.assertNotEqual(after, before)
        self.assertEqual(after, fingerprint(authority.serverCertPath))

        def served() -> str:
            with socket.create_connection(("127.0.0.1", self.port("imaps")), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="mx.test") as tls:
                    return certificateFingerprint(x509.load_der_x509_certificate(tls.getpeercert(True)))

        self.assertEqual((yield self.inThread(served)), after)
        opened.send(b"a NOOP\r\n")
        self.assertEqual((yield self.inThread(opened.readLine)), b"a OK NOOP completed")
        self.assertEqual(certificateFingerprint(x509.load_der_x509_certificate(opened.sock.getpeercert(True))), before)


class DailyRenewalTests(ServerTestCase):
    listeners = ("imaps",)
    useClock = True

    def test_checkedDaily(self):
        """
        The daemon looks at its certificate once a day: a certificate that
        has become due is replaced at the next daily check, not before.
        """
        authority = self.service.localCA
        ca = (load(authority.certPath), serialization.load_pem_private_key(authority.keyPath.read_bytes(), None))
        authority.issue(ca, datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=800))
        self.assertTrue(self.service.tls.reload())
        due = self.service.tls.fingerprint
        self.clock.advance(24 * 3600 - 1)
        self.assertEqual(self.service.tls.fingerprint, due)
        self.clock.advance(1)
        self.assertNotEqual(self.service.tls.fingerprint, due)
        self.assertEqual(self.service.tls.fingerprint, fingerprint(authority.serverCertPath))


class UpgradeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_daemonUpgradesOldPair(self):
        """
        A daemon started on an old data folder (a self-signed CA:TRUE
        certificate) serves a new certificate signed by its local CA.
        """
        data = Path(self.mktemp()).resolve()
        writeUsers(data, {"alice@localhost": PASSWORD})
        writeOldSelfSigned(data / "tls", "mx.test")
        service = MailService(makeConfig(data, ("imaps",)), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.listeners["imaps"].ready
        context = ssl.create_default_context(cafile=str(data / "tls/ca.pem"))

        def run():
            imap = imaplib.IMAP4_SSL("127.0.0.1", service.port("imaps"), ssl_context=context)
            imap.login("alice@localhost", PASSWORD)
            imap.logout()

        yield threads.deferToThread(run)
        self.assertFalse(extension(load(data / "tls/cert.pem"), x509.BasicConstraints).value.ca)


class ConfiguredFilesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_configuredFilesUntouched(self):
        """
        Configured certificate and key files are served as they are, even
        when they would be due for renewal, and no local CA is made.
        """
        data = Path(self.mktemp()).resolve()
        files = Path(self.mktemp()).resolve()
        writeOldSelfSigned(files, "mx.test")
        before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files.iterdir()}
        config = makeConfig(data, ("imaps",), tls={"cert": files / "cert.pem", "key": files / "key.pem"})
        service = MailService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.listeners["imaps"].ready
        self.assertIsNone(service.localCA)
        self.assertEqual(service.tls.fingerprint, fingerprint(files / "cert.pem"))
        self.assertFalse((data / "tls").exists())
        self.assertEqual({p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files.iterdir()}, before)
