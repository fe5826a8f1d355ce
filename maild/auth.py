"""
Authentication shared by every protocol: the cred Portal, the realm, the
password checker over the users file, and the throttling and logging of
failed logins.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import os
from typing import Any, Callable, Iterable, Mapping

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from maild import metrics
from maild.accounts import Accounts, loginName
from maild.connections import TrustedNetworks
from maild.names import InvalidName

log = Logger()


@implementer(IRealm)
class MailRealm:
    """
    Gives a logged-in user the avatar each protocol asks for.

    @param avatarFactories: for each interface served (C{IMessageDelivery},
        C{pop3.IMailbox}, C{imap4.IAccount}), a callable taking the user's
        address and returning the avatar.  An avatar with a C{logout}
        method has it called when the session ends.
    """

    def __init__(self, avatarFactories: Mapping[type[Interface], Callable[[str], Any]]):
        self.avatarFactories = dict(avatarFactories)

    def requestAvatar(self, avatarId, mind, *interfaces):
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        for iface in interfaces:
            factory = self.avatarFactories.get(iface)
            if factory is not None:
                avatar = factory(avatarId)
                return iface, avatar, getattr(avatar, "logout", lambda: None)
        raise NotImplementedError(f"no avatar for {interfaces}")


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks user names and passwords against the users file.

    Hash verification is slow by design (Argon2id: tens of milliseconds of
    CPU and 64 MiB), so it runs in a thread, and recent successes are
    remembered for C{cacheLifetime} seconds: Thunderbird opens up to five
    connections per account, and a webmail logs in for every request.
    The cache holds, per user, an HMAC of the user name and password
    under a random key made at start and never written anywhere: neither
    a password nor anything a password could be tested against offline.
    Only a correct password finds its entry; any other pays the full
    hash.  The cache is dropped whenever the users file changes.

    Concurrent logins with the same credentials (a client opening its
    connections at once) share one verification rather than each paying
    for the hash while the first has not yet filled the cache.

    @ivar defaultDomain: the domain of a login name given without one.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)
    CACHE_SIZE = 10_000

    def __init__(
        self,
        accounts: Accounts,
        defaultDomain: str,
        reactor=None,
        cacheLifetime: float = 300.0,
        clock=None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.accounts = accounts
        self.defaultDomain = defaultDomain
        self.reactor = reactor
        self.clock = clock or reactor
        self.cacheLifetime = cacheLifetime
        self._key = os.urandom(32)
        # address -> (HMAC of address and password, expiry time)
        self._cache: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self._usersVersion: object = None
        # address -> (HMAC, Deferreds waiting for that verification)
        self._verifying: dict[str, tuple[bytes, list[defer.Deferred]]] = {}

    def _digest(self, address: str, password: str) -> bytes:
        message = address.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _cached(self, address: str, digest: bytes) -> bool:
        version = self.accounts.version()
        if version != self._usersVersion:
            # Users added, removed or given new passwords: forget them all.
            self._cache.clear()
            self._usersVersion = version
        entry = self._cache.get(address)
        if entry is None:
            return False
        remembered, expires = entry
        if self.clock.seconds() >= expires:
            del self._cache[address]
            return False
        return hmac.compare_digest(remembered, digest)

    def _remember(self, address: str, digest: bytes, version: object) -> None:
        if self.cacheLifetime <= 0 or version != self._usersVersion:
            return
        self._cache[address] = (digest, self.clock.seconds() + self.cacheLifetime)
        self._cache.move_to_end(address)
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)

    def requestAvatarId(self, creds) -> defer.Deferred:
        username = creds.username
        password = creds.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        try:
            address = loginName(username, self.defaultDomain)
        except InvalidName:
            return defer.fail(error.UnauthorizedLogin("invalid user name"))
        digest = self._digest(address, password)
        if self._cached(address, digest):
            return defer.succeed(address)
        pending = self._verifying.get(address)
        if pending is not None and hmac.compare_digest(pending[0], digest):
            waiter: defer.Deferred = defer.Deferred()
            pending[1].append(waiter)
            return waiter
        return self._verify(address, password, digest)

    def _verify(self, address: str, password: str, digest: bytes) -> defer.Deferred:
        version = self._usersVersion
        waiters: list[defer.Deferred] = []
        if address not in self._verifying:
            self._verifying[address] = (digest, waiters)

        def verified(ok: bool) -> str:
            if not ok:
                raise error.UnauthorizedLogin("bad credentials")
            self._remember(address, digest, version)
            return address

        def done(result):
            if self._verifying.get(address, (None, None))[1] is waiters:
                del self._verifying[address]
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        d = threads.deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            self.accounts.verify,
            address,
            password,
        )
        return d.addCallback(verified).addBoth(done)


class LoginThrottle:
    """
    Slows down password guessing per client address (or per user name,
    for clients in trusted networks: see L{Authenticator}): each failure is
    answered after a delay that starts at C{base} seconds and doubles with
    every further failure for that key, up to C{maximum} (Dovecot's
    schedule).  A key that stays quiet for C{forget} seconds, or logs in
    successfully, starts again from C{base}.
    """

    def __init__(
        self, clock, base: float = 2.0, maximum: float = 15.0, forget: float = 300.0
    ) -> None:
        self.clock = clock
        self.base = base
        self.maximum = maximum
        self.forget = forget
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str) -> float:
        """
        Record a failure from C{address}.

        @return: how long to wait before answering it.
        """
        return self.delay(self.record(address))

    def record(self, address: str) -> int:
        """
        Record a failure from C{address}.

        @return: how many in a row it has had (this one included).
        """
        now = self.clock.seconds()
        count, last = self._failures.get(address, (0, now))
        if now - last > self.forget:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        if len(self._failures) > 100_000:
            self._prune(now)
        return count

    def delay(self, count: int) -> float:
        """
        How long to wait before answering the C{count}th failure in a row.
        """
        return min(self.base * 2 ** (min(count, 64) - 1), self.maximum)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _prune(self, now: float) -> None:
        for address, (_, last) in list(self._failures.items()):
            if now - last > self.forget:
                del self._failures[address]


class Authenticator:
    """
    The one way every protocol logs a user in: the portal, then on failure
    the throttling delay, and one log line per attempt that fail2ban can
    match::

        login failed: service=imap user=<alice@example.org> method=PLAIN rip=192.0.2.7
    """

    def __init__(self, portal: Portal, throttle: LoginThrottle, trusted: Iterable[str] = ()) -> None:
        self.portal = portal
        self.throttle = throttle
        self.trusted = TrustedNetworks(trusted)

    def _throttleKey(self, clientAddress: str, username: str) -> str:
        """
        What failed logins are counted by: the client's address, or, for a
        client in a trusted network (a webmail logging in all its users
        from one address), the user name, so that one user's mistakes do
        not delay everyone else's logins.
        """
        if clientAddress in self.trusted:
            return "user " + username.lower()
        return clientAddress

    def login(
        self,
        creds,
        clientAddress: str,
        service: str,
        method: str,
        *interfaces: type[Interface],
    ) -> defer.Deferred:
        """
        @return: a Deferred firing with C{(interface, avatar, logout)}, or
            failing with L{error.UnauthorizedLogin} after the throttling
            delay.
        """
        username = creds.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        # Printable, bounded, without spaces: safe to put in a log line.
        shown = "".join(c if c.isprintable() and c != " " else "?" for c in username[:128])
        throttleKey = self._throttleKey(clientAddress, username)

        def succeeded(result):
            metrics.logins.labels(service, method, "ok").inc()
            self.throttle.succeeded(throttleKey)
            log.info(
                "login: service={service} user=<{user}> method={method} rip={rip}",
                service=service,
                user=shown,
                method=method,
                rip=clientAddress,
            )
            return result

        def failed(reason):
            metrics.logins.labels(service, method, "failed").inc()
            if not reason.check(error.UnauthorizedLogin, error.UnhandledCredentials):
                log.failure("login error", reason)
            log.warn(
                "login failed: service={service} user=<{user}> method={method} rip={rip}",
                service=service,
                user=shown,
                method=method,
                rip=clientAddress,
            )
            # (A throttle shared through Redis answers with a Deferred.)
            d = defer.maybeDeferred(self.throttle.failed, throttleKey)
            d.addCallback(self._answerLater)
            return d

        d = self.portal.login(creds, None, *interfaces)
        d.addCallbacks(succeeded, failed)
        return d

    def _answerLater(self, delay: float) -> defer.Deferred:
        metrics.loginDelay.observe(delay)
        d = defer.Deferred()
        self.throttle.clock.callLater(
            delay, d.errback, error.UnauthorizedLogin("authentication failed")
        )
        return d


class SASLError(ValueError):
    """
    A SASL response that cannot be used.
    """


class NotBase64(SASLError):
    pass


class MalformedPlain(SASLError):
    pass


class OtherIdentity(SASLError):
    """
    The client asks to act as another user: not supported.
    """


class Cancelled(SASLError):
    """
    The client cancelled the exchange ("*", RFC 4422 section 3.5).
    """


def decodeResponse(response: bytes) -> bytes:
    """
    A client's base64 SASL response, decoded strictly.

    @raise NotBase64: if it is not base64.
    """
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise NotBase64("invalid base64 data")


def decodePlain(response: bytes) -> tuple[bytes, bytes]:
    """
    The user name and password of a base64 SASL PLAIN response (RFC 4616).

    @raise SASLError: saying what is wrong with it.
    """
    parts = decodeResponse(response).split(b"\0")
    if len(parts) != 3:
        raise MalformedPlain("expected authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    # (An empty authcid is the caller's to refuse, as a failed login or a
    # malformed response.)
    if authzid and authcid and authzid != authcid:
        raise OtherIdentity("cannot act as another user")
    return authcid, password


# The SASL mechanisms that carry a user name and password, as every
# protocol offers them.
PASSWORD_MECHANISMS = (b"PLAIN", b"LOGIN")


class PasswordExchange:
    """
    The server side of one SASL exchange that ends with a user name and a
    password: PLAIN (RFC 4616) or LOGIN (draft-murchison-sasl-login), with
    or without an initial response (RFC 4954 section 4, RFC 4959, RFC 5034).
    SMTP, POP3 and IMAP frame the challenges and responses; this decodes
    them.

    Both L{start} and L{respond} return the next challenge to send (raw:
    the protocol base64-encodes it), or None once L{credentials} is
    complete, and raise L{SASLError} when the exchange fails.

    @param mechanism: one of L{PASSWORD_MECHANISMS}.
    """

    def __init__(self, mechanism: bytes) -> None:
        if mechanism not in PASSWORD_MECHANISMS:
            raise ValueError(f"unsupported mechanism {mechanism!r}")
        self.mechanism = mechanism
        self.credentials: credentials.UsernamePassword | None = None
        self._username: bytes | None = None

    def start(self, initial: bytes | None) -> bytes | None:
        """
        Begin, with the client's initial response if it sent one (its
        encoded form, in which "=" is an empty response).
        """
        if initial is None:
            return b"" if self.mechanism == b"PLAIN" else b"Username:"
        return self.respond(b"" if initial == b"=" else initial)

    def respond(self, response: bytes) -> bytes | None:
        """
        Take the client's next (base64) response.
        """
        if response == b"*":
            raise Cancelled("authentication cancelled")
        if self.mechanism == b"PLAIN":
            authcid, password = decodePlain(response)
            self.credentials = credentials.UsernamePassword(authcid, password)
            return None
        if self._username is None:
            self._username = decodeResponse(response)
            return b"Password:"
        self.credentials = credentials.UsernamePassword(self._username, decodeResponse(response))
        return None


def isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # Not an IP address: a UNIX socket or similar local transport.
        return not host[:1].isdigit() and ":" not in host


def isTrusted(host: str, networks) -> bool:
    """
    Whether C{host} (a peer's address) is in one of C{networks}
    (addresses or CIDR networks, as C{limits.trusted_networks}); see
    L{TrustedNetworks}.
    """
    return host in TrustedNetworks(networks)


def plaintextLoginAllowed(policy: str, clientHost: str, secure: bool) -> bool:
    """
    Whether a password may be sent on this connection (the
    C{auth.plaintext} setting): always over TLS; before TLS only from
    loopback addresses under C{"loopback"} (as Dovecot treats them), from
    anywhere under C{"always"}, and never under C{"never"}.
    """
    if secure or policy == "always":
        return True
    if policy == "never":
        return False
    return isLoopback(clientHost)
