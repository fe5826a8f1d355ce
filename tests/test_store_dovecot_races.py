"""
The interleavings of maild and Dovecot on one folder that gave a message
two UIDs under mixed load (issue 15), each replayed deterministically by
doing to the files what Dovecot does, at the moment it does it.

Dovecot lists C{cur/} and C{new/} holding C{dovecot-uidlist.lock}, and
renames or removes message files only while holding it: a file its
listing lacks is then gone, and its UID is expunged for good; were the
file renamed meanwhile, Dovecot would number it again at its next look.
maild must keep to the same rules (rename only under the lock; take a
file for expunged only when a listing under the lock lacks it), and notice
what Dovecot numbered even when the directories' times say nothing moved.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from twisted.trial import unittest

from maild.store import maildir
from maild.store.folder import Folder
from maild.store.locking import DotLockSettings
from maild.store.uidlist import UidList
from tests.test_store import FakeTime, put

FIRST = "1700000001.M1P1Q1.h,S=17,W=20"
SECOND = "1700000002.M1P1Q1.h,S=17,W=20"
PAST = 1_000_000_000


class DovecotRaceTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp()).resolve()
        put(self.path, f"cur/{FIRST}:2,S")
        put(self.path, f"new/{SECOND}")
        self.lock = self.path / "dovecot-uidlist.lock"
        self.folder = Folder("INBOX", self.path)
        self.changes = []
        self.folder.addListener(self)
        self.folder.refresh()
        self.changes.clear()

    def folderChanged(self, folder, change):
        self.changes.append(change)

    def expunged(self) -> list[int]:
        return [uid for change in self.changes for uid in change.expunged]

    def dovecotHolds(self, whileHeld) -> FakeTime:
        """
        Dovecot (a live process of this host) holds dovecot-uidlist.lock;
        at maild's second wait C{whileHeld} runs, then Dovecot lets go.
        """
        self.lock.write_text(f"1:{socket.gethostname()}")

        def onSleep(sleeps):
            if sleeps == 2:
                whileHeld()
                self.lock.unlink()

        fake = FakeTime(onSleep)
        self.folder.uidList.lockSettings = DotLockSettings(sleep=fake.sleep, clock=fake.clock)
        return fake

    def listing(self) -> tuple[list[str], list[str]]:
        return sorted(os.listdir(self.path / "new")), sorted(os.listdir(self.path / "cur"))

    def test_flagChangeWaitsForDovecotsLock(self):
        """
        A flag change renames the file only once Dovecot has let go of
        dovecot-uidlist.lock: Dovecot's listing under the lock must see
        every file under one name (a rename during its readdir can hide a
        file from it, and Dovecot then expunges the UID and numbers the
        file again: "Duplicate file entry", two UIDs for one message).
        """
        seen = []
        fake = self.dovecotHolds(lambda: seen.append(self.listing()))
        self.assertEqual(self.folder.setFlags([0], maildir.FLAGGED, mode=1), [0])
        self.assertEqual(fake.sleeps, 2)
        self.assertEqual(seen, [([SECOND], [f"{FIRST}:2,S"])])
        self.assertEqual(self.listing(), ([SECOND], [f"{FIRST}:2,FS"]))
        self.assertFalse(self.lock.exists())

    def test_claimingRecentWaitsForDovecotsLock(self):
        """
        Moving a message from new/ to cur/ (SELECT) is a rename too: it
        waits for Dovecot's lock as well.
        """
        seen = []
        fake = self.dovecotHolds(lambda: seen.append(self.listing()))
        self.assertEqual(self.folder.claimRecent(), [2])
        self.assertEqual(fake.sleeps, 2)
        self.assertEqual(seen, [([SECOND], [f"{FIRST}:2,S"])])
        self.assertEqual(self.listing(), ([], [f"{FIRST}:2,S", f"{SECOND}:2,"]))

    def missOnce(self, name: str) -> list[bool]:
        """
        Make the next listing of cur/ lack C{name}, as a readdir does when
        another process renames the file meanwhile and the directory's time
        does not show it (the same clock tick, or NFS); tell, for each
        listing of cur/, whether dovecot-uidlist.lock was held.
        """
        lockHeld = []
        listDir = self.folder._listDir

        def listing(sub):
            names = listDir(sub)
            if sub == "cur":
                lockHeld.append(self.lock.exists())
                if len(lockHeld) == 1:
                    names.remove(name)
            return names

        self.folder._listDir = listing
        return lockHeld

    def test_fileMissingFromOneListingIsNotExpunged(self):
        """
        A file that one listing lacks is taken for expunged only when a
        listing made under dovecot-uidlist.lock (where no Dovecot renames)
        lacks it too; otherwise it keeps its UID, and is never numbered
        again (which made Dovecot log "Duplicate file entry").
        """
        for sub in ("new", "cur"):
            os.utime(self.path / sub, (PAST, PAST))
        self.folder._mtimes = self.folder._dirMtimes()
        put(self.path, "cur/1700000003.M1P2Q1.other:2,S")
        UidList(self.path).assign(["1700000003.M1P2Q1.other"])
        lockHeld = self.missOnce(f"{FIRST}:2,S")
        change = self.folder.refresh()
        self.assertEqual((change.added, change.expunged), ([3], []))
        self.assertEqual(lockHeld, [False, True])
        self.folder._mtimes = {"new": -1, "cur": -1}
        self.folder.refresh()
        self.assertEqual(list(self.folder.uids), [1, 2, 3])
        self.assertEqual(self.expunged(), [])
        records = (self.path / "dovecot-uidlist").read_text().splitlines()[1:]
        self.assertEqual([line.split(" :")[1] for line in records], [FIRST, SECOND, "1700000003.M1P2Q1.other"])

    def test_fileGoneUnderTheLockIsExpunged(self):
        """
        A file that the listing under the lock lacks as well is expunged.
        """
        os.unlink(self.path / f"cur/{FIRST}:2,S")
        self.folder._mtimes = {"new": -1, "cur": -1}
        self.assertEqual(self.folder.refresh().expunged, [1])
        self.assertEqual(list(self.folder.uids), [2])

    def test_storeAfterDovecotRenamedTheFile(self):
        """
        A STORE on a message whose flags Dovecot changed (renaming its
        file) since our last look is not lost: the file is found under its
        new name and changed, keeping Dovecot's flags.
        """
        os.rename(self.path / f"cur/{FIRST}:2,S", self.path / f"cur/{FIRST}:2,RS")
        self.assertEqual(self.folder.setFlags([0], maildir.FLAGGED, mode=1), [0])
        self.assertEqual(self.listing()[1], [f"{FIRST}:2,FRS"])
        self.assertEqual(self.folder.flags[0], maildir.FLAGGED | maildir.ANSWERED | maildir.SEEN)

    def test_storeAfterDovecotExpunged(self):
        """
        A STORE on a message Dovecot expunged since our last look changes
        nothing, and the expunge is learnt (RFC 2180 section 4.2).
        """
        os.unlink(self.path / f"cur/{FIRST}:2,S")
        self.assertEqual(self.folder.setFlags([0, 1], maildir.FLAGGED, mode=1), [0])
        self.assertEqual(list(self.folder.uids), [2])
        self.assertEqual(self.folder.flags[0], maildir.FLAGGED)
        self.assertEqual(self.expunged(), [1])

    def test_numberedInNewWithFlagsWhileNewSeemedUnchanged(self):
        """
        A file another process placed in new/ with flags in its name (an
        APPEND with flags, as maild writes it) and numbered, below one it
        then put in cur/, is learnt with its UID and flags even when new/'s
        time did not move (the same clock tick): both directories are
        listed together, as Dovecot does.
        """
        for sub in ("new", "cur"):
            os.utime(self.path / sub, (PAST, PAST))
        self.folder._mtimes = self.folder._dirMtimes()
        put(self.path, "new/1700000003.M1P2Q1.other:2,S")
        os.utime(self.path / "new", (PAST, PAST))
        put(self.path, "cur/1700000004.M1P2Q2.other:2,")
        UidList(self.path).assign(["1700000003.M1P2Q1.other", "1700000004.M1P2Q2.other"])
        self.assertEqual(self.folder.refresh().added, [3, 4])
        self.assertEqual(self.folder.flags[2], maildir.IN_NEW | maildir.SEEN)

    def test_numberedElsewhereWhileTimesSeemedUnchanged(self):
        """
        A file another process put in cur/ within the clock tick of one of
        our own changes (so that the directory's time we keep already
        covers it) is found once that process numbers it: the UID list
        says it has UIDs we do not know.
        """
        for sub in ("new", "cur"):
            os.utime(self.path / sub, (PAST, PAST))
        self.folder._mtimes = self.folder._dirMtimes()
        rename = self.folder._rename

        def renameAndAnotherArrives(*args):
            done = rename(*args)
            put(self.path, "cur/1700000003.M1P2Q1.other:2,S")
            return done

        self.folder._rename = renameAndAnotherArrives
        self.folder.setFlags([0], maildir.FLAGGED, mode=1)
        self.folder._rename = rename
        self.assertFalse(self.folder.refresh())
        UidList(self.path).assign(["1700000003.M1P2Q1.other"])
        self.assertEqual(self.folder.refresh().added, [3])
        self.assertFalse(self.folder.refresh())

    def test_flagChangeInVanishedFolder(self):
        """
        A flag change or a claim of recent messages in a folder another
        process deleted says the folder is missing (the protocols answer
        that), not a bare file-not-found from the lock.
        """
        import shutil

        from maild.store.delivery import FolderMissing

        shutil.rmtree(self.path)
        self.assertRaises(FolderMissing, self.folder.setFlags, [0], maildir.FLAGGED, "", 1)
        self.assertRaises(FolderMissing, self.folder.claimRecent)
        self.assertTrue(self.folder.refresh().gone)
