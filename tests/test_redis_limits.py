"""
Failed-login delays and per-address connection limits shared by nodes
through a real Redis on loopback: three in-process nodes count together
while Redis answers, each counts by itself (without a client seeing any
error) while it is gone or hung, and they count together again once it
is back.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import subprocess
import signal
import urllib.request
from pathlib import Path

from twisted.internet import defer, error, protocol, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from maild.connections import LimitedFactory
from maild.service import MailService
from tests.cluster import Cluster, missing
from tests.support import PASSWORD, IMAPClient, clientContext, freePort, makeConfig, waitFor, waitUntil, writeUsers
from tests.test_daemon import Daemon, listenOnly
from tests.test_daemon import waitForPort as daemonPort
from tests.test_redis import startRedis

BASE_DELAY = 0.01
LIMIT = 2
REFUSAL = b"* BYE Too many connections from your address"


def greeting(port: int, source: str = "127.0.0.1") -> tuple[IMAPClient, bytes]:
    client = IMAPClient(port, source=source)
    return client, client.readLine()


def failLogin(port: int, source: str = "127.0.0.1") -> bytes:
    client = IMAPClient(port, source=source)
    try:
        assert client.readLine().startswith(b"* OK"), "no greeting"
        _, tagged = client.command(b'L LOGIN "alice@localhost" "wrong"')
        return tagged
    finally:
        client.close()


def logIn(port: int, source: str = "127.0.0.1") -> bytes:
    client = IMAPClient(port, source=source)
    try:
        client.readLine()
        return client.login()
    finally:
        client.close()


class SharedLimitsTests(unittest.TestCase):
    """
    Three nodes on one data folder and one Redis, IMAP on each; no
    trusted network, so loopback clients are limited like any other.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.redisServer = startRedis(self)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        dataDir = Path(self.mktemp()).resolve()
        writeUsers(dataDir, {"alice@localhost": PASSWORD})
        # Each failure's delay, as the node that answered it chose it.
        self.delays: list[float] = []
        self.nodes: list[MailService] = []
        for _ in range(3):
            config = makeConfig(
                dataDir,
                ("imap", "pop3", "submission"),
                limits={
                    "connections_per_ip": LIMIT,
                    "trusted_networks": [],
                    "auth_failure_delay": BASE_DELAY,
                    "auth_failure_delay_max": 100.0,
                },
                cluster={"redis": f"redis://127.0.0.1:{self.redisServer.port}/0"},
            )
            node = MailService(config, reactor)
            # Shares refreshed twice a second, a slow Redis trusted again
            # after one: the tests need not wait for the real periods.
            node.redis.presenceLifetime = 1.5
            node.redis.slowPause = 1.0
            self.recordDelays(node)
            node.startService()
            self.addCleanup(node.stopService)
            self.nodes.append(node)
        yield defer.gatherResults(
            [lst.ready for node in self.nodes for lst in node.listeners.values()]
        )
        yield waitUntil(lambda: all(node.redis.answersPromptly for node in self.nodes))

    def recordDelays(self, node: MailService) -> None:
        throttle = node.authenticator.throttle
        failed = throttle.failed

        def recordingFailed(key):
            return defer.maybeDeferred(failed, key).addCallback(
                lambda delay: self.delays.append(delay) or delay
            )

        throttle.failed = recordingFailed

    def port(self, n: int) -> int:
        return self.nodes[n].port("imap")

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)

    def sharedTotal(self, host: str = "127.0.0.1") -> defer.Deferred:
        """
        The connections Redis counts for C{host} on the IMAP listeners.
        """
        d = self.nodes[0].redis.call("hvals", f"maild:connections:imap:{host}")
        return d.addCallback(lambda shares: sum(int(s) for s in shares))

    @defer.inlineCallbacks
    def waitForSharedTotal(self, expected: int, host: str = "127.0.0.1"):
        seen = []

        @defer.inlineCallbacks
        def poll():
            while True:
                try:
                    total = yield self.sharedTotal(host)
                except Exception:
                    total = None
                seen.append(total)
                if total == expected:
                    return
                yield task.deferLater(reactor, 0.05, lambda: None)

        yield poll().addTimeout(10, reactor)

    def logged(self, fragment: str) -> list[str]:
        return [
            e["log_format"].format(**e)
            for e in self.events
            if fragment in e.get("log_format", "")
        ]

    def assertDelays(self, expected: list[float]) -> None:
        self.assertEqual(len(self.delays), len(expected), self.delays)
        for got, want in zip(self.delays, expected):
            self.assertAlmostEqual(got, want)

    @defer.inlineCallbacks
    def test_failedLoginsDelayedAsIfOnOneNode(self):
        """
        Failed logins from one address spread over three nodes are delayed
        as if all had reached one node: the delay doubles with every
        failure, whichever node answers it; a successful login starts it
        again from the base delay everywhere.
        """
        for i in range(6):
            tagged = yield self.inThread(failLogin, self.port(i % 3))
            self.assertTrue(tagged.startswith(b"L NO"), tagged)
        self.assertDelays([BASE_DELAY * 2**i for i in range(6)])
        yield self.inThread(logIn, self.port(1))
        yield self.inThread(failLogin, self.port(2))
        self.assertAlmostEqual(self.delays[-1], BASE_DELAY)

    @defer.inlineCallbacks
    def test_connectionLimitOverAllNodes(self):
        """
        C{connections_per_ip} holds over all nodes: with two connections
        open from an address on nodes 1 and 2, node 3 refuses a third with
        the protocol's refusal, and admits it once one of the two closes.
        """
        first, line = yield self.inThread(greeting, self.port(0))
        self.assertTrue(line.startswith(b"* OK"), line)
        second, line = yield self.inThread(greeting, self.port(1))
        self.assertTrue(line.startswith(b"* OK"), line)
        third, line = yield self.inThread(greeting, self.port(2))
        self.assertEqual(line, REFUSAL)
        closed = yield self.inThread(third.closed)
        self.assertTrue(closed)
        first.close()
        yield self.waitForSharedTotal(1)
        fourth, line = yield self.inThread(greeting, self.port(2))
        self.assertTrue(line.startswith(b"* OK"), line)
        for client in (second, third, fourth):
            client.close()

    @defer.inlineCallbacks
    def test_redisGoneThenBack(self):
        """
        Redis stopped: every node limits by itself at once (a third
        connection to one node is refused, two more to another admitted,
        each node's failures delayed by its own count), no client gets an
        error, a warning is logged.  Redis started again: the nodes write
        their counts back and limit together again.
        """
        self.redisServer.stop()
        yield waitUntil(lambda: not any(node.redis.up for node in self.nodes))
        self.assertTrue(self.logged("lost Redis"))
        clients = []
        for n in (0, 0, 1, 1):
            client, line = yield self.inThread(greeting, self.port(n))
            self.assertTrue(line.startswith(b"* OK"), line)
            clients.append(client)
        refused, line = yield self.inThread(greeting, self.port(0))
        self.assertEqual(line, REFUSAL)
        refused.close()
        for n in (0, 0, 1):
            tagged = yield self.inThread(failLogin, self.port(n), "127.0.0.2")
            self.assertTrue(tagged.startswith(b"L NO"), tagged)
        self.assertDelays([BASE_DELAY, 2 * BASE_DELAY, BASE_DELAY])

        self.redisServer.start()
        # Up is not enough: a node whose command connection is still on
        # its way back decides by itself (and would admit node 3's client).
        yield waitUntil(
            lambda: all(node.redis.answersPromptly for node in self.nodes), timeout=20
        )
        # Nodes 1 and 2 hold two connections each: written back, they
        # count for 4.
        yield self.waitForSharedTotal(4)
        # Coming back is not being slow: nothing waited on a connection
        # still on its way.
        self.assertEqual(self.logged("did not answer within"), [])
        refused, line = yield self.inThread(greeting, self.port(2))
        self.assertEqual(line, REFUSAL)
        refused.close()
        del self.delays[:]
        for n in (0, 1, 2):
            yield self.inThread(failLogin, self.port(n), "127.0.0.3")
        self.assertDelays([BASE_DELAY, 2 * BASE_DELAY, 4 * BASE_DELAY])
        for client in clients:
            client.close()

    @defer.inlineCallbacks
    def test_redisHung(self):
        """
        Redis hung (stopped with SIGSTOP: connections stay open, nothing
        answers): after one deadline the nodes decide by themselves, a
        warning says so, and no client sees an error; once it answers
        again, they count together again.
        """
        self.redisServer.process.send_signal(signal.SIGSTOP)
        self.addCleanup(self.redisServer.process.send_signal, signal.SIGCONT)
        clients = []
        for n in (0, 1, 2):
            client, line = yield self.inThread(greeting, self.port(n))
            self.assertTrue(line.startswith(b"* OK"), line)
            clients.append(client)
        tagged = yield self.inThread(failLogin, self.port(0))
        self.assertTrue(tagged.startswith(b"L NO"), tagged)
        self.assertTrue(self.logged("did not answer within"))

        self.redisServer.process.send_signal(signal.SIGCONT)
        yield self.waitForSharedTotal(3)
        yield waitUntil(lambda: all(node.redis.answersPromptly for node in self.nodes))
        refused, line = yield self.inThread(greeting, self.port(0))
        self.assertEqual(line, REFUSAL)
        refused.close()
        for client in clients:
            client.close()

    @defer.inlineCallbacks
    def test_admittedSessionsWork(self):
        """
        A session that waited for the cluster's count works as any other:
        submission with STARTTLS, AUTH and a message; POP3 with a login.
        """
        node = self.nodes[1]

        def submit():
            with smtplib.SMTP("127.0.0.1", node.port("submission"), timeout=10) as client:
                client.starttls(context=clientContext(node))
                client.login("alice@localhost", PASSWORD)
                client.sendmail("alice@localhost", ["alice@localhost"], b"Subject: hi\r\n\r\nhi\r\n")

        def pop():
            client = poplib.POP3("127.0.0.1", node.port("pop3"), timeout=10)
            client.user("alice@localhost")
            client.pass_(PASSWORD)
            count, _ = client.stat()
            client.quit()
            return count

        yield self.inThread(submit)
        count = yield self.inThread(pop)
        self.assertEqual(count, 1)

    @defer.inlineCallbacks
    def test_commandConnectionAway(self):
        """
        While the connection for commands is on its way back (Redis closed
        it; the subscription stayed), the nodes decide at once by
        themselves rather than wait for it, and do not call Redis slow;
        once it is back they count together again.
        """
        subprocess.run(
            ["redis-cli", "-p", str(self.redisServer.port), "CLIENT", "KILL", "TYPE", "normal"],
            check=True, stdout=subprocess.DEVNULL,
        )
        yield waitUntil(lambda: not self.nodes[0].redis.answersPromptly)
        tagged = yield self.inThread(failLogin, self.port(0))
        self.assertTrue(tagged.startswith(b"L NO"), tagged)
        self.assertEqual(self.logged("did not answer within"), [])
        yield waitUntil(lambda: all(node.redis.answersPromptly for node in self.nodes))
        for n in (1, 2):
            yield self.inThread(failLogin, self.port(n))
        # (Whether Redis heard of the first failure depends on how soon
        # the connection came back: its increment waited for it, up to
        # the deadline.)
        first, second, third = self.delays
        self.assertAlmostEqual(first, BASE_DELAY)
        self.assertIn(round(second, 6), (BASE_DELAY, 2 * BASE_DELAY))
        self.assertAlmostEqual(third, 2 * second)

    @defer.inlineCallbacks
    def test_deadNodeStopsCounting(self):
        """
        A node that stops refreshing its presence (killed, or cut off
        from Redis) stops counting once its presence expires: its
        connections do not hold the address's limit forever.
        """
        clients = []
        for _ in range(LIMIT):
            client, line = yield self.inThread(greeting, self.port(2))
            self.assertTrue(line.startswith(b"* OK"), line)
            clients.append(client)
        refused, line = yield self.inThread(greeting, self.port(0))
        self.assertEqual(line, REFUSAL)
        refused.close()
        # As if node 3 died: it writes nothing more.
        self.nodes[2].redis.presenceLifetime = 1e9
        self.nodes[2].redis._presence.stop()
        self.nodes[2].redis.up = False

        @defer.inlineCallbacks
        def admitted():
            while True:
                client, line = yield self.inThread(greeting, self.port(0))
                client.close()
                if line.startswith(b"* OK"):
                    return
                self.assertEqual(line, REFUSAL)
                yield task.deferLater(reactor, 0.05, lambda: None)

        yield admitted().addTimeout(10, reactor)
        for client in clients:
            client.close()


CLUSTER_LIMITS = (
    "[limits]\n"
    f"connections_per_ip = {LIMIT}\n"
    # HAProxy's health checks come from 127.0.0.1; the clients, from
    # 127.0.0.5, are limited like any other address.
    'trusted_networks = ["127.0.0.1/32"]\n'
    f"auth_failure_delay = {BASE_DELAY}\n"
    "auth_failure_delay_max = 100.0\n"
)
CLIENT = "127.0.0.5"


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


class ThroughHAProxyTests(unittest.TestCase):
    """
    Three maild processes (twistd) behind real HAProxy (PROXY protocol
    v2), sharing one Redis: the clients' real address, from the PROXY
    header, is what all three count together.
    """

    def setUp(self):
        why = missing("haproxy", "redis-server")
        if why:
            raise unittest.SkipTest(why)
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        self.cluster = Cluster(
            folder, users={"alice@localhost": PASSWORD}, config=CLUSTER_LIMITS, redis=True
        )
        self.addCleanup(self.cluster.stop)
        self.cluster.start()
        self.waitForRedis(1)

    def waitForRedis(self, times: int) -> None:
        reached = f"Redis at 127.0.0.1:{self.cluster.redisPort}: sharing counts"
        waitFor(
            lambda: all(node.logText().count(reached) >= times for node in self.cluster.nodes),
            what="every node to reach Redis",
        )

    def frontend(self, node: int) -> int:
        return self.cluster.frontends[f"imap{node}"]

    def tearDown(self):
        for node in self.cluster.nodes:
            self.assertNotIn("Traceback", node.logText())

    def test_failedLoginsDelayedAsIfOnOneNode(self):
        """
        Six failed logins from one address, two through each node, are
        delayed as six on one node would be (0.01, 0.02 ... 0.32 s, as
        each node's C{maild_login_delay_seconds} shows), not as
        two on each (0.01, 0.02 three times over).
        """
        for i in range(6):
            tagged = failLogin(self.frontend(i % 3 + 1), CLIENT)
            self.assertTrue(tagged.startswith(b"L NO"), tagged)
        ports = [node.ports["http"] for node in self.cluster.nodes]
        count = sum(metric(p, "maild_login_delay_seconds_count") for p in ports)
        total = sum(metric(p, "maild_login_delay_seconds_sum") for p in ports)
        self.assertEqual(count, 6)
        self.assertAlmostEqual(total, BASE_DELAY * (2**6 - 1))

    def test_connectionLimitOverAllNodes(self):
        """
        Two connections from one address through nodes 1 and 2 use up
        its C{connections_per_ip}: node 3 refuses the third.
        """
        clients = []
        for node in (1, 2):
            client, line = greeting(self.frontend(node), CLIENT)
            self.assertTrue(line.startswith(b"* OK"), line)
            clients.append(client)
        refused, line = greeting(self.frontend(3), CLIENT)
        self.assertEqual(line, REFUSAL)
        for client in clients + [refused]:
            client.close()

    def test_redisKilledThenRestarted(self):
        """
        Redis killed: each node limits by itself (a third connection to
        node 1 refused, two to node 2 admitted), logins fail as they
        should with no other error, a warning is logged.  Redis started
        again: the nodes reconnect and count together again (node 3
        refuses a connection, four being open elsewhere).
        """
        self.cluster.redis.kill()
        self.cluster.redis.wait(timeout=30)
        waitFor(
            lambda: all("lost Redis" in node.logText() for node in self.cluster.nodes),
            what="the nodes to notice",
        )
        clients = []
        for node in (1, 1, 2, 2):
            client, line = greeting(self.frontend(node), CLIENT)
            self.assertTrue(line.startswith(b"* OK"), line)
            clients.append(client)
        refused, line = greeting(self.frontend(1), CLIENT)
        self.assertEqual(line, REFUSAL)
        refused.close()
        tagged = failLogin(self.frontend(3), "127.0.0.6")
        self.assertTrue(tagged.startswith(b"L NO"), tagged)

        self.cluster.startRedis()
        self.waitForRedis(2)

        def refusedByNode3():
            client, line = greeting(self.frontend(3), CLIENT)
            client.close()
            return line == REFUSAL

        waitFor(refusedByNode3, what="node 3 to count the others' connections")
        # Coming back is not being slow: no command waited for a command
        # connection still on its way back.
        for node in self.cluster.nodes:
            self.assertNotIn("did not answer within", node.logText())
        for client in clients:
            client.close()


class WorkersTests(unittest.TestCase):
    """
    C{--workers 2} with Redis: the workers count one address's
    connections together, whichever of them the kernel gives each to.
    """

    def setUp(self):
        self.redisServer = startRedis(self)
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        writeUsers(self.folder / "maildata", {"alice@localhost": PASSWORD})
        config = self.folder / "maild.toml"
        config.write_text(
            CLUSTER_LIMITS
            + f'[cluster]\nredis = "redis://127.0.0.1:{self.redisServer.port}/0"\n'
        )
        self.imap = freePort()
        self.log = self.folder / "twistd.log"
        daemon = Daemon(
            self.folder,
            ["-n", "--pidfile=", "--logfile", str(self.log), "maild", "--config", str(config),
             "--workers=2"] + listenOnly(imap=f"tcp:{self.imap}:interface=127.0.0.1"),
        )
        self.addCleanup(daemon.stop)
        daemonPort(self.imap, daemon.process)
        reached = f"Redis at 127.0.0.1:{self.redisServer.port}: sharing counts"
        waitFor(lambda: self.log.read_text().count(reached) >= 2, what="both workers on Redis")

    def test_connectionLimitOverWorkers(self):
        """
        With C{connections_per_ip} connections open, every further one is
        refused, whichever worker takes it.
        """
        clients = []
        for _ in range(LIMIT):
            client, line = greeting(self.imap, CLIENT)
            self.assertTrue(line.startswith(b"* OK"), line)
            clients.append(client)
        for _ in range(4):
            client, line = greeting(self.imap, CLIENT)
            client.close()
            self.assertEqual(line, REFUSAL)
        for client in clients:
            client.close()
        self.assertNotIn("Traceback", self.log.read_text())


class _Greeter(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(b"hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.factory.connectionClosed(self)


class _GreeterFactory(LimitedFactory):
    refusal = b"too many"

    def buildSession(self, addr):
        return _Greeter()


class _AskedShare:
    """
    Stands for Redis: each admission waits for the test's answer.
    """

    def __init__(self, factory: LimitedFactory) -> None:
        self.factory = factory
        self.asked: list[defer.Deferred] = []
        self.written: list[tuple[str, int]] = []

    def admit(self, host: str, limit: int) -> defer.Deferred:
        self.written.append((host, self.factory.connections[host]))
        self.asked.append(defer.Deferred())
        return self.asked[-1]

    def changed(self, host: str) -> None:
        self.written.append((host, self.factory.connections[host]))


class AdmissionTests(unittest.SynchronousTestCase):
    """
    How a listener waits for the cluster's count (L{LimitedFactory.shared})
    before it starts a session, driven without Redis.
    """

    def setUp(self):
        self.factory = _GreeterFactory(limit=2, trusted=["192.0.2.1/32"])
        self.share = self.factory.shared = _AskedShare(self.factory)

    def connect(self, host: str = "198.51.100.7"):
        address = IPv4Address("TCP", host, 40000)
        proto = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def test_greetingWaitsForTheAnswer(self):
        """
        The session starts (and greets) only once the cluster admits the
        connection; what the client sent before is handed to it then.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"early")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.share.written, [("198.51.100.7", 1)])
        self.share.asked[0].callback(True)
        self.assertEqual(transport.value(), b"hello\r\n")
        self.assertEqual(proto.wrappedProtocol.received, b"early")
        proto.dataReceived(b" later")
        self.assertEqual(proto.wrappedProtocol.received, b"early later")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.factory.connections, {})
        self.assertEqual(self.share.written[-1], ("198.51.100.7", 0))

    def test_refusedByTheCluster(self):
        """
        Refused by the cluster's count: the protocol's refusal, the
        connection closed, and this process's count (as written to Redis)
        back to what it was.
        """
        proto, transport = self.connect()
        self.share.asked[0].callback(False)
        self.assertEqual(transport.value(), b"too many\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(proto.wrappedProtocol)
        self.assertEqual(self.factory.connections, {})
        self.assertEqual(self.share.written, [("198.51.100.7", 1), ("198.51.100.7", 0)])

    def test_goneBeforeTheAnswer(self):
        """
        A client that leaves before the answer gets no session, and its
        count is given back.
        """
        proto, transport = self.connect()
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.share.asked[0].callback(True)
        self.assertIsNone(proto.wrappedProtocol)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.factory.connections, {})
        self.assertEqual(self.share.written[-1], ("198.51.100.7", 0))

    def test_localLimitFirst(self):
        """
        This process's own count refuses at once, without asking: the
        cluster's can only be higher.
        """
        self.connect()
        self.connect()
        proto, transport = self.connect()
        self.assertEqual(len(self.share.asked), 2)
        self.assertEqual(transport.value(), b"too many\r\n")

    def test_trustedNotAsked(self):
        """
        A trusted network's connections are exempt: never asked about,
        never written.
        """
        proto, transport = self.connect("192.0.2.1")
        self.assertEqual(transport.value(), b"hello\r\n")
        self.assertEqual(self.share.asked, [])
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.share.written, [])

    def test_floodBeforeTheAnswer(self):
        """
        A client that sends more than a greeting's worth before it is
        admitted is cut off rather than buffered without end.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"x" * (proto.MAX_EARLY + 1))
        self.assertTrue(transport.disconnected)
