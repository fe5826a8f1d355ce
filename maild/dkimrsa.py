"""
dkimpy's RSA arithmetic done by OpenSSL (through C{cryptography}), for
signing (L{maild.relay.dkim}) and verifying (L{maild.trust.dkim}) alike.

dkimpy computes RSASSA-PKCS1-v1_5 (RFC 8017) with Python integers: some
16 ms per signature made and 0.4 ms per signature verified (its own
byte-by-byte integer conversions included), which would cap sending near
60 messages/s and cost the MX more than the rest of its checks together.
Everything else stays dkimpy's: canonicalization, the header and body
hashes, tag parsing, key records and policy; only the two functions
dkimpy looks up in its module at each signature are replaced, by ones
giving the same answers.  Call L{install} before using dkimpy.
"""

from __future__ import annotations

import functools

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.crypto import EMSA_PKCS1_v1_5_encode

_pythonSign = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_pythonVerify = dkim.crypto.RSASSA_PKCS1_v1_5_verify

# The digests dkimpy signs with (its HASH_ALGORITHMS), by hashlib's name.
_DIGESTS = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}

# Our own signing keys, by modulus: a few, loaded once.
_privateKeys: dict[int, rsa.RSAPrivateKey] = {}


def _opensslSign(digest, key: dict) -> bytes:
    """
    C{dkim.RSASSA_PKCS1_v1_5_sign}: the same octets, in about 1 ms.

    @param digest: a hash object (dkimpy's C{HashThrough}) of the header.
    @param key: the private key as dkimpy parses it.
    """
    if digest.name != "sha256":
        return _pythonSign(digest, key)
    private = _privateKeys.get(key["modulus"])
    if private is None:
        public = rsa.RSAPublicNumbers(key["publicExponent"], key["modulus"])
        private = rsa.RSAPrivateNumbers(
            key["prime1"], key["prime2"], key["privateExponent"],
            key["exponent1"], key["exponent2"], key["coefficient"], public,
        ).private_key()
        _privateKeys[key["modulus"]] = private
    return private.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@functools.lru_cache(maxsize=1024)
def _publicKey(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    # Kept per key: a domain signs much mail with one key, and the keys
    # of senders, unlike ours, are many.  None: OpenSSL refuses the key.
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        return None


def _opensslVerify(digest, signature: bytes, key: dict) -> bool:
    """
    C{dkim.RSASSA_PKCS1_v1_5_verify}, with its answers and exceptions.

    @param digest: a hash object (dkimpy's C{HashThrough}) of the header.
    @param signature: the decoded C{b=} value.
    @param key: the public key as dkimpy parses it (C{modulus},
        C{publicExponent}).
    @raise dkim.crypto.DigestTooLargeError: the key is too short for the
        digest, as dkimpy says.
    """
    modulus = key["modulus"]
    algorithm = _DIGESTS.get(digest.name)
    public = _publicKey(modulus, key["publicExponent"]) if modulus > 0 else None
    if algorithm is None or public is None:
        return _pythonVerify(digest, signature, key)
    size = (modulus.bit_length() + 7) // 8
    hashed = digest.digest()
    # The check (and exception) dkimpy makes before any arithmetic.
    EMSA_PKCS1_v1_5_encode(digest, size)
    value = int.from_bytes(signature, "big")
    if len(signature) != size or value >= modulus:
        # dkimpy takes a signature of any length and reduces it modulo n
        # where RFC 8017 section 8.2.2 would refuse it (I2OSP always gives
        # k octets, but a signer may drop leading zeros): as dkimpy does,
        # so that the answers do not depend on which arithmetic runs.
        signature = (value % modulus).to_bytes(size, "big")
    try:
        public.verify(signature, hashed, padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except InvalidSignature:
        return False
    except ValueError:
        # A key OpenSSL builds but will not verify with (a modulus beyond
        # its limit, say): dkimpy's arithmetic has none.
        return _pythonVerify(digest, signature, key)
    return True


def install() -> None:
    """
    Make dkimpy sign and verify RSA by OpenSSL (dkimpy looks both
    functions up in its module at each signature).  Idempotent.
    """
    dkim.RSASSA_PKCS1_v1_5_sign = _opensslSign
    dkim.RSASSA_PKCS1_v1_5_verify = _opensslVerify
