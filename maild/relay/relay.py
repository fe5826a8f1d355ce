"""
The relay: takes remote recipients from submission into the durable
queue, and delivers the queue in the reactor.

Work is grouped by destination domain: each queued message gives one
unit per domain it has recipients in, and a domain's units wait in one
line that up to C{connections_per_destination} connections take from, so
one connection carries many messages (up to C{connections} in all).  A
connection whose line is empty waits C{connection_idle_time} for more
before it closes (sooner if another domain needs its place), so messages
that keep arriving reuse it rather than pay a new connection and TLS
handshake each.
After each transaction the recipients' new state is written to the
queue; when a message has no recipient left to try it is removed, after
the sender got a DSN for any that failed for good.

C{maild queue flush} reaches a running daemon through a request file in
C{<data>/queue/flush/} (a queue id, or C{ALL}) whose time it checks every
C{scan_interval} seconds: no pid file or signal is needed, and every
process sharing the data folder acts on it.

Such processes (C{--workers}, nodes on shared storage) each know the
whole queue: the messages they accepted, and every C{rescan_interval}
seconds those they find in the folder (so a stopped or dead node's are
sent by the others).  The rule that keeps two of them from sending one
message: an attempt holds the message's file lock
(L{OutboundQueue.claim}) from its start to its end, and with C{[cluster]
redis} also the message's Redis lease (L{maild.cluster.leases}), unless
Redis cannot be reached.  Having both, the attempt re-reads the envelope
and goes on only if it is still due: everything it writes to the
envelope, it writes as the holder.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, ssl, task, threads
from twisted.logger import Logger
from twisted.mail.smtp import SMTPServerError

from maild.cluster.leases import Leases
from maild.names import InvalidName, normalizeDomain
from maild.relay import dkim, dsn
from maild.relay.client import OutboundSession, Reply, SessionError, SessionSettings, SMTPClient
from maild.relay.destinations import DestinationError, Destinations, NextHop
from maild.relay.queue import (
    BOUNCED,
    QUEUED,
    SENT,
    OutboundQueue,
    QueueEntry,
    Recipient,
    newQueueId,
)
from maild.relay.rates import RecipientCounts
from maild.resolver import makeResolver
from maild.store import Target

log = Logger()

FLUSH_ALL = "ALL"
# A flush asked for this long before the daemon started is still acted on:
# `maild queue flush` run while the daemon restarts (or just before its
# relay came up) must not be lost.
FLUSH_REQUEST_GRACE = 60.0
# Messages tried at once: each holds a lock, so a file descriptor, while
# its recipients wait in their domains' lines (20 connections take them
# far faster than this many can be sent).
MAX_ATTEMPTS = 500
_RETURN_PATH = re.compile(rb"\AReturn-Path:[^\n]*\n(?:[ \t][^\n]*\n)*", re.I)
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


class RemoteRecipient(str):
    """
    A recipient in another domain, accepted for the queue.
    """


@dataclass
class _Unit:
    """
    The recipients of one queued message in one domain: what one
    transaction carries.
    """

    entry: QueueEntry
    domain: str
    recipients: list[Recipient]


class Relay(service.Service):
    """
    @param resolver: the DNS resolver (default: the configured one).
    """

    name = "relay"

    def __init__(self, config, store, addresses, reactor, resolver=None, redis=None) -> None:
        self.config = config
        self.settings = config.relay
        self.store = store
        self.addresses = addresses
        self.clock = reactor
        self.queue = OutboundQueue(config.data_dir / "queue", store.committer)
        self.keys = dkim.DKIMKeys(config.data_dir / "dkim")
        self.destinations = Destinations(
            self.settings, (lambda: resolver) if resolver else (lambda: makeResolver(config.dns))
        )
        self.entries: dict[str, QueueEntry] = {}
        # Entries being tried: how many of their units are not done yet,
        # and the recipients refused for good meanwhile.
        self._outstanding: dict[str, int] = {}
        self._failed: dict[str, list[dsn.RecipientStatus]] = {}
        self._lines: dict[str, deque[_Unit]] = {}
        self._connections: dict[str, int] = {}
        # Connections waiting for work, by domain: each waits on a
        # Deferred fired with True (work arrived) or False (close).
        self._idle: dict[str, deque[defer.Deferred]] = {}
        # How an idle session stops waiting when its server closes it.
        self._giveUp: dict[OutboundSession, Any] = {}
        self._sessions: set[OutboundSession] = set()
        # Work under way (connections, the end of attempts), which stopping
        # waits for, so that no queue write comes after the store stopped.
        self._busy: set[defer.Deferred] = set()
        # The locks held on the messages being tried (queue.claim); None
        # once handed to the queue to close with the message's files.
        self._claims: dict[str, int | None] = {}
        # Messages a flush asked for: tried even if another process set
        # their next try later.
        self._flushed: set[str] = set()
        self.leases = Leases(redis, self.settings.lease, reactor) if redis is not None else None
        # Messages due, waiting for a place among the attempts.
        self._due: deque[str] = deque()
        # When each flush request file was last acted on.
        self._flushSeen: dict[str, float] = {}
        self._total = 0
        # A file of its own per daemon (a new one after a restart: the old
        # one's counts still count, until they are an hour old).
        self.recipientCounts = RecipientCounts(self.queue.path / "rates", uuid.uuid4().hex)
        self._scanner = task.LoopingCall(self._scan)
        self._scanner.clock = reactor
        self._rescanner = task.LoopingCall(self._rescan)
        self._rescanner.clock = reactor

    # Service -----------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self._started = time.time() - FLUSH_REQUEST_GRACE
        self.keys.ensure(self.config.domains)
        for entry in self.queue.load():
            self.entries[entry.id] = entry
        if self.entries:
            log.info("queue: {count} messages to deliver", count=len(self.entries))
        if self.leases is not None:
            self.leases.start()
        self._scanner.start(self.settings.scan_interval, now=True)
        self._rescanner.start(self.settings.rescan_interval, now=False)

    def stopService(self):
        service.Service.stopService(self)
        for loop in (self._scanner, self._rescanner):
            if loop.running:
                loop.stop()
        if self.leases is not None:
            self.leases.stop()
        for waiters in list(self._idle.values()):
            while waiters:
                waiters.popleft().callback(False)
        for session in list(self._sessions):
            session.client.transport.abortConnection()
        return self._settle()

    @defer.inlineCallbacks
    def _settle(self):
        # Work that ends may start more (an attempt's end writes the queue).
        while self._busy:
            yield defer.DeferredList(list(self._busy))
        yield self.queue.settled()

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._busy.add(d)

        def done(result):
            self._busy.discard(d)
            return result

        return d.addBoth(done)

    # Taking mail -------------------------------------------------------

    def acceptRecipient(self, user: str, dest) -> RemoteRecipient:
        """
        Check that C{user} may send to C{dest} (an address in another
        domain) now.

        @raise SMTPServerError: with the refusal.
        """
        try:
            local = dest.local.decode("ascii")
            domain = normalizeDomain(dest.domain.decode("ascii"))
        except (UnicodeDecodeError, InvalidName):
            raise SMTPServerError(553, "5.1.3 Bad recipient address syntax")
        if not local or any(c in local for c in " <>\\\0\r\n"):
            raise SMTPServerError(553, "5.1.3 Bad recipient address syntax")
        # Every process knows the whole queue (as of its last rescan): the
        # cap holds for the data folder.
        if len(self.entries) >= self.settings.queue_max_messages:
            raise SMTPServerError(452, "4.3.1 Error: outbound queue full, try again later")
        now = self.clock.seconds()
        if self.recipientCounts.count(user, now) >= self.settings.recipients_per_hour:
            raise SMTPServerError(
                451,
                f"4.7.1 Error: {user} reached {self.settings.recipients_per_hour} "
                "recipients in other domains per hour, try again later",
            )
        self.recipientCounts.add(user, now)
        return RemoteRecipient(f"{local}@{domain}")

    def enqueue(
        self, message, sender: str, local: list[str], remote: list[str], user: str, headers: bytes,
        smtpId: str = "",
    ):
        """
        Store C{message} for its C{local} recipients and queue it for the
        C{remote} ones, durably, in one group commit.

        @param headers: the message's header section, to see whether
            Date: and Message-ID: are there (RFC 6409 section 8).
        @param smtpId: the id the SMTP server gave the transaction (in its
            C{250} reply), which the queue id begins with.
        @return: a Deferred firing once all of it is on disk.
        """
        now = time.time()
        entry = QueueEntry(
            id=newQueueId(smtpId),
            sender=sender,
            recipients=[Recipient(str(address)) for address in remote],
            arrival=now,
            nextTry=now,
            user=user,
            headers=missingHeaders(headers, sender.rpartition("@")[2] or self.config.hostname),
        )
        targets = [Target(self.store.userRoot(r)) for r in local]
        d = self.queue.enqueue(message, entry, targets)

        def queued(result):
            self.entries[entry.id] = entry
            log.info(
                "queued id={id} from=<{sender}> to={recipients}",
                id=entry.id,
                sender=sender,
                recipients=",".join(f"<{r}>" for r in remote),
            )
            if self.running:
                self._due.append(entry.id)
                self._fill()
            return result

        return d.addCallback(queued)

    # Scheduling --------------------------------------------------------

    def _scan(self) -> None:
        self._takeFlushRequests()
        now = time.time()
        self._due = deque(
            entry.id
            for entry in self.entries.values()
            if entry.id not in self._outstanding and entry.nextTry <= now
        )
        self._fill()

    def _fill(self) -> None:
        """
        Start due messages, up to L{MAX_ATTEMPTS} at once.
        """
        while self._due and len(self._outstanding) < MAX_ATTEMPTS and self.running:
            entry = self.entries.get(self._due.popleft())
            if entry is not None and entry.id not in self._outstanding:
                self._start(entry)
        self._startConnections()

    def flush(self, queueId: str = FLUSH_ALL) -> None:
        """
        Try C{queueId} (or every message) now.
        """
        for entry in self.entries.values():
            if queueId in (FLUSH_ALL, entry.id):
                entry.nextTry = 0.0
                self._flushed.add(entry.id)

    def _rescan(self) -> defer.Deferred:
        """
        Take up the messages other processes sharing the queue accepted,
        forget those they delivered, and share the recipient counts (the
        directory is read, and new envelopes, in the committer's threads).
        """
        known = set(self.entries)
        now = self.clock.seconds()
        counts = self.recipientCounts.snapshot(now)

        def read():
            present = self.queue.envelopeIds()
            found = [self.queue.read(queueId) for queueId in present - known]
            return present, found, self.recipientCounts.exchange(counts, now)

        def adopt(result) -> None:
            present, found, others = result
            self.recipientCounts.update(others)
            for queueId in known - present:
                if queueId not in self._outstanding:
                    self.entries.pop(queueId, None)
            for entry in found:
                if entry is not None:
                    self.entries.setdefault(entry.id, entry)

        d = self.queue.committer.callInPool(read).addCallback(adopt)
        return d.addErrback(lambda reason: log.failure("queue: cannot read the folder", reason))

    def _takeFlushRequests(self) -> None:
        # A request is a file whose time is newer than the last this
        # process acted on: every process sharing the queue sees it (each
        # knows the messages it accepted since it started).  The file of
        # one message goes with the message.
        requests = self.queue.path / "flush"
        try:
            entries = list(os.scandir(requests))
        except OSError:
            return
        for request in entries:
            try:
                mtime = request.stat().st_mtime
            except OSError:
                continue
            if mtime > self._flushSeen.get(request.name, self._started):
                self._flushSeen[request.name] = mtime
                log.info("queue: flush {id} requested", id=request.name)
                self.flush(request.name)

    def _start(self, entry: QueueEntry) -> None:
        """
        Claim C{entry}: its file lock, then (with Redis) its lease.
        """
        try:
            claim = self.queue.claim(entry)
        except FileNotFoundError:
            self._gone(entry)
            return
        if claim is None:
            # Another process is trying it now.
            return
        self._claims[entry.id] = claim
        # Taken: counts among the attempts while the lease is asked for.
        self._outstanding[entry.id] = 1
        if self.leases is None:
            self._held(entry)
            return
        d = self._track(self.leases.acquire(entry.id))
        d.addCallback(self._leased, entry)
        d.addErrback(lambda reason: log.failure("queue: cannot start {id}", reason, id=entry.id))

    def _leased(self, taken: bool | None, entry: QueueEntry) -> None:
        if taken is False:
            # Another node holds it: trying now, or dead with its lease
            # not yet run out.
            self._letGo(entry.id)
            return
        # None: Redis is away; the file lock alone keeps others off.
        self._held(entry)
        self._startConnections()

    def _held(self, entry: QueueEntry) -> None:
        """
        Holding C{entry}: go on from its envelope as the last holder left
        it, if it is still due.
        """
        try:
            self.queue.reread(entry)
        except FileNotFoundError:
            self._letGo(entry.id)
            self._gone(entry)
            return
        if entry.nextTry > time.time() and entry.id not in self._flushed:
            # Another process tried it since this one read it, and wrote
            # when to try again.
            self._letGo(entry.id)
            return
        self._flushed.discard(entry.id)
        self._begin(entry)

    def _gone(self, entry: QueueEntry) -> None:
        # Delivered by another process sharing the queue, or taken by
        # `maild queue delete`.
        log.info("queue: {id} is gone", id=entry.id)
        self.entries.pop(entry.id, None)
        self._flushed.discard(entry.id)
        self.queue.remove(entry.id).addErrback(lambda _: None)  # logged by the queue

    def _begin(self, entry: QueueEntry) -> None:
        """
        Dispatch C{entry}; the caller starts connections, unless it had to
        be signed first (then its units join their lines later).
        """
        d = self._dispatch(entry)
        if not d.called:
            self._track(d).addCallback(lambda _: self._startConnections())
        d.addErrback(lambda reason: log.failure("queue: cannot start {id}", reason, id=entry.id))

    @defer.inlineCallbacks
    def _dispatch(self, entry: QueueEntry):
        """
        Sign the message if this is its first attempt (retries reuse the
        signatures, saved with the envelope), then put each domain's
        pending recipients in that domain's line.
        """
        if not entry.signatures:
            try:
                yield self._prepare(entry)
            except FileNotFoundError:
                self._forget(entry)
                return
            except Exception:
                log.failure("queue: cannot sign {id}", id=entry.id)
        byDomain: dict[str, list[Recipient]] = {}
        for recipient in entry.pending():
            byDomain.setdefault(recipient.domain, []).append(recipient)
        if not byDomain:
            self._unitDone(entry)
            return
        self._outstanding[entry.id] = len(byDomain)
        for domain, recipients in byDomain.items():
            self._lines.setdefault(domain, deque()).append(_Unit(entry, domain, recipients))

    def _startConnections(self) -> None:
        for domain, line in list(self._lines.items()):
            if not line and not self._connections.get(domain):
                del self._lines[domain]
                continue
            # Connections already open take the work first.
            waiters = self._idle.get(domain)
            while line and waiters:
                waiters.popleft().callback(True)
            while (
                line
                and self._connections.get(domain, 0) < self.settings.connections_per_destination
                and self._connections.get(domain, 0) < len(line)
            ):
                if self._total >= self.settings.connections:
                    # Every place is taken: close one idle for another
                    # domain (its end starts this again).
                    self._closeIdle(domain)
                    break
                self._connections[domain] = self._connections.get(domain, 0) + 1
                self._total += 1
                d = self._track(self._serve(domain, line))
                d.addErrback(lambda reason: log.failure("relay: delivery failed", reason))
                d.addBoth(self._connectionDone, domain)

    def _closeIdle(self, needing: str) -> None:
        for domain, waiters in self._idle.items():
            if domain != needing and waiters:
                waiters.popleft().callback(False)
                return

    def _awaitWork(self, domain: str, session: OutboundSession) -> defer.Deferred:
        """
        Keep C{session} open, idle, until work for C{domain} arrives.

        @return: a Deferred firing with True when there is work, or False
            when the session should close: C{connection_idle_time} passed,
            the server closed it, its place is needed, or the relay stops.
        """
        if not session.client.usable or not self.running:
            return defer.succeed(False)
        waiters = self._idle.setdefault(domain, deque())
        wake: defer.Deferred = defer.Deferred()
        waiters.append(wake)

        def giveUp():
            if not wake.called:
                waiters.remove(wake)
                wake.callback(False)

        timer = self.clock.callLater(self.settings.connection_idle_time, giveUp)
        self._giveUp[session] = giveUp

        def woken(work):
            del self._giveUp[session]
            if timer.active():
                timer.cancel()
            return work

        return wake.addCallback(woken)

    def _sessionLost(self, session: OutboundSession) -> None:
        giveUp = self._giveUp.get(session)
        if giveUp is not None:
            giveUp()

    def _connectionDone(self, _, domain: str) -> None:
        self._connections[domain] -= 1
        self._total -= 1
        if not self._connections[domain]:
            del self._connections[domain]
            self._idle.pop(domain, None)
        self._startConnections()

    # Delivery ----------------------------------------------------------

    @defer.inlineCallbacks
    def _serve(self, domain: str, line: deque):
        """
        One connection for C{domain}: take units from its line until
        there are none left (for C{connection_idle_time}) or the
        connection fails.  Each transaction begins as soon as the one
        before it sent its message (L{Transaction.sent}): with PIPELINING
        one round trip per message.
        """
        try:
            hops = yield self.destinations.nextHops(domain)
            session, relay = yield self._connect(domain, hops)
        except (DestinationError, SessionError) as e:
            relay = getattr(e, "relay", "none")
            while line:
                self._record(line.popleft(), {}, relay, e)
            return
        self._sessions.add(session)
        session.client.lost.addCallback(lambda _: self._sessionLost(session))

        def take():
            # The next message is read from disk while this one is sent.
            if not line or not self.running:
                return None
            unit = line.popleft()
            return unit, self._prepare(unit.entry)

        # The last transaction's outcome, once recorded: True, or False if
        # the connection cannot be used any more.
        awaited = None
        following = None
        usable = True
        try:
            while usable:
                if following is None:
                    following = take()
                if following is None:
                    if awaited is not None:
                        usable, awaited = (yield awaited), None
                    elif not (yield self._awaitWork(domain, session)):
                        break
                    continue
                unit, prepared = following
                following = None
                try:
                    message = yield prepared
                except FileNotFoundError:
                    self._forget(unit.entry)
                    continue
                except Exception:
                    log.failure("queue: cannot prepare {id}", id=unit.entry.id)
                    self._record(unit, {}, relay, SessionError("local error while preparing the message"))
                    continue
                if not session.client.usable:
                    # Closed (by the server, or a timeout) before this
                    # message began: it goes back to its line, untried.
                    line.appendleft(unit)
                    break
                following = take()
                transaction = session.transfer(unit.entry.sender, [r.address for r in unit.recipients], message)
                recorded = transaction.outcome.addCallbacks(
                    self._recorded, self._unrecorded, (unit, relay, session.transactions), None,
                    (unit, relay, session.transactions),
                )
                yield transaction.sent
                # The one before was answered first: its outcome is in.
                previous, awaited = awaited, recorded
                if previous is not None:
                    usable = yield previous
            if awaited is not None:
                usable = (yield awaited) and usable
            if usable and session.client.usable:
                yield session.close()
            else:
                session.client.transport.abortConnection()
        finally:
            self._sessions.discard(session)
            if following is not None:
                # Read ahead but not sent: back to the front of its line.
                unit, prepared = following
                prepared.addErrback(lambda _: None)
                line.appendleft(unit)

    @defer.inlineCallbacks
    def _connect(self, domain: str, hops: list[NextHop]):
        """
        A session opened with the first of C{hops} (and of its addresses)
        that answers.

        @return: the session and its name for the log, C{host[ip]:port}.
        @raise SessionError: the last problem, if none does.
        """
        smarthost = self.destinations.isSmarthost(domain)
        settings = self._sessionSettings(smarthost)
        problem: Exception = SessionError("no server to try")
        relay = "none"
        for hop in hops:
            try:
                addresses = yield self.destinations.addresses(hop.host)
            except DestinationError as e:
                problem = e
                continue
            for address in addresses:
                relay = f"{hop.host}[{address}]:{hop.port}"
                implicitTLS = smarthost and hop.port == 465
                endpoint = _endpoint(self.clock, address, hop.port, self.settings.connect_timeout)
                if implicitTLS:
                    endpoint = endpoints.wrapClientTLS(settings.tlsOptions(hop.host), endpoint)
                try:
                    client = yield endpoint.connect(_ClientFactory(self.clock))
                except Exception as e:
                    problem = SessionError(f"connect to {relay} failed: {e.__class__.__name__}")
                    continue
                session = OutboundSession(client, settings, hop.host)
                try:
                    yield session.open(implicitTLS)
                except SessionError as e:
                    client.transport.abortConnection()
                    problem = e
                    continue
                return session, relay
        problem.relay = relay
        raise problem

    def _sessionSettings(self, smarthost: bool) -> SessionSettings:
        if smarthost:
            return SessionSettings(
                hostname=self.config.hostname,
                commandTimeout=self.settings.command_timeout,
                dataTimeout=self.settings.data_timeout,
                tlsOptions=self._verifiedTLS,
                requireTLS=True,
                credentials=self._smarthostCredentials(),
            )
        # Opportunistic TLS: as every MTA does today, the certificate is
        # not checked (most MX certificates would fail; RFC 7435).
        return SessionSettings(
            hostname=self.config.hostname,
            commandTimeout=self.settings.command_timeout,
            dataTimeout=self.settings.data_timeout,
            tlsOptions=lambda host: ssl.CertificateOptions(),
        )

    def _verifiedTLS(self, host: str):
        trustRoot = None
        if self.settings.smarthost_cafile is not None:
            pem = self.settings.smarthost_cafile.read_bytes()
            trustRoot = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem)])
        return ssl.optionsForClientTLS(host, trustRoot=trustRoot)

    def _smarthostCredentials(self) -> tuple[str, str] | None:
        if not self.settings.smarthost_user:
            return None
        password = ""
        if self.settings.smarthost_password_file is not None:
            text = self.settings.smarthost_password_file.read_text("utf-8")
            password = text.splitlines()[0] if text else ""
        return self.settings.smarthost_user, password

    @defer.inlineCallbacks
    def _prepare(self, entry: QueueEntry):
        """
        The message as it leaves: the headers submission adds, the stored
        message without its Return-Path:, CRLF line ends, DKIM-signed.
        """
        stored = yield self.queue.readMessage(entry.id)
        stored = _RETURN_PATH.sub(b"", stored, count=1)
        added = "".join(h + "\n" for h in entry.headers).encode("utf-8")
        message = (added + stored).replace(b"\n", b"\r\n")
        if not entry.signatures:
            domain, keys = self._signingKeys(entry, message)
            if not keys:
                log.info("queue: {id} leaves unsigned: no DKIM key for {domain}", id=entry.id, domain=domain)
                return message
            # Off the reactor thread: dkimpy canonicalizes in Python (some
            # milliseconds for a 10 KiB message).
            signatures = yield threads.deferToThreadPool(
                self.clock, self.clock.getThreadPool(), dkim.sign, message, domain, keys
            )
            entry.signatures = signatures.decode("ascii")
        return entry.signatures.encode("ascii") + message

    def _signingKeys(self, entry: QueueEntry, message: bytes):
        fromDomain = _fromDomain(message)
        senderDomain = entry.sender.rpartition("@")[2].lower()
        for domain in (fromDomain, senderDomain):
            if domain and self.addresses.isLocalDomain(domain):
                keys = self.keys.keysFor(domain)
                if keys:
                    return domain, keys
        return fromDomain or senderDomain or "(none)", []

    def _recorded(self, outcomes: dict[str, Reply], unit: _Unit, relay: str, useOfConnection: int) -> bool:
        self._record(unit, outcomes, relay, useOfConnection=useOfConnection)
        return True

    def _unrecorded(self, reason, unit: _Unit, relay: str, useOfConnection: int) -> bool:
        if reason.check(SessionError):
            problem = reason.value
        else:
            log.failure("relay: transaction failed", reason)
            problem = SessionError("local error while sending")
        self._record(unit, {}, relay, problem, useOfConnection)
        return False

    def _record(
        self, unit: _Unit, outcomes: dict[str, Reply], relay: str, problem=None, useOfConnection: int = 0
    ) -> None:
        """
        Note each recipient's outcome, log it, and move the entry on.

        @param useOfConnection: which transaction of its connection this
            was (logged from the second on, as Postfix's C{conn_use}).
        """
        reuse = f" conn_use={useOfConnection}" if useOfConnection > 1 else ""
        entry = unit.entry
        delay = time.time() - entry.arrival
        for recipient in unit.recipients:
            recipient.attempts += 1
            reply = outcomes.get(recipient.address)
            if reply is not None:
                status, text = reply.status, str(reply)
                state = SENT if reply.code < 300 else BOUNCED if reply.permanent else QUEUED
            else:
                problem = problem or SessionError("no reply")
                status = problem.status
                text = str(problem)
                state = BOUNCED if getattr(problem, "permanent", False) else QUEUED
            recipient.reply = text
            recipient.state = state
            if state == BOUNCED:
                self._failed.setdefault(entry.id, []).append(
                    dsn.RecipientStatus(recipient.address, "failed", status, relay.partition("[")[0], text)
                )
            log.info(
                'delivery id={id} to=<{to}> relay={relay} status={status} dsn={dsn} delay={delay:.1f}s{reuse} reply="{reply}"',
                id=entry.id,
                to=recipient.address,
                relay=relay,
                status={SENT: "sent", BOUNCED: "bounced", QUEUED: "deferred"}[state],
                dsn=status,
                delay=delay,
                reuse=reuse,
                reply=text.replace('"', "'"),
            )
        self._unitDone(entry)

    def _unitDone(self, entry: QueueEntry) -> None:
        self._outstanding[entry.id] -= 1
        if self._outstanding[entry.id]:
            # Another domain's unit is still under way: save this one's news.
            self.queue.save(entry).addErrback(lambda _: None)  # logged by the queue
            return
        d = self._track(self._attemptDone(entry))
        d.addErrback(lambda reason: log.failure("queue: cannot update {id}", reason, id=entry.id))
        d.addBoth(lambda _: self._release(entry.id))

    def _release(self, queueId: str) -> None:
        self._letGo(queueId)
        if self._due:
            self._fill()

    def _letGo(self, queueId: str) -> None:
        """
        Give up the hold on a message (its lock and lease), starting
        nothing else: this may run inside L{_fill}.
        """
        self._outstanding.pop(queueId, None)
        if queueId not in self._claims:
            return
        claim = self._claims.pop(queueId)
        if claim is not None:
            os.close(claim)
        if self.leases is not None:
            self.leases.release(queueId)
        entry = self.entries.get(queueId)
        if entry is not None:
            # Saved with the envelope, which the next attempt reads again
            # (queue.reread): the index of a long queue need not hold them
            # (about 1 KB a message).
            entry.signatures = ""

    @defer.inlineCallbacks
    def _attemptDone(self, entry: QueueEntry):
        now = time.time()
        failed = self._failed.pop(entry.id, [])
        pending = entry.pending()
        if pending and now - entry.arrival >= self.settings.queue_lifetime:
            for recipient in pending:
                recipient.state = BOUNCED
                failed.append(
                    dsn.RecipientStatus(
                        recipient.address, "failed", "4.4.7",
                        diagnostic=f"delivery time expired; last problem: {recipient.reply}",
                    )
                )
                log.info(
                    'delivery id={id} to=<{to}> relay=none status=bounced dsn=4.4.7 delay={delay:.1f}s reply="queue lifetime expired"',
                    id=entry.id, to=recipient.address, delay=now - entry.arrival,
                )
            pending = []
        if failed:
            yield self._notify(entry, failed)
        if not pending:
            # The queue closes the lock once the files are gone (_letGo
            # then only gives up the lease).
            claim = self._claims.get(entry.id)
            self._claims[entry.id] = None
            yield self.queue.remove(entry.id, claim)
            self.entries.pop(entry.id, None)
            return
        if not entry.warned and now - entry.arrival >= self.settings.delay_warning:
            entry.warned = True
            yield self._notify(
                entry,
                [dsn.RecipientStatus(r.address, "delayed", "4.0.0", diagnostic=r.reply) for r in pending],
            )
        attempts = max(r.attempts for r in pending)
        wait = min(self.settings.retry_first * 2 ** max(attempts - 1, 0), self.settings.retry_max)
        entry.nextTry = now + wait
        yield self.queue.save(entry)

    @defer.inlineCallbacks
    def _notify(self, entry: QueueEntry, statuses: list[dsn.RecipientStatus]):
        """
        Send the sender a DSN; never for the null sender (no bounce loops).
        """
        if not entry.sender:
            log.info("queue: {id} not returned: its sender is null", id=entry.id)
            return
        try:
            original = yield self.queue.readMessage(entry.id)
        except FileNotFoundError:
            return
        report = dsn.buildReport(
            self.config.hostname,
            entry.id,
            entry.sender,
            entry.arrival,
            statuses,
            _RETURN_PATH.sub(b"", original, count=1),
            entry.arrival + self.settings.queue_lifetime,
        )
        message = self.store.incoming(b"Return-Path: <>\r\n")
        message.write(report)
        mailbox = self.addresses.resolve(entry.sender)
        if mailbox is not None:
            yield self.store.deliver(message, [mailbox])
            where = f"to the INBOX of {mailbox}"
        else:
            yield self.enqueue(message, "", [], [entry.sender], "", report)
            where = "queued"
        log.info(
            "queue: {id} {kind} notice for <{sender}> {where}",
            id=entry.id,
            kind="delay" if statuses[0].action == "delayed" else "bounce",
            sender=entry.sender,
            where=where,
        )

    def _forget(self, entry: QueueEntry) -> None:
        """
        C{maild queue delete} removed the message: drop what is left.
        """
        if self.entries.pop(entry.id, None) is not None:
            log.info("queue: {id} was deleted", id=entry.id)
            self.queue.remove(entry.id).addErrback(lambda _: None)  # logged by the queue
        self._outstanding[entry.id] -= 1
        if not self._outstanding[entry.id]:
            self._release(entry.id)
            self._failed.pop(entry.id, None)


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, clock) -> None:
        self.clock = clock

    def buildProtocol(self, addr) -> SMTPClient:
        return SMTPClient(self.clock)


def _endpoint(reactor, address: str, port: int, timeout: float):
    if ":" in address:
        return endpoints.TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    return endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=timeout)


def missingHeaders(headerSection: bytes, domain: str) -> list[str]:
    """
    The Date: and Message-ID: fields a message lacks (RFC 6409 section 8:
    submission may add them), ready to put first.
    """
    present = {m.group(1).lower() for m in _FIELD.finditer(headerSection)}
    added = []
    if b"date" not in present:
        added.append(f"Date: {formatdate(localtime=True)}")
    if b"message-id" not in present:
        added.append(f"Message-ID: <{uuid.uuid4().hex}@{domain}>")
    return added


def _fromDomain(message: bytes) -> str:
    end = message.find(b"\r\n\r\n")
    headers = message[: end if end >= 0 else len(message)]
    match = re.search(rb"^From:[^\r\n]*?@([A-Za-z0-9.-]+)", headers, re.M | re.I)
    return match.group(1).decode("ascii").lower() if match else ""
