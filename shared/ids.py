"""Deterministic identifiers: a retried request or a repeated callback yields the same ids."""

from __future__ import annotations

import hashlib


def _digest(*parts: str, length: int = 24) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode("utf-8"))
        hasher.update(b"\x1f")
    return hasher.hexdigest()[:length]


def request_key(batch_id: str, request_id: str | None, raw_body: bytes) -> str:
    """Identifies a campaign request: requestId, else batchId, else (auto replies) the body."""
    if request_id:
        return f"r:{request_id}"
    if batch_id:
        return f"b:{batch_id}"
    return "h:" + hashlib.sha256(raw_body).hexdigest()[:32]


def message_id(tenant: str, request: str, index: int, mobile_number: str) -> str:
    return "m-" + _digest(tenant, request, str(index), mobile_number)


def event_id(*parts: str) -> str:
    return "e-" + _digest(*parts)


def unsent_correlation_key(message_id: str) -> str:
    """Correlation key of a dispatch that never reached a provider: the message id itself."""
    return f"message:{message_id}"
