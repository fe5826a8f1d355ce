"""
Failed-login delays and per-address connection counts shared by every
node and worker through Redis, so that an attacker cannot multiply the
allowed rate by the number of processes serving him.

Each process still counts by itself, and decides by itself at once while
Redis is away or slow (L{RedisLink.answersPromptly}): the limits then hold
per process, as without Redis, and never does a client get an error
because of Redis.  Its writes are still sent meanwhile, so the shared
numbers are right again as soon as Redis answers.

Keys (one Redis, shared by the cluster)::

    maild:failures:<address or "user NAME">   failed logins, expiring with the
                                              throttle's forget period
    maild:connections:<listener>:<address>    hash: member -> open connections
"""

from __future__ import annotations

import collections

from twisted.internet import defer

from maild.auth import LoginThrottle
from maild.cluster.link import RedisLink

FAILURES_PREFIX = "maild:failures:"
CONNECTIONS_PREFIX = "maild:connections:"
# A user name comes from the network: no more of it makes a key.
MAX_KEY_NAME = 256


class SharedLoginThrottle(LoginThrottle):
    """
    L{LoginThrottle}'s schedule over the failures counted by every node:
    a failure's delay follows the cluster's count for its key, and a
    successful login on any node starts it again.  This node's own count
    (kept too) decides while Redis cannot answer promptly.

    L{failed} returns a Deferred of the delay, which never fails.
    """

    def __init__(self, link: RedisLink, clock, *args, **kwargs) -> None:
        LoginThrottle.__init__(self, clock, *args, **kwargs)
        self.link = link

    def failed(self, key: str) -> defer.Deferred:
        localDelay = self.delay(self.record(key))
        answer = self.link.incrementWithExpiry(_failuresKey(key), self.forget)
        if not self.link.answersPromptly:
            answer.addErrback(lambda _: None)
            return defer.succeed(localDelay)
        answer.addCallback(lambda count: self.delay(int(count)))
        answer.addErrback(lambda _: localDelay)
        return answer

    def succeeded(self, key: str) -> None:
        LoginThrottle.succeeded(self, key)
        self.link.call("delete", _failuresKey(key)).addErrback(lambda _: None)


def _failuresKey(key: str) -> str:
    return FAILURES_PREFIX + key[:MAX_KEY_NAME]


class SharedConnectionCounts:
    """
    This node's open connections per listener and client address, as its
    share of cluster-wide totals in Redis (one hash per listener and
    address, one field per node); see L{maild.connections.LimitedFactory},
    which asks L{admit} before it starts a session.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._listeners: dict[str, collections.Counter[str]] = {}
        link.keepShares(self._writeAll)

    def track(self, listener: str, counts: collections.Counter[str]) -> "ListenerCounts":
        """
        Share C{counts}, a listener's open connections per address (which
        its factory keeps up to date).
        """
        self._listeners[listener] = counts
        return ListenerCounts(self, listener, counts)

    def _lifetime(self) -> float:
        return self.link.presenceLifetime

    def _writeAll(self) -> None:
        shares = {
            _connectionsKey(listener, host): count
            for listener, counts in self._listeners.items()
            for host, count in counts.items()
            if count > 0
        }
        if shares:
            self.link.setShares(shares, self._lifetime()).addErrback(lambda _: None)


class ListenerCounts:
    """
    One listener's side of L{SharedConnectionCounts}.
    """

    def __init__(self, shared: SharedConnectionCounts, listener: str, counts) -> None:
        self.shared = shared
        self.listener = listener
        self.counts = counts

    def admit(self, host: str, limit: int) -> defer.Deferred:
        """
        Write this node's count for C{host} (already counting the new
        connection) and learn whether the cluster's total stays within
        C{limit}.

        @return: a Deferred firing with True or False, never failing: True
            at once when Redis cannot answer promptly (this node's own
            count, checked by the caller, then decides).
        """
        answer = self._write(host)
        if not self.shared.link.answersPromptly:
            answer.addErrback(lambda _: None)
            return defer.succeed(True)
        answer.addCallback(lambda totals: int(totals[0]) <= limit)
        answer.addErrback(lambda _: True)
        return answer

    def changed(self, host: str) -> None:
        """
        Write this node's count for C{host} (a connection closed, or was
        refused after all).
        """
        self._write(host).addErrback(lambda _: None)

    def _write(self, host: str) -> defer.Deferred:
        # The count itself, never a difference: writes go out in order on
        # one connection, so the last one is always this node's true
        # count, whatever became of those before it.
        return self.shared.link.setShares(
            {_connectionsKey(self.listener, host): self.counts.get(host, 0)},
            self.shared._lifetime(),
        )


def _connectionsKey(listener: str, host: str) -> str:
    return f"{CONNECTIONS_PREFIX}{listener}:{host}"
