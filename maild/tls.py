"""
TLS for every listener: the server's certificate and key, a self-signed
pair made on first start when none is configured, and reloading (on
SIGHUP) without dropping connections.

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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

log = Logger()


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


def generateSelfSigned(hostname: str, certPath: Path, keyPath: Path, days: int = 3650) -> None:
    """
    Write a self-signed certificate for C{hostname} (also valid for
    localhost and the loopback addresses) and its private key, as PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    alternatives: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alternatives.append(x509.DNSName("localhost"))
    alternatives += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPath.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    certPath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def certificateFiles(config) -> tuple[Path, Path]:
    """
    The certificate and key files to use: the configured ones, or a
    self-signed pair in C{<data>/tls/}, made (and its fingerprint logged)
    when missing.
    """
    if config.tls.cert is not None:
        return config.tls.cert, config.tls.key
    directory = config.data_dir / "tls"
    certPath, keyPath = directory / "cert.pem", directory / "key.pem"
    if not (certPath.exists() and keyPath.exists()):
        generateSelfSigned(config.hostname, certPath, keyPath)
        log.info(
            "made a self-signed certificate for {hostname} in {path}, "
            "SHA-256 fingerprint {fingerprint}",
            hostname=config.hostname,
            path=str(certPath),
            fingerprint=fingerprint(certPath),
        )
    return certPath, keyPath


def fingerprint(certPath: Path) -> str:
    """
    The SHA-256 fingerprint of the first certificate in C{certPath}, as
    colon-separated hex (what clients show).
    """
    pem = certPath.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _loadOptions(certPath: Path, keyPath: Path) -> ssl.CertificateOptions:
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
        )
        # Building the context checks that the key matches the certificate.
        options.getContext()
    except (OSError, crypto.Error, ValueError) as e:
        raise TLSError(f"cannot load the TLS certificate {certPath} / key {keyPath}: {e}") from e
    return options


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """
    The server's TLS settings, as a context factory that can be reloaded.
    """

    def __init__(self, certPath: Path, keyPath: Path) -> None:
        self.certPath = certPath
        self.keyPath = keyPath
        self._options = _loadOptions(certPath, keyPath)

    def getContext(self):
        return self._options.getContext()

    def reload(self) -> bool:
        """
        Load the files again (a renewed certificate); on any error keep the
        one in use and log why.

        @return: whether the new files are now in use.
        """
        try:
            self._options = _loadOptions(self.certPath, self.keyPath)
        except TLSError as e:
            log.error("TLS reload failed, keeping the current certificate: {error}", error=str(e))
            return False
        log.info(
            "TLS certificate reloaded, SHA-256 fingerprint {fingerprint}",
            fingerprint=fingerprint(self.certPath),
        )
        return True
