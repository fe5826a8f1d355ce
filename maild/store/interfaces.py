"""
The store's API as the protocols see it.
"""

from zope.interface import Attribute, Interface


class IMailStore(Interface):
    """
    Every user's mail: delivery and access to mailboxes.
    """

    def incoming(head=b""):
        """
        Start receiving a message.

        @param head: header lines to put first (CRLF endings).
        @rtype: L{maild.store.delivery.IncomingMessage}
        """

    def deliver(message, recipients, folder="INBOX"):
        """
        Store C{message} durably in C{folder} (the INBOX by default; the MX
        puts suspect mail into C{Junk}) of each of C{recipients} (canonical
        C{user@domain} addresses).

        @return: a Deferred that fires when every copy is on disk.
        """

    def mailbox(address):
        """
        @rtype: L{IUserMailbox}
        """


class IUserMailbox(Interface):
    """
    The folders of one user.
    """

    address = Attribute("The user's canonical address.")

    def ensureExists():
        """
        Create INBOX and the special-use folders if they are missing.
        """

    def folderNames():
        """
        @return: every folder name, INBOX first.
        """

    def folder(name):
        """
        @rtype: L{maild.store.folder.Folder}
        @raise maild.store.mailstore.NoSuchFolder: if it does not exist.
        """

    def create(name):
        pass

    def delete(name):
        pass

    def rename(old, new):
        pass

    def subscriptions():
        pass

    def subscribe(name):
        pass

    def unsubscribe(name):
        pass

    def specialUse(name):
        """
        @return: the RFC 6154 attribute of folder C{name}, or None.
        """

    def exists(name):
        """
        @return: whether folder C{name} exists.
        """

    def lockMaildrop():
        """
        Take the POP3 maildrop lock (RFC 1939 section 8) without waiting.

        @return: a hold with a C{release()} method, or None when another
            session or process holds the lock.
        """


class IFolder(Interface):
    """
    One folder: an index of its messages (UIDs, flag bytes, base names, in
    UID order) shared by every session of the process, and every way to
    change it.  Protocols read and change messages only through it; none
    of them sees a path.
    """

    name = Attribute("The IMAP name (INBOX, Sent, Lists/Python).")
    uidvalidity = Attribute("The UIDVALIDITY, as of the last refresh.")
    uidnext = Attribute("The next UID to be given.")
    uids = Attribute("An array of the UIDs, ascending.")
    flags = Attribute("A bytearray of flag bits (maild.store.maildir), by index.")
    keywords = Attribute("The folder's keyword names (maild.store.keywords.Keywords).")

    def refresh():
        """
        Catch up with the disk and tell the listeners what changed.

        @rtype: L{maild.store.folder.FolderChange}
        """

    def addListener(listener):
        """
        Call C{listener.folderChanged(folder, change)} on every change.
        """

    def removeListener(listener):
        pass

    def position(uid):
        """
        @return: the index of C{uid}, or None.
        """

    def open(i):
        """
        Open message C{i} for reading (LF line endings).

        @raise maild.store.MessageGone: if someone else expunged it.
        """

    def read(i):
        """
        @return: the whole of message C{i} (LF line endings).
        """

    def sizes(i):
        """
        @return: the size on disk and the size served with CRLF.
        """

    def internalDate(i):
        """
        @return: when message C{i} arrived (seconds since the epoch).
        """

    def setFlags(positions, bits, keywordLetters="", mode=0, origin=None):
        """
        Replace (0), add (1) or remove (-1) flags of messages by index.
        """

    def claimRecent(positions=None):
        """
        Take the \\Recent messages for the calling session.
        """

    def expunge(uids, origin=None):
        """
        Remove messages for good.
        """

    def append(message, bits=0, keywords=(), internalDate=None, origin=None):
        """
        Store an L{maild.store.IncomingMessage} here durably, its flags,
        keywords and INTERNALDATE set before any reader can see it.

        @return: a Deferred firing with C{(UIDVALIDITY, UID)}.
        """

    def copyTo(indexes, destination, origin=None):
        """
        Copy messages into another folder with their flags, keywords and
        INTERNALDATE.

        @return: a Deferred firing with C{(UIDVALIDITY, [(UID, new UID)])}.
        """

    def watch():
        """
        Notice other programs' changes at once, until L{unwatch}.
        """

    def unwatch():
        pass
