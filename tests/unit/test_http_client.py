"""Our HTTP client against real servers on loopback: aiohttp's, and raw sockets for the answers
aiohttp never gives (a body ended by the close, a connection cut mid-answer)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from shared.http_client import HttpClient, HttpError, HttpTimeout
from tests.support import free_port
from tests.support.tls import make_ca, make_server_certificate


class Peer:
    """An aiohttp server that records every request and the client port it came from."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []
        self.delay_s = 0.0
        self.in_flight = self.most_in_flight = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body = await request.read()
            port = request.transport.get_extra_info("peername")[1] if request.transport else 0
            self.requests.append((request.path_qs, dict(request.headers), body, port))
            await asyncio.sleep(self.delay_s)
            if request.path == "/chunked":
                response = web.StreamResponse(status=202, headers={"X-Answer": "chunks"})
                response.enable_chunked_encoding()
                await response.prepare(request)
                for part in (b"one,", b"two,", b"three"):
                    await response.write(part)
                await response.write_eof()
                return response
            return web.Response(
                status=429 if request.path == "/busy" else 200,
                body=b'{"ok":true}',
                headers={"Retry-After": "7"},
                content_type="application/json",
            )
        finally:
            self.in_flight -= 1


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    peer = Peer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", peer.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    peer.url = f"http://127.0.0.1:{port}"
    yield peer
    await runner.cleanup()


async def raw_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/x"


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)


async def test_a_post_sends_body_and_headers_and_reads_the_whole_answer(peer: Peer) -> None:
    async with HttpClient() as client:
        answer = await client.post(
            f"{peer.url}/reports?tenant=acme",
            b'{"status":"Delivered"}',
            {"Content-Type": "application/json", "x-hub-signature": "sha256=abc"},
        )
        busy = await client.post(f"{peer.url}/busy", b"", {})

    assert (answer.status, answer.body) == (200, b'{"ok":true}')
    assert answer.headers["retry-after"] == "7"  # names are case-insensitive
    path, headers, body, _ = peer.requests[0]
    assert path == "/reports?tenant=acme"
    assert body == b'{"status":"Delivered"}'
    assert headers["Content-Type"] == "application/json"
    assert headers["x-hub-signature"] == "sha256=abc"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Host"] == peer.url.removeprefix("http://")
    assert busy.status == 429


async def test_one_connection_serves_one_request_after_another(peer: Peer) -> None:
    async with HttpClient() as client:
        for _ in range(5):
            assert (await client.post(peer.url, b"x", {})).status == 200
    ports = {port for *_, port in peer.requests}
    assert len(peer.requests) == 5 and len(ports) == 1


async def test_a_chunked_answer_is_read_whole(peer: Peer) -> None:
    async with HttpClient() as client:
        answer = await client.post(f"{peer.url}/chunked", b"", {})
        again = await client.post(f"{peer.url}/chunked", b"", {})
    assert (answer.status, answer.body, answer.headers["X-Answer"]) == (
        202,
        b"one,two,three",
        "chunks",
    )
    assert again.body == b"one,two,three"


async def answering_then_closing(reply: bytes) -> tuple[asyncio.Server, str]:
    """A raw server that reads one request, writes ``reply`` and hangs up."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    return await raw_server(answer)


async def test_an_answer_without_a_length_ends_with_the_connection() -> None:
    server, url = await answering_then_closing(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    )
    async with server, HttpClient() as client:
        reply = await client.post(url, b"{}", {})
        again = await client.post(url, b"{}", {})  # a new connection: that one is closed
    assert (reply.status, reply.body) == (200, b"all of it")
    assert again.body == b"all of it"


async def test_a_connection_cut_mid_answer_is_an_error_that_may_have_been_sent() -> None:
    server, url = await answering_then_closing(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    )
    async with server, HttpClient() as client:
        with pytest.raises(HttpError) as raised:
            await client.post(url, b"{}", {})
    assert raised.value.sent


async def test_a_refused_connection_was_certainly_never_sent() -> None:
    async with HttpClient() as client:
        with pytest.raises(HttpError) as raised:
            await client.post(f"http://127.0.0.1:{free_port()}/x", b"{}", {})
    assert not raised.value.sent
    assert "cannot connect to 127.0.0.1" in str(raised.value)


async def test_a_slow_answer_times_out_and_its_connection_is_not_reused(peer: Peer) -> None:
    peer.delay_s = 1.0
    async with HttpClient(timeout_s=0.2) as client:
        with pytest.raises(HttpTimeout) as raised:
            await client.post(peer.url, b"{}", {})
        assert raised.value.sent and isinstance(raised.value, TimeoutError)
        peer.delay_s = 0.0
        await asyncio.sleep(1.0)  # the server finishes the first request meanwhile
        assert (await client.post(peer.url, b"{}", {})).status == 200
    assert peer.requests[0][3] != peer.requests[1][3]  # the timed-out connection was closed


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    # Keep-alive was not promised away (HTTP/1.1, a length), but the server hangs up anyway.
    server, url = await answering_then_closing(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with server, HttpClient() as client:
        await client.post(url, b"{}", {})
        await asyncio.sleep(0.1)  # the hang-up arrives while the connection is idle
        assert (await client.post(url, b"{}", {})).body == b"ok"


async def test_at_most_limit_requests_run_at_once_and_the_wait_for_a_slot_is_not_timed(
    peer: Peer,
) -> None:
    peer.delay_s = 0.1
    async with HttpClient(limit=2, timeout_s=0.5) as client:
        answers = await asyncio.gather(*(client.post(peer.url, b"{}", {}) for _ in range(8)))
    assert all(answer.status == 200 for answer in answers)  # 0.4 s of queueing, never timed out
    assert peer.most_in_flight == 2


async def test_a_header_that_would_split_the_request_is_refused(peer: Peer) -> None:
    async with HttpClient() as client:
        with pytest.raises(ValueError, match="line break"):
            await client.post(peer.url, b"{}", {"X-Evil": "a\r\nX-Injected: 1"})
    assert peer.requests == []


async def test_https_verifies_the_server_against_the_trusted_authorities(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    certificate = make_server_certificate(tmp_path / "server", ca, "IP:127.0.0.1,DNS:localhost")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(certificate.cert, certificate.key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=served)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/report"
    trusting = ssl.create_default_context(cafile=str(ca[0]))
    async with server:
        async with HttpClient(ssl_context=trusting) as client:
            assert (await client.post(url, b"{}", {})).body == b"secure"
        async with HttpClient() as client:  # the system's authorities never signed it
            with pytest.raises(HttpError) as raised:
                await client.post(url, b"{}", {})
    assert not raised.value.sent
    assert "CERTIFICATE_VERIFY_FAILED" in str(raised.value)
