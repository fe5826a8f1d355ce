"""
Log formats beyond twistd's own text lines: JSON lines on request
(C{--log-format json}), and the JSON records a worker sends its parent
(L{maild.workers}), which the parent logs as its own events.
"""

from __future__ import annotations

import io
import json

from twisted.logger import (
    ILogObserver,
    eventFromJSON,
    globalLogPublisher,
    jsonFileLogObserver,
)

# jsonFileLogObserver writes each record as this separator, the JSON
# text (which never holds a raw newline) and a newline.
RECORD_SEPARATOR = b"\x1e"


def workerLogObserver() -> ILogObserver:
    """
    twistd's C{--logger} for a worker: every event as a JSON record on the
    worker's standard output, which its parent reads.
    """
    # Line-buffered: each record reaches the parent as it is written.
    return jsonFileLogObserver(io.open(1, "w", buffering=1, encoding="utf-8", closefd=False))


class WorkerLogReader:
    """
    Reads a worker's JSON records and publishes them as events of this
    process, marked with the worker's name.
    """

    def __init__(self, system: str, publisher=globalLogPublisher) -> None:
        self.system = system
        self.publisher = publisher
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        records = (self._partial + data).split(b"\n")
        self._partial = records.pop()
        for record in records:
            self._publish(record.lstrip(RECORD_SEPARATOR))

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
