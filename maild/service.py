"""
Wiring: build the daemon's services from a L{Config}.  Nothing here
decides protocol behaviour; it only connects the pieces.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

from twisted.application import internet, service
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.mail.imap4 import IAccount
from twisted.mail.smtp import IMessageDelivery
from twisted.protocols.tls import TLSMemoryBIOFactory

from maild.accounts import Accounts, LocalAddresses
from maild.auth import Authenticator, LoginThrottle, MailRealm, PasswordChecker
from maild.cluster import RedisLink
from maild.cluster.limits import SharedConnectionCounts, SharedLoginThrottle
from maild.connections import LimitedFactory
from maild.config import IMPLICIT_TLS, Config
from maild.imap import Account, IMAPFactory, IMAPSettings
from maild.logs import useAsTwistdLog
from maild.pop3 import Maildrop, POP3Factory, POP3Settings, uidlFormatter
from maild.relay import Relay
from maild.resolver import makeResolver
from maild.smtp import InboundDelivery, SMTPFactory, SMTPServer, SMTPSettings
from maild.submission import SubmissionDelivery, SubmissionServer
from maild.store import Committer, MailStore
from maild.dev import AnyPasswordChecker, DevAddresses, devMailbox
from maild.metrics import MeteredFactory
from maild.proxyheader import ProxyHeaderFactory
from maild.tls import RENEWAL_CHECK_INTERVAL, ServerTLS, certificateFiles, localCA
from maild.trust.checker import TrustChecker
from maild.trust.dkimprocess import VerifierProcesses
from maild.web import WebFactory, makeRoot

log = Logger()

# How often stale temporary files are looked for.
CLEANUP_INTERVAL = 3600.0


class Listener(service.Service):
    """
    Listens on one endpoint with one factory; failing to listen stops the
    daemon with a clear message rather than leaving it half up.

    @ivar port: the listening port, once started (tests ask it for the
        port number chosen for C{tcp:0}).
    @ivar factory: the protocol's factory, which knows its sessions.
    @ivar listeningFactory: what the endpoint is given: C{factory} inside
        its wrappers (metrics, TLS).
    """

    def __init__(
        self, name: str, description: str, endpoint, factory, clock, listeningFactory=None
    ) -> None:
        self.name = name
        self.clock = clock
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.listeningFactory = listeningFactory or factory
        self.port = None
        self.ready: defer.Deferred | None = None

    def privilegedStartService(self) -> None:
        # Bind here, as twistd binds privileged ports, so that a port that
        # cannot be had stops the daemon at once with a clear message.
        service.Service.privilegedStartService(self)
        self._listen()
        failure = []
        self.ready.addErrback(lambda reason: failure.append(reason) or reason)
        if failure:
            # _failed has logged why.
            self.ready.addErrback(lambda _: None)
            raise SystemExit(1)

    def startService(self) -> None:
        service.Service.startService(self)
        if self.ready is None:
            self._listen()

    def _listen(self) -> None:
        self.ready = self.endpoint.listen(self.listeningFactory)
        self.ready.addCallbacks(self._listening, self._failed)

    def _listening(self, port):
        self.port = port
        log.info(
            "{name} listening on {description}", name=self.name, description=self.description
        )
        return port

    def _failed(self, reason):
        logCannotListen(self.name, self.description, reason.getErrorMessage())
        return reason

    def stopService(self):
        service.Service.stopService(self)
        stopped = []
        if self.port is not None:
            port, self.port = self.port, None
            stopped.append(defer.maybeDeferred(port.stopListening))
        stopped.append(self.factory.closeSessions(self.clock))
        return defer.gatherResults(stopped)


def logCannotListen(name: str, description: str, error: object) -> None:
    """
    Say which listener could not be opened, and why (the daemon then
    stops): one line, the same with workers and without.
    """
    log.critical("cannot listen for {name} on {description}: {error}", name=name, description=description, error=error)


class MailService(service.MultiService):
    """
    The whole daemon: the shared store, accounts and portal, and one
    L{Listener} per configured protocol.
    """

    def __init__(self, config: Config, reactor=None, syncHook=None, clock=None) -> None:
        """
        @param clock: what sessions' deadlines, login delays, the login
            cache, the shutdown grace and the daily certificate check are
            timed by: the reactor, or a L{twisted.internet.task.Clock} that
            tests advance.
        """
        service.MultiService.__init__(self)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        # Where twistd's log goes once this service joins its application
        # (see setServiceParent and maild.tap); None leaves twistd's own
        # choice.
        self.logDestination = config.log.file
        self.committer = Committer(reactor, config.data_dir, config.sync, syncHook=syncHook)
        self.redis = RedisLink(config.cluster.redis, reactor) if config.cluster.redis else None
        if self.redis is not None:
            self.redis.setServiceParent(self)
        self.store = MailStore(
            config.data_dir,
            self.committer,
            watch=config.watch,
            events=self.redis if config.watch == "redis" else None,
        )
        self.accounts = Accounts(config.usersFile, rehash=config.rehash_passwords)
        if config.dev.enabled:
            self.devMailbox = devMailbox(config.domains)
            self.store.mailbox(self.devMailbox).ensureExists()
            self.addresses = DevAddresses(self.accounts, config.domains, self.devMailbox)
            checker = AnyPasswordChecker(self.devMailbox)
        else:
            self.addresses = LocalAddresses(
                self.accounts,
                config.domains,
                postmaster=config.postmaster,
                aliases=config.aliases,
                catchall=config.catchall,
            )
            checker = PasswordChecker(
                self.accounts, config.domains[0], reactor, config.login_cache, self.clock
            )
        # Mail for other domains: queued and sent by the relay (the
        # developer mode relays nothing).
        self.relay = None if config.dev.enabled else Relay(config, self.store, self.addresses, reactor, redis=self.redis)
        if self.relay is not None:
            self.relay.setServiceParent(self)
        uidl = uidlFormatter(config.pop3.uidl_format)
        self.realm = MailRealm(
            {
                IMessageDelivery: lambda user: SubmissionDelivery(self.addresses, user, self.relay),
                pop3.IMailbox: lambda user: Maildrop(self.store.mailbox(user), uidl),
                IAccount: lambda user: Account(self.store, user),
            }
        )
        self.portal = Portal(self.realm, [checker])
        limits = config.limits
        if self.redis is not None:
            # Every node and worker counts failures and connections together.
            throttle = SharedLoginThrottle(
                self.redis, self.clock, limits.auth_failure_delay, limits.auth_failure_delay_max
            )
            self.sharedCounts = SharedConnectionCounts(self.redis)
        else:
            throttle = LoginThrottle(
                self.clock, limits.auth_failure_delay, limits.auth_failure_delay_max
            )
            self.sharedCounts = None
        self.authenticator = Authenticator(self.portal, throttle, limits.trusted_networks)
        # STARTTLS is offered wherever it applies, so TLS is always set up
        # (with one signed by the local CA when none is configured).
        self.localCA = localCA(config)
        self.tls = ServerTLS(*certificateFiles(config))
        if self.localCA is not None:
            renewal = internet.TimerService(RENEWAL_CHECK_INTERVAL, self.renewCertificate)
            renewal.clock = self.clock
            renewal.setServiceParent(self)
        self.listeners: dict[str, Listener] = {}
        builders: dict[str, Callable[[], Any]] = {
            "smtp": self._mxFactory,
            "submission": self._submissionFactory,
            "smtps": self._submissionFactory,
            "pop3": self._pop3Factory,
            "pop3s": self._pop3Factory,
            "imap": self._imapFactory,
            "imaps": self._imapFactory,
            "http": self._webFactory,
            "https": self._webFactory,
        }
        for name, description in config.enabledListeners().items():
            builder = builders.get(name)
            if builder is None:
                log.warn("{name}: not available in this version, not started", name=name)
                continue
            proxied = description.startswith("haproxy:")
            inner = description[len("haproxy:"):] if proxied else description
            endpoint = endpoints.serverFromString(reactor, inner)
            factory = builder()
            if self.sharedCounts is not None and isinstance(factory, LimitedFactory):
                factory.shared = self.sharedCounts.track(name, factory.connections)
            wrapped = MeteredFactory(name, factory)
            if name in IMPLICIT_TLS:
                # RFC 8314: TLS from the first byte, with the same certificate.
                # The factory is wrapped, not the endpoint, so that this holds
                # for every endpoint type (tcp, systemd, unix, plugins): config
                # refuses those that do TLS themselves.
                wrapped = TLSMemoryBIOFactory(self.tls, False, wrapped)
            if proxied:
                # The PROXY header comes first, before any TLS.
                wrapped = ProxyHeaderFactory(wrapped, config.cluster.trusted_proxies, reactor)
            listener = Listener(name, description, endpoint, factory, self.clock, wrapped)
            listener.setServiceParent(self)
            self.listeners[name] = listener
        cleanup = internet.TimerService(
            CLEANUP_INTERVAL,
            lambda: reactor.callInThread(
                self.store.removeStaleTemporaries, config.tmp_grace
            ),
        )
        cleanup.clock = reactor
        cleanup.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        service.MultiService.setServiceParent(self, parent)
        useAsTwistdLog(parent, self.logDestination, self.config.log, self.reactor)

    def renewCertificate(self) -> bool:
        """
        Renew the local CA's server certificate if it is due (daily); new
        connections get the new one, open ones keep theirs.
        """
        return self.tls.renewIfDue(self.localCA)

    def _webFactory(self) -> WebFactory:
        limits = self.config.limits
        return WebFactory(
            makeRoot(self), limits.connections_per_ip, limits.trusted_networks,
            timeout=limits.idle_timeout,
        )

    def boundPorts(self) -> dict[str, int]:
        """
        The TCP port of each listener that is up, by name (what client
        autoconfiguration offers).
        """
        ports = {}
        for name, listener in self.listeners.items():
            address = listener.port.getHost() if listener.port is not None else None
            if getattr(address, "port", None):
                ports[name] = address.port
        return ports

    def _smtpFactory(self, protocol: type[SMTPServer], **settings) -> SMTPFactory:
        return SMTPFactory(
            SMTPSettings(
                hostname=self.config.hostname,
                limits=self.config.limits,
                store=self.store,
                addresses=self.addresses,
                clock=self.clock,
                tlsContext=self.tls,
                **settings,
            ),
            protocol,
        )

    def _mxFactory(self) -> SMTPFactory:
        return self._smtpFactory(
            SMTPServer, delivery=InboundDelivery(self.addresses, self._trustChecker())
        )

    def _trustChecker(self) -> TrustChecker | None:
        mx = self.config.mx
        if not mx.checks:
            return None
        processes = None
        if mx.dkim_processes:
            processes = VerifierProcesses(self.reactor, mx.dkim_processes)
            # Added before the MX listener, so stopped after it (a
            # MultiService stops its services last to first): no session
            # waits on it by then.
            processes.setServiceParent(self)
        return TrustChecker(
            lambda: makeResolver(self.config.dns),
            self.config.hostname,
            mx.dmarc,
            self.reactor,
            dnsTimeout=mx.dns_timeout,
            spfTimeout=mx.spf_timeout,
            trustedNetworks=self.config.limits.trusted_networks,
            dkimProcesses=processes,
        )

    def _submissionFactory(self) -> SMTPFactory:
        return self._smtpFactory(
            SubmissionServer,
            delivery=None,
            authenticator=self.authenticator,
            # The developer mode is on loopback (unless made public): an
            # application may log in there without STARTTLS.
            plaintextAuth=self.config.submission_plaintext_auth
            or (self.config.dev.enabled and not self.config.dev.public),
        )

    def _pop3Factory(self) -> POP3Factory:
        return POP3Factory(
            POP3Settings(
                hostname=self.config.hostname,
                limits=self.config.limits,
                authenticator=self.authenticator,
                clock=self.clock,
                plaintextAuth=self.config.plaintext_auth,
                tlsContext=self.tls,
            )
        )

    def _imapFactory(self) -> IMAPFactory:
        return IMAPFactory(
            IMAPSettings(
                hostname=self.config.hostname,
                limits=self.config.limits,
                store=self.store,
                authenticator=self.authenticator,
                clock=self.clock,
                plaintextAuth=self.config.plaintext_auth,
                tlsContext=self.tls,
            )
        )

    def startService(self) -> None:
        self.committer.start()
        log.info(
            "maild starting: data in {data}, domains {domains}",
            data=str(self.config.data_dir.resolve()),
            domains=", ".join(self.config.domains),
        )
        log.info(
            "TLS certificate {path}, SHA-256 fingerprint {fingerprint}",
            path=str(self.tls.certPath),
            fingerprint=self.tls.fingerprint,
        )
        if self.config.dev.enabled:
            log.warn(
                "DEVELOPER MODE: mail for every address is accepted and any password "
                "logs in; everything lands in {mailbox}, nothing is relayed. "
                "Never run this mode as a real mail server.",
                mailbox=self.devMailbox,
            )
        if self.config.plaintext_auth == "always":
            log.warn("IMAP and POP3 accept passwords without TLS from any address")
        if self.config.submission_plaintext_auth:
            log.warn("submission accepts passwords without TLS")
        if threading.current_thread() is threading.main_thread():
            # certbot and friends renew the certificate, then send SIGHUP.
            signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.tls.reload)
            )
        service.MultiService.startService(self)

    def stopService(self):
        d = defer.maybeDeferred(service.MultiService.stopService, self)
        d.addBoth(lambda result: (self.committer.stop(), self.store.watcher.stop(), result)[2])
        return d

    def port(self, name: str) -> int:
        """
        The TCP port listener C{name} is bound to.
        """
        return self.listeners[name].port.getHost().port


def makeService(config: Config, reactor=None) -> MailService:
    return MailService(config, reactor)

