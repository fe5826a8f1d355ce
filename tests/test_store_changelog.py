"""
Two maild processes on one folder learn each other's flag changes, moves
out of C{new/} and expunges from its change log
(L{maild.store.changelog}) instead of listing the folder again, and list
it as before whenever something the log does not tell changed it
(Dovecot, a Maildir tool, a delivery).

Each process is a L{Folder} of its own on the same directory, as two
workers have.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from maild.store import changelog, folder, maildir
from maild.store.folder import Folder
from tests.support import countListings
from tests.test_store import put

FIRST = "1700000001.M1P1Q1.h,S=17,W=20"
SECOND = "1700000002.M1P1Q1.h,S=17,W=20"
THIRD = "1700000003.M1P1Q1.h,S=17,W=20"
PAST = 1_000_000_000_000_000_000


class Process:
    """
    One process's view of the folder: its index, what it was told, and
    the directories it listed.
    """

    def __init__(self, path: Path) -> None:
        self.folder = Folder("INBOX", path)
        self.changes = []
        self.folder.addListener(self)
        self.listed = countListings(self.folder)
        self.folder.refresh()

    def folderChanged(self, folder, change):
        self.changes.append(change)

    def flagsOf(self, uid: int) -> int:
        return self.folder.flags[self.folder.position(uid)]

    def forget(self) -> None:
        self.changes.clear()
        self.listed.clear()


class ChangeLogTests(unittest.TestCase):
    def setUp(self):
        self.path = Path(self.mktemp()).resolve()
        put(self.path, f"cur/{FIRST}:2,S")
        put(self.path, f"cur/{SECOND}:2,")
        put(self.path, f"new/{THIRD}")
        self.a = Process(self.path)
        self.b = Process(self.path)
        self.settle()

    def settle(self) -> None:
        """
        Give the directories a time long past, and let both processes take
        it in: a change either makes next is then seen in the directories'
        times, whatever the file system's clock tick.
        """
        for sub in ("new", "cur"):
            os.utime(self.path / sub, ns=(PAST, PAST))
        for process in (self.a, self.b):
            process.folder._mtimes = {"new": -1, "cur": -1}
            process.folder.refresh()
            process.forget()

    def test_flagChangeWithoutListing(self):
        """
        A flag change one process makes reaches the other, announced as
        such, without a listing.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.assertEqual(self.a.listed, [])
        change = self.b.folder.refresh()
        self.assertEqual(change.flagged, [1])
        self.assertEqual(self.b.flagsOf(1), maildir.SEEN | maildir.FLAGGED)
        self.assertEqual(self.b.listed, [])
        self.assertEqual(self.b.folder.refresh().flagged, [])

    def test_claimWithoutListing(self):
        """
        A message moved out of new/ by one process is known to the other as
        in cur/ (no longer \\Recent), without a listing.
        """
        self.assertEqual(self.a.folder.claimRecent(), [3])
        self.assertEqual(self.b.folder.refresh().flagged, [3])
        self.assertFalse(self.b.flagsOf(3) & maildir.IN_NEW)
        self.assertEqual(self.b.listed, [])
        with self.b.folder.open(self.b.folder.position(3)) as f:
            self.assertTrue(f.read())

    @defer.inlineCallbacks
    def test_expungeWithoutListing(self):
        """
        An expunge one process makes (its files moved out of the folder
        under the UID list lock, then removed by a thread) reaches the
        other without a listing; the remover does not list its folder
        again either.
        """
        yield self.a.folder.expungeInThread([1, 3])
        self.assertEqual(self.b.folder.refresh().expunged, [1, 3])
        self.assertEqual(list(self.b.folder.uids), [2])
        self.assertEqual(self.b.listed, [])
        self.assertEqual(self.b.folder.uidList.refresh().uids, {SECOND: 2})
        self.assertFalse(self.a.folder.refresh())
        self.assertEqual(self.a.listed, [])

    def test_severalChangesInTurn(self):
        """
        Changes of both processes, one after the other, are followed in
        order by each.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.b.folder.setFlags([1], maildir.ANSWERED, mode=1)
        self.a.folder.setFlags([0], maildir.SEEN, mode=-1)
        self.b.folder.claimRecent()
        for process in (self.a, self.b):
            process.folder.refresh()
            self.assertEqual(
                [process.flagsOf(uid) for uid in (1, 2, 3)], [maildir.FLAGGED, maildir.ANSWERED, 0]
            )
            self.assertEqual(process.listed, [])

    def test_unloggedRenameIsListed(self):
        """
        A rename nobody logged (Dovecot's, a Maildir tool's) is found by a
        listing, even after logged changes.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        os.rename(self.path / f"cur/{SECOND}:2,", self.path / f"cur/{SECOND}:2,D")
        change = self.b.folder.refresh()
        self.assertEqual(sorted(change.flagged), [1, 2])
        self.assertEqual(self.b.flagsOf(2), maildir.DRAFT)
        self.assertIn("cur", self.b.listed)

    def test_unloggedRemovalIsListed(self):
        """
        A file another program removed is found missing by a listing (under
        the lock, as Dovecot's rule wants), though the log says nothing.
        """
        os.unlink(self.path / f"cur/{SECOND}:2,")
        self.assertEqual(self.b.folder.refresh().expunged, [2])
        self.assertIn("cur", self.b.listed)

    def test_deliveryListsNewAlone(self):
        """
        A message delivered into new/ (deliveries are not logged) while a
        logged flag change was made in cur/: only new/ is listed, and both
        are known and told to the listeners.
        """
        self.a.folder.setFlags([1], maildir.SEEN, mode=1)
        put(self.path, "new/1700000004.M1P1Q1.h,S=17,W=20")
        change = self.b.folder.refresh()
        self.assertEqual((change.flagged, change.added), ([2], [4]))
        self.assertEqual(self.b.listed, ["new"])
        # Both are announced to the sessions, not only returned.
        announced = [(c.flagged, c.added) for c in self.b.changes]
        self.assertEqual(announced, [([2], []), ([], [4])])

    def test_placedElsewhereTakenFromLog(self):
        """
        A message the other process placed and moved out of new/ before
        this one listed new/ is taken from the log line (its UID is above
        every UID this process knows), without a listing of cur/.
        """
        put(self.path, "new/1700000004.M1P1Q1.h,S=17,W=20")
        self.a.folder.refresh()
        self.a.folder.claimRecent()
        self.settleOnly(self.a)
        change = self.b.folder.refresh()
        self.assertEqual(change.added, [4])
        self.assertEqual(self.b.folder.fileName(self.b.folder.position(4)), "cur/1700000004.M1P1Q1.h,S=17,W=20:2,")
        self.assertNotIn("cur", self.b.listed)

    def test_unknownBelowIsListed(self):
        """
        When the other process moved out of new/ a message numbered above
        one this process never saw, the folder is listed: sessions learn
        messages in UID order, and would never hear of the lower one.
        """
        put(self.path, "new/1700000004.M1P1Q1.h,S=17,W=20")
        put(self.path, "new/1700000005.M1P1Q1.h,S=17,W=20")
        self.a.folder.refresh()
        self.a.folder.claimRecent([self.a.folder.position(5)])
        self.settleOnly(self.a)
        change = self.b.folder.refresh()
        self.assertEqual(change.added, [4, 5])
        self.assertIn("cur", self.b.listed)

    def settleOnly(self, process) -> None:
        """
        Make new/ look as it did to the other process, so that only the
        log (not new/'s time) can tell it what happened.
        """
        os.utime(self.path / "new", ns=(PAST, PAST))
        process.folder._mtimes["new"] = self.b.folder._mtimes["new"]

    def test_otherUidValidity(self):
        """
        Lines written under another UIDVALIDITY prove nothing: listed.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.b.folder.uidvalidity += 1
        self.b.folder.refresh()
        self.assertIn("cur", self.b.listed)

    def test_unwritableNameIsListed(self):
        """
        A change to a file whose name cannot be written on one line is not
        logged, and the other process lists the folder.
        """
        put(self.path, "cur/odd\tname:2,")
        self.settle()
        uid = self.a.folder.uids[self.a.folder.bases.index("odd\tname")]
        self.a.folder.setFlags([self.a.folder.position(uid)], maildir.SEEN, mode=1)
        self.assertEqual(self.b.folder.refresh().flagged, [uid])
        self.assertIn("cur", self.b.listed)

    def test_logStartedAnew(self):
        """
        A log grown past its size is started anew by the next writer; a
        reader takes the end of the old file, then the new one.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.b.folder.refresh()
        self.patch(changelog, "ROTATE_AT", (self.path / changelog.FILE_NAME).stat().st_size + 1)
        self.a.folder.setFlags([1], maildir.FLAGGED, mode=1)
        self.a.folder.setFlags([0], maildir.SEEN, mode=-1)
        self.assertEqual((self.path / changelog.FILE_NAME).read_text().count("\n"), 1)
        self.b.folder.refresh()
        self.assertEqual([self.b.flagsOf(uid) for uid in (1, 2)], [maildir.FLAGGED, maildir.FLAGGED])
        self.assertEqual(self.b.listed, [])

    def test_tornLineIsListed(self):
        """
        A line that makes no sense (torn by a full disk, say) proves
        nothing: the folder is listed.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        with open(self.path / changelog.FILE_NAME, "ab") as f:
            f.write(b"1 2 3\n")
        self.b.folder.refresh()
        self.assertEqual(self.b.flagsOf(1), maildir.SEEN | maildir.FLAGGED)
        self.assertIn("cur", self.b.listed)

    def test_disturbedListingFollowedFromLog(self):
        """
        A listing the other process's rename disturbed (the directory moved
        while it was read) is completed from the log at the next look
        instead of a second listing.
        """
        folder = self.b.folder
        listDir = folder._listDir

        def renameWhileListed(sub):
            names = listDir(sub)
            if sub == "cur" and not self.b.listed[:-1].count("cur"):
                self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
            return names

        folder._listDir = renameWhileListed
        folder._mtimes = {"new": -1, "cur": -1}
        folder.refresh()
        self.b.forget()
        folder._listDir = listDir
        self.assertEqual(folder.refresh().flagged, [1])
        self.assertEqual(self.b.flagsOf(1), maildir.SEEN | maildir.FLAGGED)
        self.assertEqual(self.b.listed, [])

    def holdLock(self) -> Path:
        """
        Another process holds the UID list lock (taken just now).
        """
        lock = self.path / "dovecot-uidlist.lock"
        lock.write_text(f"{os.getpid() + 1}:{os.uname().nodename}")
        return lock

    def test_changeInProgressWaitsForItsLine(self):
        """
        While another process holds the UID list lock, a change of cur/ no
        line explains yet is its change in progress: the look finds
        nothing and lists nothing, and once its line is written the change
        is learnt from it.
        """
        lock = self.holdLock()
        writer = self.a.folder
        before = writer._dirMtimes()
        os.rename(self.path / f"cur/{FIRST}:2,S", self.path / f"cur/{FIRST}:2,FS")
        self.assertFalse(self.b.folder.refresh())
        self.assertEqual(self.b.listed, [])
        ops = changelog.formatOps([(1, FIRST, "FS")], ())
        writer.changes.append(writer.uidvalidity, before, writer._dirMtimes(), ops)
        lock.unlink()
        self.assertEqual(self.b.folder.refresh().flagged, [1])
        self.assertEqual(self.b.listed, [])

    def test_unloggedChangeUnderHeldLockListedSoon(self):
        """
        A change nobody logs, made while the lock is held (Dovecot's), is
        put off at most L{UNSETTLED_NS}: then the folder is listed, though
        the lock is held again.
        """
        self.holdLock()
        os.rename(self.path / f"cur/{FIRST}:2,S", self.path / f"cur/{FIRST}:2,FS")
        self.assertFalse(self.b.folder.refresh())
        later = self.b.folder.nowNs() + folder.UNSETTLED_NS + 1
        self.patch(Folder, "nowNs", staticmethod(lambda: later))
        self.holdLock()
        self.assertEqual(self.b.folder.refresh().flagged, [1])
        self.assertIn("cur", self.b.listed)

    def countListings(self) -> list[str]:
        """
        Every directory any thread lists from now on.
        """
        listed = []
        listdir = os.listdir

        def counted(path):
            listed.append(os.fspath(path))
            return listdir(path)

        self.patch(os, "listdir", counted)
        return listed

    @defer.inlineCallbacks
    def test_expungedTwiceWithoutListing(self):
        """
        Two sessions on two processes expunge the same message: the second
        process learns from the log that the file is gone (and tells its
        sessions so), and lists nothing to look for it under another name.
        """
        yield self.a.folder.expungeInThread([1])
        listed = self.countListings()
        yield self.b.folder.expungeInThread([1])
        self.assertEqual([c.expunged for c in self.b.changes], [[1]])
        self.assertEqual(listed, [])
        self.assertEqual(sorted(os.listdir(self.path / "cur")), [f"{SECOND}:2,"])

    @defer.inlineCallbacks
    def test_expungeRenamedWithoutListing(self):
        """
        A message the other process renamed (new flags) since this one
        looked is removed under its new name, told by the log, without a
        listing.
        """
        self.a.folder.setFlags([1], maildir.DELETED, mode=1)
        listed = self.countListings()
        yield self.b.folder.expungeInThread([2])
        self.assertEqual(listed, [])
        self.assertEqual(sorted(os.listdir(self.path / "cur")), [f"{FIRST}:2,S"])

    def test_readRenamedWithoutListing(self):
        """
        Reading a message the other process renamed since this one looked
        finds it from the log, without a listing.
        """
        self.a.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.assertEqual(self.b.folder.read(self.b.folder.position(1)), b"Subject: x\n\nbody\n")
        self.assertEqual(self.b.listed, [])

    def test_watcherLooksAgainAfterPutOff(self):
        """
        A watched folder whose look was put off (another process's change
        in progress) is looked at again shortly by the watcher, since the
        end of that change may make no event: an IDLE client hears of it.
        """
        from twisted.internet.task import Clock

        from maild.store.watch import FolderWatcher

        clock = Clock()
        watcher = FolderWatcher(clock, pollInterval=60.0, settle=0.02, useInotify=False)
        self.addCleanup(watcher.stop)
        watcher.watch(self.b.folder)
        lock = self.holdLock()
        writer = self.a.folder
        before = writer._dirMtimes()
        os.rename(self.path / f"cur/{FIRST}:2,S", self.path / f"cur/{FIRST}:2,FS")
        watcher._changed(self.b.folder)
        clock.advance(0.02)
        self.assertTrue(self.b.folder.lookAgainSoon)
        self.assertEqual(self.b.changes, [])
        ops = changelog.formatOps([(1, FIRST, "FS")], ())
        writer.changes.append(writer.uidvalidity, before, writer._dirMtimes(), ops)
        lock.unlink()
        clock.advance(0.02)
        self.assertEqual([c.flagged for c in self.b.changes], [[1]])
        self.assertFalse(self.b.folder.lookAgainSoon)

    @defer.inlineCallbacks
    def test_expungeHoldsNoLockWhileRemoving(self):
        """
        The thread that removes expunged files holds no lock: the files
        are out of the folder (in tmp/) before it starts, so a flag change
        meanwhile waits for nothing, and a listing never finds them.
        """
        from maild.store import folder as folderModule

        held = []
        unlinkAll = folderModule._unlinkAll

        def unlinking(paths):
            held.append((self.path / "dovecot-uidlist.lock").exists())
            self.assertEqual(sorted(os.listdir(self.path / "cur")), [f"{SECOND}:2,"])
            return unlinkAll(paths)

        self.patch(folderModule, "_unlinkAll", unlinking)
        expunged = yield self.a.folder.expungeInThread([1])
        self.assertEqual((expunged, held), ([1], [False]))
        self.assertEqual(os.listdir(self.path / "tmp"), [])

    def test_claimOfClaimedTakesNoLock(self):
        """
        A session told of messages that were claimed already (by another
        session, of this process or of another) takes no lock to claim
        nothing: most sessions of a busy folder are in that case.
        """
        self.a.folder.claimRecent()
        self.b.folder.refresh()

        def locked():
            raise AssertionError("the UID list lock was taken")

        self.b.folder.uidList.locked = locked
        self.assertEqual(self.b.folder.claimRecent(range(len(self.b.folder))), [])


class FolderMadeAgainTests(unittest.TestCase):
    """
    One process deletes a folder and makes it again under the same name
    while another holds it open (two workers, a DELETE and a CREATE on
    one and a SELECT on the other): the other reads the new folder as it
    is, whatever it knew of the old one.
    """

    @defer.inlineCallbacks
    def test_expungedUidsOfTheOldFolderForgotten(self):
        """
        The UIDs the other process saw expunged in the old folder are
        those the new folder gives its first messages: they keep them, and
        are not numbered a second time as expunged messages come back.
        (imaptest's expunge2 and store tests, with two workers, found the
        new folder's messages under UIDs 4 to 6, each listed twice in
        dovecot-uidlist.)
        """
        path = Path(self.mktemp()).resolve()
        for name in (FIRST, SECOND, THIRD):
            put(path, f"cur/{name}:2,")
        other = Process(path)
        yield other.folder.expungeInThread([1, 2, 3])
        self.assertEqual(len(other.folder), 0)

        shutil.rmtree(path)
        fresh = ["1700000011.M1P1Q1.h,S=17,W=20", "1700000012.M1P1Q1.h,S=17,W=20"]
        for name in fresh:
            put(path, f"new/{name}")
        uidvalidity = other.folder.uidvalidity + 1
        (path / "dovecot-uidlist").write_text(
            f"3 V{uidvalidity} N3 G0123456789abcdef0123456789abcdef\n1 :{fresh[0]}\n2 :{fresh[1]}\n"
        )

        change = other.folder.refresh()
        self.assertEqual(other.folder.uidvalidity, uidvalidity)
        self.assertEqual(list(other.folder.uids), [1, 2])
        self.assertEqual(other.folder.bases, fresh)
        self.assertEqual(change.added, [1, 2])
        records = (path / "dovecot-uidlist").read_text().splitlines()[1:]
        self.assertEqual(records, [f"1 :{fresh[0]}", f"2 :{fresh[1]}"])
