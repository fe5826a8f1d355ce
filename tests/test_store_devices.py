"""
Mail on a file system of its own: C{<data>/mail} mounted apart from the
spool (a tmpfs here, small enough to fill), as a big volume for mail is.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
from pathlib import Path

from twisted.internet import defer

from tests.support import IMAPTestCase, sampleMessage, spoolMessages, waitForEmptySpool, writeUsers

# Small enough to fill in a test, big enough for the folders and a few
# messages.
_MOUNT_SIZE = "2m"


def mountTmpfs(testCase, directory: Path, size: str) -> None:
    """
    Mount a tmpfs of C{size} on C{directory} for the test (unmounted in
    its cleanup), or skip the test when this machine does not allow it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise testCase.skipTest("mounting a second file system needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise testCase.skipTest(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    testCase.addCleanup(subprocess.run, ["umount", "-l", str(directory)], check=False)


class MailOnItsOwnFileSystemTests(IMAPTestCase):
    """
    The spool (C{<data>/tmp}) and the mail (C{<data>/mail}) are on two file
    systems: a rename between them fails with EXDEV.
    """

    syncMode = "fsync"

    def setUp(self):
        self.dataDir = Path(self.mktemp()).resolve()
        mountTmpfs(self, self.dataDir / "mail", _MOUNT_SIZE)
        writeUsers(self.dataDir, self.users)
        self.assertNotEqual(
            os.stat(self.dataDir / "mail").st_dev, os.stat(self.dataDir).st_dev
        )
        return self.startServer(sync=self.syncMode)

    def send(self, message: bytes, rcpts=("alice@localhost",)):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port("smtp")) as client:
                return client.sendmail("carol@remote.test", list(rcpts), message)

        return self.inThread(run)

    @defer.inlineCallbacks
    def test_deliveryAcrossFileSystems(self):
        """
        SMTP delivery to a user whose mail is on another file system than
        the spool is accepted, the message lands in C{new/} whole, and
        nothing stays in the spool or in the folder's C{tmp/}.
        """
        message = sampleMessage("across", body="x" * 200_000 + "\r\n")
        refused = yield self.send(message, ("alice@localhost", "bob@example.org"))
        self.assertEqual(refused, {})
        for user in ("alice@localhost", "bob@example.org"):
            files = self.messages(user)
            self.assertEqual(len(files), 1)
            self.assertEqual(files[0].parent.name, "new")
            self.assertIn(b"Subject: across\n", files[0].read_bytes())
            self.assertEqual(list((self.maildir(user) / "tmp").iterdir()), [])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

    @defer.inlineCallbacks
    def test_appendAndCopyAcrossFileSystems(self):
        """
        IMAP APPEND (with a date: the INTERNALDATE survives the copy) and
        COPY work when the folders are on another file system than the
        spool.
        """
        message = sampleMessage("appended")

        def run(client):
            client.send(b'A APPEND Drafts (\\Seen) "01-Feb-2020 10:00:00 +0000" {%d+}\r\n' % len(message) + message + b"\r\n")
            appended = client.readUntilTagged(b"A")
            client.command(b"S SELECT Drafts")
            copied = client.command(b"C COPY 1 Archive")
            client.command(b"E SELECT Archive")
            fetched = client.command(b"F FETCH 1 (INTERNALDATE FLAGS)")
            return appended, copied, fetched

        appended, copied, fetched = yield self.session(run)
        self.assertTrue(appended[1].startswith(b"A OK [APPENDUID"), appended)
        self.assertTrue(copied[1].startswith(b"C OK [COPYUID"), copied)
        self.assertIn(b'INTERNALDATE "01-Feb-2020 10:00:00 +0000"', fetched[0][0])
        self.assertEqual(len(self.messages("alice@localhost", ".Archive")), 1)

    @defer.inlineCallbacks
    def test_fullMailDiskThenSpaceFreed(self):
        """
        When the mail's file system is full, delivery gets C{452 4.3.1}
        (try again later), nothing is stored and nothing stays in the
        spool; once space is freed, the same message is delivered.
        """
        filler = self.dataDir / "mail" / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        message = sampleMessage("when full", body="y" * 300_000 + "\r\n")
        error = yield self.assertFailure(self.send(message), smtplib.SMTPDataError)
        self.assertEqual(error.smtp_code, 452)
        self.assertTrue(error.smtp_error.startswith(b"4.3.1"), error.smtp_error)
        self.assertEqual(self.messages("alice@localhost"), [])
        self.assertEqual(list((self.maildir("alice@localhost") / "tmp").iterdir()), [])
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])

        filler.unlink()
        refused = yield self.send(message)
        self.assertEqual(refused, {})
        self.assertEqual(len(self.messages("alice@localhost")), 1)
        self.assertEqual(spoolMessages(self.dataDir), [])


class MailOnItsOwnFileSystemSyncfsTests(MailOnItsOwnFileSystemTests):
    """
    The same with C{sync = "syncfs"}: the data folder's syncfs does not
    cover the mail's file system, whose folders are synced on their own.
    """

    syncMode = "syncfs"


class OneDomainOnItsOwnFileSystemTests(IMAPTestCase):
    """
    Only C{example.org}'s mail is mounted apart: one message to users of
    both domains is renamed into the first folder and must be copied, not
    linked, into the other.
    """

    def setUp(self):
        self.dataDir = Path(self.mktemp()).resolve()
        mountTmpfs(self, self.dataDir / "mail" / "example.org", _MOUNT_SIZE)
        writeUsers(self.dataDir, self.users)
        return self.startServer()

    @defer.inlineCallbacks
    def test_oneMessageToBothFileSystems(self):
        """
        Both recipients get the message; the copy on the spool's file
        system is the renamed spool file (the fast path stays), the other
        is a file of its own on the other file system.
        """

        def run():
            with smtplib.SMTP("127.0.0.1", self.port("smtp")) as client:
                return client.sendmail("carol@remote.test", ["alice@localhost", "bob@example.org"], sampleMessage("both"))

        self.assertEqual((yield self.inThread(run)), {})
        alice, = self.messages("alice@localhost")
        bob, = self.messages("bob@example.org")
        self.assertEqual(alice.read_bytes(), bob.read_bytes())
        self.assertEqual(os.stat(alice).st_dev, os.stat(self.dataDir).st_dev)
        self.assertNotEqual(os.stat(bob).st_dev, os.stat(alice).st_dev)
        self.assertEqual((yield waitForEmptySpool(self.dataDir)), [])
