"""
How fast maild drains its outbound queue: daemon A (a.test) holds N queued
10 KiB messages for b.test, daemon B (b.test) comes up, A is told to flush,
and the run measures how long until A's queue is empty, and A's memory
meanwhile.  Then, for comparison, the same N messages are sent straight to
B with smtp_load.py over as many connections as A uses: B's own durable
receive rate (over STARTTLS, as A sends), the ceiling A's drain can reach.

    python bench/relay_drain.py [--messages 10000] [--size 10240] [--connections 4]

Both daemons run from this checkout (twistd maild), data in a temporary
folder under --dir (/tmp by default), loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _harness import ROOT, TWISTD, cpuSeconds, daemonEnv, freePort, rss, waitForPort

sys.path.insert(0, str(ROOT))
from maild.config import PROTOCOLS  # noqa: E402  (every listener, to turn off the unused)

PASSWORD = "bench password"


def connectionsAccepted(httpPort: int) -> int:
    """
    The connections a daemon's SMTP listener accepted so far (its
    C{maild_connections} counter): each from A is one STARTTLS handshake.
    """
    text = urllib.request.urlopen(f"http://127.0.0.1:{httpPort}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('maild_connections_total{listener="smtp"}'):
            return int(float(line.split()[-1]))
    return 0


class Daemon:
    def __init__(
        self, folder: Path, domain: str, users: tuple[str, ...], listeners: dict[str, int], relay: str = "",
        twistd: tuple = (),
    ) -> None:
        self.folder = folder
        self.data = folder / "data"
        folder.mkdir(parents=True)
        listen = "\n".join(
            f'{p} = "tcp:{listeners[p]}:interface=127.0.0.1"' if p in listeners else f'{p} = "none"'
            for p in PROTOCOLS
        )
        self.config = folder / "maild.toml"
        self.config.write_text(
            f'data_dir = "{self.data}"\nhostname = "mx.{domain}"\ndomains = ["{domain}"]\n'
            f"[listen]\n{listen}\n[auth]\nsubmission_plaintext = true\n"
            f"[limits]\nconnections_per_ip = 100\n{relay}"
        )
        for user in users:
            subprocess.run(
                [sys.executable, "-m", "maild.cli", "--config", str(self.config), "user", "add", user,
                 "--password-stdin"],
                input=PASSWORD + "\n", text=True, check=True, capture_output=True, cwd=ROOT,
            )
        self.log = open(folder / "twistd.log", "w")
        self.process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", *twistd, "maild", "--config", str(self.config)],
            cwd=folder, env=daemonEnv(),
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.log.close()

    def logText(self) -> str:
        return (self.folder / "twistd.log").read_text(errors="replace")


def load(
    port: int, messages: int, size: int, concurrency: int, sender: str, to: str, user: str | None, starttls: bool = False
) -> dict:
    command = [
        sys.executable, str(ROOT / "bench" / "smtp_load.py"), "--server", f"127.0.0.1:{port}",
        "--messages", str(messages), "--size", str(size), "--concurrency", str(concurrency),
        "--from", sender, "--to", to, "--json",
    ]
    if user:
        command += ["--user", user, "--password", PASSWORD]
    if starttls:
        command += ["--starttls", "--insecure"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def cpuUserSystem(pid: int) -> tuple[float, float]:
    """
    The user and the system CPU time a process has used, in seconds.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def directRun(port: int, pid: int, options) -> dict:
    """
    The same messages as A drains, sent straight to B by smtp_load.py
    over as many connections, with STARTTLS: B's own durable receive rate.
    """
    before = cpuSeconds(pid)
    result = load(
        port, options.messages, options.size, options.connections, "dave@c.test", "carol@b.test", None, True
    )
    result["b_cpu_ms_per_message"] = round((cpuSeconds(pid) - before) * 1000 / max(result["accepted"], 1), 3)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--connections", type=int, default=4, help="A's connections to B (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep the data folders")
    parser.add_argument("--profile", help="save a cProfile of A's whole run in this file")
    parser.add_argument(
        "--py-spy", dest="pySpy", help="sample A with py-spy while it drains; save a flame graph here (.svg), or collapsed stacks (any other name)"
    )
    parser.add_argument("--dir", default="/tmp", help="where the data folders go (default %(default)s; /dev/shm: no disk cost)")
    parser.add_argument(
        "--a-dir", dest="aDir",
        help="put A's data folder here instead (say /dev/shm, so that A's queue does not share B's disk, "
        "as when they are two machines)",
    )
    options = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="maild-drain-", dir=options.dir))
    aRoot = Path(tempfile.mkdtemp(prefix="maild-drain-a-", dir=options.aDir)) if options.aDir else root
    bPort, aPort, bHttp = freePort(), freePort(), freePort()
    a = Daemon(
        aRoot / "a", "a.test", ("alice@a.test",), {"submission": aPort},
        relay=(
            f"[relay]\nretry_first = 3600.0\nconnections_per_destination = {options.connections}\n"
            f'queue_max_messages = {options.messages + 1000}\nrecipients_per_hour = {options.messages + 1000}\n'
            f'[relay.routes]\n"b.test" = "127.0.0.1:{bPort}"\n'
        ),
        twistd=("--profiler=cprofile", "--savestats", f"--profile={options.profile}") if options.profile else (),
    )
    b = None
    try:
        waitForPort(aPort)
        started = rss(a.process.pid)
        queue = a.data / "queue"
        # B is down: every message is queued (and deferred once).
        loaded = load(aPort, options.messages, options.size, 8, "alice@a.test", "bob@b.test", "alice@a.test")
        while a.logText().count("status=deferred") < options.messages:
            time.sleep(0.2)
        queued = len(list(queue.glob("*.env")))
        accepting = rss(a.process.pid)
        # A drains into bob's INBOX, the direct runs go to carol's.
        b = Daemon(root / "b", "b.test", ("bob@b.test", "carol@b.test"), {"smtp": bPort, "http": bHttp})
        waitForPort(bPort)
        waitForPort(bHttp)
        time.sleep(2)
        # The ceiling: the same messages straight into B, over as many
        # connections, with STARTTLS as A sends; once before A drains and
        # once after, as other load on the machine comes and goes.
        direct = [directRun(bPort, b.process.pid, options)]
        memory = [rss(a.process.pid)]
        (queue / "flush").mkdir(exist_ok=True)
        connectionsBefore = connectionsAccepted(bHttp)
        cpuBefore = cpuSeconds(a.process.pid)
        splitBefore = cpuUserSystem(a.process.pid)
        bCpuBefore = cpuSeconds(b.process.pid)
        spy = None
        if options.pySpy:
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(a.process.pid),
                 "--output", options.pySpy, "--rate", "200", "--idle", "--nonblocking",
                 "--format", "flamegraph" if options.pySpy.endswith(".svg") else "raw"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        start = time.monotonic()
        (queue / "flush" / "ALL").touch()
        while any(True for _ in queue.glob("*.env")):
            time.sleep(0.25)
            memory.append(rss(a.process.pid))
        drained = time.monotonic() - start
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        cpu = cpuSeconds(a.process.pid) - cpuBefore
        split = [after - before for after, before in zip(cpuUserSystem(a.process.pid), splitBefore)]
        bCpu = cpuSeconds(b.process.pid) - bCpuBefore
        connections = connectionsAccepted(bHttp) - connectionsBefore
        inbox = b.data / "mail" / "b.test" / "bob"
        delivered = sum(1 for sub in ("new", "cur") for _ in (inbox / sub).iterdir())
        drainRate = delivered / drained
        direct.append(directRun(bPort, b.process.pid, options))
        directRate = sum(run["messages_per_second"] for run in direct) / len(direct)
        summary = {
            "messages": options.messages,
            "queued": queued,
            "delivered": delivered,
            "load_messages_per_s": round(loaded["messages_per_second"], 1),
            "load_accepted": loaded["accepted"],
            "drain_seconds": round(drained, 2),
            "drain_messages_per_s": round(drainRate, 1),
            "direct_to_b_messages_per_s_before_after": [round(run["messages_per_second"], 1) for run in direct],
            "drain_to_direct_ratio": round(drainRate / directRate, 2),
            "a_connections_to_b": connections,
            "a_cpu_ms_per_message": round(cpu * 1000 / max(delivered, 1), 3),
            # The share of one core: near 1, A is the limit; well below, A waits for B.
            # Of which in the process itself (Python, OpenSSL) and in the kernel.
            "a_cpu_ms_per_message_user_system": [round(t * 1000 / max(delivered, 1), 3) for t in split],
            "a_cpu_share_while_draining": round(cpu / drained, 2),
            "b_cpu_ms_per_message_drain_direct": [
                round(bCpu * 1000 / max(delivered, 1), 3), *(run["b_cpu_ms_per_message"] for run in direct)
            ],
            # A's resident memory: started, with every message queued (accepting
            # costs this much per message), then while draining.
            "a_rss_kib_started_queued": [started, accepting],
            "a_rss_kib_per_queued_message": round((accepting - started) / max(queued, 1), 2),
            "a_rss_kib_before_after_peak": [memory[0], memory[-1], max(memory)],
            "tracebacks": a.logText().count("Traceback") + b.logText().count("Traceback"),
        }
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        a.stop()
        if b is not None:
            b.stop()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(aRoot, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
