"""Deterministic identifiers: a retried request or a repeated callback yields the same ids."""

from __future__ import annotations

import hashlib

import orjson

# The part of a content request key before the acceptance time (see ``content_request_key``).
CONTENT_PREFIX = "c:"


def _digest(*parts: str, length: int = 24) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode("utf-8"))
        hasher.update(b"\x1f")
    return hasher.hexdigest()[:length]


def request_key(batch_id: str, request_id: str | None) -> str | None:
    """Identifies a campaign request by its ids: batchId and requestId together, so that two
    batches sharing a requestId stay two requests. None when it has neither (auto replies): such
    a request is known by its content instead (``content_key``)."""
    if batch_id and request_id:
        # JSON keeps the pair unambiguous whatever the ids contain.
        return "q:" + orjson.dumps([batch_id, request_id]).decode()
    if request_id:
        return f"r:{request_id}"
    if batch_id:
        return f"b:{batch_id}"
    return None


def content_key(canonical_body: bytes) -> str:
    """Identifies an id-less request by what it says (``canonical_body``: the parsed body
    re-serialised with sorted keys), so that whitespace variants of one body are one request."""
    return CONTENT_PREFIX + hashlib.sha256(canonical_body).hexdigest()[:32]


def content_request_key(content: str, first_accepted_ms: int) -> str:
    """The request key of an id-less request: its content and when that content was first
    accepted. The same words sent again after the dedupe window are a new request, and their
    messages need new ids (the sender and later stages recognise repeats by message id)."""
    return f"{content}@{first_accepted_ms}"


def message_id(tenant: str, request: str, index: int, mobile_number: str) -> str:
    return "m-" + _digest(tenant, request, str(index), mobile_number)


def event_id(*parts: str) -> str:
    return "e-" + _digest(*parts)


def unsent_correlation_key(message_id: str) -> str:
    """Correlation key of a dispatch that never reached a provider: the message id itself."""
    return f"message:{message_id}"


def tenant_number_key(tenant: str, e164: str) -> str:
    """The key of one customer of one tenant: ``sms.recipients`` (a number's messages stay in one
    partition, in order), ``sms.opt-outs`` and ``sms.number-formats``."""
    return f"{tenant}:{e164}"
