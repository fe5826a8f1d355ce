"""
maild's DKIM signature checking (L{maild.trust.dkimsig}) gives dkimpy's
answers: its faster canonicalizations give dkimpy's octets, and a
signature checked with the message's shared work gives what dkimpy's
C{verify_sig_process} gives (the same boolean, or the same exception),
for arbitrary messages, signatures, keys and alterations.
"""

from __future__ import annotations

import base64

import dkim
import nacl.signing
from dkim.canonicalization import Relaxed
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from maild import dkimrsa
from maild.trust.dkimsig import (
    SignedMessage,
    parseHeaders,
    parseTags,
    relaxedBody,
    relaxedField,
    withoutSignatureValue,
)
from tests.test_trust import RSA_PRIVATE
from tests.test_trust import RSA_PUBLIC as RSA_PUBLIC_TEXT

dkimrsa.install()

SETTINGS = settings(max_examples=300, deadline=None)

# Bodies and values made of what the canonicalizations care about.
whitespaceHeavy = st.binary().map(bytes) | st.lists(
    st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r", b"\n", b"a", b"b=", b"xyz", b"\x00"]),
    max_size=40,
).map(b"".join)

signatureValues = st.tuples(st.lists(
    st.sampled_from(
        [b";", b" ", b"\t", b"\r\n", b"\r\n ", b"\n", b"b", b"bh", b"=", b"a", b"Z", b"9", b"+", b"/",
         b" b=", b";b=", b"; b =", b"abc", b"\x00", b"-", b"v=1"]
    ),
    max_size=30,
).map(b"".join), st.sampled_from([b"", b"\r\n", b"\n", b" \r\n", b"\r"])).map(b"".join)

ED25519_SEED = b"e" * 32
ED25519_PUBLIC = base64.b64encode(bytes(nacl.signing.SigningKey(ED25519_SEED).verify_key))
# The RSA key of the end-to-end trust tests, its public half as bytes.
RSA_PUBLIC = RSA_PUBLIC_TEXT.encode()
KEYS = {
    b"ed": (b"ed25519-sha256", base64.b64encode(ED25519_SEED),
            b"v=DKIM1; k=ed25519; p=" + ED25519_PUBLIC),
    b"rsa": (b"rsa-sha256", RSA_PRIVATE, b"v=DKIM1; k=rsa; p=" + RSA_PUBLIC),
}

headerNames = st.sampled_from([b"From", b"from", b"To", b"Subject", b"SUBJECT", b"X-Tag", b"Date"])
headerValues = st.lists(
    st.sampled_from([b" ", b"\t", b"a@d.test", b"x  y", b"\r\n ", b"\r\n\t", b"z ", b"\xc3\xa9"]),
    max_size=8,
).map(lambda parts: b"".join(parts).rstrip(b"\r\n "))
bodyLines = st.lists(
    st.lists(st.sampled_from([b" ", b"\t", b"word", b".", b"x"]), max_size=6).map(b"".join),
    max_size=8,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@st.composite
def signedMessages(draw):
    """
    A message with one to three signatures (ed25519 or RSA, any
    canonicalization, with or without l=), perhaps altered afterwards.
    """
    fields = draw(st.lists(st.tuples(headerNames, headerValues), min_size=1, max_size=6))
    header = b"".join(name + b":" + value + b"\r\n" for name, value in fields)
    body = draw(bodyLines)
    message = header + b"\r\n" + body
    for _ in range(draw(st.integers(1, 3))):
        selector = draw(st.sampled_from(sorted(KEYS)))
        algorithm, private, _ = KEYS[selector]
        canonicalize = (draw(st.sampled_from([b"simple", b"relaxed"])),
                        draw(st.sampled_from([b"simple", b"relaxed"])))
        include = draw(
            st.lists(st.sampled_from([b"from", b"to", b"subject", b"x-tag", b"date"]),
                     min_size=1, max_size=5)
        )
        if b"from" not in include:
            include.append(b"from")
        signature = dkim.sign(
            message, selector, b"d.test", private, signature_algorithm=algorithm,
            canonicalize=canonicalize, include_headers=include,
            length=draw(st.booleans()),
        )
        message = signature + message
    alteration = draw(
        st.sampled_from(["none", "body space", "body line", "body tail", "header space", "header",
                         "blank lines", "b="])
    )
    head, _, body = message.partition(b"\r\n\r\n")
    if alteration == "body space":
        body = body.replace(b" ", b"  ", 1)
    elif alteration == "body line":
        body = b"extra\r\n" + body
    elif alteration == "body tail":
        body += b"appended\r\n"
    elif alteration == "blank lines":
        body += b"\r\n\r\n"
    elif alteration == "header space":
        head = head.replace(b": ", b":  ", 1)
    elif alteration == "header":
        head += b"\r\nFrom: other@d.test"
    elif alteration == "b=":
        head = head.replace(b"b=", b"b=A", 1)
    return head + b"\r\n\r\n" + body


def dkimpyAnswer(message: bytes, index: int):
    """
    dkimpy's own answer for signature C{index}: its verify_sig_process,
    given the key as maild gives it.
    """
    verifier = dkim.DKIM(message)
    return _answer(verifier, index, lambda tags, include, field: verifier.verify_sig_process(
        tags, include, field, None))


def maildAnswer(message: bytes, index: int, signed: SignedMessage | None = None):
    signed = signed or SignedMessage(dkim.DKIM(message))
    return _answer(signed.verifier, index, signed.verify, signed.prepare)


def _answer(verifier, index: int, verify, prepare=None):
    try:
        prepared = (prepare or verifier.verify_headerprep)(index)
        if not prepared:
            return "no signature"
        tags, include, fields = prepared
        record = KEYS.get(tags[b"s"], (None, None, b"v=DKIM1; p="))[2]
        verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = dkim.evaluate_pk(
            b"key", record
        )
        return verify(tags, include, fields[index])
    except Exception as e:
        return (type(e), str(e))


class CanonicalizationTests(unittest.TestCase):
    @SETTINGS
    @given(whitespaceHeavy)
    def test_relaxedBodySameAsDkimpy(self, body):
        """
        The relaxed body canonicalization gives dkimpy's octets for any
        body.
        """
        self.assertEqual(relaxedBody(body), Relaxed.canonicalize_body(body))

    @SETTINGS
    @given(whitespaceHeavy, whitespaceHeavy)
    def test_relaxedFieldSameAsDkimpy(self, name, value):
        """
        The relaxed canonicalization of a header field gives dkimpy's
        octets for any name and value.
        """
        self.assertEqual([relaxedField(name, value)], Relaxed.canonicalize_headers([(name, value)]))

    @SETTINGS
    @given(signatureValues)
    def test_emptyingBSameAsDkimpy(self, value):
        """
        Emptying the b= tag gives what dkimpy's expression gives, for any
        field value.
        """
        self.assertEqual(withoutSignatureValue(value), dkim.RE_BTAG.sub(b"\\1", value))

    def test_emptyingRealSignature(self):
        """
        A folded signature field: the b= value goes, its line breaks with
        it, and bh= stays.
        """
        value = b" v=1; bh=abc=;\r\n b=AbC+/\r\n dE=\r\n"
        self.assertEqual(withoutSignatureValue(value), b" v=1; bh=abc=;\r\n b=")
        self.assertEqual(withoutSignatureValue(value), dkim.RE_BTAG.sub(b"\\1", value))


def _outcome(f, *args):
    """
    What C{f(*args)} gives: its value, or its exception's type and text.
    """
    try:
        return f(*args)
    except Exception as e:
        return (type(e), str(e))


# Header sections: field lines, continuation lines, lines that are
# neither, and every kind of line end.
headerSections = st.lists(
    st.sampled_from(
        [b"From: a@d.test", b"DKIM-Signature: v=1; d=d.test", b"dkim-signature:", b" folded",
         b"\tfolded", b"Subject:x", b"::", b":a:b", b"no colon", b"From mbox line", b"X\x7f: y",
         b"N\xc3\xa9: v", b"", b"\r", b"a:b:c"]
    ),
    max_size=10,
).flatmap(lambda lines: st.tuples(
    st.just(lines), st.lists(st.sampled_from([b"\r\n", b"\n", b"\r"]), min_size=len(lines),
                             max_size=len(lines)),
)).map(lambda pair: b"".join(line + end for line, end in zip(*pair)))


# Tag lists: names good and bad, with or without "=", repeated or not,
# with or without a trailing ";".
tagLists = st.tuples(
    st.lists(
        st.tuples(
            st.sampled_from([b"v", b"a", b"b", b"bh", b"d", b"s", b"h", b"9x", b"_x", b"", b" d ",
                             b"\xc3\xa9", b"Z"]),
            st.sampled_from([b"=", b" = ", b"", b"=="]),
            st.sampled_from([b"1", b"rsa-sha256", b"d.test", b"from : to", b"", b" x ", b"a=b"]),
        ).map(b"".join),
        max_size=8,
    ).map(b";".join),
    st.sampled_from([b"", b";", b"; ", b";;", b" \r\n"]),
).map(b"".join)


class ParsingTests(unittest.TestCase):
    @SETTINGS
    @given(tagLists | signatureValues | st.binary().map(bytes))
    def test_tagsSameAsDkimpy(self, value):
        """
        A tag list is read as dkimpy's parse_tag_value reads it: the same
        tags, or the same exception.
        """
        self.assertEqual(_outcome(parseTags, value), _outcome(dkim.util.parse_tag_value, value))

    @SETTINGS
    @given(headerSections | st.binary().map(bytes))
    def test_headersSameAsDkimpy(self, section):
        """
        A header section is parsed into dkimpy's fields, or gets dkimpy's
        exception.
        """
        self.assertEqual(
            _outcome(parseHeaders, section),
            _outcome(lambda: dkim.rfc822_parse(section)[0]),
        )

    @SETTINGS
    @given(
        st.lists(
            st.tuples(st.sampled_from([b"DKIM-Signature", b"dkim-signature", b"DKIM-Signatures"]),
                      tagLists | signatureValues),
            min_size=1, max_size=3,
        ),
        st.integers(0, 3),
    )
    def test_prepareSameAsDkimpy(self, fields, index):
        """
        A signature, however broken its tag list, is prepared as dkimpy's
        verify_headerprep prepares it: the same tags, signed names and
        fields, or the same exception.
        """
        message = b"".join(
            name + b":" + value.replace(b"\n", b" ").replace(b"\r", b" ") + b"\r\n"
            for name, value in fields
        ) + b"From: a@d.test\r\n\r\nbody\r\n"
        self.assertEqual(
            _outcome(SignedMessage(dkim.DKIM(message)).prepare, index),
            _outcome(dkim.DKIM(message).verify_headerprep, index),
        )

    def test_prepareRealSignatures(self):
        """
        Well-formed signatures, second one included, are prepared as
        dkimpy prepares them.
        """
        message = b"From: a@d.test\r\nTo: b@d.test\r\n\r\nbody\r\n"
        for selector in (b"rsa", b"ed"):
            algorithm, private, _ = KEYS[selector]
            message = dkim.sign(message, selector, b"d.test", private,
                                signature_algorithm=algorithm) + message
        for index in range(3):
            self.assertEqual(
                SignedMessage(dkim.DKIM(message)).prepare(index),
                dkim.DKIM(message).verify_headerprep(index),
            )


class SignatureTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(signedMessages())
    def test_sameAnswersAsDkimpy(self, message):
        """
        Every signature of any signed (and perhaps altered) message gets
        dkimpy's answer: True, False, or the same exception; checked one
        after the other with the message's shared work, as maild does.
        """
        count = sum(
            1 for name, _ in dkim.DKIM(message).headers if name.lower() == b"dkim-signature"
        )
        signed = SignedMessage(dkim.DKIM(message))
        for index in range(count):
            self.assertEqual(maildAnswer(message, index, signed), dkimpyAnswer(message, index))

    def test_unalteredPasses(self):
        """
        A message signed rsa-sha256 and ed25519-sha256 over a relaxed body
        (as maild's relay signs) passes both, its body hashed once.
        """
        message = b"From: a@d.test\r\nSubject: hi\r\n\r\nsome  body \t\r\n\r\n"
        for selector in (b"rsa", b"ed"):
            algorithm, private, _ = KEYS[selector]
            message = dkim.sign(message, selector, b"d.test", private,
                                signature_algorithm=algorithm,
                                canonicalize=(b"relaxed", b"relaxed")) + message
        signed = SignedMessage(dkim.DKIM(message))
        self.assertEqual([maildAnswer(message, i, signed) for i in (0, 1)], [True, True])
        self.assertEqual(len(signed._bodyHashes), 1)
