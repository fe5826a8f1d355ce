"""
DKIM signing (RFC 6376) of mail leaving for other domains, with dkimpy.

Each local domain has two keys in C{<data>/dkim/<domain>/}, made on first
start: Ed25519 (RFC 8463) and RSA 2048, and every message gets both
signatures (receivers that know only RSA check that one), relaxed/relaxed,
with C{From} over-signed (dkimpy signs it once more than it appears, so no
From: can be added after signing).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.logger import Logger

from maild import dkimrsa

log = Logger()

# RSA signatures by OpenSSL (some 1 ms each, not 16 ms of Python).
dkimrsa.install()


@dataclass(frozen=True)
class SigningKey:
    """
    One key of a domain: its selector, dkimpy's algorithm name, the
    private key as dkimpy reads it and the public key as published.
    """

    selector: str
    algorithm: bytes
    private: bytes
    public: str

    @property
    def keyType(self) -> str:
        return "ed25519" if self.algorithm == b"ed25519-sha256" else "rsa"

    def txtRecord(self) -> str:
        """
        The TXT record's text at C{<selector>._domainkey.<domain>}.
        """
        return f"v=DKIM1; k={self.keyType}; p={self.public}"


# File name, selector, algorithm.
_KINDS = (
    ("ed25519.key", "maild-ed25519", b"ed25519-sha256"),
    ("rsa.key", "maild-rsa", b"rsa-sha256"),
)


class DKIMKeys:
    """
    The signing keys under C{<data>/dkim/}, one folder per domain.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, list[SigningKey]] = {}

    def ensure(self, domains) -> None:
        """
        Make the keys a local domain lacks, and load them all (blocking:
        at start, or from the command line).
        """
        for domain in domains:
            folder = self.path / domain
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            for fileName, _, _ in _KINDS:
                keyFile = folder / fileName
                if not keyFile.exists():
                    _writePrivate(keyFile, _newKey(fileName))
                    log.info("DKIM key {file} is ready", file=str(keyFile))
            self._keys[domain] = self._read(domain)

    def _read(self, domain: str) -> list[SigningKey]:
        keys = []
        for fileName, selector, algorithm in _KINDS:
            try:
                private = (self.path / domain / fileName).read_bytes()
            except FileNotFoundError:
                continue
            keys.append(SigningKey(selector, algorithm, private, _publicKey(fileName, private)))
        return keys

    def keysFor(self, domain: str) -> list[SigningKey]:
        """
        The keys of C{domain}, read from disk on first use; none for a
        domain that has none.
        """
        domain = domain.lower()
        if domain not in self._keys:
            self._keys[domain] = self._read(domain) if _safeDomain(domain) else []
        return self._keys[domain]


def sign(message: bytes, domain: str, keys: list[SigningKey]) -> bytes:
    """
    The DKIM-Signature: header fields (CRLF line ends) to put before
    C{message} (CRLF line ends), one per key.
    """
    signatures = []
    for key in keys:
        signatures.append(
            dkim.sign(
                message,
                key.selector.encode("ascii"),
                domain.encode("ascii"),
                key.private,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=key.algorithm,
                linesep=b"\r\n",
            )
        )
    return b"".join(signatures)


def _safeDomain(domain: str) -> bool:
    return bool(domain) and "/" not in domain and not domain.startswith(".") and "\0" not in domain


def _newKey(fileName: str) -> bytes:
    if fileName == "ed25519.key":
        # dkimpy reads an Ed25519 key as the base64 of its 32-octet seed.
        return base64.b64encode(bytes(nacl.signing.SigningKey.generate()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _publicKey(fileName: str, private: bytes) -> str:
    if fileName == "ed25519.key":
        seed = base64.b64decode(private)
        return base64.b64encode(bytes(nacl.signing.SigningKey(seed).verify_key)).decode()
    key = serialization.load_pem_private_key(private, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _writePrivate(path: Path, data: bytes) -> None:
    """
    Write a new key file whole or not at all: processes starting together
    on one data folder (C{--workers}) may each make one, and the first to
    link its complete file in place wins; the others use it.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
