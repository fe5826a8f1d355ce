"""
The one DNS resolver every part of maild asks (outbound MX lookups, SPF,
DKIM and DMARC checks): C{twisted.names}, never a blocking call in the
reactor.
"""

from __future__ import annotations

from twisted.names import client
from twisted.names.common import ResolverBase

from maild.config import DNSSettings


def parseNameserver(text: str) -> tuple[str, int]:
    """
    C{"host"}, C{"host:port"}, C{"[v6]:port"} or a bare IPv6 address as
    a C{(host, port)} pair; the port defaults to 53.
    """
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def makeResolver(settings: DNSSettings) -> ResolverBase:
    """
    A resolver asking only C{settings.nameservers} (no hosts file), or the
    system's servers (C{/etc/resolv.conf}) when none are configured.
    """
    if settings.nameservers:
        servers = [parseNameserver(s) for s in settings.nameservers]
        return client.Resolver(servers=servers)
    return client.createResolver()
