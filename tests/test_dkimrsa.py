"""
dkimpy with its RSA arithmetic done by OpenSSL (maild.dkimrsa) gives the
answers dkimpy's own Python arithmetic gives: the same signatures made,
the same verdicts on good, altered, badly encoded, wrongly sized and
truncated input, and the MX's verification (which also parses each
message and key once) agrees with dkimpy's own verify.
"""

from __future__ import annotations

import base64
import hashlib

import dkim
import dkim.crypto
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from maild import dkimrsa
from maild.trust import dkim as trustDKIM
from maild.trust.headers import HeaderFilter, parseFields

SETTINGS = settings(max_examples=150, deadline=None)

# Below dkimpy's 1024-bit minimum, and made outside cryptography, which
# no longer makes keys this short.
RSA_512 = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOwIBAAJBAMhrQvvw6rhSMPDPMQ7eQj2Ob7PxhgNVrm+kpAUTAglqOA3OHW+x
zKWP2axacEcLWm+nsKXzW1W6Fm29V7crgsMCAwEAAQJBAIqTL5OH9qNPoSs/90my
f9aUH8QpoWG44o2rJwWjKOtcXXD3WgJRTVH58ewBQ1hTtuE6COyptdaybAMP8UYC
qPECIQD6LLW8qQWfGR9Sog/XSPVWADBFJx+/bC1Nfn/VPBBGNQIhAM0V9V5QlHmM
n97g38UVUmoko8dXLM+xalSXoOp0NuQXAiEA5bHfOtTFQIpEZA5AFR37g3aw2w1M
7OhZv+kBXbrEBnECIBNyD4/fyBQ2VzpEzDLdsLDLxJO0GlWfFtvqfKF+X24FAiAF
dx5oytf2EdNr53/FtuBqFnpF7c8j25e1TN66VBVgSg==
-----END RSA PRIVATE KEY-----
"""


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _publicRecord(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


_ED25519 = nacl.signing.SigningKey(b"e" * 32)
# Private key as dkimpy reads it, and the p= of its record, by name.
KEYS = {
    name: (pem, _publicRecord(pem))
    for name, pem in (
        ("rsa512", RSA_512),
        ("rsa1024", _pem(rsa.generate_private_key(65537, 1024))),
        ("rsa2048", _pem(rsa.generate_private_key(65537, 2048))),
        ("rsa2048e3", _pem(rsa.generate_private_key(3, 2048))),
    )
}
KEYS["ed25519"] = (
    base64.b64encode(bytes(_ED25519)),
    base64.b64encode(bytes(_ED25519.verify_key)).decode(),
)
RSA_NAMES = sorted(n for n in KEYS if n.startswith("rsa"))

MESSAGE = (
    b"From: Alice <alice@d.test>\r\nTo: bob@x.test\r\nSubject: the  report\r\n"
    b"Date: Tue, 01 Dec 2026 03:00:00 +0000\r\nMessage-ID: <1@d.test>\r\n\r\n"
    + b"".join(b"line %d of the body,\tsome  spaces \r\n" % n for n in range(40))
)


def _record(name: str) -> bytes:
    keyType = "ed25519" if name == "ed25519" else "rsa"
    return f"v=DKIM1; k={keyType}; p={KEYS[name][1]}".encode()


def _sign(name: str, message: bytes = MESSAGE, algorithm: bytes | None = None) -> bytes:
    if algorithm is None:
        algorithm = b"ed25519-sha256" if name == "ed25519" else b"rsa-sha256"
    return dkim.sign(
        message, b"s", b"d.test", KEYS[name][0], canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=algorithm, linesep=b"\r\n",
    ) + message


def _outcome(call):
    """
    What a call gives: its value, or the type of what it raised.
    """
    try:
        return ("value", call())
    except Exception as e:
        return ("raised", type(e))


class PythonArithmetic:
    """
    Runs dkimpy with its own RSA code for the duration of a C{with}.
    """

    def __enter__(self):
        dkim.RSASSA_PKCS1_v1_5_sign = dkim.crypto.RSASSA_PKCS1_v1_5_sign
        dkim.RSASSA_PKCS1_v1_5_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify

    def __exit__(self, *exc) -> None:
        dkimrsa.install()


class ArithmeticTests(unittest.TestCase):
    """
    The two functions dkimrsa replaces, against dkimpy's own.
    """

    def setUp(self) -> None:
        dkimrsa.install()
        self.addCleanup(dkimrsa.install)

    def _key(self, name: str, private: bool = False) -> dict:
        pem = KEYS[name][0]
        if private:
            return dkim.crypto.parse_pem_private_key(pem)
        return dkim.crypto.parse_public_key(base64.b64decode(KEYS[name][1]))

    def test_installed(self) -> None:
        """
        After install(), dkimpy's module names the OpenSSL functions.
        """
        self.assertIs(dkim.RSASSA_PKCS1_v1_5_verify, dkimrsa._opensslVerify)
        self.assertIs(dkim.RSASSA_PKCS1_v1_5_sign, dkimrsa._opensslSign)

    def test_sameSignatures(self) -> None:
        """
        A signature made by OpenSSL is the octets dkimpy's Python makes
        (RSASSA-PKCS1-v1_5 is deterministic), whole messages included.
        """
        for name in RSA_NAMES:
            digest = hashlib.sha256(name.encode())
            key = self._key(name, private=True)
            self.assertEqual(
                bytes(dkimrsa._opensslSign(digest, key)),
                bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, key)),
                name,
            )
            signed = _sign(name)
            with PythonArithmetic():
                self.assertEqual(signed, _sign(name))

    @SETTINGS
    @given(
        signer=st.sampled_from(RSA_NAMES),
        verifier=st.sampled_from(RSA_NAMES),
        digestName=st.sampled_from(["sha256", "sha1"]),
        data=st.binary(max_size=64),
        alteredData=st.booleans(),
        change=st.sampled_from(
            ["none", "flip", "dropFirst", "dropLast", "zeroPad", "addModulus", "empty", "random"]
        ),
        position=st.integers(min_value=0, max_value=10_000),
        noise=st.binary(min_size=1, max_size=300),
    )
    def test_sameVerdicts(
        self, signer, verifier, digestName, data, alteredData, change, position, noise
    ) -> None:
        """
        For any signature, made by the right key or another (of another
        size), over the data or not, altered, shortened, lengthened or
        random: OpenSSL's verdict (or exception) is dkimpy's.
        """
        hasher = getattr(hashlib, digestName)
        signature = bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(hasher(data), self._key(signer, True)))
        public = self._key(verifier)
        if change == "flip":
            index = position % len(signature)
            signature = signature[:index] + bytes([signature[index] ^ 1]) + signature[index + 1 :]
        elif change == "dropFirst":
            signature = signature[1:]
        elif change == "dropLast":
            signature = signature[:-1]
        elif change == "zeroPad":
            signature = b"\0" * (1 + position % 3) + signature
        elif change == "addModulus":
            value = int.from_bytes(signature, "big") + public["modulus"]
            signature = value.to_bytes((value.bit_length() + 7) // 8, "big")
        elif change == "empty":
            signature = b""
        elif change == "random":
            signature = noise
        checked = hasher(data + b"!" if alteredData else data)
        self.assertEqual(
            _outcome(lambda: dkimrsa._opensslVerify(checked, signature, public)),
            _outcome(lambda: dkim.crypto.RSASSA_PKCS1_v1_5_verify(checked, signature, public)),
        )

    def test_goodSignatureVerifies(self) -> None:
        """
        The plain case, spelled out: a good signature verifies, and the
        same signature over other data does not.
        """
        key = self._key("rsa2048", private=True)
        signature = bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(b"x"), key))
        public = self._key("rsa2048")
        self.assertTrue(dkimrsa._opensslVerify(hashlib.sha256(b"x"), signature, public))
        self.assertFalse(dkimrsa._opensslVerify(hashlib.sha256(b"y"), signature, public))

    def test_keyTooShortForDigest(self) -> None:
        """
        A modulus too short to hold the DigestInfo raises dkimpy's
        DigestTooLargeError, as dkimpy's own code does.
        """
        # 256 bits: 32 octets, less than the 62 a SHA-256 DigestInfo needs.
        public = {"modulus": (1 << 255) + 9, "publicExponent": 65537}
        for verify in (dkimrsa._opensslVerify, dkim.crypto.RSASSA_PKCS1_v1_5_verify):
            self.assertRaises(
                dkim.crypto.DigestTooLargeError, verify, hashlib.sha256(b"x"), b"\1" * 32, public
            )


def _mutate(message: bytes, kind: str, position: int, name: str) -> tuple[bytes, bytes]:
    """
    A signed message and its key record, one of them spoiled by C{kind}.
    """
    record = _record(name)
    if kind == "alteredBody":
        index = len(message) - 10 - position % 200
        message = message[:index] + b"X" + message[index + 1 :]
    elif kind == "alteredHeader":
        message = message.replace(b"the  report", b"the  rep0rt")
    elif kind == "badBase64":
        start = message.index(b" b=") + 3
        index = start + position % 40
        message = message[:index] + b"*!" + message[index + 2 :]
    elif kind == "badPadding":
        start = message.index(b" b=") + 3
        message = message[:start] + b"A" + message[start:]
    elif kind == "truncatedKey":
        cut = record.index(b"p=") + 2 + position % (len(record) - record.index(b"p=") - 2)
        record = record[:cut]
    elif kind == "otherKey":
        # A record holding another key, of another size or type.
        record = _record({"rsa512": "rsa2048", "ed25519": "rsa1024"}.get(name, "rsa512"))
    elif kind == "badKeyBase64":
        record = record.replace(b"p=", b"p=*")
    return message, record


class MessageTests(unittest.TestCase):
    """
    Whole messages: dkimpy's verify with either arithmetic, and the MX's
    own path (maild.trust.dkim), agree.
    """

    def setUp(self) -> None:
        dkimrsa.install()
        self.addCleanup(dkimrsa.install)
        self.signed = {name: _sign(name) for name in KEYS}

    def _dkimpy(self, message: bytes, record: bytes):
        return _outcome(
            lambda: dkim.DKIM(message).verify(dnsfunc=lambda name, timeout=5: record)
        )

    def _mx(self, message: bytes, record: bytes) -> str:
        section = HeaderFilter("mx.test")
        section.feed(message)
        section.finish()
        signatures = trustDKIM.readSignatures(parseFields(section.section))
        keys = {s.keyName: record for s in signatures if not isinstance(s, str)}
        (result,) = trustDKIM._verifyAll(message, len(section.section), signatures, keys)
        return result.result

    @SETTINGS
    @given(
        name=st.sampled_from(sorted(KEYS)),
        kind=st.sampled_from(
            ["good", "alteredBody", "alteredHeader", "badBase64", "badPadding", "truncatedKey",
             "otherKey", "badKeyBase64"]
        ),
        position=st.integers(min_value=0, max_value=10_000),
    )
    def test_sameAnswers(self, name, kind, position) -> None:
        """
        Good, altered, badly encoded, wrongly sized and truncated input gets
        the same answer from dkimpy whichever arithmetic it runs, and the
        MX says pass exactly when dkimpy says the signature verifies.
        """
        message, record = _mutate(self.signed[name], kind, position, name)
        openssl = self._dkimpy(message, record)
        with PythonArithmetic():
            python = self._dkimpy(message, record)
        self.assertEqual(openssl, python)
        self.assertEqual(self._mx(message, record) == "pass", openssl == ("value", True))

    def test_expectedVerdicts(self) -> None:
        """
        The cases by name: a good RSA or ed25519 signature passes, an
        altered body fails, a key below 1024 bits is refused even with a
        good signature, a key of another size fails, a truncated key is
        unusable.
        """
        for name in ("rsa1024", "rsa2048", "rsa2048e3", "ed25519"):
            self.assertEqual(self._mx(*_mutate(self.signed[name], "good", 0, name)), "pass")
            self.assertEqual(self._mx(*_mutate(self.signed[name], "alteredBody", 0, name)), "fail")
        self.assertEqual(self._mx(*_mutate(self.signed["rsa512"], "good", 0, "rsa512")), "permerror")
        self.assertEqual(self._mx(*_mutate(self.signed["rsa2048"], "otherKey", 0, "rsa2048")), "fail")
        self.assertEqual(
            self._mx(*_mutate(self.signed["rsa2048"], "truncatedKey", 100, "rsa2048")), "permerror"
        )

    def test_parsedOnceSameAsWhole(self) -> None:
        """
        The body the MX slices off after the header section is the body
        dkimpy's own parse of the whole message gives; a message with bare
        LF line ends (which SMTP refuses) is parsed whole.
        """
        for message in (
            self.signed["rsa2048"],
            b"From: a@d.test\r\n\r\n",
            b"From: a@d.test\r\n",
            b"\r\nbody only\r\n",
            b"From: a@d.test\r\n\r\nbody\nwith bare LF\r\n",
            b"From: a@d.test\n\r\nnot the end\r\n\r\nbody\r\n",
        ):
            section = HeaderFilter("mx.test")
            section.feed(message)
            section.finish()
            fast = trustDKIM._readMessage(message, len(section.section))
            whole = dkim.DKIM(message)
            self.assertEqual((fast.headers, fast.body), (whole.headers, whole.body), message)
