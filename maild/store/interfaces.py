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
