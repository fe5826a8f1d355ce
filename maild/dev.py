"""
The developer's catch-all mode (C{--dev}): every address of every domain
is accepted, any user name and password logs in, and everything lands in
one shared mailbox that every login reads.  Nothing is ever relayed.

It exists for a developer's test inbox: their application sends to
anyone, and they read what was sent with Thunderbird, over POP3, or
through the JSON API (L{maild.web.devapi}).  The configuration keeps it
on loopback unless told otherwise (L{maild.config}).
"""

from __future__ import annotations

from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from maild.accounts import LocalAddresses


def devMailbox(domains: tuple[str, ...]) -> str:
    """
    The shared mailbox's address.
    """
    return f"maild-dev@{domains[0]}"


class DevAddresses(LocalAddresses):
    """
    Every domain is local, every address reaches the shared mailbox, and
    a logged-in user may send as anyone.
    """

    def __init__(self, accounts, domains, mailbox: str) -> None:
        LocalAddresses.__init__(self, accounts, domains)
        self.mailbox = mailbox

    def isLocalDomain(self, domain: str) -> bool:
        return True

    @property
    def postmaster(self) -> str:
        return self.mailbox

    def resolve(self, address: str) -> str:
        return self.mailbox

    def ownsSender(self, user: str, address: str) -> bool:
        return True


@implementer(ICredentialsChecker)
class AnyPasswordChecker:
    """
    Any user name and password log in to the shared mailbox.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, mailbox: str) -> None:
        self.mailbox = mailbox

    def requestAvatarId(self, creds) -> defer.Deferred:
        return defer.succeed(self.mailbox)
