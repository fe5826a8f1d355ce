"""
Per-client-address connection limits, shared by every listener's factory,
the trusted networks exempt from them, and the socket option every
request/response connection wants.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Iterable

from twisted.internet import defer, protocol
from twisted.protocols import policies
from zope.interface import directlyProvides, providedBy


def sendWithoutDelay(transport) -> None:
    """
    Turn Nagle's algorithm off where the transport has it (TCP): each
    write of a request/response protocol goes out at once, instead of its
    last segment waiting for the peer's delayed ACK (tens of milliseconds
    per exchange).
    """
    noDelay = getattr(transport, "setTcpNoDelay", None)
    if noDelay is not None:
        try:
            noDelay(True)
        except OSError:
            pass


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


class _Admission(policies.ProtocolWrapper):
    """
    Holds a new connection while the cluster's count for its address is
    asked (L{LimitedFactory.shared}), then starts its session, or refuses
    it.  The session's greeting waits meanwhile (a round trip to Redis, at
    most its deadline); whatever the client sends early is kept for it.
    """

    # Beyond this much early data the client is not waiting for a
    # greeting: it is closed.
    MAX_EARLY = 64 * 1024

    def __init__(self, factory: "LimitedFactory", addr, host: str) -> None:
        policies.ProtocolWrapper.__init__(self, factory, None)
        self.addr = addr
        self.host = host
        self._early: list[bytes] = []

    def makeConnection(self, transport) -> None:
        # Not ProtocolWrapper's: the session is made once admitted.
        self.connected = True
        self.transport = transport
        self.factory.shared.admit(self.host, self.factory.limit).addCallback(self._decided)

    def _decided(self, admitted: bool) -> None:
        factory = self.factory
        if not self.connected:
            factory._release(self.host)
            return
        if not admitted:
            factory._release(self.host)
            _Refusal(factory.refusal).makeConnection(self.transport)
            return
        self.wrappedProtocol = factory._startSession(self.addr, self.host, False)
        directlyProvides(self, providedBy(self.transport))
        self.wrappedProtocol.makeConnection(self)
        early, self._early = b"".join(self._early), []
        if early and self.connected:
            self.wrappedProtocol.dataReceived(early)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        self._early.append(data)
        if sum(map(len, self._early)) > self.MAX_EARLY:
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.connected = False
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)

    def logPrefix(self) -> str:
        if self.wrappedProtocol is not None:
            return policies.ProtocolWrapper.logPrefix(self)
        return self.__class__.__name__


class LimitedFactory(protocol.ServerFactory):
    """
    A server factory that admits at most C{limit} connections per client
    address, outside C{trusted} networks; the others get C{refusal} and are
    closed, while every other address goes on being served.  Protocols
    built here must call L{connectionClosed} from their C{connectionLost}.

    With C{shared} set (a L{maild.cluster.limits.ListenerCounts}: the
    C{[cluster] redis} setting), the limit holds over every node and
    worker: a connection this process would admit waits for the cluster's
    count before its session starts (or at once, by this count alone, when
    Redis cannot answer promptly).

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

    shared = None

    def __init__(self, limit: int, trusted: Iterable[str] = ()) -> None:
        self.limit = limit
        self.trusted = TrustedNetworks(trusted)
        self.connections: collections.Counter[str] = collections.Counter()
        self.sessions: set = set()

    def buildProtocol(self, addr):
        host = clientHost(addr)
        trusted = host in self.trusted
        # This process's own count decides first: the cluster's is never
        # below it.
        if self.connections[host] >= self.limit and not trusted:
            return _Refusal(self.refusal)
        self.connections[host] += 1
        if self.shared is not None and not trusted:
            return _Admission(self, addr, host)
        return self._startSession(addr, host, trusted)

    def _startSession(self, addr, host: str, trusted: bool):
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
        self._release(session.peerAddress)

    def _release(self, host: str) -> None:
        self.connections[host] -= 1
        if self.connections[host] <= 0:
            del self.connections[host]
        if self.shared is not None and host not in self.trusted:
            self.shared.changed(host)
