#!/usr/bin/env python3
"""
A DNS server for benchmarking the MX's trust checks: serves, on a loopback
port, the SPF, DKIM and DMARC records of one sending domain, and writes the
ed25519 DKIM key that signs for it (for smtp_load.py --dkim-key).

Runs with maild's virtual environment (twisted, pynacl)::

    python bench/trust_dns.py --port 5300 --domain bench.test --key-out /tmp/bench-dkim.key
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
    """

    def __init__(self, domain: str, publicKey: str) -> None:
        self.domain = domain
        self.publicKey = publicKey
        authority.FileAuthority.__init__(self, None)

    def loadFile(self, filename) -> None:
        domain = self.domain.encode("ascii")
        self.soa = (domain, dns.Record_SOA(mname=b"ns." + domain, rname=b"root." + domain, ttl=300))
        txt = lambda text: dns.Record_TXT(text.encode("ascii"), ttl=300)
        self.records = {
            domain: [self.soa[1], txt("v=spf1 ip4:127.0.0.0/8 -all")],
            b"bench._domainkey." + domain: [txt(f"v=DKIM1; k=ed25519; p={self.publicKey}")],
            b"_dmarc." + domain: [txt("v=DMARC1; p=reject")],
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5300)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--key-out", type=Path, required=True, help="where to write the DKIM key")
    options = parser.parse_args(argv)
    key = nacl.signing.SigningKey.generate()
    options.key_out.write_bytes(base64.b64encode(bytes(key)) + b"\n")
    publicKey = base64.b64encode(bytes(key.verify_key)).decode("ascii")
    factory = server.DNSServerFactory(authorities=[BenchZone(options.domain, publicKey)])
    reactor.listenUDP(options.port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(options.port, factory, interface="127.0.0.1")
    print(f"serving {options.domain} on 127.0.0.1:{options.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
