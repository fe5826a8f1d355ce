"""
The store pieces IMAP added or sped up: copying messages between folders,
reading a whole message, and opening a folder from its UID list.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from maild.store import Committer, MailStore
from maild.store import maildir
from maild.store.uidlist import UidList


class StoreTestCase(unittest.TestCase):
    def setUp(self):
        self.data = Path(self.mktemp()).resolve()
        self.committer = Committer(reactor, self.data)
        self.addCleanup(self.committer.stop)
        self.store = MailStore(self.data, self.committer)
        self.mailbox = self.store.mailbox("alice@localhost")
        self.mailbox.ensureExists()

    def place(self, folder: str, data: bytes, info: str = "") -> Path:
        """
        Write a message file straight into C{folder}'s cur/.
        """
        stored = data.replace(b"\r\n", b"\n")
        base = maildir.newBaseName(len(stored), len(data))
        path = self.mailbox.folderPath(folder) / "cur" / (base + ":2," + info)
        path.write_bytes(stored)
        return path


class CopyTests(StoreTestCase):
    @defer.inlineCallbacks
    def test_copyKeepsFlagsAndKeywords(self):
        """
        copy() hard-links the messages into the target's new/ (they are
        \\Recent there) with their flags, gives keywords the target's own letters, numbers them in
        order, tells the target's listeners, and skips a message whose
        file vanished.
        """
        self.place("INBOX", b"Subject: a\r\n\r\none\r\n", "S")
        self.place("INBOX", b"Subject: b\r\n\r\ntwo\r\n", "F")
        self.place("INBOX", b"Subject: c\r\n\r\nthree\r\n", "")
        source = self.mailbox.folder("INBOX")
        source.refresh()
        source.setFlags([1], 0, source.keywords.letters(["Work"]), mode=1)
        target = self.mailbox.folder("Archive")
        target.keywords.letters(["Other"])
        target.refresh()
        changes = []
        target.addListener(type("L", (), {"folderChanged": lambda self, f, c: changes.append(c)})())
        os.unlink(source.filePath(2))
        pairs = yield self.store.copy(source, [0, 1, 2], target, origin="me")
        self.assertEqual(pairs, [(1, 1), (2, 2)])
        self.assertEqual([c.added for c in changes], [[1, 2]])
        self.assertEqual(changes[0].origin, "me")
        names = sorted(p.name.rpartition(":2,")[2] for p in (target.path / "new").iterdir())
        self.assertEqual(names, ["Fb", "S"])
        self.assertEqual(target.keywordNames(1), ["Work"])
        self.assertEqual(os.stat(target.filePath(0)).st_ino, os.stat(source.filePath(0)).st_ino)

    @defer.inlineCallbacks
    def test_copyAfterAnotherProcessMovedTheSource(self):
        """
        Another process (a second worker) expunged the first message and
        renamed the second's file since this one looked: reading the
        second's size (its name, as Dovecot may write it, does not carry
        it) lists the folder again, and every index after the expunged
        message moves.  Each copy is still of the message asked for, with
        its own flags.
        """
        names = []
        for n, info in enumerate(("", "S", "F"), 1):
            path = self.mailbox.folderPath("INBOX") / "cur" / (f"170000000{n}.M{n}P9Q{n}.other:2," + info)
            path.write_bytes(b"Subject: %d\n\nbody %d\n" % (n, n))
            names.append(path)
        source = self.mailbox.folder("INBOX")
        source.refresh()
        target = self.mailbox.folder("Archive")
        target.refresh()
        os.unlink(names[0])
        os.rename(names[1], names[1].with_name(names[1].name.replace(":2,S", ":2,RS")))
        pairs = yield self.store.copy(source, [1, 2], target)
        self.assertEqual(pairs, [(2, 1), (3, 2)])
        copies = sorted((target.path / "new").iterdir())
        self.assertEqual([p.read_bytes() for p in copies], [b"Subject: 2\n\nbody 2\n", b"Subject: 3\n\nbody 3\n"])
        self.assertEqual([p.name.rpartition(":2,")[2] for p in copies], ["RS", "F"])


class ReadTests(StoreTestCase):
    def test_read(self):
        """
        read() returns the whole file, whether its name gives its size or
        not, and however big it is.
        """
        small = self.place("INBOX", b"Subject: s\r\n\r\nbody\r\n")
        big = b"Subject: b\r\n\r\n" + b"x" * 300_000 + b"\r\n"
        self.place("INBOX", big)
        bare = self.mailbox.folderPath("INBOX") / "cur" / "1.M1P1Q1.host:2,"
        bare.write_bytes(b"y" * 200_000)
        folder = self.mailbox.folder("INBOX")
        folder.refresh()
        contents = sorted(folder.read(i) for i in range(len(folder)))
        self.assertEqual(
            sorted([small.read_bytes(), big.replace(b"\r\n", b"\n"), b"y" * 200_000]), contents
        )


class LoadTests(StoreTestCase):
    def test_openFromUidList(self):
        """
        Opening a folder keeps the UIDs the list gives (in their order,
        whatever the file names say), and numbers files the list lacks
        after them in delivery order; a list with extension fields is read
        too.
        """
        root = self.mailbox.folderPath("INBOX")
        late = self.place("INBOX", b"a\r\n", "S").name.partition(":2,")[0]
        early = self.place("INBOX", b"b\r\n", "").name.partition(":2,")[0]
        (root / "cur" / "100.M1P1Q1.host:2,T").write_bytes(b"c\n")
        (root / "cur" / "50.M1P1Q1.host:2,").write_bytes(b"d\n")
        (root / "dovecot-uidlist").write_text(
            f"3 V7 N20 Gabc\n5 :{early}\n9 W3 :{late}\n"
        )
        folder = self.mailbox.folder("INBOX")
        folder.refresh()
        self.assertEqual(list(folder.uids), [5, 9, 20, 21])
        self.assertEqual(folder.bases[2:], ["50.M1P1Q1.host", "100.M1P1Q1.host"])
        self.assertEqual(list(folder.flags), [0, maildir.SEEN, 0, maildir.DELETED])
        self.assertEqual(UidList(root).refresh().uids["100.M1P1Q1.host"], 21)
