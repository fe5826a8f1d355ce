"""
One node's link to Redis: a connection for commands and one subscribed to
maild's channels, both reconnecting by themselves (txredisapi, in the
reactor, never a blocking call).

Every command has a short deadline: a Redis that hangs is treated as one
that is down, so a login or a delivery never waits on it.  A message that
could not be published is kept and published once Redis takes commands
again: the two connections come back at different moments, and a notice
lost while the other nodes' subscriptions are up (so they do not poll)
would leave their IDLE clients unaware of a change.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from typing import Callable

import txredisapi
from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from maild.config import parseRedisURL

log = Logger()

CHANNEL_PREFIX = "maild:"


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        txredisapi.SubscriberProtocol.connectionMade(self)
        self.factory.link._subscriberUp(self)

    def connectionLost(self, reason):
        txredisapi.SubscriberProtocol.connectionLost(self, reason)
        self.factory.link._subscriberDown()

    def messageReceived(self, pattern, channel, message):
        self.factory.link._received(channel, message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber
    # Come back quickly after Redis restarts; IDLE sessions rely on it.
    maxDelay = 2

    def __init__(self, link: "RedisLink") -> None:
        txredisapi.SubscriberFactory.__init__(self)
        self.link = link


class _CommandFactory(txredisapi.RedisFactory):
    def __init__(self, link: "RedisLink", *args, **kwargs) -> None:
        txredisapi.RedisFactory.__init__(self, *args, **kwargs)
        self.link = link

    def addConnection(self, conn) -> None:
        txredisapi.RedisFactory.addConnection(self, conn)
        if self.size:
            self.link._commandsUp()

    def delConnection(self, conn) -> None:
        txredisapi.RedisFactory.delConnection(self, conn)
        self.link._linkChanged()


class RedisLink(service.Service):
    """
    @ivar up: whether Redis is reachable: the subscription is confirmed and
        a connection for commands is ready.  The two come back at different
        moments after Redis restarts; only with both is this node's news
        sure to go out and the others' to come in.
    @param timeout: seconds a command may take before it counts as failed.
    @cvar UNSENT_KEPT: how many unpublished messages are kept for later
        (past that, the oldest go: by then the other nodes have long been
        polling, and look at everything when they reconnect).
    """

    name = "redis"
    UNSENT_KEPT = 10_000

    def __init__(self, url: str, reactor, timeout: float = 0.5, warnEvery: float = 60.0) -> None:
        self.host, self.port, self.db, self.password = parseRedisURL(url)
        self.reactor = reactor
        self.timeout = timeout
        self.warnEvery = warnEvery
        self.up = False
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        self._listeners: dict[str, list[Callable[[str], None]]] = {}
        self._commands = None
        self._subscriberFactory: _SubscriberFactory | None = None
        self._subscribed = False
        # (channel, message) not yet published, oldest first, each once.
        self._unsent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._warner: task.LoopingCall | None = None

    def startService(self) -> None:
        service.Service.startService(self)
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=2)
        self._commands = _CommandFactory(
            self, None, self.db, 1, isLazy=True, password=self.password, replyTimeout=self.timeout
        )
        self._commands.maxDelay = 2
        self._commands.startConnecting(endpoint)
        self._subscriberFactory = _SubscriberFactory(self)
        self._subscriberFactory.password = self.password
        self._subscriberFactory.startConnecting(endpoint)
        self._warner = task.LoopingCall(self._warnIfDown)
        self._warner.clock = self.reactor
        self._warner.start(self.warnEvery, now=False)

    def stopService(self):
        service.Service.stopService(self)
        if self._warner is not None and self._warner.running:
            self._warner.stop()
        stopped = [f.disconnect() for f in (self._commands, self._subscriberFactory) if f is not None]
        return defer.gatherResults(stopped, consumeErrors=True).addErrback(lambda _: None)

    def _warnIfDown(self) -> None:
        if not self.up:
            log.warn(
                "Redis at {host}:{port} is unreachable: this node counts and polls by itself",
                host=self.host, port=self.port,
            )

    # Events --------------------------------------------------------------

    def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """
        Call C{callback(message)} for each message published on C{channel}
        by any node (this one included).
        """
        self._listeners.setdefault(channel, []).append(callback)

    def publish(self, channel: str, message: str) -> defer.Deferred:
        """
        Publish C{message} on C{channel}; when Redis cannot take it now, it
        is kept and published once Redis takes commands again.  (The same
        message kept twice is published once: a notice says that something
        changed, not how often.)

        @return: a Deferred that fires with None, whichever happened.
        """
        d = self.call("publish", CHANNEL_PREFIX + channel, message)
        d.addCallbacks(self._published, lambda _: self._keepUnsent(channel, message))
        return d

    def _published(self, _) -> None:
        # Redis answers again (after a command that timed out, say).
        if self._unsent:
            self._sendUnsent()

    def _keepUnsent(self, channel: str, message: str) -> None:
        unsent = self._unsent
        unsent[(channel, message)] = None
        unsent.move_to_end((channel, message))
        while len(unsent) > self.UNSENT_KEPT:
            unsent.popitem(last=False)

    def _sendUnsent(self) -> None:
        """
        Publish what could not be published before (what fails again is
        kept again).
        """
        if not self.up or not self._unsent:
            return
        unsent, self._unsent = self._unsent, OrderedDict()
        for channel, message in unsent:
            self.publish(channel, message)

    def _subscriberUp(self, protocol) -> None:
        # Up only once Redis confirms the subscription: the folders are
        # looked at again then, and a notice published after that look is
        # sure to arrive.
        d = protocol.psubscribe(CHANNEL_PREFIX + "*")
        d.addCallbacks(lambda _: self._confirmed(protocol), lambda _: protocol.transport.loseConnection())

    def _confirmed(self, protocol) -> None:
        if protocol.connected:
            self._subscribed = True
            self._linkChanged()

    def _subscriberDown(self) -> None:
        self._subscribed = False
        self._linkChanged()

    def _commandsUp(self) -> None:
        self._linkChanged()

    def _linkChanged(self) -> None:
        """
        One of the two connections came or went: say so when Redis is
        reached or lost as a whole.  Once reached, the listeners of
        C{"reconnected"} look at everything again (notices sent meanwhile
        were lost) and what this node could not publish goes out.
        """
        up = self._subscribed and self._commands is not None and bool(self._commands.pool)
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("Redis at {host}:{port} reached", host=self.host, port=self.port)
            for callback in self._listeners.get("reconnected", []):
                callback("")
            self._sendUnsent()
        else:
            log.warn("lost Redis at {host}:{port}; reconnecting", host=self.host, port=self.port)

    def _received(self, channel, message) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        for callback in self._listeners.get(channel[len(CHANNEL_PREFIX):], []):
            try:
                callback(message)
            except Exception:
                log.failure("handling a Redis message on {channel}", channel=channel)

    # Commands ------------------------------------------------------------

    def call(self, command: str, *args) -> defer.Deferred:
        """
        Run one Redis command; fails at once when Redis is down, and after
        C{timeout} seconds when it does not answer.
        """
        if not self.up or self._commands is None:
            return defer.fail(txredisapi.ConnectionError("Redis is unreachable"))
        d = defer.maybeDeferred(getattr(self._commands.handler, command), *args)
        d.addTimeout(self.timeout, self.reactor)
        return d
