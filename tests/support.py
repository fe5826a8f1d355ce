"""
Shared test fixtures: a temporary data folder with users, and the daemon's
services started on loopback ports chosen by the system.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import socket
import ssl
import struct
import termios
import time
from pathlib import Path
from typing import Any, Callable

import bcrypt
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from maild.config import PROTOCOLS, Config, loadConfig
from maild.service import MailService
from maild.store import MailStore

PASSWORD = "correct horse battery staple"
LOOPBACK = "tcp:0:interface=127.0.0.1"


@functools.lru_cache(maxsize=None)
def passwordHash(password: str = PASSWORD) -> str:
    """
    A {BLF-CRYPT} hash at bcrypt's lowest cost: verifying the daemon's
    default Argon2id costs tens of milliseconds of CPU, and a loaded test
    machine would turn every login into a race with the tests' short
    timeouts.  (Argon2id itself is tested in test_accounts.)
    """
    return "{BLF-CRYPT}" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def writeUsers(dataDir: Path, users: dict[str, str]) -> None:
    """
    Write a users file for C{users} (address -> password) and create their
    mailboxes, as C{maild user add} does.
    """
    dataDir.mkdir(parents=True, exist_ok=True)
    with open(dataDir / "users", "a", encoding="utf-8") as f:
        for address, password in users.items():
            f.write(f"{address}:{passwordHash(password)}\n")
    store = MailStore(dataDir)
    for address in users:
        store.mailbox(address).ensureExists()


def makeConfig(dataDir: Path, listeners=("smtp",), limits: dict | None = None, **values) -> Config:
    """
    A configuration with C{listeners} on loopback ports chosen by the system
    and the others disabled.  The MX's trust checks are off unless C{mx}
    turns them on: they would ask the system's DNS servers about test
    domains (tests/test_trust.py gives them a DNS server of their own).
    """
    overrides: dict[str, Any] = {
        "data_dir": dataDir,
        "hostname": "mx.test",
        "domains": ["localhost", "example.org"],
        "listeners": {name: (LOOPBACK if name in listeners else "none") for name in PROTOCOLS},
        "limits": limits or {},
        "mx": {"checks": False},
    }
    overrides.update(values)
    return loadConfig(None, overrides)


class ServerTestCase(unittest.TestCase):
    """
    A test case with a running daemon: C{self.service}, its data folder
    C{self.dataDir} and the users C{alice@localhost} and C{bob@example.org}.
    """

    listeners: tuple[str, ...] = ("smtp",)
    users = {"alice@localhost": PASSWORD, "bob@example.org": PASSWORD}
    limits: dict[str, Any] = {}
    configValues: dict[str, Any] = {}

    # Whether sessions' deadlines, login delays and the shutdown grace run
    # on C{self.clock}, a task.Clock the test advances, instead of the
    # reactor's time.
    useClock = False
    clock: task.Clock | None = None

    def setUp(self):
        self.dataDir = Path(self.mktemp()).resolve()
        self.clock = task.Clock() if self.useClock else None
        writeUsers(self.dataDir, self.users)
        return self.startServer()

    @defer.inlineCallbacks
    def startServer(self, syncHook=None, **values):
        """
        Start the daemon (again, after L{stopServer}) with the class's
        settings, changed by C{values}.
        """
        settings = {"limits": self.limits, **self.configValues, **values}
        self.config = makeConfig(self.dataDir, self.listeners, **settings)
        self.service = MailService(self.config, reactor, syncHook=syncHook, clock=self.clock)
        self.service.startService()
        self.addCleanup(self.stopServer)
        yield defer.gatherResults([lst.ready for lst in self.service.listeners.values()])

    def stopServer(self):
        service, self.service = getattr(self, "service", None), None
        if service is not None and service.running:
            return service.stopService()
        return None

    def port(self, name: str = "smtp") -> int:
        return self.service.port(name)

    def sessions(self, name: str = "smtp") -> list:
        """
        The open sessions of listener C{name}.
        """
        factory = self.service.listeners[name].factory
        return list(getattr(factory, "wrappedFactory", factory).sessions)

    def sendAndWait(self, client: "RawClient", data: bytes, name: str = "smtp") -> defer.Deferred:
        """
        Send C{data} and wait until the server has read it (its sockets
        hold nothing unread): then advancing C{self.clock} happens after
        the server saw the data, as with a real client.
        """

        def unread() -> int:
            total = 0
            for session in self.sessions(name):
                handle = session.transport.getHandle()
                total += struct.unpack("i", fcntl.ioctl(handle.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            return total

        d = self.inThread(client.send, data)
        d.addCallback(lambda _: waitUntil(lambda: unread() == 0))
        return d

    @defer.inlineCallbacks
    def trickle(self, client: "RawClient", pieces: list[bytes], step: float, name: str = "smtp"):
        """
        Send C{pieces} one by one, C{step} seconds of C{self.clock} apart,
        while the server keeps the session open.

        @return: (a Deferred firing with) how many pieces were sent.
        """
        sent = 0
        for piece in pieces:
            [session] = self.sessions(name)
            if session.transport.disconnecting:
                break
            yield self.sendAndWait(client, piece, name)
            self.clock.advance(step)
            sent += 1
        return sent

    @defer.inlineCallbacks
    def delayedReply(self, send: Callable[[], Any]):
        """
        Run C{send} (a client call that waits for a reply) in a thread, and
        check that the server answers only after a delay on C{self.clock}
        (the login throttle's).

        @return: (a Deferred firing with) the reply and the delay.
        """
        before = set(self.clock.getDelayedCalls())
        replied = self.inThread(send)

        def added():
            return [call for call in self.clock.getDelayedCalls() if call not in before and call.active()]

        yield waitUntil(lambda: replied.called or any(added()))
        self.assertFalse(replied.called, "answered without a delay")
        [call] = added()
        delay = call.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        reply = yield replied
        return reply, delay

    def inThread(self, f, *args, **kwargs) -> defer.Deferred:
        """
        Run a blocking client in a thread while the reactor serves it.
        """
        return threads.deferToThread(f, *args, **kwargs)

    def inSession(self, open: Callable[[], "RawClient"], f: Callable[["RawClient"], Any]) -> defer.Deferred:
        """
        In a thread: open a client session, run C{f} with it, close it.
        """

        def run():
            client = open()
            try:
                return f(client)
            finally:
                client.close()

        return self.inThread(run)

    def maildir(self, address: str, folder: str = "") -> Path:
        local, _, domain = address.partition("@")
        return self.dataDir / "mail" / domain / local / folder

    def messages(self, address: str, folder: str = "") -> list[Path]:
        """
        The message files of a folder, new/ and cur/, oldest first.
        """
        root = self.maildir(address, folder)
        files = [p for sub in ("new", "cur") for p in (root / sub).glob("*") if p.is_file()]
        return sorted(files, key=deliveryOrder)


def deliveryOrder(path: Path) -> tuple[int, int, int]:
    """
    Sort key for our message file names, <sec>.M<usec>P<pid>Q<seq>...:
    the numbers, not their text ("M99999" comes before "M100000").
    """
    match = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", path.name)
    return tuple(int(n) for n in match.groups()) if match else (0, 0, 0)


def clientContext(service: MailService, minimum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """
    A client TLS context that trusts only the local CA of the daemon (the
    one that signed its certificate), verifying the host name.
    """
    context = ssl.create_default_context(cafile=str(service.localCA.certPath))
    if minimum is not None:
        context.minimum_version = minimum
    return context


class RawClient:
    """
    A blocking line-oriented socket client for byte-exact protocol tests.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 10):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readLine(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def readReply(self) -> tuple[int, list[bytes]]:
        """
        One SMTP reply: its code and its lines' texts.
        """
        lines = []
        while True:
            line = self.readLine()
            lines.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes) -> tuple[int, list[bytes]]:
        self.send(line + b"\r\n")
        return self.readReply()

    def startTLS(self, context: ssl.SSLContext, hostname: str = "mx.test") -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)

    def closed(self, wait: float = 5.0) -> bool:
        """
        Whether the server closes the connection within C{wait} seconds
        (what it still sends is kept in the buffer).
        """
        self.sock.settimeout(wait)
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False

    def rest(self, wait: float = 5.0) -> tuple[bytes, bool]:
        """
        All the server still sends, and whether it then closes the
        connection (within C{wait} seconds).
        """
        closed = self.closed(wait)
        return self.buffer, closed

    def close(self) -> None:
        self.sock.close()


def spoolMessages(dataDir: Path) -> list[str]:
    """
    The messages left in the spool (the empty files it makes ahead of need
    are not messages).
    """
    names = []
    try:
        entries = list(os.scandir(dataDir / "tmp"))
    except FileNotFoundError:
        return names
    for entry in entries:
        try:
            if entry.stat().st_size:
                names.append(entry.name)
        except FileNotFoundError:
            pass  # removed since the listing (a delivery finishing): not left
    return sorted(names)


@defer.inlineCallbacks
def waitUntil(condition: Callable[[], bool], timeout: float = 10.0):
    """
    Let the reactor run until C{condition()} holds (a reply written, a
    timer set: what the server does in its own time); fail after
    C{timeout} seconds.  Never a measure of time.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {condition}")
        yield task.deferLater(reactor, 0.005, lambda: None)


@defer.inlineCallbacks
def waitForEmptySpool(dataDir: Path, timeout: float = 5.0):
    """
    Wait (spool files are removed by a worker thread) until no message is
    left in the spool, or the timeout passes; return what is left.
    """
    deadline = time.monotonic() + timeout
    while spoolMessages(dataDir) and time.monotonic() < deadline:
        yield task.deferLater(reactor, 0.02, lambda: None)
    return spoolMessages(dataDir)


def waitFor(condition, timeout: float = 30.0, what: str = "condition"):
    """
    Wait (blocking: for tests that drive other processes from the test's
    thread) until C{condition()} gives a true value, and return it; fail
    after C{timeout} seconds, naming C{what} was awaited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitForPort(port: int, process=None, timeout: float = 30.0) -> None:
    """
    Wait (blocking) until something listens on C{port} of 127.0.0.1;
    fail at once if C{process} (a C{subprocess.Popen}) has exited, with
    its output when it was piped.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout is not None else ""
            raise AssertionError(f"exited with {process.returncode}: {output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")



class IMAPClient(RawClient):
    """
    A blocking IMAP client speaking raw bytes: each response is returned
    as one byte string with its literals inlined.
    """

    def readResponse(self) -> bytes:
        """
        One response line, with the literals it announces read into it.
        """
        line = self.readLine()
        while line.endswith(b"}") and b"{" in line:
            size = line[line.rindex(b"{") + 1 : -1]
            if not size.isdigit():
                break
            line += b"\r\n" + self.readExactly(int(size))
            line += self.readLine()
        return line

    def readExactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def readUntilTagged(self, tag: bytes) -> tuple[list[bytes], bytes]:
        """
        The untagged responses up to the tagged one, and the tagged one.
        """
        untagged = []
        while True:
            line = self.readResponse()
            if line.startswith(tag + b" "):
                return untagged, line
            untagged.append(line)

    def command(self, line: bytes, tag: bytes | None = None) -> tuple[list[bytes], bytes]:
        """
        Send C{tag line} and read up to its tagged response.
        """
        if tag is None:
            tag = line.split(b" ", 1)[0]
            self.send(line + b"\r\n")
        else:
            self.send(tag + b" " + line + b"\r\n")
        return self.readUntilTagged(tag)

    def login(self, user: str = "alice@localhost", password: str = PASSWORD) -> bytes:
        _, tagged = self.command(b'L LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        assert tagged.startswith(b"L OK"), tagged
        return tagged


class IMAPTestCase(ServerTestCase):
    """
    A running daemon with IMAP, and raw IMAP sessions in threads.
    """

    listeners = ("smtp", "imap", "imaps")

    def connect(self, login: bool = True, user: str = "alice@localhost") -> IMAPClient:
        client = IMAPClient(self.port("imap"))
        greeting = client.readLine()
        assert greeting.startswith(b"* OK"), greeting
        if login:
            client.login(user)
        return client

    def session(self, f, login: bool = True, select: bytes | None = None):
        """
        Run C{f(client)} in a thread on a new session (logged in, and with
        C{select} selected when given); the session is closed afterwards.
        """

        def run():
            client = self.connect(login)
            try:
                if select is not None:
                    _, tagged = client.command(b"S SELECT " + select)
                    assert tagged.startswith(b"S OK"), tagged
                return f(client)
            finally:
                client.close()

        return self.inThread(run)

    @defer.inlineCallbacks
    def deliver(self, *messages: bytes, rcpt: str = "alice@localhost"):
        """
        Deliver C{messages} through the store, one by one, as SMTP does.
        """
        for message in messages:
            incoming = self.service.store.incoming()
            incoming.write(message)
            yield self.service.store.deliver(incoming, [rcpt])


def sampleMessage(subject: str = "Hello", body: str = "Hi there.\r\n", sender: str = "carol@remote.test") -> bytes:
    return (
        f"From: Carol <{sender}>\r\nTo: alice@localhost\r\nSubject: {subject}\r\n"
        f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n{body}"
    ).encode("utf-8")


def countListings(folder) -> list[str]:
    """
    Make C{folder} (a L{maild.store.folder.Folder}) record each directory
    it lists (C{"new"} or C{"cur"}) in the list returned.
    """
    listed: list[str] = []
    listDir = folder._listDir

    def counted(sub):
        listed.append(sub)
        return listDir(sub)

    folder._listDir = counted
    return listed
