"""
Noticing changes that other programs make to a folder: another maild
sharing the data folder, Dovecot, procmail, a Maildir tool.

Changes made through this process's store are announced at once without
any of this.  Watching is for sessions that wait without sending commands
(IMAP IDLE): on Linux the folder's C{new/} and C{cur/} are watched with
inotify; elsewhere, or where inotify is unavailable (NFS does not report
other machines' changes), watched folders are looked at every few seconds.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from maild.store.folder import Folder

log = Logger()

try:
    from twisted.internet import inotify
except ImportError:  # not Linux
    inotify = None


class FolderWatcher:
    """
    Refreshes watched folders when their directories change.

    @param pollInterval: seconds between looks at the watched folders when
        inotify cannot be used.
    @param settle: seconds to wait after an event before refreshing, so a
        burst of changes costs one refresh.
    """

    def __init__(self, reactor, pollInterval: float = 5.0, settle: float = 0.02) -> None:
        self.reactor = reactor
        self.pollInterval = pollInterval
        self.settle = settle
        self._watched: dict[Folder, int] = {}
        self._pending: dict[Folder, object] = {}
        self._notifier = None
        # Whether inotify may still be tried (it is set up on first use).
        self._useInotify = inotify is not None
        self._poller: task.LoopingCall | None = None

    def _inotify(self):
        """
        The inotify reader, made on first use; None where there is none.
        """
        if self._notifier is None and self._useInotify:
            try:
                self._notifier = inotify.INotify(self.reactor)
                self._notifier.startReading()
            except Exception as e:  # no inotify instance left, say
                log.warn("inotify unavailable ({error}): polling folders instead", error=e)
                self._notifier = None
                self._useInotify = False
        return self._notifier

    def watch(self, folder: Folder) -> None:
        """
        Start watching C{folder} (counted: as many L{unwatch} calls end it).
        """
        count = self._watched.get(folder, 0)
        self._watched[folder] = count + 1
        if count:
            return
        notifier = self._inotify()
        if notifier is not None:
            mask = inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM | inotify.IN_DELETE
            try:
                for sub in ("new", "cur"):
                    notifier.watch(
                        FilePath(str(folder.path / sub)),
                        mask=mask,
                        callbacks=[lambda _, path, mask, folder=folder: self._changed(folder)],
                    )
                return
            except Exception as e:
                log.warn("cannot watch {path} ({error}): polling it instead", path=str(folder.path), error=e)
        self._startPolling()

    def unwatch(self, folder: Folder) -> None:
        count = self._watched.get(folder, 0) - 1
        if count > 0:
            self._watched[folder] = count
            return
        self._watched.pop(folder, None)
        pending = self._pending.pop(folder, None)
        if pending is not None and pending.active():
            pending.cancel()
        if self._notifier is not None:
            for sub in ("new", "cur"):
                try:
                    self._notifier.ignore(FilePath(str(folder.path / sub)))
                except KeyError:
                    pass  # never watched (the folder was gone already)

    def _changed(self, folder: Folder) -> None:
        if folder in self._watched and folder not in self._pending:
            self._pending[folder] = self.reactor.callLater(self.settle, self._refresh, folder)

    def _refresh(self, folder: Folder) -> None:
        self._pending.pop(folder, None)
        try:
            folder.refresh()
        except OSError as e:
            log.error("cannot look at {path}: {error}", path=str(folder.path), error=e)

    def _startPolling(self) -> None:
        if self._poller is None:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.pollInterval, now=False)

    def _poll(self) -> None:
        for folder in list(self._watched):
            self._refresh(folder)

    def stop(self) -> None:
        for pending in self._pending.values():
            if pending.active():
                pending.cancel()
        self._pending.clear()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        # Stopped for good: anything watched later is polled.
        self._useInotify = False
