#!/usr/bin/env python3
"""
A DNS server for benchmarking the MX's trust checks: serves, on a loopback
port, the SPF, DKIM and DMARC records of one sending domain, with two DKIM
keys, and writes them (for smtp_load.py --dkim-key): RSA 2048 (the common
case) at selector C{rsa}, in C{KEYDIR/rsa.key}, and ed25519 at selector
C{ed}, in C{KEYDIR/ed25519.key}.

Runs with maild's virtual environment (twisted, pynacl, cryptography)::

    python bench/trust_dns.py --port 5300 --domain bench.test --key-dir /tmp/bench-keys
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import nacl.signing
from twisted.internet import reactor
from twisted.names import authority, dns, server


class BenchZone(authority.FileAuthority):
    """
    The zone of C{domain}: its records given as a dict rather than a file.

    @param keys: the DKIM keys, by selector: C{(k= tag, p= tag)}.
    """

    def __init__(self, domain: str, keys: dict[str, tuple[str, str]]) -> None:
        self.domain = domain
        self.keys = keys
        authority.FileAuthority.__init__(self, None)

    def loadFile(self, filename) -> None:
        domain = self.domain.encode("ascii")
        self.soa = (domain, dns.Record_SOA(mname=b"ns." + domain, rname=b"root." + domain, ttl=300))
        txt = lambda text: dns.Record_TXT(text.encode("ascii"), ttl=300)
        self.records = {
            domain: [self.soa[1], txt("v=spf1 ip4:127.0.0.0/8 -all")],
            b"_dmarc." + domain: [txt("v=DMARC1; p=reject")],
        }
        for selector, (keyType, public) in self.keys.items():
            # One TXT record of 255-octet strings (RFC 6376 section 3.6.2.2).
            self.records[selector.encode("ascii") + b"._domainkey." + domain] = [
                dns.Record_TXT(*_strings(f"v=DKIM1; k={keyType}; p={public}"), ttl=300)
            ]


def _strings(text: str) -> list[bytes]:
    data = text.encode("ascii")
    return [data[i : i + 255] for i in range(0, len(data), 255)]


# Selector, algorithm, key file name.
SELECTORS = (("rsa", "rsa-sha256", "rsa.key"), ("ed", "ed25519-sha256", "ed25519.key"))


def makeKey(algorithm: str) -> tuple[bytes, str, str]:
    """
    A new key: the private key as smtp_load.py reads it, the public key for
    the p= tag, and the k= tag.
    """
    if algorithm == "ed25519-sha256":
        key = nacl.signing.SigningKey.generate()
        return (
            base64.b64encode(bytes(key)) + b"\n",
            base64.b64encode(bytes(key.verify_key)).decode("ascii"),
            "ed25519",
        )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(public).decode("ascii"), "rsa"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5300)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--key-dir", type=Path, required=True, help="where to write the DKIM keys")
    options = parser.parse_args(argv)
    keys = {}
    for selector, algorithm, fileName in SELECTORS:
        private, publicKey, keyType = makeKey(algorithm)
        (options.key_dir / fileName).write_bytes(private)
        keys[selector] = (keyType, publicKey)
    zone = BenchZone(options.domain, keys)
    factory = server.DNSServerFactory(authorities=[zone])
    reactor.listenUDP(options.port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(options.port, factory, interface="127.0.0.1")
    print(f"serving {options.domain} on 127.0.0.1:{options.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
