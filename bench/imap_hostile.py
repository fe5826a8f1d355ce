#!/usr/bin/env python3
"""
Times the hostile IMAP commands of issue 9 against a server (maild, or a
peer such as Dovecot for comparison), standard library only: each case's
first reply line and the seconds until it came (or the connection closed),
and how long a NOOP on a second connection waited meanwhile.

Example::

    python bench/imap_hostile.py --server 127.0.0.1:8143 --user u@localhost --password pw

Loopback servers only: the cases are meant to hurt.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import threading
import time


class Connection:
    def __init__(self, host: str, port: int, login: tuple[str, str] | None) -> None:
        self.sock = socket.create_connection((host, port), timeout=120)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()
        if login:
            self.sock.sendall(b'L LOGIN "%s" "%s"\r\n' % (login[0].encode(), login[1].encode()))
            self.reply(b"L")

    def reply(self, tag: bytes) -> bytes:
        """
        The tagged reply (or BYE, or the close) that ends the case.
        """
        for line in self.reader:
            if line.startswith(tag + b" ") or line.startswith(b"* BYE"):
                return line.strip()
        return b"(closed)"

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


CASES = {
    "list_50_stars": (True, lambda: [b'a LIST "" "' + b"*" * 50 + b'x"\r\n']),
    "preauth_20000_empty_literals": (False, lambda: [b"a LOGIN" + b" {0+}\r\n" * 20000 + b"\r\n"]),
    "postauth_20000_empty_literals": (True, lambda: [b"a NOOP" + b" {0+}\r\n" * 20000 + b"\r\n"]),
    "search_not_2000": (True, lambda: [b"s SELECT INBOX\r\n", b"a SEARCH " + b"NOT " * 2000 + b"ALL\r\n"]),
    "search_or_2000": (True, lambda: [b"s SELECT INBOX\r\n", b"a SEARCH " + b"OR ALL " * 2000 + b"ALL\r\n"]),
    "fetch_5000_digits": (True, lambda: [b"s SELECT INBOX\r\n", b"a FETCH " + b"9" * 5000 + b" FLAGS\r\n"]),
    "literal_1e20_after_login": (True, lambda: [b"a SELECT {99999999999999999999+}\r\n" + b"x" * 1000]),
}


def run(host: str, port: int, user: str, password: str) -> dict:
    results = {}
    for name, (login, pieces) in CASES.items():
        conn = Connection(host, port, (user, password) if login else None)
        waited: list[float] = []

        def probe():
            # Another client, during the case: how long its NOOP waits.
            other = Connection(host, port, None)
            start = time.perf_counter()
            other.sock.sendall(b"p NOOP\r\n")
            other.reply(b"p")
            waited.append(time.perf_counter() - start)
            other.close()

        start = time.perf_counter()
        for piece in pieces():
            conn.sock.sendall(piece)
        prober = threading.Thread(target=probe)
        prober.start()
        reply = conn.reply(b"a")
        elapsed = time.perf_counter() - start
        prober.join()
        conn.close()
        results[name] = {"seconds": round(elapsed, 3), "reply": reply[:80].decode("latin-1"), "other_noop_s": round(waited[0], 3)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="host:port (loopback)")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        parser.error("loopback servers only")
    print(json.dumps(run(host, int(port), args.user, args.password), indent=1))


if __name__ == "__main__":
    main()
