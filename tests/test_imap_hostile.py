"""
Hostile IMAP input (issue 9): every command, however built, gets a tagged
reply or BYE, costs time and memory in proportion to its size, and breaks
nothing for other clients or other messages.
"""

from __future__ import annotations

import datetime
import os

from twisted.internet import defer, reactor, task

from maild.imap import wire
from maild.imap.account import PatternMatcher
from maild.imap.framing import CommandFramer
from maild.lines import LineReader
from tests.support import IMAPTestCase, sampleMessage, waitForEmptySpool
from tests.test_imap_sessions import waitFor


class ListPatternTests(IMAPTestCase):
    # Before the fix, the first LIST below ran for hours: a test that hangs
    # fails here.
    timeout = 60

    @defer.inlineCallbacks
    def test_wildcardRunsAreLinear(self):
        """
        `LIST "" "**…**y"` (50 `*`) and `%*%*…` runs are answered at once
        with the right names, and a second session is served meanwhile;
        a pattern longer than MAX_PATTERN gets BAD.
        """

        def run(client):
            for name in (b"Projects/2026/" + b"a" * 66 + b"y", b"Lists"):
                client.command(b"c CREATE " + name)
            stars = client.command(b'a LIST "" "' + b"*" * 50 + b'y"')
            mixed = client.command(b'b LIST "" "' + b"%*" * 40 + b'y"')
            percent = client.command(b'd LIST "" "' + b"%" * 60 + b'y"')
            other = self.connect()
            try:
                served = other.command(b"o NOOP")
            finally:
                other.close()
            long = client.command(b'e LIST "" "' + b"a" * 2000 + b'"')
            return stars, mixed, percent, served, long

        stars, mixed, percent, served, long = yield self.session(run)
        deep = b'* LIST (\\HasNoChildren) "/" "Projects/2026/' + b"a" * 66 + b'y"'
        self.assertEqual(stars, ([deep], b"a OK LIST completed"))
        self.assertEqual(mixed, ([deep], b"b OK LIST completed"))
        self.assertEqual(percent, ([], b"d OK LIST completed"))
        self.assertEqual(served, ([], b"o OK NOOP completed"))
        self.assertEqual(long, ([], b"e BAD Mailbox pattern too long"))

    def test_matcherSemantics(self):
        """
        `*` crosses the delimiter, `%` does not, either may match nothing,
        and only the INBOX prefix matches in any case.
        """
        cases = [
            ("*", "a/b", True),
            ("%", "a/b", False),
            ("%/%", "a/b", True),
            ("a%", "a", True),
            ("a*%b", "a/x/b", True),
            ("a%*b", "a/x/b", True),
            ("a%%b", "a/b", False),
            ("inbox", "INBOX", True),
            ("INBOX/%", "inbox/Sub", True),
            ("Inbox/sub", "INBOX/Sub", False),
            ("Sent", "sent", False),
            ("", "", True),
            ("*x", "", False),
            ("a.b", "a.b", True),
            ("a.b", "axb", False),
        ]
        for pattern, name, expected in cases:
            self.assertEqual(PatternMatcher(pattern).match(name), expected, (pattern, name))


class HugeNumberAndDateTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_hugeNumbersAndImpossibleDates(self):
        """
        Numbers of thousands of digits (sequence sets, partials, section
        parts, LARGER) and dates that name no real day or time get BAD,
        and the session goes on; an APPEND with such a date stores nothing.
        """
        yield self.deliver(sampleMessage("one"))
        huge = b"9" * 5000
        zeros = b"0" * 5000 + b"1"
        bad = [
            b"a1 FETCH " + huge + b" FLAGS",
            b"a2 FETCH 1:" + huge + b" FLAGS",
            b"a3 UID FETCH " + zeros + b"," + huge + b" FLAGS",
            b"a4 FETCH 1 BODY[]<" + huge + b".1>",
            b"a5 FETCH 1 BODY[]<0." + huge + b">",
            b"a6 FETCH 1 BODY[" + huge + b"]",
            b"a7 SEARCH LARGER " + huge,
            b"a8 SEARCH SMALLER 4294967296",
            b"a9 SEARCH UID " + huge,
            b"a10 SEARCH " + huge,
            b"a11 STORE " + huge + b" +FLAGS (\\Seen)",
            b"a12 COPY 1:" + huge + b" Archive",
            b"a13 SEARCH SINCE 31-Feb-2020",
            b"a14 SEARCH BEFORE 0-Jan-2020",
            b"a15 SEARCH ON 1-Jan-99999",
            b"a16 SEARCH SENTON 1-Foo-2020",
            b"a17 SEARCH SINCE " + huge + b"-Jan-2020",
        ]
        dates = [
            b'"31-Feb-2020 10:00:00 +0000"',
            b'" 0-Jan-2020 10:00:00 +0000"',
            b'"01-Jan-2020 25:61:61 +0000"',
            b'"01-Jan-99999 10:00:00 +0000"',
            b'"01-Jan-2020 999999999999999999999999:00:00 +0000"',
            b'"01-Jan-2020 10:00:00 +0099"',
            b'"01-Jan-2020 10:00:00 +' + huge + b'"',
        ]
        message = sampleMessage("appended")

        def run(client):
            replies = [client.command(line)[1] for line in bad]
            for i, date in enumerate(dates):
                client.send(b"d%d APPEND INBOX %s {%d+}\r\n%s\r\n" % (i, date, len(message), message))
                replies.append(client.readUntilTagged(b"d%d" % i)[1])
            good = client.command(b'g APPEND INBOX "01-Feb-2020 10:00:00 +0100" {%d+}\r\n%s' % (len(message), message))
            date = client.command(b"h FETCH 2 INTERNALDATE")
            return replies, good, date, client.command(b"z NOOP")

        replies, good, date, noop = yield self.session(run, select=b"INBOX")
        for reply in replies:
            self.assertRegex(reply, rb"^[ad]\d+ BAD ")
        self.assertTrue(good[1].startswith(b"g OK [APPENDUID "), good)
        self.assertEqual(len(self.messages("alice@localhost")), 2)
        self.assertEqual(os.stat(self.messages("alice@localhost")[1]).st_mtime, 1580547600)
        self.assertIn(b"INTERNALDATE", date[0][0])
        self.assertEqual(noop[1], b"z OK NOOP completed")

    def test_dateParsers(self):
        """
        The date parsers take only the RFC 3501 forms of real moments.
        """
        self.assertEqual(wire.parseDateTime(b" 7-Jul-1996 02:44:25 -0700"), 836732665)
        self.assertEqual(wire.parseDateTime(b"29-Feb-2020 00:00:00 +0000"), 1582934400)
        for bad in (b"29-Feb-2021 00:00:00 +0000", b"007-Jul-1996 02:44:25 -0700", b"07-Jul-1996 24:00:00 +0000", b"07-Jul-1996 02:44:25 0700"):
            self.assertIsNone(wire.parseDateTime(bad), bad)
        self.assertEqual(wire.parseSearchDate(b"1-Feb-1994"), datetime.date(1994, 2, 1))
        for bad in (b"31-Feb-2020", b"0-Jan-2020", b"1-Jan-99999", b"1-Jan-0000", b"001-Jan-2020"):
            self.assertIsNone(wire.parseSearchDate(bad), bad)


class SurrogateNameTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_loneSurrogateNames(self):
        """
        A mailbox name whose modified UTF-7 decodes to a lone surrogate
        (`&2AA-`) gets NO or BAD from every command that takes a name,
        APPEND included, never SERVERBUG or a dropped connection.
        """
        names = [b"&2AA-", b'"a/&2AA-"', b"&3AA-x", b"&2ADYAA-"]
        commands = [
            b"SELECT %s",
            b"EXAMINE %s",
            b"CREATE %s",
            b"DELETE %s",
            b"RENAME %s Other",
            b"RENAME Archive %s",
            b"STATUS %s (MESSAGES)",
            b"SUBSCRIBE %s",
            b"UNSUBSCRIBE %s",
            b'LIST "" %s',
            b"LIST %s *",
            b"LSUB %s *",
        ]
        message = sampleMessage("x")

        def run(client):
            replies = []
            for name in names:
                for i, command in enumerate(commands):
                    replies.append(client.command(b"c%d " % i + command % name)[1])
                client.send(b"p APPEND %s {%d+}\r\n%s\r\n" % (name, len(message), message))
                replies.append(client.readUntilTagged(b"p")[1])
                client.send(b"q APPEND %s {%d}\r\n" % (name, len(message)))
                replies.append(client.readUntilTagged(b"q")[1])
            return replies, client.command(b"z NOOP")

        replies, noop = yield self.session(run)
        for reply in replies:
            self.assertRegex(reply, rb"^[cpq]\d* (NO|BAD|OK L[IS][SU][TB] completed)", reply)
            self.assertNotIn(b"SERVERBUG", reply)
        self.assertEqual(noop[1], b"z OK NOOP completed")
        self.assertEqual(len(self.messages("alice@localhost")), 0)


class MisplacedLiteralTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_literalWhereAtomExpected(self):
        """
        A literal marker stuck to a word (`x{1+}`), and a literal or a list
        where an atom is expected (the SASL initial response), get BAD,
        before login and after; the session goes on.
        """
        before = [
            b"a1 LOGIN x{1+}\r\ny z\r\n",
            b"a2 LOGIN alice@localhost {2+}\r\nab(c{1+}\r\nd\r\n",
            b"a3 AUTHENTICATE PLAIN (x)\r\n",
            b"a4 AUTHENTICATE PLAIN {4+}\r\nAAAA\r\n",
            b"a5 AUTHENTICATE PLAIN ((x) y)\r\n",
            b"a6 NOOP x{2+}\r\nab\r\n",
        ]
        after = [
            b"b1 SELECT x{5+}\r\nINBOX\r\n",
            b"b2 FETCH 1 (FLAGS{3+}\r\nUID)\r\n",
            b"b3 STATUS INBOX (MESSAGES){0+}\r\n\r\n",
            b'b4 LIST ""x{1+}\r\n*\r\n',
        ]

        def run(client):
            replies = []
            for line in before:
                client.send(line)
                replies.append(client.readUntilTagged(line.split(b" ", 1)[0])[1])
            client.login()
            client.command(b"s SELECT INBOX")
            for line in after:
                client.send(line)
                replies.append(client.readUntilTagged(line.split(b" ", 1)[0])[1])
            return replies, client.command(b"z NOOP")

        replies, noop = yield self.session(run, login=False)
        for reply in replies:
            self.assertRegex(reply, rb"^[ab]\d BAD ")
        self.assertEqual(noop[1], b"z OK NOOP completed")


class KeywordTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_keywordsMustBeAtoms(self):
        """
        STORE, APPEND and SEARCH KEYWORD refuse keywords that are not atoms
        (`a"b`, `x\\y`, `a]b%*`, 8-bit) with BAD: nothing reaches
        dovecot-keywords, and the folder's FLAGS stay well-formed.  A
        non-atom another program wrote there is left out of FLAGS and
        PERMANENTFLAGS.
        """
        yield self.deliver(sampleMessage("one"))
        bad = [b'a"b', b"x\\y", b"a]b%*", b"\xe9t\xe9", b"a{b", b"*"]
        message = sampleMessage("two")

        def run(client):
            replies = []
            for i, keyword in enumerate(bad):
                replies.append(client.command(b"s%d STORE 1 +FLAGS (%s)" % (i, keyword))[1])
                client.send(b"p%d APPEND INBOX (%s) {%d+}\r\n%s\r\n" % (i, keyword, len(message), message))
                replies.append(client.readUntilTagged(b"p%d" % i)[1])
                replies.append(client.command(b"k%d SEARCH KEYWORD %s" % (i, keyword))[1])
            ok = client.command(b"o STORE 1 +FLAGS ($Label1 ~a-b.c)")
            return replies, ok

        replies, ok = yield self.session(run, select=b"INBOX")
        for reply in replies:
            self.assertRegex(reply, rb"^[spk]\d BAD ")
        self.assertEqual(ok, ([b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Label1 ~a-b.c)",
                                 b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Label1 ~a-b.c \\*)] Flags permitted",
                                 b"* 1 FETCH (FLAGS ($Label1 ~a-b.c \\Recent))"], b"o OK STORE completed"))
        keywords = (self.maildir("alice@localhost") / "dovecot-keywords").read_text()
        self.assertEqual(keywords, "0 $Label1\n1 ~a-b.c\n")
        self.assertEqual(len(self.messages("alice@localhost")), 1)

        (self.maildir("alice@localhost") / "dovecot-keywords").write_text('0 $Label1\n1 ~a-b.c\n3 a"b\n4 x y\n')

        def select(client):
            return client.command(b"s SELECT INBOX")[0][:2]

        flags, permanent = yield self.session(select)
        self.assertEqual(flags, b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Label1 ~a-b.c)")
        self.assertIn(b"$Label1 ~a-b.c \\*)]", permanent)


class CommandBoundTests(IMAPTestCase):
    limits = {
        "imap_command_size": 8192,
        "imap_command_literals": 20,
        "preauth_command_size": 2048,
        "preauth_command_literals": 4,
    }

    @defer.inlineCallbacks
    def test_manyLinesBeforeLogin(self):
        """
        Before login, a command continued over thousands of lines by
        zero-length literals ends the session at the fifth literal (BYE):
        nothing of it is kept, and another client is served meanwhile; a
        synchronizing literal past the bound gets BAD and the session goes on.
        """

        def run(client):
            client.send(b"s LOGIN {0}\r\n")
            client.readLine()
            for _ in range(3):
                client.send(b" {0}\r\n")
                client.readLine()
            client.send(b" {0}\r\n")
            refused = client.readUntilTagged(b"s")
            noop = client.command(b"n NOOP")
            client.send(b"a LOGIN " + b"x {0+}\r\n" * 20000 + b"\r\n")
            closed = client.closed()
            other = self.connect(login=False)
            try:
                served = other.command(b"o NOOP")
            finally:
                other.close()
            return refused, noop, closed, client.buffer, served

        refused, noop, closed, rest, served = yield self.session(run, login=False)
        self.assertEqual(refused, ([], b"s BAD Command too long before login"))
        self.assertEqual(noop, ([], b"n OK NOOP completed"))
        self.assertTrue(closed)
        self.assertEqual(rest, b"* BYE Command too long before login\r\n")
        self.assertEqual(served, ([], b"o OK NOOP completed"))

    @defer.inlineCallbacks
    def test_commandBoundsAfterLogin(self):
        """
        After login, a command with more literals than
        imap_command_literals, or more octets than imap_command_size, gets
        BAD at the literal that passes the bound; the rest of the command
        is read past, and the next command is understood.
        """

        def run(client):
            client.send(b"a NOOP" + b" {0+}\r\n" * 5000 + b"\r\nb NOOP\r\n")
            many = client.readUntilTagged(b"a")
            after = client.readUntilTagged(b"b")
            client.send(b"c SEARCH" + b" TEXT {1000+}\r\n" + b"x" * 1000 + b"" + b" TEXT {1000+}\r\n" + b"y" * 1000 + b"\r\n")
            fine = client.readUntilTagged(b"c")
            client.send(b"d SEARCH" + (b" TEXT {1000+}\r\n" + b"x" * 1000) * 10 + b"\r\ne NOOP\r\n")
            big = client.readUntilTagged(b"d")
            return many, after, fine, big, client.readUntilTagged(b"e")

        many, after, fine, big, noop = yield self.session(run, select=b"INBOX")
        self.assertEqual(many, ([], b"a BAD Too many literals"))
        self.assertEqual(after, ([], b"b OK NOOP completed"))
        self.assertEqual(fine, ([b"* SEARCH"], b"c OK SEARCH completed"))
        self.assertEqual(big, ([], b"d BAD Command too long"))
        self.assertEqual(noop, ([], b"e OK NOOP completed"))

    def test_framingIsLinear(self):
        """
        The framer takes its lines from the shared line reader
        (L{maild.lines.LineReader}, whose cursor never copies the rest of
        the input per line): 20,000 lines in one write are 20,000 commands,
        and nothing is left held.
        """
        sink = _CountingSink()
        framer = CommandFramer(sink, 100)
        framer.feed(b"a NOOP\r\n" * 20000)
        self.assertIsInstance(framer.reader, LineReader)
        self.assertEqual(sink.commands, 20000)
        self.assertEqual(framer.pending, 0)


class _CountingSink:
    def __init__(self):
        self.commands = 0

    def commandReceived(self, parts):
        self.commands += 1


class RefusedAppendTests(IMAPTestCase):
    limits = {"imap_line_length": 1024}

    @defer.inlineCallbacks
    def test_noSpoolFileBehindRefusedAppend(self):
        """
        An APPEND with several message literals is refused (BAD) at the
        second, before it is stored; neither that nor an APPEND refused
        after its message arrived (a too-long line, a stray argument)
        leaves a message or a spool file behind.
        """
        message = b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n"
        n = len(message)

        def run(client):
            replies = []
            for i in range(50):
                client.send(b"a%d APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s\r\n" % (i, n, message, n, message))
                replies.append(client.readUntilTagged(b"a%d" % i)[1])
            client.send(b"b APPEND INBOX {%d+}\r\n%s {%d}\r\n" % (n, message, n))
            replies.append(client.readUntilTagged(b"b")[1])
            client.send(b"c APPEND INBOX {%d+}\r\n%s %s\r\n" % (n, message, b"z" * 3000))
            replies.append(client.readUntilTagged(b"c")[1])
            client.send(b"d APPEND INBOX {%d+}\r\n%s EXTRA\r\n" % (n, message))
            replies.append(client.readUntilTagged(b"d")[1])
            return replies, client.command(b"z NOOP")

        replies, noop = yield self.session(run)
        self.assertTrue(all(r.endswith(b"BAD APPEND takes one message") for r in replies[:50]), replies[:3])
        self.assertEqual(replies[50:], [b"b BAD APPEND takes one message", b"c BAD Command line too long", b"d BAD Too many arguments"])
        self.assertEqual(noop[1], b"z OK NOOP completed")
        self.assertEqual(self.messages("alice@localhost"), [])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])


class IdleAndHugeLiteralTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_idleEndsOnDoneOnly(self):
        """
        `DONE {10+}` on IDLE's continuation ends IDLE with BAD; the
        literal's data is read past, never run as a command; `done` in
        any case ends it normally.
        """

        def run(client):
            client.send(b"i IDLE\r\n")
            client.readLine()
            client.send(b"DONE {10+}\r\nc LOGOUT\r\n\r\nd NOOP\r\n")
            first = client.readUntilTagged(b"i")
            second = client.readUntilTagged(b"d")
            client.send(b"j IDLE\r\n")
            client.readLine()
            client.send(b"done\r\n")
            return first, second, client.readUntilTagged(b"j")

        first, second, third = yield self.session(run, select=b"INBOX")
        self.assertEqual(first, ([], b"i BAD Expected DONE"))
        self.assertEqual(second, ([], b"d OK NOOP completed"))
        self.assertEqual(third, ([], b"j OK IDLE terminated"))

    @defer.inlineCallbacks
    def test_hugeLiteralAfterLoginCloses(self):
        """
        After login, a non-APPEND literal of {99999999999999999999+} is
        refused and the session closed with BYE, rather than discarding
        that many octets in silence.
        """

        def run(client):
            client.send(b"a SELECT {99999999999999999999+}\r\n" + b"x" * 1000)
            return client.closed(), client.buffer

        closed, rest = yield self.session(run)
        self.assertTrue(closed)
        self.assertEqual(rest, b"a NO [TOOBIG] Literal too big\r\n* BYE Literal too big\r\n")


def deepFromMessage(depth: int = 3000) -> bytes:
    return b"From: " + b"(" * depth + b"x\r\nTo: alice@localhost\r\nSubject: deep from\r\n\r\nbody\r\n"


def nestedMultipartMessage(depth: int = 600) -> bytes:
    out = [b"From: a@example.org\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\nleaf\r\n")
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"".join(out)


def nestedMessageMessage(depth: int = 600) -> bytes:
    out = [b"From: a@example.org\r\nSubject: inside\r\n"]
    out.extend(b"Content-Type: message/rfc822\r\n\r\nFrom: c@example.org\r\n" for _ in range(depth))
    out.append(b"\r\nleaf\r\n")
    return b"".join(out)


class DeepNestingTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_deepMessagesDegradeOnlyThemselves(self):
        """
        A From: of 3,000 "(" and 600-level nested multiparts or messages:
        FETCH 1:* ENVELOPE / ALL / BODYSTRUCTURE answers OK for the whole
        range; the bad From: shows as NIL and the deep structure is cut
        into an opaque leaf, while the good messages are untouched.
        """
        yield self.deliver(
            sampleMessage("before"), deepFromMessage(), nestedMultipartMessage(), nestedMessageMessage(), sampleMessage("after")
        )

        def run(client):
            return [
                client.command(b"a FETCH 1:* (ENVELOPE)"),
                client.command(b"b FETCH 1:* ALL"),
                client.command(b"c FETCH 1:* (BODYSTRUCTURE)"),
                client.command(b"d FETCH 1:* (BODY)"),
                client.command(b"e SEARCH FROM carol"),
                client.command(b"f SEARCH TEXT leaf"),
            ]

        replies = yield self.session(run, select=b"INBOX")
        for untagged, tagged in replies[:4]:
            self.assertRegex(tagged, rb"^[a-d] OK FETCH completed")
            self.assertEqual([line.split(b" ", 2)[1] for line in untagged], [b"1", b"2", b"3", b"4", b"5"])
        envelopes = replies[0][0]
        self.assertIn(b'(NIL "deep from" NIL NIL NIL ((NIL NIL "alice" "localhost")) NIL NIL NIL NIL)', envelopes[1])
        self.assertIn(b'"application" "octet-stream"', replies[2][0][2])
        self.assertIn(b'"application" "octet-stream"', replies[2][0][3])
        self.assertIn(b'"before" (("Carol" NIL "carol" "remote.test"))', envelopes[0])
        self.assertEqual(replies[4], ([b"* SEARCH 1 5"], b"e OK SEARCH completed"))
        self.assertEqual(replies[5], ([b"* SEARCH 3 4"], b"f OK SEARCH completed"))

    @defer.inlineCallbacks
    def test_deepSearchPrograms(self):
        """
        `SEARCH NOT NOT … ALL` and `OR ALL OR ALL …` 2,000 deep are
        answered (double negations cancel, OR chains are flattened);
        a program still nested deeper than the bound after that gets BAD;
        none of them is an internal error.
        """
        yield self.deliver(*(sampleMessage(f"m{i}") for i in range(3)))

        def run(client):
            return [
                client.command(b"a SEARCH " + b"NOT " * 2000 + b"ALL"),
                client.command(b"b SEARCH " + b"NOT " * 2001 + b"ALL"),
                client.command(b"c SEARCH " + b"OR ALL " * 2000 + b"ALL"),
                client.command(b"d SEARCH " + b"OR " * 2000 + b"ALL " * 2001),
                client.command(b"e SEARCH " + b"NOT OR ALL " * 2000 + b"ALL"),
                client.command(b"f UID SEARCH " + b"OR NOT SEEN " * 2000 + b"ALL"),
                client.command(b"g SEARCH " + b"NOT OR UNSEEN " * 10 + b"ALL"),
            ]

        replies = yield self.session(run, select=b"INBOX")
        self.assertEqual(replies[0], ([b"* SEARCH 1 2 3"], b"a OK SEARCH completed"))
        self.assertEqual(replies[1], ([b"* SEARCH"], b"b OK SEARCH completed"))
        self.assertEqual(replies[2], ([b"* SEARCH 1 2 3"], b"c OK SEARCH completed"))
        self.assertEqual(replies[3], ([b"* SEARCH 1 2 3"], b"d OK SEARCH completed"))
        self.assertEqual(replies[4], ([], b"e BAD Search program too deeply nested"))
        self.assertEqual(replies[5], ([b"* SEARCH 1 2 3"], b"f OK SEARCH completed"))
        self.assertEqual(replies[6], ([b"* SEARCH"], b"g OK SEARCH completed"))


class IdleOnDeletedFolderTests(IMAPTestCase):
    def _idleThroughDeletion(self, inbox, deliver=True):
        """
        In a thread: one session in IDLE on Gone, another in IDLE on INBOX;
        a third deletes Gone; then (unless C{deliver} is false: the test
        puts it there itself) a message is put into INBOX by another
        program.  The DELETE reply, what the first session got for DONE,
        and what the INBOX session heard.
        """
        idler = self.connect()
        other = self.connect()
        deleter = self.connect()
        try:
            deleter.command(b"c CREATE Gone")
            idler.command(b"s SELECT Gone")
            other.command(b"s SELECT INBOX")
            for client in (idler, other):
                client.send(b"i IDLE\r\n")
                assert client.readLine() == b"+ idling"
            deleted = deleter.command(b"d DELETE Gone")
            idler.send(b"DONE\r\n")
            done = idler.readUntilTagged(b"i")[1] if not idler.closed(0.5) else b"closed"
            if deliver:
                self._deliverOutside(inbox)
            arrived = waitFor(other, b"RECENT\r\n")
            other.send(b"DONE\r\n")
            other.readUntilTagged(b"i")
            return deleted, done, arrived
        finally:
            for client in (idler, other, deleter):
                client.close()

    @staticmethod
    def _deliverOutside(inbox):
        """
        Put a message into C{inbox} as another program would.
        """
        (inbox / "tmp" / "outside").write_bytes(sampleMessage("outside"))
        os.rename(inbox / "tmp" / "outside", inbox / "new" / "1700000000.M1P99Q1.elsewhere")

    @defer.inlineCallbacks
    def test_idleOnDeletedFolder(self):
        """
        A session in IDLE on a folder another session deletes ends its
        IDLE without an internal error; its connection slot is given back
        when it closes and the daemon can stop.
        """
        factory = self.service.listeners["imap"].factory
        deleted, done, arrived = yield self.inThread(self._idleThroughDeletion, self.maildir("alice@localhost"))
        self.assertEqual(deleted, ([], b"d OK DELETE completed"))
        self.assertNotIn(b"SERVERBUG", done)
        for _ in range(100):
            if not factory.sessions:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(factory.sessions, set())
        self.assertEqual(dict(factory.connections), {})
        # What SIGTERM does: it finishes (it waited forever for the session).
        yield self.stopServer()

    @defer.inlineCallbacks
    def test_otherIdleHearsAfterDeletion(self):
        """
        After a watched folder is deleted, the other sessions in IDLE still
        hear other programs' changes at once (Twisted's INotify closes
        itself when a watched directory is deleted; the watcher renews it).
        """
        _, _, arrived = yield self.inThread(self._idleThroughDeletion, self.maildir("alice@localhost"))
        self.assertIn(b"* 1 EXISTS\r\n* 1 RECENT\r\n", arrived)

    @defer.inlineCallbacks
    def test_changeWhileInotifyRenewedIsHeard(self):
        """
        A message another program puts into INBOX after the deleted
        folder's watch closed Twisted's INotify and before the watcher's
        new INotify watches INBOX (no inotify instance hears it) still
        reaches the session in IDLE on INBOX at once: the renewal looks at
        the folders it watches again.  (DELETE answers before the old
        INotify's last events are read, so a client can deliver in this
        gap; the test above met it now and then.)
        """
        inbox = self.maildir("alice@localhost")
        watcher = self.service.store.watcher
        renew = watcher._renewInotify

        def deliverThenRenew():
            self._deliverOutside(inbox)
            renew()

        watcher._renewInotify = deliverThenRenew
        _, _, arrived = yield self.inThread(self._idleThroughDeletion, inbox, deliver=False)
        self.assertIn(b"* 1 EXISTS\r\n* 1 RECENT\r\n", arrived)


class OneReplyTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_invalidNameAndBadArgumentsOneReply(self):
        """
        A command with an invalid mailbox name and malformed arguments
        besides gets one tagged reply, not a NO and then a BAD (the fuzzer
        found the second reply answering the client's next command).
        """
        yield self.deliver(sampleMessage("one"))
        commands = [
            b'a STATUS "&2AA-" x',
            b"b DELETE &2AA- extra",
            b"c RENAME &2AA- x y",
            b"d RENAME Archive a/../b extra",
            b"e COPY 1 &2AA- extra",
            b"f SUBSCRIBE a/../b extra",
            b"g NOOP",
        ]

        def run(client):
            client.send(b"".join(c + b"\r\n" for c in commands))
            lines = []
            while not lines or not lines[-1].startswith(b"g "):
                lines.append(client.readLine())
            return [line for line in lines if not line.startswith(b"* ")]

        tagged = yield self.session(run, select=b"INBOX")
        self.assertEqual([line[:1] for line in tagged], [b"a", b"b", b"c", b"d", b"e", b"f", b"g"])
        self.assertTrue(all(b" NO Invalid mailbox name" in line for line in tagged[:6]), tagged)
