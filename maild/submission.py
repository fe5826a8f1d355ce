"""
Authenticated submission (RFC 6409) on the submission and SMTPS
listeners: AUTH PLAIN and LOGIN (RFC 4954) through the shared
Authenticator, and a policy that lets a user send only as themselves.
"""

from __future__ import annotations

import base64
import binascii
from email.utils import getaddresses

from twisted.cred import error
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail._except import IllegalClientResponse
from twisted.mail.smtp import SMTPServerError
from zope.interface import implementer

from maild.accounts import LocalAddresses
from maild.smtp import AUTH, COMMAND, SMTPServer, localRecipient

log = Logger()

NO_RELAY = SMTPServerError(
    550,
    "5.7.1 Relaying is not configured: this server delivers only to its own domains",
)


class PlainCredentials(PLAINCredentials):
    """
    RFC 4616 PLAIN; an authorization identity other than the user's own
    is refused (we do not let one user act as another).
    """

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise IllegalClientResponse("expected authzid NUL authcid NUL password")
        authzid, self.username, self.password = parts
        if authzid and authzid != self.username:
            # Verified (and logged) as a failed login, like a wrong password.
            self.password = b""


class LoginCredentials(LOGINCredentials):
    """
    The LOGIN mechanism, with the prompts clients expect.
    """

    def __init__(self) -> None:
        LOGINCredentials.__init__(self)
        self.challenges = [b"Password:", b"Username:"]


@implementer(smtp.IMessageDelivery)
class SubmissionDelivery:
    """
    The policy for an authenticated user: the envelope sender and the From:
    header must be the user's own address or one of their aliases; mail
    goes to local users only until an outbound queue exists.
    """

    def __init__(self, addresses: LocalAddresses, user: str) -> None:
        self.addresses = addresses
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin: smtp.Address) -> smtp.Address:
        if not self.addresses.ownsSender(self.user, str(origin)):
            raise SMTPServerError(
                553, f"5.7.1 Sender address rejected: not owned by user {self.user}"
            )
        return origin

    def validateTo(self, user: smtp.User) -> str:
        return localRecipient(self.addresses, user, NO_RELAY)

    def checkHeaders(self, headers: bytes) -> tuple[int, bytes] | None:
        for _, address in getaddresses(headerValues(headers, ("from", "sender"))):
            if address and not self.addresses.ownsSender(self.user, address):
                return 553, f"5.7.1 From: address {address} not owned by user {self.user}".encode()
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


class SubmissionServer(SMTPServer):
    """
    An SMTP session that requires AUTH before MAIL.
    """

    checksHeaders = True
    service = "submission"
    mechanisms = {b"PLAIN": PlainCredentials, b"LOGIN": LoginCredentials}

    def __init__(self, settings) -> None:
        SMTPServer.__init__(self, settings)
        self.challengers = dict(self.mechanisms)
        self.mechanism = b""
        self._authFailures = 0

    def authAllowed(self) -> bool:
        """
        Passwords only over TLS, unless configured otherwise (as Postfix's
        smtpd_tls_auth_only).
        """
        return self.secure or self.settings.plaintextAuth

    def authMechanisms(self) -> list[bytes]:
        return list(self.mechanisms) if self.authAllowed() and self.user is None else []

    def mayStartTransaction(self) -> bool:
        if self.user is None:
            self._error(530, b"5.7.0 Authentication required")
            return False
        return True

    def checkHeaders(self, headers: bytes) -> tuple[int, bytes] | None:
        return self.delivery.checkHeaders(headers)

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
        parts = rest.split(None, 1)
        mechanism = parts[0].upper() if parts else b""
        factory = self.challengers.get(mechanism)
        if factory is None:
            self._error(504, b"5.5.4 Unrecognized authentication type")
            return
        self.challenger = factory()
        self.mechanism = mechanism
        self.mode = AUTH
        if len(parts) > 1:
            # RFC 4954 section 4: "=" is an empty initial response.
            self.state_AUTH(b"" if parts[1] == b"=" else parts[1])
        else:
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))

    def state_AUTH(self, response: bytes) -> None:
        if response == b"*":
            self.mode = COMMAND
            self._error(501, b"5.7.0 Authentication aborted")
            return
        try:
            decoded = base64.b64decode(response, validate=True)
            self.challenger.setResponse(decoded)
        except (binascii.Error, IllegalClientResponse):
            self.mode = COMMAND
            self._error(501, b"5.5.2 Cannot decode the authentication response")
            return
        if self.challenger.moreChallenges():
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        self.mode = COMMAND
        self._hold()
        d = self.settings.authenticator.login(
            self.challenger,
            self.clientAddress,
            "submission",
            self.mechanism.decode("ascii"),
            smtp.IMessageDelivery,
        )
        d.addCallbacks(self._authenticated, self._authFailed)
        d.addBoth(lambda _: self._release())

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
        self._authFailures += 1
        self.sendCode(535, b"5.7.8 Error: authentication failed")
        if self._authFailures >= self.limits.auth_failures_per_connection:
            self.sendCode(421, b"4.7.0 " + self.host + b" Error: too many failed authentications")
            self.transport.loseConnection()
