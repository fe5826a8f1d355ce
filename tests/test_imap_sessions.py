"""
Several sessions on one folder: each keeps its own sequence numbers and
hears of the others' changes only when RFC 3501 allows; IDLE hears them
at once, including mail delivered by SMTP.
"""

from __future__ import annotations

import os
import select
import smtplib

from twisted.internet import defer

from tests.support import IMAPTestCase, sampleMessage


def waitFor(client, needle: bytes, seconds: float = 5.0) -> bytes:
    """
    Read until C{needle} has arrived (or the time is up); return what came.
    """
    client.sock.settimeout(seconds)
    while needle not in client.buffer:
        readable, _, _ = select.select([client.sock], [], [], seconds)
        if not readable:
            break
        chunk = client.sock.recv(65536)
        if not chunk:
            break
        client.buffer += chunk
    return client.buffer


class TwoSessionTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_expungeSeenAtTheRightMoments(self):
        """
        A expunges a message; B, fetching by sequence number, is not told
        (its numbers stay valid, the gone message is reported with NO
        [EXPUNGEISSUED]), nor during SEARCH or STORE; B's next NOOP brings
        the EXPUNGE, and B's sequence numbers then follow.
        """
        yield self.deliver(*(sampleMessage(f"m{i}") for i in range(3)))

        def run():
            a = self.connect()
            b = self.connect()
            try:
                a.command(b"a1 SELECT INBOX")
                b.command(b"b1 SELECT INBOX")
                a.command(b"a2 STORE 2 +FLAGS.SILENT (\\Deleted)")
                a.command(b"a3 EXPUNGE")
                return {
                    "fetch": b.command(b"b2 FETCH 1:3 (UID)"),
                    "search": b.command(b"b3 SEARCH ALL"),
                    "store": b.command(b"b4 STORE 3 +FLAGS (\\Flagged)"),
                    "noop": b.command(b"b5 NOOP"),
                    "after": b.command(b"b6 FETCH 1:* (UID)"),
                    "a": a.command(b"a4 NOOP"),
                }
            finally:
                a.close()
                b.close()

        r = yield self.inThread(run)
        self.assertEqual(
            r["fetch"],
            ([b"* 1 FETCH (UID 1)", b"* 3 FETCH (UID 3)"], b"b2 NO [EXPUNGEISSUED] Some of the requested messages no longer exist: they have been deleted"),
        )
        self.assertEqual(r["search"], ([b"* SEARCH 1 3"], b"b3 OK SEARCH completed"))
        self.assertEqual(r["store"][0], [b"* 3 FETCH (FLAGS (\\Flagged))"])
        self.assertEqual(r["noop"], ([b"* 2 EXPUNGE"], b"b5 OK NOOP completed"))
        self.assertEqual(r["after"][0], [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)"])
        self.assertEqual(r["a"][0], [b"* 2 FETCH (UID 3 FLAGS (\\Flagged \\Recent))"])

    @defer.inlineCallbacks
    def test_uidCommandsMayTellExpunges(self):
        """
        During UID FETCH the pending EXPUNGE is sent (RFC 3501 7.4.1 allows
        it), after the FETCH data.
        """
        yield self.deliver(*(sampleMessage(f"m{i}") for i in range(2)))

        def run():
            a, b = self.connect(), self.connect()
            try:
                a.command(b"a1 SELECT INBOX")
                b.command(b"b1 SELECT INBOX")
                a.command(b"a2 STORE 1 +FLAGS.SILENT (\\Deleted)")
                a.command(b"a3 EXPUNGE")
                return b.command(b"b2 UID FETCH 1:* (UID)")
            finally:
                a.close()
                b.close()

        untagged, tagged = yield self.inThread(run)
        self.assertEqual(untagged, [b"* 2 FETCH (UID 2)", b"* 1 EXPUNGE"])
        self.assertEqual(tagged, b"b2 OK FETCH completed")

    @defer.inlineCallbacks
    def test_recentInOneSessionOnly(self):
        """
        A new message is \\Recent in the first session told of it only
        (RFC 3501 2.3.2); the file moves from new/ to cur/.
        """

        def run():
            a, b = self.connect(), self.connect()
            try:
                a.command(b"a1 SELECT INBOX")
                b.command(b"b1 SELECT INBOX")
                client = smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10)
                client.sendmail("carol@remote.test", ["alice@localhost"], sampleMessage("new"))
                client.quit()
                return a.command(b"a2 NOOP"), b.command(b"b2 NOOP"), b.command(b"b3 FETCH 1 FLAGS")
            finally:
                a.close()
                b.close()

        first, second, flags = yield self.inThread(run)
        self.assertEqual(first[0], [b"* 1 EXISTS", b"* 1 RECENT"])
        self.assertEqual(second[0], [b"* 1 EXISTS", b"* 0 RECENT"])
        self.assertEqual(flags[0], [b"* 1 FETCH (FLAGS ())"])
        self.assertEqual([p.parent.name for p in self.messages("alice@localhost")], ["cur"])


class IdleTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_deliveryPushedInIdle(self):
        """
        A message delivered by SMTP reaches a session in IDLE at once as
        EXISTS and RECENT; flag changes and expunges by another session
        arrive too; DONE ends the IDLE with a tagged OK.
        """

        def run():
            idler = self.connect()
            other = self.connect()
            try:
                idler.command(b"i1 SELECT INBOX")
                other.command(b"o1 SELECT INBOX")
                idler.send(b"i2 IDLE\r\n")
                assert idler.readLine() == b"+ idling"
                client = smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=10)
                client.sendmail("carol@remote.test", ["alice@localhost"], sampleMessage("pushed"))
                client.quit()
                pushed = waitFor(idler, b"RECENT\r\n")
                idler.buffer = b""
                other.command(b"o2 NOOP")
                other.command(b"o3 STORE 1 +FLAGS (\\Deleted)")
                flagged = waitFor(idler, b"FETCH")
                idler.buffer = b""
                other.command(b"o4 EXPUNGE")
                # The EXPUNGE, then the RECENT count it lowered.
                expunged = waitFor(idler, b"RECENT\r\n")
                idler.buffer = b""
                idler.send(b"DONE\r\n")
                done = idler.readUntilTagged(b"i2")
                return pushed, flagged, expunged, done
            finally:
                idler.close()
                other.close()

        pushed, flagged, expunged, done = yield self.inThread(run)
        self.assertEqual(pushed, b"* 1 EXISTS\r\n* 1 RECENT\r\n")
        self.assertEqual(flagged, b"* 1 FETCH (UID 1 FLAGS (\\Deleted \\Recent))\r\n")
        self.assertEqual(expunged, b"* 1 EXPUNGE\r\n* 0 RECENT\r\n")
        self.assertEqual(done, ([], b"i2 OK IDLE terminated"))

    @defer.inlineCallbacks
    def test_otherProgramsReachIdle(self):
        """
        A message another program puts into the Maildir (another maild on the
        same data folder, procmail...) reaches a session in IDLE at once,
        and so does its removal: the folder is watched while in IDLE.
        """
        new = self.maildir("alice@localhost") / "new"

        def run(idler):
            idler.send(b"i2 IDLE\r\n")
            assert idler.readLine() == b"+ idling"
            (new.parent / "tmp" / "outside").write_bytes(sampleMessage("outside"))
            os.rename(new.parent / "tmp" / "outside", new / "1700000000.M1P99Q1.elsewhere")
            arrived = waitFor(idler, b"RECENT\r\n")
            idler.buffer = b""
            # The session claimed it as \\Recent: it is in cur/ now.
            [path] = new.parent.glob("*/1700000000.M1P99Q1.elsewhere*")
            os.unlink(path)
            removed = waitFor(idler, b"RECENT\r\n")
            idler.send(b"DONE\r\n")
            idler.readUntilTagged(b"i2")
            return arrived, removed

        arrived, removed = yield self.session(run, select=b"INBOX")
        self.assertEqual(arrived, b"* 1 EXISTS\r\n* 1 RECENT\r\n")
        self.assertEqual(removed, b"* 1 EXPUNGE\r\n* 0 RECENT\r\n")

    @defer.inlineCallbacks
    def test_pollingWithoutInotify(self):
        """
        Where inotify cannot be used, a folder in IDLE is looked at every
        few seconds (here made short) instead.
        """
        watcher = self.service.store.watcher
        watcher.stop()
        watcher.pollInterval = 0.1
        new = self.maildir("alice@localhost") / "new"

        def run(idler):
            idler.send(b"i2 IDLE\r\n")
            assert idler.readLine() == b"+ idling"
            (new / "1700000000.M1P99Q2.elsewhere").write_bytes(sampleMessage("polled"))
            return waitFor(idler, b"RECENT\r\n")

        self.assertEqual((yield self.session(run, select=b"INBOX")), b"* 1 EXISTS\r\n* 1 RECENT\r\n")

    @defer.inlineCallbacks
    def test_idleWithoutDone(self):
        """
        A line other than DONE ends the IDLE with BAD; the session goes on.
        """

        def run(client):
            client.send(b"i IDLE\r\n")
            client.readLine()
            client.send(b"DUNNO\r\n")
            bad = client.readUntilTagged(b"i")
            return bad, client.command(b"n NOOP")

        bad, noop = yield self.session(run, select=b"INBOX")
        self.assertEqual(bad, ([], b"i BAD Expected DONE"))
        self.assertEqual(noop, ([], b"n OK NOOP completed"))


class ResetTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_uidValidityChangeEndsSession(self):
        """
        When the UID list is lost (another tool removed it), UIDVALIDITY
        changes and a session with the folder selected is closed with BYE
        at its next command, rather than going on with UIDs that mean
        something else now.
        """
        yield self.deliver(sampleMessage("one"))

        def run(client):
            (self.maildir("alice@localhost") / "dovecot-uidlist").unlink()
            (self.maildir("alice@localhost") / "new").touch()
            client.send(b"a NOOP\r\n")
            return client.closed(5), client.buffer

        closed, rest = yield self.session(run, select=b"INBOX")
        self.assertTrue(closed)
        self.assertEqual(rest, b"* BYE Mailbox UIDVALIDITY changed, select it again\r\n")


class BigStoreTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_storeInChunks(self):
        """
        A STORE over more messages than one chunk changes every one of
        them (on disk too) and answers each with its FETCH, in order.
        """
        from maild.imap import server

        self.patch(server, "_STORE_CHUNK", 7)
        yield self.deliver(*(sampleMessage(f"m{i}") for i in range(30)))

        def run(client):
            return client.command(b"a STORE 2:29 +FLAGS (\\Flagged)")

        untagged, tagged = yield self.session(run, select=b"INBOX")
        self.assertEqual(tagged, b"a OK STORE completed")
        self.assertEqual(untagged, [b"* %d FETCH (FLAGS (\\Flagged \\Recent))" % n for n in range(2, 30)])
        flagged = [p for p in self.messages("alice@localhost") if p.name.endswith(":2,F")]
        self.assertEqual(len(flagged), 28)
