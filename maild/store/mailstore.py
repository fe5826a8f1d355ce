"""
The store: every user's Maildir under C{<data>/mail/<domain>/<user>/},
the delivery spool C{<data>/tmp/}, and the one shared L{Folder} index per
open folder.
"""

from __future__ import annotations

import collections
import errno
import os
import shutil
import time
import weakref
from pathlib import Path
from typing import Sequence

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from maild.names import splitAddress
from maild.store import maildir
from maild.store.delivery import (
    Committer,
    FolderMissing,
    IncomingMessage,
    Spool,
    Target,
    placeFile,
    storageFailure,
)
from maild.store.files import folderMustExist, fsyncDirectory, replaceFile
from maild.store.locking import ExclusiveHold, dotLocked, locked
from maild.store.folder import SETTABLE, Folder, MessageGone
from maild.store.interfaces import IMailStore, IUserMailbox
from maild.store.keywords import FILE_NAME as KEYWORDS_FILE
from maild.store.uidlist import FILE_NAME as UIDLIST_FILE, UidList, UidValidities
from maild.store.watch import FolderWatcher
from maild.store.maildir import INBOX, folderDirName, folderNameFromDir

log = Logger()

# Created (and subscribed) for every user, with their RFC 6154 attribute.
SPECIAL_FOLDERS = {
    "Archive": "\\Archive",
    "Drafts": "\\Drafts",
    "Junk": "\\Junk",
    "Sent": "\\Sent",
    "Trash": "\\Trash",
}

SUBSCRIPTIONS = "subscriptions"
SUBSCRIPTIONS_LOCK = "maild-subscriptions.lock"
MAILDROP_LOCK = "maild-pop3.lock"


class NoSuchFolder(Exception):
    pass


class FolderExists(Exception):
    pass


class FolderError(Exception):
    """
    The operation is not allowed on this folder (deleting INBOX, say).
    """


def makeMaildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


@implementer(IMailStore)
class MailStore:
    """
    @cvar KEEP_MESSAGES: how many messages the recently used folders that
        nobody holds may keep loaded, in all (an index costs some tens of
        octets per message).
    @cvar KEEP_FOLDERS: and how many such folders at most.

    @param dataDir: the data folder.
    @param committer: makes deliveries durable (None for a store that
        only manages folders, as the command line does).
    """

    KEEP_MESSAGES = 200_000
    KEEP_FOLDERS = 64

    def __init__(
        self,
        dataDir: Path,
        committer: Committer | None = None,
        watch: str = "inotify",
        events=None,
    ) -> None:
        self.root = dataDir / "mail"
        self.spool = dataDir / "tmp"
        self.committer = committer
        self._spool = Spool(self.spool, committer.reactor) if committer is not None else None
        self.watcher = (
            FolderWatcher(
                committer.reactor, useInotify=watch == "inotify", root=self.root, events=events
            )
            if committer is not None
            else None
        )
        self._folders: weakref.WeakValueDictionary[Path, Folder] = (
            weakref.WeakValueDictionary()
        )
        self._recent: collections.OrderedDict[Path, Folder] = collections.OrderedDict()

    def userRoot(self, address: str) -> Path:
        """
        The INBOX directory of C{address} (checked: it cannot leave the
        store).
        """
        localPart, domain = splitAddress(address)
        return self.root / domain / localPart

    @staticmethod
    def _folderPath(root: Path, folder: str) -> Path:
        return root if folder == INBOX else root / folderDirName(folder)

    def mailbox(self, address: str) -> "UserMailbox":
        return UserMailbox(self, address, self.userRoot(address))

    def folderAt(self, name: str, path: Path, uidValidities: UidValidities | None = None) -> Folder:
        """
        The shared index of the folder in C{path}, loaded on first use and
        kept while anybody holds it, and for a while after: the folders used
        last stay loaded (up to L{KEEP_MESSAGES} messages in all), so that a
        client reconnecting, or a POP3 login, does not list a big folder
        again.
        """
        folder = self._folders.get(path)
        if folder is None:
            folder = Folder(name, path, self, uidValidities)
            if self.watcher is not None:
                folder.onOwnChange = self.watcher.tellOthers
            self._folders[path] = folder
        self._recent[path] = folder
        self._recent.move_to_end(path)
        kept = sum(len(f) for f in self._recent.values())
        while kept > self.KEEP_MESSAGES or len(self._recent) > self.KEEP_FOLDERS:
            _, dropped = self._recent.popitem(last=False)
            kept -= len(dropped)
        return folder

    def loadedFolder(self, path: Path) -> Folder | None:
        return self._folders.get(path)

    def folderMoved(self, path: Path) -> None:
        """
        The folder in C{path} was deleted or renamed: its sessions (in
        IDLE too, where no file event may come) learn it at the reactor's
        next turn, after the command that did it has answered.
        """
        folder = self._folders.get(path)
        if folder is not None and self.committer is not None:
            self.committer.reactor.callLater(0, folder.refresh)

    def incoming(self, head: bytes = b"") -> IncomingMessage:
        """
        Start receiving a message (CRLF line endings in, LF on disk).
        """
        return IncomingMessage(self._spool, head)

    def deliver(
        self, message: IncomingMessage, recipients: Sequence[str], folder: str = INBOX
    ) -> defer.Deferred:
        """
        Store C{message} once in C{folder} (the INBOX, or a special folder
        such as C{Junk}) of each recipient (hard links), durably.

        @return: a Deferred firing with the paths of the copies when they
            are all on disk, or failing with
            L{maild.store.delivery.DeliveryFailed}.
        """
        targets = [Target(self._folderPath(self.userRoot(r), folder)) for r in recipients]
        return self.place(message, targets)

    def place(
        self, message: IncomingMessage, targets: Sequence[Target], origin=None
    ) -> defer.Deferred:
        """
        Put C{message} durably into C{targets}, and tell the open folders.
        """
        d = self.committer.commit(message, targets)

        def announce(paths: list[Path]) -> list[Path]:
            for path in paths:
                folder = self._folders.get(path.parent.parent)
                if folder is not None:
                    try:
                        folder.addPlaced([path], origin=origin)
                    except FolderMissing:
                        pass  # deleted meanwhile: whoever placed it is told
                elif self.watcher is not None:
                    # Not open here, but perhaps in another process.
                    self.watcher.tellOthersAbout(path.parent.parent)
            return paths

        return d.addCallback(announce)

    def copy(
        self, source: Folder, indexes: Sequence[int], destination: Folder, origin=None
    ) -> defer.Deferred:
        """
        Copy messages (by index in C{source}) into C{destination} as hard
        links, keeping their flags and keywords, durably (the destination's
        C{new/} is synced once, in a worker thread), and number them there
        in this order.  They are \\Recent there (RFC 3501 section 6.4.7):
        in C{new/}, with their flags in their names.

        @return: a Deferred firing with C{(source UID, destination UID)}
            pairs for the messages copied; those expunged meanwhile by
            another process are left out.
        @raise maild.store.keywords.TooManyKeywords: if the destination has
            no letter left for a keyword.
        """
        plan = []
        # By UID: reading a size from a file that another process renamed
        # lists the source again, which may move every index after it.
        for uid in [source.uids[i] for i in indexes]:
            i = source.position(uid)
            if i is None:
                continue  # expunged by the listing a message before it made
            try:
                size, crlfSize = source.sizes(i)
            except MessageGone:
                continue
            i = source.position(uid)
            names = source.keywordNames(i)
            try:
                letters = destination.keywords.letters(names) if names else ""
            except FileNotFoundError:
                # Deleted since it was looked up.
                return defer.fail(storageFailure(FolderMissing(str(destination.path))))
            base = maildir.newBaseName(size, crlfSize)
            bits = source.flags[i] & SETTABLE & ~maildir.FORWARDED  # now a keyword
            name = maildir.curFileName(base, bits, letters) if bits or letters else base
            plan.append(
                (uid, source.filePath(i), destination.path / "new" / name)
            )
        d = self.committer.callInPool(_linkAll, plan, destination.path / "new")

        def linked(done: list[tuple[int, Path]]) -> list[tuple[int, int]]:
            try:
                uids = destination.addPlaced([path for _, path in done], origin=origin)
            except FolderMissing as e:
                raise storageFailure(e)
            return [(uid, new) for (uid, _), new in zip(done, uids)]

        return d.addCallback(linked)

    def removeStaleTemporaries(self, grace: float, now: float | None = None) -> int:
        """
        Remove files older than C{grace} seconds from the spool and from
        every folder's C{tmp/}: what a crash left behind.

        Age is the inode's change time (as Dovecot's unlink_old_files()):
        a file being written now may carry an old modification time (an
        APPEND's INTERNALDATE is set before the file is renamed into
        place), but its ctime is that of the last write, rename or utime.

        @param now: the current time (a test's), default the clock's.
        @return: how many were removed.
        """
        removed = 0
        limit = (time.time() if now is None else now) - grace
        tmpDirs = [self.spool]
        if self.root.is_dir():
            for domain in self.root.iterdir():
                for user in domain.iterdir() if domain.is_dir() else ():
                    tmpDirs.append(user / "tmp")
                    for sub in user.glob(".*/tmp"):
                        tmpDirs.append(sub)
        for tmp in tmpDirs:
            try:
                entries = list(os.scandir(tmp))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_file() and entry.stat().st_ctime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    pass
        if removed:
            log.info("removed {count} stale temporary files", count=removed)
        return removed


def _linkAll(plan: list[tuple[int, Path, Path]], directory: Path) -> list[tuple[int, Path]]:
    """
    Place the copies of a COPY and sync their folder; those whose source
    is gone (expunged meanwhile) are left out.

    @raise DeliveryFailed: if any cannot be placed (a full disk, the folder
        deleted meanwhile): then none of them stays.
    """
    done = []
    try:
        for uid, source, target in plan:
            try:
                placeFile(source, target, move=False)
            except FileNotFoundError:
                if not target.parent.is_dir():
                    raise FolderMissing(str(target.parent)) from None
                continue  # expunged meanwhile
            done.append((uid, target))
        if done:
            fsyncDirectory(directory)
    except OSError as e:
        for _, target in done:
            try:
                os.unlink(target)
            except OSError:
                pass
        raise storageFailure(e) from e
    return done


@implementer(IUserMailbox)
class UserMailbox:
    """
    One user's folders.
    """

    def __init__(self, store: MailStore, address: str, root: Path) -> None:
        self.store = store
        self.address = address
        self.root = root
        self.uidValidities = UidValidities(root)

    def ensureExists(self) -> None:
        """
        Create the INBOX and the special folders (subscribed) if missing.
        """
        makeMaildir(self.root)
        subscribed = set(self.subscriptions())
        missing = []
        for name in SPECIAL_FOLDERS:
            path = self.root / folderDirName(name)
            if not path.is_dir():
                makeMaildir(path)
                (path / "maildirfolder").touch()
                missing.append(name)
        if missing and not subscribed.issuperset(missing):
            self._editSubscriptions(lambda names: names + sorted(set(missing) - set(names)))

    def folderPath(self, name: str) -> Path:
        return self.root / folderDirName(name)

    def folderNames(self) -> list[str]:
        """
        Every folder, INBOX first.
        """
        names = [INBOX]
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return names
        for entry in sorted(entries):
            name = folderNameFromDir(entry)
            if name is not None and (self.root / entry / "cur").is_dir():
                names.append(name)
        return names

    def exists(self, name: str) -> bool:
        return (self.folderPath(name) / "cur").is_dir()

    def folder(self, name: str) -> Folder:
        """
        The shared index of folder C{name}.

        @raise NoSuchFolder: if it does not exist.
        """
        name = maildir.validateFolderName(name)
        path = self.folderPath(name)
        if name == INBOX:
            makeMaildir(path)
        elif not (path / "cur").is_dir():
            raise NoSuchFolder(name)
        return self.store.folderAt(name, path, self.uidValidities)

    def specialUse(self, name: str) -> str | None:
        return SPECIAL_FOLDERS.get(name)

    def lockMaildrop(self) -> ExclusiveHold | None:
        """
        Take the POP3 maildrop lock (RFC 1939 section 8: one session at a
        time), or return None when another session or process holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        return ExclusiveHold.tryAcquire(self.root / MAILDROP_LOCK)

    def create(self, name: str) -> None:
        """
        @raise FolderExists: if it exists already.
        """
        name = maildir.validateFolderName(name)
        path = self.folderPath(name)
        if name == INBOX or (path / "cur").is_dir():
            raise FolderExists(name)
        with folderMustExist(path):
            makeMaildir(path)
            (path / "maildirfolder").touch()

    def delete(self, name: str) -> None:
        """
        Remove a folder and its messages (its subfolders stay).
        """
        name = maildir.validateFolderName(name)
        if name == INBOX:
            raise FolderError("INBOX cannot be deleted")
        path = self.folderPath(name)
        if not (path / "cur").is_dir():
            raise NoSuchFolder(name)
        # Rename first so that the folder vanishes at once, then remove it.
        doomed = self.root / f"..deleted-{time.time_ns()}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            raise NoSuchFolder(name) from None  # another process was first
        self.store.folderMoved(path)
        shutil.rmtree(doomed, ignore_errors=True)
        self._editSubscriptions(lambda names: [s for s in names if s != name])

    def rename(self, old: str, new: str) -> None:
        """
        Rename a folder and its subfolders.  Renaming INBOX moves its
        messages into the new folder and leaves INBOX empty (RFC 3501
        section 6.3.5).
        """
        old = maildir.validateFolderName(old)
        new = maildir.validateFolderName(new)
        if new == INBOX:
            raise FolderExists(new)
        if old == INBOX:
            with folderMustExist(self.folderPath(new)):
                self._renameInbox(new)
            return
        if not self.exists(old):
            raise NoSuchFolder(old)
        if self.exists(new):
            raise FolderExists(new)
        prefix = old + maildir.IMAP_DELIMITER
        moves = [(old, new)] + [
            (name, new + name[len(old) :])
            for name in self.folderNames()
            if name.startswith(prefix)
        ]
        for source, target in moves:
            if self.exists(target):
                raise FolderExists(target)
        for source, target in moves:
            try:
                os.rename(self.folderPath(source), self.folderPath(target))
            except FileNotFoundError:
                # Deleted or renamed by another process meanwhile.
                if source == old:
                    raise NoSuchFolder(old) from None
                continue
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise FolderExists(target) from None  # made by another process meanwhile
            self.store.folderMoved(self.folderPath(source))
            # The name may have had any UIDVALIDITY before (RFC 3501
            # section 2.3.1.1): clients must not take these UIDs for those.
            try:
                UidList(self.folderPath(target), self.uidValidities).renew()
            except FileNotFoundError:
                pass  # moved on again by another process
        renamed = dict(moves)
        self._editSubscriptions(lambda names: [renamed.get(s, s) for s in names])

    def _renameInbox(self, new: str) -> None:
        if self.exists(new):
            raise FolderExists(new)
        target = self.folderPath(new)
        makeMaildir(target)
        (target / "maildirfolder").touch()
        # The messages' keyword letters mean what INBOX's keyword file says:
        # the new folder takes the file with them.
        try:
            keywords = (self.root / KEYWORDS_FILE).read_bytes()
        except FileNotFoundError:
            pass
        else:
            # Under the folder's UID list lock, as Dovecot writes keywords.
            with dotLocked(target / UIDLIST_FILE):
                replaceFile(target / KEYWORDS_FILE, keywords)
        for sub in ("new", "cur"):
            for name in os.listdir(self.root / sub):
                try:
                    os.rename(self.root / sub / name, target / sub / name)
                except FileNotFoundError:
                    pass  # expunged meanwhile, or moved by another process

    # Subscriptions: the file Dovecot keeps, one name per line, in the form
    # Dovecot 2.3 writes for this layout.

    def subscriptions(self) -> list[str]:
        try:
            text = (self.root / SUBSCRIPTIONS).read_text("utf-8")
        except FileNotFoundError:
            return []
        names = []
        lines = text.splitlines()
        if lines and lines[0].startswith("V\t"):
            # Dovecot's versioned form: a header, a blank line, then IMAP
            # names with a tab as the hierarchy separator.
            lines = [line.replace("\t", maildir.IMAP_DELIMITER) for line in lines[2:]]
            readings = [[line] for line in lines]
        else:
            # Dovecot's form for Maildir++: storage names (Work.Sub); older
            # maild versions wrote IMAP names (Work/Sub), which are still
            # read, the one of an existing folder winning.
            readings = [maildir.subscriptionNames(line.strip()) for line in lines if line.strip()]
        for candidates in readings:
            existing = [n for n in candidates if self.exists(n)]
            for name in existing[:1] or candidates[:1]:
                try:
                    name = maildir.validateFolderName(name)
                except ValueError:
                    continue
                if name not in names:
                    names.append(name)
        return names

    def subscribe(self, name: str) -> None:
        name = maildir.validateFolderName(name)
        self._editSubscriptions(lambda names: names if name in names else names + [name])

    def unsubscribe(self, name: str) -> None:
        name = maildir.validateFolderName(name)
        self._editSubscriptions(lambda names: [s for s in names if s != name])

    def _editSubscriptions(self, change) -> None:
        """
        Rewrite the subscriptions as C{change} (a function of the current
        list) makes them, under a lock: two sessions subscribing at once
        must not lose one of the names.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root / SUBSCRIPTIONS_LOCK):
            current = self.subscriptions()
            names = change(current)
            if names != current:
                lines = "".join(maildir.subscriptionLine(n) + "\n" for n in names)
                replaceFile(self.root / SUBSCRIPTIONS, lines.encode("utf-8"))
