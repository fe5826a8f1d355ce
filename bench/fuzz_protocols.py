#!/usr/bin/env python3
"""
Fuzz a running maild over loopback: random, grammar-aware sessions, raw
random bytes, and clients that pipeline commands and never read, for a
bounded time per protocol.  At the end: how many cases ran, the sessions
that ended without the server's last word, the daemon's memory over the
run, and any traceback in its log.

    python bench/fuzz_protocols.py --protocol smtp --minutes 10
    python bench/fuzz_protocols.py --protocol submission --minutes 10
    python bench/fuzz_protocols.py --protocol pop3 --minutes 10

It starts its own daemon (``twistd -n maild``) on free loopback ports with a
temporary data folder, unless --port is given.  Traffic goes to 127.0.0.1
only.  Standard library only; deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PASSWORD = "fuzz-password-1"
USERS = ["alice@localhost", "bob@localhost", "carol@localhost", "dave@localhost"]

# Pieces the generators build from --------------------------------------------

LOCAL_PARTS = [
    b"alice", b"bob", b"postmaster", b"nobody", b'"quoted local"', b'"\\"x\\""', b"a\\\\b",
    b"a.b", b".a", b"a..b", b"", b"x" * 70, b"\xe9", b'"\xe9"', b"a\\\xe9", b"../x",
    b"a/b", b"%", b"a+b", b"\x00", b'"a\rX-Injected: yes"', b"(comment)a",
]
DOMAINS = [
    b"localhost", b"example.org", b"[127.0.0.1]", b"[IPv6:::1]", b"remote.test", b"",
    b"\xe9xample.org", b"a" * 300, b"localhost.", b"..", b"[", b"-a-.b",
]
SMTP_PARAMS = [
    b"SIZE=100", b"SIZE=99999999999999999999", b"SIZE=-1", b"SIZE=x", b"BODY=8BITMIME",
    b"BODY=7BIT", b"BODY=BINARYMIME", b"SMTPUTF8", b"AUTH=<>", b"RET=FULL", b"=", b"X" * 100,
    b"NOTIFY=NEVER", b"\xff=1",
]
HEADER_TRAPS = [
    b"From: " + b"(" * 1000,
    b"Sender: " + b"(" * 1000,
    b"From: " + b":" * 1000,
    b"From: " + b"<" * 1000,
    b"From: alice@localhost",
    b"From: Alice <alice@localhost>",
    b"From: \"a\\\" <bob@localhost>",
    b"From: =?utf-8?q?\xc3\xa9?= <alice@localhost>",
    b"From: alice@localhost (x (y (z)))",
    b"Sender: g: a@x, b@y;",
    b"From:",
    b"From: \xff\xfe",
    b"Subject: " + b"x" * 3000,
    b" folded start",
]


def mutate(rng: random.Random, line: bytes) -> bytes:
    """
    Sometimes damage a line: a control or 8-bit byte, a case change, a cut,
    a repetition.
    """
    roll = rng.random()
    if roll < 0.6 or not line:
        return line
    i = rng.randrange(len(line) + 1)
    if roll < 0.7:
        return line[:i] + rng.choice([b"\r", b"\0", b"\x80", b"\xff", b"\t", b"\x1b"]) + line[i:]
    if roll < 0.78:
        return line.swapcase()
    if roll < 0.86:
        return line[:i]
    if roll < 0.93:
        return line + line[i:] * rng.randrange(1, 200)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))


def address(rng: random.Random) -> bytes:
    local = rng.choice(LOCAL_PARTS)
    domain = rng.choice(DOMAINS)
    inner = local + (b"@" + domain if rng.random() < 0.9 else b"")
    return rng.choice([b"<" + inner + b">", inner, b"<>", b"<" + inner, b"<<" + inner + b">>"])


def b64(rng: random.Random, data: bytes) -> bytes:
    return base64.b64encode(data) if rng.random() < 0.8 else rng.choice([b"*", b"=", b"!!!", b"a", data])


def saslLines(rng: random.Random, user: str) -> list[bytes]:
    mechanism = rng.choice([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b"", b"LOGIN LOGIN"])
    password = rng.choice([PASSWORD.encode(), b"wrong", b""])
    plain = rng.choice([b"", user.encode(), b"other@localhost"]) + b"\0" + user.encode() + b"\0" + password
    lines = []
    if mechanism.upper() == b"PLAIN":
        if rng.random() < 0.5:
            lines.append(b"AUTH " + mechanism + b" " + b64(rng, plain))
        else:
            lines += [b"AUTH " + mechanism, b64(rng, plain)]
    elif mechanism == b"LOGIN":
        if rng.random() < 0.5:
            lines += [b"AUTH LOGIN " + b64(rng, user.encode()), b64(rng, password)]
        else:
            lines += [b"AUTH LOGIN", b64(rng, user.encode()), b64(rng, password)]
    else:
        lines.append(b"AUTH " + mechanism)
    return lines


def dataBody(rng: random.Random) -> bytes:
    lines = [rng.choice(HEADER_TRAPS) for _ in range(rng.randrange(0, 4))]
    lines.append(b"Subject: fuzz")
    lines.append(b"")
    for _ in range(rng.randrange(0, 20)):
        lines.append(
            rng.choice(
                [b"text", b".", b"..", b". x", b"x" * rng.randrange(2000), b"bare\rCR",
                 b"bare\nLF", b"\x00\xff", b"", b"From: x", b"\r\n.\r\n" if rng.random() < 0.05 else b"y"]
            )
        )
    return b"\r\n".join(lines) + rng.choice([b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b"\n.\n", b"\r\n.\r\nNOOP\r\n"])


def smtpCommand(rng: random.Random, user: str | None) -> list[bytes]:
    kind = rng.randrange(14)
    if kind == 0:
        return [rng.choice([b"EHLO ", b"HELO ", b"EHLO", b"ehlo  "]) + rng.choice([b"client.test", b"", b"[127.0.0.1]", b"\xff" * 3, b"x" * 3000])]
    if kind in (1, 2):
        sender = address(rng) if user is None or rng.random() < 0.3 else b"<" + user.encode() + b">"
        params = b" ".join(rng.sample(SMTP_PARAMS, rng.randrange(0, 3)))
        return [rng.choice([b"MAIL FROM:", b"MAIL FROM: ", b"mail from:", b"MAIL "]) + sender + (b" " + params if params else b"")]
    if kind in (3, 4):
        return [rng.choice([b"RCPT TO:", b"rcpt to: ", b"RCPT "]) + address(rng) + rng.choice([b"", b" NOTIFY=NEVER", b" X"])]
    if kind == 5:
        return [b"DATA", dataBody(rng)]
    if kind == 6:
        return saslLines(rng, user or rng.choice(USERS))
    if kind == 7:
        return [rng.choice([b"RSET", b"NOOP", b"NOOP x", b"HELP", b"VRFY alice", b"VRFY", b"EXPN x", b"BDAT 10 LAST", b"ETRN x", b"TURN"])]
    if kind == 8:
        return [b"STARTTLS"] if rng.random() < 0.2 else [b"STARTTLS x"]
    if kind == 9:
        return [bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 60)))]
    if kind == 10:
        # A whole transaction, pipelined.
        rcpt = rng.choice([b"<alice@localhost>", b"<bob@localhost>", address(rng)])
        sender = b"<" + (user or "carol@remote.test").encode() + b">"
        return [b"MAIL FROM:" + sender, b"RCPT TO:" + rcpt, b"DATA", dataBody(rng)]
    if kind == 11:
        return [b"X" * rng.choice([100, 2047, 2048, 2049, 5000, 100_000])]
    if kind == 12:
        return [b"QUIT"] if rng.random() < 0.3 else [b"NOOP"]
    return [mutate(rng, b"MAIL FROM:" + address(rng))]


def pop3Command(rng: random.Random, user: str) -> list[bytes]:
    number = lambda: rng.choice([b"1", b"2", b"0", b"-1", b"99999999999999999999999", b"x", b"", b"1 2", b"3"])
    kind = rng.randrange(12)
    if kind == 0:
        return [b"USER " + rng.choice([user.encode(), b"nobody", b"", b"\xff"]), b"PASS " + rng.choice([PASSWORD.encode(), b"wrong", b""])]
    if kind == 1:
        return [s.replace(b"AUTH LOGIN LOGIN", b"AUTH LOGIN") for s in saslLines(rng, user)]
    if kind in (2, 3):
        return [rng.choice([b"RETR ", b"TOP ", b"LIST ", b"UIDL ", b"DELE ", b"retr "]) + number() + rng.choice([b"", b" " + number()])]
    if kind == 4:
        return [rng.choice([b"STAT", b"LIST", b"UIDL", b"RSET", b"NOOP", b"CAPA", b"AUTH", b"APOP a b", b"STLS", b"STLS x"])]
    if kind == 5:
        return [b"QUIT"] if rng.random() < 0.3 else [b"NOOP"]
    if kind == 6:
        return [b"X" * rng.choice([100, 2048, 2049, 100_000])]
    if kind == 7:
        return [bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 60)))]
    return [mutate(rng, rng.choice([b"RETR 1", b"TOP 1 5", b"LIST", b"USER " + user.encode()]))]


# Sessions ---------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.cases = 0
        self.commands = 0
        self.sessions = 0
        self.nonReaders = 0
        self.rawSessions = 0
        # Sessions the server closed without a last reply saying why.
        self.silentCloses: list[str] = []
        self.connectErrors = 0


async def readAvailable(reader: asyncio.StreamReader, wait: float) -> bytes:
    out = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
        except asyncio.TimeoutError:
            return out
        if not chunk:
            return out + b"<EOF>"
        out += chunk
        wait = 0.05


async def grammarSession(port: int, protocol: str, rng: random.Random, stats: Stats) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats.connectErrors += 1
        await asyncio.sleep(0.5)
        return
    stats.sessions += 1
    user = rng.choice(USERS)
    transcript = b""
    try:
        greeting = await asyncio.wait_for(reader.readline(), 30)
        transcript += greeting
        if protocol == "submission":
            writer.write(b"EHLO fuzz.test\r\nAUTH PLAIN " + base64.b64encode(f"\0{user}\0{PASSWORD}".encode()) + b"\r\n")
        elif protocol == "pop3" and rng.random() < 0.7:
            writer.write(b"USER " + user.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
        for _ in range(rng.randrange(1, 30)):
            if protocol == "pop3":
                lines = pop3Command(rng, user)
            else:
                lines = smtpCommand(rng, user if protocol == "submission" else None)
            lines = [mutate(rng, line) if rng.random() < 0.3 else line for line in lines]
            data = b"".join(line + b"\r\n" for line in lines)
            writer.write(data)
            stats.cases += 1
            stats.commands += len(lines)
            if rng.random() < 0.5:
                await writer.drain()
                got = await readAvailable(reader, rng.choice([0.05, 0.3, 2.0]))
                transcript += data + got
                if got.endswith(b"<EOF>"):
                    break
        writer.write(b"QUIT\r\n")
        await writer.drain()
        got = b""
        deadline = time.monotonic() + 60
        while not got.endswith(b"<EOF>") and time.monotonic() < deadline:
            got += await readAvailable(reader, 5)
        transcript += got
    except (ConnectionError, asyncio.TimeoutError, OSError) as e:
        transcript += f"<{type(e).__name__}>".encode()
    finally:
        writer.close()
    tail = transcript.rstrip(b"<EOF>").rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
    lastWords = (b"221 ", b"421 ", b"+OK", b"-ERR")
    # After STARTTLS/STLS our plaintext ends the TLS handshake: expected.
    startedTLS = b"220 2.0.0 Ready to start TLS" in transcript or b"+OK Begin TLS" in transcript
    if transcript.endswith(b"<EOF>") and not tail.startswith(lastWords) and not startedTLS:
        stats.silentCloses.append(repr(transcript[-300:]))


async def rawSession(port: int, rng: random.Random, stats: Stats) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats.connectErrors += 1
        return
    stats.rawSessions += 1
    try:
        for _ in range(rng.randrange(1, 10)):
            writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
            stats.cases += 1
            await writer.drain()
            await readAvailable(reader, 0.05)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def nonReader(port: int, protocol: str, rng: random.Random, stats: Stats, seconds: float) -> None:
    """
    Pipeline commands that each get a reply, and never read.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    stats.nonReaders += 1
    line = {"smtp": b"EHLO x\r\n", "submission": b"EHLO x\r\n", "pop3": b"CAPA\r\n"}[protocol]
    block = line * 20000
    deadline = time.monotonic() + seconds
    sent = 0
    loop = asyncio.get_running_loop()
    try:
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, block), 2.0)
                sent += len(block)
                stats.cases += 1
            except asyncio.TimeoutError:
                # The server stopped reading from us: that is the point.
                await asyncio.sleep(0.5)
    except OSError:
        pass
    finally:
        sock.close()


# The daemon -------------------------------------------------------------------


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    """
    Resident memory of process C{pid}, in KiB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def startDaemon(workdir: Path, protocol: str) -> tuple[subprocess.Popen, int, int, Path]:
    """
    Start twistd with the fuzzed listener, and an MX listener to seed the
    mailboxes through; return the process, both ports and the log.
    """
    data = workdir / "data"
    # The code of this checkout, whether or not it is installed.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for user in USERS:
        subprocess.run(
            [sys.executable, "-m", "maild.cli", "--data-dir", str(data), "user", "add", user, "--password-stdin"],
            input=PASSWORD.encode(), check=True, capture_output=True, env=env,
        )
    port = freePort()
    config = workdir / "maild.toml"
    config.write_text(
        "[auth]\nsubmission_plaintext = true\n"
        # Short failed-login delays: more cases per minute (the delays are
        # tested elsewhere).
        "[limits]\nauth_failure_delay = 0.05\nauth_failure_delay_max = 0.1\n"
    )
    listeners = {name: "none" for name in ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")}
    listeners[protocol] = f"tcp:{port}:interface=127.0.0.1"
    seedPort = port if protocol == "smtp" else freePort()
    listeners["smtp"] = f"tcp:{seedPort}:interface=127.0.0.1"
    log = workdir / "maild.log"
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    args = twistd + ["-n", "--pidfile=", f"--logfile={log}", "maild", "--config", str(config),
            "--data-dir", str(data), "--hostname", "fuzz.test", "--domain", "localhost"]
    helpText = subprocess.run(twistd + ["maild", "--help"], capture_output=True, text=True, env=env).stdout
    for name, value in listeners.items():
        if f"--{name}=" in helpText:
            args += [f"--{name}", value]
    process = subprocess.Popen(args, cwd=workdir, env=env)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit(f"the daemon did not start; see {log}")
    return process, port, seedPort, log


def seedMailboxes(port: int) -> None:
    """
    Give each user a few messages (POP3 needs something to RETR).
    """
    import smtplib

    with smtplib.SMTP("127.0.0.1", port) as client:
        for user in USERS:
            for i in range(5):
                client.sendmail("seed@remote.test", [user], f"Subject: seed {i}\r\n\r\nline\r\n.dot\r\n".encode())


async def fuzz(
    port: int, protocol: str, seconds: float, seed: int, pid: int | None, concurrency: int,
    kinds: tuple[str, ...] = ("grammar", "raw", "nonreader"), sampleEvery: float = 10.0,
) -> dict:
    stats = Stats()
    memory: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + seconds

    async def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline:
            roll = rng.random()
            kind = "grammar" if roll < 0.85 else "raw" if roll < 0.97 else "nonreader"
            if kind not in kinds:
                continue
            if kind == "grammar":
                await grammarSession(port, protocol, rng, stats)
            elif kind == "raw":
                await rawSession(port, rng, stats)
            else:
                await nonReader(port, protocol, rng, stats, min(20.0, max(1.0, deadline - time.monotonic())))

    async def sampler() -> None:
        while time.monotonic() < deadline:
            if pid is not None:
                memory.append((round(time.monotonic() - start), rss(pid)))
            await asyncio.sleep(sampleEvery)

    await asyncio.gather(sampler(), *(worker(n) for n in range(concurrency)))
    if pid is not None:
        memory.append((round(time.monotonic() - start), rss(pid)))
    return {
        "protocol": protocol,
        "seconds": round(time.monotonic() - start),
        "cases": stats.cases,
        "commands": stats.commands,
        "grammar_sessions": stats.sessions,
        "raw_sessions": stats.rawSessions,
        "non_reading_clients": stats.nonReaders,
        "connect_errors": stats.connectErrors,
        "silent_closes": len(stats.silentCloses),
        "silent_close_samples": stats.silentCloses[:5],
        "rss_kib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["smtp", "submission", "pop3"], required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder and log")
    parser.add_argument("--only", choices=["grammar", "raw", "nonreader"], action="append",
                        help="run only these kinds of client (repeatable)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix=f"maild-fuzz-{args.protocol}-"))
    process, port, seedPort, log = startDaemon(workdir, args.protocol)
    try:
        seedMailboxes(seedPort)
        kinds = tuple(args.only or ("grammar", "raw", "nonreader"))
        result = asyncio.run(
            fuzz(port, args.protocol, args.minutes * 60, args.seed, process.pid, args.concurrency,
                 kinds, args.sample_every)
        )
    finally:
        process.terminate()
        process.wait(30)
    text = log.read_text(errors="replace")
    result["log_tracebacks"] = text.count("Traceback")
    result["log_unhandled"] = len(re.findall(r"Unhandled|CRITICAL", text))
    result["log_lines"] = text.count("\n")
    result["workdir"] = str(workdir)
    print(json.dumps(result, indent=1))
    if not args.keep and not result["log_tracebacks"]:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
