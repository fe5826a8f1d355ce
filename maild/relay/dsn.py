"""
Delivery status notifications (RFC 3464): the bounce a sender gets when a
recipient is refused for good or the queue lifetime runs out, and the
notice of a delay.  They come from MAILER-DAEMON with a null envelope
sender, so they are never bounced themselves (RFC 5321 section 4.5.5).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from email.utils import formatdate

# Headers of the original message returned in the report (RFC 3462's
# text/rfc822-headers): enough to recognise it, not the body.
_MAX_HEADERS = 64 * 1024


@dataclass(frozen=True)
class RecipientStatus:
    """
    What happened to one recipient: RFC 3464 section 2.3's fields.
    """

    address: str
    action: str  # "failed" or "delayed"
    status: str  # an enhanced status code, "5.1.1"
    remoteHost: str = ""
    diagnostic: str = ""


def buildReport(
    hostname: str,
    queueId: str,
    sender: str,
    arrival: float,
    statuses: list[RecipientStatus],
    original: bytes,
    retryUntil: float = 0.0,
) -> bytes:
    """
    A complete DSN message (CRLF line ends) for C{sender}, about the
    message C{original} (as stored: LF line ends).
    """
    delayed = all(s.action == "delayed" for s in statuses)
    boundary = f"{queueId}.{uuid.uuid4().hex}/{hostname}"
    if delayed:
        subject = "Delayed Mail (still being retried)"
        explanation = (
            "This is the mail system at host {host}.\n\n"
            "Your message could not be delivered yet to the recipients below.\n"
            "It is still being retried; you do not need to send it again.\n"
        )
    else:
        subject = "Undelivered Mail Returned to Sender"
        explanation = (
            "This is the mail system at host {host}.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.\n"
        )
    lines = [explanation.format(host=hostname), ""]
    for status in statuses:
        reason = status.diagnostic or status.status
        lines.append(f"<{status.address}>: {reason}")
    human = "\n".join(lines) + "\n"

    report = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Maild-Queue-ID: {queueId}",
        f"Arrival-Date: {formatdate(arrival)}",
        "",
    ]
    for status in statuses:
        report += [
            f"Final-Recipient: rfc822; {status.address}",
            f"Action: {status.action}",
            f"Status: {status.status}",
        ]
        if status.remoteHost:
            report.append(f"Remote-MTA: dns; {status.remoteHost}")
        if status.diagnostic:
            report.append(f"Diagnostic-Code: smtp; {_oneLine(status.diagnostic)}")
        if status.action == "delayed" and retryUntil:
            report.append(f"Will-Retry-Until: {formatdate(retryUntil)}")
        report.append("")

    headers = _headerSection(original)
    message = (
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)\n"
        f"To: <{sender}>\n"
        f"Subject: {subject}\n"
        f"Date: {formatdate(time.time(), localtime=True)}\n"
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        "\n"
        "This is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        f"{human}\n"
        f"--{boundary}\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n\n"
        + "\n".join(report)
        + f"\n--{boundary}\n"
        "Content-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n\n"
    ).encode("utf-8")
    message += headers + f"\n--{boundary}--\n".encode("ascii")
    return message.replace(b"\n", b"\r\n")


def _headerSection(original: bytes) -> bytes:
    end = original.find(b"\n\n")
    headers = original[: end + 1] if end >= 0 else original
    return headers[:_MAX_HEADERS]


def _oneLine(text: str) -> str:
    return " ".join(text.split())[:900]
