"""
IMAP keywords of a folder, stored as Dovecot does: Maildir info letters
C{a}-C{z}, whose names are listed in the folder's C{dovecot-keywords} file
(C{<index> <name>} per line, C{a} being index 0).

As in Dovecot's maildir-keywords.c, a new name is given a letter only
under the folder's UID list lock (C{dovecot-uidlist.lock}), after reading
the file again; the file is then replaced under its own dot-lock
(C{dovecot-keywords.lock}), and its modification time always moves to a
later second: Dovecot reads the file again only when that time changed.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from maild.store.files import folderMustExist, fsyncDirectory
from maild.store.locking import DOVECOT_MAILDIR, DotLockSettings, dotLocked
from maild.store.uidlist import FILE_NAME as UIDLIST_NAME

FILE_NAME = "dovecot-keywords"
MAX_KEYWORDS = 26


class TooManyKeywords(Exception):
    pass


class Keywords:
    def __init__(self, folderPath: Path, lockSettings: DotLockSettings = DOVECOT_MAILDIR) -> None:
        self.path = folderPath / FILE_NAME
        self.uidListPath = folderPath / UIDLIST_NAME
        self.lockSettings = lockSettings
        self._byLetter: dict[str, str] = {}
        # What stat said of the file when read: (mtime, size, inode); the
        # inode alone is no proof (a file replaced by rename frees its inode
        # for the next one), nor the time (coarse ticks, NFS attribute caches).
        self._stamp: tuple[int, int, int] | int = -1

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._byLetter, self._stamp = {}, -1
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return
        byLetter = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    index, _, name = line.strip().partition(" ")
                    if index.isdigit() and int(index) < MAX_KEYWORDS and name:
                        byLetter[string.ascii_lowercase[int(index)]] = name
        except FileNotFoundError:
            # Its folder was deleted or renamed meanwhile.
            self._byLetter, self._stamp = {}, -1
            return
        self._byLetter, self._stamp = byLetter, (st.st_mtime_ns, st.st_size, st.st_ino)

    def names(self, letters: str) -> list[str]:
        """
        The keyword names of info letters (unknown letters are skipped).
        """
        self._refresh()
        return [self._byLetter[c] for c in letters if c in self._byLetter]

    def allNames(self) -> list[str]:
        self._refresh()
        return [self._byLetter[c] for c in sorted(self._byLetter)]

    def letters(self, names: list[str], create: bool = True) -> str:
        """
        The info letters of keyword names (case-insensitively, as IMAP
        compares them), giving letters to new names when C{create}.

        @raise TooManyKeywords: when the 26 letters are all taken.
        """
        self._refresh()
        wanted = {n.lower(): n for n in names}
        found = {name.lower(): c for c, name in self._byLetter.items()}
        missing = [n for k, n in wanted.items() if k not in found]
        if missing and create:
            with folderMustExist(self.path.parent), dotLocked(self.uidListPath, self.lockSettings):
                self._stamp = -1
                self._refresh()
                found = {name.lower(): c for c, name in self._byLetter.items()}
                free = [c for c in string.ascii_lowercase if c not in self._byLetter]
                for name in missing:
                    if name.lower() in found:
                        continue
                    if not free:
                        raise TooManyKeywords(name)
                    letter = free.pop(0)
                    self._byLetter[letter] = name
                    found[name.lower()] = letter
                self._write()
        return "".join(sorted(found[k] for k in wanted if k in found))

    def _write(self) -> None:
        try:
            previous = int(os.stat(self.path).st_mtime)
        except FileNotFoundError:
            previous = -1
        with dotLocked(self.path, self.lockSettings):
            tmp = self.path.with_name(FILE_NAME + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for letter in sorted(self._byLetter):
                    f.write(f"{ord(letter) - ord('a')} {self._byLetter[letter]}\n")
                f.flush()
                os.fsync(f.fileno())
                written = int(os.fstat(f.fileno()).st_mtime)
            if written <= previous:
                os.utime(tmp, (written, previous + 1))
            os.replace(tmp, self.path)
            fsyncDirectory(self.path.parent)
        st = os.stat(self.path)
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
