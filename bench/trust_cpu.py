#!/usr/bin/env python3
"""
CPU per message of the MX's trust checks alone (SPF, DKIM, DMARC, the
header filter and the Authentication-Results field), in process: the
DNS answers come from memory (trust_dns.py's zone) and stay in the
lookup's cache, DKIM is verified inline, nothing touches a socket or the
disk.  A figure that depends less on what else the machine runs.

Run from the repository root with maild's virtual environment::

    python bench/trust_cpu.py [MESSAGES] [SIZE] [CANONICALIZATION] [REPEAT]

CANONICALIZATION is the signatures' c= (relaxed/simple, dkimpy's default;
maild's relay signs relaxed/relaxed); each kind is measured REPEAT times
(3) and the least CPU is given, the one least disturbed by other work.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from twisted.internet import defer, task  # noqa: E402

import smtp_load  # noqa: E402
from maild.trust.checker import TrustChecker  # noqa: E402
from trust_dns import SELECTORS, BenchZone, makeKey  # noqa: E402

# The kinds of mail measured, by the selectors signing them (trust_dns.py's).
KINDS = (("unsigned", ()), ("ed25519", ("ed",)), ("rsa 2048", ("rsa",)), ("both", ("rsa", "ed")))


def keysAndZone() -> tuple[dict, BenchZone]:
    """
    New signing keys, by selector (C{(private key, algorithm)}), and the
    zone of C{bench.test} publishing them (trust_dns.py's).
    """
    keys, published = {}, {}
    for selector, algorithm, _ in SELECTORS:
        private, public, keyType = makeKey(algorithm)
        keys[selector] = (private, algorithm)
        published[selector] = (keyType, public)
    return keys, BenchZone("bench.test", published)


def benchMessages(keys: dict, selectors, count: int, size: int,
                  canonicalization: str = "relaxed/simple") -> list[bytes]:
    """
    C{count} messages of C{size} octets from C{bench.test}, each signed
    with the keys of C{selectors}.
    """
    factory = smtp_load.MessageFactory("bench@bench.test", "alice@localhost", size, count)
    for selector in selectors:
        factory.sign(keys[selector][0], selector, keys[selector][1], count, canonicalization)
    return [
        (factory.signatures[n] if selectors else b"") + factory.header(n) + factory.body
        for n in range(count)
    ]


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 1000
    size = int(argv[1]) if len(argv) > 1 else 10240
    canonicalization = argv[2] if len(argv) > 2 else "relaxed/simple"
    repeat = int(argv[3]) if len(argv) > 3 else 3
    keys, zone = keysAndZone()
    for kind, selectors in KINDS:
        checker = TrustChecker(lambda: zone, "mx.bench.local", "enforce", task.Clock(),
                               inThread=defer.maybeDeferred)
        messages = benchMessages(keys, selectors, count, size, canonicalization)

        def run():
            for message in messages:
                checks = checker.begin("127.0.0.1", "client.bench.test", "bench@bench.test")
                # In pieces, as DATA arrives.
                for start in range(0, len(message), 4096):
                    checks.feed(message[start : start + 4096])
                checks.finish()
                verdicts = []
                checks.verdict().addCallback(verdicts.append)
                assert verdicts and verdicts[0].action == "inbox", verdicts
                assert verdicts[0].summary.count("pass:") == len(selectors), verdicts

        run()  # warm the caches (DNS answers, keys, the public suffix list)
        seconds = []
        for _ in range(repeat):
            start = time.process_time()
            run()
            seconds.append(time.process_time() - start)
        perMessage = min(seconds) / count * 1e6
        print(f"{kind:10} {perMessage:6.0f} µs CPU per message")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
