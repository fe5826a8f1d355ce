"""
The developer mode's JSON API over the shared mailbox's INBOX, for test
suites that send mail and then look at it:

- C{GET /api/messages}: newest first, filtered by C{to}, C{from} and
  C{subject} (case-insensitive substrings);
- C{GET /api/messages/<id>}: headers, text and HTML parts, attachments;
- C{GET /api/messages/<id>/raw}: the message as stored;
- C{DELETE /api/messages} (all) and C{DELETE /api/messages/<id>}.

A message's id is its IMAP UID, so it names the same message in
Thunderbird.  Messages are opened through the store in the reactor's
thread (where the folder index lives) and read in another.
"""

from __future__ import annotations

import json
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses

from twisted.internet import threads
from twisted.web import http, resource

from maild.store import MessageGone
from maild.web.answers import PlainAnswer
from maild.web.later import respondLater

# Bodies of text parts are returned whole up to this size.
MAX_TEXT = 1024 * 1024


def _opened(folder, uid: int):
    """
    Message C{uid} of C{folder}, open for reading; None if it is gone.
    """
    i = folder.position(uid)
    if i is None:
        return None
    try:
        return folder.open(i)
    except MessageGone:
        return None


def _readAll(f) -> bytes:
    with f:
        return f.read()


def _addresses(message, name: str) -> list[str]:
    return [address for _, address in getaddresses([str(v) for v in message.get_all(name, [])])]


def _summary(uid: int, raw: bytes) -> dict:
    message = BytesHeaderParser(policy=policy.default).parsebytes(raw)
    return {
        "id": uid,
        "from": _addresses(message, "from"),
        "to": _addresses(message, "to") + _addresses(message, "cc"),
        "subject": str(message.get("subject", "")),
        "date": str(message.get("date", "")),
        "message_id": str(message.get("message-id", "")),
        "size": len(raw),
    }


def _details(uid: int, raw: bytes) -> dict:
    message: EmailMessage = BytesParser(policy=policy.default).parsebytes(raw)
    details = _summary(uid, raw)
    details["headers"] = [[name, str(value)] for name, value in message.items()]
    details["text"] = details["html"] = None
    details["attachments"] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        kind = part.get_content_type()
        if disposition != "attachment" and kind in ("text/plain", "text/html"):
            key = "text" if kind == "text/plain" else "html"
            if details[key] is None:
                try:
                    details[key] = part.get_content()[:MAX_TEXT]
                except (LookupError, ValueError):
                    details[key] = part.get_payload(decode=True).decode("utf-8", "replace")[:MAX_TEXT]
                continue
        payload = part.get_payload(decode=True) or b""
        details["attachments"].append(
            {"filename": part.get_filename(), "content_type": kind, "size": len(payload)}
        )
    return details


def _json(request, value, code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n"


def _matches(summary: dict, filters: dict[str, str]) -> bool:
    for key, wanted in filters.items():
        value = summary[key]
        text = " ".join(value) if isinstance(value, list) else value
        if wanted.lower() not in text.lower():
            return False
    return True


class MessagesAPI(resource.Resource):
    def __init__(self, service) -> None:
        resource.Resource.__init__(self)
        self.service = service

    def _inbox(self):
        folder = self.service.store.mailbox(self.service.devMailbox).folder("INBOX")
        folder.refresh()
        return folder

    def getChild(self, name: bytes, request):
        if name == b"":
            return self
        if not name.isdigit() or len(name) > 10:
            return _Error(http.NOT_FOUND, "no such message")
        return OneMessage(self, int(name))

    def render_GET(self, request):
        folder = self._inbox()
        opened = [(uid, _opened(folder, uid)) for uid in reversed(folder.uids)]
        filters = {
            key: request.args[key.encode()][0].decode("utf-8", "replace")
            for key in ("to", "from", "subject")
            if key.encode() in request.args
        }

        def summarize():
            found = []
            for uid, f in opened:
                if f is not None:
                    summary = _summary(uid, _readAll(f))
                    if _matches(summary, filters):
                        found.append(summary)
            return found

        return _deferred(request, threads.deferToThread(summarize))

    def render_DELETE(self, request):
        folder = self._inbox()
        deleted = folder.expunge(list(folder.uids))
        return _json(request, {"deleted": len(deleted)})


class OneMessage(resource.Resource):
    def __init__(self, api: MessagesAPI, uid: int) -> None:
        resource.Resource.__init__(self)
        self.api = api
        self.uid = uid

    def getChild(self, name: bytes, request):
        if name == b"raw" and not request.postpath:
            return RawMessage(self)
        return _Error(http.NOT_FOUND, "not found")

    def opened(self):
        return _opened(self.api._inbox(), self.uid)

    def render_GET(self, request):
        f = self.opened()
        if f is None:
            return _json(request, {"error": "no such message"}, http.NOT_FOUND)
        return _deferred(request, threads.deferToThread(lambda: _details(self.uid, _readAll(f))))

    def render_DELETE(self, request):
        deleted = self.api._inbox().expunge([self.uid])
        if not deleted:
            return _json(request, {"error": "no such message"}, http.NOT_FOUND)
        return _json(request, {"deleted": 1})


class RawMessage(resource.Resource):
    isLeaf = True

    def __init__(self, message: OneMessage) -> None:
        resource.Resource.__init__(self)
        self.message = message

    def render_GET(self, request):
        f = self.message.opened()
        if f is None:
            return _json(request, {"error": "no such message"}, http.NOT_FOUND)

        def render(raw: bytes) -> bytes:
            request.setHeader(b"content-type", b"message/rfc822")
            return raw

        return respondLater(request, threads.deferToThread(_readAll, f), render)


class _Error(PlainAnswer):
    """
    The dev API's errors are JSON, like its answers.
    """

    def render(self, request):
        return _json(request, {"error": self.text}, self.code)


def _deferred(request, d):
    def render(value):
        if value is None:
            return _json(request, {"error": "no such message"}, http.NOT_FOUND)
        return _json(request, value)

    return respondLater(request, d, render)
