"""
Expunging with the files removed by a worker thread
(L{maild.store.folder.Folder.expungeInThread}): the index forgets at once,
nothing comes back while the files are being removed, and the UID list
forgets them once they are gone.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from maild.store.folder import Folder
from tests.test_store import put

FIRST = "cur/1700000001.M1P1Q1.h,S=17,W=20:2,S"
SECOND = "new/1700000002.M1P1Q1.h,S=17,W=20"


class ThreadedExpungeTests(unittest.TestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        put(self.path, FIRST)
        put(self.path, SECOND)
        self.folder = Folder("INBOX", self.path)
        self.changes = []
        self.folder.addListener(self)
        self.folder.refresh()

    def folderChanged(self, folder, change):
        self.changes.append(change)

    @defer.inlineCallbacks
    def test_forgetsAtOnceAndRemovesFiles(self):
        """
        The expunge is announced before the files are gone; a rescan
        meanwhile does not number the files being removed again; once the
        Deferred fires they are gone and the UID list no longer has them.
        """
        d = self.folder.expungeInThread([1, 2, 9], origin="me")
        self.assertEqual(list(self.folder.uids), [])
        self.assertEqual((self.changes[-1].expunged, self.changes[-1].origin), ([1, 2], "me"))
        self.folder._mtimes = {"new": -1, "cur": -1}
        self.assertEqual(self.folder.refresh().added, [])
        expunged = yield d
        self.assertEqual(expunged, [1, 2])
        self.assertEqual((os.listdir(self.path / "cur"), os.listdir(self.path / "new")), ([], []))
        self.assertEqual(self.folder.uidList.refresh().uids, {})
        put(self.path, "new/1700000003.M1P1Q1.h")
        self.assertEqual(self.folder.refresh().added, [3])

    @defer.inlineCallbacks
    def test_renamedUnderneath(self):
        """
        A file another process renamed (new flags) before the thread got to
        it is found by its base name and removed.
        """
        os.rename(self.path / FIRST, self.path / "cur/1700000001.M1P1Q1.h,S=17,W=20:2,FS")
        expunged = yield self.folder.expungeInThread([1])
        self.assertEqual(expunged, [1])
        self.assertEqual(os.listdir(self.path / "cur"), [])
        self.assertEqual(Folder("INBOX", self.path).refresh().added, [2])


class UidOrderTests(unittest.TestCase):
    """
    Sessions learn a folder's messages in UID order, so the index never
    takes in a UID above one another process gave to a file it has not
    seen: a session told of the higher UID would never be told of the
    lower one (imaptest's checkpoints with two workers found clients
    lacking a message, "UID 7329 != 7323").
    """

    def test_listingOfNewAloneTakesNoUidAboveAnUnseenOne(self):
        """
        Another process numbers two files and moves the first to cur/
        before a listing of new/ alone: that listing finds only the
        second; the folder is then listed whole under the lock, and both
        come in order.
        """
        path = Path(self.mktemp())
        put(path, "cur/1700000001.M1P1Q1.h:2,")
        ours, theirs = Folder("INBOX", path), Folder("INBOX", path)
        ours.refresh()
        theirs.refresh()
        put(path, "new/1700000002.M2P1Q1.h")
        put(path, "new/1700000003.M3P1Q1.h")
        theirs.refresh()
        self.assertEqual(list(theirs.uids), [1, 2, 3])
        theirs.claimRecent([theirs.position(2)])
        change = ours._scan(ours._dirMtimes(), {"new"})
        self.assertEqual(list(ours.uids), [1, 2, 3])
        self.assertEqual(change.added, [2, 3])
