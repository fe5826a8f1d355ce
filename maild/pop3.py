"""
POP3: downloading the INBOX with any POP3 client.

L{POP3Server} subclasses Twisted's C{POP3} and replaces what Twisted gets
wrong for a real server: it frames its input itself (overlong lines are
refused without dropping the session, pipelined commands wait while a
response is being sent, plaintext queued behind STLS is dropped), offers
STLS (RFC 2595), SASL PLAIN and LOGIN (RFC 5034) and the response codes of RFC 2449
and RFC 3206, refuses APOP, and sends each message from its file in large
CRLF, dot-stuffed pieces, the end marker in the same write as the last
piece, with Nagle's algorithm off: Twisted's C{FileSender} and separate
C{.} write stall every RETR on a delayed ACK, and its C{transformChunk}
turns a CRLF on disk into CR CR LF.

L{Maildrop} is the session's view of the INBOX: the messages there at
login, numbered for the whole session (RFC 1939 section 3).
"""

from __future__ import annotations

import base64

import re
from array import array
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator

from twisted.cred import credentials
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.mail import pop3
from zope.interface import implementer

from maild.auth import (
    PASSWORD_MECHANISMS,
    Authenticator,
    Cancelled,
    NotBase64,
    OtherIdentity,
    PasswordExchange,
    SASLError,
    plaintextLoginAllowed,
)
from maild.config import Limits
from maild.connections import LimitedFactory, sendWithoutDelay
from maild.lines import LineReader, Overlong
from maild.store.folder import Folder, MessageGone
from maild.store.maildir import IN_NEW, INBOX, SEEN
from maild.tls import isEncrypted

log = Logger()

# Messages are read and sent in pieces of this size: a small message goes
# out in one write, a large one is never held whole.
CHUNK = 256 * 1024
# Lines of a LIST or UIDL response formatted per write.
_LISTING_BATCH = 4096
# Retrieved messages are marked \Seen in batches, this long after the
# first RETR of a batch (one change of the folder for many messages).
_SEEN_DELAY = 0.05
# A line count this long (TOP) means "the whole body" anyway.
_MAX_DIGITS = 18

_PLAINTEXT_REFUSED = (
    b"[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)
_BEFORE_LOGIN = frozenset({b"CAPA", b"USER", b"PASS", b"AUTH", b"APOP", b"STLS", b"QUIT"})
_AFTER_LOGIN = frozenset(
    {b"CAPA", b"STAT", b"LIST", b"UIDL", b"TOP", b"RETR", b"DELE", b"RSET", b"NOOP", b"QUIT"}
)


class MaildropInUse(Exception):
    """
    Another POP3 session, in this process or another, holds the maildrop.
    """


# The message file, as sent ---------------------------------------------------


def lfChunks(f: IO[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """
    The content of C{f} in pieces of about C{size} octets with LF line
    ends.  Our files have LF; a file that another tool wrote with CRLF is
    read the same way rather than sent with CR CR LF.
    """
    # One read system call per piece (a buffered file's read() makes a
    # second one to find the end), and a file reads short only at its end:
    # no read just to learn that.
    read = getattr(f, "read1", f.read)
    carry = b""
    while True:
        chunk = read(size)
        last = len(chunk) < size
        if carry:
            chunk, carry = carry + chunk, b""
        if chunk.endswith(b"\r"):
            # Its LF may start the next piece.
            chunk, carry = chunk[:-1], b"\r"
        # (find() of one octet is memchr: far cheaper than "\r\n" in chunk.)
        if chunk.find(b"\r") >= 0:
            chunk = chunk.replace(b"\r\n", b"\n")
        if chunk:
            yield chunk
        if last:
            break
    if carry:
        yield carry


def topChunks(chunks: Iterator[bytes], bodyLines: int) -> Iterator[bytes]:
    """
    The header section, the blank line and the first C{bodyLines} lines of
    the body (RFC 1939 section 7, TOP), from LF pieces.
    """
    inHeader = True
    atLineStart = True
    for chunk in chunks:
        start = 0
        if inHeader:
            if atLineStart and chunk[:1] == b"\n":
                start = 1
            else:
                end = chunk.find(b"\n\n")
                if end < 0:
                    atLineStart = chunk.endswith(b"\n")
                    yield chunk
                    continue
                start = end + 2
            inHeader = False
        if chunk.count(b"\n", start) < bodyLines:
            bodyLines -= chunk.count(b"\n", start)
            yield chunk
            continue
        for _ in range(bodyLines):
            start = chunk.index(b"\n", start) + 1
        yield chunk[:start]
        return


# A compiled pattern finds these several times faster than bytes.replace.
_LINE_WITH_DOT = re.compile(rb"\n\.")


class DotStuffer:
    """
    Turns LF pieces of a message into the lines of a multi-line response
    (RFC 1939 section 3): CRLF line ends, and a dot doubled where a line
    begins with one, also across pieces.
    """

    def __init__(self) -> None:
        self.atLineStart = True

    def encode(self, data: bytes) -> bytes:
        out = _LINE_WITH_DOT.sub(b"\n..", data).replace(b"\n", b"\r\n")
        if self.atLineStart and data[:1] == b".":
            out = b"." + out
        self.atLineStart = data[-1:] == b"\n"
        return out

    def finish(self) -> bytes:
        """
        The end marker, after a line end if the message lacks a last one.
        """
        return b".\r\n" if self.atLineStart else b"\r\n.\r\n"


def messageResponse(
    f: IO[bytes], status: bytes, bodyLines: int | None = None, size: int = CHUNK
) -> Iterator[bytes]:
    """
    The whole response for message file C{f}: the C{status} line, the
    message (its top only when C{bodyLines} is given) and the end marker,
    in writes of at least C{size} octets, the last one holding the end
    marker.  C{f} is closed at the end, or when the response is abandoned.
    """
    try:
        chunks = lfChunks(f, size)
        if bodyLines is not None:
            chunks = topChunks(chunks, bodyLines)
        stuffer = DotStuffer()
        out, pending = [status], len(status)
        for chunk in chunks:
            if pending >= size:
                yield b"".join(out)
                out, pending = [], 0
            piece = stuffer.encode(chunk)
            out.append(piece)
            pending += len(piece)
        out.append(stuffer.finish())
        yield b"".join(out)
    finally:
        f.close()


# The maildrop ----------------------------------------------------------------


# Dovecot's default pop3_uidl_format.
DEFAULT_UIDL_FORMAT = "%08Xu%08Xv"

# The variables of pop3_uidl_format maild can fill, by short and long name:
# the UID, the UIDVALIDITY, and the Maildir base name (which Dovecot's
# Maildir storage gives as both the file name and the GUID).
_UIDL_VARIABLES = {
    "u": "uid",
    "uid": "uid",
    "v": "uidvalidity",
    "uidvalidity": "uidvalidity",
    "f": "base",
    "filename": "base",
    "g": "base",
    "guid": "base",
}
# Dovecot's %-expansion: "%%", or "%" then an optional zero-padded width,
# an optional X (hexadecimal, lower case as Dovecot writes it), and a
# one-letter variable or a {long name}.
_UIDL_TOKEN = re.compile(r"%(?:(%)|(0?)(\d*)(X?)(?:\{(\w+)\}|(\w)))")


class BadUidlFormat(ValueError):
    pass


def uidlFormatter(template: str) -> Callable[[int, int, str], bytes]:
    """
    A function making a POP3 unique id from C{(uid, uidvalidity, base)}
    as Dovecot's C{pop3_uidl_format} C{template} does: C{%08Xu%08Xv}
    gives C{000000016b0e1105}.

    @raise BadUidlFormat: for a variable maild cannot fill (C{%m}, the
        MD5 of the headers, would mean reading every message at login),
        or an id that would not be unique (no UID or base name in it).
    """
    pieces: list[str] = []
    fields: list[str] = []
    position = 0
    for match in _UIDL_TOKEN.finditer(template):
        pieces.append(template[position : match.start()].replace("{", "{{").replace("}", "}}"))
        position = match.end()
        percent, zero, width, hexadecimal, longName, shortName = match.groups()
        if percent:
            pieces.append("%")
            continue
        variable = _UIDL_VARIABLES.get(longName or shortName)
        if variable is None:
            raise BadUidlFormat(f"pop3 uidl_format: unsupported variable in {match.group()!r}")
        if variable == "base":
            pieces.append("{base}")
        else:
            pieces.append("{%s:%s%s%s}" % (variable, zero, width, "x" if hexadecimal else "d"))
        fields.append(variable)
    rest = template[position:]
    if "%" in rest:
        raise BadUidlFormat(f"pop3 uidl_format: cannot read {rest!r}")
    pieces.append(rest.replace("{", "{{").replace("}", "}}"))
    if "uid" not in fields and "base" not in fields:
        raise BadUidlFormat("pop3 uidl_format: needs %u or %f to tell messages apart")
    format = "".join(pieces).format

    def uidl(uid: int, uidvalidity: int, base: str) -> bytes:
        # RFC 1939 section 7: 1 to 70 characters from 0x21 to 0x7E.
        return format(uid=uid, uidvalidity=uidvalidity, base=base).encode("ascii", "replace")

    return uidl


def _sizeByUid(folder: Folder, uid: int) -> int:
    """
    The CRLF size of message C{uid}, found by its UID: reading a size from
    a file another process renamed lists the folder again, which may move
    every index after an expunge learnt there.

    @raise MessageGone: if it was expunged meanwhile.
    """
    i = folder.position(uid)
    if i is None:
        raise MessageGone(uid)
    return folder.sizes(i)[1]


@implementer(pop3.IMailbox)
class Maildrop:
    """
    The POP3 view of a user's INBOX, taken at login (L{open}) and held
    under an exclusive lock until L{logout}.  Message numbers (0-based
    here) stay the same for the whole session; L{deleteMessage} only marks,
    and L{sync} removes the marked messages from the store.

    A message's unique id (UIDL) is made of its IMAP UID and the folder's
    UIDVALIDITY as Dovecot's C{pop3_uidl_format} makes it (by default
    C{%08Xu%08Xv}): the same message has the same identity in IMAP,
    across restarts, and after a move of the Maildir between maild and
    Dovecot, so a client that leaves mail on the server downloads nothing
    twice.

    @param mailbox: the user's L{maild.store.UserMailbox}.
    @param uidl: makes a unique id from C{(uid, uidvalidity, base name)}
        (L{uidlFormatter}).
    """

    def __init__(self, mailbox, uidl: Callable[[int, int, str], bytes] | None = None) -> None:
        self.mailbox = mailbox
        self._uidl = uidl or uidlFormatter(DEFAULT_UIDL_FORMAT)
        self.folder: Folder | None = None
        self.uidvalidity = 0
        self.uids = array("I")
        self.bases: list[str] = []
        self.sizes: list[int] = []
        self.deleted: set[int] = set()
        # Retrieved, not yet marked \Seen in the store.
        self._retrieved: set[int] = set()
        self._hold = None

    def open(self) -> None:
        """
        Lock the maildrop and take the view.

        @raise MaildropInUse: if another session holds it.
        @raise OSError: if the store cannot be read.
        """
        folder = self.mailbox.folder(INBOX)
        hold = self.mailbox.lockMaildrop()
        if hold is None:
            raise MaildropInUse(self.mailbox.address)
        try:
            folder.refresh()
            self.uidvalidity = folder.uidvalidity
            self.uids = array("I", folder.uids)
            self.bases = list(folder.bases)
            self.sizes = [_sizeByUid(folder, uid) for uid in self.uids]
        except BaseException:
            hold.release()
            raise
        self.folder = folder
        self._hold = hold

    def logout(self) -> None:
        """
        Release the lock (the session ended, with or without QUIT).
        """
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    def __len__(self) -> int:
        return len(self.uids)

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self.uids):
            raise ValueError(f"no message {i + 1}")

    def _position(self, i: int) -> int | None:
        """
        Where message C{i} is in the shared folder index now, or None if it
        was expunged (by IMAP, say) since the view was taken.
        """
        folder = self.folder
        position = folder.position(self.uids[i])
        if position is None or folder.bases[position] != self.bases[i]:
            return None
        return position

    def stat(self) -> tuple[int, int]:
        """
        The number of messages not marked deleted, and their CRLF size.
        """
        count = len(self.sizes) - len(self.deleted)
        return count, sum(self.sizes) - sum(self.sizes[i] for i in self.deleted)

    # pop3.IMailbox

    def listMessages(self, i: int | None = None):
        if i is None:
            return [0 if j in self.deleted else size for j, size in enumerate(self.sizes)]
        self._check(i)
        return 0 if i in self.deleted else self.sizes[i]

    def getMessage(self, i: int) -> IO[bytes]:
        """
        @raise MessageGone: if the message was expunged meanwhile.
        @raise OSError: if its file cannot be opened.
        """
        self._check(i)
        position = self._position(i)
        if position is None:
            raise MessageGone(self.uids[i])
        return self.folder.open(position)

    def getUidl(self, i: int) -> bytes:
        self._check(i)
        return self._uidl(self.uids[i], self.uidvalidity, self.bases[i])

    def deleteMessage(self, i: int) -> None:
        self._check(i)
        self.deleted.add(i)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> int:
        """
        Remove the messages marked deleted from the store (RFC 1939
        section 6, the UPDATE state).

        @return: how many were removed.
        @raise OSError: if some could not be.
        """
        if not self.deleted:
            return 0
        # A file renamed by another process must be found under its new name.
        self.folder.refresh()
        uids = [self.uids[i] for i in sorted(self.deleted) if self._position(i) is not None]
        self.deleted.clear()
        return len(self.folder.expunge(uids, origin=self)) if uids else 0

    def markSeen(self, i: int) -> None:
        """
        Note that message C{i} was retrieved: L{flushSeen} sets \\Seen on
        it in the store, as IMAP shows it.
        """
        self._retrieved.add(i)

    def flushSeen(self, skipDeleted: bool) -> None:
        """
        Set \\Seen on the retrieved messages, in one change of the folder;
        with C{skipDeleted}, not yet on those marked deleted (QUIT is likely
        to remove them: renaming them first would be wasted).
        """
        pending = self._retrieved - self.deleted if skipDeleted else set(self._retrieved)
        if not pending:
            return
        self._retrieved -= pending
        folder = self.folder
        positions = []
        for i in sorted(pending):
            position = self._position(i)
            if position is not None:
                bits = folder.flags[position]
                if not bits & SEEN or bits & IN_NEW:
                    positions.append(position)
        if not positions:
            return
        try:
            folder.setFlags(positions, SEEN, mode=1, origin=self)
        except OSError as e:
            log.warn(
                "pop3: cannot mark messages seen for {user}: {error}",
                user=self.mailbox.address,
                error=e,
            )


# The protocol ----------------------------------------------------------------


@dataclass(frozen=True)
class POP3Settings:
    """
    What every session of one listener shares.

    @ivar plaintextAuth: the C{auth.plaintext} policy
        (L{maild.auth.plaintextLoginAllowed}).
    @ivar tlsContext: the context factory for STLS, or None for no STLS.
    """

    hostname: str
    limits: Limits
    authenticator: Authenticator
    clock: Any
    plaintextAuth: str = "loopback"
    tlsContext: Any = None


def _shown(arg: bytes) -> bytes:
    """
    A client's digits, cut short enough to quote in a reply.
    """
    return arg if len(arg) <= 20 else arg[:20] + b"..."


@implementer(IPushProducer)
class POP3Server(pop3.POP3):
    """
    One POP3 session.

    The session is registered with its transport as a streaming producer:
    when the client reads more slowly than we write, the transport pauses
    us and commands wait (with their input) until it has drained, so
    neither a long message nor a deep pipeline of RETRs is ever buffered
    whole.
    """

    def __init__(self, settings: POP3Settings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.host = settings.hostname.encode("idna")
        self.timeOut = self.limits.pop3_idle_timeout
        self.callLater = settings.clock.callLater
        self.peerAddress = self.clientAddress = "?"
        self.mbox: Maildrop | None = None
        self.reader = LineReader(self.limits.line_length)
        self._readingPaused = False
        self._outputPaused = False
        self._processing = False
        self._closed = False
        # Waiting for the portal: later commands wait too.
        self._busy = False
        # The rest of the response being sent (RETR, TOP, LIST, UIDL), and
        # what to do once it is all written.
        self._stream: Iterator[bytes] | None = None
        self._afterStream: Callable[[], None] | None = None
        # A SASL exchange under way (AUTH): the next line is its response.
        self._exchange: PasswordExchange | None = None
        self._tlsStarted = False
        self._authFailures = 0
        self._loginDeadline = None
        self._retrieved = 0
        self._seenFlush = None
        self._deletedAtQuit: int | None = None

    # Connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        sendWithoutDelay(self.transport)
        self.transport.registerProducer(self, True)
        self.setTimeout(self.timeOut)
        self._loginDeadline = self.callLater(self.limits.login_timeout, self._loginTimedOut)
        # RFC 1939 section 4: the banner's timestamp is for APOP, which we
        # do not offer, so there is none.
        self._ok(self.host + b" POP3 maild ready.")

    def connectionLost(self, reason) -> None:
        self._closed = True
        self._dropStream()
        if self._loginDeadline is not None and self._loginDeadline.active():
            self._loginDeadline.cancel()
        self._loginDeadline = None
        self._cancelSeenFlush()
        if self.mbox is not None:
            # Without QUIT nothing is deleted, so every message retrieved
            # stays, and is seen.
            self.mbox.flushSeen(skipDeleted=self._deletedAtQuit is not None)
            log.info(
                "pop3 logout: user=<{user}> rip={rip} retr={retr} del={deleted} {how}",
                user=self.mbox.mailbox.address,
                rip=self.clientAddress,
                retr=self._retrieved,
                deleted=self._deletedAtQuit or 0,
                how="quit" if self._deletedAtQuit is not None else "disconnected",
            )
        pop3.POP3.connectionLost(self, reason)
        self.mbox = None
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connectionClosed(self)

    @property
    def secure(self) -> bool:
        return self._tlsStarted or isEncrypted(self.transport)

    def _plaintextAllowed(self) -> bool:
        return plaintextLoginAllowed(self.settings.plaintextAuth, self.clientAddress, self.secure)

    def _close(self) -> None:
        """
        Close after what was written (a registered producer would hold the
        connection open).
        """
        self._dropStream()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def stopResponding(self) -> None:
        """
        Abandon the response being sent, before the daemon closes the
        connection.
        """
        self._dropStream()
        if not self._closed:
            self.transport.unregisterProducer()

    def _respond(self, stream: Iterator[bytes], after: Callable[[], None] | None = None) -> None:
        """
        Send the pieces of C{stream} as the transport takes them, then call
        C{after}.
        """
        self._stream, self._afterStream = stream, after

    def _dropStream(self) -> None:
        stream, self._stream, self._afterStream = self._stream, None, None
        if stream is not None:
            stream.close()

    def _timedOut(self, message: bytes) -> None:
        if self._outputPaused:
            # The client does not read: nothing more can reach it.
            self._dropStream()
            self.transport.unregisterProducer()
            self.transport.abortConnection()
            return
        self._dropStream()
        self._err(message)
        self._close()

    def timeoutConnection(self) -> None:
        self._timedOut(b"Disconnected for inactivity.")

    def _loginTimedOut(self) -> None:
        self._loginDeadline = None
        self._timedOut(b"Disconnected: no login in time.")

    # Output ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _ok(self, text: bytes = b"") -> None:
        self._write(b"+OK " + text + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text: bytes) -> None:
        self._write(b"-ERR " + text + b"\r\n")

    # IPushProducer: the transport's flow control.

    def pauseProducing(self) -> None:
        self._outputPaused = True

    def resumeProducing(self) -> None:
        self._outputPaused = False
        if not self._closed:
            self._process()

    def stopProducing(self) -> None:
        self._dropStream()

    # Input framing ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        self._process()

    def _process(self) -> None:
        """
        Answer the commands received, in order, while the transport takes
        our output; a response being sent is finished first.
        """
        if self._processing:
            return
        self._processing = True
        progress = False
        try:
            while not (
                self._outputPaused or self._busy or self._closed or self.transport.disconnecting
            ):
                if self._stream is not None:
                    self._pump()
                    progress = True
                    continue
                line = self.reader.readLine()
                if line is None:
                    break
                progress = True
                if isinstance(line, Overlong):
                    self._exchange = None
                    self._err(b"Line too long.")
                elif self._exchange is not None:
                    self._saslStep(self._exchange.respond, line.strip())
                else:
                    self._command(line)
        finally:
            self._processing = False
        if progress and not self._closed:
            # A command, or a piece of a response the client took: not idle.
            self.resetTimeout()
        backlog = self.reader.full
        if backlog != self._readingPaused and not self._closed:
            self._readingPaused = backlog
            if backlog:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _pump(self) -> None:
        """
        Write the next piece of the response being sent.
        """
        try:
            piece = next(self._stream)
        except StopIteration:
            after = self._afterStream
            self._stream = self._afterStream = None
            if after is not None:
                after()
            return
        except OSError as e:
            # Part of the response is out: the only way to say it failed
            # is to close the connection.
            log.error("pop3: cannot read a message: {error}", error=e)
            self._dropStream()
            self.transport.unregisterProducer()
            self.transport.abortConnection()
            return
        self._write(piece)

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        allowed = _AFTER_LOGIN if self.mbox is not None else _BEFORE_LOGIN
        if verb in allowed:
            getattr(self, "do_" + verb.decode("ascii"))(rest)
        elif verb in _BEFORE_LOGIN:
            self._err(b"Already logged in.")
        elif verb in _AFTER_LOGIN:
            self._err(b"Not logged in.")
        else:
            self._err(b"Unknown command.")

    # Arguments -------------------------------------------------------------

    def _arguments(self, rest: bytes, count: int, syntax: bytes, optional: int = 0):
        """
        The arguments in C{rest}, if there are C{count} (to C{count} +
        C{optional}); otherwise None, after telling the client the syntax.
        """
        args = rest.split()
        if count <= len(args) <= count + optional:
            return args
        self._err(b"Syntax: " + syntax)
        return None

    def _number(self, arg: bytes, what: bytes) -> int | None:
        """
        A non-negative decimal argument, or None after saying what is wrong
        with it.
        """
        if arg.isdigit():
            return int(arg) if len(arg) <= _MAX_DIGITS else 10**_MAX_DIGITS
        if arg[:1] == b"-" and arg[1:].isdigit():
            self._err(b"Invalid " + what + b": negative numbers are not allowed.")
        else:
            self._err(b"Invalid " + what + b": not a number.")
        return None

    def _message(self, arg: bytes) -> int | None:
        """
        The 0-based index of message number C{arg} (RFC 1939: it must
        exist and not be marked deleted), or None after saying why not.
        """
        number = self._number(arg, b"message number")
        if number is None:
            return None
        if not 1 <= number <= len(self.mbox):
            self._err(b"There is no message " + _shown(arg) + b".")
            return None
        if number - 1 in self.mbox.deleted:
            self._err(b"Message %d is deleted." % number)
            return None
        return number - 1

    # The AUTHORIZATION state -----------------------------------------------

    def do_CAPA(self, rest: bytes) -> None:
        # RFC 2449 section 5; USER, SASL and STLS only where they may be used.
        capabilities = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.mbox is None:
            if self._plaintextAllowed():
                capabilities += [b"USER", b"SASL " + b" ".join(PASSWORD_MECHANISMS)]
            if self.settings.tlsContext is not None and not self.secure:
                capabilities.append(b"STLS")
        capabilities.append(b"IMPLEMENTATION maild")
        self._write(
            b"+OK Capability list follows\r\n"
            + b"".join(c + b"\r\n" for c in capabilities)
            + b".\r\n"
        )

    def do_STLS(self, rest: bytes) -> None:
        if self._arguments(rest, 0, b"STLS") is None:
            return
        if self.secure:
            self._err(b"TLS is already active.")
            return
        if self.settings.tlsContext is None:
            self._err(b"STLS is not available.")
            return
        self._ok(b"Begin TLS negotiation.")
        # Whatever the client sent behind STLS came in plaintext and must
        # not be taken as said inside TLS (CVE-2011-0411).
        self.reader.discard()
        self.transport.startTLS(self.settings.tlsContext)
        self._tlsStarted = True
        # RFC 2595 section 4: nothing learnt before TLS carries over.
        self._userIs = None

    def do_USER(self, rest: bytes) -> None:
        if not self._plaintextAllowed():
            self._err(_PLAINTEXT_REFUSED)
            return
        args = self._arguments(rest, 1, b"USER name")
        if args is not None:
            self._userIs = args[0]
            self._ok(b"Send your password.")

    def do_PASS(self, rest: bytes) -> None:
        if self._userIs is None:
            self._err(b"Send USER first.")
            return
        user, self._userIs = self._userIs, None
        if not rest:
            self._err(b"Syntax: PASS password")
            return
        # RFC 1939 section 7: the password is the rest of the line, spaces
        # included.
        self._login(user, rest, "USER")

    def do_APOP(self, rest: bytes) -> None:
        # APOP needs the password in a form equivalent to plaintext.
        self._err(b"APOP is not supported; use USER/PASS or AUTH PLAIN over TLS.")

    def do_AUTH(self, rest: bytes) -> None:
        allowed = self._plaintextAllowed()
        args = rest.split()
        if not args:
            # The mechanism list that clients older than RFC 2449 ask for.
            mechanisms = b"".join(m + b"\r\n" for m in PASSWORD_MECHANISMS) if allowed else b""
            self._write(b"+OK\r\n" + mechanisms + b".\r\n")
            return
        if not allowed:
            self._err(_PLAINTEXT_REFUSED)
            return
        mechanism = args[0].upper()
        if mechanism not in PASSWORD_MECHANISMS:
            self._err(b"Unsupported authentication mechanism.")
            return
        if len(args) > 2:
            self._err(b"Syntax: AUTH mechanism [initial-response]")
            return
        # RFC 5034 section 4: an initial response, "=" for an empty one.
        self._exchange = PasswordExchange(mechanism)
        self._saslStep(self._exchange.start, args[1] if len(args) == 2 else None)

    def _saslStep(self, step, response: bytes | None) -> None:
        exchange = self._exchange
        try:
            challenge = step(response)
        except Cancelled:
            self._exchange = None
            self._err(b"Authentication cancelled.")
            return
        except NotBase64:
            self._exchange = None
            self._err(b"Invalid base64 data.")
            return
        except OtherIdentity:
            self._exchange = None
            self._err(b"[AUTH] Logging in as another user is not supported.")
            return
        except SASLError:
            self._exchange = None
            self._err(b"Invalid " + exchange.mechanism + b" response.")
            return
        if challenge is not None:
            self._write(b"+ " + base64.b64encode(challenge) + b"\r\n")
            return
        self._exchange = None
        creds = exchange.credentials
        if not creds.username:
            self._err(b"Invalid " + exchange.mechanism + b" response.")
            return
        self._login(creds.username, creds.password, exchange.mechanism.decode("ascii"))

    def _login(self, user: bytes, password: bytes, method: str) -> None:
        self._busy = True
        d = self.settings.authenticator.login(
            credentials.UsernamePassword(user, password),
            self.clientAddress,
            "pop3",
            method,
            pop3.IMailbox,
        )
        d.addCallbacks(self._authenticated, self._authenticationFailed)
        d.addErrback(lambda reason: log.failure("pop3 login", reason))
        d.addBoth(self._resume)

    def _resume(self, ignored) -> None:
        self._busy = False
        if not self._closed:
            self._process()

    def _authenticated(self, result) -> None:
        interface, maildrop, logout = result
        if self._closed:
            logout()
            return
        try:
            maildrop.open()
        except MaildropInUse:
            logout()
            log.info(
                "pop3: maildrop in use: user=<{user}> rip={rip}",
                user=maildrop.mailbox.address,
                rip=self.clientAddress,
            )
            self._err(b"[IN-USE] Mailbox is locked by another POP3 session.")
            return
        except Exception:
            logout()
            log.failure("pop3: cannot open the maildrop of {user}", user=maildrop.mailbox.address)
            self._err(b"[SYS/TEMP] Cannot open the mailbox, try again later.")
            return
        self.mbox = maildrop
        self._onLogout = logout
        if self._loginDeadline is not None and self._loginDeadline.active():
            self._loginDeadline.cancel()
        self._loginDeadline = None
        self._ok(b"Logged in.")

    def _authenticationFailed(self, reason) -> None:
        if self._closed:
            return
        self._authFailures += 1
        if self._authFailures >= self.limits.auth_failures_per_connection:
            self._err(b"[AUTH] Authentication failed; too many failures, closing.")
            self._close()
        else:
            self._err(b"[AUTH] Authentication failed.")

    def do_QUIT(self, rest: bytes) -> None:
        if self.mbox is None:
            self._ok(b"Bye.")
            self._close()
            return
        # RFC 1939 section 6: the UPDATE state.
        self._cancelSeenFlush()
        try:
            self.mbox.flushSeen(skipDeleted=True)
            self._deletedAtQuit = self.mbox.sync()
        except Exception:
            log.failure(
                "pop3: cannot remove deleted messages of {user}", user=self.mbox.mailbox.address
            )
            self._deletedAtQuit = 0
            reply = b"-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n"
        else:
            reply = b"+OK Logging out, %d messages deleted.\r\n" % self._deletedAtQuit
        # Unlocked before the reply, so that the client's next session finds
        # the maildrop free.
        logout, self._onLogout = self._onLogout, None
        if logout is not None:
            logout()
        self._write(reply)
        self._close()

    # The TRANSACTION state -------------------------------------------------

    def do_NOOP(self, rest: bytes) -> None:
        if self._arguments(rest, 0, b"NOOP") is not None:
            self._ok()

    def do_STAT(self, rest: bytes) -> None:
        if self._arguments(rest, 0, b"STAT") is not None:
            self._ok(b"%d %d" % self.mbox.stat())

    def do_LIST(self, rest: bytes) -> None:
        self._listing(
            rest,
            b"LIST",
            lambda i: b"%d" % self.mbox.sizes[i],
            b"%d messages (%d octets)" % self.mbox.stat(),
        )

    def do_UIDL(self, rest: bytes) -> None:
        self._listing(rest, b"UIDL", self.mbox.getUidl, b"")

    def _listing(
        self, rest: bytes, verb: bytes, value: Callable[[int], bytes], status: bytes
    ) -> None:
        args = self._arguments(rest, 0, verb + b" [message number]", optional=1)
        if args is None:
            return
        if args:
            i = self._message(args[0])
            if i is not None:
                self._ok(b"%d %s" % (i + 1, value(i)))
            return
        self._respond(
            self._listingLines(value, b"+OK " + status + b"\r\n" if status else b"+OK\r\n")
        )

    def _listingLines(self, value: Callable[[int], bytes], status: bytes) -> Iterator[bytes]:
        deleted = self.mbox.deleted
        out = [status]
        for i in range(len(self.mbox)):
            if i not in deleted:
                out.append(b"%d %s\r\n" % (i + 1, value(i)))
                if len(out) >= _LISTING_BATCH:
                    yield b"".join(out)
                    out = []
        out.append(b".\r\n")
        yield b"".join(out)

    def do_RETR(self, rest: bytes) -> None:
        args = self._arguments(rest, 1, b"RETR message-number")
        i = None if args is None else self._message(args[0])
        if i is not None:
            self._sendMessage(i, None)

    def do_TOP(self, rest: bytes) -> None:
        args = self._arguments(rest, 2, b"TOP message-number lines")
        i = None if args is None else self._message(args[0])
        if i is None:
            return
        lines = self._number(args[1], b"line count")
        if lines is not None:
            self._sendMessage(i, lines)

    def _sendMessage(self, i: int, bodyLines: int | None) -> None:
        """
        Start sending message C{i}: whole (RETR), or its top (TOP).  Once
        all of a RETR is out, the message is marked \\Seen.
        """
        try:
            f = self.mbox.getMessage(i)
        except MessageGone:
            self._err(b"Message %d was removed by another session." % (i + 1))
            return
        except OSError as e:
            log.error("pop3: cannot open a message: {error}", error=e)
            self._err(b"[SYS/TEMP] Cannot read message %d." % (i + 1))
            return
        if bodyLines is None:
            status = b"+OK %d octets\r\n" % self.mbox.sizes[i]
        else:
            status = b"+OK Top of message follows.\r\n"
        after = (lambda: self._retrievedMessage(i)) if bodyLines is None else None
        self._respond(messageResponse(f, status, bodyLines), after)

    def _retrievedMessage(self, i: int) -> None:
        self._retrieved += 1
        self.mbox.markSeen(i)
        if self._seenFlush is None:
            self._seenFlush = self.callLater(_SEEN_DELAY, self._flushSeen)

    def _flushSeen(self) -> None:
        self._seenFlush = None
        self.mbox.flushSeen(skipDeleted=True)

    def _cancelSeenFlush(self) -> None:
        if self._seenFlush is not None and self._seenFlush.active():
            self._seenFlush.cancel()
        self._seenFlush = None

    def do_DELE(self, rest: bytes) -> None:
        args = self._arguments(rest, 1, b"DELE message-number")
        if args is None:
            return
        i = self._message(args[0])
        if i is not None:
            self.mbox.deleteMessage(i)
            self._ok(b"Message %d deleted." % (i + 1))

    def do_RSET(self, rest: bytes) -> None:
        if self._arguments(rest, 0, b"RSET") is not None:
            self.mbox.undeleteMessages()
            self._ok(b"%d messages (%d octets)." % self.mbox.stat())


class POP3Factory(LimitedFactory):
    """
    Builds the sessions of one POP3 or POP3S listener.
    """

    refusal = b"-ERR [SYS/TEMP] Too many connections from your address."
    goodbye = b"-ERR [SYS/TEMP] Server shutting down."
    protocol = POP3Server

    def __init__(self, settings: POP3Settings) -> None:
        LimitedFactory.__init__(
            self, settings.limits.connections_per_ip, settings.limits.trusted_networks
        )
        self.settings = settings

    def buildSession(self, addr) -> POP3Server:
        return self.protocol(self.settings)

    def closeSessions(self, clock, grace: float = 5.0):
        for session in list(self.sessions):
            session.stopResponding()
        return LimitedFactory.closeSessions(self, clock, grace)
