#!/usr/bin/env python3
"""
Login storm: N IMAP clients log in as the same user at the same moment (a
webmail under load, or Thunderbird opening its connections for many
accounts), with the daemon's default Argon2id hash.  Measures each login
(connect to tagged OK) and the whole storm, for a cold start (nothing
cached) and a second storm right after (warm).

Optionally runs the same against a private Dovecot reading the same users
file (Dovecot's passwd-file format), back to back, for comparison; it
needs root and dovecot-imapd, and ../shared/tools/reference-dovecot.sh.

Example::

    PYTHONPATH=. python bench/login_storm.py /tmp/storm --clients 100 --dovecot

To measure another checkout (before a change), give its folder with
--source: its twistd plugin is the one started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = "storm@localhost"
PASSWORD = "storm password"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def login(port: int, barrier: threading.Barrier, results: list, errors: list) -> None:
    barrier.wait()
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(f'a LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
            while True:
                line = f.readline()
                if not line:
                    raise EOFError("closed")
                if line.startswith(b"a "):
                    break
            if not line.startswith(b"a OK"):
                raise RuntimeError(line)
            results.append(time.monotonic() - start)
            sock.sendall(b"b LOGOUT\r\n")
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure
        errors.append(repr(e))


def storm(port: int, clients: int) -> dict:
    barrier = threading.Barrier(clients)
    results: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=login, args=(port, barrier, results, errors)) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = time.monotonic() - began
    results.sort()
    return {
        "ok": len(results),
        "errors": errors[:3],
        "total": total,
        "mean": statistics.mean(results) if results else float("nan"),
        "median": statistics.median(results) if results else float("nan"),
        "p95": results[int(len(results) * 0.95) - 1] if results else float("nan"),
        "max": results[-1] if results else float("nan"),
    }


def show(name: str, round: str, figures: dict) -> None:
    print(
        f"{name:8} {round:5} ok={figures['ok']:4} total={figures['total']:6.2f}s "
        f"mean={figures['mean']:6.3f}s median={figures['median']:6.3f}s "
        f"p95={figures['p95']:6.3f}s max={figures['max']:6.3f}s"
        + (f" errors={figures['errors']}" if figures["errors"] else "")
    )


def runMaild(folder: Path, source: Path, clients: int) -> None:
    port = freePort()
    listeners = {name: "none" for name in ("smtp", "submission", "smtps", "pop3", "pop3s", "imaps")}
    (folder / "maild.toml").write_text(
        'data_dir = "data"\n[listen]\n'
        + "".join(f'{name} = "{ep}"\n' for name, ep in listeners.items())
        + f'imap = "tcp:{port}:interface=127.0.0.1"\n[limits]\nconnections_per_ip = 100000\n'
    )
    env = dict(os.environ, PYTHONPATH=str(source))
    daemon = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "-l", str(folder / "maild.log"), "maild", "--config", "maild.toml"],
        cwd=folder,
        env=env,
    )
    try:
        waitForPort(port)
        show("maild", "cold", storm(port, clients))
        show("maild", "warm", storm(port, clients))
    finally:
        daemon.terminate()
        daemon.wait(30)


def runDovecot(folder: Path, clients: int) -> None:
    script = ROOT.parent.parent / "shared/tools/reference-dovecot.sh"
    if not script.exists():
        script = Path("/work/shared/tools/reference-dovecot.sh")
    port, pop = freePort(), freePort()
    where = folder / "dovecot"
    subprocess.run(["sh", str(script), "start", str(where), str(port), str(pop), f"{USER}:x"], check=True)
    try:
        shutil.copyfile(folder / "data/users", where / "users")
        waitForPort(port)
        show("dovecot", "cold", storm(port, clients))
        show("dovecot", "warm", storm(port, clients))
    finally:
        subprocess.run(["sh", str(script), "stop", str(where)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--source", type=Path, default=ROOT, help="the maild checkout to run")
    parser.add_argument("--dovecot", action="store_true", help="measure a private Dovecot too")
    args = parser.parse_args()
    folder = args.folder.resolve()
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "data").mkdir(parents=True)
    sys.path.insert(0, str(args.source.resolve()))
    from maild.accounts import Accounts

    Accounts(folder / "data/users").add(USER, PASSWORD)
    print(f"{args.clients} clients, one user, {(folder / 'data/users').read_text().split(':')[1][:20]}...; "
          f"{os.cpu_count()} CPUs (shared with other work)")
    runMaild(folder, args.source.resolve(), args.clients)
    if args.dovecot:
        runDovecot(folder, args.clients)


if __name__ == "__main__":
    main()
