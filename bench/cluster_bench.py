#!/usr/bin/env python3
"""
maild behind HAProxy with 1, 2 and 3 nodes on one data folder, on this
machine: SMTP delivery at C=50 through HAProxy's round-robin SMTP port
(bench/smtp_load.py), and IMAP FETCH throughput (``FETCH n:m BODY.PEEK[]``
from concurrent clients through the leastconn IMAP port), interleaved
(1, 2, 3, 1, 2, 3...) so every size sees the same machine, then one table
of rates and their ratio to one node.

    python bench/cluster_bench.py [--nodes 1,2,3] [--repeat 2] [--redis]

The nodes are tests/cluster.py's: separate twistd processes from this
checkout, PROXY protocol v2 from a real HAProxy, change notices by polling
(``--redis``: through a real Redis).  Needs the Debian packages haproxy
(and redis-server for --redis).

On one machine every node shares its cores: the figures show what the
proxy and the shared store cost, not how a cluster scales; that needs a
machine per node.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import ROOT, smtpLoad

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from imap_bench import fillFolder  # noqa: E402  (a folder written directly, numbered)
from tests.cluster import Cluster, missing  # noqa: E402
from tests.support import PASSWORD  # noqa: E402

SMTP_USER = "alice@localhost"
FETCH_USER = "reader@localhost"


async def fetchClient(port: int, seconds: float, folderSize: int, batch: int) -> int:
    """
    One IMAP session through HAProxy: log in, EXAMINE INBOX, then FETCH
    C{batch} whole messages at a time from random places for C{seconds};
    the number of messages fetched.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    tags = iter(range(1, 10**9))

    async def command(line: str) -> int:
        tag = f"c{next(tags)}".encode()
        writer.write(tag + b" " + line.encode() + b"\r\n")
        fetched = 0
        while True:
            response = await reader.readline()
            if not response:
                raise ConnectionError("connection closed")
            if response.startswith(tag + b" "):
                if not response.startswith(tag + b" OK"):
                    raise RuntimeError(response.decode(errors="replace"))
                return fetched
            if response.startswith(b"* ") and b" FETCH (" in response:
                fetched += 1
            while response.endswith(b"}\r\n"):
                await reader.readexactly(int(response[response.rindex(b"{") + 1:-3]))
                response = await reader.readline()

    await reader.readline()
    await command(f'LOGIN "{FETCH_USER}" "{PASSWORD}"')
    await command("EXAMINE INBOX")
    fetched = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        first = random.randint(1, folderSize - batch + 1)
        fetched += await command(f"FETCH {first}:{first + batch - 1} BODY.PEEK[]")
    await command("LOGOUT")
    writer.close()
    return fetched


def fetchRate(port: int, clients: int, seconds: float, folderSize: int, batch: int) -> float:
    async def run() -> float:
        start = time.monotonic()
        counts = await asyncio.gather(
            *(fetchClient(port, seconds, folderSize, batch) for _ in range(clients))
        )
        return sum(counts) / (time.monotonic() - start)

    return asyncio.run(run())


def measure(size: int, folder: Path, args) -> dict[str, float]:
    config = '[store]\nwatch = "{}"\n[limits]\nconnections_per_ip = 1000\n'.format(
        "redis" if args.redis else "poll"
    )
    cluster = Cluster(folder, size=size, users={SMTP_USER: PASSWORD, FETCH_USER: PASSWORD},
                      config=config, redis=args.redis)
    fillFolder(cluster.maildir(FETCH_USER), args.fetch_messages, args.fetch_size)
    try:
        cluster.start()
        smtp = smtpLoad(cluster.frontends["smtp"], args.smtp_messages, args.smtp_concurrency, SMTP_USER)
        if smtp["accepted"] != args.smtp_messages:
            raise RuntimeError(f"{size} node(s): SMTP accepted {smtp['accepted']} of {args.smtp_messages}")
        fetch = fetchRate(cluster.frontends["imap"], args.imap_clients, args.imap_seconds,
                          args.fetch_messages, args.fetch_batch)
    finally:
        cluster.stop()
    tracebacks = sum(node.logText().count("Traceback") for node in cluster.nodes)
    if tracebacks:
        raise RuntimeError(f"{size} node(s): {tracebacks} tracebacks in the nodes' logs under {folder}")
    return {"smtp": smtp["messages_per_second"], "fetch": fetch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,3", help="cluster sizes to compare (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every size (default %(default)s)")
    parser.add_argument("--redis", action="store_true", help="watch = \"redis\" with a real Redis")
    parser.add_argument("--smtp-messages", type=int, default=3000)
    parser.add_argument("--smtp-concurrency", type=int, default=50)
    parser.add_argument("--imap-clients", type=int, default=10)
    parser.add_argument("--imap-seconds", type=float, default=15)
    parser.add_argument("--fetch-messages", type=int, default=1000, help="messages in the folder read")
    parser.add_argument("--fetch-size", type=int, default=10 * 1024)
    parser.add_argument("--fetch-batch", type=int, default=50, help="messages per FETCH command")
    args = parser.parse_args()
    why = missing("haproxy", *(["redis-server"] if args.redis else []))
    if why:
        raise SystemExit(why)
    sizes = [int(n) for n in args.nodes.split(",")]
    results: dict[int, dict[str, list[float]]] = {n: {"smtp": [], "fetch": []} for n in sizes}
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as top:
        for run in range(args.repeat):
            for size in sizes:
                folder = Path(top) / f"run{run}-n{size}"
                folder.mkdir()
                figures = measure(size, folder, args)
                for key, value in figures.items():
                    results[size][key].append(value)
                print(f"round {run + 1}, {size} node(s): SMTP {figures['smtp']:,.0f} msg/s, "
                      f"FETCH {figures['fetch']:,.0f} msg/s", flush=True)
    base = sizes[0]
    print(f"\n{'nodes':>6} {'SMTP msg/s':>11} {'ratio':>6} {'FETCH msg/s':>12} {'ratio':>6}")
    for size in sizes:
        row = [f"{size:>6}"]
        for key, width in (("smtp", 11), ("fetch", 12)):
            mean = statistics.mean(results[size][key])
            row += [f"{mean:>{width},.0f}", f"{mean / statistics.mean(results[base][key]):>6.2f}"]
        print(" ".join(row))
    print(f"\n(means of {args.repeat} interleaved rounds; SMTP C={args.smtp_concurrency}, "
          f"{args.smtp_messages} messages of 10 KiB; FETCH: {args.imap_clients} clients, "
          f"{args.fetch_batch} messages of {args.fetch_size} octets per command, {args.imap_seconds:g} s)")


if __name__ == "__main__":
    main()
