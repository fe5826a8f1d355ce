"""
Leases in Redis: a claim on a named thing (a queued message) that one
node holds at a time and that lapses unless its holder renews it, so a
node that dies gives up its claims after the lease time without anyone
having to notice.

A lease is the key C{maild:lease:<name>} holding the node's name, taken
with C{SET ... NX PX} (the pattern of the Redis documentation on SET),
renewed together with every other lease the node holds a few times per
lease time, and removed on release, each only while it still holds this
node's name (a check and a change in one Lua script, atomic in Redis).
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from maild.cluster.link import RedisLink

log = Logger()

KEY_PREFIX = "maild:lease:"

# Renew every lease of ours; answer the names of those no longer ours.
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then
    redis.call('pexpire', key, ARGV[2])
  else
    table.insert(lost, key)
  end
end
return lost
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Leases:
    """
    This node's leases, renewed while held.

    @param duration: seconds a lease lasts without renewal; renewed every
        third of it.
    """

    def __init__(self, link: RedisLink, duration: float, clock) -> None:
        self.link = link
        self.duration = duration
        self.held: set[str] = set()
        self._renewer = task.LoopingCall(self._renew)
        self._renewer.clock = clock

    def start(self) -> None:
        self._renewer.start(self.duration / 3, now=False)

    def stop(self) -> None:
        if self._renewer.running:
            self._renewer.stop()

    @property
    def _milliseconds(self) -> int:
        return max(int(self.duration * 1000), 1)

    def acquire(self, name: str) -> defer.Deferred:
        """
        Take the lease on C{name}.

        @return: a Deferred firing with True (taken), False (another node
            holds it) or None (Redis cannot be reached, or was slow a
            moment ago: the caller decides without it).
        """
        if not self.link.answersPromptly:
            # Down, or slow a moment ago: the attempt does not wait for it.
            return defer.succeed(None)
        d = self.link.call("set", KEY_PREFIX + name, self.link.node, None, self._milliseconds, True)

        def taken(reply) -> bool:
            if reply is None:
                return False
            self.held.add(name)
            return True

        return d.addCallbacks(taken, lambda _: None)

    def holder(self, name: str) -> defer.Deferred:
        """
        The node holding C{name}'s lease, or None (for logs and tests).
        """
        return self.link.call("get", KEY_PREFIX + name)

    def release(self, name: str) -> None:
        """
        Give the lease on C{name} up, if it is still ours (if Redis cannot
        be reached, it lapses by itself).
        """
        if name in self.held:
            self.held.discard(name)
            d = self.link.call("eval", _RELEASE, [KEY_PREFIX + name], [self.link.node])
            d.addErrback(lambda _: None)

    def _renew(self) -> defer.Deferred | None:
        if not self.held:
            return None
        names = sorted(self.held)
        d = self.link.call(
            "eval", _RENEW, [KEY_PREFIX + name for name in names], [self.link.node, self._milliseconds]
        )

        def checked(lost) -> None:
            names = [
                (key.decode("utf-8", "replace") if isinstance(key, bytes) else key)[len(KEY_PREFIX):]
                for key in lost or ()
            ]
            if names:
                self.held.difference_update(names)
                # Redis restarted empty, or was away longer than a lease.
                log.warn(
                    "{count} message leases lost (first: {name}); their file locks still keep other nodes off",
                    count=len(names), name=names[0],
                )

        # Redis away: the leases may lapse; the file locks still hold.
        return d.addCallbacks(checked, lambda _: None)
