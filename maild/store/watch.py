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

from pathlib import Path

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
    @param useInotify: False to poll even where inotify works (a shared
        file system: inotify does not see other machines' writes).
    @param events: a L{maild.cluster.RedisLink}: change notices published
        by every process on the data folder (this one's own changes are
        sent there too); polling takes over while it is down.
    @param root: the store's root, to which folder paths in notices are
        relative (nodes may mount the shared folder in different places).
    """

    def __init__(
        self,
        reactor,
        pollInterval: float = 5.0,
        settle: float = 0.02,
        useInotify: bool = True,
        root: Path | None = None,
        events=None,
    ) -> None:
        self.reactor = reactor
        self.root = root
        self.events = events
        if events is not None:
            useInotify = False
            events.listen("folder", self._notice)
            # Notices sent while the link was down are lost: look again.
            events.listen("reconnected", lambda _: self._refreshAll())
        self.pollInterval = pollInterval
        self.settle = settle
        self._watched: dict[Folder, int] = {}
        self._pending: dict[Folder, object] = {}
        self._notifier = None
        # Whether inotify may still be tried (it is set up on first use).
        self._useInotify = useInotify and inotify is not None
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
        if not self._watchWithInotify(folder):
            self._startPolling()

    def _watchWithInotify(self, folder: Folder) -> bool:
        """
        Watch C{folder}'s directories with inotify.

        @return: whether inotify watches it now.
        """
        notifier = self._inotify()
        if notifier is None:
            return False
        mask = inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM | inotify.IN_DELETE
        try:
            for sub in ("new", "cur"):
                notifier.watch(
                    FilePath(str(folder.path / sub)),
                    mask=mask,
                    callbacks=[lambda _, path, mask, folder=folder: self._event(folder, mask)],
                )
        except Exception as e:
            log.warn("cannot watch {path} ({error}): polling it instead", path=str(folder.path), error=e)
            return False
        return True

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
                except (KeyError, OSError):
                    # Its directory was deleted: inotify forgot it already.
                    pass

    def _event(self, folder: Folder, mask: int) -> None:
        if mask & inotify.IN_DELETE_SELF and self._notifier is not None:
            # A watched directory was deleted (DELETE or RENAME of the
            # folder).  Twisted's INotify then closes itself, forgetting
            # every other folder's watch: start a new one for the folders
            # still there, once this event is handled.
            self._notifier = None
            self.reactor.callLater(0, self._renewInotify)
        self._changed(folder)

    def _renewInotify(self) -> None:
        if not self._useInotify or self._notifier is not None:
            return
        for folder in list(self._watched):
            if not (folder.path / "cur").is_dir():
                continue
            if not self._watchWithInotify(folder):
                self._startPolling()
            # Nothing watched between the old INotify closing and this new
            # watch (the DELETE's reply has gone out by then, so a client
            # may already have acted): a message delivered meanwhile makes
            # no event on the new watch.  Look once to catch up.
            self._changed(folder)

    def _changed(self, folder: Folder) -> None:
        if folder in self._watched and folder not in self._pending:
            self._pending[folder] = self.reactor.callLater(self.settle, self._refresh, folder)

    def _refresh(self, folder: Folder) -> None:
        self._pending.pop(folder, None)
        try:
            folder.refresh()
        except OSError as e:
            log.error("cannot look at {path}: {error}", path=str(folder.path), error=e)
            return
        if folder.lookAgainSoon:
            # Another process was changing it: its end may make no event
            # (its last rename was what we saw), so look again shortly.
            self._changed(folder)

    # Between processes (Redis) ----------------------------------------------

    def tellOthers(self, folder: Folder) -> None:
        """
        Publish that this process changed C{folder}.
        """
        self.tellOthersAbout(folder.path)

    def tellOthersAbout(self, path: Path) -> None:
        if self.events is None or self.root is None:
            return
        key = path.relative_to(self.root).as_posix()
        self.events.publish("folder", key).addErrback(lambda _: None)

    def _notice(self, key: str) -> None:
        if self.root is None or ".." in key.split("/"):
            return
        path = self.root / key
        for folder in self._watched:
            if folder.path == path:
                self._changed(folder)

    def _startPolling(self) -> None:
        if self._poller is None:
            self._poller = task.LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.pollInterval, now=False)

    def _poll(self) -> None:
        if self.events is not None and self.events.up:
            # The notices say when to look.
            return
        self._refreshAll()

    def _refreshAll(self) -> None:
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
