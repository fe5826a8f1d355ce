"""
A maild and a private Dovecot serving one data folder, for the tests of
moving between the two (tests/test_dovecot.py), and what each server shows
of a mailbox over IMAP and POP3.

Dovecot never gives mail access to root, so both servers run as one
dedicated system user (C{mail}) who owns the data folder: Dovecot's mail
processes through C{mail_uid}, maild as a child process started under that
user.  Needs root and Debian's C{dovecot-imapd} and C{dovecot-pop3d}.
"""

from __future__ import annotations

import hashlib
import imaplib
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import freePort

DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
DOVEADM = shutil.which("doveadm", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
# The system user both servers run as.
MAIL_USER = "mail"
WORKTREE = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


def unavailable() -> str | None:
    """
    Why the servers cannot be started here, or None.
    """
    if DOVECOT is None or DOVEADM is None:
        return "Dovecot is not installed (apt-get install dovecot-imapd dovecot-pop3d)"
    if not os.path.exists("/usr/lib/dovecot/imap") or not os.path.exists("/usr/lib/dovecot/pop3"):
        return "Dovecot's IMAP or POP3 server is missing (apt-get install dovecot-imapd dovecot-pop3d)"
    if os.geteuid() != 0:
        return "starting Dovecot with mail processes under a dedicated user needs root"
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        return f"no system user {MAIL_USER!r} to run the servers as"
    if daemonPython() is None:
        return f"no Python interpreter that user {MAIL_USER!r} may run can import maild"
    return None


_python: list[str | None] = []


def daemonPython() -> str | None:
    """
    An interpreter the dedicated user can run with maild's dependencies:
    this one, or (when this one lives where that user cannot go, as under
    /root) the system's interpreter of the same version, given this one's
    packages.
    """
    if _python:
        return _python[0]
    found = None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}"):
        if not os.path.exists(candidate):
            continue
        try:
            check = subprocess.run(
                [candidate, "-c", "import maild.service, twisted.mail.imap4"],
                env=daemonEnvironment(),
                user=MAIL_USER,
                group=MAIL_USER,
                cwd="/",
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if check.returncode == 0:
            found = candidate
            break
    _python.append(found)
    return found


def daemonEnvironment() -> dict[str, str]:
    paths = [str(WORKTREE)] + [p for p in sys.path if p.endswith("site-packages")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1")


def waitForPort(port: int, process: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Site:
    """
    A data folder owned by the dedicated user, with a maild and a Dovecot
    that can each be started and stopped over it.
    """

    def __init__(self) -> None:
        self.user = pwd.getpwnam(MAIL_USER)
        self.root = Path(tempfile.mkdtemp(prefix="maild-dovecot-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.data.mkdir()
        os.chown(self.data, self.user.pw_uid, self.user.pw_gid)
        self.dovecotDir = self.root / "dovecot"
        self.dovecotDir.mkdir()
        self.mailPorts = {"imap": freePort(), "pop3": freePort(), "smtp": freePort()}
        self.dovecotPorts = {"imap": freePort(), "pop3": freePort()}
        self.maild: subprocess.Popen | None = None
        self.dovecotRunning = False
        self.maildLog = self.root / "maild.log"
        self.dovecotLog = self.dovecotDir / "dovecot.log"

    # maild ------------------------------------------------------------------

    def maildCommand(self, *args: str, input: str | None = None, asRoot: bool = True) -> str:
        """
        Run the C{maild} command line on the data folder (as root, as an
        administrator would, unless not C{asRoot}).
        """
        command = [sys.executable if asRoot else daemonPython(), "-m", "maild.cli", "--data-dir", str(self.data), *args]
        extra = {} if asRoot else {"user": MAIL_USER, "group": MAIL_USER}
        result = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            env=daemonEnvironment(),
            cwd=self.root,
            timeout=120,
            **extra,
        )
        if result.returncode != 0:
            raise RuntimeError(f"maild {' '.join(args)}: {result.stderr}")
        return result.stdout

    def addUser(self, address: str, password: str = PASSWORD) -> None:
        self.maildCommand("user", "add", address, "--password-stdin", input=password + "\n")

    def startMaild(self, *extra: str) -> None:
        listeners = []
        for name in ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps"):
            port = self.mailPorts.get(name)
            endpoint = f"tcp:{port}:interface=127.0.0.1" if port else "none"
            listeners += [f"--{name}", endpoint]
        log = open(self.maildLog, "ab")
        self.maild = subprocess.Popen(
            [
                daemonPython(),
                "-m",
                "twisted",
                "maild",
                "--data-dir",
                str(self.data),
                "--hostname",
                "mx.test",
                "--domain",
                "localhost",
                *listeners,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=daemonEnvironment(),
            cwd=self.data,
            user=MAIL_USER,
            group=MAIL_USER,
        )
        log.close()
        for port in self.mailPorts.values():
            waitForPort(port, self.maild)

    def stopMaild(self) -> None:
        if self.maild is not None:
            self.maild.send_signal(signal.SIGTERM)
            try:
                self.maild.wait(30)
            except subprocess.TimeoutExpired:
                self.maild.kill()
                self.maild.wait()
            self.maild = None

    def maildTracebacks(self) -> list[str]:
        text = self.maildLog.read_text("utf-8", "replace") if self.maildLog.exists() else ""
        return [line for line in text.splitlines() if "Traceback" in line]

    # Dovecot ----------------------------------------------------------------

    def dovecotConfig(self) -> str:
        """
        Dovecot's configuration for maild's data folder: what README.rst's
        "Moving from or to Dovecot" gives, on private ports and paths.
        """
        d = self.dovecotDir
        mail = self.data / "mail"
        return f"""\
base_dir = {d}/base
state_dir = {d}/state
instance_name = maild-dovecot-{self.dovecotPorts['imap']}
protocols = imap pop3
listen = 127.0.0.1
log_path = {self.dovecotLog}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {self.user.pw_uid}
first_valid_gid = {self.user.pw_gid}
mail_uid = {self.user.pw_uid}
mail_gid = {self.user.pw_gid}
mail_location = maildir:{mail}/%d/%n
mail_plugins = $mail_plugins listescape
plugin {{
  listescape_char = "~"
}}
passdb {{
  driver = passwd-file
  args = username_format=%u {self.data}/users
}}
userdb {{
  driver = static
  args = home={mail}/%d/%n
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Archive {{
    special_use = \\Archive
  }}
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
service auth {{
  user = {MAIL_USER}
}}
service auth-worker {{
  user = {MAIL_USER}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.dovecotPorts['imap']}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.dovecotPorts['pop3']}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""

    def startDovecot(self) -> None:
        conf = self.dovecotDir / "dovecot.conf"
        conf.write_text(self.dovecotConfig())
        # Dovecot's daemon keeps its standard streams: a pipe would never end.
        errors = self.dovecotDir / "start.err"
        with open(errors, "wb") as err:
            result = subprocess.run(
                [DOVECOT, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=60
            )
        if result.returncode != 0:
            raise RuntimeError(f"dovecot did not start: {errors.read_text()}")
        self.dovecotRunning = True
        for port in self.dovecotPorts.values():
            waitForPort(port)

    def stopDovecot(self) -> None:
        if not self.dovecotRunning:
            return
        conf = self.dovecotDir / "dovecot.conf"
        pidFile = self.dovecotDir / "base" / "master.pid"
        pid = int(pidFile.read_text()) if pidFile.exists() else None
        subprocess.run(
            [DOVEADM, "-c", str(conf), "stop"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.dovecotRunning = False

    def dovecotProblems(self) -> list[str]:
        """
        Dovecot's warnings and errors about the data (duplicate UIDs,
        broken files), from its log.
        """
        if not self.dovecotLog.exists():
            return []
        return [
            line
            for line in self.dovecotLog.read_text("utf-8", "replace").splitlines()
            if ("Error" in line or "Warning" in line or "Panic" in line)
            and "SIGHUP" not in line
        ]

    def doveadmPassword(self, scheme: str, password: str = PASSWORD) -> str:
        result = subprocess.run(
            [DOVEADM, "-c", str(self.dovecotDir / "dovecot.conf"), "pw", "-s", scheme, "-p", password],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return result.stdout.strip()

    def cleanUp(self) -> None:
        self.stopMaild()
        self.stopDovecot()
        if os.environ.get("MAILD_DOVECOT_KEEP"):
            print(f"\nkept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # Clients ----------------------------------------------------------------

    def imap(self, server: str, user: str = "alice@localhost", password: str = PASSWORD) -> imaplib.IMAP4:
        ports = self.mailPorts if server == "maild" else self.dovecotPorts
        client = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=60)
        client.login(user, password)
        return client

    def pop3(self, server: str, user: str = "alice@localhost", password: str = PASSWORD) -> poplib.POP3:
        ports = self.mailPorts if server == "maild" else self.dovecotPorts
        client = poplib.POP3("127.0.0.1", ports["pop3"], timeout=60)
        client.user(user)
        client.pass_(password)
        return client

    def smtpDeliver(self, message: bytes, rcpt: str = "alice@localhost") -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", self.mailPorts["smtp"], timeout=60) as smtp:
            smtp.sendmail("carol@remote.test", [rcpt], message)


# What a server shows ----------------------------------------------------------


@dataclass
class MessageView:
    uid: int
    flags: frozenset[str]
    size: int
    internalDate: str
    digest: str = ""
    messageId: str = ""


@dataclass
class FolderView:
    uidvalidity: int
    uidnext: int
    exists: int
    messages: dict[int, MessageView] = field(default_factory=dict)


@dataclass
class MailboxView:
    """
    Everything one server shows of one user's mailbox.
    """

    folders: dict[str, FolderView]
    listed: dict[str, frozenset[str]]
    subscribed: frozenset[str]
    uidls: list[str]


_LIST_LINE = re.compile(rb'^\((?P<attrs>[^)]*)\) (?:"[^"]*"|NIL) (?P<name>.+)$')
_SPECIAL_USE = {"\\archive", "\\drafts", "\\junk", "\\sent", "\\trash", "\\all", "\\flagged"}


def _listed(client: imaplib.IMAP4, command: str) -> dict[str, frozenset[str]]:
    typ, data = getattr(client, command)('""', "*")
    assert typ == "OK", (typ, data)
    out = {}
    for line in data:
        if line is None:
            continue
        if isinstance(line, tuple):
            line = line[0].rsplit(b" ", 1)[0] + b" " + line[1]
        match = _LIST_LINE.match(line)
        assert match, line
        name = match.group("name").decode()
        if name.startswith('"'):
            name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        attrs = {a.lower() for a in match.group("attrs").decode().split()}
        out[name] = frozenset(a for a in attrs if a in _SPECIAL_USE or a in ("\\noselect", "\\nonexistent"))
    return out


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


_STATUS_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT) (\d+)\]")
_FETCH_ITEM = {
    "uid": re.compile(rb"UID (\d+)"),
    "flags": re.compile(rb"FLAGS \(([^)]*)\)"),
    "size": re.compile(rb"RFC822\.SIZE (\d+)"),
    "date": re.compile(rb'INTERNALDATE "([^"]+)"'),
}


def folderView(client: imaplib.IMAP4, name: str, bodies: bool = True) -> FolderView:
    typ, data = client.select(_quote(name), readonly=True)
    assert typ == "OK", (name, typ, data)
    exists = int(data[0])
    codes = {}
    for key in ("UIDVALIDITY", "UIDNEXT"):
        _, values = client.response(key)
        codes[key] = int(values[-1]) if values and values[-1] is not None else 0
    view = FolderView(codes["UIDVALIDITY"], codes["UIDNEXT"], exists)
    if exists:
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
        assert typ == "OK", data
        for line in data:
            if isinstance(line, tuple):
                line = line[0]
            uid = int(_FETCH_ITEM["uid"].search(line).group(1))
            flags = frozenset(
                f for f in _FETCH_ITEM["flags"].search(line).group(1).decode().split() if f != "\\Recent"
            )
            view.messages[uid] = MessageView(
                uid,
                flags,
                int(_FETCH_ITEM["size"].search(line).group(1)),
                _FETCH_ITEM["date"].search(line).group(1).decode(),
            )
        if bodies:
            typ, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
            assert typ == "OK", data
            for uid, body in _literals(data):
                message = view.messages[uid]
                message.digest = hashlib.sha256(body).hexdigest()
                found = re.search(rb"(?im)^Message-ID:\s*(<[^>]*>)", body)
                message.messageId = found.group(1).decode() if found else ""
    client.close()
    return view


def _literals(data) -> list[tuple[int, bytes]]:
    """
    (UID, literal) pairs of a FETCH whose one literal is the body; the UID
    may come before or after it.
    """
    out = []
    pending = None
    for item in data:
        if isinstance(item, tuple):
            found = _FETCH_ITEM["uid"].search(item[0])
            if found:
                out.append((int(found.group(1)), item[1]))
            else:
                pending = item[1]
        elif pending is not None and item:
            found = _FETCH_ITEM["uid"].search(item)
            if found:
                out.append((int(found.group(1)), pending))
            pending = None
    return out


def mailboxView(site: Site, server: str, user: str = "alice@localhost", bodies: bool = True) -> MailboxView:
    client = site.imap(server, user)
    try:
        listed = _listed(client, "list")
        subscribed = frozenset(_listed(client, "lsub"))
        folders = {
            name: folderView(client, name, bodies)
            for name, attrs in sorted(listed.items())
            if not attrs & {"\\noselect", "\\nonexistent"}
        }
    finally:
        client.logout()
    pop = site.pop3(server, user)
    try:
        _, lines, _ = pop.uidl()
    finally:
        pop.quit()
    return MailboxView(folders, listed, subscribed, [line.decode() for line in lines])


def uidsByMessageId(client: imaplib.IMAP4, name: str = "INBOX") -> dict[str, int]:
    """
    The UID of each message of a folder, by Message-ID.
    """
    typ, data = client.select(_quote(name), readonly=True)
    assert typ == "OK", data
    out = {}
    if int(data[0]):
        typ, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
        for uid, header in _literals(data):
            found = re.search(rb"(?i)Message-ID:\s*(<[^>]*>)", header)
            if found:
                out[found.group(1).decode()] = uid
    client.close()
    return out


def uidListProblems(folder: Path) -> list[str]:
    """
    What is wrong with a folder's dovecot-uidlist: a file listed twice, a
    UID given twice, records out of order.
    """
    problems = []
    try:
        lines = (folder / "dovecot-uidlist").read_text().splitlines()[1:]
    except FileNotFoundError:
        return problems
    seenBases: dict[str, int] = {}
    seenUids: set[int] = set()
    previous = 0
    for line in lines:
        head, _, name = line.partition(" :")
        uid = int(head.split()[0])
        base = name.split(":2,")[0]
        if base in seenBases:
            problems.append(f"{base} listed as {seenBases[base]} and {uid}")
        if uid in seenUids:
            problems.append(f"UID {uid} given twice")
        if uid <= previous:
            problems.append(f"UID {uid} after {previous}")
        seenBases[base] = uid
        seenUids.add(uid)
        previous = uid
    return problems
