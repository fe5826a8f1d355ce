"""
Property-based tests (Hypothesis) for IMAP input (issue 9): the command
reader, the argument parser, sequence sets, SEARCH programs, dates and
modified UTF-7.  The parsers take any input and either give a value or
raise the error that becomes BAD or NO, never another exception; round
trips hold where there are any; and a running daemon answers any command,
before and after login, with a tagged reply or BYE.
"""

from __future__ import annotations

import calendar
import re
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

import twisted.mail.imap4  # noqa: F401  (registers "imap4-utf-7")
from maild.imap import wire
from maild.imap.account import PatternMatcher
from maild.imap.fetch import parseItems
from maild.imap.framing import ACCEPT, REFUSE, CommandFramer
from maild.imap.parser import BadCommand, Literal, SequenceSet, decodeMailbox, parseSequenceSet, tokenize
from maild.imap.search import parseKeys
from maild.names import InvalidName
from tests.support import IMAPTestCase, sampleMessage

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

# Pieces clients send: enough structure that the parsers get past their
# first check, enough noise that every branch meets junk.
atomText = st.sampled_from(
    [b"ALL", b"NOT", b"OR", b"UID", b"FLAGS", b"BODY[]", b"BODY.PEEK[HEADER.FIELDS (From)]", b"BODY[1.2]<0.10>",
     b"SEEN", b"KEYWORD", b"LARGER", b"SINCE", b"1-Feb-2020", b"31-Feb-2020", b"1:*", b"*", b"4294967296",
     b"9" * 50, b"0", b"NIL", b"INBOX", b"&2AA-", b"x{1+}", b"\\Seen", b"$Label", b"CHARSET", b"UTF-8"]
)
token = st.one_of(
    atomText,
    st.binary(max_size=12),
    st.builds(lambda b: b'"' + b + b'"', st.binary(max_size=8)),
    st.sampled_from([b"(", b")", b"((", b"))", b"[", b"]", b'"', b"\\", b"{3}", b"{0+}"]),
)
commandText = st.lists(token, max_size=20).map(b" ".join)


def tokens(data: bytes):
    try:
        return tokenize([data], 16)
    except BadCommand:
        return None


class ParserProperties(unittest.SynchronousTestCase):
    @EXAMPLES
    @given(st.one_of(commandText, st.binary(max_size=200)))
    def test_tokenizeAnything(self, data):
        """
        Any line tokenizes or raises BadCommand; atoms hold no control
        characters, nor space or parentheses outside a section's brackets.
        """
        result = tokens(data)
        stack = [result or []]
        while stack:
            for t in stack.pop():
                if isinstance(t, list):
                    stack.append(t)
                elif type(t).__name__ == "Atom":
                    self.assertFalse(re.search(rb"[\x00-\x1f\x7f]", t), t)
                    self.assertFalse(re.search(rb"[ ()]", t.split(b"[")[0]), t)

    @EXAMPLES
    @given(st.one_of(st.binary(max_size=60), st.lists(st.sampled_from([b"1", b"*", b"2:5", b"0", b"9" * 5000, b"4294967295", b":", b","]), max_size=8).map(b",".join)))
    def test_sequenceSetAnything(self, data):
        """
        Any text is a sequence set of 32-bit ranges or BadCommand.
        """
        try:
            ranges = parseSequenceSet(data)
        except BadCommand:
            return
        for low, high in ranges:
            self.assertTrue(0 <= low <= 0xFFFFFFFF and 0 <= high <= 0xFFFFFFFF)

    @EXAMPLES
    @given(
        st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=6),
        st.lists(st.integers(1, 60), max_size=30, unique=True).map(sorted),
        st.booleans(),
    )
    def test_sequenceSetRoundTrip(self, ranges, uids, uid):
        """
        Ranges written as a set parse back to themselves (0 is C{*}); their
        positions in a mailbox are sorted disjoint spans inside it, or
        BadCommand for sequence numbers beyond it.
        """
        text = b",".join(b"%s:%s" % (b"*" if a == 0 else b"%d" % a, b"*" if b == 0 else b"%d" % b) for a, b in ranges)
        self.assertEqual(parseSequenceSet(text), ranges)
        try:
            spans = SequenceSet(tuple(ranges), uid).positions(uids)
        except BadCommand:
            self.assertFalse(uid)
            return
        last = -1
        for start, stop in spans:
            self.assertTrue(last < start < stop <= len(uids) or (last < start <= stop <= len(uids)))
            last = stop

    @EXAMPLES
    @given(st.one_of(commandText, st.lists(st.sampled_from([b"NOT", b"OR", b"ALL", b"SEEN", b"(", b")"]), max_size=300).map(b" ".join)))
    def test_searchProgramAnything(self, data):
        """
        Any tokens are a search tree no deeper than its bound, or BadCommand.
        """
        parsed = tokens(data)
        if parsed is None:
            return
        try:
            key = parseKeys(parsed)
        except BadCommand:
            return
        self.assertLessEqual(key.depth, 64)
        key.cheap

    @EXAMPLES
    @given(st.one_of(commandText, st.binary(max_size=80)))
    def test_fetchItemsAnything(self, data):
        """
        Any tokens are FETCH items or BadCommand.
        """
        parsed = tokens(data)
        if not parsed:
            return
        try:
            parseItems(parsed[0] if len(parsed) == 1 else parsed)
        except BadCommand:
            pass

    @EXAMPLES
    @given(st.one_of(st.binary(max_size=40), st.from_regex(rb"\A ?\d{1,3}-[A-Za-z]{3}-\d{1,5} \d{1,3}:\d{2}:\d{2} [+-]\d{4}\Z")))
    def test_datesAnything(self, data):
        """
        Any text is a date-time (a number of seconds) or None, and any text
        a search date or None.
        """
        stamp = wire.parseDateTime(data)
        self.assertTrue(stamp is None or isinstance(stamp, float))
        wire.parseSearchDate(data.strip())

    @EXAMPLES
    @given(st.integers(0, 253402300799 - 86400), st.integers(-23 * 60, 23 * 60).map(lambda m: m - m % 15))
    def test_dateTimeRoundTrip(self, seconds, offset):
        """
        A moment written as RFC 3501 date-time in any zone parses back to
        itself.
        """
        t = time.gmtime(seconds + offset * 60)
        sign = "+" if offset >= 0 else "-"
        text = time.strftime("%d-%b-%Y %H:%M:%S ", t) + "%s%02d%02d" % (sign, abs(offset) // 60, abs(offset) % 60)
        self.assertEqual(wire.parseDateTime(text.encode()), seconds)
        self.assertEqual(calendar.timegm(t) - offset * 60, seconds)

    @EXAMPLES
    @given(st.one_of(st.binary(max_size=30), st.from_regex(rb"\A[A-Za-z/]{0,5}(&[A-Za-z0-9+,]{0,8}-?)?[A-Za-z]{0,3}\Z")))
    def test_modifiedUtf7Anything(self, data):
        """
        Any octets are a valid folder name (text with no lone surrogate) or
        InvalidName.
        """
        try:
            name = decodeMailbox(data)
        except InvalidName:
            return
        name.encode("utf-8")

    @EXAMPLES
    @given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20))
    def test_modifiedUtf7RoundTrip(self, text):
        """
        Any text encoded as modified UTF-7 decodes back to itself (or is
        refused as a folder name, never with another error).  (Control
        characters are left out: Twisted's encoder writes them as "&-",
        and no folder name may hold one.)
        """
        try:
            encoded = text.encode("imap4-utf-7")
        except UnicodeError:
            return
        try:
            name = decodeMailbox(encoded)
        except InvalidName:
            return
        # (Only an INBOX first component changes: to upper case.)
        self.assertEqual(name.lower(), text.lower())

    @EXAMPLES
    @given(st.text(alphabet="ab/*%.", max_size=12), st.text(alphabet="ab/.", max_size=12))
    def test_patternMatchesLikeRegex(self, pattern, name):
        """
        The LIST matcher agrees with the pattern's definition written as a
        regular expression (on inputs too short for it to backtrack long).
        """
        regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
        self.assertEqual(PatternMatcher(pattern).match(name), re.fullmatch(regex, name, re.S) is not None)


class _Sink:
    """
    Takes literals of up to 50 octets, refuses bigger ones.
    """

    def __init__(self):
        self.commands = []
        self.events = []

    def literalAnnounced(self, parts, size, synchronizing):
        return REFUSE if size > 50 else ACCEPT

    def commandReceived(self, parts):
        self.commands.append([p.data if isinstance(p, Literal) else p for p in parts])

    def lineTooLong(self, start):
        self.events.append(("long", start[:8]))

    def commandDropped(self, parts):
        self.events.append(("dropped", len(parts)))

    def literalTooBigToSkip(self, size):
        self.events.append(("too big", size))


class ReaderProperties(unittest.SynchronousTestCase):
    @EXAMPLES
    @given(
        st.lists(st.one_of(commandText, st.sampled_from([b"a X {3}", b"b Y {2+}", b"ab", b"c {0}", b"d {99+}", b"x" * 120])), max_size=12),
        st.lists(st.integers(0, 400), max_size=6),
    )
    def test_framingIndependentOfCuts(self, lines, cuts):
        """
        The command reader takes any input without an exception and frames
        it the same however it is cut into reads.
        """
        data = b"".join(line + b"\r\n" for line in lines)
        whole = _Sink()
        framer = CommandFramer(whole, 100, skipLimit=1000)
        framer.feed(data)
        pieces = _Sink()
        framer = CommandFramer(pieces, 100, skipLimit=1000)
        last = 0
        for cut in sorted(c for c in cuts if c <= len(data)):
            framer.feed(data[last:cut])
            last = cut
        framer.feed(data[last:])
        self.assertEqual(pieces.commands, whole.commands)
        self.assertEqual(pieces.events, whole.events)


# Whole sessions against a running daemon --------------------------------------

literal = st.binary(max_size=20).map(lambda b: (b"{%d+}\r\n" % len(b)) + b)
argument = st.one_of(
    atomText,
    token,
    literal,
    st.sampled_from([b'"INBOX"', b"Archive", b'"&2AA-"', b"(\\Seen $x)", b'"31-Feb-2020 10:00:00 +0000"', b"(FLAGS)", b"{0+}\r\n"]),
)
verbs = st.sampled_from(
    [b"NOOP", b"CAPABILITY", b"LOGIN", b"AUTHENTICATE", b"ID", b"SELECT", b"EXAMINE", b"CREATE", b"DELETE",
     b"RENAME", b"SUBSCRIBE", b"LIST", b"LSUB", b"STATUS", b"APPEND", b"CHECK", b"UNSELECT", b"EXPUNGE",
     b"SEARCH", b"FETCH", b"STORE", b"COPY", b"MOVE", b"UID FETCH", b"UID SEARCH", b"UID STORE", b"ENABLE",
     b"NAMESPACE", b"BOGUS", b"uid expunge", b"IDLE"]
)
sessionCommand = st.tuples(verbs, st.lists(argument, max_size=6)).map(lambda c: b" ".join([c[0], *c[1]]))


class SessionProperties(IMAPTestCase):
    """
    Any command, before and after login, gets a tagged reply or BYE; the
    daemon logs no failure (trial fails a test that logs one).
    """

    timeout = 600

    @defer.inlineCallbacks
    def test_anyCommandAnswered(self):
        yield self.deliver(sampleMessage("one"), sampleMessage("two"))
        state = {"client": None}

        def client(loggedIn):
            if state["client"] is None:
                state["client"] = self.connect(login=loggedIn)
                if loggedIn:
                    state["client"].command(b"s SELECT INBOX")
            return state["client"]

        def check(command: bytes, loggedIn: bool) -> None:
            c = client(loggedIn)
            c.send(b"t " + command + b"\r\n")
            # A command whose line ends with a literal's size goes on after
            # the literal (RFC 3501 section 4.3): a server rightly waits for
            # the rest, so the client sends it (a size over the limits is
            # refused without it).
            last = re.search(rb"\{(\d{1,4})(\+?)\}$", command)
            pending = int(last.group(1)) if last else None
            if last and last.group(2):
                c.send(b"x" * pending + b"\r\n")
                pending = None
            while True:
                try:
                    line = c.readResponse()
                except (EOFError, OSError):
                    state["client"] = None
                    return
                if line.startswith(b"+ "):
                    # IDLE, AUTHENTICATE or a synchronizing literal: end it.
                    c.send(b"DONE\r\n" if pending is None else b"x" * pending + b"\r\n")
                    pending = None
                    continue
                if line.startswith(b"t "):
                    self.assertNotIn(b"SERVERBUG", line)
                    return
                if line.startswith(b"* BYE"):
                    c.close()
                    state["client"] = None
                    return

        def run():
            for loggedIn in (False, True):
                state["client"] = None
                given(sessionCommand)(settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))(lambda command: check(command, loggedIn)))()
            if state["client"] is not None:
                state["client"].close()

        yield self.inThread(run)
