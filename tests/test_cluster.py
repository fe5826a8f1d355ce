"""
Several nodes on one data folder behind real HAProxy: mail through the
balancer while IMAP clients on every node change folders, a node killed
in the middle (and, with Redis, Redis killed and brought back); afterwards
every acknowledged message is stored exactly once and every folder's UIDs
are unique and increasing.

One load driver (L{ClusterLoad}) runs in two modes: change notices by
polling (no Redis), and by Redis.  C{MAILD_CLUSTER_MESSAGES} changes the
number of messages (3,000 by default: about ten seconds a mode here).
"""

from __future__ import annotations

import collections
import concurrent.futures
import imaplib
import os
import queue
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

from twisted.trial import unittest

from tests.cluster import Cluster, missing
from tests.support import PASSWORD

USER = "alice@localhost"
# Receives only the IDLE probes: nothing else delivers there.
PROBE_USER = "bob@localhost"
MESSAGES = int(os.environ.get("MAILD_CLUSTER_MESSAGES", "3000"))
SENDERS = 20
# A node polls its watched folders this often while Redis is away
# (maild.store.watch.FolderWatcher's default).
POLL_INTERVAL = 5.0


def uidRecords(folder: Path) -> list[tuple[int, str]]:
    """
    The (UID, base name) records of a folder's dovecot-uidlist, in order.
    """
    path = folder / "dovecot-uidlist"
    records = []
    for line in path.read_text().splitlines()[1:]:
        uid, _, rest = line.partition(" ")
        records.append((int(uid), rest.rpartition(":")[2]))
    return records


def messageIds(folder: Path) -> list[str]:
    found = []
    for sub in ("new", "cur"):
        for path in (folder / sub).iterdir():
            with open(path, "rb") as f:
                head = f.read(4096)
            match = re.search(rb"^Message-ID: <([^>]+)>", head, re.M | re.I)
            if match:
                found.append(match.group(1).decode())
    return found


class IdleProbe:
    """
    An IMAP session in IDLE on one node's INBOX for the whole run, read by
    a thread: every line it gets is queued, and any line that is not an
    untagged EXISTS/RECENT/FETCH/EXPUNGE is an error that reached a client.
    """

    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.errors: list[str] = []
        self._expect(b"* OK")
        self._send(f'a LOGIN "{user}" "{PASSWORD}"'.encode())
        self._untilTagged(b"a OK")
        self._send(b"s SELECT INBOX")
        self._untilTagged(b"s OK")
        self._send(b"i IDLE")
        self._expect(b"+")
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def _expect(self, start: bytes) -> bytes:
        line = self.file.readline()
        assert line.startswith(start), line
        return line

    def _untilTagged(self, ok: bytes) -> None:
        while True:
            line = self.file.readline()
            if not line.startswith(b"* "):
                assert line.startswith(ok), line
                return

    def _read(self) -> None:
        try:
            for line in iter(self.file.readline, b""):
                line = line.rstrip(b"\r\n")
                if not re.fullmatch(rb"\* \d+ (EXISTS|RECENT|EXPUNGE|FETCH .*)", line):
                    self.errors.append(line.decode(errors="replace"))
                self.lines.put(line)
        except OSError:
            pass
        finally:
            self.lines.put(b"")

    def heard(self, deliver, within: float) -> float | None:
        """
        Run C{deliver()} (which returns once the mail is acknowledged) and
        return how long after that the IDLE session heard of a new message,
        or None if it did not within C{within} seconds.
        """
        while not self.lines.empty():
            self.lines.get_nowait()
        deliver()
        acknowledged = time.monotonic()
        deadline = acknowledged + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.endswith(b" EXISTS"):
                return time.monotonic() - acknowledged
            if not line:
                break
        return None

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(10)


class ClusterLoad:
    """
    The load driver: three nodes behind HAProxy, C{MESSAGES} messages sent
    20 at a time through the balanced SMTP port while an IMAP client on
    each node appends, flags and expunges; C{events} (acknowledged count,
    action) run the faults during the load, each in its own thread.

    Errors that reach clients are collected in C{self.errors}: any SMTP
    error reply, any IMAP NO/BAD, and any dropped connection that is not
    the killed node's.
    """

    config = "[store]\nwatch = \"poll\"\n[limits]\nconnections_per_ip = 500\n"
    redis = False

    def setUp(self):
        why = missing("haproxy", *(["redis-server"] if self.redis else []))
        if why:
            raise unittest.SkipTest(why)
        self.cluster = Cluster(
            Path(self.mktemp()).resolve(),
            users={USER: PASSWORD, PROBE_USER: PASSWORD},
            config=self.config,
            redis=self.redis,
        )
        self.cluster.folder.mkdir(parents=True, exist_ok=True)
        self.addCleanup(self.cluster.stop)
        self.cluster.start()
        self.errors: list[str] = []
        self.killed = threading.Event()
        self.actions: list[threading.Thread] = []
        # Message-IDs each IMAP client appended, was told so, and kept.
        self.kept: set[str] = set()
        self.lock = threading.Lock()

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    def killNode2(self) -> None:
        self.killed.set()
        self.cluster.nodes[1].kill()

    def sendAll(self, events: list[tuple[int, object]]) -> set[str]:
        """
        Send the messages through HAProxy; run each event's action once
        its count of messages is acknowledged.  Each try carries its own
        Message-ID; a try that was not acknowledged is tried again under a
        new one.
        """
        acknowledged: set[str] = set()
        attempts = iter(range(10**9))
        pending = sorted(events, key=lambda event: event[0])
        port = self.cluster.frontends["smtp"]

        def sendOne(i: int) -> None:
            for _ in range(20):
                with self.lock:
                    attempt = next(attempts)
                msgid = f"m{i}.a{attempt}@cluster.test"
                body = f"Message-ID: <{msgid}>\r\nSubject: load {i}\r\n\r\nbody {i}\r\n"
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                        s.sendmail("load@remote.test", [USER], body)
                except smtplib.SMTPResponseException as e:
                    # A reply, not a drop: no node may refuse good mail.
                    self.error(f"SMTP {e.smtp_code} {e.smtp_error!r} for message {i}")
                    continue
                except smtplib.SMTPRecipientsRefused as e:
                    self.error(f"SMTP recipients refused {e.recipients!r} for message {i}")
                    continue
                except (smtplib.SMTPException, OSError) as e:
                    # The connection dropped: only the killed node may do that.
                    if not self.killed.is_set():
                        self.error(f"SMTP connection dropped before any kill: {e!r}")
                    time.sleep(0.05)
                    continue
                with self.lock:
                    acknowledged.add(msgid)
                    while pending and len(acknowledged) >= pending[0][0]:
                        _, action = pending.pop(0)
                        thread = threading.Thread(target=self.runAction, args=(action,))
                        thread.start()
                        self.actions.append(thread)
                return
            self.error(f"message {i} never accepted")

        with concurrent.futures.ThreadPoolExecutor(SENDERS) as pool:
            list(pool.map(sendOne, range(MESSAGES)))
        return acknowledged

    def runAction(self, action) -> None:
        try:
            action()
        except Exception as e:
            self.error(f"{getattr(action, '__name__', action)}: {e!r}")

    def imapWorker(self, node: int, stop: threading.Event, counts: dict) -> None:
        """
        Until told to stop: APPEND to Work, flag, expunge half of what this
        client appended, and now and then read the INBOX's UIDs.  The
        client of a killed node connects again through the balancer.
        """
        port = self.cluster.frontends[f"imap{node}"]
        lastUid = 0
        n = 0
        while not stop.is_set():
            try:
                imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
                imap.login(USER, PASSWORD)
                imap.create("Work")  # NO [ALREADYEXISTS] but the first time
                imap.select("Work")
                while not stop.is_set():
                    n += 1
                    msgid = f"w{node}.{n}@cluster.test"
                    message = f"Message-ID: <{msgid}>\r\nSubject: w\r\n\r\nx\r\n".encode()
                    typ, data = imap.append("Work", None, None, message)
                    if typ != "OK":
                        self.error(f"APPEND on node {node}: {typ} {data!r}")
                        continue
                    uid = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
                    if uid <= lastUid:
                        self.error(f"APPENDUID {uid} after {lastUid} on node {node}")
                    lastUid = uid
                    for flags in ["(\\Flagged)"] + (["(\\Deleted)"] if n % 2 else []):
                        typ, data = imap.uid("STORE", str(uid), "+FLAGS", flags)
                        if typ != "OK":
                            self.error(f"STORE on node {node}: {typ} {data!r}")
                    if n % 2:
                        typ, data = imap.expunge()
                        if typ != "OK":
                            self.error(f"EXPUNGE on node {node}: {typ} {data!r}")
                    else:
                        with self.lock:
                            self.kept.add(msgid)
                    if n % 5 == 0:
                        # Every node numbers the INBOX as mail arrives.
                        for typ, data in (imap.select("INBOX", readonly=True),
                                          imap.uid("SEARCH", "ALL"), imap.select("Work")):
                            if typ != "OK":
                                self.error(f"INBOX look on node {node}: {typ} {data!r}")
                    counts[node] = n
                imap.logout()
            except (imaplib.IMAP4.abort, OSError, EOFError) as e:
                if not (self.killed.is_set() and node == 2):
                    self.error(f"IMAP client on node {node} dropped: {e!r}")
                    return
                # Its node is gone: go on wherever HAProxy sends it.
                port = self.cluster.frontends["imap"]
                counts.setdefault(f"droppedAt{node}", n)
                time.sleep(0.05)
            except imaplib.IMAP4.error as e:
                self.error(f"IMAP on node {node}: {e!r}")
                return

    def runLoad(self, events: list[tuple[int, object]]) -> tuple[set[str], dict]:
        stop = threading.Event()
        counts: dict = {}
        clients = [
            threading.Thread(target=self.imapWorker, args=(n, stop, counts)) for n in (1, 2, 3)
        ]
        for client in clients:
            client.start()
        try:
            acknowledged = self.sendAll(events)
        finally:
            for action in self.actions:
                action.join(120)
            stop.set()
            for client in clients:
                client.join(60)
        return acknowledged, counts

    def checkStore(self, acknowledged: set[str], counts: dict) -> None:
        """
        Every acknowledged message is in its Maildir exactly once, nothing
        unacknowledged twice, every folder's UIDs unique and increasing,
        and no error reached a client or a surviving node's log.
        """
        if self.errors:
            # The first few and how many of each kind: a stalled node makes
            # hundreds, and the first ones tell what happened.
            kinds = collections.Counter(re.sub(r"\d+", "N", e) for e in self.errors)
            self.fail(f"{len(self.errors)} errors, first: {self.errors[:10]}; kinds: {kinds.most_common(10)}")
        inbox = self.cluster.maildir(USER)
        stored = messageIds(inbox)
        self.assertEqual(len(stored), len(set(stored)), "a message stored twice")
        self.assertEqual(acknowledged - set(stored), set(), "acknowledged messages lost")
        self.assertEqual({m.split(".a")[0] for m in stored}, {f"m{i}" for i in range(MESSAGES)})
        work = self.cluster.maildir(USER, "Work")
        inWork = messageIds(work)
        self.assertEqual(len(inWork), len(set(inWork)), "an APPEND stored twice")
        self.assertEqual(self.kept - set(inWork), set(), "acknowledged APPENDs lost")
        probed = [self.cluster.maildir(PROBE_USER)] if self.redis else []
        for folder in [inbox, work, *probed]:
            records = uidRecords(folder)
            uids = [uid for uid, _ in records]
            self.assertEqual(uids, sorted(set(uids)), f"UIDs of {folder} not unique and increasing")
            bases = [base for _, base in records]
            self.assertEqual(len(bases), len(set(bases)), f"a file with two UIDs in {folder}")
        for node in (1, 2, 3):
            self.assertGreater(counts.get(node, 0), 0, f"the IMAP client of node {node} did nothing")
        self.assertIn("droppedAt2", counts, "node 2's IMAP client was not dropped by the kill")
        self.assertGreater(counts[2], counts["droppedAt2"], "node 2's IMAP client did not go on elsewhere")
        for node in self.cluster.nodes:
            if node.alive:
                self.assertNotIn("Traceback", node.logText())


class PollModeLoadTests(ClusterLoad, unittest.TestCase):
    """
    Change notices by polling (no Redis).
    """

    def test_loadWithANodeKilled(self):
        """
        3,000 messages through HAProxy while an IMAP client on each node
        appends, flags and expunges; node 2 is killed (SIGKILL) a third of
        the way: the run completes through the other two, every
        acknowledged message is in the INBOX exactly once, no
        unacknowledged one twice, and the UIDs of every folder are unique
        and increasing.
        """
        acknowledged, counts = self.runLoad([(MESSAGES // 3, self.killNode2)])
        self.checkStore(acknowledged, counts)


class RedisModeLoadTests(ClusterLoad, unittest.TestCase):
    """
    Change notices through a real Redis (C{watch = "redis"}: no inotify),
    which is killed and started again during the load.
    """

    config = ClusterLoad.config.replace('"poll"', '"redis"')
    redis = True

    def setUp(self):
        ClusterLoad.setUp(self)
        self.probe = IdleProbe(self.cluster.frontends["imap1"], PROBE_USER)
        self.addCleanup(self.probe.close)
        self.probes = 0

    def deliverThroughNode3(self) -> None:
        self.probes += 1
        with smtplib.SMTP("127.0.0.1", self.cluster.frontends["smtp3"], timeout=30) as s:
            s.sendmail("probe@remote.test", [PROBE_USER], f"Subject: probe {self.probes}\r\n\r\nx\r\n")

    def waitForLogs(self, text: str, counts: dict, timeout: float = 30.0) -> None:
        """
        Wait until every live node's log holds C{text} more often than
        C{counts} (taken before) says.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n.logCount(text) > counts[n.number] for n in self.cluster.nodes if n.alive):
                return
            time.sleep(0.05)
        raise AssertionError(f"not every node logged {text!r}")

    def redisOutage(self) -> None:
        """
        Kill Redis; every node notices, and the IDLE client on node 1 hears
        of mail delivered through node 3 by polling; start Redis again,
        every node comes back to it, and the IDLE client hears of the next
        delivery through node 3 within half a second.
        """
        nodes = self.cluster.nodes
        lost = {n.number: n.logCount("lost Redis") for n in nodes}
        reached = {n.number: n.logCount(" reached") for n in nodes}
        sharing = {n.number: n.logCount("sharing counts as") for n in nodes}
        self.cluster.killRedis()
        self.waitForLogs("lost Redis", lost)
        self.polled = self.probe.heard(self.deliverThroughNode3, within=2 * POLL_INTERVAL + 2)
        self.cluster.startRedis()
        # Back for events (the subscription) and for commands: a node
        # logs that it shares its counts again once its command
        # connection is up.
        self.waitForLogs(" reached", reached)
        self.waitForLogs("sharing counts as", sharing)
        self.afterRestart = self.probe.heard(self.deliverThroughNode3, within=0.5)

    def test_loadWithANodeAndRedisKilled(self):
        """
        With Redis: 3,000 messages through HAProxy while an IMAP client on
        each node appends, flags and expunges; a fifth of the way Redis is
        killed (SIGKILL) and, once an IDLE client on node 1 has heard of
        mail through node 3 by polling, started again; at two thirds node
        2 is killed.  No error reaches any client (SMTP, IMAP, or the IDLE
        session, which stays open throughout), the IDLE client hears of a
        delivery through node 3 within half a second of Redis coming back,
        and the store is as in poll mode: everything acknowledged there
        once, UIDs unique and increasing.
        """
        self.polled = self.afterRestart = None
        acknowledged, counts = self.runLoad(
            [(MESSAGES // 5, self.redisOutage), (MESSAGES * 2 // 3, self.killNode2)]
        )
        self.checkStore(acknowledged, counts)
        self.assertIsNotNone(self.polled, "no fallback to polling while Redis was away")
        self.assertIsNotNone(self.afterRestart, "IDLE on node 1 did not hear node 3 within 0.5 s of Redis's return")
        after = self.probe.heard(self.deliverThroughNode3, within=0.5)
        self.assertIsNotNone(after, "IDLE on node 1 did not hear node 3 within 0.5 s after the load")
        self.assertEqual(self.probe.errors, [])
