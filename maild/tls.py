"""
TLS for every listener: the server's certificate and key, and reloading
them (on SIGHUP, or after a renewal) without dropping connections.

When no certificate is configured, maild keeps a local certificate
authority in C{<data>/tls/} (C{ca.pem}, C{ca-key.pem}) and a server
certificate it signs (C{cert.pem}, C{key.pem}), as mkcert does: a user
who trusts the CA once, on each device, trusts every certificate maild
makes for this host from then on.  L{LocalCA.ensure} makes them, renews
the server certificate before it expires, and replaces the single
self-signed certificate older versions made.

L{ServerTLS} is an old-style context factory (it has C{getContext}) that
always hands out the current certificate, so STARTTLS and the implicit
TLS listeners pick up a renewed certificate for their next connection.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from maild.store.locking import locked

log = Logger()

CA_LIFETIME = datetime.timedelta(days=3650)
# Apple's systems refuse a server certificate that lives longer than 825
# days under a user-installed CA (support.apple.com/HT210176).
SERVER_LIFETIME = datetime.timedelta(days=825)
# A server certificate this close to its end is replaced (checked at start
# and daily), leaving weeks for a failure to be noticed in the log.
RENEW_BEFORE = datetime.timedelta(days=30)
# How often a running daemon checks whether its certificate is due.
RENEWAL_CHECK_INTERVAL = 24 * 3600.0

# Mozilla's "intermediate" TLS 1.2 suites (wiki.mozilla.org/Security/Server_Side_TLS,
# version 5.7): forward secrecy and AEAD only, no CBC (LUCKY13 and friends).
# TLS 1.3's suites are all AEAD and OpenSSL configures them separately.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


class TLSError(Exception):
    pass


def isEncrypted(transport) -> bool:
    """
    Whether a session's transport is TLS: after STARTTLS (the transport then
    declares ISSLTransport), or on an implicit-TLS listener, whose
    connections the service wraps in a TLSMemoryBIOProtocol (which does not
    declare it).  Wrappers between the two (the metrics' counters) are
    looked through.
    """
    while True:
        if ISSLTransport.providedBy(transport) or isinstance(transport, TLSMemoryBIOProtocol):
            return True
        if not isinstance(transport, ProtocolWrapper):
            return False
        transport = transport.transport


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _serverNames(hostname: str, networks: bool = False) -> list[x509.GeneralName]:
    """
    The names a server certificate is valid for: the host name, localhost
    and the loopback addresses (for the host's own applications); as
    networks for a CA's name constraints.
    """
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    make = ipaddress.ip_network if networks else ipaddress.ip_address
    return names + [x509.IPAddress(make("127.0.0.1")), x509.IPAddress(make("::1"))]


def _writeAtomically(path: Path, data: bytes, mode: int) -> None:
    """
    Replace C{path} by C{data} at once: a reader (another maild process, a
    reload) sees the old file or the new one, never a part.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _keyPem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificatePem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def fingerprint(certPath: Path) -> str:
    """
    The SHA-256 fingerprint of the first certificate in C{certPath}, as
    colon-separated hex (what clients show).
    """
    return certificateFingerprint(x509.load_pem_x509_certificate(certPath.read_bytes()))


def certificateFingerprint(certificate: x509.Certificate) -> str:
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    digest = digest.upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class LocalCA:
    """
    The local certificate authority in C{directory} and the server
    certificate it signs for C{hostname}.

    @ivar certPath: the CA's certificate, the one file users import.
    @ivar serverCertPath: the server's certificate, served by every listener.
    """

    def __init__(self, directory: Path, hostname: str) -> None:
        self.directory = directory
        self.hostname = hostname
        self.certPath = directory / "ca.pem"
        self.keyPath = directory / "ca-key.pem"
        self.serverCertPath = directory / "cert.pem"
        self.serverKeyPath = directory / "key.pem"

    def ensure(self, now: datetime.datetime | None = None) -> bool:
        """
        Make the CA and the server certificate if they are missing, and
        replace the server certificate when it is not one this CA signed
        (the self-signed one of older versions), does not name the host,
        or ends within L{RENEW_BEFORE}.  A CA that ends within that time
        is replaced too (its users must then trust the new one).

        Safe to call from several processes sharing the data folder: the
        work happens under a lock, and the second finds it done.

        @param now: the time to judge by (tests pass their own).
        @return: whether a new server certificate was written.
        """
        now = now or _utcnow()
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked(self.directory / ".lock"):
            ca = self._loadCA()
            if ca is None or not self._caServes(ca[0], now):
                ca = self._makeCA(now)
            reason = self._renewalReason(ca[0], now)
            if reason is None:
                return False
            certificate = self.issue(ca, now)
        log.info(
            "made a TLS certificate for {hostname} ({reason}) in {path}, "
            "SHA-256 fingerprint {fingerprint}, valid until {end}; "
            "clients that trust {ca} accept it",
            hostname=self.hostname,
            reason=reason,
            path=str(self.serverCertPath),
            fingerprint=certificateFingerprint(certificate),
            end=certificate.not_valid_after_utc.date().isoformat(),
            ca=str(self.certPath),
        )
        return True

    def renew(self, now: datetime.datetime | None = None) -> None:
        """
        Replace the server certificate now (C{maild cert --renew}), keeping
        the CA that users trust.
        """
        self.serverCertPath.unlink(missing_ok=True)
        self.ensure(now)

    def _loadCA(self):
        try:
            certificate = x509.load_pem_x509_certificate(self.certPath.read_bytes())
            key = serialization.load_pem_private_key(self.keyPath.read_bytes(), None)
        except (OSError, ValueError):
            return None
        return certificate, key

    def _caServes(self, ca: x509.Certificate, now: datetime.datetime) -> bool:
        """
        Whether C{ca} may go on signing this host's certificates: it does
        not end soon, and its name constraints allow the host name.
        """
        if ca.not_valid_after_utc - now < RENEW_BEFORE:
            log.warn("the local CA {path} expires soon: making a new one", path=str(self.certPath))
            return False
        try:
            constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return True
        if x509.DNSName(self.hostname) not in (constraints.permitted_subtrees or ()):
            log.warn(
                "the local CA {path} cannot sign for {hostname}: making a new one",
                path=str(self.certPath),
                hostname=self.hostname,
            )
            return False
        return True

    def _makeCA(self, now: datetime.datetime):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "maild"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"maild local CA for {self.hostname}"),
            ]
        )
        identifier = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            # It signs server certificates and nothing below them.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # A device that trusts this CA trusts it for this host only: a
            # stolen CA key cannot impersonate other sites to its users
            # (RFC 5280 section 4.2.1.10).
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=_serverNames(self.hostname, networks=True),
                    excluded_subtrees=None,
                ),
                critical=True,
            )
            .add_extension(identifier, critical=False)
            .sign(key, hashes.SHA256())
        )
        _writeAtomically(self.keyPath, _keyPem(key), 0o600)
        _writeAtomically(self.certPath, _certificatePem(certificate), 0o644)
        log.info(
            "made a local certificate authority in {path} (SHA-256 fingerprint "
            "{fingerprint}); `maild cert --ca` exports it for devices to trust",
            path=str(self.certPath),
            fingerprint=certificateFingerprint(certificate),
        )
        return certificate, key

    def _renewalReason(self, ca: x509.Certificate, now: datetime.datetime) -> str | None:
        """
        Why the server certificate must be made again, or None.
        """
        try:
            certificate = x509.load_pem_x509_certificate(self.serverCertPath.read_bytes())
            serverKey = serialization.load_pem_private_key(self.serverKeyPath.read_bytes(), None)
        except FileNotFoundError:
            return "none yet"
        except (OSError, ValueError):
            return "the old one is unreadable"
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
            isCA = constraints.value.ca
        except x509.ExtensionNotFound:
            isCA = False
        if isCA or certificate.issuer != ca.subject:
            return "replacing one this CA did not sign"
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return "replacing one this CA did not sign"
        if certificate.public_key() != serverKey.public_key():
            return "the key does not match"
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            hostnames = names.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            hostnames = []
        if self.hostname not in hostnames:
            return "the host name changed"
        if certificate.not_valid_after_utc - now < RENEW_BEFORE:
            return "the old one expires soon"
        return None

    def issue(self, ca, now: datetime.datetime) -> x509.Certificate:
        """
        Sign and write a new server certificate and key.
        """
        caCertificate, caKey = ca
        key = ec.generate_private_key(ec.SECP256R1())
        end = min(now + SERVER_LIFETIME, caCertificate.not_valid_after_utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.hostname)]))
            .issuer_name(caCertificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_serverNames(self.hostname)), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()),
                critical=False,
            )
            .sign(caKey, hashes.SHA256())
        )
        # The key first: a reader that sees the new certificate finds its key.
        _writeAtomically(self.serverKeyPath, _keyPem(key), 0o600)
        _writeAtomically(self.serverCertPath, _certificatePem(certificate), 0o644)
        return certificate


def localCA(config) -> LocalCA | None:
    """
    The local CA that makes the server's certificate, or None when the
    configuration names certificate files (maild never touches those).
    """
    if config.tls.cert is not None:
        return None
    return LocalCA(config.data_dir / "tls", config.hostname)


def certificateFiles(config, now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """
    The certificate and key files to use: the configured ones, or those
    of the local CA, made or renewed first if need be.
    """
    authority = localCA(config)
    if authority is None:
        return config.tls.cert, config.tls.key
    authority.ensure(now)
    return authority.serverCertPath, authority.serverKeyPath


def _loadOptions(certPath: Path, keyPath: Path) -> tuple[ssl.CertificateOptions, str]:
    """
    TLS options serving the files' chain and key, and the SHA-256
    fingerprint of the certificate served.
    """
    try:
        chainPem = certPath.read_bytes()
        keyPem = keyPath.read_bytes()
        blocks = [
            b"-----BEGIN CERTIFICATE-----" + part
            for part in chainPem.split(b"-----BEGIN CERTIFICATE-----")[1:]
        ]
        if not blocks:
            raise TLSError(f"{certPath}: no certificate found")
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, keyPem)
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(INTERMEDIATE_CIPHERS),
        )
        # Building the context checks that the key matches the certificate.
        options.getContext()
    except (OSError, crypto.Error, ValueError) as e:
        raise TLSError(f"cannot load the TLS certificate {certPath} / key {keyPath}: {e}") from e
    return options, certificateFingerprint(chain[0].to_cryptography())


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """
    The server's TLS settings, as a context factory that can be reloaded.

    @ivar fingerprint: the SHA-256 fingerprint of the certificate served.
    """

    def __init__(self, certPath: Path, keyPath: Path) -> None:
        self.certPath = certPath
        self.keyPath = keyPath
        self._options, self.fingerprint = _loadOptions(certPath, keyPath)

    def getContext(self):
        return self._options.getContext()

    def reload(self) -> bool:
        """
        Load the files again (a renewed certificate); on any error keep the
        one in use and log why.

        @return: whether the new files are now in use.
        """
        try:
            self._options, self.fingerprint = _loadOptions(self.certPath, self.keyPath)
        except TLSError as e:
            log.error("TLS reload failed, keeping the current certificate: {error}", error=str(e))
            return False
        log.info("TLS certificate reloaded, SHA-256 fingerprint {fingerprint}", fingerprint=self.fingerprint)
        return True

    def renewIfDue(self, authority: LocalCA, now: datetime.datetime | None = None) -> bool:
        """
        Let C{authority} renew the server certificate if it is due, and
        serve the current files if they are not the ones in use (renewed
        here or by another process sharing the data folder).  Open
        connections keep the certificate they began with.

        @return: whether a new certificate is now served.
        """
        try:
            authority.ensure(now)
            current = fingerprint(self.certPath)
        except (OSError, ValueError) as e:
            log.error("TLS certificate renewal failed: {error}", error=str(e))
            return False
        return current != self.fingerprint and self.reload()
