"""
The SMTP client that carries queued mail to the next server (an MX, a
route's host or the smarthost), in the reactor: one L{SMTPClient} per
connection, and an L{OutboundSession} that speaks the dialogue (RFC 5321)
over it: EHLO, STARTTLS (RFC 3207), AUTH (RFC 4954) for a smarthost, and
any number of transactions, pipelined (RFC 2920) when the server allows.

Whatever the server does (hangs, answers garbage, drops the connection,
sends a reply of 10,000 lines) ends in a L{SessionError}, which the relay
takes as a reason to try again later, never as a crash.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet import defer, error
from twisted.protocols.basic import LineOnlyReceiver

from maild.connections import sendWithoutDelay

# RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets; servers
# send longer ones, but nothing sane sends this much.
MAX_REPLY_LINE = 4096
# A multi-line reply (EHLO's is the longest in practice) of more lines
# than this is garbage.
MAX_REPLY_LINES = 100
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_DOT_AT_LINE_START = re.compile(rb"^\.", re.M)


class Reply(NamedTuple):
    """
    One SMTP reply: its code and the text of its lines.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def status(self) -> str:
        """
        The enhanced status code (RFC 3463), or the one the reply's class
        implies when the server gives none.
        """
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        if match:
            return ".".join(match.groups())
        return f"{self.code // 100}.0.0"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        text = " ".join(line.strip() for line in self.lines)
        return f"{self.code} {text}"[:500]


class SessionError(Exception):
    """
    The session cannot go on.  C{reply} is the server's, if one caused it;
    otherwise the reason is local (timeout, garbage, a dropped connection)
    and temporary.
    """

    def __init__(self, reason: str, reply: Reply | None = None, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reply = reply
        self.permanent = permanent

    @property
    def status(self) -> str:
        if self.reply is not None:
            return self.reply.status
        return "5.0.0" if self.permanent else "4.4.2"


class SMTPClient(LineOnlyReceiver):
    """
    Reads replies and hands them, in order, to whoever asked with
    L{expect}.  Each wait has its deadline; when it passes the connection
    is aborted.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_REPLY_LINE

    def __init__(self, clock) -> None:
        self.clock = clock
        self.lost: defer.Deferred = defer.Deferred()
        self._waiting: deque[tuple[defer.Deferred, float]] = deque()
        self._replies: deque[Reply] = deque()
        self._lines: list[str] = []
        self._timer = None
        self._error: SessionError | None = None

    def connectionMade(self) -> None:
        # Commands and the end of DATA go out at once.
        sendWithoutDelay(self.transport)

    @property
    def usable(self) -> bool:
        """
        Whether the connection may still carry commands.
        """
        return self._error is None and not self.lost.called

    def expect(self, timeout: float) -> defer.Deferred:
        """
        The next reply, or a L{SessionError} if none comes within
        C{timeout} seconds (counted once the replies before it are in).
        """
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._error is not None:
            return defer.fail(self._error)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((d, timeout))
        if self._timer is None:
            self._arm()
        return d

    def send(self, *lines: bytes) -> None:
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def sendMessage(self, message: bytes) -> None:
        """
        Send a message's content (LF or CRLF line ends) as DATA: CRLF line
        ends, dot-stuffed (RFC 5321 section 4.5.2), then the end marker.
        """
        lineEnds = message.count(b"\n")
        if message.count(b"\r\n") == lineEnds == message.count(b"\r"):
            # Only CRLF, as the relay sends: one pass to stuff the dots (a
            # third of the CPU of normalizing the line ends both ways).
            data = message.replace(b"\n.", b"\n..")
            if data.startswith(b"."):
                data = b"." + data
            if data and not data.endswith(b"\n"):
                data += b"\r\n"
        else:
            data = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if data and not data.endswith(b"\n"):
                data += b"\n"
            data = _DOT_AT_LINE_START.sub(b"..", data).replace(b"\n", b"\r\n")
        self.transport.writeSequence((data, b".\r\n"))

    def _arm(self) -> None:
        if self._waiting:
            self._timer = self.clock.callLater(self._waiting[0][1], self._timedOut)
        else:
            self._timer = None

    def _rearm(self) -> None:
        """
        Start the next wait's deadline: the timer there is moved rather
        than cancelled and made anew (four replies a message).
        """
        if self._waiting and self._timer is not None and self._timer.active():
            self._timer.reset(self._waiting[0][1])
        else:
            self._disarm()
            self._arm()

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        self._abort(SessionError("timeout waiting for the server's reply"))

    def lineReceived(self, line: bytes) -> None:
        if self._error is not None:
            return
        line = line.rstrip(b"\r")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._abort(SessionError(f"garbage from the server: {line[:60]!r}"))
            return
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            self._abort(SessionError(f"reply of more than {MAX_REPLY_LINES} lines"))
            return
        if line[3:4] == b"-":
            return
        reply = Reply(int(line[:3]), tuple(self._lines))
        self._lines = []
        if not self._waiting:
            if len(self._replies) >= MAX_REPLY_LINES:
                self._abort(SessionError("replies nobody asked for"))
                return
            self._replies.append(reply)
            return
        d, _ = self._waiting.popleft()
        self._rearm()
        d.callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(SessionError(f"reply line longer than {MAX_REPLY_LINE} octets"))

    def _abort(self, reason: SessionError) -> None:
        if self._error is None:
            self._error = reason
        self._failWaiting()
        self.transport.abortConnection()

    def _failWaiting(self) -> None:
        self._disarm()
        waiting, self._waiting = self._waiting, deque()
        for d, _ in waiting:
            d.errback(self._error)

    def connectionLost(self, reason) -> None:
        if self._error is None:
            if reason.check(error.ConnectionDone):
                self._error = SessionError("connection closed by the server")
            else:
                self._error = SessionError(f"connection lost: {reason.getErrorMessage()}")
        self._failWaiting()
        self.lost.callback(None)


@dataclass(frozen=True)
class SessionSettings:
    """
    How to talk to one kind of next hop.

    @ivar tlsOptions: a callable giving the client TLS options for a host
        name (opportunistic: not verified; for a smarthost: verified).
    @ivar requireTLS: whether a server without STARTTLS is an error.
    @ivar credentials: (user, password) for AUTH, or None.
    """

    hostname: str
    commandTimeout: float
    dataTimeout: float
    tlsOptions: Any
    requireTLS: bool = False
    credentials: tuple[str, str] | None = None


@dataclass(frozen=True)
class Transaction:
    """
    One mail transaction under way.

    @ivar sent: fires (with None) once the next transaction may begin on
        the same connection: when the message is sent and only its final
        reply is awaited (with PIPELINING), or when it is over.
    @ivar outcome: fires with each recipient's outcome, a L{Reply} (2xx:
        delivered), by address; fails with L{SessionError} if the
        connection can no longer be used (the recipients have no outcome).
    """

    sent: defer.Deferred
    outcome: defer.Deferred


class OutboundSession:
    """
    One SMTP dialogue over an L{SMTPClient}: L{open}, then any number of
    L{transfer}s, then L{close}.
    """

    def __init__(self, client: SMTPClient, settings: SessionSettings, peerName: str) -> None:
        self.client = client
        self.settings = settings
        self.peerName = peerName
        self.extensions: dict[str, list[str]] = {}
        self.encrypted = False
        # Mail transactions begun on this connection.
        self.transactions = 0

    @defer.inlineCallbacks
    def open(self, implicitTLS: bool = False):
        """
        Read the greeting, say EHLO, start TLS and log in as configured.

        @raise SessionError: if the session cannot be used.
        """
        self.encrypted = implicitTLS
        greeting = yield self._reply()
        if greeting.code != 220:
            raise SessionError(f"greeting: {greeting}", greeting, greeting.permanent)
        yield self._hello()
        if "STARTTLS" in self.extensions and not self.encrypted:
            self.client.send(b"STARTTLS")
            reply = yield self._reply()
            if reply.code == 220:
                self.client.transport.startTLS(self.settings.tlsOptions(self.peerName))
                self.encrypted = True
                # RFC 3207 section 4.2: forget what was learnt before TLS.
                yield self._hello()
            elif self.settings.requireTLS:
                raise SessionError(f"STARTTLS refused: {reply}", reply)
        if self.settings.requireTLS and not self.encrypted:
            raise SessionError("the server does not offer STARTTLS, which is required")
        if self.settings.credentials is not None:
            yield self._authenticate(*self.settings.credentials)

    def _reply(self, timeout: float | None = None) -> defer.Deferred:
        return self.client.expect(timeout or self.settings.commandTimeout)

    @defer.inlineCallbacks
    def _hello(self):
        self.client.send(b"EHLO " + self.settings.hostname.encode("idna"))
        reply = yield self._reply()
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                words = line.split()
                if words:
                    self.extensions[words[0].upper()] = words[1:]
            return
        if reply.code >= 500:
            # RFC 5321 section 3.2: an old server; fall back to HELO.
            self.client.send(b"HELO " + self.settings.hostname.encode("idna"))
            reply = yield self._reply()
        if reply.code != 250:
            raise SessionError(f"EHLO/HELO: {reply}", reply, reply.permanent)
        self.extensions = {}

    @defer.inlineCallbacks
    def _authenticate(self, user: str, password: str):
        mechanisms = [m.upper() for m in self.extensions.get("AUTH", [])]
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            self.client.send(b"AUTH PLAIN " + token)
            reply = yield self._reply()
        elif "LOGIN" in mechanisms:
            self.client.send(b"AUTH LOGIN")
            reply = yield self._reply()
            for secret in (user, password):
                if reply.code != 334:
                    break
                self.client.send(base64.b64encode(secret.encode()))
                reply = yield self._reply()
        else:
            raise SessionError("the server offers neither AUTH PLAIN nor AUTH LOGIN")
        if reply.code != 235:
            # A login refused is a setting to fix, not a reason to bounce.
            raise SessionError(f"AUTH refused: {reply}", reply)

    def transfer(self, sender: str, recipients: list[str], message: bytes) -> "Transaction":
        """
        Begin one mail transaction.

        @param message: the message (CRLF line ends, not dot-stuffed).
        @return: the transaction; the next may begin once its C{sent} fired.
        """
        self.transactions += 1
        sent: defer.Deferred = defer.Deferred()
        outcome = self._transact(sender, recipients, message, sent)

        def settle(result):
            if not sent.called:
                sent.callback(None)
            return result

        outcome.addBoth(settle)
        return Transaction(sent, outcome)

    @defer.inlineCallbacks
    def _transact(self, sender: str, recipients: list[str], message: bytes, sent: defer.Deferred):
        size = len(message)
        limit = self._sizeLimit()
        if limit and size > limit:
            # RFC 1870 section 6: do not send what the server's SIZE refuses.
            refusal = Reply(552, (f"5.3.4 message size {size} exceeds the limit of {self.peerName} ({limit})",))
            return {r: refusal for r in recipients}
        mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">"
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % size
        if "8BITMIME" in self.extensions and not message.isascii():
            mail += b" BODY=8BITMIME"
        commands = [mail] + [b"RCPT TO:<" + r.encode("utf-8") + b">" for r in recipients]
        outcomes: dict[str, Reply] = {}
        if "PIPELINING" in self.extensions:
            self.client.send(*commands, b"DATA")
            mailReply = yield self._reply()
            rcptReplies = []
            for _ in recipients:
                rcptReplies.append((yield self._reply()))
            dataReply = yield self._reply()
        else:
            self.client.send(mail)
            mailReply = yield self._reply()
            rcptReplies = []
            dataReply = None
            if mailReply.code == 250:
                for command in commands[1:]:
                    self.client.send(command)
                    rcptReplies.append((yield self._reply()))
                if any(r.code in (250, 251) for r in rcptReplies):
                    self.client.send(b"DATA")
                    dataReply = yield self._reply()
        accepted = []
        if mailReply.code != 250:
            outcomes = {r: mailReply for r in recipients}
        else:
            for recipient, reply in zip(recipients, rcptReplies):
                if reply.code in (250, 251):
                    accepted.append(recipient)
                else:
                    outcomes[recipient] = reply
        if dataReply is not None and dataReply.code == 354:
            if accepted:
                self.client.sendMessage(message)
            else:
                # RFC 2920 section 3.1: no recipient, yet DATA went
                # through; end it empty, and throw the reply away.
                self.client.send(b".")
            final = self._reply(self.settings.dataTimeout)
            if "PIPELINING" in self.extensions:
                # RFC 2920 section 3.1: the message content may be the
                # first "command" of a group, so the next transaction's
                # MAIL, RCPT and DATA may follow it without waiting for
                # its reply (whatever that reply, the end of the data
                # ends this transaction: RFC 5321 section 4.1.1.4).
                sent.callback(None)
            final = yield final
            for recipient in accepted:
                outcomes[recipient] = final
            return outcomes
        for recipient in accepted:
            outcomes[recipient] = dataReply or mailReply
        # The transaction ended before its data: clear it for the next one.
        self.client.send(b"RSET")
        yield self._reply()
        return outcomes

    def _sizeLimit(self) -> int:
        params = self.extensions.get("SIZE") or ["0"]
        return int(params[0]) if params[0].isdigit() else 0

    @defer.inlineCallbacks
    def close(self):
        """
        Say QUIT and close, whatever the answer (or none).
        """
        try:
            self.client.send(b"QUIT")
            yield self.client.expect(min(self.settings.commandTimeout, 10.0))
        except SessionError:
            pass
        finally:
            self.client.transport.loseConnection()
