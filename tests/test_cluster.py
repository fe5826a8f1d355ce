"""
Several nodes on one data folder behind real HAProxy: mail through the
balancer while IMAP clients on every node change folders, a node killed
in the middle; afterwards every acknowledged message is stored exactly
once and every folder's UIDs are unique and increasing.
"""

from __future__ import annotations

import concurrent.futures
import imaplib
import re
import smtplib
import threading
import time
from pathlib import Path

from twisted.trial import unittest

from tests.cluster import Cluster, missing
from tests.support import PASSWORD

USER = "alice@localhost"


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


class ClusterLoadTests(unittest.TestCase):
    """
    Three nodes, HAProxy in front, the store shared; change notices by
    polling (no Redis).
    """

    config = '[store]\nwatch = "poll"\n[limits]\nconnections_per_ip = 500\n'
    messages = 3000

    def setUp(self):
        why = missing("haproxy")
        if why:
            raise unittest.SkipTest(why)
        self.cluster = Cluster(Path(self.mktemp()).resolve(), users={USER: PASSWORD}, config=self.config)
        self.cluster.folder.mkdir(parents=True, exist_ok=True)
        self.addCleanup(self.cluster.stop)
        self.cluster.start()

    def sendAll(self, killAt: int) -> tuple[set[str], int]:
        """
        Send the messages through HAProxy, 20 at a time; kill node 2 once
        C{killAt} have been acknowledged.  Each try carries its own
        Message-ID; a failed try is tried again under a new one.
        """
        acknowledged: set[str] = set()
        lock = threading.Lock()
        attempts = iter(range(10**9))
        port = self.cluster.frontends["smtp"]

        def sendOne(i: int) -> None:
            for _ in range(20):
                with lock:
                    attempt = next(attempts)
                msgid = f"m{i}.a{attempt}@cluster.test"
                body = f"Message-ID: <{msgid}>\r\nSubject: load {i}\r\n\r\nbody {i}\r\n"
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                        s.sendmail("load@remote.test", [USER], body)
                except (smtplib.SMTPException, OSError):
                    time.sleep(0.05)
                    continue
                with lock:
                    acknowledged.add(msgid)
                    if len(acknowledged) == killAt:
                        self.cluster.nodes[1].kill()
                return
            raise AssertionError(f"message {i} never accepted")

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            list(pool.map(sendOne, range(self.messages)))
        return acknowledged, next(attempts)

    def imapWorker(self, node: int, stop: threading.Event, counts: dict) -> None:
        """
        Until told to stop: APPEND to Work, flag, expunge half of what this
        client appended, and now and then read the INBOX's UIDs.
        """
        try:
            imap = imaplib.IMAP4("127.0.0.1", self.cluster.frontends[f"imap{node}"], timeout=30)
            imap.login(USER, PASSWORD)
            imap.create("Work")
            imap.select("Work")
            n = 0
            while not stop.is_set():
                n += 1
                message = f"Message-ID: <w{node}.{n}@cluster.test>\r\nSubject: w\r\n\r\nx\r\n".encode()
                typ, data = imap.append("Work", None, None, message)
                assert typ == "OK", data
                uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
                imap.uid("STORE", uid, "+FLAGS", "(\\Flagged)")
                if n % 2:
                    imap.uid("STORE", uid, "+FLAGS", "(\\Deleted)")
                    imap.expunge()
                if n % 5 == 0:
                    # Every node numbers the INBOX as mail arrives.
                    imap.select("INBOX", readonly=True)
                    imap.uid("SEARCH", "ALL")
                    imap.select("Work")
                counts[node] = n
            imap.logout()
        except (imaplib.IMAP4.abort, OSError, EOFError):
            # Node 2 is killed under its client.
            counts.setdefault(f"dropped{node}", True)

    def test_loadWithANodeKilled(self):
        """
        3,000 messages through HAProxy while an IMAP client on each node
        appends, flags and expunges; node 2 is killed a third of the way:
        the run completes through the other two, every acknowledged message
        is in the INBOX exactly once, no unacknowledged one twice, and the
        UIDs of every folder are unique and increasing.
        """
        stop = threading.Event()
        counts: dict = {}
        clients = [
            threading.Thread(target=self.imapWorker, args=(n, stop, counts)) for n in (1, 2, 3)
        ]
        for client in clients:
            client.start()
        try:
            acknowledged, _ = self.sendAll(killAt=self.messages // 3)
        finally:
            stop.set()
            for client in clients:
                client.join(60)
        inbox = self.cluster.maildir(USER)
        stored = messageIds(inbox)
        self.assertEqual(len(stored), len(set(stored)), "a message stored twice")
        self.assertEqual(acknowledged - set(stored), set(), "acknowledged messages lost")
        self.assertEqual({m.split(".a")[0] for m in stored}, {f"m{i}" for i in range(self.messages)})
        for folder in (inbox, self.cluster.maildir(USER, "Work")):
            records = uidRecords(folder)
            uids = [uid for uid, _ in records]
            self.assertEqual(uids, sorted(set(uids)), f"UIDs of {folder.name} not unique and increasing")
            bases = [base for _, base in records]
            self.assertEqual(len(bases), len(set(bases)), f"a file with two UIDs in {folder.name}")
        self.assertGreater(counts.get(1, 0), 0)
        self.assertGreater(counts.get(3, 0), 0)
        for node in (self.cluster.nodes[0], self.cluster.nodes[2]):
            self.assertNotIn("Traceback", node.logText())
