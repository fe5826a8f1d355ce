"""
Answering an HTTP request when a Deferred fires (work done in a thread),
without writing to a client that has gone meanwhile.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.web import server


def respondLater(request, d: defer.Deferred, render: Callable[[Any], bytes]):
    """
    Return C{NOT_DONE_YET} for C{request}; when C{d} fires, write what
    C{render} makes of its result (C{render} may set the code and headers).
    """
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def answer(value):
        body = render(value)
        if not gone:
            request.write(body)
            request.finish()

    def failed(reason):
        if not gone:
            request.processingFailed(reason)

    d.addCallback(answer)
    d.addErrback(failed)
    return server.NOT_DONE_YET
