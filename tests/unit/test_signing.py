"""shared/contract/signing.py: Optimove's x-hub-signature, both directions (decisions.md §2)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from shared.contract.signing import SignatureFailure, constant_time_equals, sign, verify

SECRET = "my-shared-secret"
# optimove-sms-api.md §1.2: the exact bytes and their signature.
VECTOR_BODY = (
    b'{"messages":[{"to":"companyAbc","from":"44123456789","message":"stop",'
    b'"sentAt":"2015-12-25T10:30:00"}]}'
)
VECTOR_SIGNATURE = "sha256=523c5914fcb59da75707e9363fd521d7b1d761e0a1733c38fa05982e51d65454"

DOCUMENT: dict[str, Any] = {
    "batchId": "batch-7",
    "metadata": {"appId": 7, "campaignId": "café-☕", "extra": {"nested": [1, 2.5, None]}},
    "recipients": [
        {"message": "Grüße 👋 — 20% off", "mobileNumber": "+447911123456", "customerId": "c1"}
    ],
}


def python_signed(document: dict[str, Any]) -> str:
    """How the documentation's Python example signs: compact, ASCII escapes."""
    return sign(json.dumps(document, separators=(",", ":")).encode(), SECRET)


def node_signed(document: dict[str, Any]) -> str:
    """How JSON.stringify would serialise it: compact, non-ASCII kept as UTF-8."""
    return sign(json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(), SECRET)


def pretty(document: dict[str, Any]) -> bytes:
    """What actually arrives: the same document, pretty-printed."""
    return json.dumps(document, indent=2, ensure_ascii=False).encode()


def test_documented_vector() -> None:
    assert sign(VECTOR_BODY, SECRET) == VECTOR_SIGNATURE
    assert verify(VECTOR_BODY, VECTOR_SIGNATURE, SECRET) is None


def test_signature_is_lowercase_hex_hmac_sha256_of_the_exact_bytes() -> None:
    expected = hmac.new(SECRET.encode(), VECTOR_BODY, hashlib.sha256).hexdigest()
    assert sign(VECTOR_BODY, SECRET) == f"sha256={expected}"
    assert expected == expected.lower()


def test_raw_bytes_as_received_verify() -> None:
    body = pretty(DOCUMENT)
    assert verify(body, sign(body, SECRET), SECRET) is None


@pytest.mark.parametrize("signer", [python_signed, node_signed], ids=["python", "node"])
def test_compact_reserialisations_of_a_pretty_printed_body_verify(signer: Any) -> None:
    body = pretty(DOCUMENT)
    signature = signer(DOCUMENT)
    assert signature != sign(body, SECRET)  # the raw bytes alone would not verify
    assert verify(body, signature, SECRET) is None


def test_python_and_node_styles_differ_for_non_ascii_text() -> None:
    # Both are needed: escaping changes the bytes, hence the signature.
    assert python_signed(DOCUMENT) != node_signed(DOCUMENT)


def test_uppercase_hex_and_prefix_are_accepted() -> None:
    hex_digest = VECTOR_SIGNATURE.partition("=")[2]
    assert verify(VECTOR_BODY, "sha256=" + hex_digest.upper(), SECRET) is None
    assert verify(VECTOR_BODY, "SHA256=" + hex_digest, SECRET) is None
    assert verify(VECTOR_BODY, f"  {VECTOR_SIGNATURE} ", SECRET) is None


def test_wrong_secret_is_a_mismatch() -> None:
    assert verify(VECTOR_BODY, sign(VECTOR_BODY, "other-secret"), SECRET) == (
        SignatureFailure.MISMATCH
    )
    body = pretty(DOCUMENT)
    assert verify(body, sign(body, "other-secret"), SECRET) == SignatureFailure.MISMATCH


def test_changed_body_is_a_mismatch_even_when_reserialised() -> None:
    changed = dict(DOCUMENT, batchId="batch-8")
    assert verify(pretty(changed), python_signed(DOCUMENT), SECRET) == SignatureFailure.MISMATCH
    assert verify(pretty(changed), node_signed(DOCUMENT), SECRET) == SignatureFailure.MISMATCH


def test_body_that_is_not_json_is_checked_as_raw_bytes_only() -> None:
    body = b"not json at all \xff"
    assert verify(body, sign(body, SECRET), SECRET) is None
    assert verify(body, sign(b"other", SECRET), SECRET) == SignatureFailure.MISMATCH


@pytest.mark.parametrize("depth", [1_100, 100_000])
def test_a_body_nested_deeper_than_json_reads_is_a_mismatch_not_an_error(depth: int) -> None:
    """Issue 14, point 9: re-serialising it raised RecursionError (a 500 at ingress)."""
    deep = b'{"batchId": ' + b"[" * depth + b"]" * depth + b"}"
    assert verify(deep, sign(VECTOR_BODY, SECRET), SECRET) == SignatureFailure.MISMATCH
    assert verify(deep, sign(deep, SECRET), SECRET) is None  # its own bytes still verify


@pytest.mark.parametrize("header", [None, ""])
def test_missing_signature(header: str | None) -> None:
    assert verify(VECTOR_BODY, header, SECRET) == SignatureFailure.MISSING


@pytest.mark.parametrize(
    "header",
    [
        "sha1=" + hashlib.sha1(VECTOR_BODY).hexdigest(),
        "md5=" + VECTOR_SIGNATURE.partition("=")[2],
        "sha512=" + VECTOR_SIGNATURE.partition("=")[2],
    ],
)
def test_other_algorithms_are_refused(header: str) -> None:
    assert verify(VECTOR_BODY, header, SECRET) == SignatureFailure.UNKNOWN_ALGORITHM


@pytest.mark.parametrize(
    "header",
    [
        VECTOR_SIGNATURE[:-1],  # truncated
        VECTOR_SIGNATURE + "0",  # too long
        VECTOR_SIGNATURE.partition("=")[2],  # no algorithm prefix
        "sha256=" + "z" * 64,  # not hex
        "sha256=",
        "garbage",
    ],
)
def test_malformed_signatures(header: str) -> None:
    assert verify(VECTOR_BODY, header, SECRET) == SignatureFailure.MALFORMED


def test_constant_time_equals() -> None:
    assert constant_time_equals("key-1", "key-1")
    assert not constant_time_equals("key-2", "key-1")
    assert not constant_time_equals("key-1 ", "key-1")
    assert not constant_time_equals(None, "key-1")
    assert not constant_time_equals("", "key-1")
    assert constant_time_equals("clé-☕", "clé-☕")
