"""
C{maild send}: the interactive client of the original brief.  It asks for
the server, sender, recipients and subject, then reads the body line by
line until a line holding a single C{.}; every answer can also be given
as an option, and the body read from standard input, for scripts.

It speaks SMTP with the standard library's C{smtplib}: STARTTLS whenever
the server offers it (verifying the certificate unless told otherwise),
and AUTH when the user gives a password.
"""

from __future__ import annotations

import argparse
import getpass
import smtplib
import ssl
import sys
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid
from typing import IO, Callable


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="HOST[:PORT] (asked if missing; port 8025 by default)")
    parser.add_argument("--from", dest="sender", help="sender address")
    parser.add_argument(
        "--to", action="append", default=[], help="recipient (repeat for several)"
    )
    parser.add_argument("--subject")
    parser.add_argument(
        "--body-stdin",
        action="store_true",
        help="read the body from standard input to its end, without prompts",
    )
    parser.add_argument("--user", help="log in as USER (AUTH) when the server offers it")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--tls",
        action="store_true",
        help="implicit TLS from the first byte (SMTPS, port 8465)",
    )
    tls.add_argument(
        "--no-starttls", action="store_true", help="never use STARTTLS (not with --user)"
    )
    parser.add_argument("--cafile", help="trust the certificates in this PEM file")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate",
    )
    parser.add_argument("--timeout", type=float, default=60.0)


def readBody(lines: IO[str], write: Callable[[str], None] | None) -> str:
    """
    Read body lines until one holding a single C{.} (or the end of input).
    """
    if write is not None:
        write("Enter the message; end it with a line holding a single '.'\n")
    body = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line == ".":
            break
        body.append(line)
    return "\n".join(body) + "\n"


def buildMessage(sender: str, recipients: list[str], subject: str, body: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message["User-Agent"] = "maild send"
    message.set_content(body)
    return message


def tlsContext(args: argparse.Namespace) -> ssl.SSLContext:
    if args.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=args.cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def run(
    args: argparse.Namespace,
    stdin: IO[str] = sys.stdin,
    stdout: IO[str] = sys.stdout,
    stderr: IO[str] = sys.stderr,
) -> int:
    """
    Send one message; return the exit status.
    """

    def ask(question: str, default: str | None = None) -> str:
        stdout.write(f"{question} [{default}]: " if default else f"{question}: ")
        stdout.flush()
        return stdin.readline().strip() or (default or "")

    password = None
    if args.user and args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    server = args.server or ask("Server", "localhost:8025")
    sender = args.sender or ask("From")
    recipients = args.to or [r.strip() for r in ask("To (comma-separated)").split(",") if r.strip()]
    subject = args.subject if args.subject is not None else ask("Subject")
    if not sender or not recipients:
        stderr.write("error: a sender and at least one recipient are needed\n")
        return 2
    body = stdin.read() if args.body_stdin else readBody(stdin, stdout.write)
    if args.user and password is None:
        password = getpass.getpass(f"Password for {args.user}: ")

    host, _, port = server.rpartition(":") if ":" in server else (server, "", "")
    port = int(port) if port else (8465 if args.tls else 8025)
    message = buildMessage(sender, recipients, subject, body)
    try:
        refused, (code, reply) = _send(args, host, port, message, sender, recipients, password)
    except (smtplib.SMTPException, OSError, ssl.SSLError) as e:
        stderr.write(f"error: {_describe(e)}\n")
        return 1
    for address, (rcode, rreply) in refused.items():
        stderr.write(f"refused {address}: {rcode} {rreply.decode('utf-8', 'replace')}\n")
    stdout.write(f"{code} {reply.decode('utf-8', 'replace')}\n")
    return 1 if refused or code != 250 else 0


def _send(args, host, port, message, sender, recipients, password):
    """
    @return: the refused recipients, and the server's reply to the message.
    """
    context = tlsContext(args)
    if args.tls:
        client: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=args.timeout, context=context)
    else:
        client = smtplib.SMTP(host, port, timeout=args.timeout)
    with client:
        client.ehlo()
        if not args.tls and not args.no_starttls and client.has_extn("starttls"):
            client.starttls(context=context)
            client.ehlo()
        if password is not None:
            if not client.has_extn("auth"):
                raise smtplib.SMTPException("the server offers no AUTH here")
            client.login(args.user, password)
        code, reply = client.mail(sender)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, sender)
        refused = {}
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, reply)
        if len(refused) == len(recipients):
            raise smtplib.SMTPRecipientsRefused(refused)
        result = client.data(message.as_bytes(policy=SMTP_POLICY))
        return refused, result


def _describe(error: Exception) -> str:
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {error.smtp_error.decode('utf-8', 'replace')}"
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return "; ".join(
            f"{a}: {c} {r.decode('utf-8', 'replace')}" for a, (c, r) in error.recipients.items()
        )
    return str(error) or error.__class__.__name__
