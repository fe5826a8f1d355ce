"""
IMAP over real sockets: what Thunderbird sends (../shared/clients/
thunderbird.md), every command and its error replies, folders, flags on
disk, UIDs across restarts, imaplib.
"""

from __future__ import annotations

import base64
import imaplib
import os
import re
import time

from twisted.internet import defer

from tests.support import PASSWORD, IMAPTestCase, sampleMessage, waitUntil


def plain(user: str = "alice@localhost", password: str = PASSWORD) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


class ThunderbirdTests(IMAPTestCase):
    """
    The sequences Thunderbird 153 really sends.
    """

    @defer.inlineCallbacks
    def test_discoveryConnection(self):
        """
        The greeting carries CAPABILITY; mixed-case `authenticate PLAIN`
        without an initial response gets an empty continuation and answers
        with CAPABILITY in its tagged OK; `namespace`, `ID`, `list "" "*"`
        and `lsub "" "*"` show INBOX and the subscribed special-use folders
        with their RFC 6154 attributes.
        """

        def run(client):
            greeting = client.readLine()
            client.send(b"1 authenticate PLAIN\r\n")
            continuation = client.readLine()
            client.send(plain() + b"\r\n")
            _, auth = client.readUntilTagged(b"1")
            return (
                greeting,
                continuation,
                auth,
                client.command(b"2 namespace"),
                client.command(b'3 ID ("name" "Thunderbird" "version" "153.7.0")'),
                client.command(b'4 list "" "*"'),
                client.command(b'5 lsub "" "*"'),
                client.command(b'6 list "" "INBOX"'),
            )

        def connectRaw():
            from tests.support import IMAPClient

            client = IMAPClient(self.port("imap"))
            try:
                return run(client)
            finally:
                client.close()

        greeting, continuation, auth, ns, ident, lst, lsub, inbox = yield self.inThread(connectRaw)
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 "), greeting)
        for cap in (b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"LITERAL+", b"AUTH=PLAIN", b"STARTTLS"):
            self.assertIn(b" " + cap, greeting)
        self.assertEqual(continuation, b"+ ")
        self.assertTrue(auth.startswith(b"1 OK [CAPABILITY IMAP4rev1 "), auth)
        self.assertNotIn(b"AUTH=PLAIN", auth)
        self.assertEqual(ns, ([b'* NAMESPACE (("" "/")) NIL NIL'], b"2 OK NAMESPACE completed"))
        self.assertTrue(ident[0][0].startswith(b'* ID ("name" "maild"'))
        self.assertEqual(
            lst[0],
            [
                b'* LIST (\\HasNoChildren) "/" "INBOX"',
                b'* LIST (\\HasNoChildren \\Archive) "/" "Archive"',
                b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"',
                b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"',
                b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
                b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"',
            ],
        )
        self.assertEqual(
            [line.rsplit(b" ", 1)[1] for line in lsub[0]],
            [b'"Archive"', b'"Drafts"', b'"Junk"', b'"Sent"', b'"Trash"'],
        )
        self.assertEqual(inbox[0], [b'* LIST (\\HasNoChildren) "/" "INBOX"'])

    @defer.inlineCallbacks
    def test_syncMoveAndDelete(self):
        """
        select "INBOX", `UID fetch 1:* (FLAGS)`, the header fetch, the body
        fetch, then `uid store +Flags`, `uid move 2 "Archive"` (COPYUID,
        then EXPUNGE) and `UID fetch N:* (FLAGS)` with N above the highest
        UID, which returns the last message.
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"), sampleMessage("three"))

        def run(client):
            out = {}
            out["select"] = client.command(b'10 select "INBOX"')
            out["flags"] = client.command(b"11 UID fetch 1:* (FLAGS)")
            out["headers"] = client.command(
                b"12 UID fetch 1:3 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject "
                b"Date Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To Received)])"
            )
            out["bodies"] = client.command(b"13 UID fetch 1:3 (UID RFC822.SIZE BODY.PEEK[])")
            out["store"] = client.command(b"14 uid store 1 +Flags (\\Seen)")
            out["move"] = client.command(b'15 uid move 2 "Archive"')
            out["above"] = client.command(b"16 UID fetch 9:* (FLAGS)")
            out["archive"] = client.command(b'17 STATUS "Archive" (MESSAGES UIDNEXT UNSEEN RECENT)')
            return out

        out = yield self.session(run, login=True)
        untagged, tagged = out["select"]
        self.assertIn(b"* 3 EXISTS", untagged)
        self.assertIn(b"* 3 RECENT", untagged)
        self.assertIn(b"* OK [UNSEEN 1] First unseen", untagged)
        self.assertTrue(any(line.startswith(b"* OK [UIDVALIDITY ") for line in untagged))
        self.assertIn(b"* OK [UIDNEXT 4] Predicted next UID", untagged)
        self.assertEqual(tagged, b"10 OK [READ-WRITE] SELECT completed")
        self.assertEqual(
            out["flags"],
            (
                [
                    b"* 1 FETCH (UID 1 FLAGS (\\Recent))",
                    b"* 2 FETCH (UID 2 FLAGS (\\Recent))",
                    b"* 3 FETCH (UID 3 FLAGS (\\Recent))",
                ],
                b"11 OK FETCH completed",
            ),
        )
        headers = out["headers"][0]
        self.assertEqual(len(headers), 3)
        size = len(self.messages("alice@localhost")[0].read_bytes().replace(b"\n", b"\r\n"))
        self.assertIn(b"* 1 FETCH (UID 1 RFC822.SIZE %d FLAGS (\\Recent) BODY[HEADER.FIELDS (From To Cc" % size, headers[0])
        self.assertIn(b"Subject: one\r\n", headers[0])
        self.assertNotIn(b"Hi there", headers[0])
        self.assertTrue(out["bodies"][0][0].endswith(b"Hi there.\r\n)"))
        self.assertIn(b"BODY[] {%d}\r\nFrom: Carol" % size, out["bodies"][0][0])
        self.assertEqual(out["store"][0], [b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))"])
        untagged, tagged = out["move"]
        self.assertTrue(re.match(rb"\* OK \[COPYUID \d+ 2 1\]", untagged[0]), untagged)
        self.assertEqual(untagged[1:], [b"* 2 EXPUNGE", b"* 2 RECENT"])
        self.assertEqual(tagged, b"15 OK MOVE completed")
        self.assertEqual(out["above"][0], [b"* 2 FETCH (UID 3 FLAGS (\\Recent))"])
        self.assertEqual(
            out["archive"][0], [b'* STATUS "Archive" (MESSAGES 1 UIDNEXT 2 UNSEEN 1 RECENT 1)']
        )

    @defer.inlineCallbacks
    def test_appendToSent(self):
        """
        FCC: `append "Sent" (\\Seen) {n+}` on a connection with nothing
        selected stores the message with \\Seen (in new/, \\Recent as RFC
        3501 section 6.3.11 says, its flags in its name), and APPENDUID
        gives its UID; the synchronizing form {n} waits for the
        continuation.
        """
        message = sampleMessage("sent")

        def run(client):
            client.send(b'5 append "Sent" (\\Seen) {%d+}\r\n' % len(message) + message + b"\r\n")
            first = client.readUntilTagged(b"5")
            client.send(b'6 append "Sent" {%d}\r\n' % len(message))
            continuation = client.readLine()
            client.send(message + b"\r\n")
            second = client.readUntilTagged(b"6")
            return first, continuation, second

        first, continuation, second = yield self.session(run)
        self.assertTrue(re.match(rb"5 OK \[APPENDUID \d+ 1\] APPEND completed", first[1]), first)
        self.assertEqual(continuation, b"+ Ready for literal data")
        self.assertTrue(re.match(rb"6 OK \[APPENDUID \d+ 2\]", second[1]), second)
        files = sorted((p.parent.name, p.name.partition(":2,")[2]) for p in self.messages("alice@localhost", ".Sent"))
        self.assertEqual(files, [("new", ""), ("new", "S")])
        seen = [p for p in self.messages("alice@localhost", ".Sent") if p.name.endswith(":2,S")]
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen[0].read_bytes(), message.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_idleThenDrop(self):
        """
        IDLE answers `+ idling`; a socket dropped in IDLE (no DONE, no
        LOGOUT) is cleaned up: the session leaves the factory and the
        folder has no listener left.
        """

        def run(client):
            client.send(b"7 IDLE\r\n")
            return client.readLine()

        continuation = yield self.session(run, select=b'"INBOX"')
        self.assertEqual(continuation, b"+ idling")
        factory = self.service.listeners["imap"].factory
        yield waitUntil(lambda: not factory.sessions)
        folder = self.service.store.loadedFolder(self.maildir("alice@localhost"))
        self.assertTrue(folder is None or not folder.listeners)


class CommandTests(IMAPTestCase):
    """
    Each command, its replies and its errors.
    """

    @defer.inlineCallbacks
    def test_stateErrors(self):
        """
        Commands need the right state: before login NO, without a
        selected mailbox BAD; unknown commands and malformed ones get BAD
        and the session goes on.
        """

        def run(client):
            return [
                client.command(b"a SELECT INBOX")[1],
                client.command(b"b FROB")[1],
                client.command(b"c")[1],
                client.readUntilTagged(b"*")[1] if client.send(b"\r\n") else client.readLine(),
                client.command(b"d LOGIN onlyuser")[1],
                client.login(),
                client.command(b"e FETCH 1 FLAGS")[1],
                client.command(b"f LOGIN alice x")[1],
                client.command(b"g CAPABILITY extra")[1],
                client.command(b"h NOOP")[1],
            ]

        replies = yield self.session(run, login=False)
        self.assertEqual(replies[0], b"a NO Log in first")
        self.assertTrue(replies[1].startswith(b"b BAD"))
        self.assertTrue(replies[2].startswith(b"c BAD"))
        self.assertEqual(replies[3], b"* BAD Invalid tag")
        self.assertTrue(replies[4].startswith(b"d BAD Missing"))
        self.assertEqual(replies[6], b"e BAD No mailbox selected")
        self.assertTrue(replies[7].startswith(b"f BAD"))
        self.assertTrue(replies[8].startswith(b"g BAD"))
        self.assertEqual(replies[9], b"h OK NOOP completed")

    @defer.inlineCallbacks
    def test_loginFailures(self):
        """
        A wrong password gets NO [AUTHENTICATIONFAILED] (after the
        throttling delay); after auth_failures_per_connection failures the
        session is closed with BYE.
        """
        yield self.stopServer()
        yield self.startServer(limits={"auth_failure_delay": 0.01, "auth_failure_delay_max": 0.01, "auth_failures_per_connection": 2})

        def run(client):
            first = client.command(b'a LOGIN alice@localhost "wrong"')[1]
            client.send(b"b AUTHENTICATE PLAIN " + plain(password="wrong") + b"\r\n")
            second = client.readUntilTagged(b"b")[1]
            return first, second, client.closed(), client.buffer

        first, second, closed, rest = yield self.session(run, login=False)
        self.assertEqual(first, b"a NO [AUTHENTICATIONFAILED] Authentication failed")
        self.assertEqual(second, b"b NO [AUTHENTICATIONFAILED] Authentication failed")
        self.assertTrue(closed)
        self.assertIn(b"* BYE Too many failed logins", rest)

    @defer.inlineCallbacks
    def test_authenticateVariants(self):
        """
        AUTHENTICATE PLAIN with an initial response (SASL-IR), a cancelled
        exchange (`*`), a malformed response, and an unknown mechanism.
        """

        def run(client):
            client.send(b"a AUTHENTICATE PLAIN\r\n")
            client.readLine()
            client.send(b"*\r\n")
            cancelled = client.readUntilTagged(b"a")[1]
            client.send(b"b AUTHENTICATE PLAIN\r\n")
            client.readLine()
            client.send(b"!!!\r\n")
            malformed = client.readUntilTagged(b"b")[1]
            unknown = client.command(b"c AUTHENTICATE CRAM-MD5")[1]
            ok = client.command(b"d AUTHENTICATE PLAIN " + plain())[1]
            again = client.command(b"e LOGIN alice@localhost x")[1]
            return cancelled, malformed, unknown, ok, again

        cancelled, malformed, unknown, ok, again = yield self.session(run, login=False)
        self.assertEqual(cancelled, b"a BAD Authentication cancelled")
        self.assertEqual(malformed, b"b BAD Malformed PLAIN response")
        self.assertTrue(unknown.startswith(b"c NO"))
        self.assertTrue(ok.startswith(b"d OK [CAPABILITY"))
        self.assertTrue(again.startswith(b"e BAD"))

    @defer.inlineCallbacks
    def test_authenticateLogin(self):
        """
        AUTHENTICATE LOGIN, as Thunderbird falls back to it: two base64
        prompts; with an initial response (RFC 4959) only the password.
        """

        def run(client):
            client.send(b"a AUTHENTICATE LOGIN\r\n")
            prompts = [client.readLine()]
            client.send(base64.b64encode(b"alice@localhost") + b"\r\n")
            prompts.append(client.readLine())
            client.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
            first = client.readUntilTagged(b"a")[1]
            return prompts, first

        prompts, first = yield self.session(run, login=False)
        self.assertEqual(prompts, [b"+ VXNlcm5hbWU6", b"+ UGFzc3dvcmQ6"])
        self.assertTrue(first.startswith(b"a OK"))

        def initial(client):
            client.send(b"b AUTHENTICATE LOGIN " + base64.b64encode(b"alice@localhost") + b"\r\n")
            prompt = client.readLine()
            client.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
            return prompt, client.readUntilTagged(b"b")[1]

        prompt, ok = yield self.session(initial, login=False)
        self.assertEqual(prompt, b"+ UGFzc3dvcmQ6")
        self.assertTrue(ok.startswith(b"b OK"))

    @defer.inlineCallbacks
    def test_folderCommands(self):
        """
        CREATE (with parents), LIST with % and *, RENAME (children follow),
        SUBSCRIBE/UNSUBSCRIBE and LSUB, DELETE, and their errors: existing
        names, missing folders, INBOX.
        """

        def run(client):
            r = {}
            r["create"] = client.command(b'a CREATE "Lists/Python"')[1]
            r["exists"] = client.command(b"b CREATE Lists")[1]
            r["inbox"] = client.command(b"c CREATE inbox")[1]
            r["percent"] = client.command(b'd LIST "" "%"')[0]
            r["star"] = client.command(b'e LIST "Lists/" "*"')[0]
            r["rename"] = client.command(b"f RENAME Lists Groups")[1]
            r["after"] = client.command(b'g LIST "" "Groups*"')[0]
            r["sub"] = client.command(b"h SUBSCRIBE Groups/Python")[1]
            r["lsub"] = client.command(b'i LSUB "" "Groups/*"')[0]
            r["unsub"] = client.command(b"j UNSUBSCRIBE Groups/Python")[1]
            r["lsub2"] = client.command(b'k LSUB "" "Groups/*"')[0]
            r["delete"] = client.command(b"l DELETE Groups/Python")[1]
            r["deleteAgain"] = client.command(b"m DELETE Groups/Python")[1]
            r["deleteInbox"] = client.command(b"n DELETE INBOX")[1]
            r["renameMissing"] = client.command(b"o RENAME Nope Other")[1]
            r["renameExisting"] = client.command(b"p RENAME Sent Trash")[1]
            r["root"] = client.command(b'q LIST "" ""')[0]
            r["utf7"] = client.command(b'r CREATE "Gr&APwA3w-e"')[1]
            r["utf7list"] = client.command(b's LIST "" "Gr&APwA3w-*"')[0]
            return r

        r = yield self.session(run)
        self.assertEqual(r["create"], b"a OK CREATE completed")
        self.assertEqual(r["exists"], b"b NO [ALREADYEXISTS] Mailbox exists")
        self.assertEqual(r["inbox"], b"c NO [ALREADYEXISTS] Mailbox exists")
        self.assertIn(b'* LIST (\\HasChildren) "/" "Lists"', r["percent"])
        self.assertNotIn(b'* LIST (\\HasNoChildren) "/" "Lists/Python"', r["percent"])
        self.assertEqual(r["star"], [b'* LIST (\\HasNoChildren) "/" "Lists/Python"'])
        self.assertEqual(r["rename"], b"f OK RENAME completed")
        self.assertEqual(r["after"], [b'* LIST (\\HasChildren) "/" "Groups"', b'* LIST (\\HasNoChildren) "/" "Groups/Python"'])
        self.assertEqual(r["lsub"], [b'* LSUB (\\HasNoChildren) "/" "Groups/Python"'])
        self.assertEqual(r["lsub2"], [])
        self.assertEqual(r["delete"], b"l OK DELETE completed")
        self.assertEqual(r["deleteAgain"], b"m NO [NONEXISTENT] Mailbox does not exist")
        self.assertTrue(r["deleteInbox"].startswith(b"n NO"))
        self.assertEqual(r["renameMissing"], b"o NO [NONEXISTENT] Mailbox does not exist")
        self.assertEqual(r["renameExisting"], b"p NO [ALREADYEXISTS] Target mailbox exists")
        self.assertEqual(r["root"], [b'* LIST (\\Noselect) "/" ""'])
        self.assertEqual(r["utf7"], b"r OK CREATE completed")
        self.assertEqual(r["utf7list"], [b'* LIST (\\HasNoChildren) "/" "Gr&APwA3w-e"'])
        self.assertTrue((self.maildir("alice@localhost") / ".Gr&APwA3w-e" / "cur").is_dir())

    @defer.inlineCallbacks
    def test_unsafeNamesRefused(self):
        """
        Names that could leave the user's folder (`../x`, `/etc`,
        `INBOX/../../x`, NUL, bad modified UTF-7, a lone surrogate) are
        refused with NO before they touch the file system.
        """

        def run(client):
            replies = []
            for name in (b'"../x"', b'"/etc"', b'"INBOX/../../x"', b'"a//b"', b"{3+}\r\na\x00b", b'"&Jjo"', b'"&2AA-"'):
                for verb in (b"CREATE", b"SELECT", b"DELETE"):
                    replies.append(client.command(b"t " + verb + b" " + name)[1])
            return replies

        replies = yield self.session(run)
        for reply in replies:
            self.assertTrue(reply.startswith(b"t NO"), reply)
        root = self.maildir("alice@localhost")
        self.assertFalse((root.parent / "x").exists())
        self.assertFalse((root.parent.parent / "x").exists())
        self.assertEqual(
            sorted(p.name for p in root.iterdir() if p.name.startswith(".")),
            [".Archive", ".Drafts", ".Junk", ".Sent", ".Trash"],
        )

    @defer.inlineCallbacks
    def test_statusExamineAndCheck(self):
        """
        STATUS gives every item (APPENDLIMIT too) and NO for a missing
        folder; EXAMINE is READ-ONLY: STORE and EXPUNGE are refused and
        \\Recent is not claimed; CHECK, UNSELECT, ENABLE and ID work.
        """
        yield self.deliver(sampleMessage("one"))

        def run(client):
            r = {}
            r["status"] = client.command(b"a STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN APPENDLIMIT)")
            r["missing"] = client.command(b"b STATUS Nope (MESSAGES)")[1]
            r["badItem"] = client.command(b"c STATUS INBOX (SIZE)")[1]
            r["examine"] = client.command(b"d EXAMINE INBOX")
            r["store"] = client.command(b"e STORE 1 +FLAGS (\\Seen)")[1]
            r["expunge"] = client.command(b"f EXPUNGE")[1]
            r["check"] = client.command(b"g CHECK")[1]
            r["unselect"] = client.command(b"h UNSELECT")[1]
            r["after"] = client.command(b"i FETCH 1 FLAGS")[1]
            r["enable"] = client.command(b"j ENABLE CONDSTORE")
            r["id"] = client.command(b"k ID NIL")[1]
            return r

        r = yield self.session(run)
        untagged, _ = r["status"]
        self.assertTrue(re.match(rb'\* STATUS "INBOX" \(MESSAGES 1 RECENT 1 UIDNEXT 2 UIDVALIDITY \d+ UNSEEN 1 APPENDLIMIT \d+\)', untagged[0]), untagged)
        self.assertEqual(r["missing"], b"b NO [NONEXISTENT] Mailbox does not exist")
        self.assertTrue(r["badItem"].startswith(b"c BAD"))
        self.assertIn(b"* 1 RECENT", r["examine"][0])
        self.assertIn(b"* OK [PERMANENTFLAGS ()] Flags permitted", r["examine"][0])
        self.assertEqual(r["examine"][1], b"d OK [READ-ONLY] EXAMINE completed")
        self.assertEqual(r["store"], b"e NO [READ-ONLY] Mailbox is read-only")
        self.assertEqual(r["expunge"], b"f NO [READ-ONLY] Mailbox is read-only")
        self.assertEqual(r["check"], b"g OK CHECK completed")
        self.assertEqual(r["unselect"], b"h OK UNSELECT completed")
        self.assertEqual(r["after"], b"i BAD No mailbox selected")
        self.assertEqual(r["enable"], ([b"* ENABLED"], b"j OK ENABLE completed"))
        self.assertEqual(r["id"], b"k OK ID completed")
        # EXAMINE left the message in new/: still \Recent for a SELECT.
        self.assertEqual([p.parent.name for p in self.messages("alice@localhost")], ["new"])

    @defer.inlineCallbacks
    def test_storeFlagsAndKeywordsOnDisk(self):
        """
        STORE FLAGS / +FLAGS / -FLAGS (.SILENT) change the Maildir info
        letters; keywords go to dovecot-keywords and become lower-case
        letters; FLAGS lists them after they are created; \\Recent cannot
        be stored and unknown system flags are BAD.
        """
        yield self.deliver(sampleMessage("one"))

        def run(client):
            r = {}
            r["add"] = client.command(b"a STORE 1 +FLAGS (\\Seen \\Flagged $Label1)")
            r["silent"] = client.command(b"b STORE 1 -FLAGS.SILENT (\\Flagged)")
            r["replace"] = client.command(b"c UID STORE 1 FLAGS (\\Answered \\Recent $Label1 Work)")
            r["bad"] = client.command(b"d STORE 1 +FLAGS (\\Bogus)")[1]
            r["badItem"] = client.command(b"e STORE 1 XFLAGS (\\Seen)")[1]
            r["outOfRange"] = client.command(b"f STORE 5 +FLAGS (\\Seen)")[1]
            return r

        r = yield self.session(run, select=b"INBOX")
        untagged, tagged = r["add"]
        self.assertIn(b"* 1 FETCH (FLAGS (\\Flagged \\Seen $Label1 \\Recent))", untagged)
        self.assertIn(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Label1)", untagged)
        self.assertEqual(r["silent"], ([], b"b OK STORE completed"))
        self.assertEqual(r["replace"][0][-1], b"* 1 FETCH (UID 1 FLAGS (\\Answered $Label1 Work \\Recent))")
        self.assertTrue(r["bad"].startswith(b"d BAD"))
        self.assertTrue(r["badItem"].startswith(b"e BAD"))
        self.assertTrue(r["outOfRange"].startswith(b"f BAD"))
        [path] = self.messages("alice@localhost")
        self.assertEqual(path.parent.name, "cur")
        self.assertTrue(path.name.endswith(":2,Rab"), path.name)
        keywords = (self.maildir("alice@localhost") / "dovecot-keywords").read_text()
        self.assertEqual(keywords, "0 $Label1\n1 Work\n")

    @defer.inlineCallbacks
    def test_forwardedIsADovecotKeyword(self):
        """
        $Forwarded is stored as Dovecot stores it, a keyword named in
        dovecot-keywords, never as the Maildir letter P (which Dovecot does
        not show).  A file an older maild wrote with P still reads as
        $Forwarded (FETCH and SEARCH), turns into the keyword when its
        flags are next written, and loses it when the client removes it.
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"), sampleMessage("three"))
        [one, two, three] = self.messages("alice@localhost")
        cur = one.parent.parent / "cur"
        os.rename(two, cur / (two.name + ":2,P"))
        os.rename(three, cur / (three.name + ":2,PS"))

        def run(client):
            r = {}
            r["add"] = client.command(b"a STORE 1 +FLAGS ($Forwarded)")[0]
            r["fetch"] = client.command(b"b FETCH 1:3 FLAGS")[0]
            r["search"] = client.command(b"c SEARCH KEYWORD $Forwarded")[0]
            r["unsearch"] = client.command(b"d SEARCH UNKEYWORD $Forwarded")[0]
            client.command(b"e STORE 2 +FLAGS (\\Flagged)")
            client.command(b"f STORE 3 -FLAGS ($Forwarded)")
            r["after"] = client.command(b"g FETCH 1:3 FLAGS")[0]
            return r

        r = yield self.session(run, select=b"INBOX")
        self.assertIn(b"* 1 FETCH (FLAGS ($Forwarded \\Recent))", r["add"])
        self.assertEqual(
            r["fetch"],
            [
                b"* 1 FETCH (FLAGS ($Forwarded \\Recent))",
                b"* 2 FETCH (FLAGS ($Forwarded))",
                b"* 3 FETCH (FLAGS (\\Seen $Forwarded))",
            ],
        )
        self.assertEqual(r["search"], [b"* SEARCH 1 2 3"])
        self.assertEqual(r["unsearch"], [b"* SEARCH"])
        self.assertEqual(
            r["after"],
            [
                b"* 1 FETCH (FLAGS ($Forwarded \\Recent))",
                b"* 2 FETCH (FLAGS (\\Flagged $Forwarded))",
                b"* 3 FETCH (FLAGS (\\Seen))",
            ],
        )
        keywords = (self.maildir("alice@localhost") / "dovecot-keywords").read_text()
        self.assertEqual(keywords, "0 $Forwarded\n")
        names = sorted(p.name.partition(":2,")[2] for p in self.messages("alice@localhost"))
        self.assertEqual(names, sorted(["a", "Fa", "S"]))

    @defer.inlineCallbacks
    def test_implicitSeen(self):
        """
        FETCH BODY[] (not BODY.PEEK[]) and RFC822.TEXT set \\Seen, on disk
        too, and report the new FLAGS in the same response; in a read-only
        (EXAMINE) session nothing changes.
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"), sampleMessage("three"))

        def run(client):
            client.command(b"e EXAMINE INBOX")
            examined = client.command(b"f FETCH 3 BODY[TEXT]")[0]
            client.command(b"s SELECT INBOX")
            peek = client.command(b"a FETCH 1 BODY.PEEK[]")[0]
            body = client.command(b"b FETCH 1 BODY[]")[0]
            text = client.command(b"c UID FETCH 2 (RFC822.TEXT FLAGS)")[0]
            again = client.command(b"d FETCH 1 BODY[]")[0]
            return examined, peek, body, text, again

        examined, peek, body, text, again = yield self.session(run)
        self.assertNotIn(b"FLAGS", examined[0])
        self.assertNotIn(b"FLAGS", peek[0])
        self.assertTrue(body[0].endswith(b" FLAGS (\\Seen \\Recent))"), body)
        self.assertTrue(text[0].endswith(b"FLAGS (\\Seen \\Recent))"), text)
        self.assertEqual(text[0].count(b"FLAGS"), 1)
        self.assertNotIn(b"FLAGS", again[0])
        infos = sorted(p.name.rpartition(":2,")[2] for p in self.messages("alice@localhost"))
        self.assertEqual(infos, ["", "S", "S"])

    @defer.inlineCallbacks
    def test_expungeCloseAndUidExpunge(self):
        """
        EXPUNGE removes \\Deleted messages with EXPUNGE responses; UID
        EXPUNGE only those in its set; CLOSE expunges silently.
        """
        yield self.deliver(*(sampleMessage(f"m{i}") for i in range(5)))

        def run(client):
            client.command(b"a STORE 1:4 +FLAGS.SILENT (\\Deleted)")
            uidExpunge = client.command(b"b UID EXPUNGE 2")
            expunge = client.command(b"c EXPUNGE")
            client.command(b"d STORE 1 +FLAGS.SILENT (\\Deleted)")
            close = client.command(b"e CLOSE")
            status = client.command(b"f STATUS INBOX (MESSAGES)")[0]
            return uidExpunge, expunge, close, status

        uidExpunge, expunge, close, status = yield self.session(run, select=b"INBOX")
        # Each expunge of \Recent messages tells the new RECENT count.
        self.assertEqual(uidExpunge, ([b"* 2 EXPUNGE", b"* 4 RECENT"], b"b OK EXPUNGE completed"))
        self.assertEqual(
            expunge, ([b"* 3 EXPUNGE", b"* 2 EXPUNGE", b"* 1 EXPUNGE", b"* 1 RECENT"], b"c OK EXPUNGE completed")
        )
        self.assertEqual(close, ([], b"e OK CLOSE completed"))
        self.assertEqual(status, [b'* STATUS "INBOX" (MESSAGES 0)'])
        self.assertEqual(self.messages("alice@localhost"), [])

    @defer.inlineCallbacks
    def test_copyKeepsBytesAndFlags(self):
        """
        COPY hard-links the messages byte-exact into the target with their
        flags and keywords (and \\Recent there), reports COPYUID (source and target UIDs in
        order) and asks to TRYCREATE a missing folder.
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two", body="x" * 5000 + "\r\n"))

        def run(client):
            client.command(b"a STORE 2 +FLAGS (\\Flagged Important)")
            copy = client.command(b"b COPY 1:2 Archive")[1]
            missing = client.command(b"c COPY 1 Nope")[1]
            client.command(b"d SELECT Archive")
            fetched = client.command(b"e FETCH 1:2 (UID FLAGS BODY.PEEK[])")[0]
            return copy, missing, fetched

        copy, missing, fetched = yield self.session(run, select=b"INBOX")
        self.assertTrue(re.match(rb"b OK \[COPYUID \d+ 1:2 1:2\] COPY completed", copy), copy)
        self.assertEqual(missing, b"c NO [TRYCREATE] Mailbox does not exist")
        source = [p.read_bytes() for p in self.messages("alice@localhost")]
        target = self.messages("alice@localhost", ".Archive")
        self.assertEqual([p.read_bytes() for p in target], source)
        self.assertEqual(os.stat(target[1]).st_ino, os.stat(self.messages("alice@localhost")[1]).st_ino)
        self.assertIn(b"FLAGS (\\Flagged Important \\Recent)", fetched[1])
        self.assertTrue(fetched[1].endswith(b"x" * 5000 + b"\r\n)"))

    @defer.inlineCallbacks
    def test_appendFlagsDateAndErrors(self):
        """
        APPEND with flags and a date: SELECT shows it under the APPENDUID
        UID with those flags and INTERNALDATE; a missing folder gets
        [TRYCREATE] before the data is sent (or, for {n+}, with the data
        read past), a bad date BAD, an empty message NO.
        """
        message = sampleMessage("dated")

        def run(client):
            r = {}
            client.send(b'a APPEND INBOX (\\Flagged \\Seen) "14-Jul-2021 02:44:25 +0200" {%d}\r\n' % len(message))
            client.readLine()
            client.send(message + b"\r\n")
            r["append"] = client.readUntilTagged(b"a")[1]
            r["select"] = client.command(b"b SELECT INBOX")[0]
            r["fetch"] = client.command(b"c UID FETCH 1 (FLAGS INTERNALDATE RFC822.SIZE)")[0]
            r["missing"] = client.command(b"d APPEND Nope {5}")[1]
            client.send(b'e APPEND INBOX "31-Foo-2021 00:00:00 +0000" {1+}\r\nx\r\n')
            r["badDate"] = client.readUntilTagged(b"e")[1]
            client.send(b"f APPEND INBOX {0+}\r\n\r\n")
            r["empty"] = client.readUntilTagged(b"f")[1]
            client.send(b"g APPEND Nope {5+}\r\nhello\r\nh NOOP\r\n")
            r["missingPlus"] = client.readUntilTagged(b"g")[1], client.readUntilTagged(b"h")[1]
            return r

        r = yield self.session(run)
        m = re.match(rb"a OK \[APPENDUID (\d+) (\d+)\]", r["append"])
        self.assertIsNotNone(m, r["append"])
        self.assertIn(b"* OK [UIDVALIDITY %s] UIDs valid" % m.group(1), r["select"])
        self.assertIn(b"* 1 EXISTS", r["select"])
        stamp = time.mktime(time.strptime("2021-07-14 00:44:25", "%Y-%m-%d %H:%M:%S")) - time.timezone
        from maild.imap.wire import internalDate

        self.assertEqual(
            r["fetch"],
            [b"* 1 FETCH (UID %s FLAGS (\\Flagged \\Seen \\Recent) INTERNALDATE %s RFC822.SIZE %d)" % (m.group(2), internalDate(stamp), len(message))],
        )
        self.assertEqual(r["missing"], b"d NO [TRYCREATE] Mailbox does not exist")
        self.assertTrue(r["badDate"].startswith(b"e BAD"), r["badDate"])
        self.assertTrue(r["empty"].startswith(b"f NO"), r["empty"])
        self.assertEqual(r["missingPlus"], (b"g NO [TRYCREATE] Mailbox does not exist", b"h OK NOOP completed"))
        self.assertEqual(len(self.messages("alice@localhost")), 1)

    @defer.inlineCallbacks
    def test_searchCommands(self):
        """
        SEARCH and UID SEARCH: flags, NOT/OR, header and body text, sizes,
        dates, sequence and UID sets, CHARSET, and BAD for unknown keys.
        """
        yield self.deliver(
            sampleMessage("Budget report", body="numbers inside\r\n"),
            sampleMessage("Lunch", body="pizza?\r\n", sender="dave@remote.test"),
            sampleMessage("Grüße", body="hallo\r\n"),
        )

        def run(client):
            client.command(b"a STORE 1 +FLAGS (\\Seen)")
            queries = [
                b"UNSEEN",
                b"SEEN",
                b"NOT SEEN",
                b"OR SEEN FROM dave",
                b"FROM dave",
                b'SUBJECT "budget"',
                b"BODY pizza",
                b"TEXT hallo",
                b"HEADER Message-ID lunch",
                b"LARGER 10 SMALLER 100000",
                b"2:*",
                b"UID 1,3",
                b"SENTON 25-Nov-2026",
                b"SINCE 1-Jan-2000",
                b"BEFORE 1-Jan-2000",
                b"CHARSET UTF-8 SUBJECT {6+}\r\ngr\xc3\xbc\xc3\x9f",
                b"NEW",
                b"(UNSEEN FROM carol@remote)",
            ]
            results = [client.command(b"s SEARCH " + q) for q in queries]
            results.append(client.command(b"u UID SEARCH UNSEEN"))
            results.append(client.command(b"v SEARCH FROBNICATE"))
            results.append(client.command(b"w SEARCH CHARSET KOI8-R ALL"))
            return results

        results = yield self.session(run, select=b"INBOX")
        found = [untagged[0] if untagged else b"" for untagged, _ in results[:-2]]
        self.assertEqual(
            found,
            [
                b"* SEARCH 2 3",
                b"* SEARCH 1",
                b"* SEARCH 2 3",
                b"* SEARCH 1 2",
                b"* SEARCH 2",
                b"* SEARCH 1",
                b"* SEARCH 2",
                b"* SEARCH 3",
                b"* SEARCH 2",
                b"* SEARCH 1 2 3",
                b"* SEARCH 2 3",
                b"* SEARCH 1 3",
                b"* SEARCH 1 2 3",
                b"* SEARCH 1 2 3",
                b"* SEARCH",
                b"* SEARCH 3",
                b"* SEARCH 2 3",
                b"* SEARCH 3",
                b"* SEARCH 2 3",
            ],
        )
        self.assertTrue(results[-2][1].startswith(b"v BAD"))
        self.assertEqual(results[-1][1], b"w NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset")

    @defer.inlineCallbacks
    def test_foreignCrlfFile(self):
        """
        A message file another tool wrote with CRLF line ends (and no sizes
        in its name) is served with CRLF, not CR CR LF, by both FETCH paths,
        and RFC822.SIZE is the size of what is served.
        """
        sent = sampleMessage("crlf", body="one\r\ntwo\r\n")
        (self.maildir("alice@localhost") / "cur" / "1700000000.M1P1Q1.tool:2,S").write_bytes(sent)

        def run(client):
            fast = client.command(b"f FETCH 1 (RFC822.SIZE BODY.PEEK[])")
            general = client.command(b"g FETCH 1 (BODY.PEEK[TEXT] BODY.PEEK[])")
            return fast, general

        fast, general = yield self.session(run, select=b"INBOX")
        self.assertEqual(
            fast[0][0], b"* 1 FETCH (RFC822.SIZE %d BODY[] {%d}\r\n%b)" % (len(sent), len(sent), sent)
        )
        self.assertTrue(general[0][0].endswith(b"BODY[] {%d}\r\n%b)" % (len(sent), sent)))
        self.assertIn(b"BODY[TEXT] {10}\r\none\r\ntwo\r\n", general[0][0])

    @defer.inlineCallbacks
    def test_uidsStableAcrossRestart(self):
        """
        UIDVALIDITY and UIDs survive a daemon restart, and new UIDs go on
        from UIDNEXT.
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"))

        def fetchUids(client):
            client.command(b"x STORE 1 +FLAGS (\\Deleted)")
            client.command(b"y EXPUNGE")
            return client.command(b"a UID FETCH 1:* (UID)")[0], client.command(b"b STATUS INBOX (UIDVALIDITY UIDNEXT)")[0]

        before = yield self.session(fetchUids, select=b"INBOX")
        yield self.stopServer()
        yield self.startServer()
        yield self.deliver(sampleMessage("three"))

        def fetchAgain(client):
            return client.command(b"a UID FETCH 1:* (UID)")[0], client.command(b"b STATUS INBOX (UIDVALIDITY UIDNEXT)")[0]

        after = yield self.session(fetchAgain, select=b"INBOX")
        self.assertEqual(before[0], [b"* 1 FETCH (UID 2)"])
        self.assertEqual(after[0], [b"* 1 FETCH (UID 2)", b"* 2 FETCH (UID 3)"])
        validity = re.search(rb"UIDVALIDITY (\d+)", before[1][0]).group(1)
        self.assertIn(b"UIDVALIDITY " + validity + b" UIDNEXT 4", after[1][0])

    @defer.inlineCallbacks
    def test_imaplib(self):
        """
        Python's imaplib works end to end: login, select, append, search,
        fetch, store, copy, expunge, logout.
        """

        def run():
            client = imaplib.IMAP4("127.0.0.1", self.port("imap"), timeout=10)
            try:
                client.login("alice@localhost", PASSWORD)
                client.append("INBOX", None, None, sampleMessage("via imaplib"))
                client.select("INBOX")
                typ, data = client.search(None, "SUBJECT", '"via imaplib"')
                typ, fetched = client.fetch(data[0], "(RFC822)")
                client.store(data[0], "+FLAGS", "\\Deleted")
                client.copy(data[0], "Trash")
                client.expunge()
                return data, fetched[0][1], client.logout()
            except BaseException:
                client.shutdown()
                raise

        data, body, logout = yield self.inThread(run)
        self.assertEqual(data, [b"1"])
        self.assertEqual(body, sampleMessage("via imaplib"))
        self.assertEqual(logout[0], "BYE")
        self.assertEqual(len(self.messages("alice@localhost", ".Trash")), 1)
