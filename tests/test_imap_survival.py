"""
Sessions that survive each other (issue 9, items 12-16): several real
IMAP sessions over sockets on one user's folders, one renaming, deleting,
appending or copying while another has a folder selected.
"""

from __future__ import annotations

import re

from twisted.internet import defer

from tests.support import IMAPTestCase, sampleMessage
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
