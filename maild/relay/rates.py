"""
Recipients in other domains per user and hour (C{[relay]
recipients_per_hour}), counted for the whole data folder rather than per
process.

Each process counts its own recipients at once, exactly, and every
C{rescan_interval} seconds publishes them as counts per minute in
C{<data>/queue/rates/<daemon>.json} (a name drawn at start), reading what
the others published.  A user's count is this process's plus the others' as last
read: the limit holds across C{--workers} and nodes on the shared folder,
give or take what the others accepted since their last publication, with
no lock and no file or network access when RCPT is answered.  The file of
a process that stopped goes once it is older than the window.
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path


class RecipientCounts:
    """
    @param folder: where every process publishes its counts.
    @param name: this process's file name there (without C{.json}).
    @param window: seconds a recipient counts for.
    """

    def __init__(self, folder: Path, name: str, window: float = 3600.0) -> None:
        self.folder = folder
        self.name = name
        self.window = window
        self._mine: dict[str, deque[float]] = {}
        self._others: dict[str, int] = {}
        self._published: bytes | None = None

    def count(self, user: str, now: float) -> int:
        """
        The recipients C{user} gave in the last window, by every process.
        """
        return len(self._prune(user, now)) + self._others.get(user, 0)

    def add(self, user: str, now: float) -> None:
        self._mine.setdefault(user, deque()).append(now)

    def _prune(self, user: str, now: float) -> deque[float]:
        times = self._mine.get(user)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._mine[user]
        return times

    def snapshot(self, now: float) -> bytes:
        """
        This process's counts as published: per user, per minute.
        """
        published: dict[str, dict[str, int]] = {}
        for user in list(self._mine):
            for moment in self._prune(user, now):
                minutes = published.setdefault(user, {})
                minute = str(int(moment // 60))
                minutes[minute] = minutes.get(minute, 0) + 1
        return json.dumps(published, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def exchange(self, snapshot: bytes, now: float) -> dict[str, int]:
        """
        Publish C{snapshot} and read the others' counts (blocking: run in
        a thread).

        @return: the recipients per user the other processes published
            for the window ending at C{now}.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        own = self.folder / f"{self.name}.json"
        if snapshot != self._published:
            temporary = own.with_suffix(".tmp")
            temporary.write_bytes(snapshot)
            os.replace(temporary, own)
            self._published = snapshot
        others: dict[str, int] = {}
        for entry in os.scandir(self.folder):
            if entry.name == own.name or not entry.name.endswith(".json"):
                continue
            try:
                if entry.stat().st_mtime < now - self.window:
                    # A process that stopped (or died) that long ago.
                    os.unlink(entry.path)
                    continue
                published = json.loads(Path(entry.path).read_bytes())
            except (OSError, ValueError, RecursionError):
                continue
            if not isinstance(published, dict):
                continue
            for user, minutes in published.items():
                if not isinstance(minutes, dict):
                    continue
                for minute, n in minutes.items():
                    # A minute any part of which is in the window counts.
                    if minute.isascii() and minute.isdigit() and isinstance(n, int) and (int(minute) + 1) * 60 > now - self.window:
                        others[user] = others.get(user, 0) + n
        return others

    def update(self, others: dict[str, int]) -> None:
        self._others = others
