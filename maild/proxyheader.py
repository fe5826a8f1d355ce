"""
The PROXY protocol (HAProxy's, versions 1 and 2) in front of any listener:
a load balancer tells us who its client really is, so that logs,
per-address limits, failed-login delays and C{Received:} headers name the
client rather than the balancer.

Twisted's C{haproxy:} endpoint builds the protocol before the header has
arrived, so the protocol's factory sees only the balancer's address; here
the session is built once the header is read, from the address it gives.
Only the proxies listed in C{[cluster] trusted_proxies} may send a header;
a connection from elsewhere, or without a valid header, is closed.
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet import address as addresses
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.protocols import policies

from maild.auth import isTrusted

log = Logger()

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A v1 header is at most 107 octets with its CRLF (the spec's figure).
V1_MAX = 107
# A v2 header: 16 octets, then at most this much address and TLV data.
V2_MAX_BODY = 2048


class InvalidHeader(ValueError):
    pass


def parseHeader(data: bytes) -> tuple[IAddress | None, int] | None:
    """
    Parse a PROXY header at the start of C{data}.

    @return: None when more data is needed; else the client's address
        (None for a LOCAL or UNKNOWN header: the connection is the proxy's
        own, a health check say) and the number of octets the header took.
    @raise InvalidHeader: it is not a valid header.
    """
    if not data:
        return None
    if V2_SIGNATURE.startswith(data[:12]):
        return _parseV2(data)
    if b"PROXY ".startswith(data[:6]):
        return _parseV1(data)
    raise InvalidHeader("not a PROXY protocol header")


def _parseV1(data: bytes) -> tuple[IAddress | None, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise InvalidHeader("PROXY v1 header too long")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return None, end + 2
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise InvalidHeader("malformed PROXY v1 header")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        ipaddress.ip_address(fields[3].decode("ascii"))
        port = _port(fields[4])
        _port(fields[5])
    except (ValueError, UnicodeDecodeError):
        raise InvalidHeader("malformed PROXY v1 address")
    if (source.version == 4) != (fields[1] == b"TCP4"):
        raise InvalidHeader("PROXY v1 address of the wrong family")
    kind = addresses.IPv4Address if source.version == 4 else addresses.IPv6Address
    return kind("TCP", str(source), port), end + 2


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ValueError(text)
    port = int(text)
    if port > 65535:
        raise ValueError(text)
    return port


def _parseV2(data: bytes) -> tuple[IAddress | None, int] | None:
    if len(data) < 16:
        return None
    versionCommand, familyProtocol, length = struct.unpack("!BBH", data[12:16])
    if versionCommand >> 4 != 2:
        raise InvalidHeader("unknown PROXY protocol version")
    command = versionCommand & 0x0F
    if command not in (0, 1) or length > V2_MAX_BODY:
        raise InvalidHeader("malformed PROXY v2 header")
    if len(data) < 16 + length:
        return None
    body = data[16 : 16 + length]
    used = 16 + length
    if command == 0:
        # LOCAL: the proxy speaking for itself.
        return None, used
    if familyProtocol == 0x11 and length >= 12:
        source = ipaddress.IPv4Address(body[0:4])
        (port,) = struct.unpack("!H", body[8:10])
        return addresses.IPv4Address("TCP", str(source), port), used
    if familyProtocol == 0x21 and length >= 36:
        source = ipaddress.IPv6Address(body[0:16])
        (port,) = struct.unpack("!H", body[32:34])
        return addresses.IPv6Address("TCP", str(source), port), used
    if familyProtocol == 0x00:
        return None, used
    raise InvalidHeader("unsupported PROXY v2 address family")


class _ProxiedSession(policies.ProtocolWrapper):
    """
    Reads the header, then builds the session with the client's address
    and stands between it and the connection (as its transport, whose
    C{getPeer} is the client).
    """

    def __init__(self, factory: "ProxyHeaderFactory", proxyAddress) -> None:
        policies.ProtocolWrapper.__init__(self, factory, None)
        self.proxyAddress = proxyAddress
        self.client: IAddress | None = None
        self._buffer = b""
        self._deadline = None

    def makeConnection(self, transport) -> None:
        # Not ProtocolWrapper's: the session is made once the header is in.
        self.connected = True
        self.transport = transport
        self._deadline = self.factory.clock.callLater(
            self.factory.headerTimeout, self._refuse, "no PROXY header in time"
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        try:
            parsed = parseHeader(self._buffer)
        except InvalidHeader as e:
            self._refuse(str(e))
            return
        if parsed is None:
            return
        self.client, used = parsed
        rest, self._buffer = self._buffer[used:], b""
        self._cancelDeadline()
        session = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if session is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = session
        policies.ProtocolWrapper.makeConnection(self, self.transport)
        if rest:
            session.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        self._cancelDeadline()
        log.warn(
            "closed a connection from proxy {proxy}: {why}", proxy=self.proxyAddress.host, why=why
        )
        self.transport.abortConnection()

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def getPeer(self) -> IAddress:
        return self.client if self.client is not None else self.transport.getPeer()

    def connectionLost(self, reason) -> None:
        self._cancelDeadline()
        if self.wrappedProtocol is not None:
            policies.ProtocolWrapper.connectionLost(self, reason)
        else:
            self.connected = False


class ProxyHeaderFactory(policies.WrappingFactory):
    """
    Wraps a listener's factory: connections come from trusted proxies
    only, each starting with a PROXY header (v1 or v2).

    @param trustedProxies: addresses or networks allowed to connect.
    @param headerTimeout: seconds a connection may take to send its header.
    """

    protocol = _ProxiedSession
    noisy = False

    def __init__(self, wrappedFactory, trustedProxies, clock, headerTimeout: float = 10.0) -> None:
        policies.WrappingFactory.__init__(self, wrappedFactory)
        self.trustedProxies = tuple(trustedProxies)
        self.clock = clock
        self.headerTimeout = headerTimeout

    def buildProtocol(self, addr):
        if not isTrusted(getattr(addr, "host", ""), self.trustedProxies):
            log.warn(
                "refused a connection from {host}: not a trusted proxy "
                "([cluster] trusted_proxies)",
                host=getattr(addr, "host", addr),
            )
            return None
        return self.protocol(self, addr)

    def registerProtocol(self, p) -> None:
        pass

    def unregisterProtocol(self, p) -> None:
        pass
