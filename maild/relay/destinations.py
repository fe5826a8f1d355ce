"""
Where mail for a domain goes next: the route configured for it
(C{[relay.routes]}, like Postfix's transport map), else the smarthost,
else the domain's MX hosts (RFC 5321 section 5.1), all looked up with the
one C{twisted.names} resolver.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.names import dns
from twisted.names import error as dnserror

from maild.config import RelaySettings


@dataclass(frozen=True)
class NextHop:
    """
    A server to try: its name (for TLS and the log) and port.
    """

    host: str
    port: int


class DestinationError(Exception):
    """
    No server can be found for a domain.  C{permanent}: it never will be
    (no such domain, a null MX); otherwise try again later.
    """

    def __init__(self, reason: str, status: str, permanent: bool) -> None:
        super().__init__(reason)
        self.status = status
        self.permanent = permanent


def parseHostPort(text: str, defaultPort: int) -> NextHop:
    """
    C{"host"}, C{"host:port"} or C{"[v6 address]:port"}.

    @raise ValueError: if the port is not a number.
    """
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return NextHop(host, int(rest.lstrip(":") or defaultPort))
    if text.count(":") == 1:
        host, port = text.split(":")
        return NextHop(host, int(port))
    return NextHop(text, defaultPort)


class Destinations:
    """
    @param makeResolver: gives the resolver, on first need (the system's
        re-reads C{/etc/resolv.conf} on a timer once made).
    """

    def __init__(self, settings: RelaySettings, makeResolver) -> None:
        self.settings = settings
        self._makeResolver = makeResolver
        self._resolver = None

    @property
    def resolver(self):
        if self._resolver is None:
            self._resolver = self._makeResolver()
        return self._resolver

    def isSmarthost(self, domain: str) -> bool:
        return bool(self.settings.smarthost) and domain not in self.settings.routes

    @defer.inlineCallbacks
    def nextHops(self, domain: str):
        """
        The servers to try for C{domain}, best first.

        @raise DestinationError: if there are none.
        """
        route = self.settings.routes.get(domain)
        if route:
            return [parseHostPort(route, self.settings.mx_port)]
        if self.settings.smarthost:
            return [parseHostPort(self.settings.smarthost, 587)]
        try:
            answers, _, _ = yield self.resolver.lookupMailExchange(domain)
        except dnserror.DNSNameError:
            raise DestinationError(f"domain {domain} does not exist", "5.1.2", True)
        except Exception as e:
            raise DestinationError(f"MX lookup for {domain} failed: {_describe(e)}", "4.4.3", False)
        records = [a.payload for a in answers if a.type == dns.MX]
        if not records:
            # RFC 5321 section 5.1: no MX, the domain itself is the host.
            return [NextHop(domain, self.settings.mx_port)]
        if any(str(r.name) in ("", ".") for r in records):
            # RFC 7505: a null MX says the domain accepts no mail.
            raise DestinationError(f"domain {domain} accepts no mail (null MX)", "5.1.10", True)
        # RFC 5321 section 5.1: by preference, in random order among equals.
        records.sort(key=lambda r: (r.preference, random.random()))
        return [NextHop(str(r.name).rstrip("."), self.settings.mx_port) for r in records]

    @defer.inlineCallbacks
    def addresses(self, host: str):
        """
        The IP addresses of C{host}: IPv4 first, then IPv6.

        @raise DestinationError: if it has none.
        """
        if isIPAddress(host) or isIPv6Address(host):
            return [host]
        found: list[str] = []
        problems = []
        for lookup in (self.resolver.lookupAddress, self.resolver.lookupIPV6Address):
            try:
                answers, _, _ = yield lookup(host)
            except Exception as e:
                problems.append(_describe(e))
                continue
            for answer in answers:
                if answer.type == dns.A:
                    found.append(answer.payload.dottedQuad())
                elif answer.type == dns.AAAA:
                    found.append(socket.inet_ntop(socket.AF_INET6, answer.payload.address))
        if not found:
            reason = "; ".join(problems) or "no address records"
            raise DestinationError(f"cannot find the address of {host}: {reason}", "4.4.4", False)
        return found


def _describe(e: Exception) -> str:
    if isinstance(e, dnserror.DomainError):
        return "not found"
    if isinstance(e, (dnserror.DNSQueryTimeoutError, defer.TimeoutError)):
        return "timeout"
    return e.__class__.__name__
