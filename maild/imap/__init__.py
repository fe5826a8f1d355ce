"""
IMAP4rev1 (RFC 3501) over the Maildir store, with the extensions
Thunderbird uses.

  - L{maild.imap.server}: the session (an C{IMAP4Server} subclass), its
    command table and factory
  - L{maild.imap.framing}: lines, literals and their limits
  - L{maild.imap.parser}: tokens, arguments and sequence sets
  - L{maild.imap.account}: the user's folders (C{IAccount})
  - L{maild.imap.mailbox}: one session's view of the selected folder
  - L{maild.imap.fetch}, L{maild.imap.producer}: FETCH and its streaming
  - L{maild.imap.search}: SEARCH
  - L{maild.imap.mime}: sections, BODYSTRUCTURE and ENVELOPE
  - L{maild.imap.wire}: formatting of response data
"""

from maild.imap.account import Account
from maild.imap.server import IMAPFactory, IMAPServer, IMAPSettings

__all__ = ["Account", "IMAPFactory", "IMAPServer", "IMAPSettings"]
