"""
The daemon's log.

One line per event, however bad the input that caused it, in files that
cannot fill the disk: twistd writes its log through an C{ILogObserver}
component of the application when there is one (the way a .tac file
chooses its log), so the top service sets one built by L{logObserver}
(L{useAsTwistdLog}): the file twistd was told (C{--logfile},
C{twistd.log} when it daemonizes) or C{[log] file}, rotated at C{[log]
rotate_size} octets with at most C{[log] max_files} old files kept; or
standard output under C{-n}.

Workers (L{maild.workers}) send their events to their parent, which
writes them in its log: as lines the worker formatted already when the
parent writes to a file or a stream (it only copies them), else (syslog)
as JSON records, which the parent logs as its own events.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    eventAsJSON,
    eventAsText,
    eventFromJSON,
    formatEvent,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.components import Componentized
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
    text = getattr(failure.type, "__name__", "Error")
    # (A failure relayed from a worker as JSON has lost its exception.)
    if isinstance(failure.value, BaseException):
        message = failure.getErrorMessage().strip().splitlines()
        text += f": {message[0][:300] if message else ''}"
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
    described at its end, newlines escaped, and cut at L{LINE_LIMIT}.
    """
    failure = _failureOf(event)
    if failure is not None and event.get("isError") and event.get("log_format") == "{log_text}":
        # A legacy log.err(): its text holds the traceback; say why instead.
        event = dict(event, log_format="{why}", why=event.get("why") or "Unhandled Error")
        event.pop("log_flattened", None)
    text = _eventAsText(event, timeFormat)
    if not text:
        return None
    if failure is not None:
        text += ": " + describeFailure(failure)
    if event.get("maild_suppressed"):
        text += f" ({event['maild_suppressed']} more like it left out)"
    line = text.replace("\r", "\\r").replace("\n", "\\n")
    if len(line) > LINE_LIMIT:
        line = line[:LINE_LIMIT] + " [cut]"
    return line + "\n"


def _eventText(event: dict[str, Any]) -> str | None:
    """
    The event's own text, as C{formatEvent} makes it, by C{str.format_map}
    where that gives the same (a text format without C{()} calls, of an
    event not flattened): Twisted's formatter, which also calls, is
    written in Python and took about 0.1 ms for a line of eight fields,
    a tenth of what a message cost the relay or the SMTP server.

    @return: None where only C{formatEvent} can tell.
    """
    logFormat = event.get("log_format")
    if type(logFormat) is not str or "()" in logFormat or "log_flattened" in event:
        return None
    try:
        return logFormat.format_map(event)
    except Exception:
        # Twisted's formatter says what is wrong with the event.
        return None


def _eventAsText(event: dict[str, Any], timeFormat: str | None) -> str:
    """
    C{eventAsText(event, includeTraceback=False)}, with the time as
    L{_formatSecond} writes it and the text from L{_eventText} when it can.
    """
    text = _eventText(event)
    if text is None:
        return eventAsText(event, includeTraceback=False, formatTime=lambda t: _formatSecond(t, timeFormat))
    if not text:
        return text
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    return f"{_formatSecond(event.get('log_time'), timeFormat)} [{system}] {text}"


@functools.lru_cache(maxsize=4)
def _formatWholeSecond(second: int, timeFormat: str) -> str:
    return formatTime(second, timeFormat)


def _formatSecond(when: float | None, timeFormat: str | None) -> str:
    """
    C{formatTime}, remembering the last seconds' text: it works out the
    local time zone for each call, which cost a busy relay or SMTP server
    a twentieth of its CPU (a line per message).  Only for formats
    without fractions of a second, which all but C{%f} are.
    """
    if when is None or timeFormat is None or "%f" in timeFormat:
        return formatTime(when, timeFormat)
    # The second datetime.fromtimestamp takes, which rounds to the
    # microsecond (half to even) first: 1.9999996 is 2.
    fraction, whole = math.modf(when)
    microseconds = round(fraction * 1e6)
    if microseconds >= 1_000_000:
        whole += 1
    elif microseconds < 0:
        whole -= 1
    return _formatWholeSecond(int(whole), timeFormat)


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
        where = tuple(failure.frames[-1][1:3]) if failure.frames else None
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
    Its C{output} is the stream it writes to.
    """
    out = logOutput(destination, settings, clock)
    observer = FailureRateLimit(FileLogObserver(out, lineFormatter(settings.format)), clock)
    observer.output = out
    return observer


def lineFormatter(format: str):
    """
    What turns an event into a line of the log, for C{[log] format}.
    """
    return formatJSONLine if format == "json" else formatOneLine


def logOutput(destination: Path | IO[str], settings, clock) -> IO[str]:
    """
    The stream log lines are written to: C{destination} itself, or the
    file at that path, rotated as C{settings} says.
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
    return out


def formatJSONLine(event: dict[str, Any]) -> str:
    """
    An event as one line of JSON (twisted.logger's own encoding, all its
    fields), with its text rendered under C{message} for log collectors
    and its failure (if any) described as in L{formatOneLine} under
    C{failure} rather than as a traceback.
    """
    failure = _failureOf(event)
    text = _eventText(event)
    event = dict(event, message=formatEvent(event) if text is None else text)
    if failure is not None:
        event = {k: v for k, v in event.items() if k not in ("log_failure", "failure")}
        event["failure"] = describeFailure(failure)
    line = eventAsJSON(event)
    if len(line) > LINE_LIMIT * 4:
        line = eventAsJSON({
            "log_format": "{text}",
            "text": formatOneLine(event, None) or "",
            "log_level": event.get("log_level"),
            "log_namespace": event.get("log_namespace"),
            "log_time": event.get("log_time"),
        })
    return line + "\n"


def _rotateOnSIGUSR1(logFile: LogFile, clock) -> None:
    # As twistd does for its own log file (logrotate's "postrotate").
    if threading.current_thread() is not threading.main_thread():
        return
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda *_: clock.callFromThread(logFile.rotate))


def useAsTwistdLog(parent, destination: Path | IO[str] | None, settings, clock) -> IO[str] | None:
    """
    Make C{destination} (see L{logObserver}) the log of the twistd
    application C{parent}, which a top service is being added to; None
    leaves twistd's own choice.

    @return: the stream log lines go to, if this chose it.
    """
    if destination is not None and isinstance(parent, Componentized):
        observer = logObserver(destination, settings, clock)
        parent.setComponent(ILogObserver, observer)
        return observer.output
    return None


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


# jsonFileLogObserver writes each record as this separator, the JSON
# text (which never holds a raw newline) and a newline.
RECORD_SEPARATOR = b"\x1e"
# A worker writes a line formatted for its parent's log after this one.
LINE_SEPARATOR = b"\x1f"

# Set in a worker's environment by its parent: the name its lines are
# marked with, and the format of its parent's log lines (none: JSON
# records for the parent to format).
WORKER_NAME_ENV = "MAILD_WORKER_NAME"
WORKER_LOG_FORMAT_ENV = "MAILD_WORKER_LOG_FORMAT"


def workerLogObserver() -> ILogObserver:
    """
    twistd's C{--logger} for a worker: every event on the worker's standard
    output, which its parent reads.  When the parent says how its log
    lines look, each event is formatted here, marked with the worker's
    name (as C{[worker 2]}), for the parent to copy as it is: a parent
    that parsed, formatted and wrote every worker's events itself spent
    0.08 ms of CPU per SMTP message, a tenth of what the message cost in
    all.  Else (a parent logging to syslog) it is a JSON record.
    """
    from twisted.internet import reactor

    # Line-buffered: each line reaches the parent as it is written.
    out = io.open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    lineFormat = os.environ.get(WORKER_LOG_FORMAT_ENV)
    if lineFormat not in ("text", "json"):
        return jsonFileLogObserver(out)
    name = os.environ.get(WORKER_NAME_ENV, "worker")
    formatLine = lineFormatter(lineFormat)
    marker = LINE_SEPARATOR.decode("ascii")

    def formatMarked(event: dict[str, Any]) -> str | None:
        line = formatLine(dict(event, log_system=name))
        return marker + line if line else None

    return FailureRateLimit(FileLogObserver(out, formatMarked), reactor)


class WorkerLogReader:
    """
    Reads what a worker writes on its standard output: lines formatted
    for the log, written to C{output} as they are, and JSON records (or,
    before its logging starts, any text), published as events of this
    process marked with the worker's name.
    """

    def __init__(self, system: str, publisher=globalLogPublisher, output: IO[str] | None = None) -> None:
        self.system = system
        self.publisher = publisher
        self.output = output
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        records = (self._partial + data).split(b"\n")
        self._partial = records.pop()
        for record in records:
            if record.startswith(LINE_SEPARATOR) and self.output is not None:
                self.output.write(record[1:].decode("utf-8", "replace") + "\n")
            else:
                self._publish(record.lstrip(RECORD_SEPARATOR + LINE_SEPARATOR))

    def _publish(self, record: bytes) -> None:
        text = record.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except (ValueError, json.JSONDecodeError):
            event = {"log_format": "{line}", "line": text, "log_level": None}
        event["log_system"] = self.system
        self.publisher(event)
