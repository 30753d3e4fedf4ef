"""Our HTTP server on loopback, spoken to by aiohttp's client and by raw sockets (for what a
well-behaved client never sends: pipelined requests, malformed ones, half a request)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from shared.http_server import (
    MAX_QUEUED,
    HttpServer,
    Refusal,
    Request,
    Response,
    Route,
    plain_refusal,
)


class App:
    """Routes that record what they were given; ``/fail`` raises, ``/slow`` waits."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.refused: list[Refusal] = []
        self.release = asyncio.Event()
        self.slow_answered = 0

    async def echo(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(200, request.body, "application/octet-stream", {"X-Name": "echo"})

    async def fail(self, request: Request) -> Response:
        raise RuntimeError("handler bug")

    async def slow(self, request: Request) -> Response:
        await self.release.wait()
        self.slow_answered += 1
        return Response(202, b"late")

    def refusal(self, refusal: Refusal) -> Response:
        self.refused.append(refusal)
        return plain_refusal(refusal)


@contextlib.asynccontextmanager
async def serving(
    *,
    max_body_bytes: int = 1024,
    max_header_bytes: int = 64 * 1024,
    request_timeout_s: float = 60.0,
    idle_timeout_s: float = 75.0,
    cancel_on_disconnect: bool = True,
) -> AsyncIterator[tuple[HttpServer, App]]:
    app = App()
    server = HttpServer(
        [
            Route("POST", "/echo/{kind}/{account}", app.echo),
            Route("PUT", "/echo/{kind}/{account}", app.echo),
            Route("POST", "/fail", app.fail),
            Route("POST", "/slow", app.slow),
        ],
        max_body_bytes=max_body_bytes,
        max_header_bytes=max_header_bytes,
        request_timeout_s=request_timeout_s,
        idle_timeout_s=idle_timeout_s,
        refused=app.refusal,
        cancel_on_disconnect=cancel_on_disconnect,
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server, app
    finally:
        app.release.set()
        await server.stop(grace_s=1.0)


async def exchange(port: int, data: bytes, *, wait_s: float = 2.0) -> bytes:
    """Send ``data`` raw and read until the server closes (or ``wait_s`` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                received += chunk
    writer.close()
    return received


def statuses(answer: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


async def test_requests_on_one_kept_alive_connection_reach_their_route() -> None:
    async with serving() as (server, app), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/echo/otpiq/main%20account"
        for body in (b'{"n": 1}', b'{"n": 2}'):
            async with http.post(
                url, data=body, headers={"Content-Type": "Application/JSON; x=1"}
            ) as r:
                assert (r.status, await r.read(), r.headers["X-Name"]) == (200, body, "echo")
        first, second = app.seen
        assert first.match_info == {"kind": "otpiq", "account": "main account"}
        assert (first.method, first.path, first.content_type) == (
            "POST",
            url[url.index("/echo") :],
            "application/json",
        )
        assert second.body == b'{"n": 2}'
        assert len(server._connections) == 1  # the same connection both times


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as (server, app):
        requests = b"".join(
            b"POST /echo/a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n" + str(n).encode()
            for n in range(3)
        )
        answer = await exchange(
            server.port, requests + b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        assert statuses(answer) == [200, 200, 200, 404]
        assert [r.body for r in app.seen] == [b"0", b"1", b"2"]
        assert answer.index(b"\r\n\r\n0") < answer.index(b"\r\n\r\n1") < answer.index(b"\r\n\r\n2")


async def test_a_client_that_pipelines_faster_than_it_is_answered_waits_for_its_answers() -> None:
    """Reading stops while ``MAX_QUEUED`` requests wait for their answers, and resumes as they
    are answered: every request is answered, in order."""
    async with serving() as (server, app):
        count = 3 * MAX_QUEUED
        requests = b"".join(
            b"POST /echo/a/b HTTP/1.1\r\nContent-Length: 2\r\n\r\n%02d" % n for n in range(count)
        )
        closing = b"POST /echo/a/b HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(requests)
        await asyncio.sleep(0.2)  # read, queued, reading paused, answered, reading resumed
        writer.write(closing)
        async with asyncio.timeout(2):
            answer = await reader.read(-1)
        writer.close()
        assert statuses(answer) == [200] * (count + 1)
        assert [r.body for r in app.seen] == [b"%02d" % n for n in range(count)] + [b""]


async def test_a_body_over_the_limit_is_refused_unread_and_counted() -> None:
    async with serving(max_body_bytes=16) as (server, app):
        declared = b"POST /echo/a/b HTTP/1.1\r\nContent-Length: 17\r\n\r\n"
        assert statuses(await exchange(server.port, declared)) == [413]
        chunked = (
            b"POST /echo/a/b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n"
        )
        assert statuses(await exchange(server.port, chunked)) == [413]
        assert [(r.status, r.path) for r in app.refused] == [(413, "/echo/a/b")] * 2
        assert app.seen == []


async def test_encoded_bodies_are_decoded_within_the_limit() -> None:
    async with serving(max_body_bytes=64) as (server, app), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/echo/a/b"
        cases = [
            ("gzip", gzip.compress(b"hello"), 200),
            ("deflate", zlib.compress(b"hello"), 200),
            ("gzip", gzip.compress(b"x" * 65), 413),  # small on the wire, too large decoded
            ("gzip", b"not gzip at all", 400),
            ("br", b"\x0b\x02\x80hello\x03", 400),
        ]
        for encoding, body, expected in cases:
            headers = {"Content-Encoding": encoding}
            async with http.post(url, data=body, headers=headers) as response:
                assert response.status == expected, encoding
        assert [r.body for r in app.seen] == [b"hello", b"hello"]


async def test_malformed_requests_get_an_answer_and_the_connection_closes() -> None:
    async with serving(max_header_bytes=256) as (server, _):
        assert statuses(
            await exchange(server.port, b"POST /echo/a/b HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        ) == [400]
        huge = b"POST /echo/a/b HTTP/1.1\r\nX-Big: " + b"a" * 300 + b"\r\n\r\n"
        assert statuses(await exchange(server.port, huge)) == [431]
        # Served as a plain request, then refused: what follows it is never read as HTTP.
        upgrade = (
            b"POST /echo/a/b HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 0\r\n\r\nPOST /echo/a/b HTTP/1.1\r\n\r\n"
        )
        answer = await exchange(server.port, upgrade)
        assert statuses(answer) == [200, 400]
        assert answer.endswith(b"protocol upgrades are not served here\n")


async def test_unknown_paths_methods_and_handler_failures() -> None:
    async with serving() as (server, _), aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.port}"
        async with http.post(f"{base}/echo/a") as missing:
            assert missing.status == 404
        async with http.post(f"{base}/echo//b") as empty_segment:
            assert empty_segment.status == 404
        async with http.get(f"{base}/echo/a/b") as wrong_method:
            assert wrong_method.status == 405
            assert set(wrong_method.headers["Allow"].split(", ")) == {"POST", "PUT"}
        async with http.post(f"{base}/fail") as failed:
            assert (failed.status, await failed.text()) == (500, "internal error\n")
        async with http.post(f"{base}/echo/a/b", data=b"still") as after:
            assert after.status == 200  # the connection lives on


async def test_half_a_request_times_out_and_idle_connections_close() -> None:
    async with serving(request_timeout_s=0.2, idle_timeout_s=0.3) as (server, app):
        partial = b"POST /echo/a/b HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"
        assert statuses(await exchange(server.port, partial)) == [408]
        assert [r.status for r in app.refused] == [408]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(2):
            assert await reader.read() == b""  # closed without a word
        writer.close()


async def test_expect_continue_is_answered_before_the_body() -> None:
    async with serving() as (server, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /echo/a/b HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(2):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ok")
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.close()


async def test_stop_lets_a_request_under_way_finish() -> None:
    async with serving() as (server, app), aiohttp.ClientSession() as http:
        port = server.port
        posted = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/slow"))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop(grace_s=5.0))
        await asyncio.sleep(0.1)
        app.release.set()
        response = await posted
        assert (response.status, await response.read()) == (202, b"late")
        await stopping
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post(f"http://127.0.0.1:{port}/echo/a/b")


async def test_the_query_string_is_parsed_on_demand() -> None:
    async with serving() as (server, app):
        request = b"POST /echo/a/b?x=1&y=&x=2&z=a+b%21&flag HTTP/1.1\r\nConnection: close\r\n\r\n"
        assert statuses(await exchange(server.port, request)) == [200]
        (seen,) = app.seen
        assert (seen.path, seen.query_string) == ("/echo/a/b", "x=1&y=&x=2&z=a+b%21&flag")
        assert seen.query.getall("x") == ["1", "2"]
        assert (seen.query["y"], seen.query["z"], seen.query["flag"]) == ("", "a b!", "")
        assert seen.match_info == {"kind": "a", "account": "b"}


def test_the_body_is_read_as_json() -> None:
    def request(body: bytes) -> Request:
        return Request("POST", "/", {}, CIMultiDictProxy(CIMultiDict()), body)

    assert request(b'{"n": [1, "two"]}').json() == {"n": [1, "two"]}
    assert request(b"").query == {}
    for bad in (b"", b"{", b"\xff"):
        with pytest.raises(ValueError):
            request(bad).json()


@pytest.mark.parametrize("cancel", [True, False])
async def test_a_handler_whose_client_leaves_is_cancelled_unless_told_otherwise(
    cancel: bool,
) -> None:
    async with serving(cancel_on_disconnect=cancel) as (server, app):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.1)
        # Not cancelled: still a connection, which ``stop`` waits for.
        assert len(server._connections) == (0 if cancel else 1)
        app.release.set()
        await asyncio.sleep(0.05)
        assert app.slow_answered == (0 if cancel else 1)
        assert len(server._connections) == 0
