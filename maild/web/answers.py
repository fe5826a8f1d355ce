"""
Fixed answers: leaves that answer any request with one status code and a
short text (a 404, a 400...).
"""

from __future__ import annotations

from twisted.web import resource


class PlainAnswer(resource.Resource):
    """
    A leaf that answers C{code} with C{text} as plain text; subclasses
    choose another form for the same text by overriding L{render}.
    """

    isLeaf = True

    def __init__(self, code: int, text: str) -> None:
        resource.Resource.__init__(self)
        self.code = code
        self.text = text

    def render(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.text.encode("utf-8") + b"\n"
