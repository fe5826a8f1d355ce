"""
Maildir file and folder names.

A message file is named C{<base>:2,<flags>} in C{cur/} or C{<base>} in
C{new/}, where the base is
C{<sec>.M<usec>P<pid>Q<seq>.<host>,S=<size>,W=<crlf size>} (the form
Dovecot writes), and flags are Maildir info letters in ASCII order: system
flags in upper case, keywords as lower-case letters named in the folder's
C{dovecot-keywords} file.

Folders follow Maildir++ as Dovecot lays it out: INBOX is the user's root,
the folder C{A/B} (IMAP names, C{/} as the hierarchy delimiter) lives in
C{.A.B}, a C{.} inside a name is written C{~2e} and a C{~} is C{~7e}.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import socket
import time

from maild.names import InvalidName

INFO_SEPARATOR = ":2,"

# Bits of the per-message flag byte, and the Maildir letter of each.
SEEN = 0x01
ANSWERED = 0x02
FLAGGED = 0x04
DELETED = 0x08
DRAFT = 0x10
# The Maildir letter P ("passed"), which older maild versions wrote for
# $Forwarded.  Dovecot ignores it and keeps $Forwarded as a keyword, as
# maild now does: the bit is read from older files and is replaced by the
# keyword whenever the message's flags are written again.
FORWARDED = 0x20
IN_NEW = 0x40  # the file is still in new/: nobody has seen it (\Recent)
HAS_KEYWORDS = 0x80

FLAG_LETTERS = {
    "D": DRAFT,
    "F": FLAGGED,
    "P": FORWARDED,
    "R": ANSWERED,
    "S": SEEN,
    "T": DELETED,
}
# Flags kept in the flag byte, in the order their letters sort.
_LETTER_ORDER = sorted(FLAG_LETTERS.items())

_hostname = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
_sequence = itertools.count(1)

_SIZE_FIELD = re.compile(r",S=(\d+)")
_CRLF_SIZE_FIELD = re.compile(r",W=(\d+)")


def newBaseName(size: int | None = None, crlfSize: int | None = None) -> str:
    """
    A base name no other delivery can choose: time, process and a
    per-process sequence number, and the sizes when they are known.
    """
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    name = f"{sec}.M{usec}P{os.getpid()}Q{next(_sequence)}.{_hostname}"
    if size is not None:
        name += f",S={size}"
    if crlfSize is not None:
        name += f",W={crlfSize}"
    return name


def sizesFromBase(base: str) -> tuple[int | None, int | None]:
    """
    The on-disk size and the CRLF size written in a base name, each None
    when the name lacks it.
    """
    size = _SIZE_FIELD.search(base)
    crlf = _CRLF_SIZE_FIELD.search(base)
    return (
        int(size.group(1)) if size else None,
        int(crlf.group(1)) if crlf else None,
    )


def splitFileName(name: str) -> tuple[str, str]:
    """
    Split a file name into its base and its info flags (C{""} when it has
    none).
    """
    base, _, info = name.partition(INFO_SEPARATOR)
    return base, info


@functools.lru_cache(maxsize=4096)
def flagBits(info: str) -> tuple[int, str]:
    """
    The flag byte and the keyword letters of an info string.
    """
    bits = 0
    keywords = ""
    for letter in info:
        bit = FLAG_LETTERS.get(letter)
        if bit is not None:
            bits |= bit
        elif "a" <= letter <= "z":
            keywords += letter
    if keywords:
        bits |= HAS_KEYWORDS
    return bits, "".join(sorted(set(keywords)))


@functools.lru_cache(maxsize=4096)
def infoString(bits: int, keywords: str = "") -> str:
    """
    The Maildir info letters, in ASCII order, for a flag byte and keyword
    letters.
    """
    letters = "".join(letter for letter, bit in _LETTER_ORDER if bits & bit)
    return letters + "".join(sorted(set(keywords)))


def curFileName(base: str, bits: int, keywords: str = "") -> str:
    return base + INFO_SEPARATOR + infoString(bits, keywords)


# Folder names -------------------------------------------------------------

IMAP_DELIMITER = "/"
INBOX = "INBOX"
MAX_FOLDER_NAME = 255
MAX_FOLDER_DEPTH = 16
_FORBIDDEN_IN_FOLDER = re.compile(r"[\x00-\x1f\x7f*%\\\"]")


def validateFolderName(name: str) -> str:
    """
    Check an IMAP folder name (already decoded from modified UTF-7) and
    return its canonical form (C{INBOX} in upper case).

    @raise InvalidName: for an empty component, C{.} or C{..}, a control
        character, a wildcard or a name that is too long or too deep.
    """
    if not isinstance(name, str) or not name:
        raise InvalidName("empty folder name")
    if name.upper() == INBOX:
        return INBOX
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (modified UTF-7 "&2AA-" decodes to one).
        raise InvalidName("folder name is not valid Unicode") from None
    if len(encoded) > MAX_FOLDER_NAME:
        raise InvalidName("folder name too long")
    if _FORBIDDEN_IN_FOLDER.search(name):
        raise InvalidName(f"folder name {name!r} contains a forbidden character")
    parts = name.split(IMAP_DELIMITER)
    if len(parts) > MAX_FOLDER_DEPTH:
        raise InvalidName("folder hierarchy too deep")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(f"invalid folder name {name!r}")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return IMAP_DELIMITER.join(parts)


def _encodePart(part: str) -> str:
    # Dovecot stores names in modified UTF-7 on disk; the codec is
    # registered by twisted.mail.imap4.
    import twisted.mail.imap4  # noqa: F401  (registers "imap4-utf-7")

    encoded = part.encode("imap4-utf-7").decode("ascii")
    return encoded.replace("~", "~7e").replace(".", "~2e")


def _decodePart(part: str) -> str:
    import twisted.mail.imap4  # noqa: F401

    unescaped = part.replace("~2e", ".").replace("~7e", "~")
    return unescaped.encode("ascii").decode("imap4-utf-7")


def folderDirName(name: str) -> str:
    """
    The directory (relative to the user's root) that holds folder
    C{name}: C{""} for INBOX, C{.A.B} for C{A/B}.
    """
    name = validateFolderName(name)
    if name == INBOX:
        return ""
    return "." + ".".join(_encodePart(p) for p in name.split(IMAP_DELIMITER))


def subscriptionLine(name: str) -> str:
    """
    How Dovecot writes folder C{name} in the C{subscriptions} file of a
    Maildir++ layout: its storage name, the directory without the leading
    dot (C{Work.Sub}, C{Proj~2e2026}, modified UTF-7), and C{INBOX}.
    """
    dirName = folderDirName(name)
    return dirName[1:] if dirName else INBOX


def subscriptionNames(line: str) -> list[str]:
    """
    The folder names a C{subscriptions} line may mean, the likelier
    first: Dovecot's storage name, and the IMAP name as older maild
    versions wrote it (C{Work/Sub}, or C{Proj.2026} for the folder whose
    directory is C{.Proj~2e2026}).  Invalid readings are left out.
    """
    names = []
    if line.upper() == INBOX:
        return [INBOX]
    if IMAP_DELIMITER not in line:
        name = folderNameFromDir("." + line)
        if name is not None:
            names.append(name)
    try:
        literal = validateFolderName(line)
    except InvalidName:
        return names
    if literal not in names:
        names.append(literal)
    return names


def folderNameFromDir(dirName: str) -> str | None:
    """
    The IMAP folder name of a Maildir++ directory, or None when the
    directory is not a folder.
    """
    if not dirName.startswith(".") or dirName in (".", ".."):
        return None
    try:
        name = IMAP_DELIMITER.join(_decodePart(p) for p in dirName[1:].split("."))
        return validateFolderName(name)
    except (InvalidName, UnicodeError, ValueError):
        return None
