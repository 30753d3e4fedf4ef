"""The HTTP client of our hot paths: one POST per delivery report, per provider call, per
simulated callback.

aiohttp's client spent about 150 µs of CPU per request on these machines, most of it building
request and response objects we never use (cookies, traces, redirects, streaming readers); per
message that was the largest single cost of the reporter, the sender and the provider simulator.
This client does one thing: POST a body on a kept-alive HTTP/1.1 connection and read the whole
answer, parsed by ``httptools`` (llhttp, the parser of Node.js and of uvicorn; the same parser
aiohttp ships): 72 to 78 µs per request where aiohttp's took 156 to 177 (docs/performance.md).

Semantics the callers rely on:
- ``HttpError.sent`` is False only when the request certainly never reached the peer (no
  connection was made): a provider call that failed so may be sent again without a duplicate.
- A redirect is an answer like any other (never followed).
- ``timeout_s`` bounds the whole request: connecting, writing and reading the answer.
- At most ``limit`` requests run at once, each on a connection of its own; idle connections are
  reused, the most recently used first.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import Self, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

USER_AGENT = "sms-bridge"
# Answers larger than this are refused (HttpError): nothing we call answers with megabytes.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class HttpError(Exception):
    """The request failed without an answer. ``sent``: it may have reached the peer."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class HttpTimeout(HttpError, TimeoutError):
    """No whole answer within the request's timeout."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass(frozen=True)
class _Target:
    """Where a URL's requests go, and the start of every request to it."""

    origin: tuple[str, str, int]  # scheme, host, port: the pool's key
    head: bytes  # request line and Host header

    @property
    def tls(self) -> bool:
        return self.origin[0] == "https"


@lru_cache(maxsize=256)
def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default_port = 443 if parts.scheme == "https" else 80
    port = parts.port or default_port
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6 literal
    host = name if port == default_port else f"{name}:{port}"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
    return _Target((parts.scheme, parts.hostname, port), head.encode("latin-1"))


def _header_lines(headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"Content-Length: {length}\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} holds a line break or a colon")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One kept-alive connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Answer] | None = None
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._headers_done = False
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the server asked to switch protocols")
        except httptools.HttpParserError as exc:
            self._fail(f"malformed answer: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is None and self._ends_with_connection():
            self._complete()  # an answer without a length ends where the connection does
            return
        reason = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
        self._fail(reason)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(f"answer larger than {MAX_ANSWER_BYTES} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self.close()
        self._complete()

    def _complete(self) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            status = self._parser.get_status_code()
            answer.set_result(Answer(status, CIMultiDictProxy(self._headers), b"".join(self._body)))

    def _ends_with_connection(self) -> bool:
        """Headers read, and neither a length nor chunks: the body is all until the close."""
        headers = self._headers
        return (
            self._headers_done
            and "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
        )

    # -- requests --------------------------------------------------------------------------------

    def request(self, data: bytes) -> asyncio.Future[Answer]:
        if self.transport is None:
            raise HttpError("not connected", sent=False)
        self._answer = asyncio.get_running_loop().create_future()
        self._headers = CIMultiDict()
        self._headers_done = False
        self._body = []
        self._size = 0
        self.transport.write(data)
        return self._answer

    def idle(self) -> bool:
        """Reusable: open, and its last answer read whole."""
        return not self.closed and (self._answer is None or self._answer.done())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(HttpError(reason, sent=True))
        self.close()


class HttpClient:
    """Kept-alive connections per origin; at most ``limit`` requests at once (None: no limit)."""

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        limit: int | None = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max(1, limit)) if limit is not None else None
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._ssl = ssl_context
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float | None = None
    ) -> Answer:
        """POST ``body`` with ``headers`` (Content-Length is added) and read the whole answer.

        ``timeout_s`` (default: the client's) counts from when the request may go: waiting for
        one of the ``limit`` slots does not count. Raises ``HttpTimeout`` when it passes,
        ``HttpError`` on any other network trouble, ``ValueError`` for a URL or a header that
        cannot be sent.
        """
        if self._closed:
            raise HttpError("the client is closed", sent=False)
        target = _target(url)
        data = target.head + _header_lines(headers, len(body)) + body
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if self._slots is None:
            return await self._exchange(target, data, timeout)
        async with self._slots:
            return await self._exchange(target, data, timeout)

    async def _exchange(self, target: _Target, data: bytes, timeout_s: float) -> Answer:
        connection: _Connection | None = None
        sent = False
        try:
            async with asyncio.timeout(timeout_s):
                connection = self._reuse(target.origin)
                if connection is None:
                    connection = await self._connect(target)
                answer = connection.request(data)
                sent = True
                result = await answer
        except TimeoutError:
            if connection is not None:
                connection.close()
            raise HttpTimeout(f"no answer within {timeout_s:g}s", sent=sent) from None
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        if connection.idle():
            self._idle.setdefault(target.origin, deque()).append(connection)
        return result

    def _reuse(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be stale
            if connection.idle():
                return connection
        return None

    async def _connect(self, target: _Target) -> _Connection:
        _, host, port = target.origin
        context = None
        if target.tls:
            context = self._ssl or _default_context()
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                _Connection, host, port, ssl=context
            )
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(
                f"cannot connect to {host}:{port}: {type(exc).__name__}: {exc}", sent=False
            ) from None
        return connection

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


@lru_cache(maxsize=1)
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()
