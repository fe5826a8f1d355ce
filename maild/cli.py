"""
The C{maild} command: manage users, check the configuration, send mail.

    maild [--config maild.toml] [--data-dir DIR] user add|del|passwd|list [NAME] [--password-stdin]
    maild [--config maild.toml] [--data-dir DIR] check [--live]
    maild [--config maild.toml] [--data-dir DIR] cert [--renew] [--ca]
    maild [--config maild.toml] [--data-dir DIR] send ...
    maild [--config maild.toml] [--data-dir DIR] queue list | show ID | flush [ID] | delete ID
    maild [--config maild.toml] [--data-dir DIR] dns [DOMAIN]
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import IO

from maild import client, livecheck
from maild.accounts import AccountError, Accounts, keepOwner
from maild.config import Config, ConfigError, configFromOptions
from maild.names import InvalidName, normalizeAddress
from maild.relay import commands as relaycommands
from maild.store import MailStore
from maild.tls import certificateFiles, fingerprint, localCA


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maild", description="Manage a maild server.")
    parser.add_argument("--config", "-c", help="configuration file (TOML)")
    parser.add_argument("--data-dir", "-d", help="data folder (default ./maildata)")
    commands = parser.add_subparsers(dest="command", required=True)

    user = commands.add_parser("user", help="add, delete, list users, change passwords")
    actions = user.add_subparsers(dest="action", required=True)
    for action, text in (("add", "add a user"), ("passwd", "change a user's password")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name", help="user@domain (or a name in the first domain)")
        sub.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input",
        )
    delete = actions.add_parser("del", help="delete a user (their mail stays on disk)")
    delete.add_argument("name")
    actions.add_parser("list", help="list the users")

    check = commands.add_parser("check", help="validate the configuration and data folder")
    check.add_argument(
        "--live",
        action="store_true",
        help="also connect to each listener of the running daemon and report",
    )
    check.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each listener (--live)"
    )
    cert = commands.add_parser(
        "cert",
        help="show the TLS certificate (made by maild's local CA when none is configured)",
    )
    cert.add_argument(
        "--renew",
        action="store_true",
        help="replace the server certificate the local CA made with a new one (the CA stays)",
    )
    cert.add_argument(
        "--ca",
        action="store_true",
        help="print the local CA's certificate (PEM), to import once on each device as trusted",
    )
    send = commands.add_parser("send", help="send a message (interactive or scripted)")
    client.addArguments(send)
    queue = commands.add_parser("queue", help="the outbound queue: list, show, flush, delete")
    queueActions = queue.add_subparsers(dest="action", required=True)
    queueActions.add_parser("list", help="list the queued messages and their recipients")
    for action, text in (("show", "show a message's envelope and content"), ("delete", "delete a message")):
        queueActions.add_parser(action, help=text).add_argument("id")
    flush = queueActions.add_parser("flush", help="ask the running daemon to try now")
    flush.add_argument("id", nargs="?", help="one message (default: all)")
    dns = commands.add_parser("dns", help="print the DNS records to publish for a domain")
    dns.add_argument("domain", nargs="?", help="a local domain (default: all)")
    return parser


def _password(args, stdin: IO[str]) -> str:
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise AccountError("the passwords differ")
    if not password:
        raise AccountError("an empty password is not allowed")
    return password


def _account(name: str, config: Config) -> str:
    if "@" not in name:
        name = f"{name}@{config.domains[0]}"
    address = normalizeAddress(name)
    domain = address.rpartition("@")[2]
    if domain not in config.domains:
        raise AccountError(
            f"{domain} is not a local domain (local: {', '.join(config.domains)})"
        )
    return address


def _ownLikeDataFolder(dataDir: Path, userRoot: Path) -> None:
    """
    Run as root, give what C{maild user add} just made (the user's Maildir
    and the directories above it) to the data folder's owner: the daemon
    runs as that user (C{twistd -u}, systemd C{User=}), and so does
    Dovecot's mail process, and they must write there.
    """
    if os.geteuid() != 0:
        return
    st = os.stat(dataDir)
    owner = (st.st_uid, st.st_gid)
    made = [dataDir / "mail", userRoot.parent]
    for top, dirs, files in os.walk(userRoot):
        made.append(Path(top))
        made.extend(Path(top) / name for name in files)
    for path in made:
        keepOwner(path, owner)


def _user(args, config: Config, stdin: IO[str], stdout: IO[str]) -> int:
    accounts = Accounts(config.usersFile)
    if args.action == "list":
        for address in accounts.users():
            stdout.write(address + "\n")
        return 0
    address = _account(args.name, config)
    if args.action == "add":
        accounts.add(address, _password(args, stdin))
        mailbox = MailStore(config.data_dir).mailbox(address)
        mailbox.ensureExists()
        _ownLikeDataFolder(config.data_dir, mailbox.root)
        stdout.write(f"added {address}\n")
    elif args.action == "passwd":
        accounts.setPassword(address, _password(args, stdin))
        stdout.write(f"changed the password of {address}\n")
    elif args.action == "del":
        accounts.delete(address)
        stdout.write(f"deleted {address} (the mail in {config.mailDir} is kept)\n")
    return 0


def _check(args, config: Config, stdout: IO[str], stderr: IO[str]) -> int:
    problems = []
    accounts = Accounts(config.usersFile)
    try:
        users = accounts.users()
    except OSError as e:
        problems.append(f"{config.usersFile}: cannot read: {e.strerror}")
        users = []
    for source, target in list(config.aliases.items()) + list(config.catchall.items()):
        if users and target not in users:
            problems.append(f"{source} leads to {target}, who is not a user")
    if config.postmaster is not None and users and config.postmaster not in users:
        problems.append(f"postmaster: {config.postmaster} is not a user")
    if config.data_dir.exists() and not config.data_dir.is_dir():
        problems.append(f"data_dir: {config.data_dir} is not a folder")
    for problem in problems:
        stderr.write(f"error: {problem}\n")
    if problems:
        return 1
    stdout.write(f"configuration OK: data in {config.data_dir}, domains {', '.join(config.domains)}\n")
    for name, endpoint in config.enabledListeners().items():
        stdout.write(f"  {name}: {endpoint}\n")
    stdout.write(f"  {len(users)} user(s)\n")
    if not args.live:
        return 0
    certPath = config.tls.cert or config.data_dir / "tls" / "cert.pem"
    results = livecheck.checkLive(config, certPath if certPath.exists() else None, args.timeout)
    for result in results:
        stdout.write(result.line() + "\n")
    return 0 if all(result.ok for result in results) else 1


def _cert(args, config: Config, stdout: IO[str], stderr: IO[str]) -> int:
    authority = localCA(config)
    if authority is None and (args.renew or args.ca):
        stderr.write(
            f"error: the certificate is configured ({config.tls.cert}): maild has no local CA "
            "and does not change configured files\n"
        )
        return 1
    if args.renew:
        authority.renew()
    certPath, keyPath = certificateFiles(config)
    if args.ca:
        stdout.write(authority.certPath.read_text("ascii"))
        return 0
    stdout.write(f"certificate {certPath}\nkey         {keyPath}\nSHA-256     {fingerprint(certPath)}\n")
    if authority is not None:
        stdout.write(
            f"signed by   {authority.certPath} (export it with `maild cert --ca > maild-ca.pem`)\n"
        )
    stdout.write("(a running daemon renews its certificate itself; SIGHUP makes it load new files)\n")
    return 0


def main(
    argv: list[str] | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        config = configFromOptions({"config": args.config, "data_dir": args.data_dir})
    except ConfigError as e:
        for problem in e.problems:
            stderr.write(f"error: {problem}\n")
        return 1
    try:
        if args.command == "user":
            return _user(args, config, stdin, stdout)
        if args.command == "check":
            return _check(args, config, stdout, stderr)
        if args.command == "cert":
            return _cert(args, config, stdout, stderr)
        if args.command == "send":
            return client.run(args, stdin, stdout, stderr)
        if args.command == "queue":
            return relaycommands.queueCommand(args, config, stdout, stderr)
        if args.command == "dns":
            return relaycommands.dnsCommand(args, config, stdout, stderr)
    except (AccountError, InvalidName) as e:
        stderr.write(f"error: {e}\n")
        return 1
    except OSError as e:
        # A data folder that cannot be written (the daemon's user owns it).
        stderr.write(f"error: {e.filename or ''}: {e.strerror}\n")
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
