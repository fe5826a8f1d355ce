"""
Moving between maild and Dovecot, either way, and both serving one data
folder at once (issue 15): a real Dovecot 2.3 (Debian's dovecot-imapd and
dovecot-pop3d) runs privately on loopback over maild's data folder, and
both servers' IMAP and POP3 must show the same thing: every folder's
UIDVALIDITY, UIDNEXT and EXISTS, every message's UID, FLAGS, RFC822.SIZE,
INTERNALDATE and body, LIST with special-use, LSUB, POP3 UIDL.

The mixed-load test runs for MAILD_DOVECOT_LOAD_SECONDS (20 by default).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

from twisted.trial import unittest

from tests import dovecot
from tests.dovecot import PASSWORD, Site, mailboxView, uidListProblems, uidsByMessageId

LOAD_SECONDS = float(os.environ.get("MAILD_DOVECOT_LOAD_SECONDS", "20"))
ALICE = "alice@localhost"


def message(messageId: str, subject: str = "Hello", body: str = "Hi there.\r\n") -> bytes:
    return (
        f"From: Carol <carol@remote.test>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{messageId}>\r\n\r\n{body}"
    ).encode("utf-8")


class DovecotTestCase(unittest.SynchronousTestCase):
    skip = dovecot.unavailable()

    def setUp(self):
        self.site = Site()
        self.addCleanup(self.site.cleanUp)

    def assertSameView(self, user: str = ALICE) -> dovecot.MailboxView:
        """
        Both servers show C{user}'s mailbox the same way, and neither
        complained about the data.
        """
        fromMaild = mailboxView(self.site, "maild", user)
        fromDovecot = mailboxView(self.site, "dovecot", user)
        self.assertEqual(fromMaild.listed, fromDovecot.listed)
        self.assertEqual(fromMaild.subscribed, fromDovecot.subscribed)
        self.assertEqual(fromMaild.uidls, fromDovecot.uidls)
        self.assertEqual(sorted(fromMaild.folders), sorted(fromDovecot.folders))
        for name in fromMaild.folders:
            self.assertEqual(fromMaild.folders[name], fromDovecot.folders[name], name)
        self.assertEqual(self.site.dovecotProblems(), [])
        self.assertEqual(self.site.maildTracebacks(), [])
        return fromMaild

    def checkSample(self, view: dovecot.MailboxView, forwardedIn: str) -> None:
        """
        What both servers agree on is what was written, not just the same.
        """
        specialUse = {name: attrs - {"\\noselect", "\\nonexistent"} for name, attrs in view.listed.items()}
        self.assertEqual(specialUse["Sent"], frozenset({"\\sent"}))
        self.assertEqual(specialUse["Trash"], frozenset({"\\trash"}))
        self.assertIn("Work/Sub", view.subscribed)
        self.assertIn("Proj.2026", view.subscribed)
        self.assertIn("Proj.2026", view.folders)
        flags = set().union(*(m.flags for m in view.folders[forwardedIn].messages.values()))
        self.assertTrue({"$Forwarded", "Custom", "\\Seen"} <= flags, flags)
        self.assertTrue(view.uidls and all(len(u.split()[1]) == 16 for u in view.uidls))
        self.assertTrue(all(u.split()[1] == u.split()[1].lower() for u in view.uidls))


class MoveTests(DovecotTestCase):
    def test_afterMaildWrote(self):
        """
        Dovecot, started over what maild wrote (deliveries, APPEND with
        flags, $Forwarded and keywords, subfolders, a folder with a dot,
        subscriptions, an expunge, POP3 retrieval), shows it exactly as
        maild does.
        """
        site = self.site
        site.addUser(ALICE)
        site.startMaild()
        for n in range(4):
            site.smtpDeliver(message(f"smtp{n}@remote.test", f"delivered {n}"))
        client = site.imap("maild")
        for name in ("Work", "Work/Sub", "Proj.2026", "Entw&APw-rfe"):
            self.assertEqual(client.create(f'"{name}"')[0], "OK")
        for name in ("Work/Sub", "Proj.2026"):
            self.assertEqual(client.subscribe(f'"{name}"')[0], "OK")
        client.append('"Work/Sub"', r"(\Seen $Forwarded Custom)", None, message("a1@x", "appended"))
        client.append('"Proj.2026"', r"(\Draft \Flagged)", None, message("a2@x", "draft"))
        client.append("INBOX", r"(\Answered Work)", None, message("a3@x", "answered"))
        client.select("INBOX")
        client.store("1", "+FLAGS", r"(\Flagged $Forwarded)")
        client.store("2", "+FLAGS", r"(\Deleted)")
        client.expunge()
        client.store("1:*", "+FLAGS", r"(\Seen)")
        client.logout()
        pop = site.pop3("maild")
        pop.retr(1)
        pop.quit()

        site.startDovecot()
        view = self.assertSameView()
        self.checkSample(view, "Work/Sub")
        self.assertEqual(view.folders["INBOX"].exists, 4)

    def test_afterDovecotWrote(self):
        """
        maild, started over what Dovecot wrote (the same kinds of changes,
        made by Dovecot), shows it exactly as Dovecot does; a user maild's
        command line added logs in to Dovecot.
        """
        site = self.site
        site.addUser(ALICE)
        site.startDovecot()
        client = site.imap("dovecot")
        for name in ("Work", "Work/Sub", "Proj.2026"):
            self.assertEqual(client.create(f'"{name}"')[0], "OK")
        for name in ("Work/Sub", "Proj.2026"):
            self.assertEqual(client.subscribe(f'"{name}"')[0], "OK")
        for n in range(4):
            client.append("INBOX", None, None, message(f"d{n}@x", f"dovecot {n}"))
        client.append('"Work/Sub"', r"(\Seen $Forwarded Custom)", None, message("d5@x", "keywords"))
        client.append('"Proj.2026"', r"(\Draft)", None, message("d6@x", "draft"))
        client.select("INBOX")
        client.store("1", "+FLAGS", r"(\Flagged $Forwarded Other)")
        client.store("3", "+FLAGS", r"(\Deleted)")
        client.expunge()
        client.logout()
        pop = site.pop3("dovecot")
        pop.retr(1)
        pop.quit()

        site.startMaild()
        view = self.assertSameView()
        self.checkSample(view, "Work/Sub")
        self.assertEqual(view.folders["INBOX"].exists, 3)


class PasswordTests(DovecotTestCase):
    def test_doveadmUsersLogInToMaild(self):
        """
        Users whose passwords Dovecot's doveadm pw hashed (SHA512-CRYPT,
        SHA256-CRYPT, BLF-CRYPT, ARGON2ID, and PLAIN) log in to maild's
        IMAP and POP3; with [auth] rehash their hash becomes Argon2id at
        the login, and Dovecot still logs them in.
        """
        site = self.site
        site.addUser(ALICE)
        site.startDovecot()
        schemes = ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "PLAIN"]
        lines = {f"{s.lower().replace('-', '')}@localhost": site.doveadmPassword(s) for s in schemes}
        for scheme, hashed in zip(schemes, lines.values()):
            self.assertTrue(hashed.startswith("{%s}" % scheme), hashed)
        with open(site.data / "users", "a") as users:
            for user, hashed in lines.items():
                users.write(f"{user}:{hashed}\n")
        config = site.root / "maild.toml"
        config.write_text("[auth]\nrehash = true\n")
        os.chmod(config, 0o644)
        site.startMaild("--config", str(config))
        for user, hashed in lines.items():
            site.imap("maild", user).logout()
            site.pop3("maild", user).quit()
        stored = dict(line.split(":", 1) for line in (site.data / "users").read_text().splitlines())
        for user in lines:
            self.assertTrue(stored[user].startswith("{ARGON2ID}$argon2id$"), (user, stored[user]))
            site.imap("dovecot", user).logout()
        self.assertEqual(site.maildTracebacks(), [])

    def test_maildUsersLogInToDovecot(self):
        """
        A user maild's command line added (Argon2id) logs in to Dovecot's
        IMAP and POP3 through the same users file.
        """
        site = self.site
        site.addUser(ALICE)
        site.addUser("bob@localhost", "another secret")
        site.startDovecot()
        site.imap("dovecot").logout()
        site.pop3("dovecot").quit()
        site.imap("dovecot", "bob@localhost", "another secret").logout()
        self.assertEqual(self.site.dovecotProblems(), [])


class LoadRecord:
    """
    What the mixed load did, shared by its threads.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.added: dict[str, Counter] = {"INBOX": Counter(), "Work": Counter()}
        self.deleted: set[str] = set()
        self.disagreements: list[str] = []
        self.errors: list[str] = []
        self.checks = 0
        self.counter = 0

    def nextId(self, server: str) -> str:
        with self.lock:
            self.counter += 1
            return f"load{self.counter}.{server}@x"


class BothAtOnceTests(DovecotTestCase):
    def test_mixedLoad(self):
        """
        maild and Dovecot serving one mailbox at once, under mixed load
        (SMTP deliveries to maild, APPEND to both, flag changes with
        keywords and expunges on both, POP3 UIDL on both): they never show
        one message under two UIDs, the UID lists have no duplicate or
        out-of-order entry, no UID is skipped (each message added took
        exactly one), nothing not expunged is lost, and at the end both
        show everything the same way.
        """
        site = self.site
        site.addUser(ALICE)
        site.startMaild()
        site.startDovecot()
        client = site.imap("maild")
        client.create("Work")
        client.logout()
        record = LoadRecord()
        stop = threading.Event()
        deadline = time.monotonic() + LOAD_SECONDS

        def loop(name, step):
            rng = random.Random(name)
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    step(rng)
            except Exception as e:  # reported by the test, with its thread
                record.errors.append(f"{name}: {e!r}")

        def deliver(rng):
            messageId = record.nextId("smtp")
            site.smtpDeliver(message(messageId))
            with record.lock:
                record.added["INBOX"][messageId] += 1

        def appender(server):
            def step(rng):
                folder = rng.choice(["INBOX", "INBOX", "Work"])
                flags = rng.choice([None, r"(\Seen)", r"($Forwarded Custom)", r"(\Flagged Other)"])
                client = site.imap(server)
                try:
                    for _ in range(5):
                        messageId = record.nextId(server)
                        typ, data = client.append(folder, flags, None, message(messageId))
                        if typ != "OK":
                            record.errors.append(f"APPEND to {server}: {data}")
                            continue
                        with record.lock:
                            record.added[folder][messageId] += 1
                finally:
                    client.logout()

            return step

        def flagger(server):
            def step(rng):
                client = site.imap(server)
                try:
                    typ, data = client.select(rng.choice(["INBOX", "Work"]))
                    count = int(data[0])
                    for _ in range(10):
                        if not count:
                            break
                        seq = str(rng.randint(1, count))
                        change = rng.choice(["+FLAGS", "-FLAGS"])
                        flags = rng.choice([r"(\Seen)", r"(\Flagged $Forwarded)", r"(Custom Kw2)", r"(\Answered Kw3)"])
                        client.store(seq, change, flags)
                    client.close()
                finally:
                    client.logout()

            return step

        def expunger(server):
            def step(rng):
                client = site.imap(server)
                try:
                    typ, data = client.select(rng.choice(["INBOX", "Work"]))
                    count = int(data[0])
                    if count > 5:
                        seq = str(rng.randint(1, count))
                        typ, data = client.fetch(seq, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                        found = [d for d in data if isinstance(d, tuple)]
                        if typ == "OK" and found:
                            messageId = found[0][1].split(b"<", 1)[1].split(b">", 1)[0].decode()
                            with record.lock:
                                record.deleted.add(messageId)
                            client.store(seq, "+FLAGS", r"(\Deleted)")
                            client.expunge()
                    client.close()
                finally:
                    client.logout()

            return step

        def uidl(server):
            def step(rng):
                pop = site.pop3(server)
                try:
                    pop.uidl()
                finally:
                    pop.quit()

            return step

        def checker(rng):
            # Both servers, one after the other: a message both show has the
            # same UID in both.
            a = site.imap("maild")
            b = site.imap("dovecot")
            try:
                for folder in ("INBOX", "Work"):
                    fromMaild = uidsByMessageId(a, folder)
                    fromDovecot = uidsByMessageId(b, folder)
                    for messageId in fromMaild.keys() & fromDovecot.keys():
                        if fromMaild[messageId] != fromDovecot[messageId]:
                            record.disagreements.append(
                                f"{folder} {messageId}: maild {fromMaild[messageId]}, Dovecot {fromDovecot[messageId]}"
                            )
                record.checks += 1
            finally:
                a.logout()
                b.logout()

        workers = [("deliver", deliver), ("checker", checker)]
        for server in ("maild", "dovecot"):
            workers += [
                (f"append-{server}", appender(server)),
                (f"flag-{server}", flagger(server)),
                (f"expunge-{server}", expunger(server)),
                (f"uidl-{server}", uidl(server)),
            ]
        threads = [threading.Thread(target=loop, args=worker) for worker in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LOAD_SECONDS + 120)
        stop.set()

        self.maxDiff = None
        self.assertEqual(record.errors, [])
        self.assertEqual(record.disagreements, [])
        self.assertGreater(record.checks, 0)
        view = self.assertSameView()
        user = site.data / "mail" / "localhost" / "alice"
        for name, path in (("INBOX", user), ("Work", user / ".Work")):
            self.assertEqual(uidListProblems(path), [], name)
            folder = view.folders[name]
            added = record.added[name]
            self.assertEqual(max(added.values(), default=1), 1)
            # Each message took one UID: UIDNEXT - 1 is the number added.
            self.assertEqual(folder.uidnext - 1, len(added), name)
            present = {m.messageId.strip("<>") for m in folder.messages.values()}
            self.assertEqual(set(added) - present - record.deleted, set(), f"{name}: lost")
            self.assertEqual(present - set(added), set(), name)
        self.summary = (
            f"{sum(len(a) for a in record.added.values())} messages added, "
            f"{len(record.deleted)} expunged, {record.checks} agreement checks"
        )
        print(f"\nmixed load for {LOAD_SECONDS:g} s: {self.summary}")
