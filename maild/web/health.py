"""
C{/healthz}: 200 when every listener is up and the data folder takes a
write, 503 (with what is wrong) otherwise; for load balancers, container
orchestrators and monitoring.
"""

from __future__ import annotations

import json
import os

from twisted.internet import threads
from twisted.web import resource

from maild.web.later import respondLater


def _probeWrite(dataDir) -> str | None:
    """
    Create, sync and remove a small file in the data folder's C{tmp/}
    (where deliveries start); the error, or None.
    """
    folder = dataDir / "tmp"
    path = folder / f".healthz.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"ok")
            os.fsync(f.fileno())
        os.unlink(path)
    except OSError as e:
        return f"data folder not writable: {e.strerror}"
    return None


class Health(resource.Resource):
    isLeaf = True

    def __init__(self, service) -> None:
        resource.Resource.__init__(self)
        self.service = service

    def render_GET(self, request):
        down = [name for name, listener in self.service.listeners.items() if listener.port is None]
        # The file system may hang (NFS): the write is done off the reactor.
        d = threads.deferToThreadPool(
            self.service.reactor, self.service.reactor.getThreadPool(),
            _probeWrite, self.service.config.data_dir,
        )

        def render(storeProblem):
            problems = [f"listener {name} is not listening" for name in down]
            if storeProblem:
                problems.append(storeProblem)
            request.setResponseCode(503 if problems else 200)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            body = {"status": "fail" if problems else "ok", "problems": problems}
            return json.dumps(body).encode() + b"\n"

        return respondLater(request, d, render)
