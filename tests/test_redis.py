"""
Nodes that share a data folder and a Redis (real redis-server on
loopback): change notices reach IDLE sessions on the other node at once,
with inotify off; when Redis goes away the nodes keep serving and poll,
and they come back to it by themselves.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from maild.cluster.link import RedisLink
from maild.service import MailService
from tests.support import PASSWORD, IMAPClient, freePort, makeConfig, waitUntil, writeUsers


NO_REDIS = "redis-server is not installed (Debian package redis-server; .ci/run installs it)"


def startRedis(testCase: unittest.TestCase, *options: str) -> "RedisServer":
    """
    A real Redis on a free loopback port (with C{options}) for
    C{testCase}, stopped in its cleanup; the test is skipped where
    redis-server is not installed.
    """
    if shutil.which("redis-server") is None:
        raise unittest.SkipTest(NO_REDIS)
    server = RedisServer()
    server.start(*options)
    testCase.addCleanup(server.stop)
    return server


class RedisServer:
    def __init__(self) -> None:
        self.port = freePort()
        self.process: subprocess.Popen | None = None

    def start(self, *options: str) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def killClient(self, port: int) -> None:
        """
        Close the client connection that comes from loopback C{port}
        (Redis's C{CLIENT KILL ADDR}).
        """
        addr = f"127.0.0.1:{port}".encode()
        command = b"*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$4\r\nADDR\r\n$%d\r\n%s\r\n" % (len(addr), addr)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(command)
            reply = s.recv(100)
            assert reply.startswith(b":1"), reply



class TwoNodesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redisServer = startRedis(self)
        self.dataDir = Path(self.mktemp()).resolve()
        writeUsers(self.dataDir, {"alice@localhost": PASSWORD})
        self.nodes = []
        for _ in range(2):
            config = makeConfig(
                self.dataDir,
                ("smtp", "imap"),
                watch="redis",
                cluster={"redis": f"redis://127.0.0.1:{self.redisServer.port}/0"},
            )
            node = MailService(config, reactor)
            # Polling (the fallback, idle while Redis is up) is quick here,
            # so that the fallback test does not wait five seconds.
            node.store.watcher.pollInterval = 0.2
            node.startService()
            self.addCleanup(node.stopService)
            self.nodes.append(node)
        yield defer.gatherResults(
            [lst.ready for node in self.nodes for lst in node.listeners.values()]
        )
        yield waitUntil(lambda: all(node.redis.answersPromptly for node in self.nodes))

    def idleOn(self, node: MailService) -> IMAPClient:
        client = IMAPClient(node.port("imap"))
        client.readLine()
        client.login()
        client.command(b"s SELECT INBOX")
        client.send(b"i IDLE\r\n")
        assert client.readLine() == b"+ idling"
        return client

    def deliverThrough(self, node: MailService, subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", node.port("smtp")) as s:
            s.sendmail("carol@remote.test", ["alice@localhost"], f"Subject: {subject}\r\n\r\nx\r\n")

    def deliveryHeard(self, deadline: float) -> bool:
        """
        An IDLE session on node 1 hears of a delivery through node 2 within
        C{deadline} seconds.
        """
        client = self.idleOn(self.nodes[0])
        try:
            self.deliverThrough(self.nodes[1], "from node 2")
            client.sock.settimeout(deadline)
            try:
                line = client.readLine()
            except (socket.timeout, TimeoutError):
                return False
            return line == b"* 1 EXISTS" or line.endswith(b" EXISTS")
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_idleHearsTheOtherNode(self):
        """
        With inotify off (watch = "redis"), an IDLE client on node 1 hears
        of mail that node 2 stored within half a second.
        """
        heard = yield threads.deferToThread(self.deliveryHeard, 0.5)
        self.assertTrue(heard)

    @defer.inlineCallbacks
    def test_redisAwayThenBack(self):
        """
        With Redis gone, both nodes keep receiving and IDLE falls back to
        polling; once Redis is back the nodes reconnect by themselves and
        notices flow again.
        """
        self.redisServer.stop()
        yield waitUntil(lambda: not any(node.redis.up for node in self.nodes))
        heard = yield threads.deferToThread(self.deliveryHeard, 5.0)
        self.assertTrue(heard, "polling did not take over")
        self.redisServer.start()
        # Both connections back (the subscription and the commands'), so
        # that the half-second below measures a notice, not a reconnection.
        yield waitUntil(
            lambda: all(node.redis.answersPromptly for node in self.nodes), timeout=20
        )
        # (While Redis is up, polling looks at nothing: only notices tell.)
        heard = yield threads.deferToThread(self.deliveryHeard, 0.5)
        self.assertTrue(heard, "notices did not come back with Redis")

    @defer.inlineCallbacks
    def test_noticeKeptWhileCommandsAreDown(self):
        """
        A node whose command connection to Redis dropped (its subscription
        and the other node's stay up, so nobody polls) keeps the notices it
        could not publish and sends them once it is connected again: an
        IDLE client on the other node still hears of the delivery.
        """
        commands = self.nodes[1].redis._commands.pool[0]
        self.redisServer.killClient(commands.transport.getHost().port)
        yield waitUntil(lambda: not self.nodes[1].redis._commands.size)
        # Both subscriptions are up: neither node polls.
        self.assertTrue(all(node.redis.up for node in self.nodes))
        heard = yield threads.deferToThread(self.deliveryHeard, 5.0)
        self.assertTrue(heard, "a notice lost while the command connection was down")


class ReconnectTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_keepsTryingAfterAFailedSelect(self):
        """
        A new command connection whose SELECT fails (a database Redis does
        not have yet; a reply timeout on a loaded machine fails it the
        same way) is tried again rather than given up for good, as
        txredisapi would: once Redis accepts it, the link answers.
        """
        server = startRedis(self, "--databases", "2")
        refusals = []

        def observe(event):
            if "could not set dbid" in str(event.get("log_text", "") or event.get("message", "")):
                refusals.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        link = RedisLink(f"redis://127.0.0.1:{server.port}/5", reactor)
        link.startService()
        self.addCleanup(link.stopService)
        yield waitUntil(lambda: refusals)
        self.assertFalse(link.answersPromptly)
        server.stop()
        server.start("--databases", "16")
        yield waitUntil(lambda: link.answersPromptly, timeout=20)
        self.assertEqual((yield link.call("ping")), "PONG")


class UnsentNoticeTests(unittest.SynchronousTestCase):
    def test_keptOnceAndBounded(self):
        """
        While Redis is away, what a node publishes is kept for later: the
        same message once (at its latest place), and past C{UNSENT_KEPT}
        the oldest go.
        """
        link = RedisLink("redis://127.0.0.1:1/0", task.Clock())
        link.UNSENT_KEPT = 2
        for key in ("a", "b", "a", "c"):
            self.successResultOf(link.publish("folder", key))
        self.assertEqual(list(link._unsent), [("folder", "a"), ("folder", "c")])
