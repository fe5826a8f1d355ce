"""
What the benchmark scripts share to start daemons and load them: free
loopback ports, waiting for a listener, the twistd command line, the
SMTP load generator's JSON figures, and waiting out the cost of files
removed before a measurement.  Import it from a script in this
folder (``from _harness import freePort``); nothing here is a test fixture
(those are in tests/support.py and tests/cluster.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# twistd from the running Python, whichever venv it is in.
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")


def journalLessExt4(path: Path) -> bool:
    """
    Whether C{path} lies on an ext4 file system without a journal (this
    machine's root, for one).
    """
    dev = os.stat(path).st_dev
    try:
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
    except OSError:
        return False
    return Path(f"/proc/fs/ext4/{name}").exists() and not any(Path("/proc/fs/jbd2").glob(f"{name}-*"))


class Settling:
    """
    Waits, before a measured phase, for the files removed before it to
    stop costing it.

    On an ext4 without a journal, a new file's inode is looked for from
    the start of its folder's block group, skipping one by one, a lookup
    each, every inode freed there in the last minute, or six while the
    block holding it is unwritten (the kernel's recently_deleted()).  Data
    folders made side by side share a group, so a phase paid for the
    expunges of the IMAP runs before it, and the first for the data
    folders a previous run removed when it ended: up to 0.4 ms of kernel
    time per new file, which one process spends in threads on the core
    its reactor leaves idle but two workers must fit beside their
    reactors.  Such phases measured up to 1.2 ms of server CPU per SMTP
    message and 1.0 ms per IMAP command, against 0.6-0.75 and 0.55-0.6
    after no removals.  Writing the freed inodes' blocks out (C{sync})
    and waiting a minute clears most of it; new files written into those
    blocks make them unwritten again, so some remains for up to six
    minutes after many removals (a previous run's data folders).  A
    phase's own removals (imaptest's expunges) cost it as they would such
    a server; a file system with a journal does not look at all.

    @ivar seconds: how long after the last removal a phase may start.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._since: float | None = None
        # What was removed before we started is unknown: owed at once.
        self.removed()

    def removed(self) -> None:
        """
        Files were just removed (an IMAP run ended, a data folder was
        removed).
        """
        if self.seconds > 0:
            os.sync()  # the freed inodes' blocks written: skipped for a minute only
            self._since = time.monotonic()

    def wait(self) -> None:
        if self._since is not None:
            time.sleep(max(0.0, self._since + self.seconds - time.monotonic()))
        self._since = None


def settleDefault(path: Path) -> float:
    """
    The seconds L{Settling} waits for files under C{path}: 70 on an ext4
    without a journal (a freed inode is skipped for 60 s once its block is
    written), none elsewhere.
    """
    return 70.0 if journalLessExt4(path) else 0.0


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    """
    Wait until something accepts connections on loopback C{port}; fail
    early when C{process} (the daemon meant to listen) has exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the daemon for port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def daemonEnv() -> dict[str, str]:
    """
    The environment for a daemon run from this checkout.
    """
    return dict(os.environ, PYTHONPATH=str(ROOT))


def cpuSeconds(pid: int) -> float:
    """
    User and system CPU time a process has used.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    """
    Resident memory of a process, in KiB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def smtpLoad(port: int, messages: int, concurrency: int, to: str, *options: str) -> dict:
    """
    Run bench/smtp_load.py against loopback C{port}; its figures (JSON).
    """
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "smtp_load.py"), "--server", f"127.0.0.1:{port}",
         "--messages", str(messages), "--concurrency", str(concurrency), "--to", to, "--json", *options],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout)
