"""
What several maild processes or nodes share in real time, through Redis
(C{[cluster] redis}): folder change events (so IDLE hears of mail another
node stored), failed-login counts and per-address connection counts (so
an attacker cannot multiply the allowed rate by the number of nodes:
maild.cluster.limits).

Redis is a help, never a dependency: while it is unreachable every node
goes on serving with what it knows by itself (polling for changes,
counting failures locally), logs a warning each minute, and reconnects by
itself.
"""

from maild.cluster.link import RedisLink

__all__ = ["RedisLink"]
