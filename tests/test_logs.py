"""
The daemon's log: one line per event (a failure described, not its
traceback), failures of one kind rate-limited, and rotated files bounded
in number and size.
"""

from __future__ import annotations

import base64
import io
import json
import os
import smtplib
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsJSON,
    eventAsText,
    eventFromJSON,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.trial import unittest

from maild.config import LogSettings
from maild.imap import server as imapServer
from maild.logs import BURST, INTERVAL, LINE_LIMIT, FailureRateLimit, formatOneLine, logObserver
from tests.support import PASSWORD, IMAPTestCase, freePort, writeUsers
from tests.test_daemon import Daemon, listenOnly, waitForPort


def recurse(depth: int) -> None:
    recurse(depth + 1)


def shallowFailure() -> Failure:
    try:
        {}["missing"]
    except KeyError:
        return Failure()


def deepFailure() -> Failure:
    try:
        recurse(0)
    except RecursionError:
        return Failure()


class CollectingObserver:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, event):
        text = formatOneLine(event)
        if text is not None:
            self.lines.append(text)


class FormatTests(unittest.SynchronousTestCase):
    def test_failureInOneLine(self):
        """
        A failure is logged as its exception, message and innermost place
        in one line, however deep its traceback (a RecursionError's is a
        thousand frames).
        """
        observer = CollectingObserver()
        Logger(observer=observer).failure("IMAP command {name} failed", deepFailure(), name=b"FETCH")
        [line] = observer.lines
        self.assertEqual(line.count("\n"), 1)
        self.assertLess(len(line), 600)
        self.assertIn("IMAP command b'FETCH' failed: RecursionError: maximum recursion depth exceeded", line)
        self.assertIn("(at test_logs.py:", line)
        self.assertIn("in recurse)", line)

    def test_legacyError(self):
        """
        A legacy log.err (as the reactor's "Unhandled Error") is one line
        too, with its reason.
        """
        observer = CollectingObserver()
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        legacyLog.err(shallowFailure(), "Unhandled Error")
        self.flushLoggedErrors(KeyError)
        [line] = [text for text in observer.lines if "KeyError" in text]
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("Unhandled Error: KeyError: 'missing' (at test_logs.py:", line)
        self.assertNotIn("Traceback", line)

    def test_formatNamingTheFailure(self):
        """
        An event whose own format names its failure (as Twisted's
        "Temporarily disabling observer ... {log_failure}") is still
        formatted, in one line.
        """
        observer = CollectingObserver()
        Logger(observer=observer).failure("observer failed: {log_failure}", shallowFailure())
        [line] = observer.lines
        self.assertIn("observer failed: [Failure instance: Traceback", line)
        self.assertIn(": KeyError: 'missing' (at test_logs.py:", line)
        self.assertEqual(line.count("\n"), 1)

    def test_relayedFromWorker(self):
        """
        A failure a worker relays to its parent as JSON (which keeps its
        fields pre-formatted and loses the exception) is one line too, and
        passes the rate limit.
        """
        events: list = []
        Logger(observer=events.append).failure("failed on {n}", shallowFailure(), n=7)
        relayed = eventFromJSON(eventAsJSON(events[0]))
        observer = CollectingObserver()
        FailureRateLimit(observer, task.Clock())(relayed)
        [line] = observer.lines
        self.assertIn("failed on 7: KeyError (at test_logs.py:", line)

    def test_longAndMultiLineText(self):
        """
        Newlines in a message are escaped (a client's input cannot start a
        line of its own), and a line is cut at LINE_LIMIT.
        """
        observer = CollectingObserver()
        Logger(observer=observer).info("said {text}", text="a\r\nlogin failed: fake" + "x" * 5000)
        [line] = observer.lines
        self.assertIn("said a\\r\\nlogin failed: fake", line)
        self.assertLessEqual(len(line), LINE_LIMIT + 10)
        self.assertTrue(line.endswith(" [cut]\n"))


class FormatPropertyTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.text(), st.text())
    def test_anyTextOneLine(self, text, message):
        """
        Whatever a message holds (client input quoted in it, an exception's
        text), its event is exactly one line, at most LINE_LIMIT long.
        """
        observer = CollectingObserver()
        try:
            raise ValueError(message)
        except ValueError:
            failure = Failure()
        Logger(observer=observer).info("said {text}", text=text)
        Logger(observer=observer).failure("failed on {text}", failure, text=text)
        for line in observer.lines:
            self.assertEqual(line.count("\n"), 1)
            self.assertTrue(line.endswith("\n"))
            self.assertLessEqual(len(line), LINE_LIMIT + len(" [cut]\n"))

    @settings(max_examples=300, deadline=None)
    @given(
        st.floats(min_value=0, max_value=4e9, allow_nan=False),
        st.sampled_from([timeFormatRFC3339, "%H:%M:%S.%f", "%Y/%W %z", "%s"]),
    )
    @example(1.9999996, timeFormatRFC3339)
    def test_timeAsTwistedFormatsIt(self, when, timeFormat):
        """
        The time at the start of each line (remembered per second: working
        out the time zone for every line cost a twentieth of a busy
        server's CPU) reads exactly as Twisted's C{formatTime} writes it,
        fractions of a second included when the format asks for them, and
        rounded to the microsecond first as Twisted does (1.9999996 is 2).
        """
        line = formatOneLine({"log_format": "x", "log_time": when}, timeFormat)
        self.assertEqual(line[: line.index(" [-#-] x")], formatTime(when, timeFormat))

    @settings(max_examples=500, deadline=None)
    @given(
        st.sampled_from([
            "plain", "", "{a} and {b}", "{a!r} {b:>5}", "{a[0]}", "{a.real}", "{missing}", "{}", "{a()}",
            "{a:{b}}", "{{literal}} {a}", "{log_namespace} {a}", "{a:.1f}", "unclosed {a", b"bytes {a}", None,
        ]),
        st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=False), st.none(), st.lists(st.integers(), max_size=2)),
        st.one_of(st.text(max_size=3), st.integers(min_value=0, max_value=9)),
        st.sampled_from([{}, {"log_system": "SMTPServer,3,127.0.0.1"}, {"log_level": LogLevel.info, "log_namespace": "maild.smtp"}, {"log_namespace": "n"}]),
    )
    def test_textAsTwistedFormatsIt(self, logFormat, a, b, system):
        """
        Every line reads as Twisted's own C{eventAsText} writes it (its text
        is made by C{str.format_map} where that gives the same: Twisted's
        formatter, written in Python, cost a tenth of a message's CPU), for
        any format, field and system, a format that fails included.
        """
        event = dict(system, log_format=logFormat, a=a, b=b, log_time=1764567890.25)
        expected = eventAsText(event, includeTraceback=False)
        line = formatOneLine(event)
        if not expected:
            self.assertIsNone(line)
        else:
            # (Short: never cut at LINE_LIMIT.)
            self.assertEqual(line, expected.replace("\r", "\\r").replace("\n", "\\n") + "\n")


class RateLimitTests(unittest.SynchronousTestCase):
    def test_burstThenCount(self):
        """
        Of 100 identical failures at once, BURST are logged; once the
        interval has passed, the next says how many were left out.
        Events without a failure (login lines) are never held back.
        """
        clock = task.Clock()
        observer = CollectingObserver()
        log = Logger(observer=FailureRateLimit(observer, clock))
        failure = deepFailure()
        for _ in range(100):
            log.failure("command failed", failure)
            log.info("login failed: rip=192.0.2.1")
        self.assertEqual(sum("command failed" in line for line in observer.lines), BURST)
        self.assertEqual(sum("login failed" in line for line in observer.lines), 100)
        clock.advance(INTERVAL)
        log.failure("command failed", failure)
        self.assertIn(f"({100 - BURST} more like it left out)", observer.lines[-1])
        log.failure("another failure", failure)
        self.assertNotIn("left out", observer.lines[-1])


class RotationTests(unittest.SynchronousTestCase):
    def test_boundedFiles(self):
        """
        The log file is rotated at rotate_size and at most max_files old
        files are kept, whatever is written.
        """
        folder = Path(self.mktemp())
        observer = logObserver(folder / "maild.log", LogSettings(rotate_size=1000, max_files=2), task.Clock())
        log = Logger(observer=observer)
        for n in range(1000):
            log.info("line {n} {padding}", n=n, padding="x" * 50)
        self.assertEqual(sorted(os.listdir(folder)), ["maild.log", "maild.log.1", "maild.log.2"])
        for name in os.listdir(folder):
            self.assertLess((folder / name).stat().st_size, 1200)
        self.assertIn("line 999 ", (folder / "maild.log").read_text())


class CommandFailureTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_failingCommandLogsOneLineEach(self):
        """
        A command whose handler fails, sent 50 times in one session, is
        answered NO [SERVERBUG] each time and costs the log at most one
        line each, and at most BURST lines in all: never a traceback.
        """
        collected = io.StringIO()
        observer = logObserver(collected, LogSettings(), task.Clock())
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        original = imapServer.COMMANDS[b"NOOP"]
        imapServer.COMMANDS[b"NOOP"] = (original[0], lambda *args: {}["missing"])
        self.addCleanup(imapServer.COMMANDS.__setitem__, b"NOOP", original)

        def run(client):
            return [client.command(b"a%d NOOP" % n)[1] for n in range(50)]

        replies = yield self.session(run)
        self.flushLoggedErrors(KeyError)
        self.assertEqual({reply.split(b" ", 1)[1] for reply in replies}, {b"NO [SERVERBUG] Internal error"})
        lines = [line for line in collected.getvalue().splitlines() if "NOOP" in line]
        self.assertEqual(len(lines), BURST)
        self.assertNotIn("Traceback", collected.getvalue())
        self.assertIn("IMAP command b'NOOP' failed: KeyError: 'missing' (at test_logs.py:", lines[0])


class DaemonLogTests(unittest.TestCase):
    def test_twistdLogBounded(self):
        """
        Under twistd with --logfile, the log rotates at [log] rotate_size
        and keeps [log] max_files old files, and input that makes the
        server fail (here a Sender: of 1,000 "(" on submission) costs a
        line or two a time, never a traceback.
        """
        folder = Path(self.mktemp()).resolve()
        writeUsers(folder / "data", {"alice@localhost": PASSWORD})
        port = freePort()
        (folder / "maild.toml").write_text(
            'data_dir = "data"\n[log]\nrotate_size = 2000\nmax_files = 2\n'
            '[limits]\nauth_failure_delay = 0.001\nauth_failure_delay_max = 0.002\n[auth]\nsubmission_plaintext = true\n'
        )
        daemon = Daemon(
            folder,
            ["-n", "--pidfile=", "--logfile=maild.log", "maild", "--config", "maild.toml",
             *listenOnly(submission=f"tcp:{port}:interface=127.0.0.1")],
        )
        try:
            waitForPort(port, daemon.process)
            for n in range(40):
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                        smtp.login("alice@localhost", PASSWORD)
                        smtp.sendmail(
                            "alice@localhost",
                            ["alice@localhost"],
                            "From: alice@localhost\r\nSender: " + "(" * 1000 + "\r\n\r\nbody\r\n",
                        )
                except (smtplib.SMTPException, OSError):
                    pass
            for n in range(40):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.ehlo()
                    wrong = base64.b64encode(b"\0alice@localhost\0wrong").decode()
                    self.assertEqual(smtp.docmd("AUTH", "PLAIN " + wrong)[0], 535)
        finally:
            output = daemon.stop()
        names = sorted(os.listdir(folder))
        logs = [name for name in names if name.startswith("maild.log")]
        self.assertEqual(logs, ["maild.log", "maild.log.1", "maild.log.2"], output)
        text = "".join((folder / name).read_text() for name in logs)
        self.assertNotIn("Traceback", text)
        for line in text.splitlines():
            self.assertLess(len(line), LINE_LIMIT + 10)
        self.assertLess(sum((folder / name).stat().st_size for name in logs), 3 * 2500)

    def test_jsonLines(self):
        """
        With --log-format json every line of the log is one JSON object,
        a twisted.logger event with its fields and its text under
        "message": here the failed login's line, with the fields fail2ban's
        regular expression reads in the text form.
        """
        folder = Path(self.mktemp()).resolve()
        writeUsers(folder / "data", {"alice@localhost": PASSWORD})
        port = freePort()
        (folder / "maild.toml").write_text(
            'data_dir = "data"\n[limits]\nauth_failure_delay = 0.001\n[auth]\nsubmission_plaintext = true\n'
        )
        daemon = Daemon(
            folder,
            ["-n", "--pidfile=", "--logfile=maild.log", "maild", "--config", "maild.toml",
             "--log-format=json", *listenOnly(submission=f"tcp:{port}:interface=127.0.0.1")],
        )
        try:
            waitForPort(port, daemon.process)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo()
                wrong = base64.b64encode(b"\0alice@localhost\0wrong").decode()
                self.assertEqual(smtp.docmd("AUTH", "PLAIN " + wrong)[0], 535)
        finally:
            daemon.stop()
        lines = (folder / "maild.log").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        [failed] = [e for e in events if e["message"].startswith("login failed:")]
        self.assertEqual((failed["service"], failed["user"], failed["rip"]), ("submission", "alice@localhost", "127.0.0.1"))
        self.assertEqual(eventFromJSON(lines[events.index(failed)])["log_namespace"], "maild.auth")
