"""
What the benchmark scripts share to start daemons and load them: free
loopback ports, waiting for a listener, the twistd command line, and the
SMTP load generator's JSON figures.  Import it from a script in this
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
