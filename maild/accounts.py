"""
Users and addresses.

The users file is a Dovecot passwd-file: one C{user@domain:{SCHEME}hash}
line per user (further colon-separated fields are kept and ignored), so a
Dovecot installation can authenticate against the same file.  New hashes
are Argon2id (C{{ARGON2ID}}, via argon2-cffi).  Verified too, so that a
Dovecot site's users log in after a move: bcrypt (C{{BLF-CRYPT}}), the
crypt family Dovecot's C{doveadm pw} long wrote by default
(C{{SHA512-CRYPT}}, C{{SHA256-CRYPT}}, C{{MD5-CRYPT}}, C{{CRYPT}}, through
libpass, the maintained fork of passlib: Python's C{crypt} module is gone
in 3.13) and C{{PLAIN}}.  Every comparison takes constant time.  With
C{[auth] rehash = true}, a user whose hash is not Argon2id gets one at the
next successful login.
"""

from __future__ import annotations

import hmac
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import argon2
import bcrypt
from passlib import hash as passlibHash
from passlib.context import CryptContext
from twisted.logger import Logger

from maild.names import InvalidName, normalizeAddress, splitAddress
from maild.store.files import replaceFile
from maild.store.locking import locked

log = Logger()

ARGON2ID = "ARGON2ID"
BLF_CRYPT = "BLF-CRYPT"
DEFAULT_SCHEME = ARGON2ID

_argon2 = argon2.PasswordHasher()

# crypt(3) formats, by Dovecot scheme name; {CRYPT} is whatever the system's
# crypt() understood (Dovecot calls it), so it accepts them all.
_CRYPT_SCHEMES = {
    "SHA512-CRYPT": CryptContext(schemes=[passlibHash.sha512_crypt]),
    "SHA256-CRYPT": CryptContext(schemes=[passlibHash.sha256_crypt]),
    "MD5-CRYPT": CryptContext(schemes=[passlibHash.md5_crypt]),
    "CRYPT": CryptContext(
        schemes=[
            passlibHash.sha512_crypt,
            passlibHash.sha256_crypt,
            passlibHash.md5_crypt,
            passlibHash.bcrypt,
            passlibHash.des_crypt,
        ]
    ),
}
_PLAIN_SCHEMES = ("PLAIN", "CLEARTEXT")

# Verified when the user does not exist, so that an unknown name costs as
# much time as a wrong password.
_DUMMY_HASH = "{ARGON2ID}" + _argon2.hash("maild-dummy-password")


class AccountError(Exception):
    pass


def hashPassword(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """
    Hash C{password} as C{{SCHEME}hash}.
    """
    if scheme == ARGON2ID:
        return "{ARGON2ID}" + _argon2.hash(password)
    if scheme == BLF_CRYPT:
        return "{BLF-CRYPT}" + bcrypt.hashpw(
            password.encode("utf-8"), bcrypt.gensalt(12)
        ).decode("ascii")
    raise AccountError(f"unsupported password scheme {scheme!r}")


def verifyPassword(stored: str, password: str) -> bool:
    """
    Check C{password} against a C{{SCHEME}hash}; unknown schemes never match.
    Slow on purpose (tens of milliseconds): call it from a thread.
    """
    scheme, _, hashed = stored[1:].partition("}") if stored.startswith("{") else ("", "", stored)
    scheme = scheme.upper()
    try:
        if scheme in ("ARGON2ID", "ARGON2I", "ARGON2"):
            return _argon2.verify(hashed, password)
        if scheme in ("BLF-CRYPT", "BCRYPT"):
            # Dovecot writes $2y$, which bcrypt reads as $2b$.
            candidate = hashed.replace("$2y$", "$2b$", 1).encode("ascii")
            return bcrypt.checkpw(password.encode("utf-8"), candidate)
        if scheme in _CRYPT_SCHEMES:
            if scheme == "CRYPT" and hashed.startswith("$2y$"):
                hashed = hashed.replace("$2y$", "$2b$", 1)
            return _CRYPT_SCHEMES[scheme].verify(password, hashed)
        if scheme in _PLAIN_SCHEMES:
            return hmac.compare_digest(password.encode("utf-8"), hashed.encode("utf-8"))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
    except (ValueError, TypeError):
        # A malformed hash, or one no scheme of the context knows.
        return False
    return False


def needsRehash(stored: str) -> bool:
    """
    Whether a stored hash should be replaced by an Argon2id one with our
    parameters.
    """
    if not stored.upper().startswith("{ARGON2ID}"):
        return True
    try:
        return _argon2.check_needs_rehash(stored[len("{ARGON2ID}") :])
    except (argon2.exceptions.InvalidHashError, ValueError):
        return True


@dataclass(frozen=True)
class _Entry:
    address: str
    passwordHash: str
    rest: str  # the fields after the password, kept as they were


class Accounts:
    """
    The users file: read on first use and again whenever it changes on
    disk, so C{maild user add} takes effect without a restart.
    """

    # Look at the file at most this often (seconds): every RCPT asks.
    RECHECK = 1.0

    def __init__(self, path: Path, rehash: bool = False) -> None:
        self.path = path
        self.rehash = rehash
        self._entries: dict[str, _Entry] = {}
        self._order: list[str] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.RECHECK:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._entries, self._order, self._stamp = {}, [], None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        entries, order = self._parse(self.path.read_text("utf-8"))
        self._entries, self._order, self._stamp = entries, order, stamp

    @staticmethod
    def _parse(text: str) -> tuple[dict[str, _Entry], list[str]]:
        entries: dict[str, _Entry] = {}
        order = []
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, _, rest = line.partition(":")
            password, _, extra = rest.partition(":")
            try:
                address = normalizeAddress(user.strip())
            except InvalidName:
                continue
            if address not in entries:
                order.append(address)
            entries[address] = _Entry(address, password, extra)
        return entries, order

    def version(self) -> object:
        """
        Something that changes whenever the file does (what a cache of
        anything read from it is checked against).
        """
        self._refresh()
        return self._stamp

    def users(self) -> list[str]:
        self._refresh()
        return list(self._order)

    def exists(self, address: str) -> bool:
        self._refresh()
        return address in self._entries

    def passwordHash(self, address: str) -> str | None:
        self._refresh()
        entry = self._entries.get(address)
        return entry.passwordHash if entry else None

    def verify(self, address: str, password: str) -> bool:
        """
        Check a password, taking as long for an unknown user as for a known
        one.  Blocking: call it from a thread.
        """
        stored = self.passwordHash(address)
        if stored is None:
            verifyPassword(_DUMMY_HASH, password)
            return False
        if not verifyPassword(stored, password):
            return False
        if self.rehash and needsRehash(stored):
            self._rehash(address, stored, password)
        return True

    def _rehash(self, address: str, verified: str, password: str) -> None:
        """
        Replace the hash just verified with an Argon2id one, unless it
        changed meanwhile (C{maild user passwd} ran, say).  A failure to
        write leaves the old hash, which still works.
        """
        hashed = hashPassword(password)
        try:
            with self._editing() as entries:
                entry = entries.get(address)
                if entry is None or entry.passwordHash != verified:
                    return
                entries[address] = _Entry(address, hashed, entry.rest)
        except OSError as e:
            log.warn("could not re-hash the password of {address}: {error}", address=address, error=e)
            return
        log.info("re-hashed the password of {address} with Argon2id", address=address)

    # Changes (from the CLI): under a lock, replacing the file atomically.

    def add(self, address: str, password: str, scheme: str = DEFAULT_SCHEME) -> str:
        """
        @return: the canonical address.
        @raise AccountError: if the user exists already.
        @raise InvalidName: if the address could escape the data folder.
        """
        address = normalizeAddress(address)
        hashed = hashPassword(password, scheme)
        with self._editing() as entries:
            if address in entries:
                raise AccountError(f"user {address} exists already")
            entries[address] = _Entry(address, hashed, "")
        return address

    def setPassword(self, address: str, password: str, scheme: str = DEFAULT_SCHEME) -> None:
        address = normalizeAddress(address)
        hashed = hashPassword(password, scheme)
        with self._editing() as entries:
            entry = entries.get(address)
            if entry is None:
                raise AccountError(f"no user {address}")
            entries[address] = _Entry(address, hashed, entry.rest)

    def delete(self, address: str) -> None:
        address = normalizeAddress(address)
        with self._editing() as entries:
            if entries.pop(address, None) is None:
                raise AccountError(f"no user {address}")

    @contextmanager
    def _editing(self) -> Iterator[dict[str, _Entry]]:
        """
        The entries, to change in place; written back when the block ends
        without an error.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lockPath = self.path.with_name(self.path.name + ".lock")
        with locked(lockPath):
            # Run as root, a lock file made now must stay usable by the
            # daemon's own user, who may rewrite the file too.
            keepOwner(lockPath, self._owner())
            try:
                text = self.path.read_text("utf-8")
            except FileNotFoundError:
                text = ""
            entries, _ = self._parse(text)
            yield entries
            self._write(entries.values())

    def _owner(self) -> tuple[int, int, int]:
        """
        The owner, group and mode the users file must keep: those it has,
        or for a new file the data folder's owner and group, mode 0600.
        """
        try:
            st = os.stat(self.path)
            return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)
        except FileNotFoundError:
            st = os.stat(self.path.parent)
            return st.st_uid, st.st_gid, 0o600

    def _write(self, entries: Iterable[_Entry]) -> None:
        lines = []
        for entry in entries:
            line = f"{entry.address}:{entry.passwordHash}"
            if entry.rest:
                line += ":" + entry.rest
            lines.append(line + "\n")
        uid, gid, mode = self._owner()
        # The replacement keeps the file's owner and mode (a daemon running
        # as its own user, or Dovecot's auth process, must still read it
        # after root ran "maild user add").
        replaceFile(self.path, "".join(lines).encode("utf-8"), mode=mode, owner=(uid, gid))
        self._stamp = None
        self._checked = float("-inf")


def keepOwner(path: Path, owner: tuple[int, ...]) -> None:
    """
    Give C{path} the owner and group C{owner} starts with, when running
    as root and C{path} is root's (just made by us).
    """
    if os.geteuid() != 0:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if st.st_uid == 0 and (st.st_uid, st.st_gid) != tuple(owner[:2]):
        os.lchown(path, owner[0], owner[1])


class LocalAddresses:
    """
    Which local user receives mail for an address: the user of that name,
    then configured aliases, then C{postmaster@} and C{abuse@} of every
    local domain (RFC 5321 section 4.5.1, RFC 2142), then the domain's
    catch-all.
    """

    ROLE_ACCOUNTS = ("postmaster", "abuse")

    def __init__(
        self,
        accounts: Accounts,
        domains: Iterable[str],
        postmaster: str | None = None,
        aliases: Mapping[str, str] | None = None,
        catchall: Mapping[str, str] | None = None,
    ) -> None:
        self.accounts = accounts
        self.domains = tuple(domains)
        self._postmaster = postmaster
        self.aliases = dict(aliases or {})
        self.catchall = dict(catchall or {})

    def isLocalDomain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

    @property
    def postmaster(self) -> str | None:
        if self._postmaster is not None:
            return self._postmaster
        users = self.accounts.users()
        return users[0] if users else None

    def resolve(self, address: str) -> str | None:
        """
        The user who receives mail for C{address} (already checked with
        L{maild.names.splitAddress}), or None.
        """
        localPart, domain = splitAddress(address)
        if domain not in self.domains:
            return None
        address = f"{localPart}@{domain}"
        if self.accounts.exists(address):
            return address
        target = self.aliases.get(address)
        if target is None and localPart in self.ROLE_ACCOUNTS:
            target = self.postmaster
        if target is None:
            target = self.catchall.get(domain)
        if target is not None and self.accounts.exists(target):
            return target
        return None

    def ownsSender(self, user: str, address: str) -> bool:
        """
        Whether C{user} may send as C{address}: their own address, or one
        of the aliases that lead to them.
        """
        try:
            address = normalizeAddress(address)
        except InvalidName:
            return False
        if address == user:
            return True
        if self.aliases.get(address) == user:
            return True
        localPart, domain = splitAddress(address)
        return (
            localPart in self.ROLE_ACCOUNTS
            and domain in self.domains
            and self.postmaster == user
        )


def loginName(name: str, defaultDomain: str) -> str:
    """
    The account a login name means: C{alice} is C{alice@<first domain>}.

    @raise InvalidName: if it is not a valid address.
    """
    if "@" not in name:
        name = f"{name}@{defaultDomain}"
    return normalizeAddress(name)
