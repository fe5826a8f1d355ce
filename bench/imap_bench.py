#!/usr/bin/env python3
"""
IMAP benchmark: Thunderbird's sync pattern on a big folder, and many
sessions in IDLE.

``fill`` writes the data folder directly in the store's layout (fast, no
daemon needed): user ``bench@localhost`` with a 100,000-message INBOX of
10 KiB messages, half of them \\Seen, numbered in ``dovecot-uidlist``; user
``idle@localhost`` with 1,000 messages; a ``maild.toml`` that lets one
address open thousands of connections.

``run`` starts ``twistd -n maild`` on that folder and measures, against
the issue's targets:

  - SELECT in a fresh process (cold), with the folder index released
    (every session closed), and warm (another session has it open);
  - ``UID FETCH 1:* (FLAGS)``, ``FETCH 1:1000 BODY.PEEK[]`` (messages/s),
    ``UID SEARCH UNSEEN``, ``STORE 1:1000 +FLAGS (\\Flagged)``;
  - N sessions in IDLE on idle@localhost: daemon RSS before and after, and
    the time for one SMTP delivery to reach all of them as EXISTS.

Example::

    ulimit -n 20000
    PYTHONPATH=. python bench/imap_bench.py fill /tmp/imapbench
    PYTHONPATH=. python bench/imap_bench.py run /tmp/imapbench --idle 2000
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _harness import rss

PASSWORD = "bench password"
WORDS = (
    "the quick brown fox jumps over lazy dog mail server queue delivery message folder "
    "durable write sync batch latency throughput client report meeting agenda budget"
).split()
TARGETS = {
    "select_warm_s": ("<", 0.4),
    "select_cold_s": ("<", 0.6),
    "uid_fetch_flags_s": ("<", 0.3),
    "uid_search_unseen_s": ("<", 0.030),
    "store_1000_s": ("<", 0.045),
    "fetch_bodies_msgs_per_s": (">=", 30000),
    "idle_extra_mb": ("<", 40),
    "idle_delivery_all_s": ("<", 1.0),
}


def message(n: int, size: int) -> bytes:
    """
    A message of about C{size} octets (LF line endings, as stored).
    """
    head = (
        f"From: Sender {n % 97} <sender{n % 97}@example.com>\n"
        f"To: bench@localhost\nSubject: Benchmark message {n}\n"
        f"Date: Wed, 25 Nov 2026 10:{n % 60:02d}:00 +0000\n"
        f"Message-ID: <{n}.bench@example.com>\n\n"
    ).encode()
    line = (" ".join(WORDS[(n + i) % len(WORDS)] for i in range(11)) + "\n").encode()
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[: size - len(head)]


def fillFolder(root: Path, count: int, size: int, seenEvery: int = 2) -> None:
    """
    Write C{count} messages into the Maildir C{root} (cur/, every
    C{seenEvery}-th \\Seen) and their UID list.
    """
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    start = int(time.time()) - count
    for n in range(count):
        data = message(n, size)
        crlf = len(data) + data.count(b"\n")
        base = f"{start + n}.M{n}P1Q{n}.bench,S={len(data)},W={crlf}"
        info = "S" if n % seenEvery else ""
        with open(root / "cur" / f"{base}:2,{info}", "wb") as f:
            f.write(data)
        lines.append(f"{n + 1} :{base}\n")
    header = f"3 V{int(time.time())} N{count + 1} G{uuid.uuid4().hex}\n"
    (root / "dovecot-uidlist").write_text(header + "".join(lines))


def fill(args) -> None:
    from maild.accounts import hashPassword
    from maild.store import MailStore

    data = Path(args.data)
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    digest = hashPassword(PASSWORD)
    (data / "users").write_text(f"bench@localhost:{digest}\nidle@localhost:{digest}\n")
    store = MailStore(data)
    for user in ("bench@localhost", "idle@localhost"):
        store.mailbox(user).ensureExists()
    started = time.monotonic()
    fillFolder(store.userRoot("bench@localhost"), args.count, args.size)
    fillFolder(store.userRoot("idle@localhost"), args.idle_messages, 2048)
    (data / "maild.toml").write_text(
        f'data_dir = "{data}"\nhostname = "bench.test"\ndomains = ["localhost"]\n'
        f'[listen]\nsmtp = "tcp:{args.smtp_port}:interface=127.0.0.1"\n'
        f'imap = "tcp:{args.imap_port}:interface=127.0.0.1"\n'
        f'imaps = "tcp:{args.imap_port + 1}:interface=127.0.0.1"\n'
        "[limits]\nconnections_per_ip = 20000\n"
    )
    print(f"filled {data} with {args.count} + {args.idle_messages} messages in {time.monotonic() - started:.1f} s")


class Session:
    """
    A minimal blocking IMAP client that reads responses as fast as it can.
    """

    def __init__(self, port: int, tls: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            # IMAPS; the daemon's certificate is self-signed, and what is
            # measured here is the cost of the encryption, not of trust.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.sock = context.wrap_socket(self.sock)
        self.buffer = bytearray()
        self.tag = 0
        self.readUntil(b"\r\n")

    def readUntil(self, marker: bytes, start: int = 0) -> bytes:
        while True:
            found = self.buffer.find(marker, start)
            if found >= 0:
                end = found + len(marker)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            start = max(0, len(self.buffer) - len(marker))
            chunk = self.sock.recv(4 << 20)
            if not chunk:
                raise EOFError(bytes(self.buffer[-200:]))
            self.buffer += chunk

    def command(self, line: bytes, keep: bool = True) -> tuple[bytes, float]:
        """
        Send a command and read through its tagged response (found at the
        start of a line; literals are not parsed).

        @param keep: keep what came before the tagged line (else only the
            tagged line is returned, and big responses cost no memory).
        @return: what was received, and the seconds it took.
        """
        self.tag += 1
        tag = b"T%d " % self.tag
        started = time.perf_counter()
        self.sock.sendall(tag + line + b"\r\n")
        window = bytes(self.buffer)
        self.buffer.clear()
        first = True
        while True:
            at = 0 if first and window.startswith(tag) else window.find(b"\r\n" + tag)
            if at >= 0:
                end = window.find(b"\r\n", at + 2)
                if end >= 0:
                    break
            chunk = self.sock.recv(4 << 20)
            if not chunk:
                raise EOFError(window[-200:])
            if keep:
                window += chunk
            else:
                # Keep enough to find a tagged line cut by the chunk boundary.
                carry = window[-256:] if len(window) > 256 else window
                first = first and not window
                window = carry + chunk
                continue
        elapsed = time.perf_counter() - started
        tagged = window[at + (0 if at == 0 and first else 2) : end + 2]
        self.buffer += window[end + 2 :]
        if not tagged.startswith(tag + b"OK"):
            raise RuntimeError(f"{line!r} failed: {tagged!r}")
        return (window[: end + 2] if keep else tagged), elapsed

    def login(self, user: str) -> None:
        self.command(b'LOGIN %s "%s"' % (user.encode(), PASSWORD.encode()))

    def close(self) -> None:
        self.sock.close()


def startDaemon(data: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(data / "twistd.log", "ab")
    daemon = subprocess.Popen(
        ["twistd", "-n", "--pidfile=", "maild", "--config", str(data / "maild.toml")],
        cwd=data,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return daemon
        except OSError:
            time.sleep(0.1)
    daemon.kill()
    raise RuntimeError("the daemon did not start; see twistd.log")


def measureSync(port: int, repeat: int) -> dict:
    results: dict = {}
    first = Session(port)
    first.login("bench@localhost")
    _, results["select_cold_s"] = first.command(b'SELECT "INBOX"')
    first.close()
    time.sleep(0.2)
    released = []
    for _ in range(repeat):
        s = Session(port)
        s.login("bench@localhost")
        released.append(s.command(b'SELECT "INBOX"')[1])
        s.close()
        time.sleep(0.2)
    results["select_released_s"] = min(released)
    holder = Session(port)
    holder.login("bench@localhost")
    holder.command(b'SELECT "INBOX"')
    session = Session(port)
    session.login("bench@localhost")
    warm = [session.command(b'SELECT "INBOX"')[1] for _ in range(repeat)]
    results["select_warm_s"] = min(warm)

    flags = [session.command(b"UID FETCH 1:* (FLAGS)") for _ in range(repeat)]
    results["uid_fetch_flags_s"] = min(t for _, t in flags)
    results["uid_fetch_flags_lines"] = flags[0][0].count(b"FETCH (")

    bodies = []
    for _ in range(repeat):
        data, elapsed = session.command(b"FETCH 1:1000 BODY.PEEK[]", keep=False)
        bodies.append(1000 / elapsed)
    results["fetch_bodies_msgs_per_s"] = max(bodies)
    # The first pass may read files that are not in the page cache (the
    # disk then sets the pace); the second is the warm figure.
    cold = session.command(b"FETCH 1:20000 BODY.PEEK[]", keep=False)[1]
    warm = session.command(b"FETCH 1:20000 BODY.PEEK[]", keep=False)[1]
    results["fetch_bodies_20000_first_msgs_per_s"] = 20000 / cold
    results["fetch_bodies_20000_warm_msgs_per_s"] = 20000 / warm

    # The same over IMAPS (TLS from the first byte, on the next port).
    secure = Session(port + 1, tls=True)
    secure.login("bench@localhost")
    secure.command(b'EXAMINE "INBOX"')
    tlsBodies = []
    for _ in range(repeat):
        data, elapsed = secure.command(b"FETCH 1:1000 BODY.PEEK[]", keep=False)
        tlsBodies.append(1000 / elapsed)
    results["imaps_fetch_bodies_msgs_per_s"] = max(tlsBodies)
    warmTLS = secure.command(b"FETCH 1:20000 BODY.PEEK[]", keep=False)[1]
    results["imaps_fetch_bodies_20000_warm_msgs_per_s"] = 20000 / warmTLS
    secure.close()

    searches = [session.command(b"UID SEARCH UNSEEN") for _ in range(repeat)]
    results["uid_search_unseen_s"] = min(t for _, t in searches)
    results["uid_search_unseen_found"] = searches[0][0].split(b"\r\n", 1)[0].count(b" ") - 1

    stores = []
    for n in range(repeat * 2):
        sign = b"+" if n % 2 == 0 else b"-"
        stores.append(session.command(b"STORE 1:1000 " + sign + b"FLAGS (\\Flagged)")[1])
    results["store_1000_s"] = min(stores)
    session.close()
    holder.close()
    return results


def measureIdle(port: int, smtpPort: int, pid: int, count: int) -> dict:
    # One session first, so that the baseline has the code paths, the
    # password cache and the folder's shared index loaded.
    warmup = Session(port)
    warmup.login("idle@localhost")
    warmup.command(b'SELECT "INBOX"')
    time.sleep(0.5)
    before = rss(pid)
    sessions = []
    for _ in range(count):
        s = Session(port)
        s.login("idle@localhost")
        s.command(b'SELECT "INBOX"')
        s.tag += 1
        s.sock.sendall(b"T%d IDLE\r\n" % s.tag)
        s.readUntil(b"+ idling\r\n")
        sessions.append(s)
    time.sleep(1.0)
    after = rss(pid)
    selector = selectors.DefaultSelector()
    for s in sessions:
        s.sock.setblocking(False)
        selector.register(s.sock, selectors.EVENT_READ, s)
    waiting = set(sessions)
    smtp = smtplib.SMTP("127.0.0.1", smtpPort)
    started = time.perf_counter()
    smtp.sendmail("bench@example.com", ["idle@localhost"], message(999999, 2048).replace(b"\n", b"\r\n"))
    accepted = time.perf_counter()
    deadline = started + 30
    while waiting and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=1):
            s = key.data
            try:
                chunk = s.sock.recv(65536)
            except BlockingIOError:
                continue
            s.buffer += chunk
            if b"EXISTS\r\n" in s.buffer and s in waiting:
                waiting.discard(s)
    reached = time.perf_counter()
    smtp.quit()
    for s in sessions:
        s.close()
    warmup.close()
    return {
        "idle_sessions": count,
        "idle_rss_before_mb": before / 1024,
        "idle_rss_after_mb": after / 1024,
        "idle_extra_mb": (after - before) / 1024,
        "idle_kb_per_session": (after - before) / count,
        "idle_smtp_accept_s": accepted - started,
        "idle_delivery_all_s": reached - started,
        "idle_missed": len(waiting),
    }


def run(args) -> None:
    data = Path(args.data)
    results = {}
    daemon = startDaemon(data, args.imap_port)
    try:
        results.update(measureSync(args.imap_port, args.repeat))
    finally:
        daemon.terminate()
        daemon.wait(30)
    if args.idle:
        # A fresh daemon: memory freed by the big folder must not hide
        # what the IDLE sessions cost.
        daemon = startDaemon(data, args.imap_port)
        try:
            results.update(measureIdle(args.imap_port, args.smtp_port, daemon.pid, args.idle))
        finally:
            daemon.terminate()
            daemon.wait(30)
    for key, value in results.items():
        target = TARGETS.get(key)
        verdict = ""
        if target is not None:
            op, limit = target
            ok = value < limit if op == "<" else value >= limit
            verdict = f"  target {op} {limit}: {'ok' if ok else 'MISSED'}"
        print(f"{key:32} {value:12.4f}{verdict}" if isinstance(value, float) else f"{key:32} {value:12}{verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fill", "run"):
        p = sub.add_parser(name)
        p.add_argument("data", help="data folder (under /tmp)")
        p.add_argument("--imap-port", type=int, default=18143)
        p.add_argument("--smtp-port", type=int, default=18025)
    fillParser = sub.choices["fill"]
    fillParser.add_argument("--count", type=int, default=100_000)
    fillParser.add_argument("--size", type=int, default=10 * 1024)
    fillParser.add_argument("--idle-messages", type=int, default=1000)
    runParser = sub.choices["run"]
    runParser.add_argument("--repeat", type=int, default=3)
    runParser.add_argument("--idle", type=int, default=2000, help="sessions in IDLE (0: skip)")
    runParser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    fill(args) if args.command == "fill" else run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
