"""
Per-client-address connection limits, shared by every listener's factory,
and the trusted networks exempt from them.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Iterable

from twisted.internet import defer, protocol


def clientHost(address) -> str:
    """
    The client's IP address as text (or the peer's description for
    transports that have no IP, such as UNIX sockets).
    """
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else str(address)


class TrustedNetworks:
    """
    The C{[limits] trusted_networks}: the host's own applications and a
    webmail in front of maild, which speak for many users from one
    address.  Transports without an IP address (UNIX sockets) are local,
    and trusted.
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __contains__(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return not host[:1].isdigit() and ":" not in host
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class _Refusal(protocol.Protocol):
    """
    Says why the connection is refused, then closes it.
    """

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line + b"\r\n")
        self.transport.loseConnection()


class LimitedFactory(protocol.ServerFactory):
    """
    A server factory that admits at most C{limit} connections per client
    address, outside C{trusted} networks; the others get C{refusal} and are
    closed, while every other address goes on being served.  Protocols
    built here must call L{connectionClosed} from their C{connectionLost}.

    Each session gets C{peerAddress}, the address it connects from, and
    C{clientAddress}, the one its logs and login throttling name (the same,
    unless a trusted peer says whom it speaks for), and C{peerTrusted}.

    @cvar refusal: the protocol's own way of saying "too many connections".
    """

    refusal = b""
    # Said to every open session when the daemon stops.
    goodbye = b""
    # Every session is logged by the protocol; Twisted's start/stop lines
    # would only add noise.
    noisy = False

    def __init__(self, limit: int, trusted: Iterable[str] = ()) -> None:
        self.limit = limit
        self.trusted = TrustedNetworks(trusted)
        self.connections: collections.Counter[str] = collections.Counter()
        self.sessions: set = set()

    def buildProtocol(self, addr):
        host = clientHost(addr)
        trusted = host in self.trusted
        if self.connections[host] >= self.limit and not trusted:
            return _Refusal(self.refusal)
        self.connections[host] += 1
        session = self.buildSession(addr)
        session.factory = self
        session.peerAddress = session.clientAddress = host
        session.peerTrusted = trusted
        self.sessions.add(session)
        return session

    def buildSession(self, addr):
        raise NotImplementedError

    def closeSessions(self, clock, grace: float = 5.0) -> defer.Deferred:
        """
        Say goodbye to every session and close it (the daemon is stopping).

        @return: a Deferred that fires once all are closed; those still open
            after C{grace} seconds are aborted.
        """
        if not self.sessions:
            return defer.succeed(None)
        for session in list(self.sessions):
            transport = session.transport
            if transport is not None and not transport.disconnecting:
                if self.goodbye:
                    transport.write(self.goodbye + b"\r\n")
                # A session registered as its transport's producer would
                # hold the connection open.
                transport.unregisterProducer()
                transport.loseConnection()
        self._allClosed = defer.Deferred()
        abort = clock.callLater(grace, self._abortSessions)
        self._allClosed.addBoth(lambda result: abort.active() and abort.cancel())
        return self._allClosed

    def _abortSessions(self) -> None:
        for session in list(self.sessions):
            session.transport.abortConnection()

    def connectionClosed(self, session) -> None:
        self.sessions.discard(session)
        if not self.sessions and getattr(self, "_allClosed", None) is not None:
            allClosed, self._allClosed = self._allClosed, None
            allClosed.callback(None)
        host = session.peerAddress
        self.connections[host] -= 1
        if self.connections[host] <= 0:
            del self.connections[host]
