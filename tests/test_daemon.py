"""
The daemon as users run it: twistd with the plugin and with mail.tac,
packaging, and a SIGKILL in the middle of a delivery storm.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

from twisted.trial import unittest

from maild.config import PROTOCOLS
from tests.support import freePort, waitForPort, writeUsers

ROOT = Path(__file__).resolve().parents[1]


def listenOnly(**listeners: str) -> list[str]:
    """
    twistd options that start the given listeners and disable the others,
    so that tests never take the default ports.
    """
    return [f"--{name}={listeners.get(name, 'none')}" for name in PROTOCOLS]


class Daemon:
    """
    twistd running maild in the foreground, in its own folder.
    """

    def __init__(self, folder: Path, args: list[str], env: dict | None = None, preexec_fn=None) -> None:
        self.folder = folder
        environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
            cwd=folder,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=preexec_fn,
        )

    def stop(self, sig=signal.SIGTERM) -> str:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        output, _ = self.process.communicate(timeout=30)
        return output


class PluginTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()

    def test_helpListsEveryOption(self):
        """
        `twistd maild --help` lists every option of the command line.
        """
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "maild", "--help"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ["--config", "--data-dir", "--hostname", "--domain", "--tls-cert", "--tls-key"] + [
            f"--{name}" for name in PROTOCOLS
        ]:
            self.assertIn(option + "=", result.stdout)

    def test_runsInForeground(self):
        """
        `twistd -n maild` listens on the given port, accepts mail for a user
        added with `maild user add`, and stops on SIGTERM.
        """
        port = freePort()
        subprocess.run(
            [sys.executable, "-m", "maild.cli", "user", "add", "alice@localhost", "--password-stdin"],
            input="pw\n",
            text=True,
            check=True,
            cwd=self.folder,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        daemon = Daemon(self.folder, ["-n", "maild", *listenOnly(smtp=f"tcp:{port}:interface=127.0.0.1")])
        try:
            waitForPort(port, daemon.process)
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.sendmail("bob@example.org", ["alice@localhost"], b"Subject: hi\r\n\r\nhello\r\n")
        finally:
            output = daemon.stop()
        # twistd ends itself with the signal it received, as it should.
        self.assertIn(daemon.process.returncode, (0, -signal.SIGTERM), output)
        self.assertEqual(len(os.listdir(self.folder / "maildata/mail/localhost/alice/new")), 1)
        self.assertIn("accepted ", output)
        self.assertIn("Main loop terminated", output)

    def test_tacFile(self):
        """
        `twistd -ny mail.tac` builds the same service from maild.toml,
        under the same CPU policy.
        """
        port = freePort()
        config = self.folder / "maild.toml"
        config.write_text(
            f'data_dir = "data"\n[listen]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n'
            'submission = "none"\nsmtps = "none"\npop3 = "none"\npop3s = "none"\nimap = "none"\nimaps = "none"\nhttp = "none"\nhttps = "none"\n'
        )
        daemon = Daemon(self.folder, ["-ny", str(ROOT / "mail.tac")], {"MAILD_CONFIG": str(config)})
        try:
            waitForPort(port, daemon.process)
            with smtplib.SMTP("127.0.0.1", port) as client:
                code, _ = client.ehlo()
            policy = os.sched_getscheduler(daemon.process.pid)
        finally:
            daemon.stop()
        self.assertEqual(code, 250)
        self.assertEqual(policy, os.SCHED_BATCH)
        self.assertTrue((self.folder / "data").is_dir())

    def test_badConfigurationExits(self):
        """
        A bad configuration stops twistd with the list of problems.
        """
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "maild", "--smtp", "tcp:banana"],
            capture_output=True,
            text=True,
            cwd=self.folder,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("listen.smtp: bad endpoint string 'tcp:banana'", result.stdout + result.stderr)

    def test_portInUseExits(self):
        """
        A listener that cannot bind stops the daemon with a clear message.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            daemon = Daemon(self.folder, ["-n", "maild", *listenOnly(smtp=f"tcp:{port}:interface=127.0.0.1")])
            output = daemon.process.communicate(timeout=30)[0]
        self.assertNotEqual(daemon.process.returncode, 0)
        self.assertIn(f"cannot listen for smtp on tcp:{port}:interface=127.0.0.1", output)

    def test_portInUseExitsWithWorkers(self):
        """
        The same with workers: the parent, which opens the listeners, logs
        which one it could not have and stops before starting any worker.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            free = freePort()
            daemon = Daemon(
                self.folder,
                ["-n", "maild", "--workers=2", *listenOnly(
                    smtp=f"tcp:{free}:interface=127.0.0.1", imap=f"tcp:{port}:interface=127.0.0.1"
                )],
            )
            # (Without the fix it went on running, without workers.)
            self.addCleanup(lambda: daemon.process.poll() is None and daemon.stop(signal.SIGKILL))
            output = daemon.process.communicate(timeout=30)[0]
        self.assertEqual(daemon.process.returncode, 1, output)
        self.assertIn(f"cannot listen for imap on tcp:{port}:interface=127.0.0.1", output)
        self.assertNotIn("worker 1 started", output)
        # The listener it had opened first was closed again.
        with socket.socket() as again:
            again.bind(("127.0.0.1", free))

    def test_schedulingNormalOnRequest(self):
        """
        With C{[cluster] scheduling = "normal"} the daemon and its threads
        (the sync threads, started by a delivery) keep the default policy,
        even when started from a process under C{SCHED_BATCH}.
        """
        folder = Path(self.mktemp()).resolve()
        writeUsers(folder / "data", {"alice@localhost": "pw"})
        port = freePort()
        (folder / "maild.toml").write_text('data_dir = "data"\n[cluster]\nscheduling = "normal"\n')
        args = ["-n", "maild", "--config", "maild.toml", *listenOnly(smtp=f"tcp:{port}:interface=127.0.0.1")]
        daemon = Daemon(folder, args, preexec_fn=lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)))
        self.addCleanup(daemon.stop)
        waitForPort(port, daemon.process)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("bob@example.org", ["alice@localhost"], "Subject: x\r\n\r\nx\r\n")
        threads = [int(t) for t in os.listdir(f"/proc/{daemon.process.pid}/task")]
        self.assertGreater(len(threads), 1)
        self.assertEqual({os.sched_getscheduler(t) for t in threads}, {os.SCHED_OTHER})


class ReloadTests(unittest.TestCase):
    def test_sighupReloadsCertificate(self):
        """
        SIGHUP makes the daemon serve the renewed certificate to new
        connections; a broken file is logged and the old one kept.
        """
        import ssl

        from maild.tls import LocalCA

        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        port = freePort()
        daemon = Daemon(folder, ["-n", "maild", *listenOnly(smtps=f"tcp:{port}:interface=127.0.0.1")])

        def served() -> bytes:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    return tls.getpeercert(binary_form=True)

        def servedAfterHangup(previous: bytes) -> bytes:
            daemon.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                current = served()
                if current != previous:
                    return current
                time.sleep(0.05)
            return current

        try:
            waitForPort(port, daemon.process)
            first = served()
            tls = folder / "maildata/tls"
            LocalCA(tls, "renewed.test").renew()
            second = servedAfterHangup(first)
            (tls / "cert.pem").write_text("broken")
            third = servedAfterHangup(second)
        finally:
            output = daemon.stop()
        self.assertNotEqual(first, second)
        self.assertEqual(second, third)
        self.assertIn("TLS certificate reloaded", output)
        self.assertIn("TLS reload failed, keeping the current certificate", output)


class CrashTests(unittest.TestCase):
    def test_sigkillDuringStorm(self):
        """
        A daemon killed with SIGKILL while 8 clients deliver loses no message
        it answered 250, and starts again cleanly over what it left behind;
        leftover spool files are removed once stale (tmp_grace).
        """
        folder = Path(self.mktemp()).resolve()
        writeUsers(folder / "data", {"alice@localhost": "pw"})
        port = freePort()
        (folder / "maild.toml").write_text(
            f'data_dir = "data"\n[listen]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n'
        )
        args = ["-n", "maild", "--config", "maild.toml", *listenOnly(smtp=f"tcp:{port}:interface=127.0.0.1")]
        daemon = Daemon(folder, args)
        waitForPort(port, daemon.process)
        acknowledged: list[str] = []
        stop = threading.Event()

        def client(n: int) -> None:
            # A client that loses its connection before the kill (a timeout
            # on a loaded machine) connects again, so that the kill always
            # comes in full flow.
            i = 0
            while not stop.is_set():
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                        while not stop.is_set():
                            marker = f"storm-{n}-{i}"
                            body = f"Subject: {marker}\r\n\r\n" + ("x" * 70 + "\r\n") * 50
                            smtp.sendmail("bob@example.org", ["alice@localhost"], body)
                            acknowledged.append(marker)
                            i += 1
                except (smtplib.SMTPException, OSError):
                    i += 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        # Kill it in full flow: once many messages have been answered.
        deadline = time.monotonic() + 120
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(10)
        daemon.stop()

        new = folder / "data/mail/localhost/alice/new"
        stored = {}
        for path in new.iterdir():
            subject = path.read_bytes().split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode()
            stored[subject] = stored.get(subject, 0) + 1
        self.assertGreater(len(acknowledged), 20)
        missing = [m for m in acknowledged if m not in stored]
        self.assertEqual(missing, [])
        self.assertEqual([m for m, count in stored.items() if count > 1], [])

        # What a crash leaves of a big message being received.
        (folder / "data/tmp").mkdir(exist_ok=True)
        (folder / "data/tmp/1700000000.M1P1Q1.crashed").write_bytes(b"partial message")
        leftovers = set(os.listdir(folder / "data/tmp"))
        # Stale at once (files are aged by their ctime, which a test cannot
        # set back): the sweep at start removes them; the next is an hour
        # later, so the message sent after it is safe.
        (folder / "maild.toml").write_text(
            f'data_dir = "data"\n[listen]\nsmtp = "tcp:{port}:interface=127.0.0.1"\n[store]\ntmp_grace = 0\n'
        )
        daemon = Daemon(folder, args)
        try:
            waitForPort(port, daemon.process)
            deadline = time.monotonic() + 10
            while leftovers & set(os.listdir(folder / "data/tmp")) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(leftovers & set(os.listdir(folder / "data/tmp")), set())
            with smtplib.SMTP("127.0.0.1", port) as smtp:
                smtp.sendmail("bob@example.org", ["alice@localhost"], "Subject: after\r\n\r\nok\r\n")
        finally:
            daemon.stop()


class PackagingTests(unittest.TestCase):
    def test_pluginFoundAfterInstall(self):
        """
        The built wheel carries the plugin file and the C{maild} console
        script, and no C{twisted/__init__.py} or C{twisted/plugins/__init__.py}
        that would shadow Twisted's own packages; with only the wheel's
        contents on the path, C{twistd maild --help} works from any folder.
        """
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())
        out = Path(self.mktemp())
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            raise unittest.SkipTest(f"pip wheel failed (no package index?): {build.stderr[-500:]}")
        [wheel] = out.glob("maild-*.whl")
        installed = out / "site"
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            archive.extractall(installed)
        self.assertIn("twisted/plugins/maild_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        [entryPoints] = installed.glob("maild-*.dist-info/entry_points.txt")
        self.assertIn("maild = maild.cli:main", entryPoints.read_text())
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "maild", "--help"],
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(installed.resolve())},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--imaps=", result.stdout)


class ImplicitTLSEndpointTests(unittest.TestCase):
    """
    Implicit-TLS listeners speak TLS whatever their endpoint string (issue 8,
    item 3): the factory is wrapped, not the endpoint.
    """

    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()

    def test_systemdSocket(self):
        """
        IMAPS on a socket handed over by systemd (`systemd:domain=INET:
        index=0`, the form the README recommends) greets in TLS.
        """
        import ssl

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        args = ["-n", "maild", *listenOnly(imaps="systemd:domain=INET:index=0")]
        # sd_listen_fds(3): the socket is fd 3, LISTEN_PID the daemon's pid
        # (systemd 227 and later also name it).
        launcher = (
            "import os, sys; os.dup2(%d, 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_FDNAMES'] = 'imaps'; "
            "os.execv(sys.executable, [sys.executable, '-c', "
            "'from twisted.scripts.twistd import run; run()'] + sys.argv[1:])" % fd
        )
        process = subprocess.Popen(
            [sys.executable, "-c", launcher, *args],
            cwd=self.folder,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        listener.close()
        try:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                        with context.wrap_socket(raw) as tls:
                            greeting = tls.recv(1000)
                    break
                except (ssl.SSLError, ConnectionError):
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        self.assertTrue(greeting.startswith(b"* OK "), output)

    def test_workers(self):
        """
        With --workers, whose listeners are systemd: endpoints in each
        worker, IMAPS still greets in TLS (it greeted in plaintext).
        """
        import ssl

        port = freePort()
        daemon = Daemon(
            self.folder,
            ["-n", "--pidfile=", "maild", "--workers=2", *listenOnly(imaps=f"tcp:{port}:interface=127.0.0.1")],
        )
        try:
            waitForPort(port, daemon.process)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                        with context.wrap_socket(raw) as tls:
                            greeting = tls.recv(1000)
                    break
                except (ssl.SSLError, ConnectionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            output = daemon.stop()
        self.assertTrue(greeting.startswith(b"* OK "), output)

    def test_tlsEndpointRefused(self):
        """
        An implicit-TLS listener on an endpoint that does TLS itself (ssl:)
        stops the daemon at start with a message saying what to use instead.
        """
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "maild",
             *listenOnly(imaps="ssl:0:privateKey=key.pem")],
            cwd=self.folder,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("listen.imaps", result.stdout + result.stderr)
        self.assertIn("does TLS itself", result.stdout + result.stderr)


class SchedulingPolicyTests(unittest.TestCase):
    def test_refusedPolicyIsNotFatal(self):
        """
        Where the system refuses the policy (a container whose seccomp
        filter forbids sched_setscheduler), the daemon says so and runs on.
        """
        from twisted.logger import globalLogPublisher

        from maild import scheduling

        def refuse(pid, policy, param):
            raise PermissionError(1, "Operation not permitted")

        self.patch(scheduling.os, "sched_setscheduler", refuse)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertFalse(scheduling.applyScheduling("batch"))
        self.assertEqual([e["log_level"].name for e in events if e.get("policy") == "batch"], ["warn"])

    def test_appliedToThisThread(self):
        """
        The policy is set on the calling thread, here a thread of the test's
        own, which then reports it.
        """
        import threading

        from maild import scheduling

        seen = []

        def run():
            seen.append(scheduling.applyScheduling("batch"))
            seen.append(os.sched_getscheduler(0))
            seen.append(scheduling.applyScheduling("normal"))
            seen.append(os.sched_getscheduler(0))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        self.assertEqual(seen, [True, os.SCHED_BATCH, True, os.SCHED_OTHER])


class WorkerCPUsTests(unittest.TestCase):
    def test_sharesOfTheCPUs(self):
        """
        Each worker gets every count-th CPU of those the parent may use,
        from its own; with more workers than CPUs, one CPU each, in turn.
        """
        from maild.scheduling import workerCPUs

        self.assertEqual([workerCPUs(n, 2, [0, 1]) for n in (1, 2)], [[0], [1]])
        self.assertEqual([workerCPUs(n, 2, [3, 0, 2, 1]) for n in (1, 2)], [[0, 2], [1, 3]])
        self.assertEqual([workerCPUs(n, 3, [4, 6]) for n in (1, 2, 3)], [[4], [6], [4]])
        self.assertEqual(workerCPUs(1, 1, [0, 1]), [0, 1])

    def test_placedFromTheEnvironment(self):
        """
        In a worker, the CPUs its parent named are set on the calling
        thread; without them nothing is set.
        """
        from maild.scheduling import WORKER_CPUS_ENV, placeWorker

        cpus = sorted(os.sched_getaffinity(0))
        seen = []

        def run():
            seen.append(placeWorker({WORKER_CPUS_ENV: str(cpus[-1])}))
            seen.append(sorted(os.sched_getaffinity(0)))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        self.assertEqual(seen, [[cpus[-1]], [cpus[-1]]])
        self.assertIsNone(placeWorker({}))
        self.assertEqual(sorted(os.sched_getaffinity(0)), cpus)
