# twistd -ny mail.tac: the same service as `twistd maild`, configured from
# maild.toml beside this file when there is one (or $MAILD_CONFIG).
import os
from pathlib import Path

from twisted.application import service

from maild.config import configFromOptions
from maild.scheduling import applyScheduling
from maild.service import MailService

_default = Path(__file__).resolve().with_name("maild.toml") if "__file__" in globals() else Path("maild.toml")
_path = os.environ.get("MAILD_CONFIG") or (str(_default) if _default.exists() else None)

_config = configFromOptions({"config": _path})
applyScheduling(_config.cluster.scheduling)  # before any thread starts, as twistd maild does
application = service.Application("maild")
MailService(_config).setServiceParent(application)
