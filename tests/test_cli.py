"""
The maild command: users, configuration check, and the send client
against a running server.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from maild import cli
from maild.accounts import Accounts
from tests.support import ServerTestCase

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, io.StringIO(stdin), out, err)
    return status, out.getvalue(), err.getvalue()


class UserCommandTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.data = Path(self.mktemp())

    def maild(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        return run(["--data-dir", str(self.data), *argv], stdin)

    def test_addListPasswdDel(self):
        """
        user add hashes the password read from stdin and creates the
        Maildir; list, passwd and del do what they say.
        """
        status, out, _ = self.maild("user", "add", "alice", "--password-stdin", stdin="s3cret\n")
        self.assertEqual((status, out), (0, "added alice@localhost\n"))
        self.assertTrue((self.data / "mail/localhost/alice/cur").is_dir())
        self.assertTrue((self.data / "mail/localhost/alice/.Sent/cur").is_dir())
        accounts = Accounts(self.data / "users")
        self.assertTrue(accounts.verify("alice@localhost", "s3cret"))
        self.assertNotIn("s3cret", (self.data / "users").read_text())
        self.assertEqual(self.maild("user", "list")[1], "alice@localhost\n")
        self.assertEqual(self.maild("user", "passwd", "alice@localhost", "--password-stdin", stdin="n3w\n")[0], 0)
        self.assertTrue(Accounts(self.data / "users").verify("alice@localhost", "n3w"))
        self.assertEqual(self.maild("user", "del", "alice@localhost")[0], 0)
        self.assertEqual(self.maild("user", "list")[1], "")

    def test_addAsRootKeepsOwnership(self):
        """
        Run as root on a data folder another user owns (the daemon's user,
        which Dovecot's processes run as too), user add keeps the users
        file's owner and mode (its lock file takes the same owner), and the
        new Maildir, the folders above it and its files belong to the data
        folder's owner.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("changing owners needs root")
        self.data.mkdir(parents=True)
        os.chown(self.data, 8, 8)
        users = self.data / "users"
        users.write_text("")
        os.chown(users, 8, 12)
        os.chmod(users, 0o640)
        self.assertEqual(self.maild("user", "add", "alice", "--password-stdin", stdin="pw\n")[0], 0)
        self.assertEqual(self.maild("user", "passwd", "alice", "--password-stdin", stdin="pw2\n")[0], 0)
        st = os.stat(users)
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o7777), (8, 12, 0o640))
        lock = os.stat(self.data / "users.lock")
        self.assertEqual((lock.st_uid, lock.st_gid), (8, 12))
        made = [self.data / "mail", self.data / "mail/localhost"]
        for top, dirs, files in os.walk(self.data / "mail/localhost/alice"):
            made += [Path(top)] + [Path(top) / name for name in files]
        self.assertIn(self.data / "mail/localhost/alice/.Sent/cur", made)
        self.assertEqual({(p, os.stat(p).st_uid, os.stat(p).st_gid) for p in made}, {(p, 8, 8) for p in made})

    def test_newUsersFileOwnedLikeDataFolder(self):
        """
        A users file that user add creates, as root, belongs to the data
        folder's owner, mode 0600.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("changing owners needs root")
        self.data.mkdir(parents=True)
        os.chown(self.data, 8, 8)
        self.assertEqual(self.maild("user", "add", "alice", "--password-stdin", stdin="pw\n")[0], 0)
        st = os.stat(self.data / "users")
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o7777), (8, 8, 0o600))

    def test_refusals(self):
        """
        Names that could escape the data folder, other domains, duplicates
        and empty passwords are refused with a clear message and status 1.
        """
        self.maild("user", "add", "alice", "--password-stdin", stdin="pw\n")
        for name, message in (
            ("../evil", "invalid user name"),
            ("a/b@localhost", "invalid user name"),
            ("x\x00y@localhost", "invalid user name"),
            ("x@../localhost", "invalid domain"),
            ("%s@localhost" % ("a" * 65), "longer than 64"),
            ("bob@elsewhere.test", "not a local domain"),
            ("alice@localhost", "exists already"),
        ):
            status, _, err = self.maild("user", "add", name, "--password-stdin", stdin="pw\n")
            self.assertEqual(status, 1, name)
            self.assertIn(message, err, name)
        status, _, err = self.maild("user", "add", "carol", "--password-stdin", stdin="\n")
        self.assertEqual(status, 1)
        self.assertIn("empty password", err)
        self.assertEqual(sorted(os.listdir(self.data / "mail/localhost")), ["alice"])


class CertCommandTests(unittest.SynchronousTestCase):
    def test_makeShowRenew(self):
        """
        cert makes a certificate signed by the local CA for the host name (with
        subjectAltName) in the data folder, shows its fingerprint, keeps it
        on the next call, and replaces it with --renew.
        """
        from cryptography import x509

        data = Path(self.mktemp()).resolve()
        config = data.parent / "maild.toml"
        data.mkdir(parents=True)
        config.write_text(f'data_dir = "{data}"\nhostname = "mail.example.org"\n')
        status, out, _ = run(["--config", str(config), "cert"])
        self.assertEqual(status, 0)
        certPath = data / "tls/cert.pem"
        self.assertIn(f"certificate {certPath}", out)
        self.assertEqual((data / "tls/key.pem").stat().st_mode & 0o777, 0o600)
        certificate = x509.load_pem_x509_certificate(certPath.read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("mail.example.org", names.get_values_for_type(x509.DNSName))
        self.assertEqual(run(["--config", str(config), "cert"])[1], out)
        renewed = run(["--config", str(config), "cert", "--renew"])[1]
        self.assertNotEqual(renewed.splitlines()[2], out.splitlines()[2])


    def test_exportCA(self):
        """
        cert --ca prints the local CA's certificate (what a user imports
        once on each device); cert shows the server certificate's
        fingerprint, not the CA's; --renew replaces the server certificate
        and keeps the CA.
        """
        from maild.tls import fingerprint

        data = Path(self.mktemp()).resolve()
        status, exported, _ = run(["--data-dir", str(data), "cert", "--ca"])
        self.assertEqual(status, 0)
        self.assertEqual(exported, (data / "tls/ca.pem").read_text())
        self.assertTrue(exported.startswith("-----BEGIN CERTIFICATE-----"))
        shown = run(["--data-dir", str(data), "cert"])[1]
        self.assertIn(f"SHA-256     {fingerprint(data / 'tls/cert.pem')}\n", shown)
        self.assertNotIn(fingerprint(data / "tls/ca.pem"), shown)
        self.assertIn(f"signed by   {data / 'tls/ca.pem'}", shown)
        run(["--data-dir", str(data), "cert", "--renew"])
        self.assertEqual(run(["--data-dir", str(data), "cert", "--ca"])[1], exported)
        self.assertNotEqual(run(["--data-dir", str(data), "cert"])[1], shown)

    def test_unwritableDataFolder(self):
        """
        A data folder where the certificate cannot be made gets one error
        line, not a traceback.
        """
        blocker = Path(self.mktemp())
        blocker.write_text("a file where the data folder should be")
        status, _, err = run(["--data-dir", str(blocker / "data"), "cert"])
        self.assertEqual(status, 1)
        self.assertRegex(err, r"^error: .*data.*: Not a directory\n$")

    def test_configuredCertificate(self):
        """
        With certificate files configured, cert shows them, and --ca and
        --renew refuse (maild never changes configured files).
        """
        from tests.test_certificates import writeOldSelfSigned

        folder = Path(self.mktemp()).resolve()
        writeOldSelfSigned(folder / "files", "mx.test")
        config = folder / "maild.toml"
        config.write_text('data_dir = "data"\n[tls]\ncert = "files/cert.pem"\nkey = "files/key.pem"\n')
        before = (folder / "files/cert.pem").read_bytes()
        status, out, _ = run(["--config", str(config), "cert"])
        self.assertEqual(status, 0)
        self.assertIn(f"certificate {folder / 'files/cert.pem'}", out)
        for option in ("--ca", "--renew"):
            status, _, err = run(["--config", str(config), "cert", option])
            self.assertEqual(status, 1)
            self.assertIn("maild has no local CA", err)
        self.assertEqual((folder / "files/cert.pem").read_bytes(), before)
        self.assertFalse((folder / "data/tls").exists())


class CheckCommandTests(unittest.SynchronousTestCase):
    def test_goodAndBad(self):
        """
        check prints a summary and exits 0 for a good configuration, and
        prints each problem and exits 1 for a bad one.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        good = folder / "good.toml"
        good.write_text('data_dir = "data"\ndomains = ["example.org"]\n')
        status, out, _ = run(["--config", str(good), "check"])
        self.assertEqual(status, 0)
        self.assertIn("configuration OK", out)
        self.assertIn("smtp: tcp:8025", out)
        bad = folder / "bad.toml"
        bad.write_text('domains = ["example.org"]\nflavour = 1\n[listen]\nsmtp = "tcp:notaport"\n')
        status, _, err = run(["--config", str(bad), "check"])
        self.assertEqual(status, 1)
        self.assertIn("error: flavour: unknown key", err)
        self.assertIn("error: listen.smtp: bad endpoint string", err)

    def test_commandLine(self):
        """
        The installed entry point runs: `python -m maild.cli check`.
        """
        result = subprocess.run(
            [sys.executable, "-m", "maild.cli", "--config", "/nonexistent.toml", "check"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot read the config file", result.stderr)


class SendCommandTests(ServerTestCase):
    def send(self, argv: list[str], stdin: str) -> defer.Deferred:
        base = ["--data-dir", str(self.dataDir), "send", "--cafile", str(self.service.localCA.certPath)]
        return self.inThread(run, base + argv, stdin)

    @defer.inlineCallbacks
    def test_interactive(self):
        """
        Asked for server, sender, recipients and subject, then the body line
        by line up to a single dot, it sends over STARTTLS (verifying the
        certificate) and prints the server's reply.
        """
        answers = f"127.0.0.1:{self.port()}\ncarol@remote.test\nalice@localhost, bob@example.org\nGreetings\nFirst line\n..dotted\nLast line\n.\nignored\n"
        status, out, err = yield self.send([], answers)
        self.assertEqual(status, 0, err)
        self.assertIn("Server [localhost:8025]: From: To (comma-separated): Subject: ", out)
        self.assertRegex(out, r"250 2\.0\.0 Ok: queued as [0-9A-F]{12}\n$")
        [path] = self.messages("alice@localhost")
        data = path.read_bytes()
        self.assertIn(b"with ESMTPS", data)
        self.assertIn(b"Subject: Greetings\n", data)
        self.assertTrue(data.endswith(b"\n\nFirst line\n..dotted\nLast line\n"))
        self.assertEqual(len(self.messages("bob@example.org")), 1)

    @defer.inlineCallbacks
    def test_scripted(self):
        """
        With options and --body-stdin it asks nothing; a refused recipient is
        reported and the exit status is 1.
        """
        status, out, err = yield self.send(
            ["--server", f"127.0.0.1:{self.port()}", "--from", "carol@remote.test", "--to", "alice@localhost", "--to", "nobody@localhost", "--subject", "Report", "--body-stdin"],
            "Line one\n.\nLine three\n",
        )
        self.assertEqual(status, 1)
        self.assertIn("refused nobody@localhost: 550 5.1.1", err)
        [path] = self.messages("alice@localhost")
        self.assertTrue(path.read_bytes().endswith(b"Line one\n.\nLine three\n"))

    @defer.inlineCallbacks
    def test_certificateVerified(self):
        """
        Without the CA file the self-signed certificate is refused; with
        --insecure it is accepted.
        """
        argv = ["send", "--server", f"127.0.0.1:{self.port()}", "--from", "c@remote.test", "--to", "alice@localhost", "--subject", "s", "--body-stdin"]
        status, _, err = yield self.inThread(run, argv, "x\n")
        self.assertEqual(status, 1)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", err)
        status, _, err = yield self.inThread(run, argv + ["--insecure"], "x\n")
        self.assertEqual(status, 0, err)
