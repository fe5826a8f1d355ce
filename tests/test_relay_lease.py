"""
One outbound queue, several senders: two maild processes (twistd, as
C{--workers} or two nodes on shared storage run them) on one data folder
of A (a.test), sending to a maild B (b.test, in this process) through a
route.  Each message reaches B exactly once; one whose sender died (kill
-9), even in the middle of an attempt, is sent by the other, after the
Redis lease runs out when there is one.
"""

from __future__ import annotations

import collections
import email
import json
import os
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.trial import unittest

from maild.cluster.leases import Leases
from maild.relay.rates import RecipientCounts
from maild.store.locking import tryLockOpenFile
from tests import test_relay
from tests.cluster import ROOT, DaemonProcess, waitForPort
from tests.support import PASSWORD, freePort, writeUsers
from tests.test_redis import startRedis

ALICE, BOB = test_relay.ALICE, test_relay.BOB
class Sender(DaemonProcess):
    """
    One maild process of A: submission on loopback, sending through the
    shared queue.
    """

    def __init__(self, number: int, folder: Path, config: Path) -> None:
        self.number = number
        self.config = config
        self.port = freePort()
        self.log = folder / f"a{number}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        listeners = [f"--{name}=none" for name in ("smtp", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")]
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile", str(self.log), "maild", "--config", str(self.config),
             f"--submission=tcp:{self.port}:interface=127.0.0.1", *listeners],
            cwd=self.config.parent,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        waitForPort(self.port, process=self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def deliveries(self) -> list[str]:
        return [line for line in self.logText().splitlines() if "delivery id=" in line]

    def submit(self, subjects: list[str]) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.login(ALICE, PASSWORD)
            for subject in subjects:
                client.sendmail(ALICE, [BOB], test_relay.outgoing(subject))


class _Silent(protocol.Protocol):
    """
    A remote server that accepts the connection and never says a word:
    the sender's attempt stays under way.
    """

    def connectionMade(self):
        self.factory.connected.append(self)


class SharedQueueTestCase(test_relay.TwoServersTestCase):
    """
    Fixtures: A's data folder and config, its sender processes, B on a
    port chosen first (so that A's route can name it before B runs).
    """

    relay = {}
    redis = False
    workers = 1

    def setUp(self):
        test_relay.TwoServersTestCase.setUp(self)
        self.folder = Path(self.mktemp()).resolve()
        self.dataDir = self.folder / "data"
        writeUsers(self.dataDir, {ALICE: PASSWORD})
        self.bPort = freePort()
        relay = {
            "scan_interval": 0.05, "retry_first": 0.2, "retry_max": 0.2, "rescan_interval": 0.1,
            "connect_timeout": 5.0, "command_timeout": 60.0,
        }
        relay.update(self.relay)
        text = (
            f'data_dir = "{self.dataDir}"\nhostname = "mx.a.test"\ndomains = ["a.test"]\n'
            "[auth]\nsubmission_plaintext = true\n[relay]\n"
            + "".join(f"{key} = {value!r}\n" for key, value in relay.items())
            + f'[relay.routes]\n"b.test" = "127.0.0.1:{self.bPort}"\n'
        )
        if self.redis:
            self.redisServer = startRedis(self)
            text += f'[cluster]\nredis = "redis://127.0.0.1:{self.redisServer.port}/0"\n'
        elif self.workers > 1:
            text += f"[cluster]\nworkers = {self.workers}\n"
        self.config = self.folder / "maild.toml"
        self.config.write_text(text)
        self.senders: list[Sender] = []

    @defer.inlineCallbacks
    def startSender(self):
        """
        Start one more process of A (and, with a Redis running, wait until
        it reached it).
        """
        sender = Sender(len(self.senders) + 1, self.folder, self.config)
        self.senders.append(sender)
        self.addCleanup(sender.stop)
        yield threads.deferToThread(sender.start)
        if self.redis and self.redisServer.process.poll() is None:
            yield self.waitFor(lambda: re.search(r"Redis at \S+ reached", sender.logText()))
        return sender

    def startB(self):
        return self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": self.bPort})

    def startSilent(self):
        """
        A server on B's port that never answers.
        """
        factory = protocol.ServerFactory.forProtocol(_Silent)
        factory.connected = []
        port = reactor.listenTCP(self.bPort, factory, interface="127.0.0.1")

        def close():
            for client in factory.connected:
                client.transport.abortConnection()
            return port.stopListening()

        return factory, close

    def queued(self) -> list[str]:
        queue = self.dataDir / "queue"
        return [p.stem for p in queue.glob("*.env")] if queue.exists() else []

    def received(self) -> collections.Counter:
        """
        The messages B's Bob has, by subject.
        """
        b = self.services["b"]
        return collections.Counter(
            email.message_from_bytes(m)["Subject"] for m in self.mailOf(b, BOB)
        )

    @defer.inlineCallbacks
    def assertEachOnce(self, subjects: list[str]):
        """
        Wait until A's queue is empty, then check that B got each subject
        exactly once.
        """
        yield self.waitFor(lambda: not self.queued() and len(self.mailOf(self.services["b"], BOB)) >= len(subjects), 60)
        self.assertEqual(self.received(), collections.Counter(subjects))
        for sender in self.senders:
            self.assertNotIn("Traceback", sender.logText())

    def submit(self, sender: Sender, subjects: list[str]):
        return threads.deferToThread(sender.submit, subjects)

    @defer.inlineCallbacks
    def deferredThenRaced(self, subjects: list[str]):
        """
        Queue C{subjects} while B is down (each tried once and deferred),
        stop that sender, bring B back and start two senders on the queue
        at once (both load every message, as a restarted worker does): B
        must still get each exactly once.
        """
        first = yield self.startSender()
        yield self.submit(first, subjects)
        yield self.waitFor(lambda: len(first.deliveries()) >= len(subjects))
        first.stop()
        yield self.startB()
        yield self.startSender()
        yield self.startSender()
        yield self.assertEachOnce(subjects)


class TwoSendersTests(SharedQueueTestCase):
    @defer.inlineCallbacks
    def test_eachMessageOnce(self):
        """
        Two processes accept messages for B (each knows its own at once and
        the other's from the folder): B gets each message exactly once,
        and A's queue ends empty.
        """
        yield self.startB()
        first, second = (yield self.startSender()), (yield self.startSender())
        subjects = [f"m{i}" for i in range(40)]
        yield defer.gatherResults([self.submit(first, subjects[::2]), self.submit(second, subjects[1::2])])
        yield self.assertEachOnce(subjects)

    @defer.inlineCallbacks
    def test_bothKnowEveryMessage(self):
        """
        Messages deferred while B was down, then two processes started
        together on the queue (both load every message: a restarted worker
        does), B back: they race for every message, and B still gets each
        exactly once.
        """
        yield self.deferredThenRaced([f"m{i}" for i in range(30)])


class TakeOverTests(SharedQueueTestCase):
    @defer.inlineCallbacks
    def test_deadSendersMessagesTakenOver(self):
        """
        Messages one process accepted while B was down, then that process
        killed (kill -9): the other process, started before them, finds
        them in the folder and sends them once B is back.
        """
        first, second = (yield self.startSender()), (yield self.startSender())
        subjects = [f"m{i}" for i in range(10)]
        yield self.submit(first, subjects)
        yield self.waitFor(lambda: len(first.deliveries()) >= len(subjects))
        first.kill()
        yield self.startB()
        yield self.assertEachOnce(subjects)
        self.assertEqual(len([line for line in second.deliveries() if "status=sent" in line]), len(subjects))

    @defer.inlineCallbacks
    def test_killedMidAttempt(self):
        """
        A process killed while it waits on the remote server for a message
        (it holds the message): the other one sends it once B answers.
        """
        silent, close = self.startSilent()
        first = yield self.startSender()
        yield self.submit(first, ["mid"])
        yield self.waitFor(lambda: silent.connected)
        second = yield self.startSender()
        first.kill()
        yield close()
        yield self.startB()
        yield self.assertEachOnce(["mid"])
        self.assertIn("status=sent", "".join(second.deliveries()))


def redisCommand(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


class RedisLeaseTests(SharedQueueTestCase):
    redis = True
    # Short, but long enough for the checks below on a loaded machine.
    relay = {"lease": 3.0}

    @defer.inlineCallbacks
    def test_killedMidAttemptWaitsForTheLease(self):
        """
        With Redis, an attempt holds the message's lease (the key
        maild:lease:<id> naming the process), renewed while it runs; the
        process killed mid-attempt leaves the lease behind, and the other
        process sends the message once it has run out; its own lease is
        released when it is done.
        """
        silent, close = self.startSilent()
        first = yield self.startSender()
        yield self.submit(first, ["mid"])
        yield self.waitFor(lambda: silent.connected)
        [queueId] = self.queued()
        key = f"maild:lease:{queueId}"
        self.assertTrue(redisCommand(self.redisServer.port, "GET", key).endswith(f":{first.pid}"))
        # Renewed while the attempt waits (every second): its time to live
        # goes up again.
        redisCommand(self.redisServer.port, "PEXPIRE", key, "1500")
        yield self.waitFor(lambda: int(redisCommand(self.redisServer.port, "PTTL", key)) > 2000)
        second = yield self.startSender()
        first.kill()
        self.assertGreater(int(redisCommand(self.redisServer.port, "PTTL", key)), 0)
        yield close()
        yield self.startB()
        yield self.assertEachOnce(["mid"])
        self.assertIn("status=sent", "".join(second.deliveries()))
        yield self.waitFor(lambda: redisCommand(self.redisServer.port, "EXISTS", key) == "0")

    @defer.inlineCallbacks
    def test_redisAwayFileLockAlone(self):
        """
        Redis configured but down: the processes keep sending, kept apart
        by the file locks alone, and each message still reaches B once.
        """
        self.redisServer.stop()
        yield self.deferredThenRaced([f"m{i}" for i in range(20)])


class OneFolderTests(test_relay.TwoServersTestCase):
    """
    Two daemons on one data folder in this process (the message lock
    keeps them apart just as it keeps processes apart).
    """

    @defer.inlineCallbacks
    def startTwo(self, **relay):
        self.bPort = freePort()
        settings = {
            "routes": {"b.test": f"127.0.0.1:{self.bPort}"}, "scan_interval": 0.05,
            "rescan_interval": 0.05, "retry_first": 3600.0,
        }
        settings.update(relay)
        first = yield self.startMaild("a1", ["a.test"], {ALICE: PASSWORD}, relay=settings)
        second = yield self.startMaild(
            "a2", ["a.test"], {}, relay=settings, data_dir=first.config.data_dir
        )
        return first, second

    @defer.inlineCallbacks
    def test_retryTimeOfAnotherProcessHonoured(self):
        """
        A process whose copy of an entry says it is due, while another
        process already tried it and wrote a later retry time: once it
        holds the message it reads that time and does not try it again.
        """
        first, second = yield self.startTwo()
        yield self.submit(first, [BOB], test_relay.outgoing("Deferred"))
        yield self.waitFor(lambda: self.deliveryLines())
        yield self.waitFor(lambda: second.relay.entries)
        [entry] = second.relay.entries.values()
        entry.nextTry = 0.0
        yield self.waitFor(lambda: entry.nextTry > 0)
        yield first.relay.queue.settled()
        self.assertEqual(len(self.deliveryLines()), 1)

    @defer.inlineCallbacks
    def test_queueCapForTheFolder(self):
        """
        queue_max_messages counts the messages of the data folder, not of
        one process: once the other process has seen the first one's
        messages, it refuses with 452 4.3.1 too.
        """
        first, second = yield self.startTwo(queue_max_messages=2)
        yield self.submit(first, [BOB], test_relay.outgoing("One"))
        yield self.submit(first, [BOB], test_relay.outgoing("Two"))
        yield self.waitFor(lambda: len(second.relay.entries) == 2)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
            yield self.submit(second, [BOB], test_relay.outgoing("Three"))
        [(code, text)] = caught.exception.recipients.values()
        self.assertEqual((code, text[:5]), (452, b"4.3.1"))

    @defer.inlineCallbacks
    def test_recipientsPerHourForTheFolder(self):
        """
        recipients_per_hour counts a user's recipients given to any
        process on the data folder: the second process, having read the
        first one's counts, answers 451 4.7.1 past the limit.
        """
        first, second = yield self.startTwo(recipients_per_hour=2)
        yield self.submit(first, [BOB, "other@b.test"], test_relay.outgoing("Two recipients"))
        yield self.waitFor(lambda: second.relay.recipientCounts.count(ALICE, reactor.seconds()) == 2)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
            yield self.submit(second, [BOB], test_relay.outgoing("Third"))
        [(code, text)] = caught.exception.recipients.values()
        self.assertEqual((code, text[:5]), (451, b"4.7.1"))

    @defer.inlineCallbacks
    def test_deliveredByTheOtherForgotten(self):
        """
        A message the other process delivered leaves this one's count at
        the next rescan (or the queue cap would fill with ghosts).
        """
        first, second = yield self.startTwo(retry_first=0.1, retry_max=0.1)
        yield self.submit(first, [BOB], test_relay.outgoing("Ghost"))
        yield self.waitFor(lambda: second.relay.entries)
        self.patch(second.relay, "_start", lambda entry: None)
        yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": self.bPort})
        yield self.waitFor(lambda: not first.relay.entries and not second.relay.entries)
        self.assertEqual(len(self.mailOf(self.services["b"], BOB)), 1)


class QueueIdTests(test_relay.TwoServersTestCase):
    @defer.inlineCallbacks
    def test_replyIdBeginsTheQueueId(self):
        """
        The id in submission's "250 2.0.0 Ok: queued as X" begins the
        queue id of every log line of that message (queued id=..., delivery
        id=...): an administrator greps X and follows it to B.
        """
        a, b = yield self.startPair()

        def send():
            with smtplib.SMTP("127.0.0.1", a.port("submission"), timeout=10) as client:
                client.login(ALICE, PASSWORD)
                client.mail(ALICE)
                client.rcpt(BOB)
                return client.data(test_relay.outgoing("Follow me").encode())

        code, text = yield threads.deferToThread(send)
        self.assertEqual(code, 250)
        replyId = text.decode().rpartition(" ")[2]
        yield self.waitFor(lambda: self.deliveryLines())
        [line] = self.deliveryLines()
        queueId = line.split()[1].partition("=")[2]
        self.assertTrue(queueId.startswith(replyId), (replyId, line))
        self.assertGreater(len(queueId), len(replyId))

    def test_smtpIdsOfTwoProcessesDiffer(self):
        """
        Two processes started together (workers) never give the same id in
        their "250 ... queued as X" replies: started from the clock alone,
        their counters ran through the same numbers a few hundred messages
        apart.
        """
        script = "from maild import smtp\nprint(' '.join(smtp._nextQueueId() for _ in range(3000)))\n"
        runs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            for _ in range(2)
        ]
        first, second = (set(run.communicate(timeout=60)[0].split()) for run in runs)
        self.assertEqual((len(first), len(second)), (3000, 3000))
        self.assertEqual(first & second, set())

    @defer.inlineCallbacks
    def test_startLeavesEnvelopesBeingWritten(self):
        """
        A daemon starting on a queue another process is writing to does
        not remove the envelope of a message that process is accepting
        (locked until the message is committed): that would lose a message
        about to be acknowledged.  An envelope without its message that no
        one holds (a crash in the middle of a removal) goes at once; a
        temporary file only once it is an hour old.
        """
        a = yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD})
        yield self.stopMaild("a")
        queue = a.config.data_dir / "queue"
        queue.mkdir(exist_ok=True)
        names = ["0000000100000AAAAAA.env", "0000000100000AAAAAA.tmp", "0000000200000AAAAAA.env",
                 "0000000300000AAAAAA.tmp"]
        for name in names:
            (queue / name).write_bytes(b"{}")
        old = time.time() - 2 * 3600
        os.utime(queue / names[3], (old, old))
        writing = os.open(queue / names[0], os.O_RDWR)
        self.addCleanup(os.close, writing)
        self.assertTrue(tryLockOpenFile(writing))
        yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD})
        self.assertEqual(sorted(p.name for p in queue.iterdir() if p.is_file()), names[:2])

class PublishedCountsTests(unittest.TestCase):
    @given(st.one_of(st.binary(max_size=200), st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ).map(lambda value: json.dumps(value).encode())))
    @settings(max_examples=200, deadline=None)
    # A minute that str.isdigit() takes for a number and int() refuses.
    @example(json.dumps({"alice@a.test": {"\u00b9": 1}}).encode())
    def test_anyOtherFileReadWithoutError(self, content):
        """
        Whatever another daemon's counts file holds (a crash, a disk
        error, an older version), reading it gives counts, never an
        exception.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "other.json").write_bytes(content)
        counts = RecipientCounts(folder, "mine")
        others = counts.exchange(counts.snapshot(1e9), time.time())
        self.assertIsInstance(others, dict)
        self.assertTrue(all(isinstance(n, int) for n in others.values()))

    def test_countsOfTheWindowOnly(self):
        """
        Another daemon's minutes count while any part of them is within
        the hour; older ones do not, and neither does a file an hour old.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        now = 100 * 3600.0
        recent, old = int((now - 3590) // 60), int((now - 3700) // 60)
        (folder / "other.json").write_bytes(json.dumps({ALICE: {str(recent): 3, str(old): 5}}).encode())
        counts = RecipientCounts(folder, "mine")
        counts.add(ALICE, now - 10)
        (folder / "gone.json").write_bytes(json.dumps({ALICE: {str(recent): 7}}).encode())
        os.utime(folder / "other.json", (now - 60, now - 60))
        os.utime(folder / "gone.json", (now - 3700, now - 3700))
        counts.update(counts.exchange(counts.snapshot(now), now))
        self.assertEqual(counts.count(ALICE, now), 4)
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["mine.json", "other.json"])


class WorkersTests(SharedQueueTestCase):
    workers = 2

    @defer.inlineCallbacks
    def test_workersSendEachOnce(self):
        """
        twistd maild with two workers (one submission socket, the kernel
        spreading connections over them): messages deferred while B was
        down, then B back, and each reaches B exactly once.
        """
        daemon = yield self.startSender()
        subjects = [f"m{i}" for i in range(20)]
        yield defer.gatherResults([self.submit(daemon, subjects[i::4]) for i in range(4)])
        yield self.waitFor(lambda: len(daemon.deliveries()) >= len(subjects))
        yield self.startB()
        yield self.assertEachOnce(subjects)


class LeaseWithoutFileLocksTests(test_relay.TwoServersTestCase):
    @defer.inlineCallbacks
    def test_redisLeaseAloneKeepsSendersApart(self):
        """
        On a file system whose locks do nothing (NFS mounted
        local_lock=all, say), the Redis lease alone keeps two daemons from
        sending one message: both know every message and try them all at
        once, and B gets each exactly once (the envelope is read again once
        the lease is held, so a message the other finished is not sent
        again).
        """
        from maild.relay import queue as queueModule

        redisServer = startRedis(self)
        self.patch(queueModule, "tryLockOpenFile", lambda fd: True)
        bPort = freePort()
        relay = {
            "routes": {"b.test": f"127.0.0.1:{bPort}"}, "scan_interval": 0.05, "retry_first": 3600.0,
        }
        cluster = {"redis": f"redis://127.0.0.1:{redisServer.port}/0"}
        first = yield self.startMaild("a1", ["a.test"], {ALICE: PASSWORD}, relay=relay, cluster=cluster)
        subjects = [f"m{i}" for i in range(30)]
        for subject in subjects:
            yield self.submit(first, [BOB], test_relay.outgoing(subject))
        yield self.waitFor(lambda: len(self.deliveryLines()) == len(subjects))
        second = yield self.startMaild(
            "a2", ["a.test"], {}, relay=relay, cluster=cluster, data_dir=first.config.data_dir, listeners=()
        )
        # Commands answered (not only subscribed), and given time to answer
        # on a loaded machine: a node that finds Redis slow decides without
        # the lease, and this test is about the lease.
        for node in (first, second):
            node.redis.timeout = 10.0
        yield self.waitFor(lambda: first.redis.answersPromptly and second.redis.answersPromptly)
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        self.cli(first, "queue", "flush")
        yield self.waitFor(lambda: not first.relay.entries and not second.relay.entries)
        received = collections.Counter(email.message_from_bytes(m)["Subject"] for m in self.mailOf(b, BOB))
        self.assertEqual(received, collections.Counter(subjects))


class LeasesTests(unittest.TestCase):
    """
    maild.cluster.leases against a real Redis.
    """

    @defer.inlineCallbacks
    def setUp(self):
        from maild.cluster import RedisLink
        from tests.support import waitUntil

        self.redisServer = startRedis(self)
        self.links = []
        for _ in range(2):
            link = RedisLink(f"redis://127.0.0.1:{self.redisServer.port}/0", reactor)
            link.node = f"node{len(self.links) + 1}"
            link.startService()
            self.addCleanup(link.stopService)
            self.links.append(link)
        yield waitUntil(lambda: all(link.answersPromptly for link in self.links))

    @defer.inlineCallbacks
    def test_oneHolderRenewedReleased(self):
        """
        One node at a time holds a lease; the holder's renewal puts its
        time to live back up; another node's release leaves it alone; the
        holder's release frees it for the other.
        """
        first, second = (Leases(link, 30.0, reactor) for link in self.links)
        self.assertIs((yield first.acquire("m1")), True)
        self.assertIs((yield second.acquire("m1")), False)
        yield self.links[0].call("execute_command", "PEXPIRE", "maild:lease:m1", 1000)
        yield first._renew()
        self.assertGreater((yield self.links[0].call("execute_command", "PTTL", "maild:lease:m1")), 20000)
        second.held.add("m1")
        second.release("m1")
        self.assertEqual((yield first.holder("m1")), "node1")
        first.release("m1")
        yield waitUntilTrue(lambda: second.acquire("m1"))
        self.assertEqual((yield second.holder("m1")), "node2")

    @defer.inlineCallbacks
    def test_lostLeaseForgotten(self):
        """
        A lease that vanished (Redis restarted empty) is found at the next
        renewal, logged once, and no longer counted as held.
        """
        leases = Leases(self.links[0], 30.0, reactor)
        yield leases.acquire("m1")
        yield leases.acquire("m2")
        yield self.links[0].call("delete", "maild:lease:m2")
        yield leases._renew()
        self.assertEqual(leases.held, {"m1"})

    @defer.inlineCallbacks
    def test_redisAwayAnswersNone(self):
        """
        With Redis unreachable, acquiring answers None (the caller goes on
        with its file lock), at once.
        """
        from maild.cluster import RedisLink

        away = RedisLink(f"redis://127.0.0.1:{freePort()}/0", reactor)
        self.assertIsNone((yield Leases(away, 30.0, reactor).acquire("m1")))


@defer.inlineCallbacks
def waitUntilTrue(attempt, tries: int = 200):
    """
    Call C{attempt} (returning a Deferred) until it answers True.
    """
    for _ in range(tries):
        if (yield attempt()):
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("never true")
