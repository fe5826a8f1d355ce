"""
SMTP: receiving mail for local users (MX), and authenticated submission.

L{SMTPServer} subclasses Twisted's C{ESMTP} for its command parsing,
addresses, AUTH and STARTTLS, and replaces what Twisted gets wrong for a
real server: it frames its input itself (so that pipelined commands wait
while a reply is pending, plaintext queued behind STARTTLS is dropped,
and DATA is handled in chunks rather than line by line), answers with
enhanced status codes (RFC 2034), enforces limits, and writes each message
once, durably, before it says 250.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.smtp import AddressError, SMTPServerError
from zope.interface import implementer

from maild import metrics
from maild.accounts import LocalAddresses
from maild.connections import LimitedFactory
from maild.config import Limits
from maild.lines import LineReader, Overlong
from maild.names import InvalidName, normalizeAddress
from maild.store.delivery import DeliveryFailed
from maild.store.interfaces import IMailStore
from maild.tls import isEncrypted

log = Logger()

COMMAND, DATA, AUTH = smtp.COMMAND, smtp.DATA, smtp.AUTH

# Replies gathered for one write are written once they reach this size.
_REPLY_BATCH = 16 * 1024
# A line in DATA longer than this is passed on in pieces.
_DATA_PIECE = 64 * 1024
# After this many bad commands the session is closed (Postfix's
# smtpd_hard_error_limit).
_MAX_ERRORS = 20
# How much of a message's header section submission looks at.
_MAX_HEADER_SECTION = 256 * 1024
# The command is well formed up to its address (which is then at fault).
_FROM_PREFIX = re.compile(rb"\s*FROM:\s*<", re.I)
_TO_PREFIX = re.compile(rb"\s*TO:\s*<", re.I)
_CONTROL_IN_LINE = re.compile(rb"[\r\0]")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
# RFC 6531 section 3.5: an address that needs SMTPUTF8, which we do not offer.
_NEEDS_SMTPUTF8 = (553, b"5.6.7 Error: non-ASCII address requires SMTPUTF8")


class DataDecoder:
    """
    Undoes the transparency of DATA (RFC 5321 section 4.5.2) piece by
    piece: finds the end marker, removes the dot added before lines that
    begin with one, and notices bare CR or LF, which must never be taken
    for a line end (the "SMTP smuggling" attacks).
    """

    def __init__(self) -> None:
        self.atLineStart = True
        self.bareLineEnding = False

    def decode(self, buffer: bytes) -> tuple[bytes, int, bool]:
        """
        Take what can be taken from C{buffer}.

        @return: the message content (CRLF line endings), how many octets
            of C{buffer} were used, and whether the end marker was reached.
        """
        if self.atLineStart and buffer[:3] == b".\r\n":
            return b"", 3, True
        end = buffer.find(b"\r\n.\r\n")
        if end >= 0:
            raw, used, done = buffer[: end + 2], end + 5, True
        else:
            cut = buffer.rfind(b"\r\n")
            if cut >= 0:
                raw, used = buffer[: cut + 2], cut + 2
            elif len(buffer) > _DATA_PIECE:
                # A very long line: pass it on, keeping a CR that may be
                # the start of its line end.
                used = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
                raw = buffer[:used]
            else:
                return b"", 0, False
            done = False
        content = raw[1:] if self.atLineStart and raw[:1] == b"." else raw
        content = content.replace(b"\r\n.", b"\r\n")
        lineEnds = content.count(b"\r\n")
        if content.count(b"\r") != lineEnds or content.count(b"\n") != lineEnds:
            self.bareLineEnding = True
        self.atLineStart = raw.endswith(b"\r\n")
        return content, used, done


_queueSequence = itertools.count(int(time.time() * 1000) & 0xFFFFFFFF)
# Processes started together (workers) start their counters from about the
# same clock reading: a random mark of each process keeps their ids apart.
_processMark = int.from_bytes(os.urandom(2), "big")


def _nextQueueId() -> str:
    """
    A queue id for log lines and Received: headers, 12 hex digits: a
    counter started from the clock (unique within this process), then this
    process's mark (apart from the other processes on the data folder,
    but for a chance of one in 65,536 per pair).
    """
    return f"{next(_queueSequence) & 0xFFFFFFFF:08X}{_processMark:04X}"


def _looksLikeHeader(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and b" " not in name and b"\t" not in name


@dataclass
class Transaction:
    """
    One mail transaction: the envelope and the message being received.
    """

    sender: smtp.Address
    recipients: list[str] = field(default_factory=list)
    message: Any = None
    decoder: DataDecoder | None = None
    queueId: str = ""
    size: int = 0
    error: tuple[int, bytes] | None = None
    firstPiece: bool = True
    # When DATA began (the clock's seconds), and the octets received since.
    dataStart: float = 0.0
    received: int = 0
    # The header section, collected for checkHeaders (submission).
    headers: bytearray = field(default_factory=bytearray)
    headersDone: bool = False
    # The MX trust checks (maild.trust.checker.MessageChecks), or None.
    checks: Any = None
    # When the end of DATA arrived (time.perf_counter), for the metrics.
    dataEnded: float = 0.0


@implementer(smtp.IMessageDelivery)
class InboundDelivery:
    """
    The MX policy: mail from anyone, for local users only.  Never a relay.

    @ivar trust: the SPF/DKIM/DMARC checks
        (L{maild.trust.checker.TrustChecker}), or None.
    """

    def __init__(self, addresses: LocalAddresses, trust=None) -> None:
        self.addresses = addresses
        self.trust = trust

    def receivedHeader(self, helo, origin, recipients):
        # SMTPServer writes its own Received: header (with the queue id).
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user: smtp.User) -> str:
        """
        @return: the local user who receives mail for C{user}.
        @raise SMTPServerError: with the reply to give.
        """
        return localRecipient(
            self.addresses, user, SMTPServerError(554, "5.7.1 Relay access denied")
        )


def localRecipient(addresses: LocalAddresses, user: smtp.User, notLocal: SMTPServerError) -> str:
    """
    The local user who receives mail for the recipient C{user}.

    @raise SMTPServerError: C{notLocal} for another domain, or the reply
        for a bad or unknown address.
    """
    dest = user.dest
    try:
        domain = dest.domain.decode("ascii")
        address = normalizeAddress(f"{dest.local.decode('ascii')}@{domain}")
    except (UnicodeDecodeError, InvalidName):
        raise SMTPServerError(501, "5.1.3 Bad recipient address syntax")
    if not addresses.isLocalDomain(address.rpartition("@")[2]):
        raise notLocal
    mailbox = addresses.resolve(address)
    if mailbox is None:
        raise SMTPServerError(550, "5.1.1 Recipient address rejected: User unknown")
    return mailbox


@dataclass(frozen=True)
class SMTPSettings:
    """
    What every session of one listener shares.
    """

    hostname: str
    limits: Limits
    store: IMailStore
    addresses: LocalAddresses
    clock: Any
    # The policy of sessions that have not authenticated: the MX policy,
    # or None where AUTH is required (submission).
    delivery: smtp.IMessageDelivery | None
    tlsContext: Any = None
    # Submission only: logins, and whether AUTH is offered before TLS.
    authenticator: Any = None
    plaintextAuth: bool = False


@implementer(IPushProducer)
class SMTPServer(smtp.ESMTP):
    """
    One SMTP session.

    @cvar checksHeaders: whether the header section of each message is
        handed to L{checkHeaders} (submission checks the From: header).
    @cvar service: the name in logs and metrics.
    """

    checksHeaders = False
    service = "smtp"

    def __init__(self, settings: SMTPSettings) -> None:
        smtp.ESMTP.__init__(self, contextFactory=settings.tlsContext)
        self.settings = settings
        self.host = settings.hostname.encode("idna")
        self.limits = settings.limits
        self.timeout = self.limits.idle_timeout
        self.callLater = settings.clock.callLater
        self.delivery = settings.delivery
        self.transaction: Transaction | None = None
        self.user: str | None = None
        self.peerAddress = self.clientAddress = "?"
        self.reader = LineReader(self.limits.line_length)
        # Replies gathered while input is handled (None: write at once).
        self._replies: list[bytes] | None = None
        self._repliesSize = 0
        self._held = 0
        # Whether we stopped reading from the client, and whether its
        # transport asked us to stop writing (the client does not read).
        self._readingPaused = False
        self._outputPaused = False
        self._deadline = None
        self._errors = 0
        self._esmtp = False
        self._lost = False

    # Connection ------------------------------------------------------------

    def greeting(self) -> bytes:
        return self.host + b" ESMTP maild"

    def connectionMade(self) -> None:
        # A streaming producer: when the client does not read its replies
        # and they pile up in the transport, we are paused and stop taking
        # commands (and, once the reader is full, reading).
        self.transport.registerProducer(self, True)
        smtp.ESMTP.connectionMade(self)

    def pauseProducing(self) -> None:
        self._outputPaused = True

    def resumeProducing(self) -> None:
        self._outputPaused = False
        if self.transport is not None and not self.transport.disconnecting:
            self._process()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self._lost = True
        self._cancelDeadline()
        self._discardTransaction()
        smtp.ESMTP.connectionLost(self, reason)
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connectionClosed(self)

    def timeoutConnection(self) -> None:
        if self._outputPaused:
            # The client does not read: no reply can reach it, and a close
            # would wait for it forever.
            self.transport.unregisterProducer()
            self.transport.abortConnection()
            return
        self.sendCode(421, b"4.4.2 " + self.host + b" Error: timeout exceeded")
        self.close()

    def _startDeadline(self, seconds: float) -> None:
        self._cancelDeadline()
        self._deadline = self.callLater(seconds, self.timeoutConnection)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    @property
    def secure(self) -> bool:
        return self.startedTLS or isEncrypted(self.transport)

    # Input framing ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.mode == DATA and self.transaction is not None:
            self.transaction.received += len(data)
        self.reader.feed(data)
        self._process()

    def sendLine(self, line: bytes) -> None:
        # Replies to commands handled in one pass (a pipelined MAIL, RCPT,
        # DATA) leave in one write: over TLS each write is a record, and
        # with OpenSSL each record costs tens of microseconds.
        if self._replies is None:
            self.transport.writeSequence((line, b"\r\n"))
        else:
            self._replies += (line, b"\r\n")
            self._repliesSize += len(line) + 2
            if self._repliesSize > _REPLY_BATCH:
                # Out now, so that a client that does not read pauses us
                # before much more is gathered.
                self._flushReplies()
                self._replies = []

    def close(self) -> None:
        """
        Close the connection after every reply given so far.  Replies
        gathered for one write must be written first: over TLS, what is
        written after loseConnection is dropped, and the client would lose
        the last reply (a 221 to QUIT, a 421).
        """
        self._flushReplies()
        # (A registered producer would hold the connection open.)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _flushReplies(self) -> None:
        replies, self._replies = self._replies, None
        self._repliesSize = 0
        if replies:
            self.transport.write(b"".join(replies))

    def _process(self) -> None:
        if self._replies is not None:
            # Called again from within (a check that answered at once):
            # the outer call sends what is gathered.
            self._handleInput()
            return
        self._replies = []
        try:
            self._handleInput()
        finally:
            self._flushReplies()

    def _handleInput(self) -> None:
        reader = self.reader
        while (
            reader.pending
            and not self._held
            and not self._outputPaused
            and not self.transport.disconnecting
        ):
            if self.mode == DATA:
                if not self._dataPiece():
                    break
                continue
            line = reader.readLine()
            if line is None:
                break
            if isinstance(line, Overlong):
                self._error(500, b"5.5.2 Error: line too long")
                continue
            self._cancelDeadline()
            if _CONTROL_IN_LINE.search(line):
                # RFC 5321 section 2.3.8: CR and LF only as the line end.
                # A CR or NUL inside a command would end up in headers
                # (Return-Path:) or confuse the next hop.
                self._error(500, b"5.5.2 Error: bare CR or NUL in command")
                continue
            self.lineReceived(line)
        if self.mode != DATA and not self._held:
            if reader.partial:
                # A command has begun: it must be complete within the
                # deadline, however slowly its bytes trickle in.
                if self._deadline is None:
                    self._startDeadline(self.limits.command_timeout)
            else:
                self._cancelDeadline()
        self._pauseReading(reader.full)

    def _pauseReading(self, pause: bool) -> None:
        # The reader holds what came while commands wait (a reply pending,
        # or output not taken); past its limit the client must wait too.
        if pause != self._readingPaused and not self.transport.disconnecting:
            self._readingPaused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _hold(self) -> None:
        """
        Stop taking commands until L{_release}: their replies must follow
        the one we are waiting for (RFC 2920 section 3.1).
        """
        self._held += 1
        self.setTimeout(None)

    def _release(self) -> None:
        self._held -= 1
        if self._held or self._lost:
            # A closed session must not set its idle timer again.
            return
        self.setTimeout(self.timeout)
        self._process()

    def lookupMethod(self, command: bytes):
        # Twisted decodes the verb as ASCII and would crash on 8-bit input.
        if not command.isalpha():
            return None
        return smtp.ESMTP.lookupMethod(self, command.decode("ascii"))

    def _error(self, code: int, message: bytes) -> None:
        self._errors += 1
        self.sendCode(code, message)
        if self._errors >= _MAX_ERRORS:
            self.sendCode(421, b"4.7.0 " + self.host + b" Error: too many errors")
            self.close()

    def sendSyntaxError(self) -> None:
        self._error(500, b"5.5.2 Error: bad syntax")

    def do_UNKNOWN(self, rest: bytes) -> None:
        self._error(500, b"5.5.2 Error: command not recognized")

    # Session commands ------------------------------------------------------

    def _greeted(self, rest: bytes, esmtp: bool) -> bool:
        if not rest.strip():
            self._error(501, b"5.5.4 Syntax: " + (b"EHLO" if esmtp else b"HELO") + b" hostname")
            return False
        self._helo = (rest.strip(), self.clientAddress.encode("ascii", "replace"))
        self._esmtp = esmtp
        self._discardTransaction()
        return True

    def do_HELO(self, rest: bytes) -> None:
        if self._greeted(rest, esmtp=False):
            self.sendCode(250, self.host)

    # Some teaching clients say HELLO: taken as HELO, since nothing else
    # could be meant.
    do_HELLO = do_HELO

    def do_EHLO(self, rest: bytes) -> None:
        if self._greeted(rest, esmtp=True):
            hello = self.host + b" Hello [" + self.clientAddress.encode("ascii", "replace") + b"]"
            self.sendCode(250, hello + b"\n" + self.listExtensions())

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.limits.message_size).encode("ascii")],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.canStartTLS and not self.secure:
            ext[b"STARTTLS"] = None
        mechanisms = self.authMechanisms()
        if mechanisms:
            ext[b"AUTH"] = mechanisms
        return ext

    def authMechanisms(self) -> list[bytes]:
        """
        The SASL mechanisms offered now (none on the MX port).
        """
        return []

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_RSET(self, rest: bytes) -> None:
        self._discardTransaction()
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        if not rest.strip():
            self._error(501, b"5.5.4 Syntax: VRFY address")
            return
        # RFC 5321 section 3.5.3: we do not confirm which users exist.
        self.sendCode(252, b"2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, rest: bytes) -> None:
        self.sendCode(502, b"5.5.1 EXPN is not supported")

    def do_HELP(self, rest: bytes) -> None:
        verbs = b"HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
        if self.canStartTLS and not self.secure:
            verbs += b" STARTTLS"
        if self.authMechanisms():
            verbs += b" AUTH"
        self.sendCode(214, b"2.0.0 Commands: " + verbs)

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self.close()

    def ext_AUTH(self, rest: bytes) -> None:
        self._error(503, b"5.5.1 Error: authentication not enabled")

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.secure:
            self._error(503, b"5.5.1 Error: TLS already active")
            return
        if not self.canStartTLS:
            self._error(502, b"5.5.1 Error: command not implemented")
            return
        if rest.strip():
            # RFC 3207 section 4: STARTTLS takes no parameters.
            self._error(501, b"5.5.4 Syntax: STARTTLS")
            return
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        self._flushReplies()
        # Whatever the client sent behind STARTTLS came in plaintext and
        # must not be taken as said inside TLS (CVE-2011-0411).
        self.reader.discard()
        self._cancelDeadline()
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self.forgetSession()

    def forgetSession(self) -> None:
        """
        RFC 3207 section 4.2: forget everything learnt before TLS.
        """
        self._helo = None
        self._esmtp = False
        self._discardTransaction()

    # The mail transaction --------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if self.transaction is not None:
            self._error(503, b"5.5.1 Error: nested MAIL command")
            return
        if not self.mayStartTransaction():
            return
        if _NON_ASCII.search(rest):
            self._error(*_NEEDS_SMTPUTF8)
            return
        match = self.mail_re.match(rest)
        if not match:
            if _FROM_PREFIX.match(rest):
                self._error(501, b"5.1.7 Bad sender address syntax")
            else:
                self._error(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            sender = smtp.Address(match.group("path"), self.host)
        except AddressError:
            self._error(501, b"5.1.7 Bad sender address syntax")
            return
        problem = self._checkMailParameters(match.group("opts"))
        if problem is not None:
            self._error(*problem)
            return
        try:
            sender = self.delivery.validateFrom(self._helo, sender)
        except SMTPServerError as e:
            self._error(e.code, _bytes(e.resp))
            return
        self.transaction = Transaction(sender)
        self._startChecks(self.transaction)
        self.sendCode(250, b"2.1.0 Ok")

    def _startChecks(self, transaction: Transaction) -> None:
        # Mail of authenticated users and trusted networks is not checked.
        trust = getattr(self.delivery, "trust", None)
        if trust is None or self.user is not None or trust.exempt(self.clientAddress):
            return
        helo = ((self._helo and self._helo[0]) or b"").decode("ascii", "replace")
        transaction.checks = trust.begin(self.clientAddress, helo, str(transaction.sender))

    def mayStartTransaction(self) -> bool:
        """
        Whether MAIL is allowed now (submission requires AUTH); sends the
        refusal when it is not.
        """
        return True

    def _checkMailParameters(self, opts: bytes | None) -> tuple[int, bytes] | None:
        for param in (opts or b"").split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit():
                    return 501, b"5.5.4 Bad SIZE parameter"
                if int(value) > self.limits.message_size:
                    return 552, b"5.3.4 Message size exceeds fixed limit"
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    return 501, b"5.5.4 Unsupported BODY type"
            elif key == b"AUTH":
                # RFC 4954 section 5: accepted; we trust only our own AUTH.
                pass
            else:
                return 555, b"5.5.4 Unsupported option: " + key[:32]
        return None

    def do_RCPT(self, rest: bytes) -> None:
        transaction = self.transaction
        if transaction is None:
            self._error(503, b"5.5.1 Error: need MAIL command")
            return
        if _NON_ASCII.search(rest):
            self._error(*_NEEDS_SMTPUTF8)
            return
        match = self.rcpt_re.match(rest)
        if not match:
            if _TO_PREFIX.match(rest):
                self._error(501, b"5.1.3 Bad recipient address syntax")
            else:
                self._error(501, b"5.5.4 Syntax: RCPT TO:<address>")
            return
        if match.group("opts"):
            self._error(555, b"5.5.4 Unsupported option")
            return
        path = match.group("path")
        if path.strip(b"<>").lower() == b"postmaster":
            # RFC 5321 section 4.5.1: <Postmaster> with no domain is ours.
            path = b"<postmaster@" + self.settings.addresses.domains[0].encode() + b">"
        try:
            user = smtp.User(path, self._helo, self, transaction.sender)
        except AddressError:
            self._error(501, b"5.1.3 Bad recipient address syntax")
            return
        if len(transaction.recipients) >= self.limits.recipients:
            self.sendCode(452, b"4.5.3 Error: too many recipients")
            return
        try:
            mailbox = self.delivery.validateTo(user)
        except SMTPServerError as e:
            self._error(e.code, _bytes(e.resp))
            return
        if mailbox not in transaction.recipients:
            transaction.recipients.append(mailbox)
        self.sendCode(250, b"2.1.5 Ok")

    def do_DATA(self, rest: bytes) -> None:
        transaction = self.transaction
        if transaction is None:
            self._error(503, b"5.5.1 Error: need MAIL command")
            return
        if not transaction.recipients:
            self._error(554, b"5.5.1 Error: no valid recipients")
            return
        transaction.queueId = _nextQueueId()
        try:
            transaction.message = self.settings.store.incoming(self._traceHeaders(transaction))
        except OSError as e:
            log.error("cannot start a message: {error}", error=e)
            self.sendCode(451, b"4.3.0 Error: local error in processing")
            return
        transaction.decoder = DataDecoder()
        self.mode = DATA
        self.setTimeout(None)
        transaction.dataStart = self.settings.clock.seconds()
        # One timer for the DATA deadline and the minimum rate.
        first = min(self.limits.min_data_rate_after, self.limits.data_timeout)
        self._deadline = self.callLater(first, self._checkData)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _checkData(self) -> None:
        """
        The DATA deadline (RFC 5321 section 4.5.3.2), and the minimum rate:
        a transfer averaging less than C{min_data_rate} once it has run
        C{min_data_rate_after} is closed (a client sending a byte every few
        seconds would otherwise hold the connection until the deadline).
        Otherwise look again when it would fall below the rate if nothing
        more came, or at the deadline.
        """
        self._deadline = None
        transaction = self.transaction
        if transaction is None or self.mode != DATA:
            return
        limits = self.limits
        elapsed = self.settings.clock.seconds() - transaction.dataStart
        if elapsed >= limits.data_timeout:
            self.timeoutConnection()
            return
        rate = limits.min_data_rate
        if elapsed >= limits.min_data_rate_after and transaction.received < rate * elapsed:
            log.info(
                "data rate too low rip={rip}: {received} octets in {elapsed:.0f} s",
                rip=self.clientAddress,
                received=transaction.received,
                elapsed=elapsed,
            )
            self._discardTransaction()
            self.sendCode(421, b"4.4.2 " + self.host + b" Error: data rate too low")
            self.close()
            return
        untilSlow = max(transaction.received / rate, limits.min_data_rate_after) - elapsed
        wait = min(max(untilSlow, 1.0), limits.data_timeout - elapsed)
        self._deadline = self.callLater(wait, self._checkData)

    def _traceHeaders(self, transaction: Transaction) -> bytes:
        """
        Return-Path: and Received: (RFC 5321 section 4.4), CRLF-terminated.
        """
        helo = ((self._helo and self._helo[0]) or b"unknown").decode("ascii", "replace")
        helo = "".join(c if c.isprintable() and not c.isspace() else "?" for c in helo[:255])
        protocol = "ESMTP" if self._esmtp else "SMTP"
        if self._esmtp:
            # RFC 3848: S for TLS, A for an authenticated client.
            protocol += ("S" if self.secure else "") + ("A" if self.user else "")
        recipients = transaction.recipients
        forClause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        received = (
            f"Received: from {helo} ([{self.clientAddress}])\r\n"
            f"\tby {self.settings.hostname} (maild) with {protocol} id {transaction.queueId}"
            f"{forClause};\r\n\t{smtp.rfc822date().decode('ascii')}\r\n"
        )
        returnPath = f"Return-Path: <{transaction.sender}>\r\n"
        return (returnPath + received).encode("utf-8")

    def _dataPiece(self) -> bool:
        """
        Consume DATA from the input.

        @return: whether anything was consumed.
        """
        transaction = self.transaction
        content, used, done = transaction.decoder.decode(self.reader.peek())
        if not used:
            return False
        self.reader.skip(used)
        if content and transaction.error is None:
            transaction.size += len(content)
            if transaction.size > self.limits.message_size:
                transaction.error = (552, b"5.3.4 Error: message too big")
                transaction.message.discard()
            else:
                if transaction.firstPiece and not _looksLikeHeader(content.split(b"\r\n", 1)[0]):
                    # No header section: keep the body out of our headers.
                    self._store(transaction, b"\r\n")
                self._store(transaction, content)
                if self.checksHeaders and not transaction.headersDone:
                    self._collectHeaders(transaction, content)
            transaction.firstPiece = False
        if transaction.decoder.bareLineEnding and transaction.error is None:
            transaction.error = (
                550,
                b"5.6.0 Error: bare CR or LF in message (RFC 5321 section 2.3.8)",
            )
            transaction.message.discard()
        if done:
            self._endOfData()
        return True

    @staticmethod
    def _store(transaction: Transaction, content: bytes) -> None:
        if transaction.checks is not None:
            # Forged Authentication-Results fields stay out of the store.
            content = transaction.checks.feed(content)
        transaction.message.write(content)

    def _collectHeaders(self, transaction: Transaction, content: bytes) -> None:
        headers = transaction.headers
        start = max(0, len(headers) - 3)
        headers += content
        end = headers.find(b"\r\n\r\n", start)
        if headers.startswith(b"\r\n"):
            end = 0
        if end >= 0 or len(headers) > _MAX_HEADER_SECTION:
            transaction.headersDone = True
            del headers[end + 2 if end >= 0 else _MAX_HEADER_SECTION :]
            transaction.error = self.checkHeaders(bytes(headers))
            if transaction.error is not None:
                transaction.message.discard()

    def checkHeaders(self, headers: bytes) -> tuple[int, bytes] | None:
        """
        Look at the header section of a message (CRLF line ends).

        @return: the reply refusing the message, or None to accept it.
        """
        return None

    def _endOfData(self) -> None:
        transaction = self.transaction
        self.transaction = None
        self.mode = COMMAND
        self._cancelDeadline()
        self.setTimeout(self.timeout)
        if self.checksHeaders and not transaction.headersDone and transaction.error is None:
            transaction.headersDone = True
            transaction.error = self.checkHeaders(bytes(transaction.headers))
            if transaction.error is not None:
                transaction.message.discard()
        if transaction.error is not None:
            self._countMessage("refused", transaction.error)
            log.info(
                "refused message from=<{sender}> rip={rip}: {reason}",
                sender=str(transaction.sender),
                rip=self.clientAddress,
                reason=transaction.error[1].decode("ascii", "replace"),
            )
            self.sendCode(*transaction.error)
            return
        self._hold()
        transaction.dataEnded = time.perf_counter()
        if transaction.checks is None:
            d = self._deliver(transaction)
        else:
            transaction.message.write(transaction.checks.finish())
            d = transaction.checks.verdict()
            d.addCallbacks(self._judged, self._judgingFailed, (transaction,), None, (transaction,))
        d.addBoth(lambda _: self._release())

    def _deliver(self, transaction: Transaction, folder: str = "INBOX", results: str = ""):
        if folder == "INBOX":
            d = self.deliverMessage(transaction)
        else:
            # Only MX mail is judged, and it is all local.
            d = self.settings.store.deliver(transaction.message, transaction.recipients, folder)
        return d.addCallbacks(
            self._delivered, self._deliveryFailed, (transaction, folder, results), None, (transaction,)
        )

    def deliverMessage(self, transaction: Transaction):
        """
        Store the received message durably for its recipients.

        @return: a Deferred firing when it is on disk.
        """
        return self.settings.store.deliver(transaction.message, transaction.recipients)

    def _judged(self, verdict, transaction: Transaction):
        """
        Act on the trust checks' verdict (L{maild.trust.checker.Verdict}).
        """
        if verdict.reply is not None:
            transaction.message.discard()
            self._countMessage("refused", verdict.reply)
            log.info(
                "refused {queueId} rip={rip} from=<{sender}> {results}: {reason}",
                queueId=transaction.queueId,
                rip=self.clientAddress,
                sender=str(transaction.sender),
                results=verdict.summary,
                reason=verdict.reply[1].decode("ascii", "replace"),
            )
            if not self.transport.disconnecting:
                self.sendCode(*verdict.reply)
            return None
        # RFC 8601 section 5: our results go on top.
        transaction.message.prepend(verdict.header)
        folder = "Junk" if verdict.action == "junk" else "INBOX"
        return self._deliver(transaction, folder, verdict.summary)

    def _judgingFailed(self, reason, transaction: Transaction) -> None:
        log.failure("trust checks failed for {queueId}", reason, queueId=transaction.queueId)
        transaction.message.discard()
        reply = (451, b"4.3.0 Error: local error in processing")
        self._countMessage("refused", reply)
        if not self.transport.disconnecting:
            self.sendCode(*reply)

    def _delivered(self, paths, transaction: Transaction, folder: str, results: str) -> None:
        log.info(
            "accepted {queueId} rip={rip}{login} from=<{sender}> to={recipients} size={size}"
            "{folder}{results}",
            queueId=transaction.queueId,
            rip=self.clientAddress,
            login=f" user=<{self.user}>" if self.user else "",
            sender=str(transaction.sender),
            recipients=",".join(f"<{r}>" for r in transaction.recipients),
            size=transaction.message.crlfSize,
            folder="" if folder == "INBOX" else f" folder={folder}",
            results=f" {results}" if results else "",
        )
        metrics.dataReplySeconds.observe(time.perf_counter() - transaction.dataEnded)
        self._countMessage("accepted", None)
        if not self.transport.disconnecting:
            self.sendCode(250, b"2.0.0 Ok: queued as " + transaction.queueId.encode("ascii"))

    def _countMessage(self, result: str, reply: tuple[int, bytes] | None) -> None:
        # The enhanced status code is the reason: a bounded set of labels.
        reason = reply[1].split(b" ", 1)[0].decode("ascii", "replace") if reply else ""
        metrics.messages.labels(self.service, result, reason).inc()

    def _deliveryFailed(self, reason, transaction: Transaction) -> None:
        if reason.check(DeliveryFailed):
            log.error(
                "cannot store {queueId}: {error}",
                queueId=transaction.queueId,
                error=str(reason.value),
            )
        else:
            log.failure("cannot store {queueId}", reason, queueId=transaction.queueId)
        if reason.check(DeliveryFailed) and reason.value.noSpace:
            reply = (452, b"4.3.1 Error: insufficient system storage")
        else:
            reply = (451, b"4.3.0 Error: local error in processing")
        self._countMessage("refused", reply)
        self.sendCode(*reply)

    def _discardTransaction(self) -> None:
        transaction, self.transaction = self.transaction, None
        if transaction is not None and transaction.message is not None and self.mode == DATA:
            transaction.message.discard()
        if self.mode == DATA:
            self.mode = COMMAND


def _bytes(text) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode("utf-8")


class SMTPFactory(LimitedFactory):
    """
    Builds the sessions of one SMTP listener.
    """

    refusal = b"421 4.7.0 Error: too many connections from your address"
    goodbye = b"421 4.3.2 Service shutting down"

    def __init__(self, settings: SMTPSettings, protocol: type[SMTPServer] = SMTPServer) -> None:
        LimitedFactory.__init__(
            self, settings.limits.connections_per_ip, settings.limits.trusted_networks
        )
        self.settings = settings
        self.protocol = protocol

    def buildSession(self, addr) -> SMTPServer:
        return self.protocol(self.settings)
