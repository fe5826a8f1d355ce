"""
What FETCH derives from a message's octets (ENVELOPE, BODY,
BODYSTRUCTURE, the header block), kept once per folder for every session
that has it selected.

A message's octets never change under its UID (RFC 3501 section
2.3.1.1), so neither does anything rendered from them: a session fetching
ENVELOPE for messages another session just fetched reads no file and
parses no MIME.  Dovecot keeps the same in its index cache file.  Workers
of one machine also share what they rendered (L{maild.imap.sharedcache}).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Callable

from twisted.logger import Logger

from maild.imap.sharedcache import SharedRenderings

log = Logger()

# Messages remembered per folder (the least recently used are forgotten);
# each costs a few kilobytes at most.
MESSAGES_PER_FOLDER = 4096

_caches: "weakref.WeakKeyDictionary[object, FolderCache]" = weakref.WeakKeyDictionary()


class FolderCache:
    """
    Renderings of one folder's messages by UID, for one UIDVALIDITY.
    """

    def __init__(
        self,
        uidvalidity: int,
        limit: int = MESSAGES_PER_FOLDER,
        shared: SharedRenderings | None = None,
        folderKey: bytes = b"",
    ) -> None:
        self.uidvalidity = uidvalidity
        self.limit = limit
        self._messages: OrderedDict[int, dict[bytes, bytes]] = OrderedDict()
        # The other workers' renderings (L{maild.imap.sharedcache}), under
        # keys that name the folder and its UIDVALIDITY.
        self._shared = shared
        self._sharedKey = b"%s\0%d\0" % (folderKey, uidvalidity)

    def get(self, uid: int, name: bytes, make: Callable[[], bytes]) -> bytes:
        """
        The rendering C{name} of message C{uid}, made by C{make} the first
        time it is asked for.
        """
        entry = self._messages.get(uid)
        if entry is None:
            entry = self._messages[uid] = {}
            if len(self._messages) > self.limit:
                self._messages.popitem(last=False)
        else:
            self._messages.move_to_end(uid)
        value = entry.get(name)
        if value is None:
            shared = self._shared
            if shared is None:
                value = entry[name] = make()
            else:
                key = b"%s%d\0%s" % (self._sharedKey, uid, name)
                value = shared.get(key)
                if value is None:
                    value = make()
                    shared.put(key, value)
                entry[name] = value
        return value


_shared: list[SharedRenderings | None] = []


def _sharedRenderings() -> SharedRenderings | None:
    """
    This worker's view of the renderings its siblings share, if the
    parent handed it one.
    """
    if not _shared:
        try:
            _shared.append(SharedRenderings.fromEnvironment())
        except (OSError, ValueError):
            log.failure("cannot use the renderings the workers share: each renders its own")
            _shared.append(None)
    return _shared[0]


def folderCache(folder) -> FolderCache:
    """
    The cache of C{folder} (a L{maild.store.folder.MaildirFolder}), shared
    by every session of this process; a new UIDVALIDITY (the folder was
    made anew) starts an empty one.
    """
    cache = _caches.get(folder)
    if cache is None or cache.uidvalidity != folder.uidvalidity:
        shared = _sharedRenderings()
        folderKey = os.fsencode(os.path.abspath(folder.path)) if shared is not None else b""
        cache = _caches[folder] = FolderCache(folder.uidvalidity, shared=shared, folderKey=folderKey)
    return cache
