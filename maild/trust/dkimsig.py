"""
The checking of one DKIM signature (RFC 6376 section 6.1.3) as dkimpy
1.1.8 does it (C{DomainSigner.verify_sig_process}), with the work that the
signatures of one message have in common done once per message, and the
canonicalizations done faster:

- the body hash is computed once per canonicalization, C{l=} length and
  hash algorithm (a message signed rsa-sha256 and ed25519-sha256 over the
  same body, as maild's relay signs, hashes its body once);
- the relaxed body canonicalization (section 3.4.4) rewrites only the runs
  of white space that change (dkimpy replaces every space by a space),
  and none at all when a look at the body shows there are none;
- only the header fields a signature names are canonicalized (dkimpy
  canonicalizes all of them, DKIM-Signature fields included, for each
  signature), each once per message, and relaxed canonicalization runs
  its regular expressions only on fields they change;
- the C{b=} value is emptied (section 3.7) with an equivalent of dkimpy's
  expression that does not backtrack at each character;
- the header section is parsed, the DKIM-Signature fields found and their
  tag lists read by equivalents of dkimpy's C{rfc822_parse},
  C{verify_headerprep} and C{parse_tag_value} with their expressions
  compiled once (dkimpy's module-level C{re} calls look each one up in
  C{re}'s cache, per line and per tag), the fields found once per
  message rather than once per signature.

Everything else is dkimpy's: tag validation, the canonicalization
policies, header selection, the hash algorithms, the key
types and the signature arithmetic (RSA by OpenSSL, L{maild.dkimrsa}).
The answers and exceptions are dkimpy's: tests/test_trust_dkimsig.py
compares them with dkimpy's own on arbitrary messages and signatures.
"""

from __future__ import annotations

import base64
import re

import dkim as dkimpy
import nacl.exceptions
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    Simple,
    strip_trailing_lines,
)

from maild.trust.headers import unfold

_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
# A run of WSP other than one space: the only runs "reduce to a single
# SP" (RFC 6376 section 3.4.4) changes.  A run is matched whole from its
# first character (a tab, or a space followed by more WSP), so the runs
# replaced are exactly those of dkimpy's [\t ]+ that differ from " ".
_WSP_RUN_TO_SPACE = re.compile(rb"\t[\t ]*| [\t ]+")

# dkimpy's RE_BTAG: "[;\s]b FWS =" and the value after it, where its FWS,
# (?:(?:\s*\r?\n)?\s+)?, matches what \s* matches, and the value's
# characters are taken a run at a time.  Every match starts and ends where
# RE_BTAG's does, so sub() gives the same bytes.
_B_TAG_VALUE = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")

# dkimpy's rfc822_parse: a field's name, and its line breaks.
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")
_LINE_BREAKS = re.compile(rb"\r?\n")
# dkimpy's verify_headerprep: the separator of the h= names.
_NAME_SEPARATOR = re.compile(rb"\s*:\s*")
_WSP_RUN = re.compile(rb"[\t ]+")


def _withoutBlanks(value: bytes) -> bytes:
    # dkimpy's re.sub(rb"\s+", b"", value): bytes.split() splits at the
    # same six ASCII white space octets.
    return b"".join(value.split())


def parseTags(tagList: bytes) -> dict[bytes, bytes]:
    """
    dkimpy's C{parse_tag_value} (RFC 6376 section 3.2): the same tags, or
    the same exception.  Its test of a tag name, C{re.match(br'^[a-zA-Z](\w)*',
    name)}, asks only for a first ASCII letter.
    """
    tags: dict[bytes, bytes] = {}
    specs = tagList.strip().split(b";")
    # Trailing semicolons are valid.
    if not specs[-1]:
        specs.pop()
    for spec in specs:
        name, equals, value = spec.partition(b"=")
        if not equals:
            raise InvalidTagSpec(spec)
        name = name.strip()
        if not name[:1].isalpha():
            raise InvalidTagSpec(spec)
        if name in tags:
            raise DuplicateTag(name)
        tags[name] = value.strip()
    return tags


def parseHeaders(section: bytes) -> list[list[bytes]]:
    """
    The header fields of dkimpy's C{rfc822_parse(section)}: C{[name,
    value]} pairs, each value with its line breaks turned into CRLF; the
    same exception for a line that is not a field.
    """
    headers: list[list[bytes]] = []
    for line in _LINE_BREAKS.split(section):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            headers.append([match.group(1), line[match.end(0) :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkimpy.MessageFormatError("Unexpected characters in RFC822 header: %s" % line)
    return headers


def relaxedBody(body: bytes) -> bytes:
    """
    dkimpy's C{Relaxed.canonicalize_body}: the same octets, faster.  Most
    bodies have no WSP before a line end and no run of WSP but single
    spaces: looking for those (in C, at memory speed) spares the regular
    expressions, which Python's engine tries at every space.
    """
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN_TO_SPACE.sub(b" ", body)
    body = strip_trailing_lines(body)
    return b"" if body == b"\r\n" else body


def withoutSignatureValue(value: bytes) -> bytes:
    """
    A DKIM-Signature field's value with its C{b=} tag emptied, as dkimpy's
    C{RE_BTAG.sub(b"\\\\1", value)} gives it.
    """
    return _B_TAG_VALUE.sub(rb"\1", value)


def relaxedField(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """
    dkimpy's C{Relaxed.canonicalize_headers} of one field (section 3.4.2):
    the same octets, the regular expressions run only where they change
    something.
    """
    # dkimpy's re.sub(rb"\r?\n", b"", value).
    value = unfold(value)
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower().rstrip(), value.strip() + b"\r\n"


_BODY_CANONICALIZATIONS = {Simple: Simple.canonicalize_body, Relaxed: relaxedBody}


class SignedMessage:
    """
    A message being verified (dkimpy's C{DKIM} object, its headers and
    body already parsed) and what its signatures share.
    """

    def __init__(self, verifier: dkimpy.DKIM) -> None:
        self.verifier = verifier
        self._signatureFields: list | None = None
        self._bodies: dict = {}
        self._bodyHashes: dict = {}
        self._relaxedFields: dict = {}

    def prepare(self, index: int):
        """
        dkimpy's C{verify_headerprep(index)}: the tags of signature
        C{index}, validated, the names of the fields it signs, and the
        DKIM-Signature fields; False when there is no such signature.
        """
        fields = self._signatureFields
        if fields is None:
            fields = self._signatureFields = [
                (name, value) for name, value in self.verifier.headers
                if name.lower() == b"dkim-signature"
            ]
        if len(fields) <= index:
            return False
        try:
            tags = parseTags(fields[index][1])
        except InvalidTagValueList as e:
            raise dkimpy.MessageFormatError(e)
        dkimpy.validate_signature_fields(tags)
        return tags, [name.lower() for name in _NAME_SEPARATOR.split(tags[b"h"])], fields

    def canonicalFields(self, algorithm, fields: list) -> list:
        """
        C{algorithm.canonicalize_headers(fields)} (dkimpy's C{Simple} or
        C{Relaxed}); a field the message's signatures share is
        canonicalized once.
        """
        if algorithm is not Relaxed:
            return algorithm.canonicalize_headers(fields)
        canonical = []
        for name, value in fields:
            key = (name, value)
            field = self._relaxedFields.get(key)
            if field is None:
                field = self._relaxedFields[key] = relaxedField(name, value)
            canonical.append(field)
        return canonical

    def bodyHash(self, algorithm, length: bytes | None, hasher) -> bytes:
        """
        The hash of the body canonicalized by C{algorithm} (dkimpy's
        C{Simple} or C{Relaxed}), cut to the C{l=} value C{length} if
        any, by C{hasher} (a hashlib constructor).
        """
        key = (algorithm, length, hasher)
        digest = self._bodyHashes.get(key)
        if digest is None:
            body = self._bodies.get(algorithm)
            if body is None:
                canonicalize = _BODY_CANONICALIZATIONS.get(algorithm, algorithm.canonicalize_body)
                body = self._bodies[algorithm] = canonicalize(self.verifier.body)
            if length is not None:
                body = body[: int(length)]
            digest = self._bodyHashes[key] = hasher(body).digest()
        return digest

    def verify(self, sig: dict, includeHeaders: list, sigHeader: tuple) -> bool:
        """
        dkimpy's C{verify_sig_process(sig, includeHeaders, sigHeader)},
        once its key is set (C{pk}, C{keysize}, C{ktag}, C{seqtlsrpt}):
        the same answer, or the same exception.
        """
        verifier = self.verifier
        if verifier.tlsrpt == "strict" and not verifier.seqtlsrpt:
            raise dkimpy.ValidationError("Message is tlsrpt and Service Type is not tlsrpt")
        if not verifier.tlsrpt and verifier.seqtlsrpt:
            raise dkimpy.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise dkimpy.MessageFormatError("invalid c= value: %s" % e.args[0])
        hasher = dkimpy.HASH_ALGORITHMS[sig[b"a"]]

        if b"bh" in sig:
            length = sig[b"l"] if b"l" in sig and not verifier.tlsrpt else None
            bodyHash = self.bodyHash(policy.body_algorithm, length, hasher)
            try:
                expected = base64.b64decode(_withoutBlanks(sig[b"bh"]))
            except TypeError as e:
                raise dkimpy.MessageFormatError(str(e))
            if bodyHash != expected:
                raise dkimpy.ValidationError(
                    "body hash mismatch (got %s, expected %s)"
                    % (base64.b64encode(bodyHash), sig[b"bh"])
                )

        # As dkimpy (its bug#644046): an extra From field is signed too.
        if b"from" in includeHeaders:
            includeHeaders.append(b"from")
        headerHash = dkimpy.HashThrough(hasher())
        # Selecting before canonicalizing selects the same fields: dkimpy's
        # parser gives names without white space, which relaxed
        # canonicalization would only lower-case (and selection compares
        # lower-cased names).
        selected = dkimpy.select_headers(verifier.headers, includeHeaders)
        signatureField = [(sigHeader[0], withoutSignatureValue(sigHeader[1]))]
        # The signature field is hashed without its line end (section 3.7).
        canonicalize = policy.header_algorithm
        for name, value in self.canonicalFields(canonicalize, selected) + [
            (name, value.rstrip())
            for name, value in self.canonicalFields(canonicalize, signatureField)
        ]:
            headerHash.update(name)
            headerHash.update(b":")
            headerHash.update(value)

        signature = base64.b64decode(_withoutBlanks(sig[b"b"]))
        if verifier.ktag == b"rsa":
            try:
                # Looked up at each call, as dkimpy does (maild.dkimrsa
                # replaces it).
                valid = dkimpy.RSASSA_PKCS1_v1_5_verify(headerHash, signature, verifier.pk)
                if valid and verifier.keysize < verifier.minkey:
                    raise dkimpy.KeyFormatError("public key too small: %d" % verifier.keysize)
                return valid
            except (TypeError, dkimpy.DigestTooLargeError) as e:
                raise dkimpy.KeyFormatError("digest too large for modulus: %s" % e)
        if verifier.ktag == b"ed25519":
            try:
                verifier.pk.verify(headerHash.digest(), signature)
                return True
            except nacl.exceptions.BadSignatureError:
                return False
        raise dkimpy.UnknownKeyTypeError(verifier.ktag)
