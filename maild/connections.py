"""
Per-client-address connection limits, shared by every listener's factory.
"""

from __future__ import annotations

import collections

from twisted.internet import protocol


def clientHost(address) -> str:
    """
    The client's IP address as text (or the peer's description for
    transports that have no IP, such as UNIX sockets).
    """
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else str(address)


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
    address; the others get C{refusal} and are closed, while every other
    address goes on being served.  Protocols built here must call
    L{connectionClosed} from their C{connectionLost}.

    @cvar refusal: the protocol's own way of saying "too many connections".
    """

    refusal = b""
    # Said to every open session when the daemon stops.
    goodbye = b""
    # Every session is logged by the protocol; Twisted's start/stop lines
    # would only add noise.
    noisy = False

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.connections: collections.Counter[str] = collections.Counter()
        self.sessions: set = set()

    def buildProtocol(self, addr):
        host = clientHost(addr)
        if self.connections[host] >= self.limit:
            return _Refusal(self.refusal)
        self.connections[host] += 1
        session = self.buildSession(addr)
        session.factory = self
        session.clientAddress = host
        self.sessions.add(session)
        return session

    def buildSession(self, addr):
        raise NotImplementedError

    def closeSessions(self) -> None:
        """
        Say goodbye to every session and close it (the daemon is stopping).
        """
        for session in list(self.sessions):
            transport = session.transport
            if transport is not None and not transport.disconnecting:
                if self.goodbye:
                    transport.write(self.goodbye + b"\r\n")
                transport.loseConnection()

    def connectionClosed(self, session) -> None:
        self.sessions.discard(session)
        host = session.clientAddress
        self.connections[host] -= 1
        if self.connections[host] <= 0:
            del self.connections[host]
