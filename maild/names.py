"""
Validation of the user and domain names that become paths under the data
folder (C{mail/<domain>/<local part>/}).

The accepted alphabet is deliberately narrow: a name that passes can never
hold C{/}, NUL, C{..} or a leading dot, so it can never leave its folder.
"""

import re


class InvalidName(ValueError):
    """
    A user, domain or folder name that is refused.
    """


# RFC 5321 section 4.5.3.1: 64 octets for the local part, 255 for a domain.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 253

_LOCAL_PART = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*\Z")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def normalizeLocalPart(localPart: str) -> str:
    """
    Lower-case and check the local part of an address.

    @raise InvalidName: if it is empty, too long, or holds anything but
        RFC 5322 atom characters separated by single dots.
    """
    localPart = localPart.lower()
    if not localPart:
        raise InvalidName("empty user name")
    if len(localPart) > MAX_LOCAL_PART:
        raise InvalidName(f"user name longer than {MAX_LOCAL_PART} characters")
    if not _LOCAL_PART.match(localPart):
        raise InvalidName(f"invalid user name {localPart!r}")
    return localPart


def normalizeDomain(domain: str) -> str:
    """
    Lower-case and check a domain name (letters, digits and hyphens in
    dot-separated labels).

    @raise InvalidName: if it is not a plain host name.
    """
    if not isinstance(domain, str):
        raise InvalidName(f"invalid domain {domain!r}")
    domain = domain.lower().rstrip(".")
    if not domain or len(domain) > MAX_DOMAIN:
        raise InvalidName(f"invalid domain {domain!r}")
    if not all(_LABEL.match(label) for label in domain.split(".")):
        raise InvalidName(f"invalid domain {domain!r}")
    return domain


def splitAddress(address: str) -> tuple[str, str]:
    """
    Split C{user@domain} into its checked, lower-cased parts.

    @raise InvalidName: if either part is refused.
    """
    localPart, at, domain = address.rpartition("@")
    if not at:
        raise InvalidName(f"{address!r} is not of the form user@domain")
    return normalizeLocalPart(localPart), normalizeDomain(domain)


def normalizeAddress(address: str) -> str:
    """
    The canonical C{user@domain} form of C{address}.

    @raise InvalidName: if either part is refused.
    """
    return "@".join(splitAddress(address))
