"""
DKIM verification (RFC 6376) of every signature of a message, with
dkimpy: the key records are fetched asynchronously first, then the
signatures are verified (small messages at once, bigger ones in a worker
thread, or every one in a child process with C{[mx] dkim_processes}) with
those answers, so dkimpy never asks DNS itself.  RSA signatures are
checked by OpenSSL (L{maild.dkimrsa}), each key record is parsed once,
not once per message, and the signatures of one message share their
body hash and canonicalized fields (L{maild.trust.dkimsig}).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import dkim as dkimpy
from dkim.util import InvalidTagValueList
from twisted.internet import defer
from twisted.python.failure import Failure

from maild import dkimrsa
from maild.trust.dkimsig import SignedMessage, parseHeaders, parseTags
from maild.trust.lookup import Lookup, TemporaryDNSError

# Signatures verified per message at most; more are reported as
# "policy" (RFC 8601 section 2.7.1) without a key lookup.
MAX_SIGNATURES = 8

dkimrsa.install()

# Messages whose size times signatures is at most this are verified in the
# reactor thread (BatchVerifier): at most a millisecond or two of it.
INLINE_WORK = 128 * 1024


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
class Signature:
    """
    What a DKIM-Signature field names (read in the reactor thread, so the
    key can be asked for at once).
    """

    domain: str
    selector: str
    signature: str
    keyName: str | None


def readSignatures(fields: list[tuple[str, str]]) -> list[Signature | str]:
    """
    The DKIM-Signature fields, in order: what they name, or why they
    cannot be read.
    """
    found: list[Signature | str] = []
    for name, value in fields:
        if name != "dkim-signature":
            continue
        try:
            tags = parseTags(value.encode("utf-8"))
        except InvalidTagValueList as e:
            found.append(f"bad tag list: {type(e).__name__}")
            continue
        domain = tags.get(b"d", b"").decode("utf-8", "replace").lower()
        selector = tags.get(b"s", b"").decode("utf-8", "replace").lower()
        # split() drops what \s matches, without a regular expression
        # over the whole value (some 10 µs for RSA 2048's).
        signature = "".join(tags.get(b"b", b"").decode("ascii", "replace").split())[:8]
        keyName = f"{selector}._domainkey.{domain}" if domain and selector else None
        found.append(Signature(domain, selector, signature, keyName))
    return found


def keyNames(signatures: list[Signature | str]) -> list[str]:
    """
    The DNS names of the keys the signatures need.
    """
    return sorted(
        {
            s.keyName
            for s in signatures[:MAX_SIGNATURES]
            if isinstance(s, Signature) and s.keyName
        }
    )


class BatchVerifier:
    """
    Verifies messages elsewhere than in the reactor thread, in batches:
    the messages that arrive while batches are being verified go together
    in the next one, so that under load one trip (to a worker thread, or
    to a child process: L{maild.trust.dkimprocess}), and one wake-up of
    the reactor on the way back, serves many messages.

    Small messages are verified at once instead, in the reactor thread,
    unless C{inlineWork} is 0: their verification is mostly dkimpy's
    Python, which holds the GIL anyway, and costs less than a trip to a
    thread (some 0.2 ms a signature for 10 KiB, against a thread wake-up,
    the GIL passed back and forth, and a reactor wake-up, which on a busy
    machine add milliseconds).

    @param inThread: runs a blocking callable off the reactor thread and
        returns a Deferred of its result (C{deferToThread}).
    @param inlineWork: octets times signatures up to which a message is
        verified in the reactor thread.
    @param elsewhere: if given, what verifies a batch instead of a thread
        (L{maild.trust.dkimprocess.VerifierProcesses.verify}): takes the
        list given to L{verifyBatch}, returns a Deferred of its answer.
    @param inFlight: how many batches may be under way at once.
    """

    def __init__(
        self, inThread, inlineWork: int = INLINE_WORK, elsewhere=None, inFlight: int = 1
    ) -> None:
        self.inlineWork = inlineWork
        self.runBatch = elsewhere or (lambda work: inThread(lambda: verifyBatch(work)))
        self.inFlight = inFlight
        self._waiting: list[tuple[bytes, int | None, list, dict, defer.Deferred]] = []
        self._busy = 0

    def verify(
        self, message: bytes, headerLength: int | None, signatures: list, keys: dict
    ) -> defer.Deferred:
        if len(message) * min(len(signatures), MAX_SIGNATURES) <= self.inlineWork:
            return defer.succeed(_verifySafely(message, headerLength, signatures, keys))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((message, headerLength, signatures, keys, d))
        if self._busy < self.inFlight:
            self._runBatch()
        return d

    def _runBatch(self) -> None:
        batch, self._waiting = self._waiting, []
        self._busy += 1
        d = self.runBatch([item[:4] for item in batch])
        d.addBoth(self._batchDone, [item[4] for item in batch])

    def _batchDone(self, results, waiting: list[defer.Deferred]) -> None:
        self._busy -= 1
        if isinstance(results, Failure):
            for d in waiting:
                d.errback(results)
        else:
            for d, result in zip(waiting, results):
                d.callback(result)
        if self._waiting and self._busy < self.inFlight:
            self._runBatch()


def verifyBatch(work: list) -> list[list[DKIMResult]]:
    """
    Verify messages (blocking): C{work} is a list of C{(message,
    headerLength, signatures, keys)}, the key records already looked up
    (C{keys}: the record, C{None} when unusable, or the
    L{TemporaryDNSError} of its lookup, by name).

    @return: one list of results per message.
    """
    return [_verifySafely(*item) for item in work]


async def verifyDKIM(
    lookup: Lookup,
    signatures: list[Signature | str],
    message: bytes,
    verifier: BatchVerifier,
    headerLength: int | None = None,
) -> list[DKIMResult]:
    """
    Verify every DKIM signature of C{message} (CRLF line ends;
    C{signatures} read from its header by L{readSignatures}).

    @param headerLength: where the header section ends in C{message}, if
        known (the blank line follows): the body is then not parsed again.

    @return: one result per signature (none for an unsigned message).
    """
    keys: dict[str, bytes | None | TemporaryDNSError] = {}

    async def fetch(name: str) -> None:
        try:
            records = await lookup(name, "TXT")
        except TemporaryDNSError as e:
            keys[name] = e
            return
        keys[name] = _keyRecord(records)

    # The keys were asked for when the header section arrived: most are
    # kept by the lookup by now.
    cached = getattr(lookup, "cached", lambda name, qtype: None)
    missing = []
    for name in keyNames(signatures):
        records = cached(name, "TXT")
        if records is None:
            missing.append(name)
        else:
            keys[name] = _keyRecord(records)
    if missing:
        await defer.gatherResults([defer.ensureDeferred(fetch(n)) for n in missing])
    return await verifier.verify(message, headerLength, signatures, keys)


def _keyRecord(records: list) -> bytes | None:
    # RFC 6376 section 3.6.2.2: the strings of one record are joined;
    # several records make the key unusable.
    return b"".join(records[0]) if len(records) == 1 else None


def _verifySafely(message: bytes, headerLength, signatures, keys) -> list[DKIMResult]:
    # One message's surprise must not fail the others of its batch.
    try:
        return _verifyAll(message, headerLength, signatures, keys)
    except Exception as e:
        return [DKIMResult("permerror", reason=f"cannot verify: {type(e).__name__}")] * len(
            signatures
        )


def _verifyAll(message: bytes, headerLength, signatures, keys) -> list[DKIMResult]:
    results = []
    signed = None
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
        if signed is None:
            try:
                signed = SignedMessage(_readMessage(message, headerLength))
            except dkimpy.DKIMException as e:
                reason = f"unreadable message: {_short(e)}"
                return results + [DKIMResult("permerror", reason=reason)] * (
                    len(signatures) - index
                )
        results.append(_verifyOne(signed, index, signature, keys))
    return results


def _readMessage(message: bytes, headerLength: int | None) -> dkimpy.DKIM:
    """
    dkimpy's view of C{message}: its header section parsed as dkimpy
    parses it (L{parseHeaders}), its body sliced off rather than split
    into lines and joined again, which is the same body when every line
    ends in CRLF (SMTP refuses bare CR and LF) and the header section ends
    at the blank line.  Otherwise dkimpy parses the whole message.
    """
    if headerLength is not None and message.count(b"\n") == message.count(b"\r\n"):
        atBlankLine = message.startswith(b"\r\n", headerLength) and (
            headerLength == 0 or message.endswith(b"\r\n", 0, headerLength)
        )
        if atBlankLine or headerLength == len(message):
            verifier = dkimpy.DKIM()
            verifier.headers = parseHeaders(message[:headerLength])
            verifier.body = message[headerLength + 2 :]
            return verifier
    return dkimpy.DKIM(message)


def _verifyOne(signed: SignedMessage, index: int, signature: Signature, keys) -> DKIMResult:
    verifier = signed.verifier

    def result(kind: str, reason: str = "") -> DKIMResult:
        return DKIMResult(kind, signature.domain, signature.selector, signature.signature, reason)

    try:
        prepared = signed.prepare(index)
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
    parsed = _parseKey(key)
    if isinstance(parsed, str):
        return result("permerror", parsed)
    # What dkimpy's verify_sig does once it has the key record (and its
    # asynchronous verify too), with the record parsed before, and the
    # work the message's signatures share done once.
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = parsed
    try:
        ok = signed.verify(tags, included, sigHeaders[index])
    except dkimpy.ValidationError as e:
        # The body hash differs: the message was changed.
        return result("fail", _short(e))
    except dkimpy.DKIMException as e:
        return result("permerror", _short(e))
    except Exception as e:
        return result("permerror", f"cannot verify: {type(e).__name__}")
    return result("pass") if ok else result("fail", "signature did not verify")


@functools.lru_cache(maxsize=1024)
def _parseKey(record: bytes) -> tuple | str:
    """
    A key record as dkimpy reads it (key, size, type, whether for TLS
    reports only), or why it cannot be used.  Kept per record: parsing a
    key (in Python, ASN.1 and all) costs as much as the rest of a
    verification, and a domain signs much mail with one key.
    """
    try:
        return dkimpy.evaluate_pk(b"key", record)
    except dkimpy.DKIMException as e:
        return f"bad key: {_short(e)}"
    except Exception as e:
        # dkimpy's key parsers raise more than their own exceptions.
        return f"bad key: {type(e).__name__}"


def _short(e: Exception) -> str:
    return str(e).split(" (")[0][:80]
