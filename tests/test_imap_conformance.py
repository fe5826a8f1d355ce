"""
IMAP conformance where Dovecot's imaptest found maild wrong (issue 10):
sections through message/rfc822, MIME parameters, ENVELOPE addresses,
LSUB, atom characters, response text and EXPUNGEISSUED; over real
sockets, and property tests for the header value parsers.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from maild.imap.headervalues import GROUP_END, Address, parseAddressList, parseContentValue
from maild.imap.parser import Atom, BadCommand, tokenize
from tests.support import IMAPTestCase, sampleMessage


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


# A message/rfc822 message whose inner message is not multipart.
RFC822_SIMPLE = crlf(
    """From: user@domain.org
Date: Sat, 24 Mar 2007 23:00:00 +0200
Mime-Version: 1.0
Content-Type: message/rfc822

From: sub@domain.org
Date: Sun, 12 Aug 2012 12:34:56 +0300
Subject: submsg

Hello world
"""
)

# A message/rfc822 message holding a digest, whose parts are messages.
RFC822_DIGEST = crlf(
    """From: user@domain.org
Mime-Version: 1.0
Content-Type: message/rfc822

From: sub@domain.org
Subject: submsg
Content-Type: multipart/digest; boundary="foo"

prologue

--foo

From: m1@example.com
Subject: m1

m1 body

--foo
X-Mime: m2 header

From: m2@example.com
Subject: m2

m2 body

--foo--
"""
)

# A message/rfc822 holding a message/rfc822 holding a text message.
RFC822_TWICE = crlf(
    """From: user@domain.org
Mime-Version: 1.0
Content-Type: message/rfc822

From: user2@domain.org
Mime-Version: 1.0
Content-Type: message/rfc822

From: sub@domain.org
Subject: submsg

Hello world
"""
)


class SectionTests(IMAPTestCase):
    """
    RFC 3501 section 6.4.5: the part numbers of a message/rfc822 part are
    those of the message it encapsulates.
    """

    def fetchAll(self, sections: list[bytes]):
        def run(client):
            return [client.command(b"f FETCH 1 (BODY.PEEK[%b])" % s)[0][0] for s in sections]

        return self.session(run, select=b"INBOX")

    def content(self, response: bytes) -> bytes:
        """
        The octets of the one section in a FETCH response.
        """
        m = re.match(rb"\* 1 FETCH \(BODY\[[^\]]*\] (?:\{(\d+)\}\r\n|\")(.*)\)\Z", response, re.S)
        assert m is not None, response
        data = m.group(2)
        return data[: int(m.group(1))] if m.group(1) else data[:-1]

    @defer.inlineCallbacks
    def test_innerSinglePart(self):
        """
        In a message whose body is a message/rfc822 holding a text message,
        BODY[1] is that whole message, BODY[1.1] its body, and 1.HEADER,
        1.TEXT and 1.1.MIME its header, text and header again.
        """
        yield self.deliver(RFC822_SIMPLE)
        got = yield self.fetchAll([b"1", b"1.1", b"1.HEADER", b"1.TEXT", b"1.1.MIME"])
        inner = RFC822_SIMPLE.split(b"\r\n\r\n", 1)[1]
        innerHeader, innerBody = inner.split(b"\r\n\r\n", 1)
        self.assertEqual(
            [self.content(r) for r in got],
            [inner, innerBody, innerHeader + b"\r\n\r\n", innerBody, innerHeader + b"\r\n\r\n"],
        )

    @defer.inlineCallbacks
    def test_innerDigest(self):
        """
        When the encapsulated message is a digest, 1.1 and 1.2 are its
        parts (messages themselves): .MIME is a part's own header (empty
        for the first), .HEADER and .TEXT those of the message in it.
        """
        yield self.deliver(RFC822_DIGEST)
        got = yield self.fetchAll(
            [b"1.1", b"1.1.MIME", b"1.1.HEADER", b"1.1.TEXT", b"1.2", b"1.2.MIME", b"1.2.HEADER", b"1.2.TEXT"]
        )
        self.assertEqual(
            [self.content(r) for r in got],
            [
                b"From: m1@example.com\r\nSubject: m1\r\n\r\nm1 body\r\n",
                b"\r\n",
                b"From: m1@example.com\r\nSubject: m1\r\n\r\n",
                b"m1 body\r\n",
                b"From: m2@example.com\r\nSubject: m2\r\n\r\nm2 body\r\n",
                b"X-Mime: m2 header\r\n\r\n",
                b"From: m2@example.com\r\nSubject: m2\r\n\r\n",
                b"m2 body\r\n",
            ],
        )

    @defer.inlineCallbacks
    def test_nestedTwice(self):
        """
        A message/rfc822 inside a message/rfc822: 1.1 is the innermost
        message, 1.1.1 its text, 1.HEADER the middle header, 1.1.HEADER
        the innermost one; there is no 1.2.
        """
        yield self.deliver(RFC822_TWICE)
        got = yield self.fetchAll([b"1.1", b"1.1.1", b"1.HEADER", b"1.1.HEADER", b"1.2"])
        self.assertEqual(self.content(got[0]), b"From: sub@domain.org\r\nSubject: submsg\r\n\r\nHello world\r\n")
        self.assertEqual(self.content(got[1]), b"Hello world\r\n")
        self.assertEqual(self.content(got[2]), b"From: user2@domain.org\r\nMime-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n")
        self.assertEqual(self.content(got[3]), b"From: sub@domain.org\r\nSubject: submsg\r\n\r\n")
        self.assertEqual(got[4], b"* 1 FETCH (BODY[1.2] NIL)")


# Parameters folded inside a quoted string, continued and encoded.
PARAMETERS = crlf(
    """From: user@domain.org
Mime-Version: 1.0
Content-Type: multipart/mixed; boundary="foo
 bar"

--foo bar
Content-Type: multipart/alternative;
 boundary*0="in";
 boundary*1=ner

--inner
Content-Type: text/plain; charset*=utf-8''%E2%82%AC
Content-Disposition: attachment; filename*=UTF-8''%E2%82%AC.txt;
 size=3

hi
--inner--

--foo bar--
"""
)


class ParameterTests(IMAPTestCase):
    """
    MIME parameters (RFC 2045 section 5.1) folded across lines, continued
    and encoded (RFC 2231).
    """

    @defer.inlineCallbacks
    def test_foldedContinuedAndEncoded(self):
        """
        A boundary folded inside its quotes and one continued with
        C{boundary*0}/C{boundary*1} both split their multiparts; encoded
        parameters keep their C{name*} and 7-bit value, as Dovecot serves
        them.
        """
        yield self.deliver(PARAMETERS)

        def run(client):
            return (
                client.command(b"f FETCH 1 (BODYSTRUCTURE)")[0],
                client.command(b"g FETCH 1 (BODY.PEEK[1.1])")[0],
            )

        structure, part = yield self.session(run, select=b"INBOX")
        self.assertEqual(
            structure,
            [
                b'* 1 FETCH (BODYSTRUCTURE ((("text" "plain" ("charset*" "utf-8\'\'%E2%82%AC")'
                b' NIL NIL "7bit" 2 0 NIL ("attachment" ("filename*" "UTF-8\'\'%E2%82%AC.txt" "size" "3")) NIL NIL)'
                b' "alternative" ("boundary" "inner") NIL NIL NIL) "mixed" ("boundary" "foo bar") NIL NIL NIL))'
            ],
        )
        self.assertEqual(part, [b'* 1 FETCH (BODY[1.1] {2}\r\nhi)'])


class ParameterParserTests(unittest.TestCase):
    """
    L{parseContentValue} alone.
    """

    def test_continuationsInNumberOrder(self):
        """
        Sections are joined by their numbers, not their order in the field;
        L{ContentValue.get} decodes an encoded value to its octets.
        """
        value = parseContentValue(b"application/x; name*1*=%20b; name*0*=utf-8'en'a; other=\"q\\\"\"", typed=True)
        self.assertEqual(value.value, b"application/x")
        self.assertEqual(value.params, ((b"name*", b"utf-8'en'a%20b"), (b"other", b'q"')))
        self.assertEqual(value.get(b"name"), b"a b")

    def test_unreadableType(self):
        """
        A type without a subtype is not a type; comments are skipped.
        """
        self.assertIsNone(parseContentValue(b"text; charset=x", typed=True).value)
        self.assertEqual(parseContentValue(b"(c) Text (c) / (c) HTML (c)", typed=True).value, b"text/html")

    @given(st.binary(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_anyInput(self, value):
        """
        Any octets give a value (perhaps empty), never an exception.
        """
        for typed in (True, False):
            result = parseContentValue(value, typed)
            for key, _ in result.params:
                result.get(key)


ENVELOPES = crlf(
    """From: user@domain (Real Name)
To: group: g1@d1.org, g2@d2.org;, group2: g3@d3.org;
Cc: group:;, group2: (foo) ;
Bcc: <@route1,@route2:user@domain>
Sender: <user-from (comment)@ (comment) domain.org>

body
"""
)


class EnvelopeTests(IMAPTestCase):
    """
    ENVELOPE addresses (RFC 3501 section 7.4.2) from RFC 5322 address
    lists.
    """

    @defer.inlineCallbacks
    def test_groupsRoutesAndComments(self):
        """
        Groups start with (NIL NIL name NIL) and end with four NILs, empty
        ones too; a source route is the adl; comments are no part of an
        address, and one after an address without a name names it.
        """
        yield self.deliver(ENVELOPES)
        untagged, _ = yield self.session(lambda c: c.command(b"f FETCH 1 (ENVELOPE)"), select=b"INBOX")
        self.assertEqual(
            untagged,
            [
                b'* 1 FETCH (ENVELOPE (NIL NIL (("Real Name" NIL "user" "domain"))'
                b' ((NIL NIL "user-from" "domain.org")) (("Real Name" NIL "user" "domain"))'
                b' ((NIL NIL "group" NIL) (NIL NIL "g1" "d1.org") (NIL NIL "g2" "d2.org") (NIL NIL NIL NIL)'
                b' (NIL NIL "group2" NIL) (NIL NIL "g3" "d3.org") (NIL NIL NIL NIL))'
                b' ((NIL NIL "group" NIL) (NIL NIL NIL NIL) (NIL NIL "group2" NIL) (NIL NIL NIL NIL))'
                b' ((NIL "@route1,@route2" "user" "domain")) NIL NIL))'
            ],
        )

    @defer.inlineCallbacks
    def test_searchIgnoresComments(self):
        """
        SEARCH FROM finds an address written with comments inside it.
        """
        yield self.deliver(
            crlf("From: <user-from (comment)@ (comment) domain.org>\n\nx\n"),
            crlf("From: other@domain.org\n\ny\n"),
            crlf("From: RealFrom <user-from@domain.org>\n\nz\n"),
        )
        untagged, _ = yield self.session(lambda c: c.command(b"s SEARCH FROM user-from@domain.org"), select=b"INBOX")
        self.assertEqual(untagged, [b"* SEARCH 1 3"])


class AddressParserTests(unittest.TestCase):
    """
    L{parseAddressList} alone.
    """

    def test_quotedNameWithComma(self):
        """
        A comma inside a quoted display name does not split the list.
        """
        self.assertEqual(
            parseAddressList(b'"Doe, John" <j@x.org>, k@y.org'),
            [Address(b"Doe, John", None, b"j", b"x.org"), Address(None, None, b"k", b"y.org")],
        )

    def test_deepComment(self):
        """
        Thousands of nested comments cost one pass, not a recursion each.
        """
        self.assertEqual(parseAddressList(b"(" * 5000 + b"x" + b")" * 5000 + b" a@b"), [Address(None, None, b"a", b"b")])

    def test_missingParts(self):
        """
        A mailbox without a host is not mistaken for a group's start: the
        missing part is named as Dovecot names it.
        """
        self.assertEqual(
            parseAddressList(b"justuser, Name <>"),
            [Address(None, None, b"justuser", b"MISSING_DOMAIN"), Address(b"Name", None, b"MISSING_MAILBOX", b"MISSING_DOMAIN")],
        )

    def test_unclosedGroup(self):
        """
        A group that never ends is ended for the client.
        """
        self.assertEqual(
            parseAddressList(b"g: a@b"), [Address(None, None, b"g", None), Address(None, None, b"a", b"b"), GROUP_END]
        )

    @given(
        st.lists(
            st.tuples(
                st.from_regex(r"[A-Za-z][A-Za-z ]{0,10}[A-Za-z]", fullmatch=True) | st.none(),
                st.from_regex(r"[a-z0-9][a-z0-9.]{0,8}[a-z0-9]", fullmatch=True),
                st.from_regex(r"[a-z0-9]{1,8}\.[a-z]{2,4}", fullmatch=True),
            ),
            min_size=1,
            max_size=5,
        )
    )
    @settings(max_examples=200, deadline=None)
    def test_roundTrip(self, addresses):
        """
        A list written in the usual forms reads back as written.
        """
        written = ", ".join(f'"{n}" <{m}@{h}>' if n else f"{m}@{h}" for n, m, h in addresses)
        self.assertEqual(
            parseAddressList(written.encode()),
            [Address(n.encode() if n else None, None, m.encode(), h.encode()) for n, m, h in addresses],
        )

    @given(st.binary(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_anyInput(self, value):
        """
        Any octets give a list (perhaps empty) whose groups are balanced:
        only a group's start has a mailbox and no host.
        """
        depth = 0
        for address in parseAddressList(value):
            if address.host is None and address.mailbox is not None:
                depth += 1
            elif address == GROUP_END:
                depth -= 1
            self.assertIn(depth, (0, 1))
        self.assertEqual(depth, 0)


class MailboxListTests(IMAPTestCase):
    """
    LSUB and names with RFC 3501 section 9's atom characters.
    """

    @defer.inlineCallbacks
    def test_lsubParentsOfSubscribedChildren(self):
        """
        RFC 3501 section 6.3.9: when "%" stops above a subscribed name,
        LSUB returns its unsubscribed (or missing) parent as \\Noselect;
        "*" returns only what is subscribed.
        """

        def run(client):
            for line in (
                b"c1 CREATE box/test",
                b"c2 CREATE box/test2/test",
                b"c3 CREATE box/test3/test3",
                b"c4 SUBSCRIBE box/test",
                b"c5 SUBSCRIBE box/test2/test",
                b"c6 SUBSCRIBE box/test3/test3",
                b"c7 SUBSCRIBE box/gone/child",
            ):
                client.command(line)
            return client.command(b'l1 LSUB "" box/%')[0], client.command(b'l2 LSUB "" *test')[0]

        percent, star = yield self.session(run)
        self.assertEqual(
            sorted(line.split(b") ", 1)[0] + b") " + line.rsplit(b" ", 1)[1] for line in percent),
            [
                b'* LSUB (\\HasNoChildren) "box/test"',
                b'* LSUB (\\Noselect) "box/gone"',
                b'* LSUB (\\Noselect) "box/test2"',
                b'* LSUB (\\Noselect) "box/test3"',
            ],
        )
        self.assertEqual(sorted(line.rsplit(b" ", 1)[1] for line in star), [b'"box/test"', b'"box/test2/test"'])

    @defer.inlineCallbacks
    def test_bracketsInNames(self):
        """
        "[" is an ATOM-CHAR and "]" an ASTRING-CHAR: a mailbox name made of
        every atom character is a name (SELECT: no such mailbox, not BAD),
        LIST with it is answered, and a folder named with brackets can be
        created and selected; "[" still opens a section after BODY.
        """
        atoms = b"!#$&'+,-.0123456789:;<=>?@^_`|[}"

        def run(client):
            client.command(b"s SELECT INBOX")
            section = client.command(b"e FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject)])")
            return {
                "section": section,
                "select": client.command(b"a SELECT " + atoms)[1],
                "list": client.command(b'b LIST "" ' + atoms + b"%*")[1],
                "create": client.command(b"c CREATE x[1]y]")[1],
                "selectBrackets": client.command(b"d SELECT x[1]y]")[1],
            }

        yield self.deliver(sampleMessage("brackets"))
        out = yield self.session(run)
        self.assertTrue(out["select"].startswith(b"a NO "), out["select"])
        self.assertEqual(out["list"], b"b OK LIST completed")
        self.assertEqual(out["create"], b"c OK CREATE completed")
        self.assertTrue(out["selectBrackets"].startswith(b"d OK "), out["selectBrackets"])
        self.assertEqual(
            out["section"],
            ([b'* 1 FETCH (BODY[HEADER.FIELDS (Subject)] {21}\r\nSubject: brackets\r\n\r\n)'], b"e OK FETCH completed"),
        )


class BracketTokenTests(unittest.TestCase):
    """
    The tokenizer's reading of "[" and "]" (RFC 3501 section 9).
    """

    def test_sectionsOnlyAfterBodyOrBinary(self):
        """
        After BODY, BODY.PEEK, BINARY... "[" opens a section that may hold
        spaces and parentheses; elsewhere both brackets are word
        characters.
        """
        self.assertEqual(
            tokenize([b"a[b c]d BODY.PEEK[HEADER.FIELDS (A B)]<0.5> binary[1] x]"], 8),
            [Atom(b"a[b"), Atom(b"c]d"), Atom(b"BODY.PEEK[HEADER.FIELDS (A B)]<0.5>"), Atom(b"binary[1]"), Atom(b"x]")],
        )
        self.assertRaises(BadCommand, tokenize, [b"BODY[HEADER"], 8)

    def test_manyBracketsLinear(self):
        """
        A word of 200,000 "[" is one atom, read in one pass.
        """
        self.assertEqual(tokenize([b"x" + b"[" * 200000], 8), [Atom(b"x" + b"[" * 200000)])

    @given(st.binary(max_size=200))
    @settings(max_examples=300, deadline=None)
    def test_anyLine(self, line):
        """
        Any line gives tokens or BadCommand, never another exception.
        """
        try:
            tokenize([line.replace(b"{", b"(")], 8)
        except BadCommand:
            pass


class ResponseTextTests(IMAPTestCase):
    """
    RFC 3501 section 9: resp-text = ["[" resp-text-code "]" SP] text.
    """

    @defer.inlineCallbacks
    def test_everyCodeHasText(self):
        """
        Every response with a code, untagged or tagged, has text after it:
        SELECT's, APPEND's, COPY's and MOVE's (whose COPYUID is untagged).
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"))

        def run(client):
            lines = []
            for line in (b"s SELECT INBOX", b"c COPY 1 Archive", b"m MOVE 1 Archive", b"x EXAMINE Archive"):
                untagged, tagged = client.command(line)
                lines += untagged + [tagged]
            return lines

        lines = yield self.session(run)
        coded = [line for line in lines if re.match(rb"(\*|\w+) (OK|NO|BAD|BYE) \[", line)]
        self.assertIn(True, [b"[COPYUID " in line and line.startswith(b"* OK") for line in coded])
        for line in coded:
            self.assertRegex(line, rb"^(\*|\w+) (OK|NO|BAD|BYE) \[[^\]]*\] \S", line)


class ExpungeIssuedTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_noLongerExist(self):
        """
        FETCH and STORE of messages another session expunged get NO
        [EXPUNGEISSUED] saying that they "no longer exist" (RFC 2180
        section 4.1.2's words, which clients match); a .SILENT STORE that
        changed every message still there completed (section 4.2.1).
        """
        yield self.deliver(sampleMessage("one"), sampleMessage("two"))

        def run():
            a, b = self.connect(), self.connect()
            try:
                a.command(b"a1 SELECT INBOX")
                b.command(b"b1 SELECT INBOX")
                a.command(b"a2 STORE 1 +FLAGS.SILENT (\\Deleted)")
                a.command(b"a3 EXPUNGE")
                return (
                    b.command(b"b2 FETCH 1 (FLAGS)")[1],
                    b.command(b"b3 STORE 1 +FLAGS (\\Seen)")[1],
                    b.command(b"b4 STORE 1:2 +FLAGS.SILENT (\\Seen)")[1],
                )
            finally:
                a.close()
                b.close()

        fetch, store, silent = yield self.inThread(run)
        self.assertEqual(fetch, b"b2 NO [EXPUNGEISSUED] Some of the requested messages no longer exist: they have been deleted")
        self.assertEqual(store, b"b3 NO [EXPUNGEISSUED] Some of the requested messages no longer exist: they have been deleted")
        self.assertEqual(silent, b"b4 OK STORE completed")
