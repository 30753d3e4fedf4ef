"""Optimove's ``x-hub-signature``: HMAC-SHA256 of the body, ``sha256=<lowercase hex>``.

Outgoing: serialise once, sign those bytes, send the same bytes.
Incoming: verify the raw bytes; failing that, the two compact re-serialisations the documentation's
examples produce (decisions.md §2). Every comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from enum import StrEnum
from typing import Any

SIGNATURE_HEADER = "x-hub-signature"
ALGORITHM = "sha256"
_DIGEST_HEX_LENGTH = 64


class SignatureFailure(StrEnum):
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN_ALGORITHM = "unknown_algorithm"
    MISMATCH = "mismatch"


def _digest(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str) -> str:
    """The header value for ``body``."""
    return f"{ALGORITHM}={_digest(body, secret)}"


def _compact_reserialisations(body: bytes) -> list[bytes]:
    try:
        parsed: Any = json.loads(body)
        # JavaScript JSON.stringify keeps non-ASCII; Python json.dumps escapes it by default.
        as_javascript = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
        as_python = json.dumps(parsed, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        # Not JSON, or nested deeper than Python's json goes: nobody signed a re-serialisation
        # of it that we could reproduce, so only the raw bytes count (and they did not verify).
        return []
    return [c for c in dict.fromkeys((as_javascript, as_python)) if c != body]


def verify(body: bytes, header: str | None, secret: str) -> SignatureFailure | None:
    """None when ``header`` is a valid signature of ``body``; otherwise why not."""
    if not header:
        return SignatureFailure.MISSING
    algorithm, sep, given = header.strip().partition("=")
    if not sep:
        return SignatureFailure.MALFORMED
    if algorithm.strip().lower() != ALGORITHM:
        return SignatureFailure.UNKNOWN_ALGORITHM
    given = given.strip().lower()
    if len(given) != _DIGEST_HEX_LENGTH or any(c not in "0123456789abcdef" for c in given):
        return SignatureFailure.MALFORMED
    expected = given.encode()
    if hmac.compare_digest(_digest(body, secret).encode(), expected):
        return None
    # Re-serialising a large batch costs more than the rest of the check: only when needed.
    for candidate in _compact_reserialisations(body):
        if hmac.compare_digest(_digest(candidate, secret).encode(), expected):
            return None
    return SignatureFailure.MISMATCH


def constant_time_equals(given: str | None, expected: str) -> bool:
    # aiohttp reads header bytes that are not UTF-8 as lone surrogates ("surrogateescape"):
    # such a header is simply not equal, never an encoding error.
    return hmac.compare_digest(
        (given or "").encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )
