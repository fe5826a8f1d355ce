"""
The IMAP pieces alone: tokens, sequence sets, framing, sections and
structures over the shared corpus, and the FETCH fast paths against the
general path.
"""

from __future__ import annotations

import email
import os
import mailbox
import subprocess
import sys
from email.policy import compat32
from pathlib import Path

from twisted.trial import unittest

from maild.imap import wire
from maild.imap.fetch import FetchRequest, MessageData, parseItems, render, sectionContent
from maild.imap.framing import ACCEPT, CommandFramer
from maild.imap.mailbox import SelectedFolder
from maild.imap.mime import envelope
from maild.imap.parser import Atom, BadCommand, Literal, Quoted, SequenceSet, formatUidSet, parseSequenceSet, tokenize
from maild.store import MailStore
from maild.store import maildir

# A copy of the project's shared corpus generator (../shared/corpus), kept
# here so that the tests need nothing outside the checkout.
CORPUS = Path(__file__).resolve().parent / "corpus" / "gen_mbox.py"


def corpusMessages(directory: Path, count: int) -> list[bytes]:
    """
    C{count} messages from the shared generator, in CRLF form.
    """
    out = directory / "corpus.mbox"
    subprocess.run([sys.executable, str(CORPUS), str(out), str(count)], check=True, capture_output=True)
    box = mailbox.mbox(str(out))
    return [box.get_bytes(key).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for key in box.keys()]


class TokenTests(unittest.SynchronousTestCase):
    def test_tokens(self):
        """
        Atoms, quoted strings with escapes, nested lists, literals and
        sections holding spaces and parentheses become tokens.
        """
        tokens = tokenize(
            [b'1:3 (UID BODY.PEEK[HEADER.FIELDS (From To)]<0.10>) "a \\"b\\" \\\\c" {3}', Literal(b"x y"), b" NIL"],
            16,
        )
        self.assertEqual(tokens[0], b"1:3")
        self.assertIsInstance(tokens[0], Atom)
        self.assertEqual(tokens[1], [b"UID", b"BODY.PEEK[HEADER.FIELDS (From To)]<0.10>"])
        self.assertEqual(tokens[2], b'a "b" \\c')
        self.assertIsInstance(tokens[2], Quoted)
        self.assertEqual(tokens[3].data, b"x y")
        self.assertEqual(tokens[4], b"NIL")

    def test_badTokens(self):
        """
        Unbalanced parentheses or quotes, bad escapes and lists nested
        deeper than the cap are BadCommand.
        """
        for line in (b"(a", b"a)", b'"abc', b'"a\\b"', b"BODY[HEADER", b"(" * 5 + b")" * 5):
            self.assertRaises(BadCommand, tokenize, [line], 4)
        self.assertEqual(tokenize([b"(" * 4 + b")" * 4], 4), [[[[[]]]]])

    def test_sequenceSets(self):
        """
        Sets parse linearly (4,000 elements), `*` is the highest UID so
        `N:*` above it names the last message, reversed ranges are fine,
        sequence numbers beyond the mailbox are refused.
        """
        big = b",".join(b"%d" % (i * 2 + 1) for i in range(4000))
        self.assertEqual(len(parseSequenceSet(big)), 4000)
        uids = [3, 5, 9]
        self.assertEqual(SequenceSet(((20, 0),), True).positions(uids), [(2, 3)])
        self.assertEqual(SequenceSet(((9, 4),), True).positions(uids), [(1, 3)])
        self.assertEqual(SequenceSet(((1, 3), (6, 8)), True).positions(uids), [(0, 1)])
        self.assertEqual(SequenceSet(((2, 0), (1, 1)), False).positions(uids), [(0, 3)])
        self.assertRaises(BadCommand, SequenceSet(((4, 4),), False).positions, uids)
        self.assertEqual(SequenceSet(((1, 0),), True).positions([]), [])
        for bad in (b"0", b"1:0", b"a", b"1,,2", b"", b"1:2:3", b"99999999999"):
            self.assertRaises(BadCommand, parseSequenceSet, bad)
        self.assertEqual(formatUidSet([1, 2, 3, 7, 9, 10]), b"1:3,7,9:10")
        self.assertEqual(formatUidSet([5, 4]), b"5,4")


class _Sink:
    def __init__(self):
        self.commands = []

    def literalAnnounced(self, parts, size, synchronizing):
        return ACCEPT

    def commandReceived(self, parts):
        self.commands.append([p.data if isinstance(p, Literal) else p for p in parts])

    def lineTooLong(self, start):
        self.commands.append(["too long", start[:10]])

    def commandDropped(self, parts):
        pass

    def literalTooBigToSkip(self, size):
        self.commands.append(["too big to skip", size])


class FramingTests(unittest.SynchronousTestCase):
    def test_anyCut(self):
        """
        Commands with literals frame the same however the bytes are cut.
        """
        wire_ = b"a LOGIN {5}\r\nalice {3+}\r\npw!\r\nb NOOP\r\nc X {0}\r\n\r\n"
        expected = [[b"a LOGIN {5}", b"alice", b" {3+}", b"pw!", b""], [b"b NOOP"], [b"c X {0}", b"", b""]]
        for cut in range(len(wire_)):
            sink = _Sink()
            framer = CommandFramer(sink, 100)
            framer.feed(wire_[:cut])
            framer.feed(wire_[cut:])
            self.assertEqual(sink.commands, expected, cut)

    def test_longLineDropped(self):
        """
        A line over the limit is dropped whole (fed in pieces), reported
        once, and the next command is framed normally.
        """
        sink = _Sink()
        framer = CommandFramer(sink, 50)
        for _ in range(10):
            framer.feed(b"x" * 40)
        framer.feed(b"\r\nb NOOP\r\n")
        self.assertEqual(sink.commands, [["too long", b"x" * 10], [b"b NOOP"]])
        self.assertEqual(framer.pending, 0)


class CorpusTests(unittest.TestCase):
    """
    Over the shared corpus, in a real folder.
    """

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.raw = corpusMessages(self.dir, 60)
        store = MailStore(self.dir)
        mailbox_ = store.mailbox("alice@localhost")
        mailbox_.ensureExists()
        root = mailbox_.folderPath("INBOX")
        for n, message in enumerate(self.raw):
            stored = message.replace(b"\r\n", b"\n")
            base = maildir.newBaseName(len(stored), len(message))
            info = "S" if n % 2 else "FT" if n % 5 == 0 else ""
            (root / "cur" / maildir.curFileName(base, maildir.flagBits(info)[0])).write_bytes(stored)
        self.folder = mailbox_.folder("INBOX")
        self.view = SelectedFolder(self.folder, False, lambda: None)

    def fetch(self, spec: bytes, uid: bool = False, fast: bool = True) -> bytes:
        tokens = tokenize([spec], 16)
        request = FetchRequest(self.view, [(0, len(self.raw))], parseItems(tokens[0]), uid)
        chunks = request.responses() if fast else request._general()
        return b"".join(chunks)

    def test_fastPathsMatchGeneralPath(self):
        """
        The FLAGS/UID and whole-body fast paths give exactly the octets of
        the general path.
        """
        for spec in (
            b"(UID FLAGS)",
            b"(FLAGS UID)",
            b"FLAGS",
            b"UID",
            b"(UID RFC822.SIZE BODY.PEEK[])",
            b"(BODY[] FLAGS)",
            b"RFC822",
            b"(RFC822.SIZE FLAGS RFC822 UID)",
        ):
            for uid in (False, True):
                fast = self.fetch(spec, uid)
                self.assertEqual(fast, self.fetch(spec, uid, fast=False), spec)
                self.assertEqual(fast.count(b" FETCH ("), len(self.raw))

    def test_bodiesExact(self):
        """
        BODY[] is the message, BODY[HEADER] + BODY[TEXT] make it up again,
        a partial is the slice, RFC822.SIZE is its length.
        """
        for i, raw in enumerate(self.raw):
            message = MessageData(self.folder, i)
            self.assertEqual(message.data, raw)
            header, text = (sectionContent(parseItems(Atom(b"BODY[" + s + b"]"))[0], message) for s in (b"HEADER", b"TEXT"))
            self.assertEqual(header + text, raw)
            self.assertEqual(sectionContent(parseItems(Atom(b"BODY[]<5.20>"))[0], message), raw[5:25])
            self.assertEqual(self.folder.sizes(i)[1], len(raw))

    def test_headerFields(self):
        """
        HEADER.FIELDS gives the named fields (any case) in message order,
        continuation lines included, then a blank line; .NOT the others.
        """
        for i, raw in enumerate(self.raw):
            message = MessageData(self.folder, i)
            item = parseItems(Atom(b"BODY.PEEK[HEADER.FIELDS (subject FROM)]"))[0]
            chosen = sectionContent(item, message)
            parsed = email.message_from_bytes(raw, policy=compat32)
            self.assertTrue(chosen.endswith(b"\r\n\r\n"))
            self.assertEqual(chosen.lower().count(b"\r\nsubject:") + chosen.lower().startswith(b"subject:"), 1 if parsed["subject"] else 0)
            rest = sectionContent(parseItems(Atom(b"BODY.PEEK[HEADER.FIELDS.NOT (subject FROM)]"))[0], message)
            self.assertEqual(len(chosen) + len(rest) - 2, len(sectionContent(parseItems(Atom(b"BODY[HEADER]"))[0], message)))
            self.assertEqual(item.label, b"BODY[HEADER.FIELDS (subject FROM)]")

    def test_structureMatchesEmailPackage(self):
        """
        BODYSTRUCTURE, ENVELOPE and BODY[n] agree with Python's email
        package on every corpus message: the parts, their types and their
        decoded contents.
        """
        for i, raw in enumerate(self.raw):
            message = MessageData(self.folder, i)
            parsed = email.message_from_bytes(raw, policy=compat32)
            structure = message.part.bodyStructure(True)
            rendered = wire.collapse(structure)
            self.assertEqual(rendered.count(b"("), rendered.count(b")"))
            env = envelope(message.part)
            self.assertEqual(env[9], parsed["message-id"].encode())
            if parsed.is_multipart():
                subparts = parsed.get_payload()
                self.assertEqual(len(structure[0]), len(subparts))
                self.assertEqual(structure[1], parsed.get_content_subtype())
                for n, sub in enumerate(subparts, 1):
                    item = parseItems(Atom(b"BODY[%d]" % n))[0]
                    body = sectionContent(item, message)
                    if not sub.is_multipart():
                        expected = sub.get_payload(decode=True)
                        encoding = (sub["content-transfer-encoding"] or "7bit").lower()
                        decoded = email.message_from_bytes(b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + body, policy=compat32).get_payload(decode=True)
                        self.assertEqual(decoded.replace(b"\r\n", b"\n").rstrip(), expected.replace(b"\r\n", b"\n").rstrip())
            else:
                self.assertEqual(structure[:2], parsed.get_content_type().split("/"))
                self.assertEqual(structure[6], len(message.part.body))

    def test_renderEverything(self):
        """
        Every attribute renders for every corpus message; a missing part is
        NIL.
        """
        everything = self.fetch(b"(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODY BODYSTRUCTURE RFC822.HEADER RFC822.TEXT BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[9])")
        self.assertEqual(everything.count(b" FETCH ("), len(self.raw))
        self.assertEqual(everything.count(b"BODY[9] NIL"), len(self.raw))
        message = MessageData(self.folder, 0)
        self.assertTrue(render(parseItems(Atom(b"ENVELOPE"))[0], self.view, message).startswith(b"ENVELOPE ("))


class MovedWhileFetchedTests(unittest.SynchronousTestCase):
    """
    Another process (a second worker) renamed a message's file and
    expunged the message before it while this one's index had not seen
    either yet: reading the renamed file lists the folder again, which
    moves every index after the expunged message.  FETCH answers each
    message with its own UID, flags and octets all the same, and what it
    caches under a UID is that UID's message (two workers on one INBOX
    served a message's ENVELOPE and size under its neighbour's UID).
    """

    def setUp(self):
        store = MailStore(Path(self.mktemp()))
        box = store.mailbox("alice@localhost")
        box.ensureExists()
        self.root = box.folderPath("INBOX")
        self.names = []
        for n, info in enumerate(("", "S", "F"), 1):
            data = b"Message-ID: <m%d@example.org>\nSubject: %d\n\nbody %d\n" % (n, n, n)
            base = maildir.newBaseName(len(data), len(data) + 3)
            name = maildir.curFileName(base, maildir.flagBits(info)[0])
            (self.root / "cur" / name).write_bytes(data)
            self.names.append(name)
        self.folder = box.folder("INBOX")
        self.view = SelectedFolder(self.folder, False, lambda: None)
        # The other process: UID 1 expunged, UID 2 answered.
        os.unlink(self.root / "cur" / self.names[0])
        os.rename(self.root / "cur" / self.names[1], self.root / "cur" / (self.names[1][:-1] + "RS"))

    def fetch(self, spec: bytes, fast: bool) -> bytes:
        request = FetchRequest(self.view, [(1, 3)], parseItems(tokenize([spec], 16)[0]), False)
        return b"".join(request.responses() if fast else request._general())

    def test_generalPath(self):
        """
        Attributes rendered after the read that moved the message (UID,
        FLAGS) are its own, and so is the ENVELOPE cached under its UID.
        """
        said = self.fetch(b"(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)] UID FLAGS)", fast=False)
        self.assertEqual(
            said.split(b"\r\n")[:-1],
            [
                b"* 2 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {32}",
                b"Message-ID: <m2@example.org>",
                b"",
                b" UID 2 FLAGS (\\Answered \\Seen))",
                b"* 3 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {32}",
                b"Message-ID: <m3@example.org>",
                b"",
                b" UID 3 FLAGS (\\Flagged))",
            ],
        )
        envelopes = self.fetch(b"(ENVELOPE UID)", fast=False)
        self.assertIn(b"<m2@example.org>\") UID 2)", envelopes)
        self.assertIn(b"<m3@example.org>\") UID 3)", envelopes)

    def test_bodyFastPath(self):
        """
        The whole-body fast path, which reads first, gives the UID and
        FLAGS of the message it read.
        """
        said = self.fetch(b"(BODY.PEEK[] UID FLAGS)", fast=True)
        self.assertIn(b"Message-ID: <m2@example.org>\r\nSubject: 2\r\n\r\nbody 2\r\n UID 2 FLAGS (\\Answered \\Seen))", said)
        self.assertIn(b"Message-ID: <m3@example.org>\r\nSubject: 3\r\n\r\nbody 3\r\n UID 3 FLAGS (\\Flagged))", said)
