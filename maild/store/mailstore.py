"""
The store: every user's Maildir under C{<data>/mail/<domain>/<user>/},
the delivery spool C{<data>/tmp/}, and the one shared L{Folder} index per
open folder.
"""

from __future__ import annotations

import collections
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
from maild.store.delivery import Committer, IncomingMessage, Spool, Target, fsyncDirectory
from maild.store.folder import SETTABLE, Folder
from maild.store.interfaces import IMailStore, IUserMailbox
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

    def __init__(self, dataDir: Path, committer: Committer | None = None) -> None:
        self.root = dataDir / "mail"
        self.spool = dataDir / "tmp"
        self.committer = committer
        self._spool = Spool(self.spool, committer.reactor) if committer is not None else None
        self.watcher = FolderWatcher(committer.reactor) if committer is not None else None
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

    def mailbox(self, address: str) -> "UserMailbox":
        return UserMailbox(self, address, self.userRoot(address))

    def folderAt(self, name: str, path: Path) -> Folder:
        """
        The shared index of the folder in C{path}, loaded on first use and
        kept while anybody holds it, and for a while after: the folders used
        last stay loaded (up to L{KEEP_MESSAGES} messages in all), so that a
        client reconnecting, or a POP3 login, does not list a big folder
        again.
        """
        folder = self._folders.get(path)
        if folder is None:
            folder = Folder(name, path)
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

    def incoming(self, head: bytes = b"") -> IncomingMessage:
        """
        Start receiving a message (CRLF line endings in, LF on disk).
        """
        return IncomingMessage(self._spool, head)

    def deliver(
        self, message: IncomingMessage, recipients: Sequence[str]
    ) -> defer.Deferred:
        """
        Store C{message} once in the INBOX of each recipient (hard links),
        durably.

        @return: a Deferred firing with the paths of the copies when they
            are all on disk, or failing with
            L{maild.store.delivery.DeliveryFailed}.
        """
        targets = [Target(self.userRoot(r)) for r in recipients]
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
                    folder.addPlaced([path], origin=origin)
            return paths

        return d.addCallback(announce)

    def copy(
        self, source: Folder, indexes: Sequence[int], destination: Folder, origin=None
    ) -> defer.Deferred:
        """
        Copy messages (by index in C{source}) into C{destination} as hard
        links, keeping their flags and keywords, durably (the destination's
        C{cur/} is synced once, in a worker thread), and number them there
        in this order.

        @return: a Deferred firing with C{(source UID, destination UID)}
            pairs for the messages copied; those expunged meanwhile by
            another process are left out.
        @raise maild.store.keywords.TooManyKeywords: if the destination has
            no letter left for a keyword.
        """
        plan = []
        for i in indexes:
            names = source.keywordNames(i)
            letters = destination.keywords.letters(names) if names else ""
            size, crlfSize = source.sizes(i)
            base = maildir.newBaseName(size, crlfSize)
            bits = source.flags[i] & SETTABLE & ~maildir.FORWARDED  # now a keyword
            name = maildir.curFileName(base, bits, letters)
            plan.append(
                (source.uids[i], source.filePath(i), destination.path / "cur" / name)
            )
        d = self.committer.callInPool(_linkAll, plan, destination.path / "cur")

        def linked(done: list[tuple[int, Path]]) -> list[tuple[int, int]]:
            uids = destination.addPlaced([path for _, path in done], origin=origin)
            return [(uid, new) for (uid, _), new in zip(done, uids)]

        return d.addCallback(linked)

    def removeStaleTemporaries(self, grace: float) -> int:
        """
        Remove files older than C{grace} seconds from the spool and from
        every folder's C{tmp/}: what a crash left behind.

        @return: how many were removed.
        """
        removed = 0
        limit = time.time() - grace
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
                    if entry.is_file() and entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    pass
        if removed:
            log.info("removed {count} stale temporary files", count=removed)
        return removed


def _linkAll(plan: list[tuple[int, Path, Path]], directory: Path) -> list[tuple[int, Path]]:
    done = []
    for uid, source, target in plan:
        try:
            os.link(source, target)
        except FileNotFoundError:
            continue
        done.append((uid, target))
    if done:
        fsyncDirectory(directory)
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
            self._writeSubscriptions(sorted(subscribed | set(missing)))

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
        return self.store.folderAt(name, path)

    def specialUse(self, name: str) -> str | None:
        return SPECIAL_FOLDERS.get(name)

    def create(self, name: str) -> None:
        """
        @raise FolderExists: if it exists already.
        """
        name = maildir.validateFolderName(name)
        path = self.folderPath(name)
        if name == INBOX or (path / "cur").is_dir():
            raise FolderExists(name)
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
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        self._writeSubscriptions([s for s in self.subscriptions() if s != name])

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
            os.rename(self.folderPath(source), self.folderPath(target))
        renamed = dict(moves)
        self._writeSubscriptions([renamed.get(s, s) for s in self.subscriptions()])

    def _renameInbox(self, new: str) -> None:
        if self.exists(new):
            raise FolderExists(new)
        target = self.folderPath(new)
        makeMaildir(target)
        (target / "maildirfolder").touch()
        for sub in ("new", "cur"):
            for name in os.listdir(self.root / sub):
                os.rename(self.root / sub / name, target / sub / name)

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
        current = self.subscriptions()
        if name not in current:
            self._writeSubscriptions(current + [name])

    def unsubscribe(self, name: str) -> None:
        name = maildir.validateFolderName(name)
        self._writeSubscriptions([s for s in self.subscriptions() if s != name])

    def _writeSubscriptions(self, names: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (SUBSCRIPTIONS + ".tmp")
        tmp.write_text("".join(maildir.subscriptionLine(n) + "\n" for n in names), "utf-8")
        os.replace(tmp, self.root / SUBSCRIPTIONS)
