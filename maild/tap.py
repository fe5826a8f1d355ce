"""
The twistd plugin's options and service maker (C{twistd maild}).
"""

from __future__ import annotations

import os

from twisted.logger import Logger
from twisted.python import usage

from maild.config import PROTOCOLS, ConfigError, configFromOptions
from maild.logs import WORKER_NAME_ENV, twistdDestination
from maild.scheduling import applyScheduling, placeWorker
from maild.service import MailService
from maild.workers import WorkerSupervisor, stopOnce

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the maild mail server: SMTP, submission, POP3 and IMAP over a "
        "Maildir store.  Settings come from --config (a TOML file), then "
        "from these options.  Listeners are Twisted endpoint strings "
        '(e.g. tcp:8025:interface=127.0.0.1), or "none" to disable one.'
    )
    optParameters = [
        ["config", "c", None, "Configuration file (TOML)."],
        ["data-dir", "d", None, "Data folder (default ./maildata)."],
        ["hostname", None, None, "This server's host name (default: the FQDN)."],
        ["tls-cert", None, None, "TLS certificate chain (PEM)."],
        ["tls-key", None, None, "TLS private key (PEM)."],
        ["workers", None, None, "maild processes sharing the listeners (default 1)."],
        ["log-format", None, None, 'Log lines as "text" (default) or "json" (one event per line).'],
    ] + [[name, None, None, f"Listener for {name.upper()}."] for name in PROTOCOLS]
    optFlags = [
        ["dev", None, "Developer mode: accept mail for any address and any login, "
         "in one shared mailbox; relay nothing (loopback only)."],
        ["dev-public", None, "Allow the developer mode on non-loopback listeners."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["domains"] = []

    def opt_domain(self, domain: str) -> None:
        """
        A local domain (repeat for several; default localhost).
        """
        self["domains"].append(domain)

    def postOptions(self) -> None:
        values = {key.replace("-", "_"): value for key, value in self.items()}
        try:
            self.config = configFromOptions(values)
        except ConfigError as e:
            raise usage.UsageError("\n" + "\n".join(e.problems))


def makeService(options: Options):
    # Before any thread or worker starts, so that they inherit it.
    applyScheduling(options.config.cluster.scheduling)
    cpus = placeWorker()
    if cpus is not None:
        log.info("running on CPU {cpus}", cpus=",".join(map(str, cpus)))
    if options.config.cluster.workers > 1:
        top = WorkerSupervisor(options.config, options)
    else:
        top = MailService(options.config)
    if os.environ.get(WORKER_NAME_ENV):
        from twisted.internet import reactor

        stopOnce(reactor)
    twistd = getattr(options, "parent", None)
    if twistd is not None and twistd.get("logger"):
        # A log observer given to twistd (a worker's, say) is used as is.
        top.logDestination = None
    elif top.logDestination is None:
        # twistd's own options (--logfile, -n, --syslog) say where to log.
        top.logDestination = twistdDestination(twistd)
    return top


__all__ = ["Options", "makeService"]
