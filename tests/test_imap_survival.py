"""
Sessions that survive each other (issue 9, items 12-16): several real
IMAP sessions over sockets on one user's folders, one renaming, deleting,
appending or copying while another has a folder selected.
"""

from __future__ import annotations

import re

from twisted.internet import defer

from maild.store import DeliveryFailed
from tests.support import IMAPTestCase, sampleMessage, waitForEmptySpool
from tests.test_imap_sessions import waitFor


def appendLine(mailbox: bytes, message: bytes, flags: bytes = b"", date: bytes = b"") -> bytes:
    parts = [b"APPEND", mailbox]
    if flags:
        parts.append(b"(" + flags + b")")
    if date:
        parts.append(b'"' + date + b'"')
    return b" ".join(parts) + b" {%d+}\r\n" % len(message) + message


class AppendWithDateTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_appendWithDateWhileAnotherSessionIdles(self):
        """
        An APPEND with a date into a folder another session is IDLE on:
        the other session takes the new message (\\Recent, out of C{new/})
        the moment it is stored, and the APPEND still succeeds with the
        message's INTERNALDATE as given (it is set inside the store,
        before the file is visible), never C{NO [SERVERBUG]}.
        """
        messages = [sampleMessage(f"dated {i}") for i in range(5)]

        def run():
            a = self.connect()
            b = self.connect()
            try:
                b.command(b"b1 SELECT INBOX")
                b.send(b"b2 IDLE\r\n")
                assert b.readLine().startswith(b"+"), b.buffer
                replies = []
                for i, message in enumerate(messages):
                    a.send(b"a%d " % i + appendLine(b"INBOX", message, date=b"0%d-Mar-2021 08:30:00 +0000" % (i + 1)) + b"\r\n")
                    replies.append(a.readUntilTagged(b"a%d" % i)[1])
                waitFor(b, b"* %d EXISTS" % len(messages))
                b.send(b"DONE\r\n")
                b.readUntilTagged(b"b2")
                fetched = b.command(b"b3 FETCH 1:* (INTERNALDATE FLAGS)")
                return replies, fetched
            finally:
                a.close()
                b.close()

        replies, fetched = yield self.inThread(run)
        for reply in replies:
            self.assertRegex(reply, rb"^a\d OK \[APPENDUID \d+ \d+\]")
        dates = [re.search(rb'INTERNALDATE "([^"]+)"', line).group(1) for line in fetched[0]]
        self.assertEqual(dates, [b"0%d-Mar-2021 08:30:00 +0000" % (i + 1) for i in range(5)])
        self.assertTrue(all(b"\\Recent" in line for line in fetched[0]), fetched)


class SelectedFolderGoneTests(IMAPTestCase):
    """
    Item 12: the selected folder is renamed or deleted, by another session
    or by this one.  The session's view of it is void: its next command
    gets Dovecot's C{* BYE} and the connection closes, never an internal
    error.
    """

    BYE = b"* BYE Mailbox was deleted, please relogin"

    @defer.inlineCallbacks
    def fillWork(self):
        def run(client):
            client.command(b"C CREATE Work")
            for i in range(2):
                message = sampleMessage(f"work {i}")
                client.send(b"A%d " % i + appendLine(b"Work", message) + b"\r\n")
                client.readUntilTagged(b"A%d" % i)

        yield self.session(run)

    @defer.inlineCallbacks
    def checkGone(self, change: bytes, nextCommand: bytes, byOther: bool = True, bye: bytes = BYE):
        yield self.fillWork()

        def run():
            a = self.connect()
            b = self.connect() if byOther else a
            try:
                a.command(b"a1 SELECT Work")
                changed = b.command(b"x1 " + change)
                a.send(b"a2 " + nextCommand + b"\r\n")
                closed = a.closed()
                return changed, a.buffer, closed
            finally:
                a.close()
                b.close()

        changed, said, closed = yield self.inThread(run)
        self.assertTrue(changed[1].startswith(b"x1 OK"), changed)
        self.assertEqual(said, bye + b"\r\n")
        self.assertTrue(closed)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_renamedByAnotherSession(self):
        return self.checkGone(b"RENAME Work Play", b"NOOP")

    def test_deletedByAnotherSession(self):
        return self.checkGone(b"DELETE Work", b"FETCH 1:* (FLAGS)")

    def test_renamedByThisSession(self):
        return self.checkGone(b"RENAME Work Play", b"NOOP", byOther=False)

    def test_deletedAndCreatedAgain(self):
        """
        The selected folder is deleted and another made under its name:
        the session's UIDs name nothing in the new folder (it has another
        UIDVALIDITY), so it ends too.
        """
        return self.checkGone(
            b"DELETE Work\r\nx2 CREATE Work", b"FETCH 1 (UID)", bye=b"* BYE Mailbox UIDVALIDITY changed, select it again"
        )

    @defer.inlineCallbacks
    def test_deletedWhileIdle(self):
        """
        A session in IDLE on a folder another session deletes is told at
        once and closed, and its connection slot is given back.
        """
        yield self.fillWork()

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.command(b"a1 SELECT Work")
                a.send(b"a2 IDLE\r\n")
                a.readLine()
                b.command(b"b1 DELETE Work")
                return waitFor(a, b"relogin"), a.closed()
            finally:
                a.close()
                b.close()

        said, closed = yield self.inThread(run)
        self.assertEqual(said, self.BYE + b"\r\n")
        self.assertTrue(closed)
        self.assertEqual(self.flushLoggedErrors(), [])


def uidValidity(client, name: bytes) -> int:
    untagged, tagged = client.command(b"V STATUS " + name + b" (UIDVALIDITY)")
    assert tagged.startswith(b"V OK"), tagged
    return int(re.search(rb"UIDVALIDITY (\d+)", untagged[0]).group(1))


def append(client, name: bytes, message: bytes) -> tuple[int, int]:
    """
    APPEND and return the APPENDUID's UIDVALIDITY and UID.
    """
    client.send(b"P " + appendLine(name, message) + b"\r\n")
    _, tagged = client.readUntilTagged(b"P")
    found = re.match(rb"P OK \[APPENDUID (\d+) (\d+)\]", tagged)
    assert found, tagged
    return int(found.group(1)), int(found.group(2))


class UidValidityTests(IMAPTestCase):
    """
    Item 13: a (UIDVALIDITY, UID) pair never names two messages: a folder
    that appears under a name gets a UIDVALIDITY greater than any that name
    had, and every response names the current one.
    """

    @defer.inlineCallbacks
    def test_foldersCreatedInOneSecond(self):
        """
        Folders created one after another (in the same second) each get
        their own UIDVALIDITY.
        """

        def run(client):
            for i in range(5):
                client.command(b"C CREATE Same%d" % i)
            return [uidValidity(client, b"Same%d" % i) for i in range(5)]

        values = yield self.session(run)
        self.assertEqual(len(set(values)), 5, values)

    @defer.inlineCallbacks
    def test_createdAgainAfterRestart(self):
        """
        A folder deleted and created again, even by a daemon restarted in
        between (nothing in memory remembers the old one), gets a greater
        UIDVALIDITY, and its first APPENDUID names it.
        """

        def before(client):
            client.command(b"C CREATE x")
            return append(client, b"x", sampleMessage("first")), uidValidity(client, b"x")

        (appended, first) = yield self.session(before)
        self.assertEqual(appended, (first, 1))
        yield self.stopServer()
        yield self.startServer()

        def after(client):
            client.command(b"D DELETE x")
            client.command(b"C CREATE x")
            return append(client, b"x", sampleMessage("second")), uidValidity(client, b"x")

        (appended, second) = yield self.session(after)
        self.assertGreater(second, first)
        self.assertEqual(appended, (second, 1))

    @defer.inlineCallbacks
    def test_renameOntoDeletedName(self):
        """
        After DELETE b and RENAME a b, b's UIDVALIDITY is greater than the
        deleted b's, though a was made first.
        """

        def run(client):
            client.command(b"C1 CREATE a")
            client.command(b"C2 CREATE b")
            append(client, b"a", sampleMessage("in a"))
            append(client, b"b", sampleMessage("in b"))
            oldB = uidValidity(client, b"b")
            client.command(b"D DELETE b")
            client.command(b"R RENAME a b")
            return oldB, uidValidity(client, b"b"), append(client, b"b", sampleMessage("new in b"))

        oldB, newB, appended = yield self.session(run)
        self.assertGreater(newB, oldB)
        self.assertEqual(appended, (newB, 2))

    @defer.inlineCallbacks
    def test_appendUidNamesTheCurrentFolder(self):
        """
        Session A appends to x; session B deletes x and creates it again;
        A's next APPEND (and then B's) are numbered in the new x and the
        APPENDUIDs name its UIDVALIDITY: no pair is handed out twice.
        """

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.command(b"C CREATE x")
                old = append(a, b"x", sampleMessage("old"))
                b.command(b"D DELETE x")
                b.command(b"C CREATE x")
                fromA = append(a, b"x", sampleMessage("from a"))
                fromB = append(b, b"x", sampleMessage("from b"))
                return old, fromA, fromB, uidValidity(b, b"x")
            finally:
                a.close()
                b.close()

        old, fromA, fromB, current = yield self.inThread(run)
        self.assertGreater(current, old[0])
        self.assertEqual([fromA, fromB], [(current, 1), (current, 2)])


class RenameInboxTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_keywordsMoveWithTheirMessages(self):
        """
        Item 15: RENAME INBOX moves INBOX's messages into the new folder
        with their keywords (RFC 3501 section 6.3.5; INBOX stays, empty),
        and a keyword stored later on one of them shows, in another
        session, on that message only.
        """

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.send(b"P1 " + appendLine(b"INBOX", sampleMessage("one"), b"\\Seen $Work") + b"\r\n")
                a.readUntilTagged(b"P1")
                a.send(b"P2 " + appendLine(b"INBOX", sampleMessage("two"), b"$Later") + b"\r\n")
                a.readUntilTagged(b"P2")
                renamed = a.command(b"R RENAME INBOX Old")
                inbox = a.command(b"S STATUS INBOX (MESSAGES)")
                b.command(b"b1 SELECT Old")
                first = b.command(b"b2 FETCH 1:* (FLAGS)")
                a.command(b"a1 SELECT Old")
                a.command(b"a2 STORE 2 +FLAGS.SILENT ($New)")
                later = b.command(b"b3 NOOP")
                last = b.command(b"b4 FETCH 1:* (FLAGS)")
                return renamed, inbox, first, later, last
            finally:
                a.close()
                b.close()

        renamed, inbox, first, later, last = yield self.inThread(run)
        self.assertTrue(renamed[1].startswith(b"R OK"), renamed)
        self.assertEqual(inbox[0], [b'* STATUS "INBOX" (MESSAGES 0)'])
        self.assertEqual(
            first[0], [b"* 1 FETCH (FLAGS (\\Seen $Work \\Recent))", b"* 2 FETCH (FLAGS ($Later \\Recent))"]
        )
        flags = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Work $Later $New"
        # Item 16: FLAGS and PERMANENTFLAGS come before the first FETCH
        # that shows $New to this session.
        self.assertEqual(
            later[0],
            [
                b"* FLAGS (" + flags + b")",
                b"* OK [PERMANENTFLAGS (" + flags + b" \\*)] Flags permitted",
                b"* 2 FETCH (UID 2 FLAGS ($Later $New \\Recent))",
            ],
        )
        self.assertEqual(
            last[0], [b"* 1 FETCH (FLAGS (\\Seen $Work \\Recent))", b"* 2 FETCH (FLAGS ($Later $New \\Recent))"]
        )


class RecentByCopyTests(IMAPTestCase):
    """
    Item 16: messages that arrive by COPY or MOVE are \\Recent in their new
    folder (RFC 3501 section 6.4.7), told with C{* n RECENT} to the one
    session that has it selected, and to that session only; a session is
    told of keywords new to it (FLAGS, PERMANENTFLAGS) before a FETCH
    shows one.
    """

    @defer.inlineCallbacks
    def checkArrival(self, verb: bytes):
        yield self.deliver(sampleMessage("one"), sampleMessage("two"), sampleMessage("three"))

        def run():
            a = self.connect()
            b = self.connect()
            c = self.connect()
            try:
                a.command(b"a1 SELECT INBOX")
                a.command(b"a2 STORE 1 +FLAGS.SILENT (\\Seen $Work)")
                b.command(b"b1 SELECT Archive")
                moved = a.command(b"a3 " + verb + b" 1:2 Archive")
                told = b.command(b"b2 NOOP")
                fetched = b.command(b"b3 FETCH 1:* (FLAGS)")
                other = c.command(b"c1 SELECT Archive")[0]
                status = a.command(b'a4 STATUS Archive (RECENT)')[0]
                return moved, told, fetched, other, status
            finally:
                for client in (a, b, c):
                    client.close()

        moved, told, fetched, other, status = yield self.inThread(run)
        self.assertTrue(moved[1].startswith(b"a3 OK"), moved)
        self.assertEqual(told[0], [b"* 2 EXISTS", b"* 2 RECENT"])
        flags = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Work"
        self.assertEqual(
            fetched[0],
            [
                b"* FLAGS (" + flags + b")",
                b"* OK [PERMANENTFLAGS (" + flags + b" \\*)] Flags permitted",
                b"* 1 FETCH (FLAGS (\\Seen $Work \\Recent))",
                b"* 2 FETCH (FLAGS (\\Recent))",
            ],
        )
        self.assertIn(b"* 2 EXISTS", other)
        self.assertIn(b"* 0 RECENT", other)
        self.assertEqual(status, [b'* STATUS "Archive" (RECENT 0)'])

    def test_copy(self):
        return self.checkArrival(b"COPY")

    def test_move(self):
        return self.checkArrival(b"MOVE")

    @defer.inlineCallbacks
    def test_newKeywordToldBeforeFetch(self):
        """
        Another session stores a keyword the folder never had: this
        session's next FETCH that can show it is preceded by FLAGS and
        PERMANENTFLAGS naming it; they are not repeated after.
        """
        yield self.deliver(sampleMessage("one"))

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.command(b"a1 SELECT INBOX")
                b.command(b"b1 EXAMINE INBOX")
                a.command(b"a2 STORE 1 +FLAGS.SILENT ($Urgent)")
                first = b.command(b"b2 FETCH 1 (FLAGS)")
                again = b.command(b"b3 FETCH 1 (FLAGS)")
                return first, again
            finally:
                a.close()
                b.close()

        first, again = yield self.inThread(run)
        flags = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Urgent"
        self.assertEqual(
            first[0],
            [
                b"* FLAGS (" + flags + b")",
                b"* OK [PERMANENTFLAGS ()] Flags permitted",
                b"* 1 FETCH (FLAGS ($Urgent))",
                b"* 1 FETCH (UID 1 FLAGS ($Urgent))",
            ],
        )
        self.assertEqual(again[0], [b"* 1 FETCH (FLAGS ($Urgent))"])


class FolderDeletedDuringAppendTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_appendToFolderDeletedMeanwhile(self):
        """
        Session A announces an APPEND to Work and waits for the
        continuation; session B deletes Work; A sends the message: it gets
        C{NO [TRYCREATE]}, Work is not brought back, and nothing of the
        message stays in the spool.
        """
        message = sampleMessage("late")

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.command(b"C CREATE Work")
                a.send(b"P APPEND Work {%d}\r\n" % len(message))
                continuation = a.readLine()
                b.command(b"D DELETE Work")
                a.send(message + b"\r\n")
                appended = a.readUntilTagged(b"P")[1]
                listed = a.command(b'L LIST "" "*"')[0]
                return continuation, appended, listed
            finally:
                a.close()
                b.close()

        continuation, appended, listed = yield self.inThread(run)
        self.assertTrue(continuation.startswith(b"+"), continuation)
        self.assertEqual(appended, b"P NO [TRYCREATE] Mailbox does not exist")
        self.assertFalse([line for line in listed if line.endswith(b" Work")], listed)
        self.assertFalse(self.maildir("alice@localhost", ".Work").exists())
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

    @defer.inlineCallbacks
    def test_appendStoreSideFolderDeletedMeanwhile(self):
        """
        The store's half of the race above: a folder deleted after the
        APPEND looked it up and before the message is placed is not made
        again; the APPEND fails with C{noFolder} (C{NO [TRYCREATE]}) and
        the spool file is removed.
        """
        mailbox = self.service.store.mailbox("alice@localhost")
        mailbox.create("Work")
        folder = mailbox.folder("Work")
        mailbox.delete("Work")
        message = self.service.store.incoming()
        message.write(sampleMessage("late"))
        failure = yield self.assertFailure(folder.append(message, 0, ["$x"]), DeliveryFailed)
        self.assertTrue(failure.noFolder)
        self.assertFalse(self.maildir("alice@localhost", ".Work").exists())
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

    @defer.inlineCallbacks
    def test_copyToFolderDeletedMeanwhile(self):
        """
        A COPY into a folder another session deleted (after this one
        looked it up) answers C{NO [TRYCREATE]} and does not bring it back.
        """
        yield self.deliver(sampleMessage("one"))
        self.service.store.mailbox("alice@localhost").create("Work")
        destination = self.service.store.mailbox("alice@localhost").folder("Work")
        self.service.store.mailbox("alice@localhost").delete("Work")
        source = self.service.store.mailbox("alice@localhost").folder("INBOX")
        source.refresh()
        failure = yield self.assertFailure(source.copyTo([0], destination), DeliveryFailed)
        self.assertTrue(failure.noFolder)
        # With a keyword, which would need a letter in the deleted folder.
        source.setFlags([0], 0, source.keywords.letters(["$Work"]), mode=1)
        failure = yield self.assertFailure(source.copyTo([0], destination), DeliveryFailed)
        self.assertTrue(failure.noFolder)
        self.assertFalse(self.maildir("alice@localhost", ".Work").exists())


class RenamedWhileIdleTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_renamedWhileIdle(self):
        """
        A session in IDLE on a folder another session renames (no file in
        it changes, so no file event comes) is told at once with BYE; the
        session that renamed gets its tagged OK.
        """

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.command(b"C CREATE Work")
                a.command(b"a1 SELECT Work")
                a.send(b"a2 IDLE\r\n")
                a.readLine()
                renamed = b.command(b"b1 RENAME Work Play")
                return renamed, waitFor(a, b"relogin"), a.closed()
            finally:
                a.close()
                b.close()

        renamed, said, closed = yield self.inThread(run)
        self.assertEqual(renamed, ([], b"b1 OK RENAME completed"))
        self.assertEqual(said, SelectedFolderGoneTests.BYE + b"\r\n")
        self.assertTrue(closed)


class FailedAppendTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_dateTheStoreCannotKeepStoresNothing(self):
        """
        An APPEND whose date parses but cannot be a file's time (an hour of
        24 digits) is refused with BAD before anything is stored: no
        message in the folder, none in the spool (it used to be stored and
        then answered with SERVERBUG from an OverflowError).
        """
        message = sampleMessage("never")

        def run(client):
            client.send(b"P " + appendLine(b"INBOX", message, date=b"01-Jan-2020 999999999999999999999999:00:00 +0000") + b"\r\n")
            refused = client.readUntilTagged(b"P")[1]
            status = client.command(b"S STATUS INBOX (MESSAGES)")[0]
            return refused, status

        refused, status = yield self.session(run)
        self.assertTrue(refused.startswith(b"P BAD"), refused)
        self.assertEqual(status, [b'* STATUS "INBOX" (MESSAGES 0)'])
        self.assertEqual(self.messages("alice@localhost"), [])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])


class DeletedWhilePlacingTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_folderDeletedBetweenPlacingAndNumbering(self):
        """
        Another session deletes the folder after the APPEND's message is
        placed in it and before it is numbered (here: the moment the
        committer has placed it): the APPEND answers C{NO [TRYCREATE]},
        not SERVERBUG, and nothing is logged as an error.
        """
        import shutil

        work = self.maildir("alice@localhost", ".Work")

        def deleteWork(paths):
            if any(work in p.parents for p in paths):
                shutil.rmtree(work)

        yield self.stopServer()
        yield self.startServer(syncHook=deleteWork)
        message = sampleMessage("placed")

        def run(client):
            client.command(b"C CREATE Work")
            client.command(b"S SELECT Work")
            client.send(b"P " + appendLine(b"Work", message, b"$Kept") + b"\r\n")
            return client.readUntilTagged(b"P")

        untagged, tagged = yield self.session(run)
        self.assertEqual(tagged, b"P NO [TRYCREATE] Mailbox does not exist")
        self.assertEqual(self.flushLoggedErrors(), [])
