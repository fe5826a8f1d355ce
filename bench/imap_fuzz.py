#!/usr/bin/env python3
"""
IMAP fuzzer (issue 9): random and malformed commands, before and after
login, against a daemon started here on loopback ports chosen by the
system, while another session expunges, moves, renames and deletes the
folders the fuzzing sessions use.

The daemon runs in this process so that it can be measured from the
inside: the reactor thread's CPU time for each batch of input it handles
(``dataReceived``, which runs every command framed from it), each turn
of a streamed response and each step of a cooperative command, the reactor's lateness on a 50 ms timer, the
process's memory, and every failure or error it logs.  The clients run in
a second process (this script with ``--client``), so they do not share
the daemon's interpreter lock.

Example (20 minutes, at low priority)::

    PYTHONPATH=. nice python bench/imap_fuzz.py --minutes 20 --out /tmp/imapfuzz

It prints a JSON report (also written to OUT/report.json): cases run,
replies by kind, commands that got no reply, internal errors, the longest
reactor times and what caused them, memory over time.  The daemon's log is
OUT/daemon.log; inputs that met an internal error or no reply are kept in
OUT/cases-*.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PASSWORD = "fuzz password"
USER = "fuzz@localhost"
MAX_MINUTES = 120
FOLDERS = [b"INBOX", b"Churn0", b"Churn1", b"Churn2", b"Churn0/Sub", b"Archive", b"Trash"]


# Hostile messages: delivered at the start and appended by the churn session.


def deepFrom() -> bytes:
    return b"From: " + b"(" * 3000 + b"x\r\nTo: fuzz@localhost\r\nSubject: deep from\r\n\r\nbody\r\n"


def deepMultipart(depth: int = 600) -> bytes:
    out = [b"From: a@example.org\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\nleaf\r\n")
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"".join(out)


def plainMessage(r: random.Random) -> bytes:
    words = [r.choice([b"alpha", b"beta", b"\xc3\xa9t\xc3\xa9", b"gamma", b"(x)", b'"q"']) for _ in range(r.randint(1, 40))]
    return (
        b"From: Someone <some@example.org>\r\nTo: fuzz@localhost\r\nSubject: %s\r\n"
        b"Date: %d Feb 2026 10:00:00 +0000\r\nMessage-ID: <%d@x>\r\n\r\n%s\r\n"
        % (b" ".join(words[:5]), r.randint(0, 40), r.getrandbits(32), b" ".join(words))
    )


def messages(r: random.Random) -> bytes:
    roll = r.random()
    if roll < 0.05:
        return deepFrom()
    if roll < 0.08:
        return deepMultipart(r.choice([60, 600]))
    return plainMessage(r)


# Command generation -----------------------------------------------------------


class Lit:
    """
    A literal in a generated command.
    """

    def __init__(self, data: bytes, sync: bool, announced: int | None = None) -> None:
        self.data = data
        self.sync = sync
        self.announced = len(data) if announced is None else announced


def number(r: random.Random) -> bytes:
    roll = r.random()
    if roll < 0.6:
        return b"%d" % r.randint(1, 30)
    if roll < 0.75:
        return b"*"
    if roll < 0.85:
        return b"%d" % r.choice([0, 4294967295, 4294967296, 2**64])
    if roll < 0.95:
        return b"9" * r.choice([11, 20, 5000])
    return b"0" * r.randint(1, 50) + b"1"


def sequenceSet(r: random.Random) -> bytes:
    parts = []
    for _ in range(r.choice([1, 1, 2, 5, 300])):
        parts.append(number(r) if r.random() < 0.5 else number(r) + b":" + number(r))
    joined = b",".join(parts)
    return joined if r.random() > 0.05 else joined + r.choice([b",", b":", b"x", b"-1"])


def mailbox(r: random.Random):
    roll = r.random()
    if roll < 0.7:
        name = r.choice(FOLDERS)
    elif roll < 0.8:
        name = r.choice([b"&2AA-", b"&3AA-x", b"&AGE-", b"a/&2ADYAA-", b"&-", b"&Jjo-", b"&"])
    elif roll < 0.9:
        name = r.choice([b"..", b"a/../b", b".hidden", b"x/", b"/x", b"a//b", b"*", b"%", b"a\x00b", b"Tr\xc3\xa9s"])
    else:
        name = bytes(r.randint(32, 126) for _ in range(r.randint(0, 30)))
    return string(r, name)


def string(r: random.Random, value: bytes):
    roll = r.random()
    if roll < 0.15:
        return Lit(value, sync=r.random() < 0.5)
    if roll < 0.6 and value and all(c > 32 and c < 127 and c not in b'(){%*"\\]' for c in value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def date(r: random.Random, time_: bool) -> bytes:
    day = r.choice([b"1", b" 7", b"07", b"31", b"0", b"32", b"9" * 50])
    month = r.choice([b"Jan", b"Feb", b"feb", b"Foo", b""])
    year = r.choice([b"2020", b"1969", b"99999", b"0000", b"1"])
    if not time_:
        return day.strip() + b"-" + month + b"-" + year
    clock = r.choice([b"10:00:00", b"25:61:61", b"23:59:60", b"999999999999999999999999:00:00", b"1:2:3"])
    zone = r.choice([b"+0000", b"-0700", b"+0099", b"+9999", b"0000", b"+" + b"9" * 40])
    return b'"' + day + b"-" + month + b"-" + year + b" " + clock + b" " + zone + b'"'


def flagList(r: random.Random) -> list:
    names = [
        b"\\Seen", b"\\Deleted", b"\\Flagged", b"\\Answered", b"\\Draft", b"\\Recent", b"\\Bogus",
        b"$Label1", b"Junk", b'a"b', b"x\\y", b"a]b%*", b"\xe9t\xe9", b"k%d" % r.randint(0, 40),
    ]
    return [r.choice(names) for _ in range(r.randint(0, 4))]


def fetchAtts(r: random.Random):
    atts = [
        b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODYSTRUCTURE", b"BODY",
        b"BODY.PEEK[]", b"BODY[HEADER]", b"BODY.PEEK[TEXT]<0.100>", b"BODY[1]", b"BODY[1.2.3]",
        b"BODY[1.MIME]", b"BODY.PEEK[HEADER.FIELDS (From Subject)]", b"BODY[HEADER.FIELDS.NOT (To)]",
        b"BODY[]<" + number(r) + b"." + number(r) + b">", b"BODY[" + number(r) + b"]", b"RFC822",
        b"BODY[MIME]", b"BODY[HEADER.FIELDS ()]", b"NOSUCH",
    ]
    roll = r.random()
    if roll < 0.2:
        return r.choice([b"ALL", b"FAST", b"FULL"])
    if roll < 0.3:
        return r.choice(atts)
    return [r.choice(atts) for _ in range(r.randint(0, 5))]


def searchProgram(r: random.Random, depth: int = 0) -> list:
    simple = [
        [b"ALL"], [b"SEEN"], [b"UNSEEN"], [b"NEW"], [b"RECENT"], [b"DELETED"], [b"KEYWORD", b"Junk"],
        [b"KEYWORD", b'a"b'], [b"LARGER", number(r)], [b"SMALLER", number(r)], [b"UID", sequenceSet(r)],
        [sequenceSet(r)], [b"FROM", string(r, b"some")], [b"SUBJECT", string(r, b"\xc3\xa9t\xc3\xa9")],
        [b"BODY", string(r, b"leaf")], [b"TEXT", string(r, b"alpha")], [b"HEADER", b"Message-ID", b'""'],
        [r.choice([b"SINCE", b"BEFORE", b"ON", b"SENTON", b"SENTSINCE"]), date(r, False)], [b"BOGUS"],
    ]
    roll = r.random()
    if depth > 3 or roll < 0.5:
        return r.choice(simple)
    if roll < 0.6:
        return [b"NOT"] + searchProgram(r, depth + 1)
    if roll < 0.7:
        return [b"OR"] + searchProgram(r, depth + 1) + searchProgram(r, depth + 1)
    if roll < 0.8:
        return [searchProgram(r, depth + 1) + searchProgram(r, depth + 1)]
    if roll < 0.85:
        return [b"NOT"] * r.choice([100, 2000, 2001]) + [b"ALL"]
    if roll < 0.9:
        return [b"OR", b"ALL"] * r.choice([100, 2000]) + [b"ALL"]
    if roll < 0.95:
        return [b"NOT", b"OR", b"ALL"] * r.choice([30, 70, 1000]) + [b"ALL"]
    return [b"CHARSET", r.choice([b"UTF-8", b"KOI8-R", b"x"])] + searchProgram(r, depth + 1)


def command(r: random.Random, loggedIn: bool) -> list:
    """
    One command's tokens (bytes, lists, Lit), without its tag.
    """
    names = [
        b"NOOP", b"CAPABILITY", b"LOGIN", b"AUTHENTICATE", b"ID", b"STARTTLS", b"SELECT", b"EXAMINE",
        b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE", b"LIST", b"LSUB", b"STATUS",
        b"APPEND", b"IDLE", b"CHECK", b"CLOSE", b"UNSELECT", b"EXPUNGE", b"SEARCH", b"FETCH", b"STORE",
        b"COPY", b"MOVE", b"UID", b"ENABLE", b"NAMESPACE", b"BOGUS", b"LOGOUT",
    ]
    weights = [3, 1, 3, 3, 1, 1, 6, 2, 3, 2, 2, 1, 1, 4, 2, 3, 5, 3, 1, 2, 2, 3, 8, 10, 6, 3, 3, 6, 1, 1, 1, 0.05]
    name = r.choices(names, weights)[0]
    if name == b"UID":
        sub = r.choice([b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE", b"FROB"])
        rest = command_args(r, sub)
        return [b"UID", sub] + rest
    return [name] + command_args(r, name)


def command_args(r: random.Random, name: bytes) -> list:
    if name == b"LOGIN":
        user = USER.encode() if r.random() < 0.5 else b"x{1+}" if r.random() < 0.2 else b"nobody@localhost"
        password = PASSWORD.encode() if r.random() < 0.5 else bytes(r.randint(33, 126) for _ in range(8))
        return [string(r, user), string(r, password)]
    if name == b"AUTHENTICATE":
        return r.choice([[b"PLAIN"], [b"PLAIN", b"="], [b"PLAIN", [b"x"]], [b"PLAIN", Lit(b"AAAA", False)], [b"X"], []])
    if name in (b"SELECT", b"EXAMINE", b"CREATE", b"DELETE", b"SUBSCRIBE", b"UNSUBSCRIBE"):
        return [mailbox(r)]
    if name == b"RENAME":
        return [mailbox(r), mailbox(r)]
    if name in (b"LIST", b"LSUB"):
        pattern = r.choice([b"*", b"%", b"%/%", b"*" * 50 + b"x", b"%*" * 40 + b"y", b"a" * 2000, b"INBOX*", b"&2AA-"])
        return [string(r, r.choice([b"", b"Churn0", b"&2AA-"])), string(r, pattern)]
    if name == b"STATUS":
        return [mailbox(r), [r.choice([b"MESSAGES", b"UIDNEXT", b"UNSEEN", b"RECENT", b"UIDVALIDITY", b"BOGUS"]) for _ in range(r.randint(0, 3))]]
    if name == b"APPEND":
        args = [mailbox(r)]
        if r.random() < 0.4:
            args.append(flagList(r))
        if r.random() < 0.4:
            args.append(date(r, True))
        count = 1 if r.random() < 0.9 else r.randint(2, 4)
        for _ in range(count):
            data = messages(r)
            if r.random() < 0.03:
                args.append(Lit(b"", False, announced=r.choice([10**20 - 1, 2**32, 30 * 1024 * 1024])))
                break
            args.append(Lit(data, sync=r.random() < 0.5))
        return args
    if name == b"SEARCH":
        return searchProgram(r)
    if name == b"FETCH":
        return [sequenceSet(r), fetchAtts(r)]
    if name == b"STORE":
        item = r.choice([b"FLAGS", b"+FLAGS", b"-FLAGS.SILENT", b"+FLAGS.SILENT", b"BOGUS"])
        return [sequenceSet(r), item, flagList(r)]
    if name in (b"COPY", b"MOVE"):
        return [sequenceSet(r), mailbox(r)]
    if name == b"EXPUNGE":
        return [sequenceSet(r)] if r.random() < 0.3 else []
    if name == b"ID":
        return r.choice([[b"NIL"], [[b'"name"', b'"fuzz"']], [[Lit(b"name", False), b'"x"']], []])
    if name == b"ENABLE":
        return [b"CONDSTORE"]
    return [] if r.random() < 0.9 else [b"junk"]


def flatten(tokens: list) -> list:
    """
    The command as pieces to send: bytes, and Lit where a literal goes.
    """
    out: list = []

    def add(token, first: bool) -> None:
        if not first:
            out.append(b" ")
        if isinstance(token, list):
            out.append(b"(")
            for i, t in enumerate(token):
                add(t, i == 0)
            out.append(b")")
        else:
            out.append(token)

    for i, token in enumerate(tokens):
        add(token, i == 0)
    return out


def mutate(r: random.Random, pieces: list) -> list:
    """
    Damage one piece of text: the framing of literals is kept, so that the
    server and the client still agree where the command ends.
    """
    texts = [i for i, p in enumerate(pieces) if isinstance(p, bytes) and p]
    if not texts:
        return pieces
    i = r.choice(texts)
    p = bytearray(pieces[i])
    roll = r.random()
    at = r.randrange(len(p) + 1)
    if roll < 0.25:
        p[at:at] = bytes(r.randrange(1, 256) for _ in range(r.randint(1, 4))).replace(b"\n", b"").replace(b"\r", b"")
    elif roll < 0.4:
        del p[at : at + r.randint(1, 3)]
    elif roll < 0.55:
        # (A literal marker only where text follows: one at the end of the
        # line would announce data this client never sends.)
        p[at:at] = r.choice([b"(", b")", b'"', b"\\", b"[", b"]", b"{", b"}", b"%", b"*", b"{1+}x"])
    elif roll < 0.7:
        p[at:at] = b"(" * r.choice([20, 1000]) + b")" * r.choice([0, 20, 1000])
    elif roll < 0.85:
        p[at:at] = b"x" * r.choice([100, 70000])
    else:
        p = p.swapcase()
    pieces = list(pieces)
    pieces[i] = bytes(p)
    return pieces


# The client side ----------------------------------------------------------------


class Session:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.readLine()

    def readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def readResponse(self) -> bytes:
        line = self.readLine()
        while line.endswith(b"}") and b"{" in line:
            size = line[line.rindex(b"{") + 1 : -1]
            if not size.isdigit():
                break
            need = int(size)
            while len(self.buffer) < need:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise EOFError
                self.buffer += chunk
            self.buffer = self.buffer[need:]
            line = line + b"..." + self.readLine()
        return line

    def close(self) -> None:
        self.sock.close()


class Outcome(Exception):
    def __init__(self, kind: str) -> None:
        self.kind = kind


def runCase(session: Session, r: random.Random, tag: bytes, pieces: list, sent: list) -> str:
    """
    Send one command and read up to its tagged reply: the reply's kind.
    """
    line = tag + b" "
    for piece in pieces:
        if isinstance(piece, Lit):
            line += b"{%d%s}\r\n" % (piece.announced, b"" if piece.sync else b"+")
            session.sock.sendall(line)
            sent.append(line)
            line = b""
            if piece.sync:
                reply = session.readResponse()
                while reply.startswith(b"* ") and not reply.startswith(b"* BYE"):
                    # Another session's changes (EXISTS, EXPUNGE) may come first.
                    reply = session.readResponse()
                if not reply.startswith(b"+"):
                    return classify(reply, tag)
            if piece.announced != len(piece.data):
                # A literal too big to send: the server must refuse it.
                return readTagged(session, r, tag)
            session.sock.sendall(piece.data)
            sent.append(piece.data[:200])
        else:
            line += piece
    line += b"\r\n"
    # Sent in pieces now and then: framing must not depend on the cuts.
    if r.random() < 0.1 and len(line) > 2:
        cut = r.randrange(1, len(line))
        session.sock.sendall(line[:cut])
        session.sock.sendall(line[cut:])
    else:
        session.sock.sendall(line)
    sent.append(line[:2000])
    return readTagged(session, r, tag)


def readTagged(session: Session, r: random.Random, tag: bytes) -> str:
    while True:
        reply = session.readResponse()
        if reply.startswith(tag + b" ") or reply.startswith(b"* BYE"):
            return classify(reply, tag)
        if reply.startswith(b"+"):
            # IDLE or an AUTHENTICATE challenge.
            answer = r.choice([b"DONE", b"DONE", b"done", b"DONE {5+}\r\nb NOOP", b"*", b"AGZ1enpAbG9jYWxob3N0AGZ1enogcGFzc3dvcmQ=", b"x{1+}\r\nX"])
            session.sock.sendall(answer + b"\r\n")


def classify(reply: bytes, tag: bytes) -> str:
    if b"SERVERBUG" in reply:
        return "serverbug"
    if reply.startswith(b"* BYE"):
        return "bye"
    if reply.startswith(tag + b" "):
        word = reply[len(tag) + 1 :].split(b" ", 1)[0]
        return word.decode("ascii", "replace").lower()
    return "other"


def fuzzWorker(port, deadline, seed, loggedIn, stats, lock, out: Path, name: str) -> None:
    r = random.Random(seed)
    session = None
    previous = b""
    n = 0
    while time.monotonic() < deadline:
        try:
            if session is None:
                previous = b""
                session = Session(port, timeout=20)
                if loggedIn:
                    session.sock.sendall(b'L LOGIN "%s" "%s"\r\n' % (USER.encode(), PASSWORD.encode()))
                    readTagged(session, r, b"L")
                    if r.random() < 0.8:
                        session.sock.sendall(b"S SELECT " + r.choice(FOLDERS) + b"\r\n")
                        readTagged(session, r, b"S")
            n += 1
            tag = b"t%d" % n
            pieces = flatten(command(r, loggedIn))
            if r.random() < 0.25:
                pieces = mutate(r, pieces)
            sent: list = []
            try:
                kind = runCase(session, r, tag, pieces, sent)
            except socket.timeout:
                kind = "noreply"
            except (EOFError, ConnectionError):
                kind = "closed"
            with lock:
                stats[kind] = stats.get(kind, 0) + 1
                stats["cases"] = stats.get("cases", 0) + 1
            if kind in ("serverbug", "noreply", "other"):
                with open(out / f"cases-{kind}.txt", "ab") as f:
                    f.write(b"== %s %s after: %s\n" % (name.encode(), tag, previous[:300]) + b"".join(sent)[:4000] + b"\n")
            previous = b"".join(sent)
            if kind in ("bye", "closed", "noreply", "other"):
                session.close()
                session = None
        except (OSError, EOFError):
            session = None
            time.sleep(0.05)
    if session is not None:
        session.close()


def churnWorker(port, deadline, seed, stats, lock) -> None:
    """
    Another session on the same folders: creates, appends, expunges,
    moves, renames and deletes.
    """
    r = random.Random(seed)
    session = None
    n = 0
    while time.monotonic() < deadline:
        try:
            if session is None:
                session = Session(port, timeout=30)
                session.sock.sendall(b'L LOGIN "%s" "%s"\r\n' % (USER.encode(), PASSWORD.encode()))
                readTagged(session, r, b"L")
            n += 1
            tag = b"c%d" % n
            folder = r.choice(FOLDERS[1:5])
            other = r.choice(FOLDERS[1:5])
            op = r.choice(["create", "append", "append", "select", "expunge", "move", "rename", "delete", "inbox"])
            if op == "create":
                line = b"%s CREATE %s\r\n" % (tag, folder)
            elif op == "append":
                data = messages(r)
                line = b"%s APPEND %s {%d+}\r\n%s\r\n" % (tag, r.choice([folder, b"INBOX"]), len(data), data)
            elif op == "select":
                line = b"%s SELECT %s\r\n" % (tag, r.choice([folder, b"INBOX"]))
            elif op == "expunge":
                line = b"%s STORE 1:%d +FLAGS.SILENT (\\Deleted)\r\n%s EXPUNGE\r\n" % (tag, r.randint(1, 5), tag + b"x")
            elif op == "move":
                line = b"%s MOVE 1:%d %s\r\n" % (tag, r.randint(1, 3), other)
            elif op == "rename":
                line = b"%s RENAME %s %s\r\n" % (tag, folder, other)
            elif op == "delete":
                line = b"%s DELETE %s\r\n" % (tag, folder)
            else:
                # Keep INBOX small enough that FETCH 1:* stays a fair test.
                line = b"%s SELECT INBOX\r\n%s STORE 200:* +FLAGS.SILENT (\\Deleted)\r\n%s EXPUNGE\r\n" % (tag, tag + b"s", tag + b"x")
            session.sock.sendall(line)
            kind = readTagged(session, r, tag)
            for extra in (b"s", b"x"):
                if tag + extra in line:
                    kind = readTagged(session, r, tag + extra)
            with lock:
                stats["churn_" + kind] = stats.get("churn_" + kind, 0) + 1
            if kind == "bye":
                session.close()
                session = None
        except (OSError, EOFError):
            session = None
            time.sleep(0.05)


def client(args) -> None:
    deadline = time.monotonic() + args.seconds
    stats: dict = {}
    lock = threading.Lock()
    out = Path(args.out)
    threads = []
    for i in range(args.workers):
        loggedIn = i % 3 != 0
        name = f"{'auth' if loggedIn else 'anon'}{i}"
        threads.append(threading.Thread(target=fuzzWorker, args=(args.port, deadline, args.seed * 1000 + i, loggedIn, stats, lock, out, name)))
    threads.append(threading.Thread(target=churnWorker, args=(args.port, deadline, args.seed * 1000 + 999, stats, lock)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(stats))


# The daemon side ------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def daemon(args) -> None:
    import bcrypt
    from twisted.internet import defer, reactor, task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from maild.config import PROTOCOLS, loadConfig
    from maild.imap import producer, server
    from maild.service import MailService

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("cases-*.txt"):
        old.unlink()
    data = Path(tempfile.mkdtemp(prefix="imapfuzz-"))
    hashed = "{BLF-CRYPT}" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (data / "users").write_text(f"{USER}:{hashed}\n")

    failures = []

    def watchFailures(event):
        if event.get("log_failure") is not None or event.get("log_level").name in ("error", "critical"):
            failures.append(event.get("log_format", "")[:200])

    logFile = open(out / "daemon.log", "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(logFile), watchFailures], redirectStandardIO=False)

    slowest: list = []
    lock = threading.Lock()

    def timed(method, describe):
        def wrapper(self, *a):
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return method(self, *a)
            finally:
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                if len(slowest) < 20 or cpu > slowest[-1][0]:
                    with lock:
                        slowest.append((cpu, wall, describe(self, *a)))
                        slowest.sort(key=lambda x: -x[0])
                        del slowest[20:]

        return wrapper

    server.IMAPServer.dataReceived = timed(server.IMAPServer.dataReceived, lambda s, d: d[:100].decode("latin-1"))
    producer.ResponseProducer._produce = timed(producer.ResponseProducer._produce, lambda s: "response turn")
    realCooperate = task.cooperate

    def timedSteps(iterator):
        # SEARCH and big STOREs run in steps between other sessions' turns.
        step = timed(lambda _, it: next(it), lambda _, it: "cooperative step (SEARCH, STORE)")
        iterator = iter(iterator)
        while True:
            try:
                yield step(None, iterator)
            except StopIteration:
                return

    task.cooperate = lambda iterator: realCooperate(timedSteps(iterator))

    config = loadConfig(
        None,
        {
            "data_dir": data,
            "hostname": "fuzz.test",
            "domains": ["localhost"],
            "listeners": {name: ("tcp:0:interface=127.0.0.1" if name == "imap" else "none") for name in PROTOCOLS},
            "limits": {"auth_failure_delay": 0.01, "auth_failure_delay_max": 0.02, "auth_failures_per_connection": 50},
        },
    )
    service = MailService(config, reactor)
    lateness = {"max": 0.0, "over100ms": 0}
    memory: list = []
    result: dict = {}

    def probe():
        now = time.monotonic()
        late = now - probe.expected
        probe.expected = now + 0.05
        lateness["max"] = max(lateness["max"], late)
        if late > 0.1:
            lateness["over100ms"] += 1

    probe.expected = time.monotonic() + 0.05

    @defer.inlineCallbacks
    def run():
        service.startService()
        yield defer.gatherResults([lst.ready for lst in service.listeners.values()])
        store = service.store
        r = random.Random(args.seed)
        for message in [deepFrom(), deepMultipart(), *(plainMessage(r) for _ in range(30))]:
            incoming = store.incoming()
            incoming.write(message)
            yield store.deliver(incoming, [USER])
        task.LoopingCall(probe).start(0.05, now=False)
        task.LoopingCall(lambda: memory.append((round(time.monotonic() - start), rss()))).start(10)
        port = service.port("imap")
        proc = subprocess.Popen(
            [sys.executable, __file__, "--client", "--port", str(port), "--seconds", str(args.seconds),
             "--seed", str(args.seed), "--workers", str(args.workers), "--out", str(out)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        from twisted.internet import threads

        stdout, _ = yield threads.deferToThread(proc.communicate)
        result["clients"] = json.loads(stdout or b"{}")
        yield service.stopService()

    start = time.monotonic()
    d = run()
    d.addErrback(lambda f: result.setdefault("error", f.getTraceback()))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    logFile.close()
    shutil.rmtree(data, ignore_errors=True)
    log = (out / "daemon.log").read_text(errors="replace")
    result.update(
        {
            "seconds": round(time.monotonic() - start),
            "tracebacks_in_log": log.count("Traceback"),
            "failures_logged": len(failures),
            "failure_samples": failures[:10],
            "slowest_reactor_cpu_ms": [(round(c * 1000, 1), round(w * 1000, 1), what) for c, w, what in slowest[:8]],
            "over_100ms_cpu": sum(1 for c, _, _ in slowest if c > 0.1),
            "timer_lateness_max_ms": round(lateness["max"] * 1000, 1),
            "timer_late_over_100ms": lateness["over100ms"],
            "rss_mb": memory,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        }
    )
    text = json.dumps(result, indent=1)
    (out / "report.json").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--out", default="imapfuzz-out")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args)
        return
    args.seconds = min(args.minutes, MAX_MINUTES) * 60
    daemon(args)


if __name__ == "__main__":
    main()
