"""
Running maild for real: the systemd units (checked by systemd-analyze and
run with systemd's socket activation), and the fail2ban filter matched
against the daemon's real log.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import shutil
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from tests.support import PASSWORD, freePort, writeUsers
from tests.test_daemon import ROOT, Daemon, listenOnly, waitForPort

CONTRIB = ROOT / "contrib"


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise unittest.SkipTest(f"{program} is not installed (Debian: see .ci/run)")
    return path


class SystemdTests(unittest.TestCase):
    def test_unitsVerify(self):
        """
        The service and socket units pass systemd-analyze verify with no
        warning (run against this machine's twistd instead of /opt/maild).
        """
        need("systemd-analyze")
        units = Path(self.mktemp()).resolve()
        units.mkdir()
        for path in (CONTRIB / "systemd").glob("maild*"):
            text = path.read_text()
            if path.suffix == ".service":
                self.assertIn("ExecStart=/opt/maild/.venv/bin/twistd ", text)
                text = text.replace("/opt/maild/.venv/bin/twistd", str(Path(sys.executable).with_name("twistd")))
                for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "User=maild", "CapabilityBoundingSet=\n"):
                    self.assertIn(setting, text)
            (units / path.name).write_text(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in units.glob("*.s*"))],
            capture_output=True,
            text=True,
            cwd=units,
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_socketActivation(self):
        """
        With the listeners given as systemd: endpoints by name, as in
        contrib/systemd/maild.toml, maild adopts the sockets systemd opened
        (here systemd-socket-activate) and serves on them.
        """
        need("systemd-socket-activate")
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        writeUsers(folder / "data", {"alice@localhost": PASSWORD})
        ports = {name: freePort() for name in ("smtp", "imap", "http")}
        example = (CONTRIB / "systemd" / "maild.toml").read_text()
        listen = example[example.index("[listen]") : example.index("[tls]")]
        for name in ("submission", "smtps", "pop3", "pop3s", "imaps", "https"):
            listen = re.sub(rf'^{name} = .*$', f'{name} = "none"', listen, flags=re.M)
        (folder / "maild.toml").write_text(
            f'data_dir = "{folder / "data"}"\nhostname = "mx.test"\ndomains = ["localhost"]\n'
            + listen.replace("domain=INET6", "domain=INET")
        )
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        process = subprocess.Popen(
            ["systemd-socket-activate"]
            + [f"--listen=127.0.0.1:{port}" for port in ports.values()]
            + ["--fdname=" + ":".join(ports), "-E", f"PYTHONPATH={ROOT}"]
            + twistd
            + ["-n", "--pidfile=", "maild", "--config", str(folder / "maild.toml")],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # The first connection starts the daemon, which then takes it.
            waitForPort(ports["smtp"], process)
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
                client.sendmail("bob@example.org", ["alice@localhost"], b"Subject: activated\r\n\r\nhi\r\n")
            imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
            imap.login("alice@localhost", PASSWORD)
            _, data = imap.select("INBOX")
            imap.logout()
            self.assertEqual(data, [b"1"])
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/healthz", timeout=30) as r:
                self.assertEqual(r.status, 200)
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=30)
        self.assertIn("smtp listening on systemd:domain=INET:name=smtp", output)


class Fail2banTests(unittest.TestCase):
    def test_filterMatchesRealLog(self):
        """
        The fail2ban filter finds every failed login in the log of a real
        daemon, over IMAP, POP3 and submission, with the client's address;
        a successful login is not matched.
        """
        need("fail2ban-regex")
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        writeUsers(folder / "maildata", {"alice@localhost": PASSWORD})
        ports = {name: freePort() for name in ("imap", "pop3", "submission")}
        log = folder / "twistd.log"
        (folder / "maild.toml").write_text(
            "[limits]\nauth_failure_delay = 0.01\nauth_failure_delay_max = 0.01\n"
            "[auth]\nsubmission_plaintext = true\n"
        )
        daemon = Daemon(
            folder,
            ["-n", "--logfile", str(log), "maild", "--config", "maild.toml"]
            + listenOnly(**{n: f"tcp:{p}:interface=127.0.0.1" for n, p in ports.items()}),
        )
        try:
            for port in ports.values():
                waitForPort(port, daemon.process)
            imap = imaplib.IMAP4("127.0.0.1", ports["imap"])
            self.assertRaises(imaplib.IMAP4.error, imap.login, "alice@localhost", "wrong")
            imap.login("alice@localhost", PASSWORD)
            imap.logout()
            pop = poplib.POP3("127.0.0.1", ports["pop3"])
            pop.user("alice@localhost")
            self.assertRaises(poplib.error_proto, pop.pass_, "wrong")
            pop.close()
            with smtplib.SMTP("127.0.0.1", ports["submission"]) as smtp:
                smtp.ehlo()
                plain = base64.b64encode(b"\0alice@localhost\0wrong").decode()
                self.assertEqual(smtp.docmd("AUTH", "PLAIN " + plain)[0], 535)
            deadline = time.monotonic() + 10
            while log.read_text().count("login failed") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            daemon.stop()
        text = log.read_text()
        failures = text.count("login failed")
        self.assertEqual(failures, 3, text)
        result = subprocess.run(
            ["fail2ban-regex", "--print-all-matched", str(log), str(CONTRIB / "fail2ban/filter.d/maild.conf")],
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        matched = re.search(r"Failregex: (\d+) total", result.stdout)
        self.assertEqual(int(matched.group(1)), failures, result.stdout)
        self.assertIn("127.0.0.1", result.stdout)
