#!/usr/bin/env python3
"""
The reactor thread's CPU per message for the MX's trust checks with DKIM
verified in a child process (C{[mx] dkim_processes = 1}, the default on a
machine with more than one core): what is left on the daemon's busiest
thread, and so what bounds its checked rate.  In process, on the real
reactor and a real child, without sockets or disk: the DNS answers come
from memory (trust_dns.py's zone), messages are checked 50 at a time (as
SMTP at C=50 brings them), and the reactor thread's CPU time is measured
alone (C{time.thread_time}), so the figure depends little on what else the
machine runs.

Run from the repository root with maild's virtual environment::

    python bench/trust_reactor.py [MESSAGES] [SIZE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from twisted.internet import defer, reactor  # noqa: E402

from maild.trust.checker import TrustChecker  # noqa: E402
from maild.trust.dkimprocess import VerifierProcesses  # noqa: E402
from trust_cpu import KINDS, benchMessages, keysAndZone  # noqa: E402

# Messages checked at once (SMTP's concurrency in trust_bench.py).
CONCURRENCY = 50


async def measure(count: int, size: int) -> None:
    keys, zone = keysAndZone()
    processes = VerifierProcesses(reactor, 1)
    processes.startService()
    try:
        for kind, selectors in KINDS:
            checker = TrustChecker(lambda: zone, "mx.bench.local", "enforce", reactor,
                                   dkimProcesses=processes)
            messages = benchMessages(keys, selectors, count, size)

            async def check(message: bytes) -> None:
                checks = checker.begin("127.0.0.1", "client.bench.test", "bench@bench.test")
                # In pieces, as DATA arrives.
                for start in range(0, len(message), 4096):
                    checks.feed(message[start : start + 4096])
                checks.finish()
                verdict = await checks.verdict()
                assert verdict.action == "inbox", verdict
                assert verdict.summary.count("pass:") == len(selectors), verdict

            async def run() -> None:
                for start in range(0, count, CONCURRENCY):
                    await defer.gatherResults(
                        [defer.ensureDeferred(check(m))
                         for m in messages[start : start + CONCURRENCY]]
                    )

            await run()  # warm the caches and the child
            cpu, wall = time.thread_time(), time.perf_counter()
            await run()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            print(f"{kind:10} reactor thread {cpu / count * 1e6:5.0f} µs CPU per message"
                  f"  ({count / wall:,.0f} messages/s through one child)", flush=True)
    finally:
        await processes.stopService()


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 2000
    size = int(argv[1]) if len(argv) > 1 else 10240
    failures = []

    def run() -> None:
        d = defer.ensureDeferred(measure(count, size))
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    for failure in failures:
        failure.printTraceback()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
