"""
The Authentication-Results header field (RFC 8601) that records the
checks, and the log line that says the same.
"""

from __future__ import annotations

import re

from maild.trust.dkim import DKIMResult
from maild.trust.dmarc import DMARCResult
from maild.trust.spf import SPFResult

# What may stand unquoted as a property value (RFC 8601 section 2.2:
# a token, or an address); anything else is quoted.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+")


def _value(text: str) -> str:
    if text and _TOKEN.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else "?" for c in escaped) + '"'


def _comment(text: str) -> str:
    # A comment may not hold unbalanced parentheses or backslashes.
    text = "".join(c for c in text if c.isprintable() and c not in "()\\")
    return f" ({text})" if text else ""


def spfMethod(spf: SPFResult, sender: str) -> str:
    if spf.identity == "helo":
        return f"spf={spf.result} smtp.helo={_value(spf.domain)}"
    return f"spf={spf.result} smtp.mailfrom={_value(sender or spf.domain)}"


def dkimMethods(results: list[DKIMResult]) -> list[str]:
    if not results:
        return ["dkim=none"]
    methods = []
    for r in results:
        method = f"dkim={r.result}"
        if r.result != "pass" and r.reason:
            method += _comment(r.reason)
        if r.domain:
            method += f" header.d={_value(r.domain)}"
        if r.selector:
            method += f" header.s={_value(r.selector)}"
        if r.signature:
            # RFC 6008: tells signatures of one domain apart.
            method += f" header.b={_value(r.signature)}"
        methods.append(method)
    return methods


def dmarcMethod(dmarc: DMARCResult) -> str:
    method = f"dmarc={dmarc.result}"
    if dmarc.published:
        method += f" (p={dmarc.published})"
    elif dmarc.reason and dmarc.result != "pass":
        method += _comment(dmarc.reason)
    if dmarc.domain:
        method += f" header.from={_value(dmarc.domain)}"
    return method


def authenticationResults(
    hostname: str, spf: SPFResult, sender: str, dkim: list[DKIMResult], dmarc: DMARCResult
) -> bytes:
    """
    The field, folded one method per line, CRLF-terminated.
    """
    methods = [spfMethod(spf, sender)] + dkimMethods(dkim) + [dmarcMethod(dmarc)]
    text = f"Authentication-Results: {hostname};\r\n\t" + ";\r\n\t".join(methods) + "\r\n"
    return text.encode("utf-8")


def logSummary(spf: SPFResult, dkim: list[DKIMResult], dmarc: DMARCResult) -> str:
    """
    The three results on one line, for the log.
    """
    dkimText = ",".join(f"{r.result}:{r.domain or '?'}" for r in dkim) or "none"
    return (
        f"spf={spf.result}({spf.identity}:{spf.domain or '?'}) dkim={dkimText} "
        f"dmarc={dmarc.result}({dmarc.domain or '?'}"
        + (f" p={dmarc.published}" if dmarc.published else "")
        + ")"
    )
