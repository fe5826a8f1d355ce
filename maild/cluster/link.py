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

Besides events, the link keeps two kinds of shared numbers, for whatever
needs them (maild.cluster.limits does): counters that expire
(L{RedisLink.incrementWithExpiry}), and totals made of one share per node
(L{RedisLink.setShares}), in which the share of a node that stopped
refreshing its presence (dead, or cut off from Redis) stops counting.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections import OrderedDict
from typing import Callable, Mapping

import txredisapi
from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from maild.config import parseRedisURL

log = Logger()

CHANNEL_PREFIX = "maild:"
# Where each node says it is alive: maild:node:<member>, with a TTL.
PRESENCE_PREFIX = "maild:node:"

# INCR then PEXPIRE, atomically: KEYS[1] the counter, ARGV[1] its
# lifetime in milliseconds.  Returns the new value.
_INCREMENT = """
local value = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return value
"""

# Set this node's share of each total, then add up the shares of the nodes
# still present (forgetting the others'), atomically.  KEYS: the totals
# (hashes of member -> share); ARGV[1]: this member, ARGV[2]: the presence
# key prefix, ARGV[3]: the totals' lifetime in milliseconds, ARGV[3 + i]:
# this member's share of KEYS[i] (0 removes it).  Returns the totals.
# (The presence keys are not in KEYS: this wants one Redis, not a Redis
# Cluster, which is what maild supports.)
_SET_SHARES = """
local totals = {}
for i, key in ipairs(KEYS) do
  local share = tonumber(ARGV[3 + i])
  if share > 0 then
    redis.call('HSET', key, ARGV[1], share)
    redis.call('PEXPIRE', key, ARGV[3])
  else
    redis.call('HDEL', key, ARGV[1])
  end
  local total = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    if fields[j] == ARGV[1] or redis.call('EXISTS', ARGV[2] .. fields[j]) == 1 then
      total = total + tonumber(fields[j + 1])
    else
      redis.call('HDEL', key, fields[j])
    end
  end
  totals[i] = total
end
return totals
"""


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        txredisapi.SubscriberProtocol.connectionMade(self)
        self.factory.link._subscriberUp(self)

    def connectionLost(self, reason):
        txredisapi.SubscriberProtocol.connectionLost(self, reason)
        self.factory.link._subscriberDown()

    def messageReceived(self, pattern, channel, message):
        self.factory.link._received(channel, message)


class _KeepTrying:
    """
    txredisapi stops reconnecting for good when AUTH or SELECT fails on a
    new connection, a reply timeout included (a loaded machine, a Redis
    just restarted): a node must go on reconnecting for as long as it
    runs, whatever the cause (a password fixed later on Redis's side too).
    """

    link: "RedisLink"

    def stopTrying(self):
        if self.link.running:
            return defer.succeed(None)
        return super().stopTrying()

    def connectionError(self, why):
        # txredisapi would fail the factory's first-connection Deferred,
        # which nobody waits for (an unhandled error); the next try may
        # well succeed.
        pass


class _SubscriberFactory(_KeepTrying, txredisapi.SubscriberFactory):
    protocol = _Subscriber
    # Come back quickly after Redis restarts; IDLE sessions rely on it.
    maxDelay = 2

    def __init__(self, link: "RedisLink") -> None:
        txredisapi.SubscriberFactory.__init__(self)
        self.link = link


class _CommandFactory(_KeepTrying, txredisapi.RedisFactory):
    def __init__(self, link: "RedisLink", *args, **kwargs) -> None:
        txredisapi.RedisFactory.__init__(self, *args, **kwargs)
        self.link = link

    def addConnection(self, conn) -> None:
        txredisapi.RedisFactory.addConnection(self, conn)
        if self.size:
            self.link._commandsUp()


class RedisLink(service.Service):
    """
    @ivar up: whether Redis answers (the subscription is connected and the
        last command did not fail or time out).
    @ivar member: this node's name in shared totals: the host, the process
        and a random incarnation that changes whenever writes may have been lost
        (Redis came back, a command failed), so that what an earlier
        incarnation wrote stops counting once its presence is gone.
    @param timeout: seconds a command may take before it counts as failed.
    @param presenceLifetime: seconds this node's shares keep counting after
        it last refreshed them (it does every third of that).
    @param slowPause: seconds L{answersPromptly} stays false after a
        command timed out (unless another answers meanwhile).
    @cvar UNSENT_KEPT: how many unpublished messages are kept for later
        (past that, the oldest go: by then the other nodes have long been
        polling, and look at everything when they reconnect).
    """

    name = "redis"
    UNSENT_KEPT = 10_000

    def __init__(
        self,
        url: str,
        reactor,
        timeout: float = 0.5,
        warnEvery: float = 60.0,
        presenceLifetime: float = 30.0,
        slowPause: float = 5.0,
    ) -> None:
        self.host, self.port, self.db, self.password = parseRedisURL(url)
        self.reactor = reactor
        self.timeout = timeout
        self.warnEvery = warnEvery
        self.presenceLifetime = presenceLifetime
        self.slowPause = slowPause
        self.up = False
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        self.member = self._newMember()
        # Whether Redis may have missed some of this member's writes.
        self._stale = True
        self._slowUntil = 0.0
        self._lastSlowWarning: float | None = None
        self._listeners: dict[str, list[Callable[[str], None]]] = {}
        self._shareKeepers: list[Callable[[], None]] = []
        self._commands = None
        self._subscriberFactory: _SubscriberFactory | None = None
        # (channel, message) not yet published, oldest first, each once.
        self._unsent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._warner: task.LoopingCall | None = None
        self._presence: task.LoopingCall | None = None

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
        self._presence = task.LoopingCall(self._refreshPresence)
        self._presence.clock = self.reactor
        self._presence.start(self.presenceLifetime / 3, now=False)

    def stopService(self):
        service.Service.stopService(self)
        for loop in (self._warner, self._presence):
            if loop is not None and loop.running:
                loop.stop()
        # Our shares stop counting now rather than when they expire.
        goodbye = self.call("delete", PRESENCE_PREFIX + self.member)
        # Commands asked from now on (sessions closing) fail at once.
        self.up = False

        def disconnect(_):
            stopped = [
                f.disconnect() for f in (self._commands, self._subscriberFactory) if f is not None
            ]
            return defer.gatherResults(stopped, consumeErrors=True)

        return goodbye.addBoth(disconnect).addErrback(lambda _: None)

    def _warnIfDown(self) -> None:
        if not self._commandsReady():
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
        # The folders are looked at again once Redis confirms the
        # subscription: a notice published after that look is sure to arrive.
        d = protocol.psubscribe(CHANNEL_PREFIX + "*")
        d.addCallbacks(lambda _: self._subscribed(protocol), lambda _: None)
        if not self.up:
            log.info("Redis at {host}:{port} reached", host=self.host, port=self.port)
        self.up = True
        # Redis may be a new one, or have missed writes while away.
        self._stale = True
        self._refreshPresence()

    def _subscribed(self, protocol) -> None:
        if not protocol.connected:
            return
        for callback in self._listeners.get("reconnected", []):
            callback("")
        self._sendUnsent()

    def _subscriberDown(self) -> None:
        if self.up:
            log.warn("lost Redis at {host}:{port}; reconnecting", host=self.host, port=self.port)
        self.up = False

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
        ready = self._commandsReady()
        d = defer.maybeDeferred(getattr(self._commands.handler, command), *args)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._answered, self._failed, errbackArgs=(ready,))
        return d

    @property
    def answersPromptly(self) -> bool:
        """
        Whether a caller should wait for Redis's answer: it is up, and no
        command timed out in the last C{slowPause} seconds (since when none
        answered either).  Callers that cannot wait decide by themselves
        at once, and may still send their writes.
        """
        return self._commandsReady() and self.reactor.seconds() >= self._slowUntil

    def _commandsReady(self) -> bool:
        # The command connection comes back on its own schedule (after a
        # command timed out, say): commands sent meanwhile wait for it (up
        # to the deadline), but nobody should wait for their answers.
        return self.up and self._commands is not None and self._commands.size > 0

    def _commandsUp(self) -> None:
        # What went over the previous command connection may be lost.
        self._stale = True
        self._refreshPresence()
        self._sendUnsent()

    def _answered(self, result):
        self._slowUntil = 0.0
        return result

    def _failed(self, reason, ready: bool):
        # The command may or may not have been carried out: whatever this
        # member has written is suspect until written again.
        self._stale = True
        # (A command that waited for a connection still on its way back is
        # not a sign of a slow Redis.)
        if ready and reason.check(
            defer.TimeoutError, defer.CancelledError, txredisapi.TimeoutError
        ):
            now = self.reactor.seconds()
            self._slowUntil = now + self.slowPause
            if self._lastSlowWarning is None or now - self._lastSlowWarning >= self.warnEvery:
                self._lastSlowWarning = now
                log.warn(
                    "Redis at {host}:{port} did not answer within {timeout} s: "
                    "this node counts by itself for now",
                    host=self.host, port=self.port, timeout=self.timeout,
                )
        return reason

    # Shared numbers ------------------------------------------------------

    def incrementWithExpiry(self, key: str, lifetime: float) -> defer.Deferred:
        """
        Add one to the counter C{key} and have it expire C{lifetime}
        seconds from now, atomically.

        @return: a Deferred firing with the counter's new value.
        """
        return self.call("eval", _INCREMENT, [key], [_milliseconds(lifetime)])

    def setShares(self, shares: Mapping[str, int], lifetime: float) -> defer.Deferred:
        """
        Set this node's share of each total in C{shares} (key -> share, 0
        for none), atomically, and learn the totals: the shares of every
        node whose presence is current.  A total nobody writes expires
        C{lifetime} seconds after the last write.

        @return: a Deferred firing with the totals, in C{shares}' order.
        """
        keys = list(shares)
        args = [self.member, PRESENCE_PREFIX, _milliseconds(lifetime)]
        args += [int(shares[key]) for key in keys]
        return self.call("eval", _SET_SHARES, keys, args)

    def keepShares(self, callback: Callable[[], None]) -> None:
        """
        Have C{callback()} write all this node's shares again (with
        L{setShares}) every third of C{presenceLifetime}, and as soon as
        Redis is back: so a total never keeps a share nobody holds, nor
        loses one still held, for longer than that.
        """
        self._shareKeepers.append(callback)

    def _refreshPresence(self) -> None:
        if not self._commandsReady():
            return
        lifetime = _milliseconds(self.presenceLifetime)
        if self._stale:
            # A new incarnation: the old one's shares stop counting at once.
            self._stale = False
            old, self.member = self.member, self._newMember()
            log.info(
                "Redis at {host}:{port}: sharing counts as {member}",
                host=self.host, port=self.port, member=self.member,
            )
            self.call("delete", PRESENCE_PREFIX + old).addErrback(lambda _: None)
        self.call("set", PRESENCE_PREFIX + self.member, 1, None, lifetime).addErrback(
            lambda _: None
        )
        for keeper in self._shareKeepers:
            try:
                keeper()
            except Exception:
                log.failure("writing this node's shares to Redis")


    def _newMember(self) -> str:
        # Random, not a count: two links in one process (tests) or a
        # process reusing a dead one's pid must not share a name.
        return f"{self.node}:{secrets.token_hex(4)}"


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))
