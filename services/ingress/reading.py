"""Reading campaign bodies without letting strangers, or a crowd, spend our memory.

A body is read only once its ``X-API-Key`` was found right (the endpoint checks first), and
only while the bytes of all bodies being read and handled at once stay within
``[ingress] max_reading_bytes``: each request reserves its Content-Length (``max_body_bytes``
when the length is unknown or the body is compressed) before reading, and gives it back with
its answer. Past the budget the answer is 503 with Retry-After, which Optimove retries.
"""

from __future__ import annotations

from aiohttp import hdrs, web


class ReadBudget:
    """Bytes reserved by the requests being read or handled now, over all of them."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_use = 0

    def reserve(self, size: int) -> bool:
        if self.in_use + size > self.limit_bytes:
            return False
        self.in_use += size
        return True

    def release(self, size: int) -> None:
        self.in_use -= size


def reservation(request: web.BaseRequest, max_body_bytes: int) -> int:
    """What reading ``request``'s body may cost: its length, if known and not compressed."""
    length = request.content_length
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if length is None or encoding not in ("", "identity"):
        return max_body_bytes
    return min(length, max_body_bytes)


def declared_too_large(request: web.BaseRequest, max_body_bytes: int) -> bool:
    return request.content_length is not None and request.content_length > max_body_bytes


async def read_body(request: web.BaseRequest, max_body_bytes: int) -> bytes | None:
    """The raw body, or None when it exceeds the limit. Raises ``web.RequestPayloadError`` for
    a body that cannot be decoded (Content-Encoding, chunking)."""
    if declared_too_large(request, max_body_bytes):
        return None
    try:
        # client_max_size is limit + 1: a body aiohttp lets through may still be one too big.
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None
    return body if len(body) <= max_body_bytes else None
