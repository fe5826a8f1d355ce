"""
Every core of one machine: C{--workers N} runs N maild processes on the
same listening sockets and data folder, keeps them running, and passes
signals on.
"""

from __future__ import annotations

import concurrent.futures
import imaplib
import os
import re
import signal
import smtplib
from pathlib import Path

from twisted.trial import unittest

from tests.support import PASSWORD, freePort, waitFor, writeUsers
from tests.test_daemon import Daemon, listenOnly, waitForPort


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive either.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def logText(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def waitForWorkers(log: Path, count: int) -> dict[int, int]:
    """
    Wait until C{count} workers have started and come up, as their parent's
    log C{log} says.

    @return: each worker's number and pid.
    """

    def up():
        text = logText(log)
        pids = {int(n): int(p) for n, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", text)}
        return pids if len(pids) >= count and text.count("] maild starting") >= count else None

    return waitFor(up, what=f"{count} workers to be up")


class WorkersTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()
        writeUsers(self.folder / "maildata", {"alice@localhost": PASSWORD})
        self.smtp, self.imap = freePort(), freePort()
        self.log = self.folder / "twistd.log"
        self.daemon = Daemon(
            self.folder,
            ["-n", "--pidfile=", "--logfile", str(self.log), "maild", "--workers=2"]
            + listenOnly(
                smtp=f"tcp:{self.smtp}:interface=127.0.0.1",
                imap=f"tcp:{self.imap}:interface=127.0.0.1",
            ),
        )
        self.addCleanup(self.daemon.stop)
        waitForPort(self.smtp, self.daemon.process)
        self.pids = waitForWorkers(self.log, 2)

    def logText(self) -> str:
        return logText(self.log)

    def send(self, count: int, subject: str) -> None:
        def one(i):
            with smtplib.SMTP("127.0.0.1", self.smtp, timeout=30) as s:
                s.sendmail("carol@remote.test", ["alice@localhost"], f"Subject: {subject} {i}\r\n\r\nx\r\n")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))

    def inbox(self) -> list[Path]:
        return list((self.folder / "maildata/mail/localhost/alice/new").iterdir())

    def test_servesWithTwoWorkers(self):
        """
        Two workers serve one listener: every message sent concurrently is
        stored once, and IMAP (served by either worker) sees them all with
        distinct UIDs.
        """
        self.send(40, "load")
        self.assertEqual(len(self.inbox()), 40)
        imap = imaplib.IMAP4("127.0.0.1", self.imap)
        imap.login("alice@localhost", PASSWORD)
        imap.select("INBOX")
        _, data = imap.uid("SEARCH", "ALL")
        imap.logout()
        self.assertEqual(len(set(data[0].split())), 40)
        workers = set(re.findall(r"\[worker (\d+)\] maild starting", self.logText()))
        self.assertEqual(workers, {"1", "2"})

    def test_connectionsSpreadOverWorkers(self):
        """
        Clients that connect together are spread over the workers (each has
        its own socket on the listener's address, C{SO_REUSEPORT}), rather
        than all taken by the first worker woken: of 20 IMAP sessions opened
        at once, each worker serves some.
        """
        clients = [imaplib.IMAP4("127.0.0.1", self.imap) for _ in range(20)]
        for client in clients:
            client.login("alice@localhost", PASSWORD)
        for client in clients:
            client.logout()
        # The workers' log lines reach the parent's log a moment later.
        logins = waitFor(
            lambda: (found := re.findall(r"\[worker (\d+)\] login: service=imap", self.logText()))
            and len(found) == 20 and found,
            what="the 20 logins to be logged",
        )
        self.assertEqual(set(logins), {"1", "2"})

    def test_renderingsShared(self):
        """
        What one worker rendered for FETCH (ENVELOPE, BODYSTRUCTURE, the
        header) the other takes from their shared memory file rather than
        rendering it again, and serves the same answer.
        """
        self.send(1, "shared")
        fetch = ("1", "(ENVELOPE BODYSTRUCTURE BODY.PEEK[HEADER])")

        def loggedIn(client) -> str:
            before = re.findall(r"\[worker (\d+)\] login: service=imap", self.logText())
            client.login("alice@localhost", PASSWORD)
            return waitFor(
                lambda: (now := re.findall(r"\[worker (\d+)\] login: service=imap", self.logText()))
                and len(now) > len(before) and now[-1],
                what="the login to be logged",
            )

        first = imaplib.IMAP4("127.0.0.1", self.imap)
        firstWorker = loggedIn(first)
        first.select("INBOX")
        answers = [first.fetch(*fetch)]
        clients = [first]
        for _ in range(30):
            client = imaplib.IMAP4("127.0.0.1", self.imap)
            clients.append(client)
            if loggedIn(client) != firstWorker:
                break
        else:
            self.fail("the kernel gave every connection to one worker")
        client.select("INBOX")
        answers.append(client.fetch(*fetch))
        for c in clients:
            c.logout()
        self.assertEqual(answers[0], answers[1])
        self.assertIn(b"shared 0", answers[0][1][0][0])
        # The renderings are in the file once, in the first worker's segment.
        worker = self.pids[int(firstWorker)]
        memfd = next(
            f"/proc/{worker}/fd/{fd}" for fd in os.listdir(f"/proc/{worker}/fd")
            if os.readlink(f"/proc/{worker}/fd/{fd}").startswith("/memfd:maild-renderings")
        )
        with open(memfd, "rb") as f:
            shared = f.read()
        inbox = os.fsencode(self.folder / "maildata/mail/localhost/alice")
        for name in (b"ENVELOPE", b"BODYSTRUCTURE"):
            self.assertEqual(len(re.findall(re.escape(inbox) + rb"\0\d+\0\d+\0" + name, shared)), 1, name)

    def test_scheduledForThroughput(self):
        """
        The parent, every worker and every thread they started (after some
        mail, the sync threads too) run under C{SCHED_BATCH}, the default
        C{[cluster] scheduling}: a woken maild thread does not preempt a
        running one.
        """
        self.send(20, "threads")
        processes = [self.daemon.process.pid, *self.pids.values()]
        threads = [int(t) for pid in processes for t in os.listdir(f"/proc/{pid}/task")]
        self.assertGreater(len(threads), len(processes))
        policies = {tid: os.sched_getscheduler(tid) for tid in threads}
        self.assertEqual(set(policies.values()), {os.SCHED_BATCH}, policies)

    def test_workersOnCPUsOfTheirOwn(self):
        """
        With the default C{[cluster] cpu_affinity}, each worker and every
        thread it started runs on its own share of the CPUs; the parent is
        left where it was.
        """
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            raise unittest.SkipTest("one CPU: nothing to share out")
        self.send(20, "threads")

        def allowed(pid: int) -> dict[int, frozenset]:
            return {int(t): frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}

        placed = {number: allowed(pid) for number, pid in self.pids.items()}
        for number, threads in placed.items():
            self.assertGreater(len(threads), 1, number)
            self.assertEqual(set(threads.values()), {frozenset(available[number - 1 :: 2])}, number)
        self.assertEqual(set(allowed(self.daemon.process.pid).values()), {frozenset(available)})
        self.assertIn("[worker 1] running on CPU", self.logText())

    def test_deadWorkerRestarted(self):
        """
        A worker killed with SIGKILL is started again by the parent, and
        mail keeps flowing meanwhile.
        """
        os.kill(self.pids[1], signal.SIGKILL)
        waitFor(lambda: "worker 1 ended" in self.logText(), what="the death to be noticed")
        self.send(10, "during")
        waitFor(lambda: self.logText().count("worker 1 started") >= 2, what="the restart")
        self.send(10, "after")
        self.assertEqual(len(self.inbox()), 20)

    def test_signals(self):
        """
        SIGHUP reaches every worker (each reloads its certificate); SIGTERM
        stops the parent and every worker.
        """
        self.daemon.process.send_signal(signal.SIGHUP)
        waitFor(lambda: self.logText().count("TLS certificate reloaded") >= 2, what="both reloads")
        self.daemon.stop()
        self.assertIn(self.daemon.process.returncode, (0, -signal.SIGTERM))
        for pid in self.pids.values():
            self.assertFalse(alive(pid), pid)


    def test_toldTwiceToStop(self):
        """
        A worker signalled directly as well as by its parent (Ctrl-C or
        systemd signal the whole group) stops once, without an error.
        """
        def catchesSigterm(pid: int) -> bool:
            # The reactor's handlers are in place once it runs.
            status = Path(f"/proc/{pid}/status").read_text()
            caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
            return bool(caught & (1 << (signal.SIGTERM - 1)))

        for pid in self.pids.values():
            waitFor(lambda: catchesSigterm(pid), what=f"worker {pid} to run")
            os.kill(pid, signal.SIGTERM)
        self.daemon.stop()
        self.assertIn(self.daemon.process.returncode, (0, -signal.SIGTERM))
        log = self.logText()
        self.assertEqual(log.count("] Server Shut Down."), 3, log)
        self.assertNotIn("ReactorNotRunning", log)
        for pid in self.pids.values():
            self.assertFalse(alive(pid), pid)


class WorkerLogReaderTests(unittest.SynchronousTestCase):
    def test_recordsAcrossChunks(self):
        """
        A worker's JSON records become events of the parent, marked with the
        worker's name, whatever the chunks they arrive in; a line that is
        not JSON is kept as text.
        """
        import io as _io

        from twisted.logger import Logger, formatEvent, jsonFileLogObserver

        from maild.logs import WorkerLogReader

        out = _io.StringIO()
        Logger(observer=jsonFileLogObserver(out)).info("accepted {n} messages", n=3)
        data = out.getvalue().encode() + b"not json\n"
        events = []
        reader = WorkerLogReader("worker 7", publisher=events.append)
        for i in range(len(data)):
            reader.dataReceived(data[i : i + 1])
        self.assertEqual([formatEvent(e) for e in events], ["accepted 3 messages", "not json"])
        self.assertEqual({e["log_system"] for e in events}, {"worker 7"})

    def test_formattedLinesCopied(self):
        """
        A line the worker formatted for the log (after the marker) is
        written to the parent's log stream as it is, not parsed again.
        """
        import io as _io

        from maild.logs import WorkerLogReader

        output = _io.StringIO()
        events = []
        reader = WorkerLogReader("worker 2", publisher=events.append, output=output)
        reader.dataReceived(b"\x1f2026-12-01T03:04:21+0000 [worker 2] accepted 1\n\x1fsecond")
        reader.dataReceived(b" line\n")
        self.assertEqual(
            output.getvalue(), "2026-12-01T03:04:21+0000 [worker 2] accepted 1\nsecond line\n"
        )
        self.assertEqual(events, [])


class UnplacedWorkersTests(unittest.TestCase):
    def test_cpuAffinityNone(self):
        """
        With C{[cluster] cpu_affinity = "none"} the workers may run on every
        CPU their parent may.
        """
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        writeUsers(folder / "maildata", {"alice@localhost": PASSWORD})
        (folder / "maild.toml").write_text('[cluster]\ncpu_affinity = "none"\n')
        smtp, log = freePort(), folder / "twistd.log"
        daemon = Daemon(
            folder,
            ["-n", "--pidfile=", "--logfile", str(log), "maild", "--config", "maild.toml", "--workers=2"]
            + listenOnly(smtp=f"tcp:{smtp}:interface=127.0.0.1"),
        )
        self.addCleanup(daemon.stop)
        waitForPort(smtp, daemon.process)
        pids = waitForWorkers(log, 2)
        available = os.sched_getaffinity(0)
        self.assertEqual([os.sched_getaffinity(pid) for pid in pids.values()], [available, available])
        self.assertNotIn("running on CPU", log.read_text())
