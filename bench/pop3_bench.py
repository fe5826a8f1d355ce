#!/usr/bin/env python3
"""
POP3 download benchmark.

Fills a user's INBOX with N messages of S octets, then runs POP3 sessions
against a running daemon: log in, LIST, UIDL, and RETR every message,
either one RETR at a time (as clients do: send, read the whole response,
send the next) or pipelined (up to D commands in flight, topped up
whenever at least R can be sent: by default D=16, R=1, a sliding window).
It reports messages/s and MB/s (10^6 octets, CRLF sizes as POP3 counts
them), and the time between consecutive responses (median, 99th
percentile, maximum), where a per-message stall would show.  Each response's end marker is looked for from the size its +OK
line gives (stuffing only adds octets); --verify also counts every
message's octets, un-stuffed, against that size, at some cost in client
CPU.

The mailbox is filled by writing Maildir files directly into the user's
C{new/} (named as maild's delivery names them, with S= and W= sizes), not
through SMTP: filling takes a second, and the daemon finds the files as
it would files from any other Maildir writer.  The first session after the
fill numbers them (the login of that session is the slow one), and the
first RETR pass marks them \\Seen (a rename from new/ to cur/ per
message); later passes find them seen.  The passes run in the order given,
so their conditions are stated in the report.

The client is a plain blocking socket reading in 1 MiB pieces, so that it
takes as little of the machine's CPU from the server as it can.

Example (a daemon on loopback, a throwaway data folder)::

    export PYTHONPATH=/path/to/maild
    D=/tmp/maild-bench
    echo secret | python -m maild.cli --data-dir $D user add alice@localhost --password-stdin
    twistd -n --pidfile= maild --data-dir $D --pop3 tcp:8110:interface=127.0.0.1 \\
        --smtp none --pop3s none &
    python bench/pop3_bench.py --data-dir $D --user alice@localhost --password secret \\
        --fill 3000 --server 127.0.0.1:8110
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_load import MessageFactory, makeBody  # noqa: E402

from maild.store import MailStore  # noqa: E402
from maild.store.mailstore import makeMaildir  # noqa: E402
from maild.store.maildir import newBaseName  # noqa: E402


class ProtocolError(Exception):
    pass


def fill(dataDir: Path, address: str, count: int, size: int) -> float:
    """
    Write C{count} messages of C{size} octets (CRLF) into the INBOX of
    C{address}, as a Maildir writer does: into C{tmp/}, then renamed into
    C{new/}.

    @return: the seconds it took.
    """
    start = time.perf_counter()
    root = MailStore(dataDir).userRoot(address)
    makeMaildir(root)
    factory = MessageFactory("bench@remote.test", address, size, count)
    body = makeBody(size - len(factory.header(0)), random.Random(size))
    for number in range(count):
        data = (factory.header(number) + body).replace(b"\r\n", b"\n")
        base = newBaseName(len(data), len(data) + data.count(b"\n"))
        tmp = root / "tmp" / base
        tmp.write_bytes(data)
        os.rename(tmp, root / "new" / base)
    return time.perf_counter() - start


class POP3Connection:
    """
    A minimal blocking POP3 client that reads in large pieces.
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ProtocolError("the server closed the connection")
        self.buffer += chunk

    def line(self) -> bytes:
        if self.pos > (1 << 20):
            # Between responses: nothing points into the buffer.
            del self.buffer[: self.pos]
            self.pos = 0
        while (end := self.buffer.find(b"\r\n", self.pos)) < 0:
            self._fill()
        line = bytes(self.buffer[self.pos : end])
        self.pos = end + 2
        return line

    def ok(self) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise ProtocolError(line.decode("ascii", "replace"))
        return line

    def body(self, atLeast: int = 0) -> memoryview:
        """
        A multi-line response's body on the wire, through the CRLF before
        the end marker (empty for an empty body).  A body known to hold at
        least C{atLeast} octets (a RETR's size: dot-stuffing only adds) is
        searched for its end marker from there on.
        """
        scan = self.pos + max(atLeast - 2, 0)
        while True:
            if self.buffer[self.pos : self.pos + 3] == b".\r\n":
                self.pos += 3
                return memoryview(b"")
            end = self.buffer.find(b"\r\n.\r\n", scan)
            if end >= 0:
                break
            scan = max(scan, len(self.buffer) - 4)
            self._fill()
        body = memoryview(self.buffer)[self.pos : end + 2]
        self.pos = end + 5
        return body

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.ok()

    def close(self) -> None:
        self.sock.close()


def retrieved(client: POP3Connection, verify: bool) -> int:
    """
    Read one RETR response.

    @return: the message's size (from the +OK line; with C{verify}, after
        checking it against the octets received, un-stuffed).
    """
    octets = int(client.ok().split()[1])
    body = client.body(octets)
    if verify:
        data = bytes(body)
        size = len(data) - data.count(b"\r\n..") - data.startswith(b"..")
        if size != octets:
            raise ProtocolError(f"RETR said {octets} octets and sent {size}")
    elif len(body) < octets:
        raise ProtocolError(f"RETR said {octets} octets and sent {len(body)}")
    return octets


def session(options, mode: str) -> dict:
    """
    One session: log in, LIST, UIDL, RETR every message (C{mode} "single"
    or "pipelined"), QUIT.
    """
    host, _, port = options.server.rpartition(":")
    timings: dict = {"mode": mode}
    start = time.perf_counter()
    client = POP3Connection(host, int(port), options.timeout)
    client.ok()
    client.command(b"USER " + options.user.encode())
    client.command(b"PASS " + options.password.encode())
    timings["login_ms"] = (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    client.command(b"LIST")
    count = bytes(client.body()).count(b"\r\n")
    timings["list_ms"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    client.command(b"UIDL")
    if bytes(client.body()).count(b"\r\n") != count:
        raise ProtocolError("UIDL and LIST disagree")
    timings["uidl_ms"] = (time.perf_counter() - start) * 1000

    depth = options.depth if mode == "pipelined" else 1
    octets = 0
    sent = received = 0
    start = time.perf_counter()
    # When each response was complete: a stall shows as a long gap.
    completed = [start]
    while received < count:
        free = depth - (sent - received)
        if sent < count and (free >= options.refill or sent == received):
            batch = range(sent + 1, min(sent + free, count) + 1)
            client.sock.sendall(b"".join(b"RETR %d\r\n" % n for n in batch))
            sent = batch[-1]
        octets += retrieved(client, options.verify)
        received += 1
        completed.append(time.perf_counter())
    seconds = time.perf_counter() - start
    gaps = sorted(b - a for a, b in zip(completed, completed[1:]))
    client.command(b"QUIT")
    client.close()
    timings.update(
        messages=count,
        depth=depth,
        refill=options.refill if depth > 1 else 1,
        seconds=seconds,
        messages_per_second=count / seconds if seconds else 0.0,
        mb_per_second=octets / seconds / 1e6 if seconds else 0.0,
        octets=octets,
        gap_median_ms=gaps[len(gaps) // 2] * 1000 if gaps else 0.0,
        gap_p99_ms=gaps[len(gaps) * 99 // 100] * 1000 if gaps else 0.0,
        gap_max_ms=gaps[-1] * 1000 if gaps else 0.0,
    )
    return timings


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1:8110", help="host:port of the POP3 listener")
    parser.add_argument("--user", default="alice@localhost")
    parser.add_argument("--password", required=True)
    parser.add_argument(
        "--data-dir", type=Path, help="the daemon's data folder (needed for --fill)"
    )
    parser.add_argument("--fill", type=int, default=0, help="messages to add first (default 0)")
    parser.add_argument("--size", type=int, default=10240, help="octets per message (CRLF)")
    parser.add_argument("--depth", type=int, default=16, help="commands in flight when pipelined")
    parser.add_argument(
        "--passes",
        default="single,pipelined,single",
        help="comma-separated session modes, in order (single, pipelined)",
    )
    parser.add_argument(
        "--refill",
        type=int,
        default=1,
        help="when pipelined, send more commands once this many can be sent (default 1)",
    )
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every message's octets against its +OK line (costs client CPU)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    options = parser.parse_args(argv)
    if options.fill and options.data_dir is None:
        parser.error("--fill needs --data-dir")
    return options


def main(argv: list[str]) -> int:
    options = parseArguments(argv)
    report: dict = {"passes": []}
    if options.fill:
        report["fill_seconds"] = fill(options.data_dir, options.user, options.fill, options.size)
    for mode in options.passes.split(","):
        report["passes"].append(session(options, mode.strip()))
    if options.json:
        print(json.dumps(report))
        return 0
    if options.fill:
        print(
            f"filled {options.fill} messages of {options.size} octets in {report['fill_seconds']:.2f} s"
        )
    for n, result in enumerate(report["passes"], 1):
        print(
            f"pass {n}: {result['mode']:9} (depth {result['depth']:2}, "
            f"refill {result['refill']}): "
            f"{result['messages']} messages in {result['seconds']:.3f} s = "
            f"{result['messages_per_second']:,.0f} messages/s, "
            f"{result['mb_per_second']:.1f} MB/s; "
            f"login {result['login_ms']:.1f} ms, LIST {result['list_ms']:.1f} ms, "
            f"UIDL {result['uidl_ms']:.1f} ms; between responses: median "
            f"{result['gap_median_ms']:.3f} ms, 99th percentile {result['gap_p99_ms']:.3f} ms, "
            f"max {result['gap_max_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
