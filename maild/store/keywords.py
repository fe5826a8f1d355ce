"""
IMAP keywords of a folder, stored as Dovecot does: Maildir info letters
C{a}-C{z}, whose names are listed in the folder's C{dovecot-keywords} file
(C{<index> <name>} per line, C{a} being index 0).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from maild.store.files import folderMustExist, replaceFile
from maild.store.locking import locked

FILE_NAME = "dovecot-keywords"
LOCK_NAME = "maild-keywords.lock"
MAX_KEYWORDS = 26


class TooManyKeywords(Exception):
    pass


class Keywords:
    def __init__(self, folderPath: Path) -> None:
        self.path = folderPath / FILE_NAME
        self.lockPath = folderPath / LOCK_NAME
        self._byLetter: dict[str, str] = {}
        self._mtime = -1

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._byLetter, self._mtime = {}, -1
            return
        if st.st_mtime_ns == self._mtime:
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
            self._byLetter, self._mtime = {}, -1
            return
        self._byLetter, self._mtime = byLetter, st.st_mtime_ns

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
            with folderMustExist(self.path.parent), locked(self.lockPath):
                self._mtime = -1
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
        text = "".join(
            f"{ord(letter) - ord('a')} {self._byLetter[letter]}\n" for letter in sorted(self._byLetter)
        )
        self._mtime = replaceFile(self.path, text.encode("utf-8")).st_mtime_ns
