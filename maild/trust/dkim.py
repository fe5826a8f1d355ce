"""
DKIM verification (RFC 6376) of every signature of a message, with
dkimpy: the key records are fetched asynchronously first, then the
signatures are verified in a worker thread (hashing a big message takes
time) with those answers, so dkimpy never asks DNS itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer

from maild.trust.lookup import Lookup, TemporaryDNSError

# Signatures verified per message at most; more are reported as
# "policy" (RFC 8601 section 2.7.1) without a key lookup.
MAX_SIGNATURES = 8


@dataclass(frozen=True)
class DKIMResult:
    """
    @ivar result: C{pass fail neutral policy temperror permerror}.
    @ivar domain: the signature's C{d=} (lower case), "" if unreadable.
    @ivar selector: its C{s=}.
    @ivar signature: the start of its C{b=} (RFC 6008 C{header.b}).
    @ivar reason: why, for a result other than pass.
    """

    result: str
    domain: str = ""
    selector: str = ""
    signature: str = ""
    reason: str = ""


@dataclass(frozen=True)
class _Signature:
    domain: str
    selector: str
    signature: str
    keyName: str | None


def _signatures(fields: list[tuple[str, str]]) -> list[_Signature | str]:
    """
    The DKIM-Signature fields, in order: what they name, or why they
    cannot be read.
    """
    found: list[_Signature | str] = []
    for name, value in fields:
        if name != "dkim-signature":
            continue
        try:
            tags = parse_tag_value(value.encode("utf-8"))
        except InvalidTagValueList as e:
            found.append(f"bad tag list: {type(e).__name__}")
            continue
        domain = tags.get(b"d", b"").decode("utf-8", "replace").lower()
        selector = tags.get(b"s", b"").decode("utf-8", "replace").lower()
        signature = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]
        keyName = f"{selector}._domainkey.{domain}" if domain and selector else None
        found.append(_Signature(domain, selector, signature, keyName))
    return found


def hasSignatures(fields: list[tuple[str, str]]) -> bool:
    return any(name == "dkim-signature" for name, _ in fields)


def keyNames(fields: list[tuple[str, str]]) -> list[str]:
    """
    The DNS names of the keys the signatures need (to ask early).
    """
    return sorted(
        {
            s.keyName
            for s in _signatures(fields)[:MAX_SIGNATURES]
            if isinstance(s, _Signature) and s.keyName
        }
    )


async def verifyDKIM(
    lookup: Lookup, fields: list[tuple[str, str]], message: bytes, inThread
) -> list[DKIMResult]:
    """
    Verify every DKIM signature of C{message} (CRLF line ends; C{fields}
    its parsed header fields).

    @param inThread: runs a blocking callable off the reactor thread and
        returns a Deferred of its result (C{deferToThread}).
    @return: one result per signature (none for an unsigned message).
    """
    signatures = _signatures(fields)
    keys: dict[str, bytes | None | TemporaryDNSError] = {}

    async def fetch(name: str) -> None:
        try:
            records = await lookup(name, "TXT")
        except TemporaryDNSError as e:
            keys[name] = e
            return
        # RFC 6376 section 3.6.2.2: the strings of one record are joined;
        # several records make the key unusable.
        keys[name] = b"".join(records[0]) if len(records) == 1 else None

    await defer.gatherResults([defer.ensureDeferred(fetch(n)) for n in keyNames(fields)])
    return await inThread(_verifyAll, message, signatures, keys)


def _verifyAll(message: bytes, signatures, keys) -> list[DKIMResult]:
    results = []
    verifier = None
    for index, signature in enumerate(signatures):
        if isinstance(signature, str):
            results.append(DKIMResult("permerror", reason=signature))
            continue
        if index >= MAX_SIGNATURES:
            results.append(
                DKIMResult("policy", signature.domain, signature.selector, signature.signature,
                           "too many signatures")
            )
            continue
        if verifier is None:
            try:
                verifier = dkimpy.DKIM(message)
            except dkimpy.DKIMException as e:
                reason = f"unreadable message: {_short(e)}"
                return results + [DKIMResult("permerror", reason=reason)] * (
                    len(signatures) - index
                )
        results.append(_verifyOne(verifier, index, signature, keys))
    return results


def _verifyOne(verifier, index: int, signature: _Signature, keys) -> DKIMResult:
    def result(kind: str, reason: str = "") -> DKIMResult:
        return DKIMResult(kind, signature.domain, signature.selector, signature.signature, reason)

    try:
        prepared = verifier.verify_headerprep(index)
    except dkimpy.DKIMException as e:
        # RFC 6376 section 6.1.1: a signature that cannot be read.
        return result("permerror", f"bad signature: {_short(e)}")
    if not prepared:
        return result("permerror", "signature not found")
    tags, included, sigHeaders = prepared
    key = keys.get(signature.keyName)
    if isinstance(key, TemporaryDNSError):
        return result("temperror", "key lookup failed")
    if key is None:
        return result("permerror", "no key")
    try:
        dkimpy.evaluate_pk(signature.keyName.encode(), key)
    except dkimpy.DKIMException as e:
        return result("permerror", f"bad key: {_short(e)}")
    except Exception as e:
        # dkimpy's key parsers raise more than their own exceptions.
        return result("permerror", f"bad key: {type(e).__name__}")
    try:
        ok = verifier.verify_sig(tags, included, sigHeaders[index], lambda name, timeout=5: key)
    except dkimpy.ValidationError as e:
        # The body hash differs: the message was changed.
        return result("fail", _short(e))
    except dkimpy.DKIMException as e:
        return result("permerror", _short(e))
    except Exception as e:
        return result("permerror", f"cannot verify: {type(e).__name__}")
    return result("pass") if ok else result("fail", "signature did not verify")


def _short(e: Exception) -> str:
    return str(e).split(" (")[0][:80]
