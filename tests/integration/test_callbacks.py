from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import REGISTRY

from services.callbacks.app import build
from shared.config import Settings
from shared.contract.events import ProviderEvent
from shared.contract.topics import PROVIDER_EVENTS
from shared.kafka.broker import EmbeddedBroker
from shared.providers import PROVIDER_KINDS
from shared.providers.otpiq import FIXTURES, WEBHOOK_SECRET_HEADER
from tests.support import CALLBACK_TOKEN, OTPIQ_WEBHOOK_SECRET, make_settings, read_topic, running

pytestmark = pytest.mark.integration

ACCOUNT = "otpiq-main"
SMS_ID = FIXTURES["callback_sent"]["smsId"]
GOOD_HEADERS = {WEBHOOK_SECRET_HEADER: OTPIQ_WEBHOOK_SECRET, "Content-Type": "application/json"}


def callback_url(
    settings: Settings, *, kind: str = "otpiq", account: str = ACCOUNT, token: str = CALLBACK_TOKEN
) -> str:
    return f"http://{settings.callbacks.listen}/callbacks/{kind}/{account}/{token}"


def refused(reason: str, kind: str = "otpiq") -> float:
    label = kind if kind in PROVIDER_KINDS else "unknown"  # only known kinds become labels
    value = REGISTRY.get_sample_value(
        "smsbridge_callbacks_refused_total", {"provider": label, "reason": reason}
    )
    return value or 0.0


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with http.post(url, data=body, headers=headers) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw) if raw else None


async def test_otpiq_callbacks_are_stored_on_kafka_then_answered(kafka: EmbeddedBroker) -> None:
    settings = make_settings()
    bodies = [
        orjson.dumps(FIXTURES[name])
        for name in ("callback_sent", "callback_delivered", "callback_failed")
    ]
    async with running(build(settings)), aiohttp.ClientSession() as http:
        for body in [*bodies, bodies[1]]:  # the delivered report comes twice
            status, answer = await post(http, callback_url(settings), body, GOOD_HEADERS)
            assert (status, answer) == (200, {"status": "received"})

    records = await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, expect=4)
    keys = {key for key, _ in records}
    events = [event for _, event in records]

    assert keys == {f"{ACCOUNT}:{SMS_ID}"}
    assert [e.provider_status for e in events] == ["sent", "delivered", "failed", "delivered"]
    assert {e.kind for e in events} == {"status"}
    assert {e.provider_kind for e in events} == {"otpiq"}
    assert {e.provider_account for e in events} == {ACCOUNT}
    assert {e.correlation_key for e in events} == {f"{ACCOUNT}:{SMS_ID}"}
    assert {e.provider_message_id for e in events} == {SMS_ID}
    assert events[2].reason == "Carrier rejected the message"
    assert events[1].raw == FIXTURES["callback_delivered"]
    # A repeated callback carries the same event id, so the normalizer reports it once.
    assert events[3].event_id == events[1].event_id
    assert len({e.event_id for e in events[:3]}) == 3


async def test_refused_callbacks_never_reach_kafka(kafka: EmbeddedBroker) -> None:
    settings = make_settings(overrides={"callbacks": {"max_body_bytes": 1024}})
    good = orjson.dumps(FIXTURES["callback_delivered"])
    no_sms_id = orjson.dumps(
        {k: v for k, v in FIXTURES["callback_delivered"].items() if k != "smsId"}
    )
    cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
        (
            "bad token",
            callback_url(settings, token="wrong-token"),
            good,
            GOOD_HEADERS,
            401,
            "bad_token",
        ),
        (
            "bad secret",
            callback_url(settings),
            good,
            {**GOOD_HEADERS, WEBHOOK_SECRET_HEADER: "wrong-secret"},
            401,
            "bad_signature",
        ),
        (
            "no secret",
            callback_url(settings),
            good,
            {"Content-Type": "application/json"},
            401,
            "bad_signature",
        ),
        (
            "unknown account",
            callback_url(settings, account="nobody"),
            good,
            GOOD_HEADERS,
            401,
            "unknown_account",
        ),
        (
            "kind mismatch",
            callback_url(settings, kind="opensms"),
            good,
            GOOD_HEADERS,
            401,
            "unknown_account",
        ),
        (
            "unknown kind",
            callback_url(settings, kind="nosuch"),
            good,
            GOOD_HEADERS,
            401,
            "unknown_account",
        ),
        ("not json", callback_url(settings), b"status=delivered", GOOD_HEADERS, 400, "malformed"),
        ("truncated json", callback_url(settings), good[:-7], GOOD_HEADERS, 400, "malformed"),
        ("missing smsId", callback_url(settings), no_sms_id, GOOD_HEADERS, 400, "malformed"),
        ("json array", callback_url(settings), b"[1, 2]", GOOD_HEADERS, 400, "malformed"),
        (
            "too large",
            callback_url(settings),
            b"{" + b" " * 2048 + b"}",
            GOOD_HEADERS,
            413,
            "too_large",
        ),
    ]
    async with running(build(settings)), aiohttp.ClientSession() as http:
        for name, url, body, headers, expected_status, reason in cases:
            kind = url.split("/callbacks/")[1].split("/")[0]
            before = refused(reason, kind)
            status, answer = await post(http, url, body, headers)
            assert status == expected_status, name
            assert isinstance(answer, dict) and answer["error"], name
            assert refused(reason, kind) == before + 1, name
        _, missing = await post(http, callback_url(settings), no_sms_id, GOOD_HEADERS)
        assert missing == {"error": "smsId is missing"}
        # One answer whether the token, the account or the kind is wrong: no account list.
        answers = [
            await post(http, url, good, GOOD_HEADERS)
            for url in (
                callback_url(settings, token="wrong-token"),
                callback_url(settings, account="nobody"),
                callback_url(settings, account="nobody", token="wrong-token"),
                callback_url(settings, kind="opensms"),
                callback_url(settings, kind="nosuch", account="nobody"),
            )
        ]
        assert answers == [(401, {"error": "not authorised"})] * len(answers)

        # The ops endpoints answer on ops_listen (never on the public listener).
        base = f"http://{settings.callbacks.ops_listen}"
        async with http.get(f"{base}/healthz") as health, http.get(f"{base}/readyz") as ready:
            assert (health.status, ready.status) == (200, 200)
        async with http.get(f"{base}/metrics") as scraped:
            assert "smsbridge_callbacks_refused_total" in await scraped.text()

    assert await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, settle_s=1.0) == []


async def test_an_unknown_account_is_refused_as_fast_as_a_wrong_token(
    kafka: EmbeddedBroker,
) -> None:
    """Probing account names learns nothing from the clock either (issue 14, point 10)."""
    settings = make_settings()
    body = orjson.dumps(FIXTURES["callback_delivered"])
    urls = [callback_url(settings, token="wrong-token"), callback_url(settings, account="nobody")]
    async with running(build(settings)), aiohttp.ClientSession() as http:

        async def timed(url: str) -> float:
            started = time.perf_counter()
            status, answer = await post(http, url, body, GOOD_HEADERS)
            elapsed = time.perf_counter() - started
            assert (status, answer) == (401, {"error": "not authorised"})
            return elapsed

        for url in urls * 20:  # connections and code paths warm
            await timed(url)
        # Pairs in alternating order, so that a slow moment of the machine hits both sides.
        differences = []
        for turn in range(300):
            first, second = urls if turn % 2 else urls[::-1]
            times = {first: await timed(first), second: await timed(second)}
            differences.append(times[urls[1]] - times[urls[0]])

    # Measured: a few microseconds apart, each request about a millisecond.
    assert abs(statistics.median(differences)) < 0.00025, statistics.median(differences)


async def post_until_taken(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> int:
    """POST as a provider does: again after a 503, for up to 30 s."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, _ = await post(http, url, body, headers)
        if status != 503 or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.5)


@pytest.mark.own_broker
async def test_kafka_down_answers_503_so_the_provider_retries(kafka: EmbeddedBroker) -> None:
    settings = make_settings(
        overrides={"kafka": {"produce_timeout_s": 1.0, "request_timeout_ms": 1500}}
    )
    body = orjson.dumps(FIXTURES["callback_delivered"])
    async with running(build(settings)), aiohttp.ClientSession() as http:
        # A broker that just created the topics may still be electing their leaders.
        status = await post_until_taken(http, callback_url(settings), body, GOOD_HEADERS)
        assert status == 200
        await asyncio.to_thread(kafka.stop)
        before = refused("kafka_unavailable")
        async with http.post(callback_url(settings), data=body, headers=GOOD_HEADERS) as response:
            assert response.status == 503
            assert response.headers["Retry-After"].isdigit()
        assert refused("kafka_unavailable") == before + 1


async def test_a_rotated_callback_token_and_webhook_secret_work_old_and_new_during_the_overlap(
    kafka: EmbeddedBroker,
) -> None:
    """Issue 18: the URL given to the provider is updated at its end some time after ours; in
    between, the old token and the old webhook secret still come in and are still stored."""
    settings = make_settings(
        overrides={
            "providers": {
                ACCOUNT: {
                    "callback_token": {"current": "cb-new", "previous": [CALLBACK_TOKEN]},
                    "webhook_secret": {"current": "wh-new", "previous": [OTPIQ_WEBHOOK_SECRET]},
                }
            }
        }
    )
    body = orjson.dumps(FIXTURES["callback_sent"])
    new_headers = {**GOOD_HEADERS, WEBHOOK_SECRET_HEADER: "wh-new"}
    async with running(build(settings)), aiohttp.ClientSession() as http:
        old = await post(http, callback_url(settings), body, GOOD_HEADERS)
        new = await post(http, callback_url(settings, token="cb-new"), body, new_headers)
        wrong = await post(http, callback_url(settings, token="cb-other"), body, new_headers)
    assert (old[0], new[0], wrong[0]) == (200, 200, 401)
    assert len(await read_topic(settings, PROVIDER_EVENTS, ProviderEvent, expect=2)) == 2
    used = REGISTRY.get_sample_value(
        "smsbridge_secret_matches_total",
        {"secret": f"providers.{ACCOUNT}.callback_token", "value": "previous"},
    )
    assert used is not None and used >= 1
