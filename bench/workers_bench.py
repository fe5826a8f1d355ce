#!/usr/bin/env python3
"""
One maild process against several (--workers N), side by side in one run:
SMTP delivery at C=50 of 10 KiB messages, each connection sending many,
and a mixed IMAP load from 20 clients (Dovecot's imaptest, stress mode,
logout=0) on the INBOX the SMTP run filled.

    python bench/workers_bench.py --imaptest /path/to/imaptest [--workers 1,2] [--repeat 2]

The SMTP client is Postfix's smtp-source (C, one connection per session
kept for many messages: -d) when it is installed, else bench/smtp_load.py
(Python asyncio, pipelining); --smtp-client chooses.  Both share the
machine's cores with maild, so the cheaper one leaves maild more.

Each run starts one daemon per worker count, each with a fresh data folder
in /tmp and free loopback ports, from the source tree this script sits in.
Without --imaptest only SMTP is measured.

Wall-clock rates depend on everything else the machine runs.  So that a
result can be judged on a busy machine too, each phase also reports CPU
seconds per operation, of every server process (the parent and each
worker: how the load was spread) and of the client, and, where perf can
count system calls (root, or perf_event_paranoid <= 1 with tracefs), the
fsync-family calls per message (what group commit saves) and the
directory listings per IMAP command (getdents64: folder rescans).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _harness import ROOT, TWISTD, Settling, daemonEnv, freePort, settleDefault, waitForPort

LISTENERS = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")
PASSWORD = "bench-password"
SENDER = "bench@example.org"
RECIPIENT = "alice@localhost"
# --imap-users N: u1@localhost to uN@localhost (imaptest's template).
IMAP_USERS = "u%d@localhost"
MESSAGE_SIZE = 10240
TICKS = os.sysconf("SC_CLK_TCK")
COUNTED_CALLS = ("fsync", "fdatasync", "syncfs", "getdents64")


def imaptestTotal(output: str) -> int:
    """
    The number of commands imaptest's stress run completed: the sum of the
    counts row under "Totals:".
    """
    tail = output[output.rindex("Totals:"):].splitlines()[1:]
    counts = [line for line in tail if line.strip() and re.fullmatch(r"[\d\s]+", line)]
    return sum(int(n) for n in counts[-1].split())


def processTree(pid: int) -> list[int]:
    """
    C{pid} and its children (a parent and its workers).
    """
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid] + children


def cpuSeconds(pids: list[int]) -> dict[int, float]:
    """
    User and system CPU seconds each process (all its threads) has used.
    """
    used = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # utime and stime: fields 14 and 15 of proc(5), counted from 1.
        used[pid] = (int(fields[11]) + int(fields[12])) / TICKS
    return used


def clientCPU() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class SyscallCounter:
    """
    Counts system calls of some processes with perf's tracepoints (in the
    kernel: the processes are not slowed as strace would slow them).
    """

    def __init__(self, pids: list[int]) -> None:
        self.output = tempfile.NamedTemporaryFile(prefix="perf-", suffix=".csv", delete=False)
        events = ",".join(f"syscalls:sys_enter_{call}" for call in COUNTED_CALLS)
        self.process = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", events, "-p", ",".join(map(str, pids)), "-o", self.output.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # perf attaches in a moment; calls before that are not counted.
        time.sleep(0.3)

    @staticmethod
    def available() -> bool:
        if shutil.which("perf") is None:
            return False
        result = subprocess.run(
            ["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_fsync", "true"],
            capture_output=True, text=True,
        )
        return result.returncode == 0 and "sys_enter_fsync" in result.stderr

    def stop(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)
        counts = {}
        for line in Path(self.output.name).read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].isdigit():
                counts[parts[2].rpartition("sys_enter_")[2]] = int(parts[0])
        os.unlink(self.output.name)
        return counts


@dataclass
class Phase:
    """
    One load against one daemon: its rate and what it cost.
    """

    operations: int
    seconds: float
    serverCPU: dict[str, float]
    clientCPU: float
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.operations / self.seconds

    def perOperation(self, seconds: float) -> float:
        return 1000 * seconds / self.operations

    def describe(self, unit: str) -> str:
        server = sum(self.serverCPU.values())
        parts = [f"{self.rate:,.0f} {unit}/s",
                 f"server CPU {self.perOperation(server):.3f} ms/{unit} ("
                 + ", ".join(f"{name} {self.perOperation(s):.3f}" for name, s in self.serverCPU.items()) + ")",
                 f"client CPU {self.perOperation(self.clientCPU):.3f} ms/{unit}"]
        if self.calls:
            syncs = sum(self.calls.get(c, 0) for c in ("fsync", "fdatasync", "syncfs"))
            parts.append(f"syncs {syncs / self.operations:.3f}/{unit}")
            parts.append(f"getdents {self.calls.get('getdents64', 0) / self.operations:.3f}/{unit}")
        return ", ".join(parts)


class Daemon:
    def __init__(self, workers: int, folder: Path, variant: tuple = (), imapUsers: int = 1) -> None:
        self.folder = folder
        self.workers = workers
        self.ports = {"smtp": freePort(), "imap": freePort()}
        env = daemonEnv()
        for user in [RECIPIENT] + [IMAP_USERS % n for n in range(1, imapUsers + 1) if imapUsers > 1]:
            subprocess.run(
                [sys.executable, "-m", "maild.cli", "--data-dir", str(folder / "data"),
                 "user", "add", user, "--password-stdin"],
                input=PASSWORD + "\n", text=True, check=True, env=env, stdout=subprocess.DEVNULL,
            )
        settings = "[limits]\nconnections_per_ip = 1000\n"
        if variant:
            # [cluster] settings, as ("scheduling", "normal") pairs.
            settings += "[cluster]\n" + "".join(f'{name} = "{value}"\n' for name, value in variant)
        (folder / "maild.toml").write_text(settings)
        listeners = [
            f"--{name}=tcp:{self.ports[name]}:interface=127.0.0.1" if name in self.ports else f"--{name}=none"
            for name in LISTENERS
        ]
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=",
             "--logfile", str(folder / "twistd.log"), "maild", "--config", str(folder / "maild.toml"),
             "--data-dir", str(folder / "data"), f"--workers={workers}", *listeners],
            cwd=folder, env=env,
        )
        for port in self.ports.values():
            waitForPort(port, process=self.process)
        # Let every worker come up before the load starts.
        deadline = time.monotonic() + 60
        while len(self.pids()) < (1 if workers == 1 else workers + 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)

    def pids(self) -> list[int]:
        return processTree(self.process.pid)

    def names(self) -> dict[int, str]:
        if self.workers == 1:
            return {self.process.pid: "maild"}
        names = {self.process.pid: "parent"}
        for number, pid in enumerate(self.pids()[1:], 1):
            names[pid] = f"worker {number}"
        return names

    def inbox(self) -> int:
        mailbox = self.folder / "data" / "mail" / "localhost" / "alice"
        return sum(len(os.listdir(mailbox / sub)) for sub in ("new", "cur"))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def measure(daemon: Daemon, countCalls: bool, load) -> Phase:
    """
    Run C{load()} (which returns the operations done and the seconds they
    took) against C{daemon}, and what it cost.
    """
    names = daemon.names()
    counter = SyscallCounter(list(names)) if countCalls else None
    serverBefore = cpuSeconds(list(names))
    clientBefore = clientCPU()
    operations, seconds = load()
    client = clientCPU() - clientBefore
    serverAfter = cpuSeconds(list(names))
    calls = counter.stop() if counter else {}
    server = {names[pid]: serverAfter[pid] - serverBefore[pid] for pid in names if pid in serverAfter}
    return Phase(operations, seconds, server, client, calls)


def smtpSource(port: int, messages: int, concurrency: int) -> tuple[int, float]:
    started = time.perf_counter()
    subprocess.run(
        [shutil.which("smtp-source"), "-s", str(concurrency), "-m", str(messages), "-l", str(MESSAGE_SIZE),
         "-d", "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return messages, time.perf_counter() - started


def smtpLoad(port: int, messages: int, concurrency: int) -> tuple[int, float]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "smtp_load.py"), "--server", f"127.0.0.1:{port}",
         "--messages", str(messages), "--concurrency", str(concurrency), "--size", str(MESSAGE_SIZE),
         "--to", RECIPIENT, "--json"],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(result.stdout)
    return summary["accepted"], summary["seconds"]


def imaptest(binary: str, port: int, mbox: Path, clients: int, seconds: int, users: int = 1) -> tuple[int, float]:
    # One user: every client works on alice's INBOX, which the SMTP run
    # filled.  Several: each client logs in as one of them at random, to
    # an INBOX that imaptest fills by APPEND.
    who = [f"user={RECIPIENT}"] if users == 1 else [f"user={IMAP_USERS}", f"users=1-{users}"]
    result = subprocess.run(
        [binary, "host=127.0.0.1", f"port={port}", *who, f"pass={PASSWORD}",
         f"mbox={mbox}", f"clients={clients}", f"secs={seconds}", "logout=0"],
        capture_output=True, text=True, timeout=seconds + 120,
    )
    return imaptestTotal(result.stdout), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--smtp-messages", type=int, default=5000)
    parser.add_argument("--smtp-concurrency", type=int, default=50)
    parser.add_argument(
        "--smtp-client", choices=("smtp-source", "smtp_load"),
        default="smtp-source" if shutil.which("smtp-source") else "smtp_load",
        help="SMTP load generator (default %(default)s)",
    )
    parser.add_argument("--imaptest", help="path to Dovecot's imaptest binary")
    parser.add_argument("--imap-clients", type=int, default=20)
    parser.add_argument("--imap-seconds", type=int, default=20)
    parser.add_argument(
        "--settle", type=float, default=None,
        help="seconds a phase waits after the removals before it (default: 70 on an ext4 "
             "without a journal, else 0; see _harness.Settling)",
    )
    parser.add_argument(
        "--imap-users", type=int, default=1,
        help="users the IMAP clients log in as (default 1: all on one INBOX, the hardest case for "
             "several workers, each of which must follow the others' changes)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true",
        help="skip the unmeasured SMTP and IMAP run before the rounds (the first IMAP run of all "
             "follows no other's expunges, and was often the fastest of an invocation)",
    )
    parser.add_argument("--no-perf", action="store_true", help="do not count system calls with perf")
    parser.add_argument(
        "--scheduling", default="",
        help="[cluster] scheduling policies to compare, e.g. batch,normal (default: the daemon's)",
    )
    parser.add_argument(
        "--cpu-affinity", default="",
        help="[cluster] cpu_affinity settings to compare, e.g. auto,none (default: the daemon's)",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    # Each setting: (workers, the [cluster] settings that differ from the
    # daemon's defaults, as (name, value) pairs).
    choices = [
        [(name, value) for value in values.split(",")] if values else [None]
        for name, values in (("scheduling", args.scheduling), ("cpu_affinity", args.cpu_affinity))
    ]
    variants = [tuple(pair for pair in combination if pair) for combination in itertools.product(*choices)]
    settings = list(dict.fromkeys(onlyWhatMatters(n, variant) for variant in variants for n in counts))
    countCalls = not args.no_perf and SyscallCounter.available()
    sendMail = smtpSource if args.smtp_client == "smtp-source" else smtpLoad
    print(f"SMTP client: {args.smtp_client}; system calls counted: {'yes' if countCalls else 'no'}")
    results: dict[tuple, dict[str, list[Phase]]] = {key: {"smtp": [], "imap": []} for key in settings}
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as top:
        if args.settle is None:
            args.settle = settleDefault(Path(top))
        print(f"each phase starts {args.settle:g} s after the removals before it")
        settling = Settling(args.settle)
        mbox = Path(top) / "corpus.mbox"
        subprocess.run([sys.executable, str(ROOT / "tests" / "corpus" / "gen_mbox.py"), str(mbox), "500"],
                       check=True, stdout=subprocess.DEVNULL)
        if not args.no_warmup:
            # Unmeasured: the first IMAP run of an invocation follows no
            # other IMAP run's expunges.  It was the fastest of three of
            # four invocations (one process at 0.54-0.59 ms of CPU per
            # command, 0.58-0.76 in later rounds), to the credit of
            # whichever setting went first: always one process.
            warmup = Path(top) / "warmup"
            warmup.mkdir()
            daemon = Daemon(counts[0], warmup, (), args.imap_users)
            try:
                sendMail(daemon.ports["smtp"], args.smtp_messages, args.smtp_concurrency)
                if args.imaptest:
                    imaptest(args.imaptest, daemon.ports["imap"], mbox, args.imap_clients,
                             args.imap_seconds, args.imap_users)
                    settling.removed()
            finally:
                daemon.stop()
            print("warm-up run done (not counted)", flush=True)
        for run in range(args.repeat):
            # Interleaved, so both settings see the same machine, and in
            # turns first; all SMTP runs before the IMAP runs, no data
            # folder removed before the end, and each phase a while after
            # the removals before it (Settling).
            order = settings if run % 2 == 0 else settings[::-1]
            daemons = {}
            try:
                for key in order:
                    n, variant = key
                    folder = Path(top) / f"run{run}-w{n}-{'-'.join(v for _, v in variant) or 'default'}"
                    folder.mkdir()
                    daemons[key] = Daemon(n, folder, variant, args.imap_users)
                for key in order:
                    daemon = daemons[key]
                    settling.wait()
                    phase = measure(daemon, countCalls, lambda: sendMail(
                        daemon.ports["smtp"], args.smtp_messages, args.smtp_concurrency))
                    stored = daemon.inbox()
                    if stored != args.smtp_messages:
                        raise SystemExit(f"{stored} messages stored of {args.smtp_messages} sent")
                    results[key]["smtp"].append(phase)
                    print(f"run {run + 1}, {label(key)}: smtp {phase.describe('msg')}", flush=True)
                for key in order if args.imaptest else ():
                    daemon = daemons[key]
                    settling.wait()
                    phase = measure(daemon, countCalls, lambda: imaptest(
                        args.imaptest, daemon.ports["imap"], mbox, args.imap_clients, args.imap_seconds,
                        args.imap_users))
                    results[key]["imap"].append(phase)
                    settling.removed()
                    print(f"run {run + 1}, {label(key)}: imap {phase.describe('cmd')}", flush=True)
            finally:
                for daemon in daemons.values():
                    daemon.stop()
    summarize(results, settings)


def onlyWhatMatters(workers: int, variant: tuple) -> tuple:
    """
    A setting as run: one process has no CPUs to share out, so it is run
    once whatever C{cpu_affinity} is compared.
    """
    if workers == 1:
        variant = tuple((name, value) for name, value in variant if name != "cpu_affinity")
    return workers, variant


def label(key: tuple) -> str:
    n, variant = key
    return f"{n} worker(s)" + "".join(f", {name} {value}" for name, value in variant)


def summarize(results: dict[tuple, dict[str, list[Phase]]], settings: list[tuple]) -> None:
    """
    Mean rates, their ratio to the first worker count's under the same
    [cluster] settings, and mean CPU milliseconds per operation of all
    server processes and of the client.
    """
    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    width = max(len(label(key)) for key in settings)
    print(f"\n{'setting':>{width}} {'load':>5} {'rate/s':>9} {'ratio':>6} {'per round':>18} "
          f"{'server ms/op':>13} {'client ms/op':>13}")
    for key in settings:
        base = onlyWhatMatters(settings[0][0], key[1])
        for load in ("smtp", "imap"):
            phases = results[key][load]
            if not phases:
                continue
            rate = mean(p.rate for p in phases)
            ratio = rate / mean(p.rate for p in results[base][load])
            # Each round ran both settings on the same machine minutes apart.
            rounds = [p.rate / b.rate for p, b in zip(phases, results[base][load])]
            perRound = " ".join(f"{r:.2f}" for r in rounds)
            server = mean(p.perOperation(sum(p.serverCPU.values())) for p in phases)
            client = mean(p.perOperation(p.clientCPU) for p in phases)
            print(f"{label(key):>{width}} {load:>5} {rate:>9,.0f} {ratio:>6.2f} {perRound:>18} "
                  f"{server:>13.3f} {client:>13.3f}")


if __name__ == "__main__":
    main()
