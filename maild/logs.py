"""
The daemon's log: one line per event, however bad the input that caused
it, in files that cannot fill the disk.

twistd writes its log through an C{ILogObserver} component of the
application when there is one (the way a .tac file chooses its log), so
L{maild.service.MailService} sets one built by L{logObserver}: the file
twistd was told (C{--logfile}, C{twistd.log} when it daemonizes) or
C{[log] file}, rotated at C{[log] rotate_size} octets with at most
C{[log] max_files} old files kept; or standard output under C{-n}.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    eventAsText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

# No log line is longer (user input quoted in a message, a long error).
LINE_LIMIT = 2000
# Failures of one kind (same message, exception and place): at most BURST
# lines per INTERVAL seconds, then a count of those left out.
BURST = 10
INTERVAL = 60.0


def describeFailure(failure) -> str:
    """
    A failure in one line: the exception, the first line of its message,
    and where it was raised.  A traceback is many lines per event (a
    RecursionError's, a thousand), which one bad command repeated could
    turn into gigabytes.
    """
    message = failure.getErrorMessage().strip().splitlines()
    text = f"{failure.type.__name__}: {message[0][:300] if message else ''}"
    if failure.frames:
        function, path, line = failure.frames[-1][:3]
        text += f" (at {_shortPath(path)}:{line} in {function})"
    return text


def _shortPath(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("maild", "twisted"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return Path(path).name


def _failureOf(event: dict[str, Any]):
    """
    The failure an event reports: a new-style C{log_failure}, or a legacy
    C{log.err}'s C{failure} (the reactor's "Unhandled Error").
    """
    failure = event.get("log_failure")
    if failure is None and event.get("isError"):
        failure = event.get("failure")
    return failure


def formatOneLine(event: dict[str, Any], timeFormat: str | None = timeFormatRFC3339) -> str | None:
    """
    An event as one line of classic twistd log text, its failure (if any)
    described in that line, newlines escaped, and cut at L{LINE_LIMIT}.
    """
    failure = _failureOf(event)
    if failure is not None:
        event = dict(event)
        if event.get("log_format") == "{log_text}" and event.get("isError"):
            # A legacy log.err(): its text already holds the traceback.
            event["log_format"] = event.get("why") or "Unhandled Error"
        event["maild_failure"] = describeFailure(failure)
        event["log_format"] = (event.get("log_format") or "Unexpected error") + ": {maild_failure}"
    if event.get("maild_suppressed"):
        event = dict(event)
        event["log_format"] = (event.get("log_format") or "") + (
            " ({maild_suppressed} more like it left out)"
        )
    text = eventAsText(
        event, includeTraceback=False, formatTime=lambda t: formatTime(t, timeFormat)
    )
    if not text:
        return None
    line = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(line) > LINE_LIMIT:
        line = line[:LINE_LIMIT] + " [cut]"
    return line + "\n"


@implementer(ILogObserver)
class FailureRateLimit:
    """
    Passes events on to C{observer}, but of the failures of one kind (the
    same message, exception type and place) at most C{burst} per
    C{interval} seconds; the next one let through says how many were left
    out.  Other events (one per login attempt, for fail2ban) all pass.
    """

    def __init__(self, observer, clock, burst: int = BURST, interval: float = INTERVAL) -> None:
        self.observer = observer
        self.clock = clock
        self.burst = burst
        self.interval = interval
        # kind -> [window start, passed in window, left out since last passed]
        self._kinds: collections.OrderedDict[tuple, list] = collections.OrderedDict()

    def __call__(self, event: dict[str, Any]) -> None:
        failure = _failureOf(event)
        if failure is None:
            self.observer(event)
            return
        where = failure.frames[-1][1:3] if failure.frames else None
        kind = (event.get("log_namespace"), event.get("log_format"), failure.type, where)
        now = self.clock.seconds()
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = [now, 0, 0]
            while len(self._kinds) > 1000:
                self._kinds.popitem(last=False)
        if now - state[0] >= self.interval:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return
        state[1] += 1
        if state[2]:
            event = dict(event, maild_suppressed=state[2])
            state[2] = 0
        self.observer(event)


def logObserver(destination: Path | IO[str], settings, clock) -> ILogObserver:
    """
    The daemon's log observer, writing to C{destination}: a file path
    (rotated as C{settings} says, a C{[log]} table) or an open text stream.
    """
    if isinstance(destination, Path):
        destination = destination.resolve()
        destination.parent.mkdir(parents=True, exist_ok=True)
        out: Any = LogFile(
            destination.name,
            str(destination.parent),
            rotateLength=settings.rotate_size,
            maxRotatedFiles=settings.max_files,
        )
        _rotateOnSIGUSR1(out, clock)
    else:
        out = destination
    return FailureRateLimit(FileLogObserver(out, formatOneLine), clock)


def _rotateOnSIGUSR1(logFile: LogFile, clock) -> None:
    # As twistd does for its own log file (logrotate's "postrotate").
    if threading.current_thread() is not threading.main_thread():
        return
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda *_: clock.callFromThread(logFile.rotate))


def twistdDestination(twistdOptions) -> Path | IO[str] | None:
    """
    Where twistd was told to log: a file, standard output (C{-n} without
    C{--logfile}, or C{--logfile -}), or None for syslog (left to twistd).
    """
    if twistdOptions is None or twistdOptions.get("syslog"):
        return None
    name = twistdOptions.get("logfile")
    if name == "-" or (not name and twistdOptions.get("nodaemon")):
        return sys.stdout
    return Path(name or "twistd.log")
