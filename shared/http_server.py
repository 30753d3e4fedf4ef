"""The HTTP server of our hot public endpoint: provider callbacks, two per message.

aiohttp's server spent about 110 µs of CPU per request on these machines (request objects,
routing, middlewares, its stream machinery); the same request parsed by ``httptools`` (llhttp,
the parser of our HTTP client) and answered from a protocol costs about 30 µs
(docs/performance.md). This server does what the callbacks endpoint needs and nothing more:
POSTs (any method a route names) on kept-alive HTTP/1.1 connections, whole bodies read before
the handler runs, answers in request order.

Limits, each answered with a clear status and the connection closed: a body over
``max_body_bytes`` (413, before reading it when Content-Length says so), headers over
``max_header_bytes`` (431), malformed HTTP or an upgrade (400), a request not whole within
``request_timeout_s`` (408). A body encoded ``gzip`` or ``deflate`` is decoded (the decoded size
counts against the limit); another encoding is refused (400). Idle connections close after
``idle_timeout_s``. A handler whose client goes away is cancelled, unless ``cancel_on_disconnect``
is False (then it runs to its end, its answer unheard, as under aiohttp's server).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import httptools
import orjson
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from shared.tasks import finish_or_cancel

log = logging.getLogger(__name__)

# Pipelined requests waiting for their answers at which reading pauses (what one read brought in
# is still parsed), until half are answered: a client that sends faster than it is answered waits
# in its socket, not in our memory.
MAX_QUEUED = 16


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    match_info: Mapping[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes  # whole, Content-Encoding already decoded
    query_string: str = ""  # as sent, without the "?"

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" without a Content-Type)."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    @property
    def query(self) -> MultiDictProxy[str]:
        """The query's parameters, decoded, blank ones kept (like aiohttp's ``request.query``).
        Parsed on each call: only control endpoints read it, the hot ones do not."""
        return MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))

    def json(self) -> Any:
        """The body parsed as JSON; ValueError (``orjson.JSONDecodeError``) if it is not JSON."""
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "text/plain; charset=utf-8"  # None: no Content-Type header
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """``method`` on ``pattern``: literal segments and ``{name}`` ones, each one whole segment
    (its value percent-decoded)."""

    method: str
    pattern: str
    handler: Handler

    def match(self, path: str) -> dict[str, str] | None:
        wanted, given = self.pattern.strip("/").split("/"), path.strip("/").split("/")
        if len(wanted) != len(given):
            return None
        found: dict[str, str] = {}
        for want, segment in zip(wanted, given, strict=True):
            if want.startswith("{") and want.endswith("}"):
                if not segment:
                    return None
                found[want[1:-1]] = unquote(segment)  # decoded, as aiohttp's router gave it
            elif want != segment:
                return None
        return found


class Refusal(Exception):
    """A request the server answers itself (too large, malformed, too slow): ``status`` and why.
    ``path`` is the request's, when it was read that far ("" before)."""

    def __init__(self, status: int, message: str, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.path = path


def plain_refusal(refusal: Refusal) -> Response:
    return Response(refusal.status, f"{refusal.message}\n".encode())


class HttpServer:
    """Serves ``routes`` on ``listen`` (``start``, ``stop``); see the module docstring."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        max_body_bytes: int,
        max_header_bytes: int = 64 * 1024,
        request_timeout_s: float = 60.0,
        idle_timeout_s: float = 75.0,
        refused: Callable[[Refusal], Response] = plain_refusal,
        cancel_on_disconnect: bool = True,
    ) -> None:
        """``refused``: the answer to a request the server refuses itself (to count it, say).
        ``cancel_on_disconnect``: False lets a handler finish when its client goes away (a peer
        that still acts on a request whose client timed out); ``stop`` waits for it all the same.
        """
        self.routes = list(routes)
        self.refused = refused
        self.cancel_on_disconnect = cancel_on_disconnect
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host.strip("[]") or None, port, reuse_address=True
        )

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when ``start`` was given 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float = 10.0) -> None:
        """Take no new connections, let requests under way finish (``grace_s``), close all."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        answering = [c.answering for c in self._connections if c.answering is not None]
        await finish_or_cancel(answering, grace_s)
        for connection in list(self._connections):
            connection.close()
        await server.wait_closed()

    async def respond(self, request: Request) -> Response:
        allowed = []
        for route in self.routes:
            match_info = route.match(request.path)
            if match_info is None:
                continue
            if route.method == request.method:
                return await route.handler(
                    Request(
                        request.method,
                        request.path,
                        match_info,
                        request.headers,
                        request.body,
                        request.query_string,
                    )
                )
            allowed.append(route.method)
        if allowed:
            return Response(405, b"method not allowed\n", headers={"Allow": ", ".join(allowed)})
        return Response(404, b"not found\n")


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered one after another."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # Requests read whole (or refusals), with whether the connection stays open after each.
        self._queue: deque[tuple[Request | Refusal, bool]] = deque()
        self._answering: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._reading = True  # False once what follows cannot be read as requests
        self._closed = False
        self._reset()

    @property
    def answering(self) -> asyncio.Task[None] | None:
        """The task answering the requests read so far, if there are any."""
        return self._answering

    def _reset(self) -> None:
        self._url = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.server._connections.add(self)
        self._wait(self.server.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        try:
            self._parser.feed_data(data)
        except Refusal as refusal:
            self._refuse(refusal)
        except httptools.HttpParserUpgrade:
            self._refuse(Refusal(400, "protocol upgrades are not served here"))
        except httptools.HttpParserError as exc:
            # A refusal raised in a callback comes back wrapped by the parser.
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, Refusal):
                self._refuse(cause)
            else:
                self._refuse(Refusal(400, f"malformed request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wait(None)
        answering = self._answering
        if answering is not None and not self.server.cancel_on_disconnect:
            # Still counted as a connection, so that ``stop`` waits for (or cancels) the answer.
            answering.add_done_callback(lambda _: self.server._connections.discard(self))
            return
        self.server._connections.discard(self)
        if answering is not None:
            answering.cancel()

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._in_request = True
        self._wait(self.server.request_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value))
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        length = self._headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            raise Refusal(413, f"body over {self.server.max_body_bytes} bytes")
        if self._headers.get("Expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.server.max_body_bytes:
            raise Refusal(413, f"body over {self.server.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_request = False
        keep_alive = self._parser.should_keep_alive()
        path, query = self._target()
        try:
            if not path:
                raise Refusal(400, "malformed request target")
            body = _decoded(self._headers, b"".join(self._body), self.server.max_body_bytes)
            method = self._parser.get_method().decode("ascii", "replace")
            item: Request | Refusal = Request(
                method, path, {}, CIMultiDictProxy(self._headers), body, query
            )
        except Refusal as refusal:
            refusal.path = path
            item = refusal
        self._queue.append((item, keep_alive))
        if len(self._queue) >= MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()  # resumed as the queue is answered
        self._answer_soon()

    # -- answering -------------------------------------------------------------------------------

    def _answer_soon(self) -> None:
        self._wait(None)
        if self._answering is None:
            self._answering = asyncio.get_running_loop().create_task(self._answer_queued())

    async def _answer_queued(self) -> None:
        try:
            while self._queue and not self._closed:
                item, keep_alive = self._queue.popleft()
                if len(self._queue) == MAX_QUEUED // 2 and self._reading and self.transport:
                    self.transport.resume_reading()
                if isinstance(item, Refusal):
                    response = self.server.refused(item)
                else:
                    response = await self._respond(item)
                self._write(response, keep_alive)
                if not keep_alive:
                    self.close()
        finally:
            self._answering = None
        if not self._closed and not self._in_request:
            self._wait(self.server.idle_timeout_s)

    async def _respond(self, request: Request) -> Response:
        try:
            return await self.server.respond(request)
        except Exception:
            log.error("HTTP handler failed on %s", request.method, exc_info=True)
            return Response(500, b"internal error\n")

    def _write(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None or self._closed:
            return
        lines = [
            f"HTTP/1.1 {response.status} {_reason(response.status)}",
            f"Content-Length: {len(response.body)}",
            f"Date: {_http_date()}",
        ]
        if response.content_type is not None:
            lines.append(f"Content-Type: {response.content_type}")
        lines.extend(f"{name}: {value}" for name, value in response.headers.items())
        if not keep_alive:
            lines.append("Connection: close")
        head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
        self.transport.write(head + response.body)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal`` after the requests already read, then close: what follows in the
        stream cannot be read as requests any more."""
        self._reading = False
        self._in_request = False
        refusal.path = refusal.path or self._path()
        if self.transport is not None:
            self.transport.pause_reading()
        self._queue.append((refusal, False))
        self._answer_soon()

    def _path(self) -> str:
        """The path of the request read so far ("" if there is none or it is malformed)."""
        return self._target()[0]

    def _target(self) -> tuple[str, str]:
        """The path and query string of the request read so far (("", "") if there is none or
        it is malformed)."""
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            return "", ""
        return url.path.decode("utf-8", "replace"), (url.query or b"").decode("utf-8", "replace")

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.server.max_header_bytes:
            raise Refusal(431, f"headers over {self.server.max_header_bytes} bytes")

    def _wait(self, seconds: float | None) -> None:
        """(Re)start the connection's one timer; None stops it (a request is being answered)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds is not None:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _expired(self) -> None:
        """Idle too long, or a request not whole in time (answered 408)."""
        self._timer = None
        if self._in_request:
            refusal = Refusal(408, "request not received whole in time", self._path())
            self._write(self.server.refused(refusal), keep_alive=False)
        self.close()

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()


def _decoded(headers: CIMultiDict[str], body: bytes, limit: int) -> bytes:
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate", "x-gzip"):
        raise Refusal(400, f"Content-Encoding {encoding!r} is not accepted")
    # 47: gzip or zlib, told apart by their header; a raw deflate stream is tried after.
    for wbits in (47, -15):
        decompressor = zlib.decompressobj(wbits)
        try:
            decoded = decompressor.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(decoded) > limit:
            raise Refusal(413, f"body over {limit} bytes once decoded")
        if decompressor.eof:
            return decoded
    raise Refusal(400, "body cannot be decoded")


@functools.cache
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]
