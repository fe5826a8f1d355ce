"""
The logged-in user's folders as IMAP sees them (the avatar of
C{imap4.IAccount}): LIST patterns and attributes, STATUS, subscriptions,
and the folder operations, over L{maild.store.UserMailbox}.
"""

from __future__ import annotations

import re

from twisted.mail.imap4 import IAccount, INamespacePresenter
from zope.interface import implementer

from maild.store import Folder, MailStore, NoSuchFolder, UserMailbox
from maild.store.maildir import IMAP_DELIMITER, IN_NEW, INBOX, SEEN



def patternMatcher(pattern: str) -> re.Pattern[str]:
    """
    A LIST pattern (RFC 3501 section 6.3.8): C{*} matches anything, C{%}
    anything but the delimiter; INBOX matches in any case.
    """
    out = []
    for c in pattern:
        if c == "*":
            out.append(".*")
        elif c == "%":
            out.append("[^/]*")
        else:
            out.append(re.escape(c))
    regex = "".join(out)
    if pattern[:5].upper() == "INBOX":
        regex = "(?i:" + "".join(out[:5]) + ")" + "".join(out[5:])
    return re.compile(regex + r"\Z", re.S)


@implementer(IAccount, INamespacePresenter)
class Account:
    """
    The folders of one user.
    """

    def __init__(self, store: MailStore, address: str) -> None:
        self.store = store
        self.address = address
        self.mailbox: UserMailbox = store.mailbox(address)
        # RFC 6154: the special folders are there (and subscribed) from
        # the first login.
        self.mailbox.ensureExists()

    # INamespacePresenter ------------------------------------------------------

    def getPersonalNamespaces(self):
        return [[b"", IMAP_DELIMITER.encode()]]

    def getSharedNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None

    # IAccount -----------------------------------------------------------------

    def addMailbox(self, name, mbox=None):
        raise NotImplementedError("folders are made with create()")

    def create(self, pathspec: str) -> None:
        """
        Create a folder and any missing parents (RFC 3501 section 6.3.3);
        a trailing delimiter only says that children will follow.

        @raise FolderExists: if it exists already.
        """
        name = pathspec.rstrip(IMAP_DELIMITER)
        parts = name.split(IMAP_DELIMITER)
        for depth in range(1, len(parts)):
            parent = IMAP_DELIMITER.join(parts[:depth])
            if not self.mailbox.exists(parent) and parent.upper() != INBOX:
                self.mailbox.create(parent)
        self.mailbox.create(name)

    def select(self, name: str) -> Folder:
        return self.mailbox.folder(name)

    def delete(self, name: str) -> None:
        self.mailbox.delete(name)

    def rename(self, oldname: str, newname: str) -> None:
        parts = newname.split(IMAP_DELIMITER)
        for depth in range(1, len(parts)):
            parent = IMAP_DELIMITER.join(parts[:depth])
            if not self.mailbox.exists(parent) and parent.upper() != INBOX:
                self.mailbox.create(parent)
        self.mailbox.rename(oldname, newname)

    def isSubscribed(self, name: str) -> bool:
        return name in self.mailbox.subscriptions()

    def subscribe(self, name: str) -> None:
        self.mailbox.subscribe(name)

    def unsubscribe(self, name: str) -> None:
        self.mailbox.unsubscribe(name)

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, list[bytes]]]:
        return self.list(ref, wildcard, subscribed=False)

    # Listing ------------------------------------------------------------------

    def list(self, reference: str, pattern: str, subscribed: bool) -> list[tuple[str, list[bytes]]]:
        """
        The folders LIST (or LSUB) returns: name and attributes, with
        RFC 3348 children and RFC 6154 special-use attributes, and
        C{\\Noselect} parents that exist only as part of a deeper name.
        """
        if reference and not reference.endswith(IMAP_DELIMITER) and not pattern.startswith(IMAP_DELIMITER):
            reference += IMAP_DELIMITER
        matcher = patternMatcher(reference + pattern)
        existing = self.mailbox.folderNames()
        existingSet = set(existing)
        subscriptions = self.mailbox.subscriptions() if subscribed else []
        names = subscriptions if subscribed else existing
        parents: set[str] = set()
        for name in existing:
            parts = name.split(IMAP_DELIMITER)
            for depth in range(1, len(parts)):
                parents.add(IMAP_DELIMITER.join(parts[:depth]))
        candidates = list(dict.fromkeys(names))
        candidates += sorted(p for p in parents if p not in existingSet and p not in candidates)
        result = []
        for name in candidates:
            if not matcher.match(name):
                continue
            attributes = []
            if name not in existingSet:
                if subscribed and name in subscriptions:
                    attributes.append(b"\\NonExistent")
                else:
                    attributes.append(b"\\Noselect")
            attributes.append(b"\\HasChildren" if name in parents else b"\\HasNoChildren")
            special = self.mailbox.specialUse(name)
            if special:
                attributes.append(special.encode("ascii"))
            result.append((name, attributes))
        if subscribed and "%" in pattern:
            result += self._unsubscribedParents(subscriptions, matcher, {name for name, _ in result})
        return result

    @staticmethod
    def _unsubscribedParents(subscriptions, matcher, listed: set[str]) -> list[tuple[str, list[bytes]]]:
        """
        RFC 3501 section 6.3.9: when "%" stops LSUB above a subscribed
        name, its parent that the pattern does match is returned, flagged
        C{\\Noselect}, even though it is not subscribed (or does not
        exist).
        """
        found = []
        for name in subscriptions:
            if matcher.match(name):
                continue
            parts = name.split(IMAP_DELIMITER)
            for depth in range(len(parts) - 1, 0, -1):
                parent = IMAP_DELIMITER.join(parts[:depth])
                if parent not in listed and matcher.match(parent):
                    listed.add(parent)
                    found.append((parent, [b"\\Noselect"]))
                    break
        return found

    def status(self, name: str, items: list[bytes], limit: int) -> list[tuple[bytes, int]]:
        """
        The STATUS items of folder C{name}.

        @raise NoSuchFolder: if it does not exist.
        """
        folder = self.mailbox.folder(name)
        folder.refresh()
        if folder.missing:
            raise NoSuchFolder(name)  # deleted by another process meanwhile
        values = {
            b"MESSAGES": lambda: len(folder),
            b"RECENT": lambda: folder.countWith(IN_NEW),
            b"UIDNEXT": lambda: folder.uidnext,
            b"UIDVALIDITY": lambda: folder.uidvalidity,
            b"UNSEEN": lambda: folder.countWith(SEEN, wanted=False),
            b"APPENDLIMIT": lambda: limit,
        }
        return [(item, values[item]()) for item in items]
