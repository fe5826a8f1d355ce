#!/usr/bin/env python3
"""
SMTP MX throughput with the trust checks (SPF, DKIM, DMARC) on against
off, back to back, for four kinds of mail: unsigned (SPF and DMARC only),
signed with ed25519, with RSA 2048, and with both (as maild's relay
signs).  A private DNS server (trust_dns.py) answers for the sending
domain C{bench.test}; smtp_load.py sends 10 KiB messages at C=50 over two
source addresses; the daemon stores durably and checks mail from loopback
(C{[limits] trusted_networks = []}).

Each round runs every kind checked and unchecked, one right after the
other (in turn on first, then off first), so that both halves of a pair
see the same machine; the table gives each pair's rates, their ratio,
and the daemon's CPU per message (user and system, sync work included).

Run from the repository root with maild's virtual environment::

    python bench/trust_bench.py [--messages 5000] [--rounds 3] [--kinds unsigned,ed25519,rsa,both]
        [--source DIR]   # the daemon of another checkout: git archive <commit> | tar -x -C DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _harness import freePort, waitForPort

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable

# Kind: the smtp_load.py signing options (trust_dns.py's keys and selectors).
SIGNING = {
    "unsigned": [],
    "ed25519": [("ed25519.key", "ed", "ed25519-sha256")],
    "rsa": [("rsa.key", "rsa", "rsa-sha256")],
    "both": [("rsa.key", "rsa", "rsa-sha256"), ("ed25519.key", "ed", "ed25519-sha256")],
}

CONFIG = """\
data_dir = "{data}"
hostname = "mx.bench.local"
[listen]
smtp = "tcp:{port}:interface=127.0.0.1"
submission = "none"
smtps = "none"
pop3 = "none"
pop3s = "none"
imap = "none"
imaps = "none"
http = "tcp:{httpPort}:interface=127.0.0.1"
https = "none"
[web]
metrics = "anyone"
[dns]
nameservers = ["127.0.0.1:{dnsPort}"]
[limits]
trusted_networks = []
[mx]
checks = {checks}
{dkimProcesses}"""


def cpuSeconds(pid: int) -> tuple[float, float, float, float]:
    """
    The user and system CPU seconds of process C{pid}, all threads and its
    running children (the DKIM processes) included, the CPU seconds of
    C{pid} alone, and those of its main thread, the reactor's (which bounds
    the rate when it is busy all the time, however many cores are idle).
    """

    def ownSeconds(pid: int, stat: str = "stat") -> tuple[float, float]:
        fields = Path(f"/proc/{pid}/{stat}").read_text().rsplit(")", 1)[1].split()
        # utime and stime (fields 14 and 15 of proc(5), counted from the state).
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    user, system = ownSeconds(pid)
    own = user + system
    reactor = sum(ownSeconds(pid, f"task/{pid}/stat"))
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            childUser, childSystem = ownSeconds(int(child))
        except FileNotFoundError:
            continue
        user, system = user + childUser, system + childSystem
    return user, system, own, reactor


# The checkout whose daemon is measured (--source).
SOURCE = ROOT
# Where py-spy's samples of the runs go (--profile), if anywhere.
PROFILE: Path | None = None


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SOURCE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def runOnce(
    work: Path, dnsPort: int, kind: str, checks: bool, messages: int, label: str,
    dkimProcesses: int | None = None, canonicalization: str = "relaxed/simple",
) -> dict:
    """
    One daemon, one load run: the rate, the daemon's CPU per message, and
    what its log says.
    """
    data = work / f"data-{label}"
    data.mkdir()
    env = environment()
    subprocess.run(
        [PYTHON, "-m", "maild.cli", "--data-dir", str(data), "user", "add", "alice@localhost",
         "--password-stdin"],
        input=b"secret\n", check=True, env=env, stdout=subprocess.DEVNULL,
    )
    port, httpPort = freePort(), freePort()
    config = work / f"maild-{label}.toml"
    config.write_text(
        CONFIG.format(data=data, port=port, httpPort=httpPort, dnsPort=dnsPort,
                      checks=str(checks).lower(),
                      # Written only when asked for: a daemon from before
                      # the key (--source) would refuse it.
                      dkimProcesses=f"dkim_processes = {dkimProcesses}\n"
                      if dkimProcesses is not None else "")
    )
    log = work / f"maild-{label}.log"
    daemon = subprocess.Popen(
        [str(Path(PYTHON).parent / "twistd"), "-n", "--pidfile=", f"--logfile={log}", "maild",
         "--config", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        waitForPort(port, timeout=30, process=daemon)
        os.sync()
        time.sleep(1)
        signing = []
        for keyFile, selector, algorithm in SIGNING[kind]:
            signing += ["--dkim-key", str(work / keyFile), "--dkim-selector", selector,
                        "--dkim-algorithm", algorithm]
        load = [
            PYTHON, str(BENCH / "smtp_load.py"), "--server", f"127.0.0.1:{port}",
            "--messages", str(messages), "--concurrency", "50", "--bind", "127.0.0.1,127.0.0.2",
            "--from", "bench@bench.test", "--to", "alice@localhost", "--json",
            "--dkim-canonicalization", canonicalization, *signing,
        ]
        # smtp_load.py signs before its run (and times the run alone); the
        # daemon waits meanwhile, at no cost.
        profiler = None
        if PROFILE is not None:
            # Samples of the daemon and its DKIM processes during the load.
            profiler = subprocess.Popen(
                [str(Path(PYTHON).parent / "py-spy"), "record", "--pid", str(daemon.pid),
                 "--subprocesses", "--nonblocking", "--rate", "200", "--format", "raw",
                 "--output", str(PROFILE / f"{label}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        before = cpuSeconds(daemon.pid)
        # The load generator is the only child waited for during the run.
        clientBefore = resource.getrusage(resource.RUSAGE_CHILDREN)
        output = subprocess.run(load, env=env, stdout=subprocess.PIPE).stdout
        clientAfter = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = cpuSeconds(daemon.pid)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait()
        loadAverage = os.getloadavg()[0]
        metrics = _metrics(httpPort)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
    result = json.loads(output)
    text = log.read_text(errors="replace")
    summary = next(
        (line.split(" spf=", 1)[1] for line in text.splitlines() if " spf=" in line), ""
    )
    return {
        "kind": kind,
        "checks": checks,
        "rate": result["messages_per_second"],
        "accepted": result["accepted"],
        "cpu_us": (after[0] + after[1] - before[0] - before[1]) / messages * 1e6,
        # The daemon's process alone (what bounds its rate on one core).
        "own_us": (after[2] - before[2]) / messages * 1e6,
        "system_us": (after[1] - before[1]) / messages * 1e6,
        "reactor_us": (after[3] - before[3]) / messages * 1e6,
        # smtp_load.py's CPU, its signing before the run included.
        "client_us": (clientAfter.ru_utime + clientAfter.ru_stime - clientBefore.ru_utime
                      - clientBefore.ru_stime) / messages * 1e6,
        "tracebacks": text.count("Traceback"),
        "results": ("spf=" + summary) if summary else "",
        "load": loadAverage,
        # Messages per group commit, and the mean time from the end of DATA
        # to the 250.
        "group": _mean(metrics, "maild_store_commit_group_size"),
        "reply_ms": _mean(metrics, "maild_data_reply_seconds") * 1000,
    }


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _mean(metrics: dict[str, float], histogram: str) -> float:
    count = metrics.get(histogram + "_count", 0.0)
    return metrics.get(histogram + "_sum", 0.0) / count if count else 0.0


def table(runs: list[dict], kinds: list[str]) -> str:
    lines = [
        f"{'mail':9} {'on msg/s':>18} {'off msg/s':>18} {'ratio on/off':>22} {'median':>7}"
        f" {'CPU µs/msg on/off':>18} {'own on':>7} {'reactor on/off':>15} {'load':>10}",
    ]
    for kind in kinds:
        on = [r for r in runs if r["kind"] == kind and r["checks"]]
        off = [r for r in runs if r["kind"] == kind and not r["checks"]]
        ratios = [a["rate"] / b["rate"] for a, b in zip(on, off)]
        cpuOn = statistics.median(r["cpu_us"] for r in on)
        ownOn = statistics.median(r["own_us"] for r in on)
        reactorOn = statistics.median(r["reactor_us"] for r in on)
        reactorOff = statistics.median(r["reactor_us"] for r in off)
        cpuOff = statistics.median(r["cpu_us"] for r in off)
        loads = [r["load"] for r in on + off]
        onRates = ", ".join(f"{r['rate']:.0f}" for r in on)
        offRates = ", ".join(f"{r['rate']:.0f}" for r in off)
        ratioText = ", ".join(f"{x:.2f}" for x in ratios)
        lines.append(
            f"{kind:9} {onRates:>18} {offRates:>18} {ratioText:>22} {statistics.median(ratios):7.2f}"
            f" {cpuOn:8.0f}/{cpuOff:<9.0f} {ownOn:7.0f} {reactorOn:7.0f}/{reactorOff:<7.0f}"
            f" {min(loads):4.1f}-{max(loads):<4.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default="unsigned,ed25519,rsa,both")
    parser.add_argument("--json", type=Path, help="also write every run to this file")
    parser.add_argument(
        "--dkim-processes", type=int, default=None,
        help="[mx] dkim_processes of the daemon: DKIM verified in that many child processes"
        " (0: in the daemon; by default the daemon's own default)",
    )
    parser.add_argument(
        "--canonicalization", default="relaxed/simple",
        help="the signatures' c= (maild's relay signs relaxed/relaxed)",
    )
    parser.add_argument(
        "--source", type=Path, default=ROOT,
        help="run the daemon of another checkout (the code before a change)",
    )
    parser.add_argument(
        "--profile", type=Path,
        help="record the daemon's runs with py-spy (raw stacks) into this folder",
    )
    options = parser.parse_args(argv)
    global SOURCE, PROFILE
    SOURCE = options.source.resolve()
    if not (SOURCE / "maild" / "__init__.py").is_file():
        parser.error(f"--source {SOURCE}: no maild package there")
    PROFILE = options.profile
    kinds = options.kinds.split(",")
    work = Path(tempfile.mkdtemp(prefix="trust-bench-"))
    dnsPort = freePort()
    dns = subprocess.Popen(
        [PYTHON, str(BENCH / "trust_dns.py"), "--port", str(dnsPort), "--domain", "bench.test",
         "--key-dir", str(work)],
        env=environment(), stdout=subprocess.PIPE,
    )
    runs: list[dict] = []
    try:
        dns.stdout.readline()
        for round in range(options.rounds):
            for kind in kinds:
                for checks in (True, False) if round % 2 == 0 else (False, True):
                    run = runOnce(work, dnsPort, kind, checks, options.messages,
                                  f"{kind}-{checks}-{round}", options.dkim_processes,
                                  options.canonicalization)
                    runs.append(run)
                    print(
                        f"{kind:9} checks={'on ' if checks else 'off'} {run['rate']:6.0f} msg/s"
                        f"  accepted {run['accepted']}  CPU {run['cpu_us']:5.0f} µs/msg"
                        f" (system {run['system_us']:4.0f}, daemon's own {run['own_us']:5.0f},"
                        f" reactor thread {run['reactor_us']:5.0f}, client {run['client_us']:4.0f})"
                        f"  group {run['group']:4.1f}  reply {run['reply_ms']:5.1f} ms"
                        f"  load {run['load']:.1f}  tracebacks {run['tracebacks']}  {run['results']}",
                        flush=True,
                    )
    finally:
        dns.terminate()
        dns.wait()
        subprocess.run(["rm", "-rf", str(work)])
    print()
    print(table(runs, kinds))
    if options.json:
        options.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
