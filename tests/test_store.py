"""
The Maildir store on real files: names, the UID list, the folder index,
keywords, folders and subscriptions, delivery and clean-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

import maild.store.folder
from maild.names import InvalidName
from maild.store import (
    Committer,
    DeliveryFailed,
    IncomingMessage,
    FolderExists,
    MailStore,
    NoSuchFolder,
)
from maild.store import maildir
from maild.store.folder import Folder
from maild.store.keywords import Keywords, TooManyKeywords
from maild.store.uidlist import UidList, UidValidities
from maild.store.watch import FolderWatcher
from tests.support import countListings, waitForEmptySpool


def put(folder: Path, name: str, data: bytes = b"Subject: x\n\nbody\n") -> Path:
    """
    Write a message file as an outside Maildir tool would.
    """
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


class NameTests(unittest.SynchronousTestCase):
    def test_flagsRoundTrip(self):
        """
        Info letters become flag bits and keyword letters, and back, in
        ASCII order.
        """
        bits, keywords = maildir.flagBits("STRb a")
        self.assertEqual(bits & 0x3F, maildir.SEEN | maildir.DELETED | maildir.ANSWERED)
        self.assertTrue(bits & maildir.HAS_KEYWORDS)
        self.assertEqual(keywords, "ab")
        self.assertEqual(maildir.infoString(bits, keywords), "RSTab")

    def test_baseNamesAreUniqueAndCarrySizes(self):
        names = {maildir.newBaseName(10, 12) for _ in range(1000)}
        self.assertEqual(len(names), 1000)
        self.assertEqual(maildir.sizesFromBase(names.pop()), (10, 12))
        self.assertEqual(maildir.sizesFromBase("123.M1P2.host"), (None, None))

    def test_folderNames(self):
        """
        IMAP names map to Maildir++ directories and back; dots and tildes
        are escaped, non-ASCII is modified UTF-7.
        """
        for name, directory in (
            ("INBOX", ""),
            ("inbox", ""),
            ("Sent", ".Sent"),
            ("Lists/Python", ".Lists.Python"),
            ("v1.2", ".v1~2e2"),
            ("a~b", ".a~7eb"),
            ("Entwürfe", ".Entw&APw-rfe"),
            ("INBOX/Sub", ".INBOX.Sub"),
        ):
            self.assertEqual(maildir.folderDirName(name), directory)
            if directory:
                expected = maildir.validateFolderName(name)
                self.assertEqual(maildir.folderNameFromDir(directory), expected)

    def test_badFolderNames(self):
        """
        Names that could leave the user's folder or confuse the layout are
        refused.
        """
        for bad in ("", "..", "a/../b", "/abs", "a//b", "a/", "x\x00y", "a*", "%", "a\\b", "a" * 300, "\ud800"):
            self.assertRaises(InvalidName, maildir.validateFolderName, bad)
        self.assertIsNone(maildir.folderNameFromDir(".."))
        self.assertIsNone(maildir.folderNameFromDir("..deleted-1"))
        self.assertIsNone(maildir.folderNameFromDir("cur"))


# The machine may be busy: slow generation is not a failure.
_patient = settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)


class SubscriptionLineTests(unittest.SynchronousTestCase):
    @_patient
    @given(st.lists(st.text(st.characters(blacklist_characters="/"), min_size=1, max_size=12), min_size=1, max_size=4))
    def test_roundTrip(self, parts):
        """
        A valid folder name written as Dovecot writes it in subscriptions
        reads back as itself, first.
        """
        try:
            name = maildir.validateFolderName("/".join(parts))
        except InvalidName:
            return
        self.assertEqual(maildir.subscriptionNames(maildir.subscriptionLine(name))[0], name)

    @_patient
    @given(st.text(max_size=40))
    def test_anyLine(self, line):
        """
        Any line gives only valid folder names, never an exception.
        """
        for name in maildir.subscriptionNames(line):
            self.assertEqual(maildir.validateFolderName(name), name)


class UidListTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.path.mkdir()

    def test_assignAppendsDovecotRecords(self):
        """
        UIDs are given in order and appended in Dovecot's version 3 format;
        a base that has a UID keeps it.
        """
        uids = UidList(self.path)
        self.assertEqual(uids.assign(["a", "b"]), [1, 2])
        self.assertEqual(uids.assign(["b", "c"]), [2, 3])
        lines = (self.path / "dovecot-uidlist").read_text().splitlines()
        self.assertRegex(lines[0], r"^3 V\d+ N1 G[0-9a-f]{32}$")
        self.assertEqual(lines[1:], ["1 :a", "2 :b", "3 :c"])

    def test_twoReadersAgree(self):
        """
        Two UidList objects on one folder (two processes) never hand out a
        UID twice: each catches up with the other's appends under the lock.
        """
        first, second = UidList(self.path), UidList(self.path)
        self.assertEqual(first.assign(["a"]), [1])
        self.assertEqual(second.assign(["b", "a"]), [2, 1])
        self.assertEqual(first.assign(["c", "b"]), [3, 2])
        self.assertEqual(first.uidvalidity, second.uidvalidity)

    def test_readsDovecotFile(self):
        """
        A list written by Dovecot, with extension fields and a header whose
        N is behind its records, is read as Dovecot reads it.
        """
        (self.path / "dovecot-uidlist").write_text(
            "3 V1700000000 N5 G0123456789abcdef0123456789abcdef\n"
            "3 :1700000000.M1P1.host,S=10,W=11\n"
            "9 W300 :1700000001.M1P1.host\n"
        )
        uids = UidList(self.path)
        state = uids.refresh()
        self.assertEqual(state.uidvalidity, 1700000000)
        self.assertEqual(state.uidnext, 10)
        self.assertEqual(state.uids["1700000001.M1P1.host"], 9)
        self.assertEqual(uids.assign(["new"]), [10])

    def test_renumberCameBack(self):
        """
        A base whose recorded UID was seen expunged (a file that came back)
        gets a new, higher UID; one numbered by another process keeps its
        own, even below UIDs given since.
        """
        uids = UidList(self.path)
        uids.assign(["a", "b", "c"])
        self.assertEqual(uids.assign(["a"], renumber={1}), [4])
        self.assertEqual(uids.assign(["b"], renumber={1}), [2])

    def test_corruptListStartsNewValidity(self):
        """
        A list that cannot be read gets a new, larger UIDVALIDITY.
        """
        uids = UidList(self.path)
        uids.assign(["a"])
        old = uids.uidvalidity
        (self.path / "dovecot-uidlist").write_text("garbage\n")
        fresh = UidList(self.path)
        fresh.state = uids.state
        self.assertGreater(fresh.refresh().uidvalidity, old - 1)
        self.assertEqual(fresh.refresh().uids, {})

    def test_compaction(self):
        """
        Once most records are of expunged messages, the file is rewritten
        without them, keeping every live UID.
        """
        uids = UidList(self.path)
        bases = [f"1700000000.M{i}P12345Q{i}.host.example.org,S=10240,W=10400" for i in range(3000)]
        uids.assign(bases)
        uids.forget(bases[:2900])
        text = (self.path / "dovecot-uidlist").read_text().splitlines()
        self.assertEqual(len(text), 101)
        self.assertRegex(text[0], r" N3001 ")
        self.assertEqual(UidList(self.path).refresh().uids, {b: i + 1 for i, b in enumerate(bases) if i >= 2900})


class KeywordTests(unittest.SynchronousTestCase):
    def test_lettersAndNames(self):
        """
        Keywords get letters a-z in Dovecot's dovecot-keywords file, found
        again case-insensitively; the 27th is refused.
        """
        path = Path(self.mktemp())
        path.mkdir()
        keywords = Keywords(path)
        self.assertEqual(keywords.letters(["$Forwarded", "Junk"]), "ab")
        self.assertEqual(keywords.letters(["junk"]), "b")
        self.assertEqual(Keywords(path).names("ba"), ["Junk", "$Forwarded"])
        self.assertEqual((path / "dovecot-keywords").read_text(), "0 $Forwarded\n1 Junk\n")
        keywords.letters([f"k{i}" for i in range(24)])
        self.assertRaises(TooManyKeywords, keywords.letters, ["one-too-many"])

    def test_rewrittenInTheSameTick(self):
        """
        The keywords file rewritten in place by another program, its time
        and inode unchanged (a coarse clock, an NFS attribute cache): read
        again because its size moved.
        """
        path = Path(self.mktemp())
        path.mkdir()
        keywords = Keywords(path)
        self.assertEqual(keywords.letters(["Junk"]), "a")
        file = path / "dovecot-keywords"
        before = os.stat(file)
        with open(file, "w") as f:
            f.write("0 Junk\n1 $Label1\n")
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
        self.assertEqual(keywords.names("ab"), ["Junk", "$Label1"])


class FolderTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.changes = []
        put(self.path, "new/1700000002.M1P1Q1.h,S=17,W=20")
        put(self.path, "cur/1700000001.M1P1Q1.h,S=17,W=20:2,S")
        self.folder = Folder("INBOX", self.path)
        self.folder.addListener(self)

    def folderChanged(self, folder, change):
        self.changes.append(change)

    def test_placedAfterAnotherProcessNumbered(self):
        """
        When another process (Dovecot) numbered a file we have not listed
        yet, and then our own delivery gets the next UID, the other file
        is taken first: listeners learn both in UID order, so a session
        told of the higher UID does not miss the lower one.
        """
        self.folder.refresh()
        self.changes.clear()
        theirs = put(self.path, "new/1700000003.M1P9Q1.other")
        [theirUid] = UidList(self.path).assign([theirs.name])
        ours = put(self.path, "new/1700000004.M1P1Q2.h")
        [ourUid] = self.folder.addPlaced([ours])
        self.assertEqual((theirUid, ourUid), (3, 4))
        self.assertEqual(list(self.folder.uids), [1, 2, 3, 4])
        self.assertEqual([uid for change in self.changes for uid in change.added], [3, 4])

    def test_numberedElsewhereKeepsItsUid(self):
        """
        A file another process numbered keeps that UID in our index even
        when we learn of it after higher ones: it is never numbered twice.
        """
        self.folder.refresh()
        theirs = put(self.path, "cur/1700000003.M1P9Q1.other:2,S")
        later = put(self.path, "cur/1700000004.M1P9Q2.other:2,")
        other = UidList(self.path)
        other.assign(["1700000003.M1P9Q1.other", "1700000004.M1P9Q2.other"])
        self.folder.refresh()
        self.assertEqual(list(self.folder.uids), [1, 2, 3, 4])
        records = (self.path / "dovecot-uidlist").read_text().splitlines()[1:]
        self.assertEqual(len(records), len({line.split(" :")[1] for line in records}))

    def test_loadInDeliveryOrder(self):
        """
        Opening a folder numbers its files by delivery time, reads flags
        from the names, and reads no message file.
        """
        self.folder.refresh()
        self.assertEqual(list(self.folder.uids), [1, 2])
        self.assertEqual(self.folder.flags[0], maildir.SEEN)
        self.assertEqual(self.folder.flags[1], maildir.IN_NEW)
        self.assertEqual(self.folder.sizes(0), (17, 20))
        self.assertEqual(self.changes[0].added, [1, 2])

    def test_refreshIsCheapWhenNothingChanged(self):
        self.folder.refresh()
        self.changes.clear()
        self.assertFalse(self.folder.refresh())
        self.assertEqual(self.changes, [])

    def test_outsideChangesFound(self):
        """
        Files added, renamed (flags) and removed by another program are
        found by refresh and announced.
        """
        # Folder times from the past: the changes below must move them,
        # however coarse the file system's clock.
        for sub in ("new", "cur"):
            os.utime(self.path / sub, (1_000_000_000, 1_000_000_000))
        self.folder.refresh()
        os.rename(self.path / "new/1700000002.M1P1Q1.h,S=17,W=20", self.path / "cur/1700000002.M1P1Q1.h,S=17,W=20:2,FS")
        os.unlink(self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,S")
        put(self.path, "new/1700000003.M1P1Q1.h")
        change = self.folder.refresh()
        self.assertEqual((change.added, change.expunged, change.flagged), ([3], [1], [2]))
        self.assertEqual(self.folder.flags[0], maildir.SEEN | maildir.FLAGGED)
        self.assertEqual(self.folder.sizes(1), (len(b"Subject: x\n\nbody\n"), len(b"Subject: x\n\nbody\n") + 3))

    def test_goneFromNewWhileCurUnchanged(self):
        """
        A message gone from C{new/} while C{cur/} did not move (expunged by
        another process, or taken away by RENAME INBOX) is expunged at the
        first look, not kept until a second one as if it might have moved
        to C{cur/}: a STATUS right after RENAME INBOX counts no message.
        """
        for sub in ("new", "cur"):
            os.utime(self.path / sub, (1_000_000_000, 1_000_000_000))
        self.folder.refresh()
        os.rename(self.path / "new/1700000002.M1P1Q1.h,S=17,W=20", self.path.parent / "moved-away")
        change = self.folder.refresh()
        self.assertEqual(change.expunged, [2])
        self.assertEqual(list(self.folder.uids), [1])

    def test_setFlagsRenames(self):
        """
        Setting flags renames the file into cur/ with the letters in order;
        the change is announced with its origin; no rescan follows.
        """
        self.folder.refresh()
        changed = self.folder.setFlags([0, 1], maildir.FLAGGED | maildir.ANSWERED, mode=1, origin="me")
        self.assertEqual(changed, [0, 1])
        self.assertEqual(
            sorted(os.listdir(self.path / "cur")),
            ["1700000001.M1P1Q1.h,S=17,W=20:2,FRS", "1700000002.M1P1Q1.h,S=17,W=20:2,FR"],
        )
        self.assertEqual(self.changes[-1].origin, "me")
        self.changes.clear()
        self.assertFalse(self.folder.refresh())
        self.folder.setFlags([0], maildir.SEEN, mode=-1)
        self.assertEqual(self.folder.flags[0], maildir.FLAGGED | maildir.ANSWERED)

    def test_keywordsInNames(self):
        self.folder.refresh()
        letters = self.folder.keywords.letters(["$Label1"])
        self.folder.setFlags([0], 0, letters, mode=1)
        self.assertEqual(self.folder.keywordNames(0), ["$Label1"])
        self.assertTrue(os.path.exists(self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,Sa"))
        reopened = Folder("INBOX", self.path)
        reopened.refresh()
        self.assertEqual(reopened.keywordNames(0), ["$Label1"])

    def test_claimRecentOnce(self):
        """
        Messages in new/ are claimed (moved to cur/) by one caller only.
        """
        self.folder.refresh()
        self.assertEqual(self.folder.claimRecent(), [2])
        self.assertEqual(self.folder.claimRecent(), [])
        self.assertEqual(os.listdir(self.path / "new"), [])

    def test_recentWithFlags(self):
        """
        A file in new/ that carries flags in its name (a copy, or an APPEND
        with flags) is \\Recent with those flags and keywords; claiming it
        moves it to cur/ with them, and a listing afterwards agrees.
        """
        keywords = Keywords(self.path)
        letter = keywords.letters(["$Work"])
        put(self.path, f"new/1700000003.M1P1Q1.h,S=17,W=20:2,FS{letter}")
        self.folder.refresh()
        i = self.folder.position(3)
        self.assertEqual(self.folder.flags[i] & ~maildir.HAS_KEYWORDS, maildir.IN_NEW | maildir.FLAGGED | maildir.SEEN)
        self.assertEqual(self.folder.keywordNames(i), ["$Work"])
        self.assertEqual(self.folder.read(i), b"Subject: x\n\nbody\n")
        self.assertEqual(self.folder.claimRecent(), [2, 3])
        self.assertEqual(sorted(os.listdir(self.path / "cur"))[-1], f"1700000003.M1P1Q1.h,S=17,W=20:2,FS{letter}")
        reopened = Folder("INBOX", self.path)
        reopened.refresh()
        self.assertEqual(reopened.flags[2], maildir.FLAGGED | maildir.SEEN | maildir.HAS_KEYWORDS)
        self.assertEqual(reopened.keywordNames(2), ["$Work"])

    def test_expunge(self):
        self.folder.refresh()
        self.assertEqual(self.folder.expunge([1, 7]), [1])
        self.assertEqual(list(self.folder.uids), [2])
        self.assertEqual(self.changes[-1].expunged, [1])
        self.assertEqual(len(os.listdir(self.path / "cur")), 0)

    def test_expungeRenamedUnderneath(self):
        """
        Expunging a message whose file another process renamed (a flag
        change) finds it under its new name and removes it.
        """
        self.folder.refresh()
        os.rename(self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,S", self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,FS")
        self.assertEqual(self.folder.expunge([1]), [1])
        self.assertEqual(os.listdir(self.path / "cur"), [])
        self.assertEqual(list(Folder("INBOX", self.path).refresh().added), [2])

    def test_sizeOfForeignCrlfFile(self):
        """
        A file without sizes in its name, written with CRLF (or a mix) by
        another tool, is measured as it will be served: CRLF line ends (here
        a CRLF is split between two reads).
        """
        put(self.path, "new/1700000005.M1P1Q1.h", b"A: b\r\n\r\nx\ny" + b"z" * 65524 + b"\r\nend\n")
        self.folder.refresh()
        data = (self.path / "new/1700000005.M1P1Q1.h").read_bytes()
        served = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.assertEqual(self.folder.sizes(2), (len(data), len(served)))

    def test_renamedUnderneathIsFound(self):
        """
        Opening a message whose file another process renamed finds it again;
        one that was removed raises MessageGone.
        """
        from maild.store import MessageGone

        self.folder.refresh()
        os.rename(self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,S", self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,RS")
        with self.folder.open(0) as f:
            self.assertEqual(f.read(), b"Subject: x\n\nbody\n")
        os.unlink(self.path / "new/1700000002.M1P1Q1.h,S=17,W=20")
        self.assertRaises(MessageGone, self.folder.open, 1)

    def test_uidsSurviveReopen(self):
        """
        A second index of the same folder (a restart) gives the same UIDs,
        and new files get UIDs above every earlier one.
        """
        self.folder.refresh()
        self.folder.expunge([2])
        put(self.path, "new/1600000000.M1P1Q1.h")
        again = Folder("INBOX", self.path)
        again.refresh()
        self.assertEqual(list(again.uids), [1, 3])
        self.assertEqual(again.uidvalidity, self.folder.uidvalidity)


class MailboxTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.store = MailStore(Path(self.mktemp()))
        self.mailbox = self.store.mailbox("Alice@Example.org")
        self.mailbox.ensureExists()

    def test_specialFoldersSubscribed(self):
        self.assertEqual(
            self.mailbox.folderNames(), ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]
        )
        self.assertEqual(sorted(self.mailbox.subscriptions()), ["Archive", "Drafts", "Junk", "Sent", "Trash"])
        self.assertEqual(self.mailbox.specialUse("Sent"), "\\Sent")
        self.assertEqual(self.mailbox.root, self.store.root / "example.org" / "alice")

    def test_createRenameDelete(self):
        """
        A folder with children is renamed with them (and so are their
        subscriptions); deleting a folder keeps its children.
        """
        self.mailbox.create("Lists")
        self.mailbox.create("Lists/Python")
        self.mailbox.subscribe("Lists/Python")
        self.assertRaises(FolderExists, self.mailbox.create, "Lists")
        self.mailbox.rename("Lists", "Mailing")
        self.assertIn("Mailing/Python", self.mailbox.folderNames())
        self.assertNotIn("Lists", self.mailbox.folderNames())
        self.assertIn("Mailing/Python", self.mailbox.subscriptions())
        self.mailbox.delete("Mailing")
        self.assertIn("Mailing/Python", self.mailbox.folderNames())
        self.assertRaises(NoSuchFolder, self.mailbox.folder, "Mailing")
        self.assertRaises(NoSuchFolder, self.mailbox.delete, "Mailing")

    def test_renameInboxMovesMessages(self):
        put(self.mailbox.root, "new/1.M1P1Q1.h")
        self.mailbox.rename("INBOX", "Old")
        self.assertEqual(len(self.mailbox.folder("Old").refresh().added), 1)
        self.assertEqual(len(self.mailbox.folder("INBOX").refresh().added), 0)

    def test_escapesRefused(self):
        """
        No user or folder name can reach outside the store.
        """
        for address in ("../x@example.org", "x@../example.org", "a/b@example.org", "x\x00@example.org", "@example.org"):
            self.assertRaises(InvalidName, self.store.mailbox, address)
        for name in ("../../etc", "a/../..", "..", "x\x00"):
            self.assertRaises(InvalidName, self.mailbox.create, name)

    def test_recentFoldersStayLoaded(self):
        """
        A folder nobody holds stays loaded while it is among the recently
        used, within the limits on folders and messages.
        """
        first = id(self.mailbox.folder("INBOX"))
        self.assertEqual(id(self.mailbox.folder("INBOX")), first)
        self.store.KEEP_FOLDERS = 2
        self.mailbox.folder("Sent")
        self.mailbox.folder("Drafts")
        self.assertIsNone(self.store.loadedFolder(self.mailbox.folderPath("INBOX")))
        self.assertIsNotNone(self.store.loadedFolder(self.mailbox.folderPath("Drafts")))

    def test_dovecotSubscriptionsFile(self):
        (self.mailbox.root / "subscriptions").write_text("V\t2\n\nSent\nLists\tPython\n")
        self.assertEqual(self.mailbox.subscriptions(), ["Sent", "Lists/Python"])

    def test_subscriptionsInDovecotMaildirForm(self):
        """
        The subscriptions file holds storage names, as Dovecot 2.3 writes
        it for Maildir++ (seen by running it): Work/Sub is C{Work.Sub}, a
        dot inside a name is C{~2e}, non-ASCII is modified UTF-7.  Dovecot
        discards C{Work/Sub} lines as invalid.
        """
        for name in ("Work/Sub", "Proj.2026", "Entwürfe"):
            self.mailbox.create(name)
            self.mailbox.subscribe(name)
        lines = (self.mailbox.root / "subscriptions").read_text().splitlines()
        self.assertEqual(lines[-3:], ["Work.Sub", "Proj~2e2026", "Entw&APw-rfe"])
        self.assertEqual(self.mailbox.subscriptions()[-3:], ["Work/Sub", "Proj.2026", "Entwürfe"])

    def test_subscriptionsOfOlderMaild(self):
        """
        A file an older maild wrote (IMAP names: C{Work/Sub}, C{Proj.2026}
        for the folder stored as C{.Proj~2e2026}) still reads right; a
        Dovecot line whose folder exists wins over the literal reading.
        """
        self.mailbox.create("Work/Sub")
        self.mailbox.create("Proj.2026")
        self.mailbox.create("A/B")
        (self.mailbox.root / "subscriptions").write_text("INBOX\nWork/Sub\nProj.2026\nA.B\nGone.Away\n")
        self.assertEqual(
            self.mailbox.subscriptions(), ["INBOX", "Work/Sub", "Proj.2026", "A/B", "Gone/Away"]
        )

    def test_staleTemporariesRemoved(self):
        """
        Files of the spool and of every folder's tmp/ last changed more
        than the grace period ago are removed; nothing else is.
        """
        inInbox = put(self.mailbox.root, "tmp/old")
        inSent = put(self.mailbox.folderPath("Sent"), "tmp/other")
        spool = put(self.store.spool, "crashed")
        message = put(self.mailbox.root, "cur/kept")
        self.assertEqual(self.store.removeStaleTemporaries(3600, now=time.time() + 3590), 0)
        self.assertEqual(self.store.removeStaleTemporaries(3600, now=time.time() + 3610), 3)
        self.assertEqual([p for p in (inInbox, inSent, spool) if p.exists()], [])
        self.assertTrue(message.exists())

    def test_fileBeingWrittenWithAnOldDateKept(self):
        """
        A file being written now with an old modification time (an APPEND
        with an INTERNALDATE of 2020, copied to another file system) is not
        stale: a sweep removing it would fail the APPEND (the defect seen
        as C{NO [TRYCREATE]} on a loaded machine).
        """
        spool = put(self.store.spool, "appending")
        copy = put(self.mailbox.folderPath("Drafts"), "tmp/copying")
        for path in (spool, copy):
            os.utime(path, (1580551200, 1580551200))
        self.assertEqual(self.store.removeStaleTemporaries(3600), 0)
        self.assertTrue(spool.exists())
        self.assertTrue(copy.exists())


class SmallFileTests(unittest.SynchronousTestCase):
    """
    The small files the store rewrites whole: one helper replaces each,
    synced, under a lock.
    """

    def setUp(self):
        self.store = MailStore(Path(self.mktemp()))
        self.mailbox = self.store.mailbox("alice@example.org")
        self.mailbox.ensureExists()

    def test_concurrentSubscriptionsAllKept(self):
        """
        Sessions subscribing at the same moment (two threads here, as two
        IMAP sessions of one daemon) each keep their names: the list is
        read and rewritten under a lock.
        """
        import threading

        def subscribe(prefix):
            box = self.store.mailbox("alice@example.org")
            for i in range(60):
                box.subscribe(f"{prefix}{i}")

        threads = [threading.Thread(target=subscribe, args=(p,)) for p in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        names = set(self.mailbox.subscriptions())
        self.assertEqual({n for n in names if n[0] in "ab"}, {f"{p}{i}" for p in "ab" for i in range(60)})

    def test_everyRewriteIsSynced(self):
        """
        The UID list, the keywords, the subscriptions and the users file
        are each written to a temporary file that is synced before it is
        renamed over the old one; nothing temporary is left behind.
        """
        from maild import accounts
        from maild.store import files

        synced = []
        realFsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            realFsync(fd)

        self.patch(files.os, "fsync", fsync)
        folder = self.mailbox.folder("INBOX")
        folder.refresh()
        folder.uidList._writeAll(folder.uidList.refresh())
        folder.keywords.letters(["$Forwarded"])
        self.mailbox.subscribe("Lists")
        users = accounts.Accounts(self.store.root.parent / "users")
        users.add("bob@example.org", "secret", scheme=accounts.BLF_CRYPT)
        for name in ("dovecot-uidlist", "dovecot-keywords", "subscriptions", "users"):
            self.assertIn(name + ".tmp", [Path(p).name for p in synced])
        leftovers = [p for p in self.store.root.parent.rglob("*.tmp")]
        self.assertEqual(leftovers, [])

    def test_failedRewriteKeepsTheOldFile(self):
        """
        When the new content cannot be written (a full disk), the old file
        stays as it was and the temporary file is removed.
        """
        from maild.store import files

        self.mailbox.subscribe("Lists")

        def full(fd):
            raise OSError(28, "No space left on device")

        self.patch(files.os, "fsync", full)
        self.assertRaises(OSError, self.mailbox.subscribe, "More")
        self.assertIn("Lists", self.mailbox.subscriptions())
        self.assertNotIn("More", self.mailbox.subscriptions())
        self.assertEqual(list(self.mailbox.root.glob("*.tmp")), [])


class VanishingFolderTests(unittest.SynchronousTestCase):
    """
    Another process (a second worker, Dovecot) deletes a folder while this
    one works on it: the store says the folder is missing, never a bare
    file-not-found from deep inside.
    """

    def setUp(self):
        self.store = MailStore(Path(self.mktemp()))
        self.mailbox = self.store.mailbox("alice@example.org")
        self.mailbox.ensureExists()
        self.mailbox.create("Work")
        self.folder = self.mailbox.folder("Work")
        self.folder.refresh()

    def vanish(self):
        import shutil

        shutil.rmtree(self.folder.path)

    def test_newKeywordInVanishedFolder(self):
        from maild.store.delivery import FolderMissing

        self.vanish()
        self.assertRaises(FolderMissing, self.folder.keywords.letters, ["$New"])
        self.assertEqual(self.folder.keywords.allNames(), [])

    def test_refreshOfVanishedFolder(self):
        self.vanish()
        self.assertTrue(self.folder.refresh().gone)
        self.assertTrue(self.folder.missing)
        self.assertEqual(self.folder.uidnext, 1)

    def test_refreshOfReplacedFolder(self):
        """
        Deleted and made again between two looks: read afresh, under a
        new UIDVALIDITY.
        """
        old = self.folder.uidvalidity
        self.vanish()
        self.mailbox.create("Work")
        change = self.folder.refresh()
        self.assertTrue(change.reset)
        self.assertGreater(self.folder.uidvalidity, old)
        self.assertFalse(self.folder.missing)


class SameTickChangeTests(unittest.SynchronousTestCase):
    """
    Another process changes a folder watched by polling (C{watch =
    "poll"}) and leaves its directories' modification times where they
    were: a change within one tick of a coarse clock, or what an NFS
    client shows through its attribute cache.  The folder still sees the
    change, by a directory's size or inode or by the UID list's stamp.
    """

    # A settled time: long past, so the index trusts it at once.
    TICK = 1_000_000_000 * 10**9

    def setUp(self):
        self.path = Path(self.mktemp())
        put(self.path, "cur/1700000001.M1P1Q1.h,S=17,W=20:2,S")
        # The user's UIDVALIDITY counter, which every process shares.
        self.uidValidities = UidValidities(Path(self.mktemp()).parent)
        self.folder = Folder("INBOX", self.path, uidValidities=self.uidValidities)
        self.changes = []
        self.folder.addListener(self)
        self.clock = Clock()
        self.watcher = FolderWatcher(self.clock, pollInterval=1.0, useInotify=False)
        self.addCleanup(self.watcher.stop)
        self.inSameTick()
        self.folder.refresh()
        self.watcher.watch(self.folder)
        self.changes.clear()

    def folderChanged(self, folder, change):
        self.changes.append(change)

    def inSameTick(self, path: Path | None = None) -> None:
        """
        Give the directories of C{path} (the folder's by default) the time
        they had when the index was built.
        """
        for sub in ("new", "cur"):
            os.utime((path or self.path) / sub, ns=(self.TICK, self.TICK))

    def poll(self):
        self.clock.advance(1.0)
        return self.changes

    def test_filesAddedInTheSameTick(self):
        """
        Files added to C{new/} by another process, the directory's time
        unmoved: found because the directory's size moved (on ext4 that
        takes a new block of entries; on tmpfs and btrfs one file).
        """
        size = os.stat(self.path / "new").st_size
        added = 0
        while os.stat(self.path / "new").st_size == size:
            added += 1
            self.assertLess(added, 2000, "the directory's size never moved")
            put(self.path, f"new/1700000002.M{added}P99Q{added}.other-node-with-a-long-host-name,S=17,W=20")
        self.inSameTick()
        [change] = self.poll()
        self.assertEqual(len(change.added), added)
        self.assertEqual(len(self.folder), added + 1)

    def test_folderReplacedInTheSameTick(self):
        """
        The folder deleted and made again by another process (DELETE then
        CREATE and APPEND on another node), its new directories carrying
        the old times: read afresh, under a new UIDVALIDITY.
        """
        old = self.folder.uidvalidity
        os.rename(self.path, self.path.with_name("deleted"))
        put(self.path, "cur/1700000005.M1P99Q1.other:2,")
        Folder("INBOX", self.path, uidValidities=self.uidValidities).refresh()
        self.inSameTick()
        [change] = self.poll()
        self.assertTrue(change.reset)
        self.assertGreater(self.folder.uidvalidity, old)
        self.assertEqual(self.folder.bases, ["1700000005.M1P99Q1.other"])

    def test_uidValidityRenewedElsewhere(self):
        """
        Another process gives the folder a new UIDVALIDITY (its UID list
        rewritten, its directories untouched): the index is voided and
        every listener told so.
        """
        old = self.folder.uidvalidity
        UidList(self.path, self.uidValidities).renew()
        [change] = self.poll()
        self.assertTrue(change.reset)
        self.assertGreater(self.folder.uidvalidity, old)
        self.assertEqual(len(self.folder), 1)

    def test_uidListGrownElsewhere(self):
        """
        The UID list grows (another process numbered a file) while the
        directories do not move: one look at the list, nothing to tell.
        """
        theirs = "1700000003.M1P9Q1.other"
        UidList(self.path).assign([theirs])
        self.assertEqual(self.poll(), [])
        self.assertEqual(self.folder.uidList.state.uids[theirs], 2)


class BusyFolderListingTests(unittest.SynchronousTestCase):
    """
    A busy folder, whose directories' times are always too recent to prove
    anything (L{maild.store.folder.UNSETTLED_NS}): this process's own
    changes keep its index current without listing the directories again,
    while another process's changes are still found, at once when a
    directory's stamp moved, or by the listing owed once a recent time has
    settled when the change hid within the same clock tick.
    """

    def setUp(self):
        self.path = Path(self.mktemp())
        put(self.path, "cur/1700000001.M1P1Q1.h,S=17,W=20:2,")
        put(self.path, "cur/1700000002.M1P1Q1.h,S=17,W=20:2,S")
        put(self.path, "new/1700000003.M1P1Q1.h,S=17,W=20")
        self.folder = Folder("INBOX", self.path)
        # Directory times are of the real clock; the folder's clock stands
        # still until a test moves it, so they stay recent.
        self.now = time.time_ns()
        self.folder.nowNs = lambda: self.now
        self.listed = countListings(self.folder)
        self.folder.refresh()
        self.listed.clear()

    def otherProcess(self) -> Folder:
        """
        The same folder as another process (a second worker) sees it.
        """
        other = Folder("INBOX", self.path)
        other.refresh()
        return other

    def settle(self):
        self.now += maild.store.folder.UNSETTLED_NS + 1

    def test_ownChangesListNothing(self):
        """
        Flag changes, taking messages out of C{new/} and further looks in
        between, all within recent directory times, cost no listing: the
        index already holds what changed.
        """
        folder = self.folder
        folder.setFlags([0], maildir.FLAGGED, mode=1)
        folder.refresh()
        folder.claimRecent()
        folder.refresh()
        folder.setFlags([1, 2], maildir.SEEN, mode=-1)
        self.assertFalse(folder.refresh())
        self.assertEqual(self.listed, [])
        self.assertEqual(sorted(os.listdir(self.path / "cur")), [folder.fileName(i)[4:] for i in range(3)])
        self.assertEqual(list(folder.flags), [maildir.FLAGGED, 0, 0])

    def test_anotherProcessChangeSeenAtOnce(self):
        """
        A flag change by another process, after ours, whose directory's
        stamp moved, is found by the next look.
        """
        self.folder.setFlags([0], maildir.FLAGGED, mode=1)
        stamp = os.stat(self.path / "cur").st_mtime_ns
        self.otherProcess().setFlags([1], maildir.DELETED, mode=1)
        # Its rename in a later clock tick than ours.
        os.utime(self.path / "cur", ns=(stamp + 5_000_000, stamp + 5_000_000))
        change = self.folder.refresh()
        self.assertEqual(change.flagged, [2])
        self.assertEqual(self.folder.flags[1], maildir.SEEN | maildir.DELETED)
        self.assertIn("cur", self.listed)

    def test_sameTickChangeFoundOnceSettled(self):
        """
        Another process's rename within the clock tick of ours leaves the
        directory's stamp where ours did: it stays unseen while that time is
        recent, and the listing owed once it has settled finds it.
        """
        self.folder.setFlags([0], maildir.FLAGGED, mode=1)
        cur = os.stat(self.path / "cur")
        self.otherProcess().setFlags([1], maildir.DELETED, mode=1)
        os.utime(self.path / "cur", ns=(cur.st_atime_ns, cur.st_mtime_ns))
        self.assertFalse(self.folder.refresh())
        self.assertEqual(self.listed, [])
        self.settle()
        self.assertEqual(self.folder.refresh().flagged, [2])
        self.assertEqual(self.folder.flags[1], maildir.SEEN | maildir.DELETED)
        # Settled and listed: trusted until the next change.
        self.listed.clear()
        self.assertFalse(self.folder.refresh())
        self.assertEqual(self.listed, [])

    def test_busyFolderListedOncePerSettlingTime(self):
        """
        While its own changes keep a folder's times recent, it is listed
        once per L{UNSETTLED_NS}, not once per change nor never.
        """
        for _ in range(3):
            self.folder.setFlags([0], maildir.FLAGGED, mode=1)
            self.folder.setFlags([0], maildir.FLAGGED, mode=-1)
            self.folder.refresh()
        self.assertEqual(self.listed, [])
        self.settle()
        self.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.folder.refresh()
        self.folder.setFlags([0], maildir.FLAGGED, mode=-1)
        self.folder.refresh()
        self.assertEqual(sorted(self.listed), ["cur", "new"])


class DeliveryTests(unittest.TestCase):
    syncMode = "fsync"

    def setUp(self):
        self.data = Path(self.mktemp())
        self.committer = Committer(reactor, self.data, self.syncMode)
        self.addCleanup(self.committer.stop)
        self.store = MailStore(self.data, self.committer)
        self.box = self.store.mailbox("alice@localhost")
        self.box.ensureExists()

    @defer.inlineCallbacks
    def test_crlfToLfAndSizes(self):
        """
        CRLF in, LF on disk; S= is the size on disk, W= the CRLF size; a CR
        split from its LF between writes is still one line end.
        """
        message = self.store.incoming(b"Return-Path: <a@b>\r\n")
        message.write(b"Subject: hi\r")
        message.write(b"\n\r\nbody\r\n")
        [path] = yield self.store.deliver(message, ["alice@localhost"])
        stored = b"Return-Path: <a@b>\nSubject: hi\n\nbody\n"
        self.assertEqual(path.read_bytes(), stored)
        self.assertEqual(maildir.sizesFromBase(path.name), (len(stored), len(stored) + 4))
        self.assertEqual((yield waitForEmptySpool(self.data)), [])

    @defer.inlineCallbacks
    def test_openFolderLearnsOfDelivery(self):
        """
        A delivery into a folder that is open adds it to the index at once
        (announced to listeners), with no listing of the folder.
        """
        folder = self.box.folder("INBOX")
        folder.refresh()
        seen = []
        folder.addListener(type("L", (), {"folderChanged": lambda s, f, c: seen.append(c)})())
        message = self.store.incoming()
        message.write(b"Subject: a\r\n\r\nb\r\n")
        yield self.store.deliver(message, ["alice@localhost"])
        self.assertEqual([c.added for c in seen], [[1]])
        self.assertEqual(list(folder.uids), [1])

    @defer.inlineCallbacks
    def test_manyAtOnceAreGrouped(self):
        """
        Messages committed together are all stored, each exactly once.
        """
        ds = []
        for i in range(200):
            message = self.store.incoming()
            message.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
            ds.append(self.store.deliver(message, ["alice@localhost"]))
        yield defer.gatherResults(ds)
        bodies = sorted(p.read_bytes() for p in (self.box.root / "new").iterdir())
        self.assertEqual(bodies, sorted(b"Subject: %d\n\nbody\n" % i for i in range(200)))

    @defer.inlineCallbacks
    def test_missingMaildirCreated(self):
        message = self.store.incoming()
        message.write(b"x\r\n")
        [path] = yield self.store.deliver(message, ["new@localhost"])
        self.assertEqual(path.parent, self.store.userRoot("new@localhost") / "new")

    @defer.inlineCallbacks
    def test_writeErrorReported(self):
        """
        A storage error, for a small message (kept in memory until the
        commit) or a big one (written out as it arrives), is reported as
        DeliveryFailed when the message is committed, and nothing is stored.
        """
        if (self.data / "tmp").exists():
            (self.data / "tmp").rmdir()
        (self.data / "tmp").write_text("a file where the spool folder should be")
        for size in (100, IncomingMessage.SPILL * 3):
            message = self.store.incoming()
            message.write(b"x" * (size - 2) + b"\r\n")
            yield self.assertFailure(self.store.deliver(message, ["alice@localhost"]), DeliveryFailed)
        self.assertEqual(os.listdir(self.box.root / "new"), [])

    @defer.inlineCallbacks
    def test_appendSetsTheDateBeforeTheFileIsVisible(self):
        """
        A message appended with a date is in its folder with that date as
        its modification time from the moment it is there: the date is set
        on the spool file before it is placed (the sync hook sees every
        placed file before anyone is told of it).
        """
        seen = []
        self.committer.syncHook = lambda paths: seen.extend(os.stat(p).st_mtime for p in paths)
        folder = self.box.folder("Drafts")
        message = self.store.incoming()
        message.write(b"Subject: dated\r\n\r\nbody\r\n")
        uidvalidity, uid = yield folder.append(message, maildir.SEEN, ["$label1"], 1_600_000_000)
        self.assertEqual((uidvalidity, uid), (folder.uidvalidity, 1))
        self.assertEqual(seen, [1_600_000_000])
        self.assertEqual(folder.internalDate(folder.position(uid)), 1_600_000_000)
        self.assertEqual(folder.keywordNames(folder.position(uid)), ["$label1"])

    @defer.inlineCallbacks
    def test_failedAppendStoresNothing(self):
        """
        An APPEND whose date the store cannot keep is refused before
        anything is stored; one whose date cannot be set on the file fails
        with DeliveryFailed, and neither leaves anything in the folder or
        the spool.
        """
        folder = self.box.folder("Drafts")
        message = self.store.incoming()
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        self.assertRaises(ValueError, folder.append, message, 0, (), 10.0**20)
        self.assertRaises(ValueError, folder.append, message, 0, (), -(10.0**20))
        message.discard()

        from maild.store import delivery

        def refuse(*args, **kwargs):
            raise OSError(22, "Invalid argument")

        self.patch(delivery.os, "utime", refuse)
        message = self.store.incoming()
        message.write(b"Subject: y\r\n\r\nbody\r\n")
        yield self.assertFailure(folder.append(message, 0, (), 1_600_000_000), DeliveryFailed)
        self.assertEqual([p for sub in ("new", "cur", "tmp") for p in (folder.path / sub).iterdir()], [])
        self.assertEqual((yield waitForEmptySpool(self.data)), [])

    @defer.inlineCallbacks
    def test_bigMessageWrittenInPieces(self):
        """
        A message bigger than the in-memory limit is in the spool before it
        is committed, and arrives whole.
        """
        message = self.store.incoming()
        line = b"y" * 998 + b"\r\n"
        for _ in range(400):
            message.write(line)
        yield message._spilled
        self.assertIsNotNone(message.path)
        self.assertGreaterEqual(message.path.stat().st_size, IncomingMessage.SPILL)
        [path] = yield self.store.deliver(message, ["alice@localhost"])
        self.assertEqual(path.read_bytes(), (b"y" * 998 + b"\n") * 400)
        self.assertEqual((yield waitForEmptySpool(self.data)), [])


class SyncfsDeliveryTests(DeliveryTests):
    """
    The same, syncing with syncfs().
    """

    syncMode = "syncfs"
    if not sys.platform.startswith("linux"):
        skip = "syncfs() is Linux only"


class CrossProcessLockTests(unittest.SynchronousTestCase):
    def test_nestedHoldKeepsTheLock(self):
        """
        Taking the lock again inside its block, and leaving that inner
        block, does not release it: another process still cannot take it.
        """
        from maild.store.locking import locked

        path = Path(self.mktemp())
        probe = (
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        )

        def otherProcessCanLock() -> bool:
            return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True).returncode == 0

        with locked(path):
            with locked(path):
                self.assertFalse(otherProcessCanLock())
            self.assertFalse(otherProcessCanLock())
        self.assertTrue(otherProcessCanLock())

    def test_uidsUniqueAcrossProcesses(self):
        """
        Four processes numbering new files in one folder at once never give
        two files the same UID.
        """
        path = Path(self.mktemp()).resolve()
        path.mkdir()
        script = textwrap.dedent(
            """
            import sys
            from pathlib import Path
            from maild.store.uidlist import UidList
            uids = UidList(Path(sys.argv[1]))
            for i in range(100):
                print(uids.assign([f"{sys.argv[2]}-{i}"])[0])
            """
        )
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path), str(n)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for n in range(4)
        ]
        assigned = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0, err)
            assigned += [int(x) for x in out.split()]
        self.assertEqual(sorted(assigned), list(range(1, 401)))


class FakeTime:
    """
    A clock and a sleep that only move when slept on; C{onSleep} runs at
    each sleep (to release a lock, say).
    """

    def __init__(self, onSleep=None) -> None:
        self.now = self.start = time.time()
        self.sleeps = 0
        self.onSleep = onSleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        if self.onSleep is not None:
            self.onSleep(self.sleeps)


class RecordLockTests(unittest.SynchronousTestCase):
    """
    maild processes meet in an fcntl record lock on maild-uidlist.lock
    before Dovecot's dot-lock (issue 14: NFSv4, CephFS and GlusterFS pass
    fcntl locks to every node, and the kernel drops a dead holder's).
    """

    def setUp(self):
        self.path = Path(self.mktemp()).resolve()
        self.path.mkdir()
        self.recordLock = self.path / "maild-uidlist.lock"
        self.dotLock = self.path / "dovecot-uidlist.lock"
        self.held: list[int] = []

    def settings(self, fake: FakeTime, **values):
        from maild.store.locking import DotLockSettings

        return DotLockSettings(sleep=fake.sleep, clock=fake.clock, **values)

    def holdElsewhere(self) -> int:
        """
        Take the record lock as another holder would: an open file
        description lock on a descriptor of our own, which conflicts with
        any other open of the file, in this process too.
        """
        from maild.store.locking import _tryRecordLock

        fd = os.open(self.recordLock, os.O_RDWR | os.O_CREAT)
        self.held.append(fd)
        self.addCleanup(lambda: fd in self.held and self.letGo(fd))
        self.assertTrue(_tryRecordLock(fd))
        return fd

    def letGo(self, fd: int) -> None:
        self.held.remove(fd)
        os.close(fd)

    def test_waitsForTheRecordLockFirst(self):
        """
        While another maild holds the record lock, numbering waits, and
        does not take Dovecot's dot-lock meanwhile; once the holder lets
        go, it numbers after what the holder appended.
        """
        held = self.holdElsewhere()
        seen = []

        def holderFinishes(sleeps):
            seen.append(self.dotLock.exists())
            if sleeps == 3:
                with open(self.path / "dovecot-uidlist", "a") as f:
                    f.write("3 V1 N4\n1 :first\n2 :second\n3 :third\n")
                self.letGo(held)

        fake = FakeTime(holderFinishes)
        uids = UidList(self.path, lockSettings=self.settings(fake))
        self.assertEqual(uids.assign(["b"]), [4])
        self.assertEqual(fake.sleeps, 3)
        self.assertEqual(seen, [False, False, False])

    def test_deadHoldersLockDropped(self):
        """
        A process killed (SIGKILL) while it holds the record lock does not
        hold up the next one: the kernel dropped its lock.
        """
        import signal

        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import os, sys, time
                from maild.store.locking import _tryRecordLock
                fd = os.open({str(self.recordLock)!r}, os.O_RDWR | os.O_CREAT)
                assert _tryRecordLock(fd)
                print("held", flush=True)
                time.sleep(60)
            """)],
            stdout=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        self.addCleanup(holder.wait)
        self.addCleanup(lambda: holder.poll() is None and holder.kill())
        self.assertEqual(holder.stdout.readline(), b"held\n")
        from maild.store.locking import _tryRecordLock

        probe = os.open(self.recordLock, os.O_RDWR)
        self.addCleanup(os.close, probe)
        self.assertFalse(_tryRecordLock(probe))
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        fake = FakeTime()
        self.assertEqual(UidList(self.path, lockSettings=self.settings(fake)).assign(["a"]), [1])
        self.assertEqual(fake.sleeps, 0)

    def test_releasedAfterTheBlock(self):
        """
        The lock is given back when the outermost block ends, though this
        process keeps the file open for its next hold; a lock file removed
        meanwhile (the folder deleted and made again) is opened anew.
        """
        from maild.store.locking import _tryRecordLock

        uids = UidList(self.path)

        def lockedElsewhere() -> bool:
            probe = os.open(self.recordLock, os.O_RDWR)
            try:
                return not _tryRecordLock(probe)
            finally:
                os.close(probe)

        for round in range(2):
            with uids.locked():
                with uids.locked():
                    self.assertTrue(lockedElsewhere())
                self.assertTrue(lockedElsewhere())
            self.assertFalse(lockedElsewhere())
            self.recordLock.unlink()

    def test_timeout(self):
        """
        A record lock held longer than the timeout is an error, not a wait
        without end.
        """
        from maild.store.locking import LockTimeout

        self.holdElsewhere()
        fake = FakeTime()
        uids = UidList(self.path, lockSettings=self.settings(fake, timeout=5.0))
        self.assertRaises(LockTimeout, uids.assign, ["a"])
        self.assertGreater(fake.sleeps, 0)
        self.assertFalse(self.dotLock.exists())

    def test_lockFileReplacedWhileWaiting(self):
        """
        A lock file removed and made again while we waited for it is locked
        anew: a lock on the file no longer at that name would keep nobody
        out.
        """
        from maild.store import locking

        held = self.holdElsewhere()

        def replaced(sleeps):
            os.unlink(self.recordLock)
            self.letGo(held)
            self.recordLock.touch()

        fake = FakeTime(replaced)
        settings = self.settings(fake)
        fd = locking._takeRecordLock(str(self.recordLock), settings, fake.clock() + 10).fd
        self.addCleanup(os.close, fd)
        self.assertEqual(os.fstat(fd).st_ino, self.recordLock.stat().st_ino)
        other = os.open(self.recordLock, os.O_RDWR)
        self.addCleanup(os.close, other)
        self.assertFalse(locking._tryRecordLock(other))


class DovecotDotLockTests(unittest.SynchronousTestCase):
    """
    maild takes Dovecot's own lock on dovecot-uidlist (the dot-lock
    protocol of Dovecot's file-dotlock.c), so both servers can serve one
    folder at once.
    """

    def setUp(self):
        self.path = Path(self.mktemp()).resolve()
        self.path.mkdir()
        self.lock = self.path / "dovecot-uidlist.lock"

    def settings(self, fake: FakeTime, **values):
        from maild.store.locking import DotLockSettings

        return DotLockSettings(sleep=fake.sleep, clock=fake.clock, **values)

    def hold(self, holder: str, age: float = 0.0) -> None:
        self.lock.write_text(holder)
        if age:
            stamp = time.time() - age
            os.utime(self.lock, (stamp, stamp))

    def test_lockFileWhileHeld(self):
        """
        While maild numbers messages, dovecot-uidlist.lock exists and names
        this process as Dovecot writes it (pid:hostname); it is removed
        after, also after a nested hold.  Beside it stays only maild's
        record lock file (the lock itself is gone with its descriptor).
        """
        import socket

        uids = UidList(self.path)
        uids.assign(["a"])
        with uids.locked():
            with uids.locked():
                self.assertEqual(self.lock.read_text(), f"{os.getpid()}:{socket.gethostname()}")
            self.assertTrue(self.lock.exists())
        self.assertFalse(self.lock.exists())
        self.assertEqual(sorted(p.name for p in self.path.iterdir()), ["dovecot-uidlist", "maild-uidlist.lock"])

    def test_waitsWhileDovecotHoldsIt(self):
        """
        A lock a live process holds (pid 1 of this host) is waited for, and
        what its holder appended meanwhile is read before numbering: the
        new file gets the next UID, not one the holder gave out.
        """
        import socket

        uids = UidList(self.path)
        uids.assign(["a"])
        self.hold(f"1:{socket.gethostname()}", age=10)

        def dovecotFinishes(sleeps):
            if sleeps == 3:
                with open(self.path / "dovecot-uidlist", "a") as f:
                    f.write("2 W300 S290 :dovecot-wrote-this\n")
                self.lock.unlink()

        fake = FakeTime(dovecotFinishes)
        uids = UidList(self.path, lockSettings=self.settings(fake))
        self.assertEqual(uids.assign(["b"]), [3])
        self.assertEqual(fake.sleeps, 3)
        self.assertEqual(uids.assign(["dovecot-wrote-this"]), [2])

    def test_deadHolderOverridden(self):
        """
        A lock left by a process of this host that no longer exists (and at
        least 2 seconds old) is taken over at once.
        """
        import socket

        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        self.hold(f"{int(dead.stdout)}:{socket.gethostname()}", age=10)
        fake = FakeTime()
        self.assertEqual(UidList(self.path, lockSettings=self.settings(fake)).assign(["a"]), [1])
        self.assertEqual(fake.sleeps, 0)

    def test_holderDyingWhileTakingItLeavesNoEmptyLock(self):
        """
        A process that dies while taking the lock (here as its holder's
        name is being made) leaves no lock that names nobody, which others
        could only wait out for the stale time (two minutes of a blocked
        reactor, seen when a node was killed under load): the next taker
        gets it at once.
        """
        from maild.store import locking

        def killed():
            raise SystemExit("killed")

        self.patch(locking, "_holderId", killed)
        self.assertRaises(SystemExit, UidList(self.path).assign, ["a"])
        self.assertFalse(self.lock.exists())
        self.patch(locking, "_holderId", lambda: f"{os.getpid()}:test".encode())
        fake = FakeTime()
        self.assertEqual(UidList(self.path, lockSettings=self.settings(fake)).assign(["a"]), [1])
        self.assertEqual(fake.sleeps, 0)
        self.assertEqual(sorted(p.name for p in self.path.iterdir()), ["dovecot-uidlist", "maild-uidlist.lock"])

    def test_staleLockOverridden(self):
        """
        A lock of another host that nothing changed for the stale timeout
        (2 minutes, Dovecot's for dovecot-uidlist) is taken over.
        """
        self.hold("4242:elsewhere.example", age=10)
        fake = FakeTime()
        uids = UidList(self.path, lockSettings=self.settings(fake, staleAfter=120.0, timeout=300.0))
        self.assertEqual(uids.assign(["a"]), [1])
        self.assertGreater(fake.now - fake.start, 120.0 - 10)

    def test_timeout(self):
        """
        A lock that stays fresh longer than the timeout is an error, not a
        wait without end.
        """
        from maild.store.locking import LockTimeout

        def touch(sleeps):
            os.utime(self.lock)

        self.hold("4242:elsewhere.example")
        fake = FakeTime(touch)
        uids = UidList(self.path, lockSettings=self.settings(fake, staleAfter=60.0, timeout=5.0))
        self.assertRaises(LockTimeout, uids.assign, ["a"])

    def test_keywordsUnderUidListLock(self):
        """
        A new keyword waits for the UID list lock (Dovecot creates keywords
        only under it), and each rewrite of dovecot-keywords moves its time
        to a later second, so that Dovecot reads it again.
        """
        import socket

        keywords = Keywords(self.path)
        keywords.letters(["One"])
        first = os.stat(self.path / "dovecot-keywords").st_mtime
        self.hold(f"1:{socket.gethostname()}", age=10)

        def dovecotFinishes(sleeps):
            if sleeps == 2:
                (self.path / "dovecot-keywords").write_text("0 One\n1 FromDovecot\n")
                self.lock.unlink()

        fake = FakeTime(dovecotFinishes)
        keywords = Keywords(self.path, self.settings(fake))
        self.assertEqual(keywords.letters(["Two"]), "c")
        self.assertEqual(fake.sleeps, 2)
        text = (self.path / "dovecot-keywords").read_text()
        self.assertEqual(text, "0 One\n1 FromDovecot\n2 Two\n")
        self.assertGreaterEqual(int(os.stat(self.path / "dovecot-keywords").st_mtime), int(first) + 1)
        self.assertFalse((self.path / "dovecot-keywords.lock").exists())
