"""
Users, passwords and addresses; the password checker and login throttling.
"""

from __future__ import annotations

from pathlib import Path

import bcrypt
from twisted.cred import credentials, error
from twisted.internet import defer, task
from twisted.trial import unittest

from maild.accounts import (
    AccountError,
    Accounts,
    LocalAddresses,
    hashPassword,
    verifyPassword,
)
from maild.auth import LoginThrottle, PasswordChecker, isLoopback, plaintextLoginAllowed
from maild.names import InvalidName
from tests.support import PASSWORD, IMAPTestCase, passwordHash


class PasswordTests(unittest.SynchronousTestCase):
    def test_argon2id(self):
        stored = hashPassword(PASSWORD)
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$"))
        self.assertTrue(verifyPassword(stored, PASSWORD))
        self.assertFalse(verifyPassword(stored, PASSWORD + "x"))

    def test_dovecotBlfCrypt(self):
        """
        Dovecot's {BLF-CRYPT} hashes ($2y$) are verified.
        """
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
        self.assertTrue(verifyPassword("{BLF-CRYPT}" + hashed, "pw"))
        self.assertFalse(verifyPassword("{BLF-CRYPT}" + hashed, "pW"))

    def test_unknownSchemeNeverMatches(self):
        self.assertFalse(verifyPassword("{SSHA}pw", "pw"))
        self.assertFalse(verifyPassword("pw", "pw"))
        self.assertRaises(AccountError, hashPassword, "pw", "PLAIN")

    def test_dovecotCryptFamilyAndPlain(self):
        """
        The schemes a Dovecot site's passwd-file holds are verified:
        {SHA512-CRYPT} and {SHA256-CRYPT} (doveadm pw's long-time default),
        {MD5-CRYPT}, {CRYPT} in any crypt(3) form, {PLAIN}; a malformed
        hash never matches and raises nothing.
        """
        from passlib import hash as h

        stored = [
            "{SHA512-CRYPT}" + h.sha512_crypt.hash("pw", rounds=5000),
            "{SHA256-CRYPT}" + h.sha256_crypt.hash("pw", rounds=5000),
            "{MD5-CRYPT}" + h.md5_crypt.hash("pw"),
            "{CRYPT}" + h.des_crypt.hash("pw"),
            "{CRYPT}" + h.sha512_crypt.hash("pw", rounds=5000),
            "{CRYPT}" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$"),
            "{PLAIN}pw",
            "{plain}pw",
        ]
        for line in stored:
            self.assertTrue(verifyPassword(line, "pw"), line)
            self.assertFalse(verifyPassword(line, "pW"), line)
        for broken in ("{SHA512-CRYPT}$6$", "{SHA256-CRYPT}garbage", "{CRYPT}", "{CRYPT}$9$x$y", "{MD5-CRYPT}$1$"):
            self.assertFalse(verifyPassword(broken, "pw"), broken)


class AccountsTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.accounts = Accounts(self.path)

    def test_addListDeletePasswd(self):
        """
        Users are added in Dovecot passwd-file form (the file readable by
        its owner only), listed in order, re-read after outside changes.
        """
        self.accounts.add("Alice@Example.org", "pw1")
        self.accounts.add("bob@example.org", "pw2")
        self.assertRaises(AccountError, self.accounts.add, "alice@example.org", "x")
        self.assertEqual(self.accounts.users(), ["alice@example.org", "bob@example.org"])
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)
        line = self.path.read_text().splitlines()[0]
        self.assertRegex(line, r"^alice@example\.org:\{ARGON2ID\}\$argon2id\$")
        self.accounts.setPassword("alice@example.org", "new")
        self.assertTrue(self.accounts.verify("alice@example.org", "new"))
        self.assertFalse(self.accounts.verify("alice@example.org", "pw1"))
        self.accounts.delete("bob@example.org")
        self.assertEqual(Accounts(self.path).users(), ["alice@example.org"])
        self.assertRaises(AccountError, self.accounts.delete, "bob@example.org")

    def test_keepsDovecotFields(self):
        """
        Extra passwd-file fields and comments written for Dovecot survive.
        """
        self.path.write_text("# users\ncarol@example.org:{PLAIN}x:1000:1000::/home/carol::userdb_quota_rule=*:storage=1G\n")
        self.accounts.setPassword("carol@example.org", "pw")
        self.assertIn("::userdb_quota_rule=*:storage=1G", self.path.read_text())

    def test_rehashAtLogin(self):
        """
        With rehash on, a successful login replaces a hash that is not
        Argon2id by an Argon2id one, keeping the line's other fields; a
        failed login, or rehash off, changes nothing.
        """
        from passlib import hash as h

        old = "{SHA512-CRYPT}" + h.sha512_crypt.hash("pw", rounds=5000)
        self.path.write_text(f"carol@example.org:{old}:1000:1000::/home/carol\n")
        self.assertTrue(Accounts(self.path).verify("carol@example.org", "pw"))
        self.assertIn(old, self.path.read_text())
        accounts = Accounts(self.path, rehash=True)
        self.assertFalse(accounts.verify("carol@example.org", "wrong"))
        self.assertIn(old, self.path.read_text())
        self.assertTrue(accounts.verify("carol@example.org", "pw"))
        line = self.path.read_text()
        self.assertRegex(line, r"^carol@example\.org:\{ARGON2ID\}\$argon2id\$.*:1000:1000::/home/carol\n$")
        self.assertTrue(Accounts(self.path).verify("carol@example.org", "pw"))

    def test_rehashLeavesAChangedHash(self):
        """
        A re-hash does not overwrite a password changed since the login
        verified the old one.
        """
        self.path.write_text("carol@example.org:{PLAIN}old\n")
        accounts = Accounts(self.path, rehash=True)
        accounts.setPassword("carol@example.org", "new")
        accounts._rehash("carol@example.org", "{PLAIN}old", "old")
        self.assertTrue(Accounts(self.path).verify("carol@example.org", "new"))
        self.assertFalse(Accounts(self.path).verify("carol@example.org", "old"))

    def test_badNamesRefused(self):
        for bad in ("../x@example.org", "x@../example.org", "a/b@example.org", "x\x00@example.org", "x@", "a" * 65 + "@example.org", "x@ex ample.org"):
            self.assertRaises(InvalidName, self.accounts.add, bad, "pw")
        self.assertFalse(self.path.exists())


class AddressTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.accounts = Accounts(Path(self.mktemp()))
        self.path = self.accounts.path
        self.path.write_text(
            f"alice@example.org:{passwordHash()}\nbob@example.org:{passwordHash()}\ncarol@other.test:x\n"
        )

    def test_resolve(self):
        """
        Users, aliases, role accounts (to the postmaster user, the first user
        by default) and catch-alls; other domains are not local.
        """
        addresses = LocalAddresses(
            self.accounts,
            ["example.org", "other.test"],
            aliases={"sales@example.org": "bob@example.org"},
            catchall={"other.test": "carol@other.test"},
        )
        self.assertEqual(addresses.resolve("ALICE@example.org"), "alice@example.org")
        self.assertEqual(addresses.resolve("sales@example.org"), "bob@example.org")
        self.assertEqual(addresses.resolve("postmaster@other.test"), "alice@example.org")
        self.assertEqual(addresses.resolve("abuse@example.org"), "alice@example.org")
        self.assertEqual(addresses.resolve("anything@other.test"), "carol@other.test")
        self.assertIsNone(addresses.resolve("nobody@example.org"))
        self.assertIsNone(addresses.resolve("alice@elsewhere.test"))
        self.assertTrue(addresses.ownsSender("bob@example.org", "Sales@example.org"))
        self.assertTrue(addresses.ownsSender("alice@example.org", "postmaster@example.org"))
        self.assertFalse(addresses.ownsSender("bob@example.org", "alice@example.org"))
        configured = LocalAddresses(self.accounts, ["example.org"], postmaster="bob@example.org")
        self.assertEqual(configured.resolve("postmaster@example.org"), "bob@example.org")


class CheckerTests(unittest.TestCase):
    def setUp(self):
        path = Path(self.mktemp())
        path.write_text(f"alice@example.org:{passwordHash()}\n")
        self.checker = PasswordChecker(Accounts(path), "example.org")

    def test_goodPassword(self):
        d = self.checker.requestAvatarId(credentials.UsernamePassword(b"alice", PASSWORD.encode()))
        return d.addCallback(self.assertEqual, "alice@example.org")

    def test_badPasswordAndUnknownUser(self):
        bad = self.checker.requestAvatarId(credentials.UsernamePassword(b"alice@example.org", b"wrong"))
        unknown = self.checker.requestAvatarId(credentials.UsernamePassword(b"eve@example.org", b"x"))
        invalid = self.checker.requestAvatarId(credentials.UsernamePassword(b"../x", b"x"))
        return self.assertFailure(bad, error.UnauthorizedLogin).addCallback(
            lambda _: self.assertFailure(unknown, error.UnauthorizedLogin)
        ).addCallback(lambda _: self.assertFailure(invalid, error.UnauthorizedLogin))


class LoginCacheTests(unittest.TestCase):
    """
    The cache of successful logins in L{PasswordChecker}, with the hash
    verifications counted.
    """

    def setUp(self):
        self.path = Path(self.mktemp())
        self.path.write_text(f"alice@example.org:{passwordHash()}\nbob@example.org:{passwordHash()}\n")
        self.accounts = Accounts(self.path)
        # Look at the file on every request (the daemon looks once a second).
        self.accounts.RECHECK = 0
        self.verified: list[str] = []
        verify = self.accounts.verify

        def countingVerify(address, password):
            self.verified.append(address)
            return verify(address, password)

        self.accounts.verify = countingVerify
        self.clock = task.Clock()
        self.checker = PasswordChecker(self.accounts, "example.org", cacheLifetime=300, clock=self.clock)

    def replaceUsers(self, added: str, keepAlice: bool = True) -> None:
        """
        Rewrite the users file as C{maild user} does (a new file renamed
        over the old), with the lines C{added}.
        """
        lines = self.path.read_text().splitlines(keepends=True)
        if not keepAlice:
            lines = [line for line in lines if not line.startswith("alice@")]
        new = self.path.with_name("users.new")
        new.write_text("".join(lines) + added)
        new.replace(self.path)

    def login(self, user: str = "alice", password: str = PASSWORD):
        return self.checker.requestAvatarId(credentials.UsernamePassword(user.encode(), password.encode()))

    async def test_secondLoginSkipsHash(self):
        """
        A second login with the same password is answered without hashing;
        another user's first login still hashes.
        """
        self.assertEqual(await self.login(), "alice@example.org")
        self.assertEqual(await self.login(), "alice@example.org")
        self.assertEqual(await self.login("alice@example.org"), "alice@example.org")
        self.assertEqual(self.verified, ["alice@example.org"])
        await self.login("bob")
        self.assertEqual(self.verified, ["alice@example.org", "bob@example.org"])

    async def test_wrongPasswordAlwaysHashes(self):
        """
        A wrong password after a cached success, again and again, pays the
        full hash each time and fails; the right one is still cached.
        """
        await self.login()
        for _ in range(3):
            with self.assertRaises(error.UnauthorizedLogin):
                await self.login(password="wrong")
        with self.assertRaises(error.UnauthorizedLogin):
            await self.login(password=PASSWORD + " ")
        self.assertEqual(len(self.verified), 5)
        await self.login()
        self.assertEqual(len(self.verified), 5)

    async def test_usersFileChangeDropsCache(self):
        """
        Any change to the users file (a new password, a user added or
        removed) drops every cached login: the old password is checked
        against the file again, and fails once changed.
        """
        await self.login()
        self.replaceUsers(f"carol@example.org:{passwordHash('other')}\n")
        await self.login()
        self.assertEqual(len(self.verified), 2)
        self.replaceUsers(f"alice@example.org:{passwordHash('new password')}\n", keepAlice=False)
        with self.assertRaises(error.UnauthorizedLogin):
            await self.login()
        self.assertEqual(await self.login(password="new password"), "alice@example.org")
        self.assertEqual(len(self.verified), 4)

    async def test_expiry(self):
        """
        A cached login is forgotten after the cache lifetime.
        """
        await self.login()
        self.clock.advance(299)
        await self.login()
        self.assertEqual(len(self.verified), 1)
        self.clock.advance(2)
        await self.login()
        self.assertEqual(len(self.verified), 2)

    async def test_concurrentLoginsShareOneHash(self):
        """
        Logins with the same credentials that arrive while the first is
        being verified wait for it instead of hashing again; a different
        (wrong) password arriving meanwhile gets its own verification.
        """
        logins = [self.login() for _ in range(20)]
        wrong = self.login(password="wrong")
        results = [await d for d in logins]
        self.assertEqual(results, ["alice@example.org"] * 20)
        with self.assertRaises(error.UnauthorizedLogin):
            await wrong
        self.assertEqual(len(self.verified), 2)

    async def test_cacheHoldsNoPassword(self):
        """
        What the cache keeps is a hash of the user and password keyed by
        this process's secret: not the password, not an unkeyed hash, and
        not what another process (another key) would compute.
        """
        import hashlib

        await self.login()
        [(address, (digest, _))] = self.checker._cache.items()
        self.assertEqual(address, "alice@example.org")
        self.assertNotIn(PASSWORD.encode(), digest)
        for plain in (PASSWORD, "alice@example.org\0" + PASSWORD):
            self.assertNotEqual(digest, hashlib.sha256(plain.encode()).digest())
        other = PasswordChecker(self.accounts, "example.org")
        self.assertNotEqual(other._digest(address, PASSWORD), digest)


class LoginCacheOverIMAPTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_connectionsShareOneHash(self):
        """
        A client that logs in on several IMAP connections (as Thunderbird
        does) pays the password hash once; a wrong password on the next
        connection pays it again and is refused.
        """
        verified = []
        verify = self.service.accounts.verify
        self.service.accounts.verify = lambda *args: verified.append(args[0]) or verify(*args)

        def run():
            replies = []
            for password in (PASSWORD, PASSWORD, PASSWORD, "wrong"):
                client = self.connect(login=False)
                replies.append(client.command(b'a LOGIN alice@localhost "%s"' % password.encode())[1][:4])
                client.close()
            return replies

        self.assertEqual((yield self.inThread(run)), [b"a OK"] * 3 + [b"a NO"])
        self.assertEqual(verified, ["alice@localhost"] * 2)


class PlainTests(unittest.SynchronousTestCase):
    def test_decodePlain(self):
        """
        A SASL PLAIN response gives the user name and password; bad base64,
        a wrong number of parts and another authorization identity are told
        apart (the protocols answer each in their own way).
        """
        from base64 import b64encode

        from maild.auth import MalformedPlain, NotBase64, OtherIdentity, decodePlain

        self.assertEqual(decodePlain(b64encode(b"\0alice\0pw")), (b"alice", b"pw"))
        self.assertEqual(decodePlain(b64encode(b"alice\0alice\0pw")), (b"alice", b"pw"))
        self.assertEqual(decodePlain(b64encode(b"\0\0pw")), (b"", b"pw"))
        self.assertRaises(NotBase64, decodePlain, b"not base64!")
        self.assertRaises(MalformedPlain, decodePlain, b64encode(b"alice\0pw"))
        self.assertRaises(OtherIdentity, decodePlain, b64encode(b"bob\0alice\0pw"))


class ThrottleTests(unittest.SynchronousTestCase):
    def test_doublingPerAddress(self):
        """
        Failures from one address are answered after 2, 4, 8, 15, 15 s;
        another address starts at 2 s; success or quiet resets.
        """
        clock = task.Clock()
        throttle = LoginThrottle(clock, 2.0, 15.0, forget=300)
        self.assertEqual([throttle.failed("192.0.2.1") for _ in range(5)], [2, 4, 8, 15, 15])
        self.assertEqual(throttle.failed("192.0.2.2"), 2)
        throttle.succeeded("192.0.2.1")
        self.assertEqual(throttle.failed("192.0.2.1"), 2)
        clock.advance(301)
        self.assertEqual(throttle.failed("192.0.2.2"), 2)

    def test_plaintextPolicy(self):
        self.assertTrue(isLoopback("127.0.0.1"))
        self.assertTrue(isLoopback("::1"))
        self.assertFalse(isLoopback("192.0.2.1"))
        self.assertTrue(plaintextLoginAllowed("loopback", "127.0.0.1", False))
        self.assertFalse(plaintextLoginAllowed("loopback", "192.0.2.1", False))
        self.assertTrue(plaintextLoginAllowed("loopback", "192.0.2.1", True))
        self.assertTrue(plaintextLoginAllowed("always", "192.0.2.1", False))
        self.assertFalse(plaintextLoginAllowed("never", "127.0.0.1", False))
