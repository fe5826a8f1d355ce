"""
Authenticated submission (RFC 6409) on the submission and SMTPS
listeners: AUTH PLAIN and LOGIN (RFC 4954) through the shared
Authenticator, and a policy that lets a user send only as themselves.
"""

from __future__ import annotations

import base64

from twisted.cred import error
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.smtp import SMTPServerError
from zope.interface import implementer

from maild.accounts import LocalAddresses
from maild.auth import PASSWORD_MECHANISMS, Cancelled, OtherIdentity, PasswordExchange, SASLError
from maild.relay import RemoteRecipient
from maild.smtp import AUTH, COMMAND, SMTPServer, localRecipient

log = Logger()

NO_RELAY = (550, "5.7.1 Relaying is not configured: this server delivers only to its own domains")


class _NotLocal(SMTPServerError):
    """
    Raised by localRecipient for another domain: the relay takes it from
    there.  A new one each time: an exception raised again keeps adding
    the frames it passes through to its traceback, and with them every
    recipient and session it ever saw.
    """


@implementer(smtp.IMessageDelivery)
class SubmissionDelivery:
    """
    The policy for an authenticated user: the envelope sender and the From:
    header must be the user's own address or one of their aliases; mail
    for other domains goes to the relay's queue (when there is a relay).
    """

    def __init__(self, addresses: LocalAddresses, user: str, relay=None) -> None:
        self.addresses = addresses
        self.user = user
        self.relay = relay

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin: smtp.Address) -> smtp.Address:
        if not self.addresses.ownsSender(self.user, str(origin)):
            raise SMTPServerError(
                553, f"5.7.1 Sender address rejected: not owned by user {self.user}"
            )
        return origin

    def validateTo(self, user: smtp.User) -> str:
        try:
            return localRecipient(self.addresses, user, _NotLocal(550, "5.7.1 Not a local domain"))
        except _NotLocal:
            pass
        if self.relay is None:
            raise SMTPServerError(*NO_RELAY)
        return self.relay.acceptRecipient(self.user, user.dest)

    def checkHeaders(self, headers: bytes) -> tuple[int, bytes] | None:
        for value in headerValues(headers, ("from", "sender")):
            for address in headerAddresses(value):
                if not self.addresses.ownsSender(self.user, address):
                    # Replies are ASCII (RFC 5321 section 2.4); the header
                    # may hold anything.
                    text = f"5.7.1 From: address {address[:256]} not owned by user {self.user}"
                    return 553, text.encode("ascii", "backslashreplace")
        return None


def headerValues(headers: bytes, names: tuple[str, ...]) -> list[str]:
    """
    The values of the header fields called C{names} (lower case) in a
    header section, unfolded.  (The email package's parser does the same at
    ten times the cost, for every message sent.)
    """
    values: list[str] = []
    wanted = False
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t"):
            if wanted:
                values[-1] += line
            continue
        name, colon, value = line.partition(":")
        wanted = bool(colon) and name.strip().lower() in names
        if wanted:
            values.append(value)
    return values


def headerAddresses(value: str) -> list[str]:
    """
    The addresses in an address-list header value (RFC 5322 section 3.4):
    the angle-addr of each mailbox, or its addr-spec, with comments, display
    names and group names left out.

    One pass, without recursion: the email package's parser recurses on
    nested comments and on groups, and a header of 1,000 "(" or ":" raises
    RecursionError there.
    """
    addresses: list[str] = []
    plain: list[str] = []
    angle: list[str] | None = None
    inAngle = inQuote = escaped = False
    depth = 0

    def finish() -> None:
        nonlocal plain, angle
        text = "".join(angle if angle is not None else plain)
        # obs-route (RFC 5322 section 4.4): "<@relay:user@host>".
        address = "".join(text.split()).rpartition(":")[2]
        if address:
            addresses.append(address)
        plain, angle = [], None

    for char in value:
        current = angle if inAngle else plain
        if escaped:
            escaped = False
            if not depth:
                current.append(char)
        elif char == "\\" and (inQuote or depth):
            escaped = True
            if not depth:
                current.append(char)
        elif depth:
            depth += 1 if char == "(" else -1 if char == ")" else 0
        elif inQuote:
            inQuote = char != '"'
            current.append(char)
        elif char == '"':
            inQuote = True
            current.append(char)
        elif char == "(":
            depth = 1
        elif inAngle:
            if char == ">":
                inAngle = False
            else:
                current.append(char)
        elif char == "<":
            inAngle, angle = True, []
        elif char in ",;":
            finish()
        elif char == ":":
            # A group's name: its mailboxes follow.
            plain = []
        else:
            plain.append(char)
    finish()
    return addresses


class SubmissionServer(SMTPServer):
    """
    An SMTP session that requires AUTH before MAIL.
    """

    checksHeaders = True
    service = "submission"

    def __init__(self, settings) -> None:
        SMTPServer.__init__(self, settings)
        self.exchange: PasswordExchange | None = None
        self._authFailures = 0

    def authAllowed(self) -> bool:
        """
        Passwords only over TLS, unless configured otherwise (as Postfix's
        smtpd_tls_auth_only).
        """
        return self.secure or self.settings.plaintextAuth

    def authMechanisms(self) -> list[bytes]:
        return list(PASSWORD_MECHANISMS) if self.authAllowed() and self.user is None else []

    def mayStartTransaction(self) -> bool:
        if self.user is None:
            self._error(530, b"5.7.0 Authentication required")
            return False
        return True

    def checkHeaders(self, headers: bytes) -> tuple[int, bytes] | None:
        return self.delivery.checkHeaders(headers)

    def deliverMessage(self, transaction):
        relay = self.delivery.relay
        remote = [r for r in transaction.recipients if isinstance(r, RemoteRecipient)]
        if not remote:
            return SMTPServer.deliverMessage(self, transaction)
        local = [r for r in transaction.recipients if not isinstance(r, RemoteRecipient)]
        return relay.enqueue(
            transaction.message,
            str(transaction.sender),
            local,
            remote,
            self.user,
            bytes(transaction.headers),
            transaction.queueId,
        )

    def forgetSession(self) -> None:
        SMTPServer.forgetSession(self)
        self.user = None
        self.delivery = None
        self.authenticated = False

    def ext_AUTH(self, rest: bytes) -> None:
        if self.user is not None:
            self._error(503, b"5.5.1 Error: already authenticated")
            return
        if self.transaction is not None:
            self._error(503, b"5.5.1 Error: MAIL transaction in progress")
            return
        if not self.authAllowed():
            self._error(538, b"5.7.11 Encryption required for requested authentication mechanism")
            return
        parts = rest.split()
        mechanism = parts[0].upper() if parts else b""
        if mechanism not in PASSWORD_MECHANISMS:
            self._error(504, b"5.5.4 Unrecognized authentication type")
            return
        if len(parts) > 2:
            self._error(501, b"5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        self.exchange = PasswordExchange(mechanism)
        self.mode = AUTH
        # RFC 4954 section 4: the initial response, if any, is the first
        # response ("=" an empty one); for LOGIN it is the user name.
        self._saslStep(self.exchange.start, parts[1] if len(parts) > 1 else None)

    def state_AUTH(self, response: bytes) -> None:
        self._saslStep(self.exchange.respond, response.strip())

    def _saslStep(self, step, response: bytes | None) -> None:
        try:
            challenge = step(response)
        except Cancelled:
            self._endExchange()
            self._error(501, b"5.7.0 Authentication aborted")
            return
        except OtherIdentity:
            self._endExchange()
            self._refuseLogin(b"5.7.8 Error: cannot act as another user")
            return
        except SASLError:
            self._endExchange()
            self._error(501, b"5.5.2 Cannot decode the authentication response")
            return
        if challenge is not None:
            self.sendCode(334, base64.b64encode(challenge))
            return
        exchange = self._endExchange()
        self._hold()
        d = self.settings.authenticator.login(
            exchange.credentials,
            self.clientAddress,
            "submission",
            exchange.mechanism.decode("ascii"),
            smtp.IMessageDelivery,
        )
        d.addCallbacks(self._authenticated, self._authFailed)
        d.addBoth(lambda _: self._release())

    def _endExchange(self) -> PasswordExchange:
        exchange, self.exchange = self.exchange, None
        self.mode = COMMAND
        return exchange

    def _authenticated(self, result) -> None:
        _, avatar, logout = result
        self.delivery = avatar
        self.user = avatar.user
        self.authenticated = True
        self._onLogout = logout
        self.sendCode(235, b"2.7.0 Authentication successful")

    def _authFailed(self, reason) -> None:
        if not reason.check(error.UnauthorizedLogin):
            log.failure("authentication error", reason)
            self.sendCode(454, b"4.7.0 Temporary authentication failure")
            return
        self._refuseLogin(b"5.7.8 Error: authentication failed")

    def _refuseLogin(self, message: bytes) -> None:
        self._authFailures += 1
        self.sendCode(535, message)
        if self._authFailures >= self.limits.auth_failures_per_connection:
            self.sendCode(421, b"4.7.0 " + self.host + b" Error: too many failed authentications")
            self.close()
