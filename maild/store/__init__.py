"""
Maildir storage: durable delivery, folders, flags and UIDs.  No protocol
module touches the file system; everything goes through this package.
"""

from maild.store.delivery import Committer, DeliveryFailed, IncomingMessage, Target
from maild.store.folder import Folder, FolderChange, MessageGone
from maild.store.mailstore import (
    FolderError,
    FolderExists,
    MailStore,
    NoSuchFolder,
    UserMailbox,
)

__all__ = [
    "Committer",
    "DeliveryFailed",
    "Folder",
    "FolderChange",
    "FolderError",
    "FolderExists",
    "IncomingMessage",
    "MailStore",
    "MessageGone",
    "NoSuchFolder",
    "Target",
    "UserMailbox",
]
