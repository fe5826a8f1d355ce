"""
The selected folder as one session sees it: its own sequence numbers,
its \\Recent messages, and the changes made by others that it has not yet
been allowed to report (RFC 3501 section 7.4.1 and 5.5).

The shared L{maild.store.Folder} is the truth about UIDs and flags; this
view keeps only the UIDs its client knows, in sequence-number order.
"""

from __future__ import annotations

import bisect
from array import array
from typing import Callable, Iterable

from twisted.mail.imap4 import ICloseableMailbox, IMailboxInfo
from zope.interface import implementer

from maild.imap import wire
from maild.store import Folder, FolderChange
from maild.store.folder import bitTable
from maild.store.maildir import DELETED, HAS_KEYWORDS, IN_NEW, SEEN

# The flag bits a client sees (the others are the store's bookkeeping).
_VISIBLE = ~(IN_NEW | HAS_KEYWORDS) & 0xFF


@implementer(IMailboxInfo, ICloseableMailbox)
class SelectedFolder:
    """
    One session's view of a folder.

    @ivar uids: the UIDs the client knows, by sequence number - 1.
    @ivar recent: UIDs this session reports \\Recent.
    @ivar notify: called when something happened that a session in IDLE
        should report at once.
    """

    def __init__(self, folder: Folder, writable: bool, notify: Callable[[], None]) -> None:
        self.folder = folder
        self.name = folder.name
        self.writable = writable
        self.notify = notify
        folder.refresh()
        self.uids = array("I", folder.uids)
        if writable:
            self.recent = set(folder.claimRecent())
        else:
            self.recent = {folder.uids[i] for i in folder.positionsWith(IN_NEW)}
        self._expunged: set[int] = set()
        self._flagged: set[int] = set()
        self._added = False
        self.synced = True
        self.reset = False
        self.gone = False
        self._flagCache: dict = {}
        # The keywords the client was last told of in FLAGS.
        self._keywordsShown: list[str] | None = None
        folder.addListener(self)

    # IMailboxInfo -------------------------------------------------------------

    def getFlags(self) -> list[bytes]:
        # $Forwarded is always offered: Thunderbird sets it on messages it
        # forwarded, and older files may carry it as the letter P.
        names = [name for _, name in wire.SYSTEM_FLAGS] + [wire.FORWARDED]
        keywords = [k for k in self.folder.keywords.allNames() if k.lower() != "$forwarded"]
        return names + wire.keywordNames(keywords)

    def flagsLines(self) -> list[bytes]:
        """
        The FLAGS and PERMANENTFLAGS responses (RFC 3501 section 7.2.6),
        and the keywords they tell the client of are remembered.
        """
        self._keywordsShown = self.folder.keywords.allNames()
        flags = b" ".join(self.getFlags())
        permanent = flags + b" \\*" if self.writable else b""
        return [
            b"* FLAGS (" + flags + b")",
            b"* OK [PERMANENTFLAGS (" + permanent + b")] Flags permitted",
        ]

    def newKeywordLines(self) -> list[bytes]:
        """
        FLAGS and PERMANENTFLAGS again when the folder has keywords the
        client was not told of: to be sent before a FETCH response that
        may show one (RFC 3501 section 7.2.6).
        """
        if self.folder.keywords.allNames() == self._keywordsShown:
            return []
        return self.flagsLines()

    def getHierarchicalDelimiter(self) -> bytes:
        return b"/"

    # ICloseableMailbox --------------------------------------------------------

    def close(self) -> None:
        self.folder.removeListener(self)

    # Counts -------------------------------------------------------------------

    def getUIDValidity(self) -> int:
        return self.folder.uidvalidity

    def getUIDNext(self) -> int:
        return self.folder.uidnext

    def getMessageCount(self) -> int:
        return len(self.uids)

    def getRecentCount(self) -> int:
        return len(self.recent)

    def firstUnseen(self) -> int | None:
        """
        The sequence number of the first unseen message, if any.
        """
        if self.synced:
            found = self.folder.flags.translate(bitTable(SEEN, wanted=False)).find(1)
            return found + 1 if found >= 0 else None
        for seq, bits in enumerate(self.flagBytes(), 1):
            if not bits & SEEN:
                return seq
        return None

    # Positions ----------------------------------------------------------------

    def index(self, position: int) -> int | None:
        """
        The folder's index of the message at session position C{position},
        or None when someone else expunged it.
        """
        uid = self.uids[position]
        if self.synced:
            # (Checked: a search that paused may find the folder changed
            # under a view not yet told.)
            uids = self.folder.uids
            if position < len(uids) and uids[position] == uid:
                return position
        return self.folder.position(uid)

    def flagBytes(self) -> bytes:
        """
        The flag byte of each message in session order (0xFF for those
        expunged by someone else).
        """
        if self.synced:
            return bytes(self.folder.flags)
        flags = self.folder.flags
        position = self.folder.position
        return bytes(flags[i] if (i := position(uid)) is not None else 0xFF for uid in self.uids)

    def flagList(self, i: int) -> bytes:
        """
        The FLAGS list of the message at folder index C{i}.
        """
        folder = self.folder
        bits = folder.flags[i]
        uid = folder.uids[i]
        recent = uid in self.recent
        letters = folder.keywordLetters.get(uid, "") if bits & HAS_KEYWORDS else ""
        key = (bits & _VISIBLE, letters, recent)
        cached = self._flagCache.get(key)
        if cached is None:
            keywords = folder.keywords.names(letters) if letters else []
            cached = self._flagCache[key] = wire.flagNames(bits, keywords, recent)
        return cached

    def deletedUids(self, among: Iterable[int] | None = None) -> list[int]:
        """
        UIDs of the messages marked \\Deleted (of C{among} when given).
        """
        folder = self.folder
        if among is None:
            return [folder.uids[i] for i in folder.positionsWith(DELETED)]
        out = []
        for uid in among:
            i = folder.position(uid)
            if i is not None and folder.flags[i] & DELETED:
                out.append(uid)
        return out

    # Changes ------------------------------------------------------------------

    def folderChanged(self, folder: Folder, change: FolderChange) -> None:
        if change.gone:
            self.gone = True
            self.notify()
            return
        if change.reset:
            # The UIDs the client knows mean nothing any more: the session
            # must end (RFC 3501 2.3.1.1).
            self.reset = True
            self.notify()
            return
        if change.added:
            self._added = True
            self.synced = False
        if change.expunged:
            self._expunged.update(change.expunged)
            self.synced = False
        if change.flagged and change.origin is not self:
            self._flagged.update(change.flagged)
        self.notify()

    @property
    def pending(self) -> bool:
        return bool(self._added or self._expunged or self._flagged)

    def updates(self, expunges: bool) -> list[bytes]:
        """
        The untagged responses that bring the client up to date, applied
        to this view: EXPUNGE (only when C{expunges}: never during FETCH,
        STORE or SEARCH by sequence number, RFC 3501 section 7.4.1), then
        EXISTS and RECENT (RECENT alone when expunges took recent
        messages), then FETCH FLAGS of messages others changed.
        """
        lines: list[bytes] = []
        # What the client was last told (SELECT's, or the last RECENT).
        recentTold = len(self.recent)
        if expunges and self._expunged:
            lines += self._applyExpunges()
        if self._added:
            added = self._applyAdded()
            if added:
                lines += added  # ends with RECENT
                recentTold = len(self.recent)
        if len(self.recent) != recentTold:
            # Recent messages were expunged: the count the client keeps
            # from RECENT responses is too high now (RFC 3501 section
            # 7.3.2: sent when the mailbox's size changes; Dovecot sends
            # it too, and imaptest's checkpoints sum the counts).
            lines.append(b"* %d RECENT" % len(self.recent))
        if self._flagged:
            folder = self.folder
            lines += self.newKeywordLines()
            for uid in sorted(self._flagged):
                seq = bisect.bisect_left(self.uids, uid)
                if seq < len(self.uids) and self.uids[seq] == uid and uid not in self._expunged:
                    i = folder.position(uid)
                    if i is not None:
                        lines.append(b"* %d FETCH (UID %d FLAGS %s)" % (seq + 1, uid, self.flagList(i)))
            self._flagged.clear()
        if not self._expunged and not self._added:
            self.synced = len(self.uids) == len(self.folder.uids)
        return lines

    def _applyExpunges(self) -> list[bytes]:
        gone = self._expunged
        self._expunged = set()
        uids = self.uids
        positions = []
        for uid in gone:
            p = bisect.bisect_left(uids, uid)
            if p < len(uids) and uids[p] == uid:
                positions.append(p)
        if not positions:
            return []
        positions.sort()
        # Highest first: each number stays right after the ones before.
        lines = [b"* %d EXPUNGE" % (p + 1) for p in reversed(positions)]
        keep = array("I")
        last = 0
        for p in positions:
            keep.extend(uids[last:p])
            last = p + 1
        keep.extend(uids[last:])
        self.uids = keep
        self.recent.difference_update(gone)
        return lines

    def _applyAdded(self) -> list[bytes]:
        self._added = False
        folder = self.folder
        start = bisect.bisect_right(folder.uids, self.uids[-1]) if self.uids else 0
        fresh = folder.uids[start:]
        if self._expunged:
            fresh = array("I", (u for u in fresh if u not in self._expunged))
        if not fresh:
            return []
        self.uids.extend(fresh)
        positions = range(start, len(folder.uids))
        if self.writable:
            self.recent.update(folder.claimRecent(positions))
        else:
            self.recent.update(folder.uids[i] for i in positions if folder.flags[i] & IN_NEW)
        return [b"* %d EXISTS" % len(self.uids), b"* %d RECENT" % len(self.recent)]
