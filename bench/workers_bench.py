#!/usr/bin/env python3
"""
One maild process against several (--workers N), side by side in one run:
SMTP delivery at C=50 (bench/smtp_load.py) and a mixed IMAP load from 20
clients (Dovecot's imaptest, stress mode, logout=0).

    python bench/workers_bench.py --imaptest /path/to/imaptest [--workers 1,2] [--repeat 2]

Each run gets a fresh data folder in /tmp and a daemon on free loopback
ports; the daemon is started with the source tree this script sits in.
Without --imaptest only SMTP is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTENERS = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")
PASSWORD = "bench-password"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


def imaptestTotal(output: str) -> int:
    """
    The number of commands imaptest's stress run completed: the sum of the
    counts row under "Totals:".
    """
    tail = output[output.rindex("Totals:"):].splitlines()[1:]
    counts = [line for line in tail if line.strip() and re.fullmatch(r"[\d\s]+", line)]
    return sum(int(n) for n in counts[-1].split())


class Daemon:
    def __init__(self, workers: int, folder: Path) -> None:
        self.folder = folder
        self.ports = {"smtp": freePort(), "imap": freePort()}
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(
            [sys.executable, "-m", "maild.cli", "--data-dir", str(folder / "data"),
             "user", "add", "alice@localhost", "--password-stdin"],
            input=PASSWORD + "\n", text=True, check=True, env=env, stdout=subprocess.DEVNULL,
        )
        (folder / "maild.toml").write_text("[limits]\nconnections_per_ip = 1000\n")
        listeners = [
            f"--{name}=tcp:{self.ports[name]}:interface=127.0.0.1" if name in self.ports else f"--{name}=none"
            for name in LISTENERS
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "--logfile", str(folder / "twistd.log"), "maild", "--config", str(folder / "maild.toml"),
             "--data-dir", str(folder / "data"), f"--workers={workers}", *listeners],
            cwd=folder, env=env,
        )
        for port in self.ports.values():
            waitForPort(port)
        # Let every worker come up before the load starts.
        time.sleep(2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def smtpRate(port: int, messages: int, concurrency: int) -> float:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "smtp_load.py"), "--server", f"127.0.0.1:{port}",
         "--messages", str(messages), "--concurrency", str(concurrency), "--to", "alice@localhost", "--json"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout)["messages_per_second"]


def imapRate(imaptest: str, port: int, mbox: Path, clients: int, seconds: int) -> float:
    result = subprocess.run(
        [imaptest, "host=127.0.0.1", f"port={port}", "user=alice@localhost", f"pass={PASSWORD}",
         f"mbox={mbox}", f"clients={clients}", f"secs={seconds}", "logout=0"],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    return imaptestTotal(result.stdout) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--smtp-messages", type=int, default=5000)
    parser.add_argument("--smtp-concurrency", type=int, default=50)
    parser.add_argument("--imaptest", help="path to Dovecot's imaptest binary")
    parser.add_argument("--imap-clients", type=int, default=20)
    parser.add_argument("--imap-seconds", type=int, default=20)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    results: dict[int, dict[str, list[float]]] = {n: {"smtp": [], "imap": []} for n in counts}
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as top:
        mbox = Path(top) / "corpus.mbox"
        subprocess.run([sys.executable, str(ROOT / "tests" / "corpus" / "gen_mbox.py"), str(mbox), "500"],
                       check=True, stdout=subprocess.DEVNULL)
        for run in range(args.repeat):
            # Interleaved, so both settings see the same machine.
            for n in counts:
                folder = Path(top) / f"run{run}-w{n}"
                folder.mkdir()
                daemon = Daemon(n, folder)
                try:
                    results[n]["smtp"].append(
                        smtpRate(daemon.ports["smtp"], args.smtp_messages, args.smtp_concurrency)
                    )
                    if args.imaptest:
                        results[n]["imap"].append(
                            imapRate(args.imaptest, daemon.ports["imap"], mbox,
                                     args.imap_clients, args.imap_seconds)
                        )
                finally:
                    daemon.stop()
                shutil.rmtree(folder / "data", ignore_errors=True)
                print(f"run {run + 1}, {n} worker(s): " + ", ".join(
                    f"{k} {v[-1]:,.0f}/s" for k, v in results[n].items() if v), flush=True)
    base = counts[0]
    print(f"\n{'workers':>8} {'SMTP msg/s':>12} {'ratio':>6} {'IMAP cmd/s':>12} {'ratio':>6}")
    for n in counts:
        row = [f"{n:>8}"]
        for key in ("smtp", "imap"):
            values = results[n][key]
            if not values:
                row += [f"{'-':>12}", f"{'-':>6}"]
                continue
            mean = sum(values) / len(values)
            baseMean = sum(results[base][key]) / len(results[base][key])
            row += [f"{mean:>12,.0f}", f"{mean / baseMean:>6.2f}"]
        print(" ".join(row))


if __name__ == "__main__":
    main()
