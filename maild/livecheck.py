"""
C{maild check --live}: connect to every configured listener of a running
daemon and say, one line each, whether it answers as it should (TLS first
where the listener is implicit TLS).  The exit status tells scripts and
container orchestrators.

This runs in the command-line tool, not in the daemon: blocking sockets
are fine here.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from maild.config import IMPLICIT_TLS, Config

# What each protocol says first, when all is well.
GREETINGS = {
    "smtp": b"220",
    "submission": b"220",
    "smtps": b"220",
    "pop3": b"+OK",
    "pop3s": b"+OK",
    "imap": b"* OK",
    "imaps": b"* OK",
}


@dataclass
class Result:
    name: str
    target: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<10} {self.target:<24} {self.detail}"


def _params(description: str) -> tuple[str, list[str], dict[str, str]]:
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    positional = [p for p in parts[1:] if "=" not in p]
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], positional, named


def connectAddress(description: str) -> tuple[int, object] | None:
    """
    Where to connect to reach a listener: C{(family, address)}, or None
    for endpoints whose address cannot be known from here (systemd:).
    """
    kind, positional, named = _params(description)
    if kind == "haproxy":
        # The PROXY header is the balancer's to send: check the listener
        # behind it directly is not possible, so report what can be.
        return None
    if kind in ("tcp", "tcp6", "ssl"):
        port = int(named.get("port", positional[0] if positional else 0))
        interface = named.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(interface, interface)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, port)
    if kind == "unix":
        return socket.AF_UNIX, named.get("address", positional[0] if positional else "")
    return None


def _fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def checkListener(
    name: str, description: str, certPath: Path | None, timeout: float
) -> Result:
    where = connectAddress(description)
    if where is None:
        return Result(name, description, True, "skipped: the address of this endpoint is not known here")
    family, address = where
    target = f"[{address[0]}]:{address[1]}" if family == socket.AF_INET6 else (
        f"{address[0]}:{address[1]}" if family == socket.AF_INET else str(address)
    )
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        detail = ""
        if name in IMPLICIT_TLS:
            context = ssl.create_default_context()
            # The certificate is compared with the one configured below,
            # which also catches a daemon still serving an old one.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock)
            detail = f"{sock.version()}"
            if certPath is not None:
                from maild.tls import fingerprint

                served = _fingerprint(sock.getpeercert(binary_form=True))
                if served != fingerprint(certPath):
                    return Result(name, target, False, f"serves another certificate than {certPath}")
                detail += ", certificate as configured"
        with sock:
            if name in ("http", "https"):
                sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
                answer = _readAll(sock)
                status = answer.split(b"\r\n", 1)[0]
                ok = status.split(b" ")[1:2] == [b"200"]
                return Result(name, target, ok, _join(status.decode("ascii", "replace"), detail))
            greeting = _readLine(sock)
            ok = greeting.startswith(GREETINGS[name])
            return Result(name, target, ok, _join(greeting.decode("ascii", "replace")[:60], detail))
    except (OSError, ssl.SSLError) as e:
        return Result(name, target, False, str(e) or type(e).__name__)


def _join(first: str, detail: str) -> str:
    return f"{first} ({detail})" if detail else first


def _readLine(sock) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def _readAll(sock) -> bytes:
    data = b""
    while len(data) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def checkLive(config: Config, certPath: Path | None, timeout: float = 5.0) -> list[Result]:
    """
    Check every enabled listener of C{config}.
    """
    return [
        checkListener(name, description, certPath, timeout)
        for name, description in config.enabledListeners().items()
    ]
