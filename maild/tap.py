"""
The twistd plugin's options and service maker (C{twistd maild}).
"""

from __future__ import annotations


from twisted.python import usage

from maild.config import PROTOCOLS, ConfigError, configFromOptions
from maild.logs import twistdDestination
from maild.service import MailService


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
    ] + [[name, None, None, f"Listener for {name.upper()}."] for name in PROTOCOLS]

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


def makeService(options: Options) -> MailService:
    mail = MailService(options.config)
    if mail.logDestination is None:
        # twistd's own options (--logfile, -n, --syslog) say where to log.
        mail.logDestination = twistdDestination(options.parent)
    return mail


__all__ = ["Options", "makeService"]
