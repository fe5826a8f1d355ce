"""
Dovecot's imaptest stress against maild and a private Dovecot, back to
back on the same machine, and the ratio of their command rates.

    python bench/imaptest_compare.py --imaptest /path/to/imaptest [--clients 20] [--secs 30]
        [--runs 3] [--checkpoint] [--workers N] [--dovecot-script ../shared/tools/reference-dovecot.sh]

Each run starts maild (twistd, a fresh data folder, IMAP on a free
loopback port) and runs imaptest against it, then does the same with
Dovecot (started by reference-dovecot.sh, which needs root and Debian's
dovecot-imapd), with the same mailbox file and options.  imaptest's
"Totals" line counts the commands each server completed with OK; the
ratio is maild's total over Dovecot's.  Errors imaptest reports are
counted by kind, and maild's log is searched for tracebacks.

The test user's password is hashed with bcrypt at its lowest cost: the
default Argon2id would measure login hashing, not IMAP.  Run it from the
repository root with the Python that has maild's dependencies.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _harness import ROOT, Settling, daemonEnv, freePort, settleDefault, waitForPort

USER, PASSWORD = "testuser@localhost", "imaptest-pass"


@dataclass
class Result:
    server: str
    totals: dict[str, int]
    errors: dict[str, int] = field(default_factory=dict)
    tracebacks: int = 0
    # The machine's 1-minute load average when the run started: on a shared
    # machine, one maild process competes with every other runnable
    # process, while Dovecot's many processes each get their own share.
    load: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.totals.values())


def runImaptest(imaptest: str, port: int, user: str, mbox: Path, args) -> tuple[dict[str, int], dict[str, int]]:
    """
    Run imaptest's stress; return its Totals (command name -> count) and
    its errors counted by kind.
    """
    command = [
        imaptest,
        "host=127.0.0.1",
        f"port={port}",
        f"user={user}",
        f"pass={PASSWORD}",
        f"mbox={mbox}",
        f"clients={args.clients}",
        f"secs={args.secs}",
        "logout=0",
    ]
    if args.checkpoint:
        command.append(f"checkpoint={args.checkpoint}")
    out = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=args.secs + 120)
    lines = (out.stdout + out.stderr).splitlines()
    try:
        at = lines.index("Totals:")
    except ValueError:
        raise RuntimeError("imaptest printed no totals:\n" + "\n".join(lines[-20:]))
    names = lines[at + 1].split()
    counts = [int(n) for n in lines[at + 4].split()[: len(names)]]
    errors: dict[str, int] = {}
    for line in lines:
        if line.startswith("Error:"):
            kind = re.sub(r"\d+", "N", line.split("]: ", 1)[-1])[:70]
            errors[kind] = errors.get(kind, 0) + 1
    return dict(zip(names, counts)), errors


def runMaild(imaptest: str, mbox: Path, args) -> Result:
    sys.path.insert(0, str(ROOT))
    import bcrypt

    from maild.store import MailStore

    with tempfile.TemporaryDirectory(prefix="imaptest-maild-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        (data / "users").write_text(f"{USER}:{{BLF-CRYPT}}{hashed}\n")
        MailStore(data).mailbox(USER).ensureExists()
        # As many sessions from one address as imaptest makes (Dovecot's
        # mail_max_userip_connections is raised alike by its script).
        config = Path(tmp) / "maild.toml"
        config.write_text(f"[limits]\nconnections_per_ip = {args.clients + 10}\n")
        port = freePort()
        log = data / "maild.log"
        env = daemonEnv()
        from maild.config import PROTOCOLS

        listeners = [f"--{name}=none" for name in PROTOCOLS if name != "imap"]
        daemon = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "-l", str(log),
             "maild", f"--config={config}", f"--data-dir={data}", "--hostname=mx.test", "--domain=localhost",
             f"--imap=tcp:{port}:interface=127.0.0.1", f"--workers={args.workers}", *listeners],
            cwd=ROOT,
            env=env,
        )
        try:
            waitForPort(port, process=daemon)
            totals, errors = runImaptest(imaptest, port, USER, mbox, args)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        return Result("maild", totals, errors, log.read_text(errors="replace").count("Traceback"))


def runDovecot(imaptest: str, mbox: Path, args) -> Result:
    with tempfile.TemporaryDirectory(prefix="imaptest-dovecot-") as tmp:
        os.chmod(tmp, 0o755)  # Dovecot's sessions run as the mail user
        port = freePort()
        script = args.dovecot_script
        # Dovecot stays behind as a daemon: no pipe of ours may be left open in it.
        subprocess.run(["sh", script, "start", tmp, str(port), str(freePort()), f"testuser:{PASSWORD}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            waitForPort(port)
            totals, errors = runImaptest(imaptest, port, "testuser", mbox, args)
        finally:
            subprocess.run(["sh", script, "stop", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pidFile = Path(tmp) / "base" / "master.pid"
            deadline = time.monotonic() + 30
            while pidFile.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        return Result("dovecot", totals, errors)


def show(result: Result) -> None:
    counts = " ".join(f"{name}={count}" for name, count in result.totals.items())
    print(f"  {result.server:8} total {result.total:6d} ({result.total / ARGS.secs:6.0f}/s)  {counts}"
          f"  [load average before: {result.load:.1f}]")
    for kind, n in sorted(result.errors.items(), key=lambda kv: -kv[1]):
        print(f"           {n:6d} x {kind}")
    if result.server == "maild":
        print(f"           tracebacks in maild's log: {result.tracebacks}")


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imaptest", required=True, help="the imaptest binary (../shared/tools/build-imaptest.sh)")
    parser.add_argument("--dovecot-script", default=str(ROOT.parent / "shared" / "tools" / "reference-dovecot.sh"))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1,
                        help="maild processes (Dovecot runs a process per session, on every core)")
    parser.add_argument("--secs", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkpoint", type=int, default=0, help="imaptest's checkpoint interval (0: none)")
    parser.add_argument("--messages", type=int, default=500, help="messages in the generated mbox")
    parser.add_argument(
        "--settle", type=float, default=None,
        help="seconds a server's run waits after the files removed before it (default: 70 on an "
             "ext4 without a journal, else 0; see _harness.Settling)",
    )
    ARGS = args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imaptest-mbox-") as tmp:
        mbox = Path(tmp) / "stress.mbox"
        subprocess.run([sys.executable, str(ROOT / "tests" / "corpus" / "gen_mbox.py"), str(mbox), str(args.messages)],
                       check=True, capture_output=True)
        os.chmod(tmp, 0o755)
        if args.settle is None:
            args.settle = settleDefault(Path(tempfile.gettempdir()))
        # Each server's run removes its data folder when it ends: the next
        # one, the other server's, would pay for that and for its expunges.
        settling = Settling(args.settle)
        ratios = []
        print(f"imaptest stress: {args.clients} clients, {args.secs} s, logout=0"
              + (f", checkpoint={args.checkpoint}" if args.checkpoint else ""))
        for run in range(1, args.runs + 1):
            print(f"run {run}:")
            results = []
            for server in (runMaild, runDovecot):
                settling.wait()
                try:
                    load = os.getloadavg()[0]
                    results.append(server(args.imaptest, mbox, args))
                    results[-1].load = load
                except RuntimeError as e:
                    # imaptest itself sometimes panics (its checkpoint code)
                    print(f"  {server.__name__}: " + "\n    ".join(line[:150] for line in str(e).splitlines()[-4:]))
                    break
                finally:
                    settling.removed()
                show(results[-1])
            if len(results) == 2 and results[1].total:
                ratios.append(results[0].total / results[1].total)
                print(f"  ratio maild/dovecot: {ratios[-1]:.2f}")
        if ratios:
            print(f"ratios: {' '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
