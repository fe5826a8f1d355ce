"""
The line reader under every protocol (maild.lines).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from maild.lines import LineReader, Overlong


def readAll(reader: LineReader) -> list:
    out = []
    while True:
        line = reader.readLine()
        if line is None:
            return out
        out.append(line)


def expectedLines(data: bytes, limit: int) -> list:
    """
    What the reader must give for C{data}, worked out the slow, obvious way.
    """
    out = []
    for raw in data.split(b"\n")[:-1]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        out.append(("long", line[:64], line[-32:]) if len(line) > limit else line)
    return out


def normal(items: list) -> list:
    return [("long", i.start, i.tail) if isinstance(i, Overlong) else i for i in items]


class LineReaderTests(unittest.TestCase):
    def test_lines(self):
        """
        Lines end with CR LF or a bare LF; a partial line waits.
        """
        reader = LineReader(100)
        reader.feed(b"EHLO a\r\nNOOP\nQU")
        self.assertEqual(readAll(reader), [b"EHLO a", b"NOOP"])
        self.assertEqual(reader.pending, 2)
        reader.feed(b"IT\r\n")
        self.assertEqual(readAll(reader), [b"QUIT"])
        self.assertEqual(reader.pending, 0)

    def test_crlfSplitAcrossFeeds(self):
        """
        A CR received without its LF is not part of the line.
        """
        reader = LineReader(4)
        reader.feed(b"abcd\r")
        self.assertIsNone(reader.readLine())
        reader.feed(b"\n")
        self.assertEqual(reader.readLine(), b"abcd")

    def test_overlongSkipped(self):
        """
        A line over the limit is dropped as it comes (the reader never
        holds much more than the limit of it) and reported once, with its
        start and end, when its end arrives; the next line is read normally.
        """
        reader = LineReader(10)
        reader.feed(b"TAG " + b"x" * 1000)
        self.assertIsNone(reader.readLine())
        self.assertLessEqual(reader.pending, 11)
        reader.feed(b"y" * 1000)
        self.assertIsNone(reader.readLine())
        self.assertLessEqual(reader.pending, 11)
        reader.feed(b" {5+}\r\nNOOP\r\n")
        line = reader.readLine()
        self.assertEqual(line, Overlong(b"TAG " + b"x" * 60, (b"y" * 1000 + b" {5+}")[-32:]))
        self.assertEqual(reader.readLine(), b"NOOP")

    def test_literal(self):
        """
        An announced count of octets is read as it comes, whatever it holds
        (line ends included), and lines follow it.
        """
        reader = LineReader(100)
        reader.feed(b"A APPEND x {10}\r\nab\r\n")
        self.assertEqual(reader.readLine(), b"A APPEND x {10}")
        self.assertEqual(reader.read(10), b"ab\r\n")
        self.assertEqual(reader.read(6), b"")
        reader.feed(b"cdefgh\r\nB NOOP\r\n")
        self.assertEqual(reader.read(6), b"cdefgh")
        self.assertEqual(reader.readLine(), b"")
        self.assertEqual(reader.readLine(), b"B NOOP")

    def test_peekAndSkip(self):
        """
        A decoder can look at everything waiting and take part of it.
        """
        reader = LineReader(100)
        reader.feed(b"line\r\n.\r\nQUIT\r\n")
        self.assertEqual(reader.peek(), b"line\r\n.\r\nQUIT\r\n")
        reader.skip(9)
        self.assertEqual(reader.readLine(), b"QUIT")
        self.assertRaises(ValueError, reader.skip, 1)

    def test_discard(self):
        """
        After STARTTLS, what was sent behind the command is forgotten, and
        so is a line being dropped.
        """
        reader = LineReader(4)
        reader.feed(b"STARTTLS\r\nMAIL FROM:<evil>\r\nxxxxxxxxxxxxxx")
        self.assertEqual(reader.readLine(), Overlong(b"STARTTLS", b"STARTTLS"))
        reader.discard()
        self.assertEqual(reader.pending, 0)
        reader.feed(b"EHLO\r\n")
        self.assertEqual(reader.readLine(), b"EHLO")

    def test_full(self):
        """
        The reader says when more than the hold limit is waiting.
        """
        reader = LineReader(100, holdLimit=20)
        reader.feed(b"NOOP\r\n" * 3)
        self.assertFalse(reader.full)
        reader.feed(b"NOOP\r\n" * 2)
        self.assertTrue(reader.full)
        readAll(reader)
        self.assertFalse(reader.full)

    def test_manyLinesLinear(self):
        """
        Reading many pipelined lines does not copy the rest of the input per
        line: 200,000 lines in one feed are read in well under a second of
        work (a per-line copy would move about 240 GB).
        """
        reader = LineReader(100)
        reader.feed(b"EHLO x\r\n" * 200_000)
        self.assertEqual(len(readAll(reader)), 200_000)


lineBytes = st.lists(
    st.one_of(
        st.binary(max_size=30),
        st.sampled_from([b"\r\n", b"\n", b"\r", b"x" * 40, b"{3}", b"{5+}"]),
    ),
    max_size=40,
).map(b"".join)


class LineReaderPropertyTests(unittest.TestCase):
    @given(lineBytes, st.lists(st.integers(1, 50), max_size=20), st.integers(1, 40))
    @settings(max_examples=300, deadline=None)
    def test_anyChunking(self, data, cuts, limit):
        """
        However the input is cut into pieces, the reader gives the same
        lines (overlong ones reported with the same start and end) as
        splitting the whole input at once, and never holds much more of a
        partial line than the limit.
        """
        reader = LineReader(limit)
        got = []
        pos = 0
        for size in cuts + [len(data)]:
            reader.feed(data[pos : pos + size])
            pos += size
            got += readAll(reader)
            self.assertLessEqual(reader.pending, limit + 1)
        self.assertEqual(normal(got), expectedLines(data, limit))

    @given(lineBytes, st.lists(st.integers(0, 20), max_size=20))
    @settings(max_examples=200, deadline=None)
    def test_readInterleaved(self, data, counts):
        """
        Counted reads and line reads interleaved consume the input exactly
        once, in order.
        """
        data = data.replace(b"\r", b"")
        reader = LineReader(1000)
        reader.feed(data)
        out = b""
        for count in counts:
            out += reader.read(count)
            line = reader.readLine()
            if isinstance(line, bytes):
                out += line + b"\n"
        rest = reader.peek()
        reader.skip(len(rest))
        out += rest
        self.assertEqual(out, data)
        self.assertEqual(reader.pending, 0)
