#!/usr/bin/env python3
"""
SMTP load generator.

Delivers N messages of S bytes over C concurrent SMTP connections and
reports how many were accepted or refused, the throughput, and the latency
from sending the end-of-data "." to receiving the final reply.

The client uses asyncio streams and the standard library only, so it does
not share the server's framework, and spends as little CPU as it can: the
message body is built once, and each message only gets its own short
header block (unique Date, Subject and Message-ID), so the server, which
usually runs on the same cores, keeps most of the machine.

Example::

    python bench/smtp_load.py --server 127.0.0.1:8025 --messages 10000 \\
        --concurrency 50 --to alice@localhost
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import email.utils
import json
import math
import os
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SIZE = 10240

# Content characters per body line: RFC 5322 section 2.1.1 asks for lines
# of at most 78 characters; staying under that keeps every line ordinary.
MIN_LINE = 30
MAX_LINE = 74

# Roughly one body line in this many starts with a dot, so that every
# message exercises the server's dot-unstuffing.
DOT_LINE_EVERY = 25

WORDS = (
    "the quick brown fox jumps over lazy dog mail server queue delivery "
    "message folder durable write sync batch latency throughput client "
    "report meeting agenda minutes budget review draft please find attached "
    "thanks regards tomorrow morning afternoon schedule project update status "
    "question answer network storage backup restore invoice payment order"
).split()

# Errors that mean a connection can no longer be used.  asyncio raises
# ValueError when a reply line exceeds the stream's buffer limit.
CONNECTION_ERRORS = (OSError, EOFError, ValueError, TimeoutError)


class ConnectionDropped(Exception):
    """
    The server closed the connection, stopped answering, or answered in a
    way that leaves the session unusable.

    C{refusal}, when set, is the reply (such as C{"MAIL 421"}) that refused
    the message in flight before the server hung up: that message then
    counts as refused rather than lost.
    """

    def __init__(self, reason: str, refusal: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refusal = refusal


class MessageFactory:
    """
    Builds unique RFC 5322 messages of an exact size, ready for DATA.

    The body is generated and dot-stuffed once; each message only formats
    a header block whose fields have a fixed width, so every message is
    exactly C{size} octets (before dot-stuffing) and costs a few
    microseconds to build.
    """

    def __init__(self, sender: str, recipient: str, size: int, count: int) -> None:
        self.sender = sender
        self.recipient = recipient
        self.size = size
        self.numberWidth = len(str(max(count - 1, 0)))
        self.domain = sender.rpartition("@")[2] or "localhost"
        # Message-IDs must stay unique across runs against the same server.
        self.runId = f"{int(time.time())}.{os.getpid()}"
        self.cachedSecond = -1
        self.cachedDate = ""
        bodySize = size - len(self.header(0))
        if bodySize < 2:
            raise ValueError(
                f"--size must be at least {size - bodySize + 2} octets "
                f"to hold the headers"
            )
        self.body = makeBody(bodySize, random.Random(size))
        self.wireBody = dotStuff(self.body) + b".\r\n"
        # Per message: a DKIM-Signature field, when signing is on.
        self.signatures: list[bytes] = []

    def sign(
        self, key: bytes, selector: str, algorithm: str, count: int,
        canonicalization: str = "relaxed/simple",
    ) -> None:
        """
        DKIM-sign messages 0 to C{count} - 1 for the sender's domain, ahead
        of the run so that signing costs the measured run nothing; called
        again, adds another signature on top.  The signature covers From,
        To, Subject and Message-ID (not Date, which is formatted when the
        message is sent).  Needs dkimpy (and signs RSA with OpenSSL when
        maild is importable: dkimpy's Python takes 16 ms a signature).
        """
        import dkim

        try:
            from maild import dkimrsa
        except ImportError:
            pass
        else:
            dkimrsa.install()
        previous = self.signatures or [b""] * count
        self.signatures = [
            dkim.sign(
                previous[number] + self.header(number) + self.body,
                selector.encode("ascii"),
                self.domain.encode("ascii"),
                key,
                signature_algorithm=algorithm.encode("ascii"),
                include_headers=[b"from", b"to", b"subject", b"message-id"],
                canonicalize=tuple(canonicalization.encode("ascii").split(b"/")),
            )
            + previous[number]
            for number in range(count)
        ]

    def header(self, number: int) -> bytes:
        """
        The header block and blank line of message C{number}.
        """
        now = int(time.time())
        if now != self.cachedSecond:
            # formatdate() always yields the same width, and takes a few
            # microseconds: once a second is enough.
            self.cachedSecond = now
            self.cachedDate = email.utils.formatdate(now, usegmt=True)
        tag = str(number).zfill(self.numberWidth)
        return (
            f"Date: {self.cachedDate}\r\n"
            f"From: maild benchmark <{self.sender}>\r\n"
            f"To: <{self.recipient}>\r\n"
            f"Subject: Benchmark message {tag}\r\n"
            f"Message-ID: <{self.runId}.{tag}@{self.domain}>\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"Content-Transfer-Encoding: 7bit\r\n"
            f"\r\n"
        ).encode("ascii")

    def build(self, number: int) -> bytes:
        """
        Message C{number}, dot-stuffed and followed by the end-of-data line.
        """
        signature = self.signatures[number] if self.signatures else b""
        return signature + self.header(number) + self.wireBody


def makeText(rng: random.Random, length: int) -> str:
    """
    About C{length} characters of words, cut to exactly C{length}.
    """
    words = []
    # The length of " ".join(words): each word after the first adds a space.
    total = -1
    while total < length:
        word = rng.choice(WORDS)
        words.append(word)
        total += len(word) + 1
    text = " ".join(words)[:length]
    # No trailing space: some software strips it, which would change the size.
    if text.endswith(" "):
        text = text[:-1] + "."
    return text


def makeBody(size: int, rng: random.Random) -> bytes:
    """
    Exactly C{size} octets of CRLF-terminated ASCII text lines, each
    shorter than 78 characters, some of them starting with a dot.
    """
    lines = []
    remaining = size
    lineNumber = 0
    # Each line takes at most MAX_LINE + 2 octets, so stopping above that
    # bound leaves room for a final line of between 0 and MAX_LINE characters.
    while remaining > MAX_LINE + 2:
        length = rng.randint(MIN_LINE, MAX_LINE)
        lineNumber += 1
        if lineNumber % DOT_LINE_EVERY == 0:
            line = "." + makeText(rng, length - 1)
        else:
            line = makeText(rng, length)
        lines.append(line)
        remaining -= length + 2
    lines.append(makeText(rng, remaining - 2))
    return "".join(line + "\r\n" for line in lines).encode("ascii")


def dotStuff(body: bytes) -> bytes:
    """
    Double the leading dot of every line (RFC 5321 section 4.5.2).
    C{body} starts at the beginning of a line and ends with CRLF.
    """
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


@dataclass
class Security:
    """
    TLS and AUTH for the sessions: implicit TLS (SMTPS), STARTTLS, and a
    user to log in as (AUTH PLAIN), as a submission server wants.
    """

    implicit: bool = False
    starttls: bool = False
    context: ssl.SSLContext | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def fromOptions(cls, options: argparse.Namespace) -> "Security":
        context = None
        if options.tls or options.starttls:
            context = ssl.create_default_context(cafile=options.cafile)
            if options.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return cls(options.tls, options.starttls, context, options.user, options.password)


class SMTPClient:
    """
    One SMTP session over asyncio streams.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.pipelining = False
        # Set after a failed transaction: the server may still hold its
        # MAIL FROM, so the next transaction starts with RSET.
        self.needsReset = False
        # Set by greet(), once the server's extensions are known.
        self.mailCommand = b""
        self.rcptCommand = b""

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        localAddress: str | None,
        timeout: float,
        sender: str,
        recipient: str,
        size: int,
        usePipelining: bool,
        security: Security,
    ) -> SMTPClient:
        """
        Connect (with TLS from the first byte for --tls), read the greeting
        and say EHLO; then STARTTLS and AUTH when asked for.
        """
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                local_addr=(localAddress, 0) if localAddress else None,
                ssl=security.context if security.implicit else None,
                server_hostname=host if security.implicit else None,
            )
            client = cls(reader, writer, timeout)
            try:
                await client.greet(sender, recipient, size, usePipelining)
                if security.starttls:
                    await client.startTLS(security.context, host)
                    await client.greet(sender, recipient, size, usePipelining, greeting=False)
                if security.user:
                    await client.authenticate(security.user, security.password)
            except BaseException:
                client.close()
                raise
        return client

    async def startTLS(self, context: ssl.SSLContext, host: str) -> None:
        code, _ = await self.command(b"STARTTLS\r\n")
        if code != 220:
            raise ConnectionDropped(f"STARTTLS {code}", refusal=f"STARTTLS {code}")
        await self.writer.start_tls(context, server_hostname=host)

    async def authenticate(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        code, _ = await self.command(f"AUTH PLAIN {token}\r\n".encode("ascii"))
        if code != 235:
            raise ConnectionDropped(f"AUTH {code}", refusal=f"AUTH {code}")

    async def greet(
        self, sender: str, recipient: str, size: int, usePipelining: bool, greeting: bool = True
    ) -> None:
        """
        Read the greeting (unless after STARTTLS), say EHLO (HELO if
        refused) and prepare the transaction commands for the extensions the
        server offers.
        """
        # A zero high-water mark makes drain() wait until every byte is
        # handed to the kernel, so latency is timed from the "." being sent.
        self.writer.transport.set_write_buffer_limits(high=0)
        self.extensions = {}
        if greeting:
            code, lines = await self.readReply()
            # A refusal here only counts against a message taken for this
            # connection, that is with --one-message-per-connection.
            if code != 220:
                raise ConnectionDropped(f"greeting {code}", refusal=f"greeting {code}")
        # An address literal is the right EHLO argument for a client
        # without a name of its own (RFC 5321 section 4.1.3).
        localHost = self.writer.get_extra_info("sockname")[0]
        literal = f"[IPv6:{localHost}]" if ":" in localHost else f"[{localHost}]"
        code, lines = await self.command(f"EHLO {literal}\r\n".encode("ascii"))
        if code == 250:
            for line in lines[1:]:
                keyword, _, value = line[4:].decode("ascii", "replace").strip().partition(" ")
                self.extensions[keyword.upper()] = value
        else:
            code, lines = await self.command(f"HELO {literal}\r\n".encode("ascii"))
            if code != 250:
                raise ConnectionDropped(f"HELO {code}", refusal=f"HELO {code}")
        self.pipelining = usePipelining and "PIPELINING" in self.extensions
        sizeParameter = f" SIZE={size}" if "SIZE" in self.extensions else ""
        self.mailCommand = f"MAIL FROM:<{sender}>{sizeParameter}\r\n".encode("ascii")
        self.rcptCommand = f"RCPT TO:<{recipient}>\r\n".encode("ascii")

    async def readReply(self) -> tuple[int, list[bytes]]:
        """
        Read one (possibly multi-line) reply: its code and its lines.
        """
        lines = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionDropped("connection closed by server")
            lines.append(line)
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise ConnectionDropped(f"malformed reply {line[:40]!r}")
            if line[3:4] != b"-":
                return int(code), lines

    async def command(self, line: bytes) -> tuple[int, list[bytes]]:
        """
        Send one command line and read its reply.
        """
        self.writer.write(line)
        await self.writer.drain()
        return await self.readReply()

    async def deliver(self, message: bytes) -> tuple[str | None, float]:
        """
        Run one mail transaction for C{message} (dot-stuffed, ending in the
        end-of-data line).

        Returns C{(None, latency)} when the message is accepted, and
        C{(refusal, 0.0)} otherwise, where C{refusal} names the command and
        the reply code that refused it, such as C{"RCPT 550"}.
        """
        async with asyncio.timeout(self.timeout):
            if self.pipelining:
                codes = await self.pipelinedEnvelope()
            else:
                codes = await self.sequentialEnvelope()
            refusal = next(
                (f"{stage} {code}" for stage, code in zip(("MAIL", "RCPT"), codes) if code // 100 != 2),
                None,
            )
            dataCode = codes[2] if len(codes) == 3 else None
            if refusal is None and dataCode != 354:
                refusal = f"DATA {dataCode}"
            if refusal is not None:
                self.needsReset = True
                if dataCode == 354:
                    # RFC 2920 section 3.1: DATA was accepted although the
                    # envelope was not; send an empty message and drop it.
                    await self.command(b".\r\n")
                return refusal, 0.0
            self.writer.write(message)
            await self.writer.drain()
            sentAt = time.perf_counter()
            code = await self.transactionReply("end of data")
            latency = time.perf_counter() - sentAt
        if code == 250:
            return None, latency
        self.needsReset = True
        return f"end of data {code}", 0.0

    async def transactionReply(self, stage: str) -> int:
        """
        Read the reply to C{stage} of a transaction and return its code.
        421 means the server is closing the connection (RFC 5321 section
        3.8): the message counts as refused, and the connection as dropped.
        """
        code, _ = await self.readReply()
        if code == 421:
            raise ConnectionDropped(f"{stage} 421", refusal=f"{stage} 421")
        return code

    async def pipelinedEnvelope(self) -> list[int]:
        """
        Send [RSET,] MAIL, RCPT and DATA in one write (RFC 2920) and return
        the codes of the MAIL, RCPT and DATA replies.
        """
        reset = self.needsReset
        self.writer.write(
            (b"RSET\r\n" if reset else b"") + self.mailCommand + self.rcptCommand + b"DATA\r\n"
        )
        await self.writer.drain()
        if reset:
            await self.expectReset()
        return [await self.transactionReply(stage) for stage in ("MAIL", "RCPT", "DATA")]

    async def sequentialEnvelope(self) -> list[int]:
        """
        Send [RSET,] MAIL, RCPT and DATA one at a time, stopping at the
        first refusal; return the codes of the replies received.
        """
        if self.needsReset:
            self.writer.write(b"RSET\r\n")
            await self.writer.drain()
            await self.expectReset()
        codes = []
        for stage, line in (("MAIL", self.mailCommand), ("RCPT", self.rcptCommand), ("DATA", b"DATA\r\n")):
            self.writer.write(line)
            await self.writer.drain()
            codes.append(await self.transactionReply(stage))
            if codes[-1] // 100 not in (2, 3):
                break
        return codes

    async def expectReset(self) -> None:
        """
        Read the reply to RSET, which must succeed for the session to go on.
        """
        code = await self.transactionReply("RSET")
        if code != 250:
            raise ConnectionDropped(f"RSET {code}")
        self.needsReset = False

    async def quit(self) -> None:
        """
        End the session politely.
        """
        async with asyncio.timeout(self.timeout):
            code, _ = await self.command(b"QUIT\r\n")
        if code != 221:
            raise ConnectionDropped(f"QUIT {code}")

    def close(self) -> None:
        self.writer.close()


@dataclass
class Results:
    """
    What happened to every message and connection of a run.
    """

    accepted: int = 0
    latencies: list[float] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    # Messages whose fate is unknown because their connection failed.
    lost: collections.Counter[str] = field(default_factory=collections.Counter)
    droppedConnections: collections.Counter[str] = field(default_factory=collections.Counter)


class LoadRun:
    """
    Delivers the messages of one run over concurrent connections.
    """

    def __init__(self, options: argparse.Namespace, factory: MessageFactory) -> None:
        self.security = Security.fromOptions(options)
        self.options = options
        self.factory = factory
        self.host, self.port = parseServer(options.server)
        self.nextMessage = 0
        self.results = Results()
        self.extensions: dict[str, str] = {}
        self.pipelining = False

    def takeMessage(self) -> int | None:
        """
        The number of the next message to send, or None when all are taken.
        """
        if self.nextMessage >= self.options.messages:
            return None
        number = self.nextMessage
        self.nextMessage += 1
        return number

    async def run(self) -> None:
        """
        Run every connection until all messages are taken.
        """
        addresses = self.options.bind or [None]
        await asyncio.gather(
            *(self.worker(addresses[i % len(addresses)]) for i in range(self.options.concurrency))
        )

    async def worker(self, localAddress: str | None) -> None:
        """
        Open sessions one after another until no message is left.  With
        reused connections, a connection that fails is not replaced: the
        run goes on over the others.
        """
        while self.nextMessage < self.options.messages:
            if not await self.session(localAddress) and self.options.reuse:
                return

    async def session(self, localAddress: str | None) -> bool:
        """
        Deliver messages over one connection: until none is left, or just
        one with --one-message-per-connection.  Returns False if the
        connection failed.
        """
        options = self.options
        # The message being delivered, whose fate a failure decides.
        inFlight = None
        client = None
        try:
            if not options.reuse:
                # Taken before connecting, so that a server refusing every
                # connection uses up the messages instead of looping forever.
                inFlight = self.takeMessage()
                if inFlight is None:
                    return True
            client = await SMTPClient.open(
                self.host,
                self.port,
                localAddress,
                options.timeout,
                options.sender,
                options.recipient,
                options.size,
                options.pipelining,
                self.security,
            )
            self.extensions = client.extensions
            self.pipelining = client.pipelining
            numbers = iter(self.takeMessage, None) if options.reuse else [inFlight]
            for inFlight in numbers:
                refusal, latency = await client.deliver(self.factory.build(inFlight))
                inFlight = None
                if refusal is None:
                    self.results.accepted += 1
                    self.results.latencies.append(latency)
                else:
                    self.results.refused[refusal] += 1
            await client.quit()
            return True
        except ConnectionDropped as dropped:
            self.connectionFailed(dropped.reason, inFlight, dropped.refusal)
        except CONNECTION_ERRORS as error:
            self.connectionFailed(describeError(error), inFlight, None)
        finally:
            if client is not None:
                client.close()
        return False

    def connectionFailed(self, reason: str, number: int | None, refusal: str | None) -> None:
        """
        Record a failed connection and the fate of its message in flight.
        """
        self.results.droppedConnections[reason] += 1
        if number is not None:
            if refusal is not None:
                self.results.refused[refusal] += 1
            else:
                self.results.lost[reason] += 1


def describeError(error: BaseException) -> str:
    """
    A short, stable name for a connection error, to group them in reports.
    """
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


def parseServer(server: str) -> tuple[str, int]:
    """
    Split C{host:port} (or C{[ipv6]:port}) into a host and a port.
    """
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)


def percentile(sortedValues: list[float], fraction: float) -> float:
    """
    The nearest-rank percentile of an ascending list (0.0 if empty).
    """
    if not sortedValues:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sortedValues)))
    return sortedValues[rank - 1]


def countDelivered(directory: Path) -> int:
    """
    The number of files in every new/ and cur/ folder under C{directory}.
    """
    total = 0
    for folder, _, files in os.walk(directory):
        if os.path.basename(folder) in ("new", "cur"):
            total += len(files)
    return total


def summarize(run: LoadRun, seconds: float, cpuSeconds: float) -> dict:
    """
    The results of C{run} as one JSON-ready dictionary.
    """
    options = run.options
    results = run.results
    latencies = sorted(results.latencies)
    refused = sum(results.refused.values())
    lost = sum(results.lost.values())
    return {
        "server": options.server,
        "extensions": sorted(run.extensions),
        "pipelining": run.pipelining,
        "mode": "reuse" if options.reuse else "one-message-per-connection",
        "messages": options.messages,
        "size": options.size,
        "concurrency": options.concurrency,
        "accepted": results.accepted,
        "refused": refused,
        "refused_by_reply": dict(results.refused.most_common()),
        "lost": lost,
        "lost_by_reason": dict(results.lost.most_common()),
        "unsent": options.messages - results.accepted - refused - lost,
        "dropped_connections": sum(results.droppedConnections.values()),
        "dropped_by_reason": dict(results.droppedConnections.most_common()),
        "seconds": round(seconds, 3),
        "messages_per_second": round(results.accepted / seconds, 1) if seconds else 0.0,
        "mb_per_second": round(results.accepted * options.size / 1e6 / seconds, 2) if seconds else 0.0,
        "latency_ms": {
            name: round(percentile(latencies, fraction) * 1000, 3)
            for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "client_cpu_seconds": round(cpuSeconds, 3),
    }


def formatCounts(counts: dict[str, int]) -> str:
    """
    C{counts} as "  (key: n, ...)", or nothing if empty.
    """
    return f"  ({', '.join(f'{key}: {value}' for key, value in counts.items())})" if counts else ""


def printReport(summary: dict) -> None:
    """
    Print C{summary} for people.
    """
    latency = summary["latency_ms"]
    lines = [
        f"server              {summary['server']}  "
        f"(pipelining {'on' if summary['pipelining'] else 'off'}; "
        f"offers {' '.join(summary['extensions']) or 'nothing'})",
        f"sent                {summary['messages']} x {summary['size']} octets over "
        f"{summary['concurrency']} connections ({summary['mode']})",
        f"accepted            {summary['accepted']}",
        f"refused             {summary['refused']}{formatCounts(summary['refused_by_reply'])}",
        f"lost                {summary['lost']}{formatCounts(summary['lost_by_reason'])}",
        f"unsent              {summary['unsent']}",
        f"dropped connections {summary['dropped_connections']}"
        f"{formatCounts(summary['dropped_by_reason'])}",
        f"seconds             {summary['seconds']:.3f}",
        f"messages/s          {summary['messages_per_second']:.1f}",
        f"MB/s                {summary['mb_per_second']:.2f}",
        f"latency ms          p50 {latency['p50']:.3f}  p90 {latency['p90']:.3f}  "
        f"p99 {latency['p99']:.3f}  max {latency['max']:.3f}",
        f"client CPU seconds  {summary['client_cpu_seconds']:.3f}",
    ]
    if "verify_files" in summary:
        lines.append(f"files in new/ + cur/ {summary['verify_files']}")
    print("\n".join(lines))


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Deliver many messages to an SMTP server and measure it."
    )
    parser.add_argument("--server", default="127.0.0.1:8025", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--messages", type=int, default=1000, help="messages to send (default %(default)s)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help="octets per message (default %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="connections (default %(default)s)")
    parser.add_argument("--to", dest="recipient", default="alice@localhost", help="recipient (default %(default)s)")
    parser.add_argument("--from", dest="sender", default="bench@example.org", help="sender (default %(default)s)")
    reuse = parser.add_mutually_exclusive_group()
    reuse.add_argument(
        "--connections-reuse", dest="reuse", action="store_true", default=True,
        help="send many messages per connection (the default)",
    )
    reuse.add_argument(
        "--one-message-per-connection", dest="reuse", action="store_false",
        help="connect, send one message and QUIT, for every message",
    )
    parser.add_argument(
        "--no-pipelining", dest="pipelining", action="store_false",
        help="send MAIL, RCPT and DATA one at a time even if PIPELINING is offered",
    )
    parser.add_argument(
        "--bind", type=lambda text: text.split(","), metavar="ADDR[,ADDR...]",
        help="local addresses to connect from, in turn (e.g. 127.0.0.1,127.0.0.2 "
        "to stay under a per-address connection limit)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0,
        help="seconds allowed for connecting or for one transaction (default %(default)s)",
    )
    parser.add_argument(
        "--verify-dir", type=Path, metavar="DIR",
        help="after the run, count the files in every new/ and cur/ folder under DIR",
    )
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--tls", action="store_true", help="TLS from the first byte (SMTPS)")
    security.add_argument("--starttls", action="store_true", help="STARTTLS after EHLO")
    parser.add_argument("--cafile", help="trust the certificates in this PEM file")
    parser.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    parser.add_argument("--user", help="AUTH PLAIN as USER (submission)")
    parser.add_argument("--password", default="", help="the password for --user")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument(
        "--dkim-key",
        type=Path,
        action="append",
        default=[],
        help="DKIM-sign every message (before the run) with this key: a PEM RSA key, or an "
        "ed25519 seed in base64 (needs dkimpy); repeat for several signatures",
    )
    parser.add_argument(
        "--dkim-selector", action="append", default=[],
        help="DKIM selector, one per --dkim-key (default bench)",
    )
    parser.add_argument(
        "--dkim-algorithm", action="append", default=[],
        help="rsa-sha256 or ed25519-sha256, one per --dkim-key (default ed25519-sha256)",
    )
    parser.add_argument(
        "--dkim-canonicalization", default="relaxed/simple",
        help="the signatures' c= (default relaxed/simple, dkimpy's; maild's relay signs "
        "relaxed/relaxed)",
    )
    options = parser.parse_args(argv)
    if options.messages < 1 or options.concurrency < 1:
        parser.error("--messages and --concurrency must be at least 1")
    try:
        parseServer(options.server)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    return options


def main(argv: list[str]) -> int:
    options = parseArguments(argv)
    try:
        factory = MessageFactory(options.sender, options.recipient, options.size, options.messages)
    except ValueError as error:
        print(f"smtp_load: {error}", file=sys.stderr)
        return 2
    for index, key in enumerate(options.dkim_key):
        selectors = options.dkim_selector[index : index + 1] or ["bench"]
        algorithms = options.dkim_algorithm[index : index + 1] or ["ed25519-sha256"]
        factory.sign(key.read_bytes().strip(), selectors[0], algorithms[0], options.messages,
                     options.dkim_canonicalization)
    run = LoadRun(options, factory)
    startCPU = time.process_time()
    start = time.perf_counter()
    asyncio.run(run.run())
    seconds = time.perf_counter() - start
    summary = summarize(run, seconds, time.process_time() - startCPU)
    if options.verify_dir is not None:
        summary["verify_files"] = countDelivered(options.verify_dir)
    if options.json:
        print(json.dumps(summary))
    else:
        printReport(summary)
    # Scripts can tell a clean run from one that lost or refused mail.
    return 0 if summary["accepted"] == options.messages else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
