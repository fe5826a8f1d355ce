"""
A private DNS server for tests: zones given as Python data, served by
twisted.names over UDP and TCP on a loopback port, or answered in memory.

A zone maps a name to a list of entries:
  - C{("A", "192.0.2.1")}, C{("AAAA", "2001:db8::1")}, C{("MX", (10, "mx.x.test"))},
    C{("PTR", "h.x.test")}, C{("CNAME", "y.test")},
    C{("TXT", "text")} or C{("TXT", ("part one", "part two"))};
  - C{("TXT", TIMEOUT)} (or any type): no answer for that type;
  - C{TIMEOUT}: no answer for any question about the name;
  - C{SERVFAIL}: SERVFAIL for any question about the name;
  - C{TRUNCATED}: over UDP, an empty reply with the TC bit (the whole answer
    comes over TCP);
  - C{WRONG_NAME}: the answer carries records of another name as well.
Names not in the zone are NXDOMAIN.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server

TIMEOUT = "TIMEOUT"
SERVFAIL = "SERVFAIL"
TRUNCATED = "TRUNCATED"
WRONG_NAME = "WRONG_NAME"

_TYPES = {name: getattr(dns, name) for name in ("A", "AAAA", "MX", "PTR", "CNAME", "TXT", "SPF")}


class ServerFailure(Exception):
    """
    The zone says SERVFAIL for this name.
    """


def _record(kind: str, value: Any) -> dns.IEncodable:
    if kind == "A":
        return dns.Record_A(value)
    if kind == "AAAA":
        return dns.Record_AAAA(value)
    if kind == "MX":
        return dns.Record_MX(value[0], value[1].encode())
    if kind == "PTR":
        return dns.Record_PTR(value.encode())
    if kind == "CNAME":
        return dns.Record_CNAME(value.encode())
    parts = (value,) if isinstance(value, (str, bytes)) else value
    data = [p.encode("utf-8") if isinstance(p, str) else p for p in parts]
    return dns.Record_TXT(*data) if kind == "TXT" else dns.Record_SPF(*data)


class ZoneResolver(common.ResolverBase):
    """
    An C{IResolver} answering from a zone (see the module docstring).

    @param served: whether a server passes the answers on: then a timeout
        is a Deferred that never fires (the client waits); in memory it is
        an immediate L{error.DNSQueryTimeoutError}.
    """

    def __init__(self, zone: dict[str, list], served: bool = False) -> None:
        common.ResolverBase.__init__(self)
        self.zone = {name.lower().rstrip("."): entries for name, entries in zone.items()}
        self.served = served
        self.queries: list[tuple[str, str]] = []

    def _timeout(self, name: str) -> defer.Deferred:
        if self.served:
            return defer.Deferred()
        return defer.fail(error.DNSQueryTimeoutError(name))

    def _lookup(self, name: bytes, cls: int, qtype: int, timeout: Any, chased: bool = False) -> defer.Deferred:
        key = name.decode("ascii", "replace").lower().rstrip(".")
        self.queries.append((key, dns.QUERY_TYPES.get(qtype, str(qtype))))
        entries = self.zone.get(key)
        if entries is None:
            return defer.fail(error.DNSNameError(key))
        if TIMEOUT in entries and not any(
            not isinstance(e, str) and _TYPES[e[0]] == qtype for e in entries
        ):
            return self._timeout(key)
        if SERVFAIL in entries:
            if self.served:
                return defer.fail(ServerFailure(key))
            return defer.fail(error.DNSServerError(key))
        answers = []
        for entry in entries:
            if isinstance(entry, str):
                continue
            kind, value = entry
            if _TYPES[kind] == qtype and value == TIMEOUT:
                return self._timeout(key)
            if _TYPES[kind] == qtype or kind == "CNAME":
                answers.append(dns.RRHeader(name, _TYPES[kind], dns.IN, 60, _record(kind, value)))
        if WRONG_NAME in entries:
            answers.append(
                dns.RRHeader(b"elsewhere.test", dns.TXT, dns.IN, 60, dns.Record_TXT(b"v=spf1 +all"))
            )
        if answers and answers[0].type == dns.CNAME and qtype != dns.CNAME and not chased:
            # As a recursive server: the target's records come along (one
            # step: the client follows longer chains itself).
            target = answers[0].payload.name.name
            d = self._lookup(target, cls, qtype, timeout, chased=True)
            d.addCallback(lambda result: (answers[:1] + list(result[0]), [], []))
            d.addErrback(lambda f: f if f.check(error.DNSQueryTimeoutError) else (answers[:1], [], []))
            return d
        return defer.succeed((answers, [], []))


class _ServerFactory(server.DNSServerFactory):
    def __init__(self, zone: ZoneResolver) -> None:
        server.DNSServerFactory.__init__(self, authorities=[zone])
        self.zoneResolver = zone

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(ServerFailure):
            # Answered without the error log DNSServerFactory writes.
            self.sendReply(protocol, _reply(message, dns.ESERVER), address)
            return
        server.DNSServerFactory.gotResolverError(self, failure, protocol, message, address)

    def sendReply(self, protocol, message, address):
        if address is not None and message.queries:
            name = message.queries[0].name.name.decode("ascii", "replace").lower().rstrip(".")
            if TRUNCATED in self.zoneResolver.zone.get(name, ()):
                message = _reply(message, dns.OK)
                message.trunc = 1
        server.DNSServerFactory.sendReply(self, protocol, message, address)


def _reply(query: dns.Message, rCode: int) -> dns.Message:
    reply = dns.Message(
        id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes, recAv=1, rCode=rCode
    )
    reply.queries = query.queries
    reply.timeReceived = getattr(query, "timeReceived", 0.0)
    return reply


class DNSServer:
    """
    The zone served on 127.0.0.1 over UDP and TCP, on one free port.
    C{nameserver} is the C{[dns] nameservers} entry that reaches it.
    """

    def __init__(self, zone: dict[str, list]) -> None:
        self.resolver = ZoneResolver(zone, served=True)
        self.factory = _ServerFactory(self.resolver)
        self.ports: list = []

    def start(self) -> None:
        for _ in range(20):
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(self.factory), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self.ports = [udp, tcp]
            self.port = port
            return
        raise RuntimeError("no free port for UDP and TCP together")

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> defer.Deferred:
        # Clients keep TCP connections open: close them (the daemon's
        # resolver then forgets them).
        for protocol in list(self.factory.connections):
            protocol.transport.loseConnection()
        stopped = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        return defer.gatherResults(stopped).addCallback(lambda _: task.deferLater(reactor, 0, lambda: None))
