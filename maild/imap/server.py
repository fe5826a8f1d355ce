"""
The IMAP4rev1 session (RFC 3501) with the extensions Thunderbird uses.

L{IMAPServer} subclasses Twisted's C{IMAP4Server} for its states,
timeouts and response helpers, and replaces its input handling and
commands: Twisted parses literals only at the end of a line, buffers
APPEND in memory, has no LITERAL+, no limits, a quadratic sequence-set
parser, and a FETCH that costs two reactor turns per message.  Commands
are framed by L{maild.imap.framing}, tokenized by L{maild.imap.parser}
and dispatched through L{COMMANDS}, never through Twisted's
C{unauth_X}/C{auth_X}/C{select_X} tables.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred import credentials, error as credError
from twisted.internet import defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.mail import imap4

from maild import metrics
from maild.auth import (
    PASSWORD_MECHANISMS,
    Authenticator,
    Cancelled,
    OtherIdentity,
    PasswordExchange,
    SASLError,
    plaintextLoginAllowed,
)
from maild.config import Limits
from maild.connections import LimitedFactory
from maild.imap import wire
from maild.imap.account import Account, PatternTooLong
from maild.imap.fetch import FetchRequest, parseItems
from maild.imap.framing import ACCEPT, CLOSE, REFUSE, CommandFramer, LiteralDecision
from maild.imap.mailbox import SelectedFolder
from maild.imap.parser import (
    LITERAL_SPEC,
    Arguments,
    Atom,
    BadCommand,
    Literal,
    Quoted,
    atomList,
    decodeMailbox,
    formatUidSet,
    splitTag,
    tokenize,
)
from maild.imap.producer import ResponseProducer
from maild.imap.search import CHARSETS, Search, parseKeys
from maild.names import InvalidName
from maild.store import DeliveryFailed, FolderError, FolderExists, NoSuchFolder
from maild.store.delivery import FolderMissing
from maild.store.keywords import TooManyKeywords
from maild.store.maildir import SEEN
from maild.tls import isEncrypted

log = Logger()

# Unparsed input held while a command is answered before we stop reading.
_HOLD_LIMIT = 1024 * 1024
_STATUS_ITEMS = {b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"APPENDLIMIT"}
_UNAUTH, _AUTH, _SELECTED = "unauth", "auth", "select"
_ANY = frozenset({_UNAUTH, _AUTH, _SELECTED})
_LOGGED_IN = frozenset({_AUTH, _SELECTED})
_SELECTED_ONLY = frozenset({_SELECTED})
# Messages whose flags one turn of the reactor changes in a big STORE.
_STORE_CHUNK = 1000
# Sequence-number commands during which no EXPUNGE may be sent
# (RFC 3501 section 7.4.1).
_NO_EXPUNGE = frozenset({b"FETCH", b"STORE", b"SEARCH", b"COPY"})
# RFC 2180 section 4.1.2 (and RFC 5530's code): a FETCH or STORE that
# named messages another session expunged.  Clients match the words: "no
# longer exist" as Dovecot 2.0 said them (and imaptest accepts after a
# FETCH), "have been deleted" as imaptest accepts after a STORE, where it
# counted every such NO of ours as a server error (a thousand in ten
# seconds of its stress run with 20 clients on a small INBOX).
_EXPUNGE_ISSUED = b"NO [EXPUNGEISSUED] Some of the requested messages no longer exist: they have been deleted"


@dataclass(frozen=True)
class IMAPSettings:
    """
    What every session of one listener shares.
    """

    hostname: str
    limits: Limits
    store: Any
    authenticator: Authenticator
    clock: Any
    plaintextAuth: str = "loopback"
    tlsContext: Any = None
    version: str = "0.1.0"


class IMAPServer(imap4.IMAP4Server):
    """
    One IMAP session.
    """

    IDENT = b"maild IMAP4rev1 ready"

    def __init__(self, settings: IMAPSettings) -> None:
        imap4.IMAP4Server.__init__(self, contextFactory=settings.tlsContext)
        self.settings = settings
        self.limits = settings.limits
        self.callLater = settings.clock.callLater
        self.peerAddress = self.clientAddress = "?"
        self.peerTrusted = False
        self.framer = CommandFramer(self, settings.limits.imap_line_length, settings.limits.preauth_literal_size)
        self.account: Account | None = None
        self.view: SelectedFolder | None = None
        self.idling: bytes | None = None
        # The folder watched for other programs' changes while in IDLE.
        self._watching = None
        self.failures = 0
        self.closing = False
        self._logout: Callable[[], None] | None = None
        self._loginDeadline = None
        self._incoming = None
        self._producer: ResponseProducer | None = None
        self._paused = False
        # A command is being answered (later ones wait), and the transport
        # asked us to stop writing (the client does not read).
        self._answering = False
        self._outputPaused = False

    # Connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        # A streaming producer for the whole session: when the client does
        # not read and replies pile up in the transport, commands wait (and
        # a FETCH being written pauses); once the framer holds its limit,
        # reading stops too.
        self.transport.registerProducer(self, True)
        self.canStartTLS = ITLSTransport(self.transport, None) is not None
        # No idle timer before login: the login deadline covers it.
        self.timeOut = None
        # A client that has not logged in by then is closed however it
        # trickles its bytes.
        self._loginDeadline = self.callLater(self.limits.login_timeout, self._loginTimedOut)
        self.sendServerGreeting()

    def connectionLost(self, reason) -> None:
        try:
            self._release()
        finally:
            # Whatever failed above, the address's connection slot is
            # given back and the daemon can stop.
            factory = getattr(self, "factory", None)
            if factory is not None:
                factory.connectionClosed(self)

    def _release(self) -> None:
        self.setTimeout(None)
        if self._loginDeadline is not None and self._loginDeadline.active():
            self._loginDeadline.cancel()
        self._loginDeadline = None
        if self._producer is not None:
            self._producer.stopProducing()
        if self.idling is not None:
            self.idling = None
            metrics.imapIdleSessions.dec()
        self._stopWatching()
        self._deselect()
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None
        if self._logout is not None:
            logout, self._logout = self._logout, None
            logout()

    def timeoutConnection(self) -> None:
        self._bye(b"Autologout; connection idle too long")

    def _loginTimedOut(self) -> None:
        self._loginDeadline = None
        if self.state == _UNAUTH:
            self._bye(b"Login time exceeded")

    def _bye(self, text: bytes) -> None:
        if self.transport is None or self.transport.disconnecting:
            return
        self.closing = True
        self.framer.held = True
        if self._outputPaused:
            # The client does not read: nothing more can reach it, and a
            # close would wait for it forever.
            self.transport.unregisterProducer()
            self.transport.abortConnection()
            return
        self._send(b"* BYE " + text)
        self._close()

    def _close(self) -> None:
        # (A registered producer would hold the connection open.)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # IPushProducer: the transport's flow control.

    def pauseProducing(self) -> None:
        self._outputPaused = True
        self.framer.held = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._outputPaused = False
        if self._producer is not None:
            self._producer.resumeProducing()
        self._takeCommands()

    def stopProducing(self) -> None:
        pass

    def _takeCommands(self) -> None:
        """
        Go on with the commands received, unless one is being answered or
        the client is not reading.
        """
        if self.closing or self.transport is None:
            return
        self.framer.held = self._answering or self._outputPaused
        if self.framer.held:
            return
        self.framer.process()
        # Read again only once what waits is under the limit: resuming
        # first would let a client that reads little push a read's worth
        # more each time a few replies drain.
        if self._paused and self.framer.pending <= _HOLD_LIMIT and not self.closing:
            self._paused = False
            self.transport.resumeProducing()

    @property
    def secure(self) -> bool:
        return self.startedTLS or isEncrypted(self.transport)

    def _plaintextAllowed(self) -> bool:
        # The connection's own address: a webmail on loopback that names
        # its user's address with ID still speaks over loopback.
        return plaintextLoginAllowed(self.settings.plaintextAuth, self.peerAddress, self.secure)

    def _send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    # Capabilities -------------------------------------------------------------

    def listCapabilities(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE"]
        caps += [b"UNSELECT", b"CHILDREN", b"SPECIAL-USE", b"UIDPLUS", b"MOVE"]
        caps.append(b"APPENDLIMIT=%d" % self.limits.message_size)
        if self.state == _UNAUTH:
            if self.canStartTLS and self.ctx is not None and not self.secure:
                caps.append(b"STARTTLS")
            if self._plaintextAllowed():
                caps += [b"AUTH=" + mechanism for mechanism in PASSWORD_MECHANISMS]
            else:
                caps.append(b"LOGINDISABLED")
        return caps

    def sendServerGreeting(self) -> None:
        caps = b" ".join(self.listCapabilities())
        host = self.settings.hostname.encode("idna")
        self._send(b"* OK [CAPABILITY " + caps + b"] " + host + b" " + self.IDENT)

    # Input --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.state != _UNAUTH:
            self.resetTimeout()
        self.framer.feed(data)
        if self.framer.held and self.framer.pending > _HOLD_LIMIT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def lineTooLong(self, start: bytes) -> None:
        tag, _, _ = splitTag(start)
        self._send((tag or b"*") + b" BAD Command line too long")

    def commandDropped(self, parts: list) -> None:
        # The message of a refused APPEND leaves nothing in the spool.
        for part in parts:
            if isinstance(part, Literal) and part.message is not None:
                part.message.discard()
                if part.message is self._incoming:
                    self._incoming = None

    def literalTooBigToSkip(self, size: int) -> None:
        # RFC 7888 section 4: too much to read past; the session ends.
        self._bye(b"Literal too big")

    def literalAnnounced(self, parts: list, size: int, synchronizing: bool) -> LiteralDecision:
        tag, name, rest = splitTag(parts[0])
        tag = tag or b"*"
        framer = self.framer
        if self.state == _UNAUTH:
            # Before login only a few small literals (LOGIN's, an ID's):
            # anything more is not a client logging in.
            held = sum(p.size for p in parts if isinstance(p, Literal))
            if held + size > self.limits.preauth_literal_size:
                return self._refuseLiteral(
                    tag, synchronizing, b"NO [TOOBIG] Literal too big before login", b"Literal too big before login"
                )
            if (
                framer.literalCount >= self.limits.preauth_command_literals
                or framer.commandSize + size > self.limits.preauth_command_size
            ):
                return self._refuseLiteral(
                    tag, synchronizing, b"BAD Command too long before login", b"Command too long before login"
                )
        else:
            if framer.literalCount >= self.limits.imap_command_literals:
                return self._refuseLiteral(tag, synchronizing, b"BAD Too many literals")
            if name == b"APPEND" and self._appendMessageNext(parts):
                return self._appendLiteral(tag, parts, size, synchronizing)
            if size > self.limits.imap_line_length:
                return self._refuseLiteral(tag, synchronizing, b"NO [TOOBIG] Literal too big")
            if framer.commandSize + size > self.limits.imap_command_size:
                return self._refuseLiteral(tag, synchronizing, b"BAD Command too long")
        if synchronizing:
            self._send(b"+ Ready for literal data")
        return ACCEPT

    def _refuseLiteral(self, tag: bytes, synchronizing: bool, reply: bytes, bye: bytes = b"") -> LiteralDecision:
        """
        Refuse the command at the literal it announces with C{reply}: a
        synchronizing literal is never sent; a non-synchronizing one is
        coming, and is read past after login (up to the framer's skip
        limit), while before login the session ends with C{bye}.
        """
        if not synchronizing and self.state == _UNAUTH:
            self._bye(bye)
            return CLOSE
        self._send(tag + b" " + reply)
        return REFUSE

    def _appendMessageNext(self, parts: list) -> bool:
        """
        Whether the literal announced at the end of C{parts} is the
        message of an APPEND (rather than its mailbox name).
        """
        try:
            return bool(self._tokensBeforeLiteral(parts))
        except BadCommand:
            return True

    def _tokensBeforeLiteral(self, parts: list) -> list:
        _, _, rest = splitTag(parts[0])
        segments = [rest] + parts[1:]
        m = LITERAL_SPEC.search(segments[-1])
        segments[-1] = segments[-1][: m.start()]
        return tokenize(segments, self.limits.imap_nesting_depth)

    def _appendLiteral(self, tag: bytes, parts: list, size: int, synchronizing: bool) -> LiteralDecision:
        def refuse(reply: bytes) -> LiteralDecision:
            # A non-synchronizing literal bigger than the framer's skip
            # limit (message_size) ends the session there.
            return self._refuseLiteral(tag, synchronizing, reply)

        if any(isinstance(p, Literal) and p.message is not None for p in parts):
            # One message per APPEND (no MULTIAPPEND): refused before a
            # second one is stored.
            return refuse(b"BAD APPEND takes one message")
        try:
            tokens = self._tokensBeforeLiteral(parts)
            name = decodeMailbox(Arguments(tokens).mailbox())
        except BadCommand as e:
            return refuse(b"BAD " + str(e).encode())
        except InvalidName:
            return refuse(b"NO Invalid mailbox name")
        if size > self.limits.message_size:
            # RFC 7889: refused before a single octet of it is read.
            return refuse(b"NO [TOOBIG] Message too big")
        if not self.account.mailbox.exists(name):
            return refuse(b"NO [TRYCREATE] Mailbox does not exist")
        try:
            self._incoming = self.settings.store.incoming()
        except OSError as e:
            log.error("cannot start a message: {error}", error=e)
            return refuse(b"NO [SERVERBUG] Cannot store the message")
        if synchronizing:
            self._send(b"+ Ready for literal data")
        return LiteralDecision(accept=True, sink=self._incoming)

    def commandReceived(self, parts: list) -> None:
        tag, name, rest = splitTag(parts[0])
        if tag is None:
            self._send(b"* BAD Invalid tag")
            return
        if name is None:
            self._send(tag + b" BAD Missing or invalid command")
            return
        try:
            tokens = tokenize([rest] + parts[1:], self.limits.imap_nesting_depth)
            uid = False
            if name == b"UID":
                if not tokens or not isinstance(tokens[0], Atom):
                    raise BadCommand("Missing UID command")
                name = tokens.pop(0).upper()
                uid = True
                if name not in (b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"EXPUNGE"):
                    raise BadCommand("Unknown UID command")
            command = self.lookupCommand(name)
            if command is None:
                raise BadCommand("Unknown command")
            states, handler = command
            if self.state not in states:
                self._discardIncoming()
                if self.state == _UNAUTH:
                    self._send(tag + b" NO Log in first")
                elif self.state == _AUTH and states == _SELECTED_ONLY:
                    self._send(tag + b" BAD No mailbox selected")
                else:
                    self._send(tag + b" BAD Command not valid in this state")
                return
            if self.view is not None:
                self.view.folder.refresh()
                if self.closing:
                    return
            commandDone = metrics.imapCommandTimer(name.decode("ascii", "replace"))
            result = handler(self, tag, Arguments(tokens), uid)
        except BadCommand as e:
            self._discardIncoming()
            self._send(tag + b" BAD " + str(e).encode("ascii", "replace"))
            return
        except _InvalidMailbox as e:
            self._discardIncoming()
            self._send(tag + b" NO Invalid mailbox name: " + str(e).encode("utf-8", "replace")[:200])
            return
        except FolderMissing:
            # Another process deleted or renamed the folder while this
            # command worked on it.
            self._discardIncoming()
            self._send(tag + b" NO [NONEXISTENT] Mailbox was deleted or renamed meanwhile")
            return
        except Exception:
            log.failure("IMAP command {name} failed", name=name)
            self._discardIncoming()
            self._send(tag + b" NO [SERVERBUG] Internal error")
            return
        if isinstance(result, defer.Deferred):
            result.addBoth(lambda outcome: (commandDone(), outcome)[1])
            self._hold(result, tag, name)
        else:
            commandDone()

    def lookupCommand(self, cmd: bytes):
        return COMMANDS.get(cmd.upper())

    def _hold(self, d: defer.Deferred, tag: bytes, name: bytes) -> None:
        """
        Take no further command until C{d} fires: pipelined commands are
        answered in order.
        """
        def failed(reason):
            log.failure("IMAP command {name} failed", reason, name=name)
            if self.transport is not None and not self.transport.disconnecting:
                self._send(tag + b" NO [SERVERBUG] Internal error")

        d.addErrback(failed)
        if d.called:
            # Answered at once: go on with the next command in the loop
            # that is already running.
            return
        self._answering = True
        self.framer.held = True
        self.setTimeout(None)

        def release(_):
            self._answering = False
            if self.closing or self.transport is None:
                return
            self.setTimeout(self.timeOut)
            self._takeCommands()

        d.addBoth(release)

    def _discardIncoming(self) -> None:
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None

    def _done(self, tag: bytes, text: bytes, command: bytes = b"", uid: bool = True) -> None:
        """
        Finish a command: what changed meanwhile (RFC 3501 section 7.4.1
        says when EXPUNGE may be told), then the tagged response.
        """
        self._sendUpdates(expunges=uid or command not in _NO_EXPUNGE)
        self._send(tag + b" " + text)

    def _sendUpdates(self, expunges: bool) -> None:
        if self.view is not None and self.view.pending:
            lines = self.view.updates(expunges)
            if lines:
                self.transport.write(b"\r\n".join(lines) + b"\r\n")

    def _viewChanged(self) -> None:
        if self.view is not None and self.view.gone:
            # What Dovecot says: the client's state for the folder is void,
            # and it reconnects and lists the folders again.
            self._bye(b"Mailbox was deleted, please relogin")
            return
        if self.view is not None and self.view.reset:
            self._bye(b"Mailbox UIDVALIDITY changed, select it again")
            return
        # RFC 2177: a session in IDLE is told at once.
        if self.idling is not None and self.view is not None:
            self._sendUpdates(expunges=True)

    # Any state ----------------------------------------------------------------

    def do_CAPABILITY(self, tag, args, uid):
        args.end()
        self._send(b"* CAPABILITY " + b" ".join(self.listCapabilities()))
        self._done(tag, b"OK Capability completed")

    def do_NOOP(self, tag, args, uid):
        args.end()
        self._done(tag, b"OK NOOP completed")

    def do_LOGOUT(self, tag, args, uid):
        args.end()
        self._send(b"* BYE Logging out")
        self._send(tag + b" OK Logout completed")
        self.closing = True
        self.framer.held = True
        self._close()

    def do_ID(self, tag, args, uid):
        # RFC 2971: the client's list is only informative.
        value = args.next("ID parameters")
        if not isinstance(value, list) and not (isinstance(value, Atom) and value.upper() == b"NIL"):
            raise BadCommand("ID takes a list or NIL")
        args.end()
        if isinstance(value, list):
            self._takeOriginatingAddress(value)
        self._send(b'* ID ("name" "maild" "version" ' + wire.string(self.settings.version) + b")")
        self._done(tag, b"OK ID completed")

    def _takeOriginatingAddress(self, fields: list) -> None:
        """
        A webmail in a trusted network (Roundcube does this) names the
        address of the user it speaks for as C{x-originating-ip}: that
        address is then the one logged and throttled, so one user's
        failures do not slow down everyone else's logins through it.
        """
        if not self.peerTrusted:
            return
        for key, value in zip(fields[0::2], fields[1::2]):
            if not isinstance(key, (Atom, Quoted)) or bytes(key).lower() != b"x-originating-ip":
                continue
            if not isinstance(value, (Atom, Quoted)):
                return
            try:
                address = ipaddress.ip_address(bytes(value).decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return
            log.info(
                "imap: {peer} speaks for {rip} (ID x-originating-ip)",
                peer=self.peerAddress,
                rip=str(address),
            )
            self.clientAddress = str(address)
            return

    # Not authenticated --------------------------------------------------------

    def do_STARTTLS(self, tag, args, uid):
        args.end()
        if self.secure:
            raise BadCommand("TLS is already active")
        if not self.canStartTLS or self.ctx is None:
            raise BadCommand("STARTTLS not available")
        self._send(tag + b" OK Begin TLS negotiation now")
        # Whatever was pipelined behind STARTTLS came in plaintext and must
        # not be taken as said inside TLS (the STARTTLS injection bugs).
        self.framer.discardBuffered()
        self.transport.startTLS(self.ctx)
        self.startedTLS = True

    def do_LOGIN(self, tag, args, uid):
        user = args.astring("user name")
        password = args.astring("password")
        args.end()
        if not self._plaintextAllowed():
            self._send(tag + b" NO [PRIVACYREQUIRED] Plaintext login is disabled before STARTTLS")
            return None
        return self._login(tag, user, password, "LOGIN")

    def do_AUTHENTICATE(self, tag, args, uid):
        mechanism = args.atom("mechanism").upper()
        # RFC 4959: initial-response = base64 / "=", an atom.
        initial = args.atom("initial response") if args.more() else None
        args.end()
        if mechanism not in PASSWORD_MECHANISMS:
            self._send(tag + b" NO Unsupported authentication mechanism")
            return None
        if not self._plaintextAllowed():
            self._send(tag + b" NO [PRIVACYREQUIRED] Plaintext authentication is disabled before STARTTLS")
            return None
        # RFC 4959: "=" is an empty initial response.
        return self._saslStep(tag, PasswordExchange(mechanism), initial, first=True)

    def _saslStep(self, tag: bytes, exchange: PasswordExchange, response, first=False):
        try:
            challenge = exchange.start(response) if first else exchange.respond(response)
        except Cancelled:
            self._send(tag + b" BAD Authentication cancelled")
            return None
        except OtherIdentity:
            self._send(tag + b" NO [AUTHORIZATIONFAILED] Cannot act as another user")
            return None
        except SASLError:
            self._send(tag + b" BAD Malformed " + exchange.mechanism + b" response")
            return None
        if challenge is None:
            creds = exchange.credentials
            return self._login(tag, creds.username, creds.password, exchange.mechanism.decode())

        def response(line: bytes) -> None:
            result = self._saslStep(tag, exchange, line.strip())
            if isinstance(result, defer.Deferred):
                self._hold(result, tag, b"AUTHENTICATE")

        # RFC 3501 section 6.2.2: a challenge, then the client's response.
        self._send(b"+ " + base64.b64encode(challenge))
        self.framer.lineHandler = response
        return None

    def _login(self, tag: bytes, user: bytes, password: bytes, method: str) -> defer.Deferred:
        creds = credentials.UsernamePassword(user, password)
        d = self.settings.authenticator.login(creds, self.clientAddress, "imap", method, imap4.IAccount)

        def succeeded(result):
            _, avatar, logout = result
            if self.transport is None or self.transport.disconnecting:
                logout()
                return
            self.account = avatar
            self._logout = logout
            self.state = _AUTH
            if self._loginDeadline is not None and self._loginDeadline.active():
                self._loginDeadline.cancel()
            self._loginDeadline = None
            # RFC 3501 section 5.4: at least 30 minutes once logged in.
            self.timeOut = self.limits.imap_idle_timeout
            # A refused literal up to the size of a message is read past.
            self.framer.skipLimit = self.limits.message_size
            self.setTimeout(self.timeOut)
            caps = b" ".join(self.listCapabilities())
            self._send(tag + b" OK [CAPABILITY " + caps + b"] Logged in")

        def failed(reason):
            reason.trap(credError.UnauthorizedLogin, credError.UnhandledCredentials)
            if self.transport is None or self.transport.disconnecting:
                return
            self.failures += 1
            self._send(tag + b" NO [AUTHENTICATIONFAILED] Authentication failed")
            if self.failures >= self.limits.auth_failures_per_connection:
                self._bye(b"Too many failed logins")

        return d.addCallbacks(succeeded, failed)

    # Authenticated --------------------------------------------------------------

    def _mailboxArg(self, args: Arguments) -> str:
        """
        The next argument as a folder name.

        @raise _InvalidMailbox: for a name that is not valid; the command
            is answered NO, once (reading its other arguments on, it got a
            BAD as well).
        """
        raw = args.mailbox()
        try:
            return decodeMailbox(raw)
        except InvalidName as e:
            raise _InvalidMailbox(str(e))

    def do_SELECT(self, tag, args, uid, writable=True):
        raw = args.mailbox()
        self._parameters(args)
        self._deselect()
        try:
            name = decodeMailbox(raw)
            folder = self.account.select(name)
        except InvalidName:
            self._send(tag + b" NO Invalid mailbox name")
            return
        except NoSuchFolder:
            self._send(tag + b" NO [NONEXISTENT] Mailbox does not exist")
            return
        view = SelectedFolder(folder, writable, self._viewChanged)
        if folder.missing:
            # Deleted by another process between the look-up and the read.
            view.close()
            self._send(tag + b" NO [NONEXISTENT] Mailbox does not exist")
            return
        self.view = view
        self.state = _SELECTED
        lines = view.flagsLines() + [
            b"* %d EXISTS" % view.getMessageCount(),
            b"* %d RECENT" % view.getRecentCount(),
        ]
        unseen = view.firstUnseen()
        if unseen is not None:
            lines.append(b"* OK [UNSEEN %d] First unseen" % unseen)
        lines += [
            b"* OK [UIDVALIDITY %d] UIDs valid" % view.getUIDValidity(),
            b"* OK [UIDNEXT %d] Predicted next UID" % view.getUIDNext(),
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n")
        mode = b"READ-WRITE" if writable else b"READ-ONLY"
        verb = b"SELECT" if writable else b"EXAMINE"
        self._send(tag + b" OK [" + mode + b"] " + verb + b" completed")

    def do_EXAMINE(self, tag, args, uid):
        return self.do_SELECT(tag, args, uid, writable=False)

    def _parameters(self, args: Arguments) -> None:
        # SELECT parameters (RFC 4466) name extensions we do not have.
        if args.more():
            raise BadCommand("Unsupported SELECT parameters")

    def _deselect(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        if self.state == _SELECTED:
            self.state = _AUTH

    def do_CREATE(self, tag, args, uid):
        raw = args.mailbox()
        args.end()
        try:
            name = decodeMailbox(raw.rstrip(b"/"))
            self.account.create(name)
        except InvalidName as e:
            self._done(tag, b"NO Invalid mailbox name: " + str(e).encode("utf-8", "replace")[:200])
        except FolderExists:
            self._done(tag, b"NO [ALREADYEXISTS] Mailbox exists")
        else:
            self._done(tag, b"OK CREATE completed")

    def do_DELETE(self, tag, args, uid):
        name = self._mailboxArg(args)
        args.end()
        if self.view is not None and self.view.name == name:
            self._deselect()
        try:
            self.account.delete(name)
        except NoSuchFolder:
            self._done(tag, b"NO [NONEXISTENT] Mailbox does not exist")
        except FolderError as e:
            self._done(tag, b"NO " + str(e).encode())
        else:
            self._done(tag, b"OK DELETE completed")

    def do_RENAME(self, tag, args, uid):
        old = self._mailboxArg(args)
        new = self._mailboxArg(args)
        args.end()
        try:
            self.account.rename(old, new)
        except NoSuchFolder:
            self._done(tag, b"NO [NONEXISTENT] Mailbox does not exist")
        except FolderExists:
            self._done(tag, b"NO [ALREADYEXISTS] Target mailbox exists")
        except InvalidName as e:
            self._done(tag, b"NO Invalid mailbox name: " + str(e).encode("utf-8", "replace")[:200])
        else:
            self._done(tag, b"OK RENAME completed")

    def do_SUBSCRIBE(self, tag, args, uid, subscribe=True):
        name = self._mailboxArg(args)
        args.end()
        if subscribe:
            self.account.subscribe(name)
        else:
            self.account.unsubscribe(name)
        self._done(tag, b"OK " + (b"SUBSCRIBE" if subscribe else b"UNSUBSCRIBE") + b" completed")

    def do_UNSUBSCRIBE(self, tag, args, uid):
        return self.do_SUBSCRIBE(tag, args, uid, subscribe=False)

    def do_LIST(self, tag, args, uid, subscribed=False):
        reference = args.astring("reference")
        pattern = args.astring("mailbox pattern")
        args.end()
        verb = b"LSUB" if subscribed else b"LIST"
        try:
            reference = reference.decode("imap4-utf-7")
            pattern = pattern.decode("imap4-utf-7")
        except (UnicodeError, ValueError):
            # A pattern that is not modified UTF-7 matches no folder's
            # name: nothing to list, which is not an error (as Dovecot).
            self._done(tag, b"OK " + verb + b" completed")
            return
        lines = []
        if not pattern and not subscribed:
            # RFC 3501 6.3.8: the delimiter and the root of the reference.
            lines.append(b'* LIST (\\Noselect) "/" ""')
        else:
            try:
                listed = self.account.list(reference, pattern, subscribed)
            except PatternTooLong:
                raise BadCommand("Mailbox pattern too long")
            for name, attributes in listed:
                lines.append(b"* " + verb + b" (" + b" ".join(attributes) + b') "/" ' + wire.mailboxName(name))
        if lines:
            self.transport.write(b"\r\n".join(lines) + b"\r\n")
        self._done(tag, b"OK " + verb + b" completed")

    def do_LSUB(self, tag, args, uid):
        return self.do_LIST(tag, args, uid, subscribed=True)

    def do_NAMESPACE(self, tag, args, uid):
        args.end()
        self._send(b'* NAMESPACE (("" "/")) NIL NIL')
        self._done(tag, b"OK NAMESPACE completed")

    def do_ENABLE(self, tag, args, uid):
        # RFC 5161: none of our extensions needs enabling; nothing is.
        if not args.more():
            raise BadCommand("ENABLE needs capability names")
        while args.more():
            args.atom("capability")
        self._send(b"* ENABLED")
        self._done(tag, b"OK ENABLE completed")

    def do_STATUS(self, tag, args, uid):
        name = self._mailboxArg(args)
        items = [i.upper() for i in atomList(args.list("status items"), "status item")]
        args.end()
        if not items or any(i not in _STATUS_ITEMS for i in items):
            raise BadCommand("Unknown status item")
        try:
            values = self.account.status(name, items, self.limits.message_size)
        except NoSuchFolder:
            self._done(tag, b"NO [NONEXISTENT] Mailbox does not exist")
            return
        pairs = b" ".join(b"%s %d" % (item, value) for item, value in values)
        self._send(b"* STATUS " + wire.mailboxName(name) + b" (" + pairs + b")")
        self._done(tag, b"OK STATUS completed")

    def do_APPEND(self, tag, args, uid):
        name = self._mailboxArg(args)
        flags: list[bytes] = []
        date = None
        if isinstance(args.peek(), list):
            flags = atomList(args.next(), "flag")
        if isinstance(args.peek(), Quoted):
            date = wire.parseDateTime(args.next())
            if date is None:
                raise BadCommand("Bad date-time")
        message = args.next("message literal")
        args.end()
        if not isinstance(message, Literal) or message.message is None:
            raise BadCommand("APPEND needs a message literal")
        self._incoming = None
        if message.size == 0:
            message.message.discard()
            self._done(tag, b"NO Cannot append an empty message")
            return None
        try:
            folder = self.account.select(name)
            bits, keywords = _flagBits(flags)
            d = folder.append(message.message, bits, keywords, date, origin=self)
        except NoSuchFolder:
            message.message.discard()
            self._done(tag, b"NO [TRYCREATE] Mailbox does not exist")
            return None
        except TooManyKeywords:
            message.message.discard()
            self._done(tag, b"NO [LIMIT] Too many keywords")
            return None
        except ValueError:
            message.message.discard()
            raise BadCommand("Bad date-time")
        except BaseException:
            message.message.discard()
            raise

        def placed(result):
            uidvalidity, newUid = result
            self._done(tag, b"OK [APPENDUID %d %d] APPEND completed" % (uidvalidity, newUid))

        def failed(reason):
            reason.trap(DeliveryFailed)
            if reason.value.noFolder:
                self._done(tag, b"NO [TRYCREATE] Mailbox does not exist")
                return
            code = b"[OVERQUOTA] " if reason.value.noSpace else b""
            self._done(tag, b"NO " + code + b"Cannot store the message")

        return d.addCallbacks(placed, failed)

    # Selected -------------------------------------------------------------------

    def do_CHECK(self, tag, args, uid):
        args.end()
        self._done(tag, b"OK CHECK completed")

    def do_CLOSE(self, tag, args, uid):
        args.end()
        view = self.view
        # RFC 3501 6.4.2: expunge silently.
        d = view.folder.expungeInThread(view.deletedUids(), origin=view) if view.writable else defer.succeed(None)
        self._deselect()

        def closed(_):
            if self.transport is not None and not self.transport.disconnecting:
                self._send(tag + b" OK CLOSE completed")

        return d.addCallback(closed)

    def do_UNSELECT(self, tag, args, uid):
        args.end()
        self._deselect()
        self._send(tag + b" OK UNSELECT completed")

    def do_EXPUNGE(self, tag, args, uid):
        view = self.view
        among = None
        if uid:
            spans = args.sequenceSet(True).positions(view.uids)
            among = [view.uids[p] for start, stop in spans for p in range(start, stop)]
        args.end()
        if not view.writable:
            self._done(tag, b"NO [READ-ONLY] Mailbox is read-only")
            return
        d = view.folder.expungeInThread(view.deletedUids(among), origin=view)

        def expunged(_):
            if self.transport is not None and not self.transport.disconnecting:
                self._done(tag, b"OK EXPUNGE completed")

        return d.addCallback(expunged)

    def do_SEARCH(self, tag, args, uid):
        tokens = args.tokens[args.pos :]
        if tokens and isinstance(tokens[0], Atom) and tokens[0].upper() == b"CHARSET":
            if len(tokens) < 2:
                raise BadCommand("Missing charset")
            charset = bytes(tokens[1]) if not isinstance(tokens[1], (list, Literal)) else b""
            tokens = tokens[2:]
            if charset.upper() not in CHARSETS:
                parseKeys(tokens)
                self._done(tag, b"NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset", b"SEARCH", uid)
                return
        key = parseKeys(tokens)
        search = Search(self.view)

        def answer(_=None):
            if self.transport is None or self.transport.disconnecting:
                return
            self._send(b"* SEARCH" + b"".join(b" %d" % n for n in search.result))
            self._done(tag, b"OK SEARCH completed", b"SEARCH", uid)

        if key.cheap:
            search.run(key, uid)
            return answer()
        # Keys that read messages take turns with the other sessions.
        return task.cooperate(search.steps(key, uid)).whenDone().addCallback(answer)

    def do_FETCH(self, tag, args, uid):
        view = self.view
        spans = args.sequenceSet(uid).positions(view.uids)
        items = parseItems(args.next("fetch attributes"))
        args.end()
        request = FetchRequest(view, spans, items, uid)
        announcement = view.newKeywordLines()
        if announcement:
            self.transport.write(b"\r\n".join(announcement) + b"\r\n")
        if view.writable and any(item.setsSeen for item in items):
            # RFC 3501 6.4.5: BODY[...] sets \Seen, and FETCH tells it.
            folder = view.folder
            unseen = [
                i
                for p in request.positions()
                if (i := view.index(p)) is not None and not folder.flags[i] & SEEN
            ]
            if unseen:
                request.seenSet = set(folder.setFlags(unseen, SEEN, "", 1, origin=view))
        d = defer.Deferred()

        def produced(failure):
            self._producer = None
            if self.transport is None or self.transport.disconnecting:
                d.callback(None)
                return
            if failure is not None:
                log.error("FETCH failed: {error!r}", error=failure)
                self._done(tag, b"NO [SERVERBUG] FETCH failed", b"FETCH", uid)
            elif request.missing and not uid:
                self._done(tag, _EXPUNGE_ISSUED, b"FETCH", uid)
            else:
                self._done(tag, b"OK FETCH completed", b"FETCH", uid)
            d.callback(None)

        self._producer = ResponseProducer(self.transport, request.responses(), produced, self.settings.clock)
        self._producer.paused = self._outputPaused
        self._producer.start()
        return d

    def do_STORE(self, tag, args, uid):
        view = self.view
        spans = args.sequenceSet(uid).positions(view.uids)
        item = args.atom("store item").upper()
        silent = item.endswith(b".SILENT")
        if silent:
            item = item[: -len(b".SILENT")]
        modes = {b"FLAGS": 0, b"+FLAGS": 1, b"-FLAGS": -1}
        if item not in modes:
            raise BadCommand("Bad store item")
        if isinstance(args.peek(), list):
            names = atomList(args.next(), "flag")
        else:
            names = atomList(args.tokens[args.pos :], "flag")
            if not names:
                raise BadCommand("Missing flags")
            args.pos = len(args.tokens)
        args.end()
        bits, keywords = _flagBits(names)
        if not view.writable:
            self._done(tag, b"NO [READ-ONLY] Mailbox is read-only", b"STORE", uid)
            return
        folder = view.folder
        try:
            letters = folder.keywords.letters(keywords) if keywords else ""
        except TooManyKeywords:
            self._done(tag, b"NO [LIMIT] Too many keywords", b"STORE", uid)
            return
        positions = [p for start, stop in spans for p in range(start, stop)]
        mode = modes[item]

        def store(chunk: list[int]) -> None:
            # Folder indexes are looked up per chunk: others may expunge
            # between two chunks.
            indexes = [i for p in chunk if (i := view.index(p)) is not None]
            folder.setFlags(indexes, bits, letters, mode, origin=view)

        def answer(_=None) -> None:
            if self.transport is None or self.transport.disconnecting:
                return
            lines = view.newKeywordLines()
            missing = 0
            for p in positions:
                i = view.index(p)
                if i is None:
                    missing += 1
                elif not silent:
                    uidPart = b"UID %d " % view.uids[p] if uid else b""
                    lines.append(b"* %d FETCH (%bFLAGS %b)" % (p + 1, uidPart, view.flagList(i)))
            if lines:
                self.transport.write(b"\r\n".join(lines) + b"\r\n")
            # RFC 2180 section 4.2.1: a .SILENT STORE that changed every
            # message still there completed; otherwise say what is gone.
            gone = missing and not uid and not silent
            self._done(tag, _EXPUNGE_ISSUED if gone else b"OK STORE completed", b"STORE", uid)

        if len(positions) <= _STORE_CHUNK:
            store(positions)
            return answer()

        def chunks():
            # Renaming 100,000 files takes seconds: other sessions get
            # their turns between chunks (Thunderbird's "mark folder read").
            for start in range(0, len(positions), _STORE_CHUNK):
                store(positions[start : start + _STORE_CHUNK])
                yield None

        return task.cooperate(chunks()).whenDone().addCallback(answer)

    def do_COPY(self, tag, args, uid, move=False):
        view = self.view
        spans = args.sequenceSet(uid).positions(view.uids)
        name = self._mailboxArg(args)
        args.end()
        verb = b"MOVE" if move else b"COPY"
        if move and not view.writable:
            self._done(tag, b"NO [READ-ONLY] Mailbox is read-only", verb, uid)
            return None
        try:
            destination = self.account.select(name)
        except NoSuchFolder:
            self._done(tag, b"NO [TRYCREATE] Mailbox does not exist", verb, uid)
            return None
        indexes = [i for start, stop in spans for p in range(start, stop) if (i := view.index(p)) is not None]
        if not indexes:
            self._done(tag, b"OK " + verb + b" completed (nothing to do)", verb, uid)
            return None
        try:
            d = view.folder.copyTo(indexes, destination, origin=self)
        except TooManyKeywords:
            self._done(tag, b"NO [LIMIT] Too many keywords in the target mailbox", verb, uid)
            return None

        def copied(result):
            if self.transport is None or self.transport.disconnecting:
                return
            uidvalidity, pairs = result
            code = b""
            if pairs:
                code = b"[COPYUID %d %s %s] " % (
                    uidvalidity,
                    formatUidSet([s for s, _ in pairs]),
                    formatUidSet([d for _, d in pairs]),
                )
            if not move:
                self._done(tag, b"OK " + code + verb + b" completed", verb, uid)
                return
            # RFC 6851 section 4.3: COPYUID comes untagged, before the EXPUNGEs.
            if code:
                # RFC 3501 section 9: resp-text has text after its code.
                self._send(b"* OK " + code + b"Moved UIDs")
            if self.view is view:
                view.folder.expunge([s for s, _ in pairs], origin=view)
            self._sendUpdates(expunges=True)
            self._send(tag + b" OK MOVE completed")

        def failed(reason):
            reason.trap(DeliveryFailed)
            if self.transport is None or self.transport.disconnecting:
                return
            if reason.value.noFolder:
                self._done(tag, b"NO [TRYCREATE] Mailbox does not exist", verb, uid)
                return
            code = b"[OVERQUOTA] " if reason.value.noSpace else b""
            self._done(tag, b"NO " + code + b"Cannot store the messages", verb, uid)

        return d.addCallbacks(copied, failed)

    def do_MOVE(self, tag, args, uid):
        return self.do_COPY(tag, args, uid, move=True)

    def do_IDLE(self, tag, args, uid):
        args.end()
        self.idling = tag
        metrics.imapIdleSessions.inc()
        if self.view is not None:
            # Other programs' changes too must reach us at once.
            self._watching = self.view.folder
            self._watching.watch()
        self._send(b"+ idling")
        self._sendUpdates(expunges=True)
        self.framer.lineHandler = self._idleLine

    def _stopWatching(self) -> None:
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.unwatch()

    def _idleLine(self, line: bytes) -> None:
        tag, self.idling = self.idling, None
        metrics.imapIdleSessions.dec()
        self._stopWatching()
        # RFC 2177: IDLE ends on "DONE" alone; anything else ends it too,
        # as an error (the framer reads past a literal it announces).
        if line.upper() != b"DONE":
            self._send(tag + b" BAD Expected DONE")
            return
        self._done(tag, b"OK IDLE terminated")


class _InvalidMailbox(Exception):
    """
    A mailbox argument that is not a valid folder name (answered NO).
    """


def _flagBits(names: list[bytes]) -> tuple[int, list[str]]:
    """
    The flag bits and keyword names of a flag list.

    @raise BadCommand: for an unknown system flag or a keyword that is
        not an atom (it would be stored, and break every client's FLAGS).
    """
    bits = 0
    keywords = []
    for name in names:
        bit = wire.FLAG_BITS.get(name.lower())
        if bit is not None:
            bits |= bit
        elif name.lower() == b"\\recent":
            # RFC 3501 2.3.2: \Recent cannot be changed by the client.
            continue
        elif name.startswith(b"\\"):
            raise BadCommand("Unknown system flag")
        elif not wire.isKeyword(name):
            raise BadCommand("Keywords must be atoms")
        else:
            keywords.append(name.decode("ascii"))
    return bits, keywords


S = IMAPServer
# The command table: the states each command is valid in, and its handler.
COMMANDS: dict[bytes, tuple[frozenset[str], Callable]] = {
    b"CAPABILITY": (_ANY, S.do_CAPABILITY),
    b"NOOP": (_ANY, S.do_NOOP),
    b"LOGOUT": (_ANY, S.do_LOGOUT),
    b"ID": (_ANY, S.do_ID),
    b"STARTTLS": (frozenset({_UNAUTH}), S.do_STARTTLS),
    b"LOGIN": (frozenset({_UNAUTH}), S.do_LOGIN),
    b"AUTHENTICATE": (frozenset({_UNAUTH}), S.do_AUTHENTICATE),
    b"SELECT": (_LOGGED_IN, S.do_SELECT),
    b"EXAMINE": (_LOGGED_IN, S.do_EXAMINE),
    b"CREATE": (_LOGGED_IN, S.do_CREATE),
    b"DELETE": (_LOGGED_IN, S.do_DELETE),
    b"RENAME": (_LOGGED_IN, S.do_RENAME),
    b"SUBSCRIBE": (_LOGGED_IN, S.do_SUBSCRIBE),
    b"UNSUBSCRIBE": (_LOGGED_IN, S.do_UNSUBSCRIBE),
    b"LIST": (_LOGGED_IN, S.do_LIST),
    b"LSUB": (_LOGGED_IN, S.do_LSUB),
    b"NAMESPACE": (_LOGGED_IN, S.do_NAMESPACE),
    b"ENABLE": (_LOGGED_IN, S.do_ENABLE),
    b"STATUS": (_LOGGED_IN, S.do_STATUS),
    b"APPEND": (_LOGGED_IN, S.do_APPEND),
    b"IDLE": (_LOGGED_IN, S.do_IDLE),
    b"CHECK": (_SELECTED_ONLY, S.do_CHECK),
    b"CLOSE": (_SELECTED_ONLY, S.do_CLOSE),
    b"UNSELECT": (_SELECTED_ONLY, S.do_UNSELECT),
    b"EXPUNGE": (_SELECTED_ONLY, S.do_EXPUNGE),
    b"SEARCH": (_SELECTED_ONLY, S.do_SEARCH),
    b"FETCH": (_SELECTED_ONLY, S.do_FETCH),
    b"STORE": (_SELECTED_ONLY, S.do_STORE),
    b"COPY": (_SELECTED_ONLY, S.do_COPY),
    b"MOVE": (_SELECTED_ONLY, S.do_MOVE),
}
del S


class IMAPFactory(LimitedFactory):
    """
    Builds the sessions of one IMAP listener.
    """

    refusal = b"* BYE Too many connections from your address"
    goodbye = b"* BYE Server shutting down"
    protocol = IMAPServer

    def __init__(self, settings: IMAPSettings) -> None:
        LimitedFactory.__init__(
            self, settings.limits.connections_per_ip, settings.limits.trusted_networks
        )
        self.settings = settings

    def buildSession(self, addr) -> IMAPServer:
        return self.protocol(self.settings)
