"""
What maild counts, for Prometheus (served at C{/metrics} by L{maild.web}).

The metrics are process-wide, like the log: every listener and session of
this process adds to them, and tests read differences.  Their names follow
Prometheus' conventions (C{_total} is added to counters, units in names).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.protocols import policies

REGISTRY = CollectorRegistry(auto_describe=True)

connectionsOpen = Gauge(
    "maild_connections_open", "Connections open now, per listener.", ["listener"],
    registry=REGISTRY,
)
connections = Counter(
    "maild_connections", "Connections accepted, per listener.", ["listener"], registry=REGISTRY
)
bytesReceived = Counter(
    "maild_received_bytes", "Octets read from clients, per listener.", ["listener"],
    registry=REGISTRY,
)
bytesSent = Counter(
    "maild_sent_bytes", "Octets written to clients, per listener.", ["listener"],
    registry=REGISTRY,
)
logins = Counter(
    "maild_logins",
    "Login attempts, per protocol, SASL mechanism and result (ok, failed).",
    ["protocol", "mechanism", "result"],
    registry=REGISTRY,
)
loginDelay = Histogram(
    "maild_login_delay_seconds",
    "How long each failed login was held before its answer (the throttle's delay).",
    buckets=(0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0),
    registry=REGISTRY,
)
messages = Counter(
    "maild_messages",
    "Messages at the end of DATA, per listener and result (accepted, refused), "
    "with the reason of a refusal.",
    ["listener", "result", "reason"],
    registry=REGISTRY,
)
dataReplySeconds = Histogram(
    "maild_data_reply_seconds",
    "From the end of DATA to the reply (250 once the message is on disk).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
imapCommandSeconds = Histogram(
    "maild_imap_command_seconds",
    "From an IMAP command's last octet to its tagged reply, per command.",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    registry=REGISTRY,
)
imapIdleSessions = Gauge(
    "maild_imap_idle_sessions", "IMAP sessions in IDLE now.", registry=REGISTRY
)
commitGroupSize = Histogram(
    "maild_store_commit_group_size",
    "Messages made durable by one group commit of the store.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
commitSyncSeconds = Histogram(
    "maild_store_commit_sync_seconds",
    "Time one group commit spent syncing files and folders.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
trustResults = Counter(
    "maild_trust_results",
    "Results of the MX's checks, per check (spf, dkim per signature, dmarc) and result.",
    ["check", "result"],
    registry=REGISTRY,
)

# The IMAP commands counted by name; any other is counted as "other", so a
# client cannot create labels at will.
IMAP_COMMANDS = frozenset(
    """APPEND AUTHENTICATE CAPABILITY CHECK CLOSE COPY CREATE DELETE ENABLE EXAMINE
    EXPUNGE FETCH ID IDLE LIST LOGIN LOGOUT LSUB MOVE NAMESPACE NOOP RENAME SEARCH
    SELECT STARTTLS STATUS STORE SUBSCRIBE UNSELECT UNSUBSCRIBE XLIST""".split()
)


def imapCommandTimer(command: str):
    """
    Start timing an IMAP command; call the result when its tagged reply
    goes out.
    """
    name = command.upper()
    histogram = imapCommandSeconds.labels(name if name in IMAP_COMMANDS else "other")
    started = time.perf_counter()
    return lambda: histogram.observe(time.perf_counter() - started)


class _MeteredProtocol(policies.ProtocolWrapper):
    def connectionMade(self) -> None:
        self.factory.opened.inc()
        self.factory.accepted.inc()
        policies.ProtocolWrapper.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.inc(len(data))
        policies.ProtocolWrapper.dataReceived(self, data)

    def write(self, data: bytes) -> None:
        self.factory.sent.inc(len(data))
        policies.ProtocolWrapper.write(self, data)

    def writeSequence(self, data) -> None:
        self.factory.sent.inc(sum(map(len, data)))
        policies.ProtocolWrapper.writeSequence(self, data)

    def connectionLost(self, reason) -> None:
        self.factory.opened.dec()
        policies.ProtocolWrapper.connectionLost(self, reason)


class MeteredFactory(policies.WrappingFactory):
    """
    Counts the connections and octets of one listener's sessions, whatever
    their protocol.  Wraps inside TLS, so it counts the protocol's octets.
    """

    protocol = _MeteredProtocol
    noisy = False

    def __init__(self, listener: str, wrappedFactory) -> None:
        policies.WrappingFactory.__init__(self, wrappedFactory)
        self.opened = connectionsOpen.labels(listener)
        self.accepted = connections.labels(listener)
        self.received = bytesReceived.labels(listener)
        self.sent = bytesSent.labels(listener)

    def buildProtocol(self, addr):
        wrapped = self.wrappedFactory.buildProtocol(addr)
        # None refuses the connection (a limit): pass the refusal on.
        return None if wrapped is None else self.protocol(self, wrapped)

    def registerProtocol(self, p) -> None:
        # WrappingFactory keeps every protocol in a dict; the sessions
        # are already tracked by the protocol's own factory.
        pass

    def unregisterProtocol(self, p) -> None:
        pass
