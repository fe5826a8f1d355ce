"""
maild sending to a real Postfix (Debian's ``postfix``) as the remote MX:
a private instance, started by the test on loopback with its own config,
queue and mail folders.
"""

from __future__ import annotations

import email
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import dkim
from twisted.internet import defer
from twisted.trial import unittest

from tests.support import PASSWORD, freePort
from tests.test_relay import ALICE, BOB, TwoServersTestCase, dkimRecords, outgoing

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
myhostname = mx.b.test
mydomain = b.test
myorigin = b.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = b.test
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = inline:{{ bob@b.test=bob/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
smtputf8_enable = no
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PrivatePostfix:
    """
    A Postfix instance of its own in C{root}, receiving for b.test on a
    loopback port into C{root/mail/bob/} (Maildir).
    """

    def __init__(self, root: Path, cert: Path, key: Path) -> None:
        self.root = root
        self.port = freePort()
        owner = pwd.getpwnam("postfix")
        for sub in ("queue", "data", "mail"):
            (root / sub).mkdir(parents=True)
        os.chown(root / "data", owner.pw_uid, owner.pw_gid)
        os.chown(root / "mail", owner.pw_uid, owner.pw_gid)
        (root / "main.cf").write_text(
            MAIN_CF.format(root=root, uid=owner.pw_uid, gid=owner.pw_gid, cert=cert, key=key)
        )
        (root / "master.cf").write_text(MASTER_CF.format(port=self.port))

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.root), *args], capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        result = self.postfix("start")
        if result.returncode != 0:
            raise AssertionError(f"postfix did not start: {result.stdout}{result.stderr}{self.log()}")

    def stop(self) -> None:
        self.postfix("stop")

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mailOf(self, user: str) -> list[bytes]:
        folder = self.root / "mail" / user
        return [p.read_bytes() for sub in ("new", "cur") for p in sorted((folder / sub).glob("*"))]


class PostfixTests(TwoServersTestCase):
    def setUp(self):
        super().setUp()
        if shutil.which("postfix") is None:
            raise unittest.SkipTest("Postfix is not installed (Debian package postfix)")
        if os.geteuid() != 0:
            raise unittest.SkipTest("a private Postfix instance needs root to start")

    @defer.inlineCallbacks
    def test_deliveryToPostfix(self):
        """
        A delivers to Postfix as the MX for b.test: over STARTTLS (Postfix
        logs the TLS connection), DKIM signatures that verify with dkimpy,
        and Postfix's "550 5.1.1 User unknown" for another recipient comes
        back to the sender as a report.
        """
        a = yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD}, listeners=("submission",))
        # Short: Postfix's sockets live under it (a UNIX socket path is at
        # most 107 octets).
        root = Path(tempfile.mkdtemp(prefix="maild-pf-"))
        root.chmod(0o755)
        self.addCleanup(shutil.rmtree, root, True)
        postfix = PrivatePostfix(root / "pf", a.tls.certPath, a.tls.keyPath)
        postfix.start()
        self.addCleanup(postfix.stop)
        yield self.stopMaild("a")
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD}, listeners=("submission",),
            relay={"routes": {"b.test": f"127.0.0.1:{postfix.port}"}, "scan_interval": 0.05, "retry_first": 3600.0},
        )
        yield self.submit(a, [BOB, "nobody@b.test"], outgoing("To Postfix"))
        yield self.waitFor(lambda: postfix.mailOf("bob") and self.mailOf(a, ALICE) and not a.relay.entries, timeout=60)
        [received] = postfix.mailOf("bob")
        self.assertEqual(email.message_from_bytes(received)["Subject"], "To Postfix")
        records = dkimRecords(self.cli(a, "dns", "a.test"))
        verifier = dkim.DKIM(received.replace(b"\n", b"\r\n"))
        self.assertEqual(
            [verifier.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name)) for i in range(2)],
            [True, True],
        )
        self.assertIn("TLS connection established from localhost[127.0.0.1]", postfix.log())
        report = self.mailOf(a, ALICE)[0].decode()
        self.assertIn("Final-Recipient: rfc822; nobody@b.test", report)
        self.assertIn("Status: 5.1.1", report)
        self.assertIn("User unknown in virtual mailbox table", report)
        lines = sorted(self.deliveryLines())
        self.assertIn(f"to=<{BOB}> relay=127.0.0.1[127.0.0.1]:{postfix.port} status=sent dsn=2.0.0", lines[0])
        self.assertIn("to=<nobody@b.test>", lines[1])
        self.assertIn("status=bounced dsn=5.1.1", lines[1])
