"""
The daemon's configuration: one immutable L{Config}, read from an optional
C{maild.toml} and then overridden by command-line options.

Both the twistd plugin and the C{maild} command build their configuration
with L{loadConfig}, so the two never disagree about a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

from maild.names import InvalidName, normalizeAddress, normalizeDomain
from maild.scheduling import AFFINITIES
from maild.scheduling import POLICIES as SCHEDULING_POLICIES

PROTOCOLS = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")

DEFAULT_LISTENERS: Mapping[str, str | None] = MappingProxyType(
    {
        "smtp": "tcp:8025",
        "submission": "tcp:8587",
        "smtps": "tcp:8465",
        "pop3": "tcp:8110",
        "pop3s": "tcp:8995",
        "imap": "tcp:8143",
        "imaps": "tcp:8993",
        # Client autoconfiguration, metrics, health (and the developer
        # mode's API): twisted.web.
        "http": "tcp:8080",
        "https": "tcp:8443",
    }
)

# Listeners that wrap their connections in TLS from the first byte (RFC 8314).
IMPLICIT_TLS = frozenset({"smtps", "pop3s", "imaps", "https"})


class ConfigError(Exception):
    """
    The configuration is unusable; C{problems} lists every mistake found,
    each a complete sentence naming the key at fault.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Limits:
    """
    Every limit a client can run into.  Times are seconds, sizes octets.
    """

    message_size: int = 25 * 1024 * 1024
    recipients: int = 100
    # SMTP and POP3 command lines (RFC 5321 says 512; ESMTP parameters
    # make real clients send more, Postfix allows 2048).
    line_length: int = 2048
    # IMAP command lines carry long UID sets (Dovecot allows 64 KiB).
    imap_line_length: int = 65536
    # Literals sent before LOGIN are capped far below the message size.
    preauth_literal_size: int = 8192
    # One IMAP command's lines and literals together (an APPEND message
    # not counted), and its number of literals: after login, and the
    # tighter bounds before it.
    imap_command_size: int = 1024 * 1024
    imap_command_literals: int = 1000
    preauth_command_size: int = 16384
    preauth_command_literals: int = 8
    imap_nesting_depth: int = 16
    connections_per_ip: int = 32
    # SMTP: a deadline for one command line and for the whole DATA
    # transfer (RFC 5321 section 4.5.3.2), and an idle timer between commands.
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # SMTP DATA must arrive at this many octets per second on average,
    # counted once it has run this long (Postfix's smtpd_min_data_rate):
    # a trickle does not hold a connection until data_timeout.
    min_data_rate: int = 500
    min_data_rate_after: float = 60.0
    idle_timeout: float = 300.0
    # POP3 (RFC 1939 section 3: at least 10 minutes) and IMAP (RFC 3501
    # section 5.4: at least 30 minutes) idle timers once logged in.
    pop3_idle_timeout: float = 600.0
    imap_idle_timeout: float = 1800.0
    # A session that has not logged in is closed after this long, even
    # if it trickles bytes.
    login_timeout: float = 180.0
    auth_failure_delay: float = 2.0
    auth_failure_delay_max: float = 15.0
    auth_failures_per_connection: int = 5
    # Clients in these networks (the host's own applications, a webmail)
    # are exempt from the per-address connection limit, and their failed
    # logins are delayed per user name rather than per address.
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class DNSSettings:
    """
    The C{[dns]} table: how maild looks names up (MX, SPF, DKIM, DMARC).
    """

    # "host" or "host:port" of the servers to ask; empty means the
    # system's (/etc/resolv.conf).
    nameservers: tuple[str, ...] = ()


@dataclass(frozen=True)
class MXSettings:
    """
    The C{[mx]} table: the trust checks on mail arriving at the MX (SPF,
    DKIM, DMARC; see L{maild.trust}).
    """

    # "enforce": DMARC p=reject failures are refused (550 5.7.1) and
    # p=quarantine failures go to the recipient's Junk folder;
    # "quarantine": both go to Junk; "report": results are only recorded.
    dmarc: str = "enforce"
    # Whether the checks run at all.
    checks: bool = True
    # Seconds to wait for one DNS answer, and for a whole SPF evaluation.
    dns_timeout: float = 5.0
    spf_timeout: float = 20.0
    # Child processes verifying DKIM signatures (maild.trust.dkimprocess),
    # so that signed mail is checked on another core; 0: in the daemon.
    # One wherever there is another core: verifying in the daemon about
    # doubled its reactor thread's CPU per signed message at C=50.
    dkim_processes: int = field(
        default_factory=lambda: 1 if (os.cpu_count() or 1) > 1 else 0, metadata={"zero": True}
    )


DMARC_POLICIES = ("enforce", "quarantine", "report")


@dataclass(frozen=True)
class POP3Options:
    """
    The C{[pop3]} table.

    @ivar uidl_format: how a message's unique id (UIDL) is made, in the
        syntax of Dovecot's C{pop3_uidl_format}: C{%u} the UID, C{%v} the
        UIDVALIDITY, C{%f} the Maildir base name, C{%08X} a zero-padded
        hexadecimal width.  A site moving from a Dovecot whose format was
        changed sets the same one here, so clients that leave mail on the
        server download nothing again.
    """

    uidl_format: str = "%08Xu%08Xv"


@dataclass(frozen=True)
class RelaySettings:
    """
    The C{[relay]} table: sending to other domains (maild.relay).  Times
    are seconds.
    """

    # "host:port" that receives every outgoing message (STARTTLS required
    # and the certificate verified; TLS from the first byte on port 465);
    # empty: deliver to each domain's MX.
    smarthost: str = ""
    smarthost_user: str = ""
    smarthost_password_file: Path | None = None
    # A CA certificate (PEM) to trust for the smarthost instead of the
    # system's.
    smarthost_cafile: Path | None = None
    # The port MX hosts are reached on (RFC 5321: 25).
    mx_port: int = 25
    # A message still undelivered after this long is bounced.
    queue_lifetime: float = 5 * 86400.0
    # Retries: first after retry_first, doubling up to retry_max.
    retry_first: float = 300.0
    retry_max: float = 3600.0
    # After this long in the queue the sender is told once of the delay.
    delay_warning: float = 4 * 3600.0
    connections: int = 20
    connections_per_destination: int = 4
    # A connection left without work waits this long for more before it
    # says QUIT (as Postfix's smtp_connection_cache_time_limit): messages
    # queued meanwhile go out on it without a new connection and TLS
    # handshake.
    connection_idle_time: float = 2.0
    # Timeouts for the remote server (RFC 5321 section 4.5.3.2 gives
    # 5 minutes per command and 10 for the reply to the end of DATA).
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # Abuse limits: recipients in other domains one user may give per
    # hour (451 4.7.1 beyond), and messages the queue may hold (452 4.3.1).
    recipients_per_hour: int = 500
    queue_max_messages: int = 20000
    # How often the daemon looks for `maild queue flush` requests and
    # for messages due to be retried.
    scan_interval: float = 1.0
    # How often the daemon looks in the queue folder for messages other
    # processes sharing it accepted (another worker's, or a node's that
    # stopped or died) and forgets those they delivered.
    rescan_interval: float = 10.0
    # With [cluster] redis: how long a node's claim on a message lasts in
    # Redis unless renewed (every third of it while the attempt runs): a
    # node that dies mid-attempt holds its messages this long.
    lease: float = 60.0
    # domain = "host:port" (like Postfix's transport map).
    routes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class WebSettings:
    """
    The C{[web]} table: what the HTTP listeners serve to whom.
    """

    # Who may read /metrics: "trusted" (limits.trusted_networks) or "anyone".
    metrics: str = "trusted"


@dataclass(frozen=True)
class DevSettings:
    """
    The C{[dev]} table: the developer's catch-all mode.
    """

    # Accept mail for every address and any login, file everything in one
    # shared mailbox, relay nothing.
    enabled: bool = False
    # Allow the mode on listeners that are not loopback-only.
    public: bool = False


@dataclass(frozen=True)
class ClusterSettings:
    """
    The C{[cluster]} table: several maild processes or nodes on one data
    folder.
    """

    # maild processes on this machine sharing the listening sockets.
    workers: int = 1
    # Who may put a PROXY header in front of a connection (haproxy: listeners).
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # redis://host:port/db shared by every node; empty for none.
    redis: str = ""
    # Linux CPU policy of maild's processes and threads (SCHED_BATCH or
    # SCHED_OTHER): see maild.scheduling.
    scheduling: str = "batch"
    # Several workers each on a share of the CPUs ("auto"), or wherever
    # the kernel puts them ("none"): see maild.scheduling.
    cpu_affinity: str = "auto"


@dataclass(frozen=True)
class LogSettings:
    """
    The C{[log]} table: where the daemon logs and how much it keeps.
    """

    # The log file; unset, the one twistd was told (--logfile, or
    # twistd.log when it daemonizes), or standard output under -n.
    file: Path | None = None
    # A file reaching this size (octets) is rotated...
    rotate_size: int = 10 * 1024 * 1024
    # ...and at most this many rotated files are kept.
    max_files: int = 10
    # "text": twistd's lines; "json": one JSON object per line (an event
    # of twisted.logger, with its fields), for log collectors.
    format: str = "text"


@dataclass(frozen=True)
class TLSFiles:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("maildata")
    hostname: str = field(default_factory=socket.getfqdn)
    domains: tuple[str, ...] = ("localhost",)
    # The user who receives postmaster@ and abuse@ of every local domain;
    # None means the first user of the users file.
    postmaster: str | None = None
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    catchall: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    listeners: Mapping[str, str | None] = field(default_factory=lambda: DEFAULT_LISTENERS)
    tls: TLSFiles = field(default_factory=TLSFiles)
    limits: Limits = field(default_factory=Limits)
    # "fsync": sync each file and each folder (portable);
    # "syncfs": one syncfs() of the data folder's file system per batch.
    sync: str = "fsync"
    # Files left in tmp/ longer than this are removed (the Maildir spec
    # says 36 hours).
    tmp_grace: float = 36 * 3600.0
    # How sessions waiting in IDLE learn of other programs' changes:
    # "inotify" (this machine's writers), "poll" (every few seconds; what a
    # shared file system such as NFS needs), "redis" (notices from every
    # node through [cluster] redis, polling while Redis is away).
    watch: str = "inotify"
    # Whether IMAP and POP3 take passwords before TLS: "loopback" only from
    # loopback addresses, "always" everywhere, "never" nowhere.
    plaintext_auth: str = "loopback"
    # Whether submission offers AUTH before TLS (by default it never does,
    # whatever the client's address, as Postfix's smtpd_tls_auth_only).
    submission_plaintext_auth: bool = False
    # [auth] rehash: replace a password hash that is not Argon2id (one
    # brought from Dovecot, say) at the user's next successful login.
    rehash_passwords: bool = False
    # Seconds a successful login is remembered (as a keyed hash, never the
    # password), sparing clients that open many connections the password
    # hash; 0 turns it off.
    login_cache: float = 300.0
    dns: DNSSettings = field(default_factory=DNSSettings)
    mx: MXSettings = field(default_factory=MXSettings)
    pop3: POP3Options = field(default_factory=POP3Options)
    relay: RelaySettings = field(default_factory=RelaySettings)
    web: WebSettings = field(default_factory=WebSettings)
    dev: DevSettings = field(default_factory=DevSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def usersFile(self) -> Path:
        return self.data_dir / "users"

    @property
    def mailDir(self) -> Path:
        return self.data_dir / "mail"

    def enabledListeners(self) -> dict[str, str]:
        """
        The listeners to start, by protocol name.
        """
        return {name: ep for name, ep in self.listeners.items() if ep}


# TOML tables read generically into a settings dataclass, by table name:
# the Config field each fills.  A new feature adds its dataclass, a Config
# field and a line here; L{_parseTable} reads every key by its annotation.
TABLES: Mapping[str, str] = MappingProxyType(
    {
        "dns": "dns",
        "mx": "mx",
        "pop3": "pop3",
        "relay": "relay",
        "web": "web",
        "dev": "dev",
        "cluster": "cluster",
        "log": "log",
    }
)

_TOP_KEYS = set(TABLES) | {
    "data_dir",
    "hostname",
    "domains",
    "postmaster",
    "aliases",
    "catchall",
    "listen",
    "tls",
    "limits",
    "store",
    "auth",
}


def _checkType(problems: list[str], key: str, value: Any, kinds: tuple) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        problems.append(f"{key}: expected {names}, got {value!r}")
    return ok


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _parseTable(
    section: str, raw: Any, cls: type, problems: list[str], base: Path | None = None
) -> dict[str, Any]:
    """
    Read the TOML table C{raw} into keyword arguments for the dataclass
    C{cls}, checking each value against the field's annotation: C{int},
    C{float}, C{bool}, C{str}, C{Path}, C{tuple[str, ...]} and
    C{Mapping[str, str]} (a sub-table), each optionally C{| None}.
    Numbers must be positive (or 0, for a field whose metadata says
    C{zero}).  Relative paths are taken from C{base}.
    """
    if not _checkType(problems, section, raw, (dict,)):
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{section}.{key}"
        if key not in fields:
            problems.append(f"{name}: unknown key (known: {', '.join(sorted(fields))})")
            continue
        kind = str(fields[key].type).replace(" | None", "")
        if kind in ("int", "float"):
            if _checkType(problems, name, value, (int,) if kind == "int" else (int, float)):
                # A field whose 0 means something says so in its metadata.
                zeroAllowed = fields[key].metadata.get("zero", False)
                if value > 0 or (zeroAllowed and value == 0):
                    parsed[key] = value
                else:
                    allowed = "0 or more" if zeroAllowed else "greater than 0"
                    problems.append(f"{name}: must be {allowed}, got {value}")
        elif kind == "bool":
            if _checkType(problems, name, value, (bool,)):
                parsed[key] = value
        elif kind == "str":
            if _checkType(problems, name, value, (str,)):
                parsed[key] = value
        elif kind == "Path":
            if _checkType(problems, name, value, (str,)):
                parsed[key] = _resolve(base or Path.cwd(), value)
        elif kind.startswith("tuple"):
            if _checkType(problems, name, value, (list,)):
                if all(_checkType(problems, name, item, (str,)) for item in value):
                    parsed[key] = tuple(value)
        elif kind.startswith("Mapping"):
            if _checkType(problems, name, value, (dict,)):
                if all(_checkType(problems, f"{name}.{k}", v, (str,)) for k, v in value.items()):
                    parsed[key] = MappingProxyType(dict(value))
        else:
            raise TypeError(f"{cls.__name__}.{key}: no reader for {kind}")
    return parsed


def _parseAddressMap(
    section: str, raw: Any, problems: list[str], keyIsDomain: bool
) -> dict[str, str]:
    if not _checkType(problems, section, raw, (dict,)):
        return {}
    parsed = {}
    for key, target in raw.items():
        try:
            key = normalizeDomain(key) if keyIsDomain else normalizeAddress(key)
            if not _checkType(problems, f"{section}.{key}", target, (str,)):
                continue
            parsed[key] = normalizeAddress(target)
        except InvalidName as e:
            problems.append(f"{section}.{key}: {e}")
    return parsed


def _parseFile(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        problems.append(f"{path}: cannot read the config file: {e.strerror}")
        return {}
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{path}: not valid TOML: {e}")
        return {}
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append(
                f"{key}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})"
            )
    if "data_dir" in raw and _checkType(problems, "data_dir", raw["data_dir"], (str,)):
        values["data_dir"] = _resolve(base, raw["data_dir"])
    if "hostname" in raw and _checkType(problems, "hostname", raw["hostname"], (str,)):
        values["hostname"] = raw["hostname"]
    if "domains" in raw and _checkType(problems, "domains", raw["domains"], (list,)):
        values["domains"] = raw["domains"]
    if "postmaster" in raw and _checkType(
        problems, "postmaster", raw["postmaster"], (str,)
    ):
        values["postmaster"] = raw["postmaster"]
    if "aliases" in raw:
        values["aliases"] = _parseAddressMap("aliases", raw["aliases"], problems, False)
    if "catchall" in raw:
        values["catchall"] = _parseAddressMap(
            "catchall", raw["catchall"], problems, True
        )
    listen = raw.get("listen", {})
    if _checkType(problems, "listen", listen, (dict,)):
        listeners = {}
        for name, ep in listen.items():
            if name not in PROTOCOLS:
                problems.append(
                    f"listen.{name}: unknown listener (known: {', '.join(PROTOCOLS)})"
                )
            elif _checkType(problems, f"listen.{name}", ep, (str,)):
                listeners[name] = ep
        if listeners:
            values["listeners"] = listeners
    tls = raw.get("tls", {})
    if _checkType(problems, "tls", tls, (dict,)):
        files = {}
        for name, value in tls.items():
            if name not in ("cert", "key"):
                problems.append(f"tls.{name}: unknown key (known: cert, key)")
            elif _checkType(problems, f"tls.{name}", value, (str,)):
                files[name] = _resolve(base, value)
        if files:
            values["tls"] = files
    if "limits" in raw:
        values["limits"] = _parseTable("limits", raw["limits"], Limits, problems, base)
    for table, fieldName in TABLES.items():
        if table in raw:
            values[fieldName] = _parseTable(
                table, raw[table], _tableClass(fieldName), problems, base
            )
    store = raw.get("store", {})
    if _checkType(problems, "store", store, (dict,)):
        for name, value in store.items():
            if name == "sync" and _checkType(problems, "store.sync", value, (str,)):
                values["sync"] = value
            elif name == "tmp_grace" and _checkType(
                problems, "store.tmp_grace", value, (int, float)
            ):
                values["tmp_grace"] = float(value)
            elif name == "watch" and _checkType(problems, "store.watch", value, (str,)):
                values["watch"] = value
            elif name not in ("sync", "tmp_grace", "watch"):
                problems.append(f"store.{name}: unknown key (known: sync, tmp_grace, watch)")
    auth = raw.get("auth", {})
    if _checkType(problems, "auth", auth, (dict,)):
        for name, value in auth.items():
            if name == "plaintext" and _checkType(
                problems, "auth.plaintext", value, (str,)
            ):
                values["plaintext_auth"] = value
            elif name == "submission_plaintext" and _checkType(
                problems, "auth.submission_plaintext", value, (bool,)
            ):
                values["submission_plaintext_auth"] = value
            elif name == "rehash" and _checkType(problems, "auth.rehash", value, (bool,)):
                values["rehash_passwords"] = value
            elif name == "login_cache" and _checkType(
                problems, "auth.login_cache", value, (int, float)
            ):
                if value < 0:
                    problems.append(f"auth.login_cache: must be 0 or more, got {value}")
                else:
                    values["login_cache"] = float(value)
            elif name not in ("plaintext", "submission_plaintext", "rehash", "login_cache"):
                problems.append(
                    "auth.{}: unknown key (known: plaintext, submission_plaintext, "
                    "rehash, login_cache)".format(name)
                )
    return values


def _tableClass(fieldName: str) -> type:
    return {f.name: f for f in dataclasses.fields(Config)}[fieldName].default_factory


# Endpoint types that wrap another endpoint string ("haproxy:tcp:993").
_WRAPPER_ENDPOINTS = frozenset({"haproxy"})
# Endpoint types that do TLS themselves.
_TLS_ENDPOINTS = frozenset({"ssl", "tls"})


def _endpointDoesTLS(description: str) -> bool:
    """
    Whether an endpoint string, after any wrappers, is one that does TLS.
    """
    for kind in description.split(":"):
        kind = kind.strip().lower()
        if kind not in _WRAPPER_ENDPOINTS:
            return kind in _TLS_ENDPOINTS
    return False


def _validateEndpoint(name: str, description: str, problems: list[str]) -> None:
    from twisted.internet import endpoints, reactor

    if name in IMPLICIT_TLS and _endpointDoesTLS(description):
        # maild wraps every implicit-TLS listener in TLS itself, with the
        # certificate it reloads; an ssl: endpoint would wrap it twice.
        problems.append(
            f"listen.{name}: {description!r} does TLS itself; maild adds TLS to this "
            "listener, so give a plain endpoint (tcp:, tcp6:, systemd:, haproxy:tcp:...)"
        )
        return

    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        problems.append(f"listen.{name}: bad endpoint string {description!r}: {e}")


def loadConfig(
    path: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """
    Build the configuration from C{path} (a TOML file; None for none) and
    C{overrides} (command-line values, which win).

    Override keys are L{Config} field names; C{listeners}, C{tls} and
    C{limits} may hold only the entries to change.  A listener set to
    C{"none"} is disabled.

    @raise ConfigError: listing every problem found.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_parseFile(Path(path), problems))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("listeners", "tls", "limits") or key in TABLES.values():
            given = {k: v for k, v in value.items() if v is not None}
            if key in TABLES.values():
                # Command-line values are checked like the file's.
                given = _parseTable(key, given, _tableClass(key), problems)
            merged = dict(values.get(key, {}))
            merged.update(given)
            values[key] = merged
        else:
            values[key] = value

    defaults = Config()
    listeners = dict(DEFAULT_LISTENERS)
    for name, ep in values.pop("listeners", {}).items():
        listeners[name] = None if ep.strip().lower() in ("", "none") else ep
    for name, ep in listeners.items():
        if ep is not None:
            _validateEndpoint(name, ep, problems)

    domains = []
    for domain in values.get("domains", defaults.domains):
        try:
            domains.append(normalizeDomain(domain))
        except (InvalidName, AttributeError) as e:
            problems.append(f"domains: {domain!r}: {e}")
    if not values.get("domains", defaults.domains):
        problems.append("domains: at least one local domain is needed")

    if values.get("postmaster") is not None:
        try:
            values["postmaster"] = normalizeAddress(values["postmaster"])
        except InvalidName as e:
            problems.append(f"postmaster: {e}")
    for key in ("aliases", "catchall"):
        for source, target in values.get(key, {}).items():
            domain = source if key == "catchall" else source.rpartition("@")[2]
            if domain not in domains:
                problems.append(f"{key}.{source}: {domain} is not a local domain")

    tls = TLSFiles(**values.pop("tls", {}))
    if (tls.cert is None) != (tls.key is None):
        problems.append("tls: give both cert and key, or neither")
    for name in ("cert", "key"):
        file = getattr(tls, name)
        if file is not None and not _readable(file):
            problems.append(f"tls.{name}: cannot read {file}")

    if values.get("sync", defaults.sync) not in ("fsync", "syncfs"):
        problems.append(f"store.sync: must be 'fsync' or 'syncfs', got {values['sync']!r}")
    if values.get("plaintext_auth", defaults.plaintext_auth) not in (
        "loopback",
        "always",
        "never",
    ):
        problems.append(
            "auth.plaintext: must be 'loopback', 'always' or 'never', "
            f"got {values['plaintext_auth']!r}"
        )
    limits = dataclasses.replace(defaults.limits, **values.pop("limits", {}))
    tables = {
        fieldName: dataclasses.replace(getattr(defaults, fieldName), **values.pop(fieldName, {}))
        for fieldName in TABLES.values()
    }
    if tables["mx"].dmarc not in DMARC_POLICIES:
        problems.append(
            f"mx.dmarc: must be one of {', '.join(DMARC_POLICIES)}, got {tables['mx'].dmarc!r}"
        )
    from maild.pop3 import BadUidlFormat, uidlFormatter

    try:
        uidlFormatter(tables["pop3"].uidl_format)
    except BadUidlFormat as e:
        problems.append(str(e))
    problems += _relayProblems(tables["relay"])
    if tables["cluster"].scheduling not in SCHEDULING_POLICIES:
        problems.append(
            "cluster.scheduling: must be one of "
            f"{', '.join(SCHEDULING_POLICIES)}, got {tables['cluster'].scheduling!r}"
        )
    if tables["cluster"].cpu_affinity not in AFFINITIES:
        problems.append(
            f"cluster.cpu_affinity: must be one of {', '.join(AFFINITIES)},"
            f" got {tables['cluster'].cpu_affinity!r}"
        )
    if values.get("watch", defaults.watch) not in ("inotify", "poll", "redis"):
        problems.append(
            f"store.watch: must be 'inotify', 'poll' or 'redis', got {values['watch']!r}"
        )
    if values.get("watch") == "redis" and not tables["cluster"].redis:
        problems.append("store.watch: 'redis' needs [cluster] redis")
    if tables["cluster"].redis:
        try:
            parseRedisURL(tables["cluster"].redis)
        except ValueError as e:
            problems.append(f"cluster.redis: {e}")
    if tables["log"].format not in ("text", "json"):
        problems.append(f"log.format: must be 'text' or 'json', got {tables['log'].format!r}")
    if tables["web"].metrics not in ("trusted", "anyone"):
        problems.append(f"web.metrics: must be 'trusted' or 'anyone', got {tables['web'].metrics!r}")
    if tables["dev"].enabled and not tables["dev"].public:
        _keepDevModeLocal(listeners, problems)
    for key, networks in (
        ("limits.trusted_networks", limits.trusted_networks),
        ("cluster.trusted_proxies", tables["cluster"].trusted_proxies),
    ):
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                problems.append(f"{key}: {network!r} is not an address or network")
    if problems:
        raise ConfigError(problems)
    values.pop("domains", None)
    return dataclasses.replace(
        defaults,
        domains=tuple(domains),
        listeners=MappingProxyType(listeners),
        tls=tls,
        limits=limits,
        **tables,
        aliases=MappingProxyType(values.pop("aliases", {})),
        catchall=MappingProxyType(values.pop("catchall", {})),
        **{k: (Path(v) if k == "data_dir" else v) for k, v in values.items()},
    )


def _relayProblems(relay: RelaySettings) -> list[str]:
    """
    Mistakes in C{[relay]}: hosts must be "host:port" (or "host").
    """
    problems = []
    hosts = [("relay.smarthost", relay.smarthost)] if relay.smarthost else []
    hosts += [(f"relay.routes.{domain}", target) for domain, target in relay.routes.items()]
    for key, target in hosts:
        host, colon, port = target.rpartition(":") if not target.endswith("]") else (target, "", "")
        if not target.strip() or (colon and not (port.isdigit() and 0 < int(port) < 65536)):
            problems.append(f"{key}: expected \"host:port\", got {target!r}")
    if relay.smarthost_user and relay.smarthost_password_file is None:
        problems.append("relay.smarthost_user: give smarthost_password_file too")
    return problems
def parseRedisURL(url: str) -> tuple[str, int, int, str | None]:
    """
    C{redis://[:password@]host[:port][/db]} as (host, port, db, password).

    @raise ValueError: for another scheme or a bad number.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"not a redis:// URL: {url!r}")
    db = int(parts.path.strip("/") or 0)
    return parts.hostname, parts.port or 6379, db, parts.password


def _endpointInterface(description: str) -> str | None:
    """
    The C{interface=} of an endpoint string (its C{\\:} escapes undone),
    or None.
    """
    for part in re.split(r"(?<!\\):", description):
        if part.startswith("interface="):
            return part[len("interface="):].replace("\\:", ":")
    return None


def _keepDevModeLocal(listeners: dict[str, str | None], problems: list[str]) -> None:
    """
    The developer mode takes any password and any recipient, so it stays
    on loopback: default listeners are bound to 127.0.0.1, and a
    configured one must be a loopback-only TCP or a UNIX endpoint.
    """
    for name, ep in listeners.items():
        if ep is None:
            continue
        if ep == DEFAULT_LISTENERS.get(name):
            listeners[name] = ep + ":interface=127.0.0.1"
            continue
        kind = ep.split(":", 1)[0]
        interface = _endpointInterface(ep)
        if kind == "unix":
            continue
        if kind in ("tcp", "tcp6") and interface and _isLoopback(interface):
            continue
        problems.append(
            f"listen.{name}: the developer mode accepts any password, so it listens "
            f"on loopback only; {ep!r} is not loopback-only (add interface=127.0.0.1, "
            "or give --dev-public)"
        )


def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


def _number(text: str | None) -> int | None:
    """
    A whole number given on the command line; a bad one is left for the
    table's own check to report (as a string, not an int).
    """
    if text is None:
        return None
    return int(text) if str(text).isdigit() else text


def configFromOptions(options: Mapping[str, Any]) -> Config:
    """
    The configuration for command-line options, as both the twistd plugin
    and the C{maild} command name them: C{config}, C{data_dir},
    C{hostname}, C{domains}, one key per protocol in L{PROTOCOLS}, C{tls_cert},
    C{tls_key}, C{dev} and C{dev_public}.  Options left at None (or false,
    for the flags) keep the file's value or the default.

    @raise ConfigError: listing every problem found.
    """
    overrides: dict[str, Any] = {
        "data_dir": Path(options["data_dir"]) if options.get("data_dir") else None,
        "hostname": options.get("hostname"),
        "domains": options.get("domains") or None,
        "listeners": {name: options.get(name) for name in PROTOCOLS},
        "tls": {
            "cert": Path(options["tls_cert"]) if options.get("tls_cert") else None,
            "key": Path(options["tls_key"]) if options.get("tls_key") else None,
        },
        "dev": {
            "enabled": True if options.get("dev") else None,
            "public": True if options.get("dev_public") else None,
        },
        "cluster": {"workers": _number(options.get("workers"))},
        "log": {"format": options.get("log_format")},
    }
    return loadConfig(options.get("config"), overrides)
