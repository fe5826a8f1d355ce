"""
A cluster on loopback for tests and benchmarks: N maild nodes (separate
twistd processes) on one data folder, real HAProxy in front of them
(PROXY protocol v2), and optionally a real Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import freePort, waitForPort, writeUsers

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_NAMES = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")


def missing(*programs: str) -> str | None:
    """
    Why a cluster cannot be started here, or None.
    """
    for program in programs:
        if shutil.which(program) is None:
            return f"{program} is not installed (Debian package; .ci/run installs it)"
    return None


def killProcess(process: subprocess.Popen | None) -> None:
    """
    Kill C{process} at once (SIGKILL: no goodbye to anyone), if it runs.
    """
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def stopProcess(process: subprocess.Popen | None) -> None:
    """
    Stop C{process} with SIGTERM, if it runs; killed if it has not ended
    30 seconds later.
    """
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            killProcess(process)


class DaemonProcess:
    """
    A maild started by a test as its own process (C{self.process}), logging
    to C{self.log}: killed, stopped and read the same way by every harness.
    """

    log: Path
    process: subprocess.Popen | None = None

    def kill(self) -> None:
        killProcess(self.process)

    def stop(self) -> None:
        stopProcess(self.process)

    def logText(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Node(DaemonProcess):
    """
    One maild process: SMTP and IMAP behind the PROXY protocol, plus a
    plain HTTP listener for /healthz.
    """

    def __init__(self, number: int, folder: Path, config: str) -> None:
        self.number = number
        self.folder = folder
        self.config = config
        self.ports = {"smtp": freePort(), "imap": freePort(), "http": freePort()}
        self.log = folder / f"node{number}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # A port freePort() found free can be taken by another test before
        # the node binds it: the node then exits, and starts again on
        # other ports (before HAProxy is configured with them).
        for attempt in range(3):
            self._spawn()
            try:
                waitForPort(self.ports["http"], process=self.process)
                return
            except AssertionError as e:
                log = self.logText()
                if "Address already in use" not in log or attempt == 2:
                    raise AssertionError(f"node {self.number}: {e}\n{log[-3000:]}") from None
                self.log.unlink()
                self.ports = {name: freePort() for name in self.ports}

    def _spawn(self) -> None:
        listeners = []
        for name in PROTOCOL_NAMES:
            port = self.ports.get(name)
            if port is None:
                listeners.append(f"--{name}=none")
            elif name == "http":
                listeners.append(f"--{name}=tcp:{port}:interface=127.0.0.1")
            else:
                listeners.append(f"--{name}=haproxy:tcp:{port}:interface=127.0.0.1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile", str(self.log), "maild", "--config", self.config,
             f"--hostname=node{self.number}.test", *listeners],
            cwd=self.folder,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def logCount(self, text: str) -> int:
        """
        How many times C{text} appears in the node's log so far.
        """
        return self.logText().count(text)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """
    C{size} nodes on one data folder behind HAProxy: C{frontends["smtp"]}
    spreads SMTP round-robin over the nodes, C{frontends["imap"]} IMAP;
    C{frontends["imap1"]}..., C{frontends["smtp1"]}... reach one node each.
    """

    def __init__(self, folder: Path, size: int = 3, users: dict[str, str] | None = None,
                 config: str = "", redis: bool = False) -> None:
        self.folder = folder
        self.dataDir = folder / "data"
        writeUsers(self.dataDir, users or {})
        self.redisPort = freePort() if redis else None
        text = f'data_dir = "{self.dataDir}"\ndomains = ["localhost"]\n' + config
        if redis:
            text += f'\n[cluster]\nredis = "redis://127.0.0.1:{self.redisPort}/0"\n'
        self.configPath = folder / "maild.toml"
        self.configPath.write_text(text)
        self.nodes = [Node(n, folder, str(self.configPath)) for n in range(1, size + 1)]
        self.frontends: dict[str, int] = {}
        self.haproxy: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None

    def start(self) -> None:
        if self.redisPort is not None:
            self.startRedis()
        for node in self.nodes:
            node.start()
        self.startHAProxy()

    def startRedis(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redisPort), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        waitForPort(self.redisPort, process=self.redis)

    def killRedis(self) -> None:
        """
        Kill Redis at once (SIGKILL: no goodbye to its clients).
        """
        killProcess(self.redis)

    def stopRedis(self) -> None:
        stopProcess(self.redis)

    def startHAProxy(self) -> None:
        # As for the nodes: a frontend port taken meanwhile by another
        # test makes HAProxy exit; it starts again on other ports.
        for attempt in range(3):
            self._spawnHAProxy()
            try:
                for port in self.frontends.values():
                    waitForPort(port, process=self.haproxy)
                return
            except AssertionError:
                if self.haproxy.poll() is None or attempt == 2:
                    raise

    def _spawnHAProxy(self) -> None:
        lines = [
            "global", "  maxconn 4000",
            "defaults", "  mode tcp", "  timeout connect 2s", "  timeout client 60s",
            "  timeout server 60s", "  retries 3", "  option redispatch",
        ]
        for service, balance in (("smtp", "roundrobin"), ("imap", "leastconn")):
            port = self.frontends[service] = freePort()
            lines += [f"frontend {service}", f"  bind 127.0.0.1:{port}", f"  default_backend {service}",
                      f"backend {service}", f"  balance {balance}"]
            lines += [
                f"  server node{n.number} 127.0.0.1:{n.ports[service]} send-proxy-v2 check inter 200ms fall 2"
                for n in self.nodes
            ]
        for node in self.nodes:
            for service in ("imap", "smtp"):
                port = self.frontends[f"{service}{node.number}"] = freePort()
                lines += [f"listen {service}{node.number}", f"  bind 127.0.0.1:{port}",
                          f"  server node{node.number} 127.0.0.1:{node.ports[service]} send-proxy-v2"]
        path = self.folder / "haproxy.cfg"
        path.write_text("\n".join(lines) + "\n")
        self.haproxy = subprocess.Popen(
            ["haproxy", "-f", str(path), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        stopProcess(self.haproxy)
        for node in self.nodes:
            node.stop()
        self.stopRedis()

    def maildir(self, address: str, folder: str = "") -> Path:
        local, _, domain = address.partition("@")
        return self.dataDir / "mail" / domain / local / (f".{folder}" if folder else "")
