"""
The relay's commands for C{maild}: C{queue list | show ID | flush [ID] |
delete ID} (like Postfix's C{postqueue -p} and C{-f}) and C{dns [DOMAIN]},
the records to publish for a domain.
"""

from __future__ import annotations

import time
from typing import IO

from publicsuffixlist import PublicSuffixList

from maild.config import Config
from maild.relay.destinations import parseHostPort
from maild.relay.dkim import DKIMKeys
from maild.relay.queue import OutboundQueue, validQueueId
from maild.relay.relay import FLUSH_ALL

# The SRV records of RFC 6186 and RFC 8314, by listener.
_SRV = (
    ("submissions", "smtps"),
    ("submission", "submission"),
    ("imaps", "imaps"),
    ("imap", "imap"),
    ("pop3s", "pop3s"),
    ("pop3", "pop3"),
)


def queueCommand(args, config: Config, stdout: IO[str], stderr: IO[str]) -> int:
    queue = OutboundQueue(config.data_dir / "queue", committer=None)
    if args.action == "list":
        return _list(queue, stdout)
    if args.action == "flush":
        target = args.id or FLUSH_ALL
        if target != FLUSH_ALL and not validQueueId(target):
            stderr.write(f"error: {target} is not a queue id\n")
            return 1
        requests = queue.path / "flush"
        requests.mkdir(parents=True, exist_ok=True)
        (requests / target).touch()
        stdout.write(
            f"flush of {'every message' if target == FLUSH_ALL else target} requested; "
            f"the daemon tries within {config.relay.scan_interval:g} s\n"
        )
        return 0
    if not validQueueId(args.id) or not queue.envelopePath(args.id).exists():
        stderr.write(f"error: no message {args.id} in the queue\n")
        return 1
    if args.action == "show":
        stdout.write(queue.envelopePath(args.id).read_text("utf-8") + "\n\n")
        stdout.write(queue.messagePath(args.id).read_bytes().decode("utf-8", "replace"))
        return 0
    # The message first: an envelope without one is never sent (and a
    # daemon that had it in hand forgets it).
    queue.messagePath(args.id).unlink(missing_ok=True)
    queue.envelopePath(args.id).unlink(missing_ok=True)
    stdout.write(f"deleted {args.id}\n")
    return 0


def _list(queue: OutboundQueue, stdout: IO[str]) -> int:
    entries = queue.entries()
    for entry in sorted(entries, key=lambda e: e.arrival):
        try:
            size = queue.messagePath(entry.id).stat().st_size
        except OSError:
            continue
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(entry.arrival))
        nextTry = time.strftime("%H:%M:%S", time.localtime(entry.nextTry))
        stdout.write(f"{entry.id}  {size:>8}  {arrival}  <{entry.sender}>  next try {nextTry}\n")
        for recipient in entry.recipients:
            stdout.write(f"    <{recipient.address}> {recipient.state}, {recipient.attempts} attempt(s)")
            stdout.write(f": {recipient.reply}\n" if recipient.reply else "\n")
    corrupt = queue.corrupt()
    stdout.write(f"-- {len(entries)} message(s) in the queue\n")
    if corrupt:
        stdout.write(
            f"-- {len(corrupt)} unreadable file(s) moved aside in {queue.corruptPath}: "
            + ", ".join(corrupt)
            + "\n"
        )
    return 0


def dnsCommand(args, config: Config, stdout: IO[str], stderr: IO[str]) -> int:
    domains = [args.domain.lower()] if args.domain else list(config.domains)
    unknown = [d for d in domains if d not in config.domains]
    if unknown:
        stderr.write(f"error: {', '.join(unknown)} is not a local domain ({', '.join(config.domains)})\n")
        return 1
    keys = DKIMKeys(config.data_dir / "dkim")
    keys.ensure(domains)
    host = config.hostname.rstrip(".") + "."
    for domain in domains:
        name = domain + "."
        stdout.write(f"; DNS records for {domain}, ready to paste into its zone\n")
        stdout.write(f"{name}\t3600\tIN\tMX\t10 {host}\n")
        if config.relay.smarthost:
            provider = PublicSuffixList().privatesuffix(
                parseHostPort(config.relay.smarthost, 587).host
            )
            stdout.write(
                f"; mail leaves through the smarthost: check your provider's SPF include\n"
                f'{name}\t3600\tIN\tTXT\t"v=spf1 mx include:{provider} -all"\n'
            )
        else:
            stdout.write(f'{name}\t3600\tIN\tTXT\t"v=spf1 mx -all"\n')
        for key in keys.keysFor(domain):
            stdout.write(
                f"{key.selector}._domainkey.{name}\t3600\tIN\tTXT\t{_txtStrings(key.txtRecord())}\n"
            )
        stdout.write(
            "; DMARC: p=none only asks for reports; once they show all your mail\n"
            "; passing SPF or DKIM, move to p=quarantine, then p=reject\n"
            f'_dmarc.{name}\t3600\tIN\tTXT\t"v=DMARC1; p=none; rua=mailto:postmaster@{domain}"\n'
        )
        stdout.write("; RFC 6186 and RFC 8314: how mail clients find the servers\n")
        for service, listener in _SRV:
            port = _port(config.listeners.get(listener))
            if port:
                stdout.write(f"_{service}._tcp.{name}\t3600\tIN\tSRV\t0 1 {port} {host}\n")
        stdout.write("\n")
    return 0


def _txtStrings(text: str) -> str:
    """
    A TXT record's text as quoted strings of at most 255 octets each
    (RFC 1035 section 3.3.14); resolvers join them.
    """
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


def _port(endpoint: str | None) -> int | None:
    if not endpoint:
        return None
    parts = endpoint.split(":")
    if parts[0] in ("tcp", "tcp6", "ssl") and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return None
