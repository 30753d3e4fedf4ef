"""The simulated Optimove, over real HTTP: authentication, recording, failure modes, tally.

Requests are built with the real ``OptimoveContract``, so these tests also hold the contract and
the simulator to the same shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from shared.config import OptimoveContractSettings, Settings
from shared.contract.events import CanonicalStatus, InboundMessage, MessageContext, StatusEvent
from shared.contract.optimove import API_KEY_HEADER, OptimoveContract, SignedRequest
from shared.contract.signing import SIGNATURE_HEADER, sign, verify
from shared.kafka.broker import free_port
from simulators.campaign_load import follow_tally, judge
from simulators.optimove import FailureMode, OptimoveSimulator
from tests.support import TENANT, TENANT_API_TOKEN, TENANT_SECRET, make_settings

pytestmark = pytest.mark.integration

OTHER = "beta"
OTHER_TOKEN = "beta-api-token"
OTHER_SECRET = "beta-shared-secret"
CONTRACT = OptimoveContract(OptimoveContractSettings())


@pytest.fixture
async def simulator() -> AsyncIterator[OptimoveSimulator]:
    started = OptimoveSimulator(
        "127.0.0.1",
        free_port(),
        {TENANT: (TENANT_API_TOKEN, TENANT_SECRET), OTHER: (OTHER_TOKEN, OTHER_SECRET)},
    )
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def settings_for(simulator: OptimoveSimulator) -> Settings:
    beta = {
        "optimove_base_url": simulator.base_url(OTHER),
        "api_token": OTHER_TOKEN,
        "secret_key": OTHER_SECRET,
        "aggregator_api_key": "beta-aggregator-key",
        "routes": [{"provider": "otpiq-main"}],
    }
    return make_settings(optimove_url=simulator.url, overrides={"tenants": {OTHER: beta}})


def report(
    message_id: str,
    status: CanonicalStatus,
    sub_status: str,
    *,
    tenant: str = TENANT,
    campaign_id: str = "spring",
) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}-{status}",
        context=MessageContext(
            tenant=tenant,
            message_id=message_id,
            batch_id="batch-1",
            campaign_id=campaign_id,
            mobile_number="07911 123456",
            metadata_json=orjson.dumps({"appId": 7, "campaignId": campaign_id}).decode(),
        ),
        status=status,
        sub_status=sub_status,
    )


async def post(
    client: aiohttp.ClientSession, request: SignedRequest, timeout_s: float = 5.0
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with client.post(
        request.url,
        data=request.body,
        headers=request.headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as response:
        return response.status, await response.json(), dict(response.headers)


async def deliver(client: aiohttp.ClientSession, settings: Settings, event: StatusEvent) -> int:
    tenant = settings.tenants[event.context.tenant]
    status, _, _ = await post(client, CONTRACT.delivery_report(tenant, event))
    return status


async def test_accepts_and_records_signed_requests(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    tenant = settings.tenants[TENANT]
    reply = InboundMessage(
        event_id="e-1",
        tenant=TENANT,
        to="ACME",
        from_number="447911123456",
        text="STOP",
        sent_at=datetime.now(UTC),
    )

    delivery = CONTRACT.delivery_report(tenant, report("m-1", "delivered", "Delivered"))
    assert (await post(client, delivery))[0] == 200
    assert (await post(client, CONTRACT.incoming_messages(tenant, [reply, reply])))[0] == 200
    assert (await post(client, CONTRACT.handshake(tenant, "https://sms.example/x")))[0] == 200

    recorded = simulator.received()
    assert [r["endpoint"] for r in recorded] == ["delivery-report", "incoming-message", "handshake"]
    first = recorded[0]
    assert first["tenant"] == TENANT
    assert first["status"] == 200
    assert first["rejected"] is False
    assert first["body"].encode() == delivery.body
    assert first["headers"][API_KEY_HEADER] == TENANT_API_TOKEN
    assert verify(first["body"].encode(), first["headers"][SIGNATURE_HEADER], TENANT_SECRET) is None

    async with client.get(f"{simulator.url}/_simulator/received?endpoint=incoming-message") as got:
        over_http = await got.json()
    assert [r["endpoint"] for r in over_http] == ["incoming-message"]
    assert orjson.loads(over_http[0]["body"])["messages"][0]["message"] == "STOP"

    async with client.delete(f"{simulator.url}/_simulator/received") as deleted:
        assert deleted.status == 200
    assert simulator.received() == []
    assert simulator.tally(TENANT)[TENANT]["reports"] == 0


async def test_refuses_bad_credentials_and_bodies(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    good = CONTRACT.delivery_report(settings.tenants[TENANT], report("m-1", "sent", "Sent"))
    tampered_body = good.body.replace(b'"Sent"', b'"Delivered"', 1)
    unsigned = {k: v for k, v in good.headers.items() if k != SIGNATURE_HEADER}
    malformed = b'{"type":{"status":"Sent","subStatus":"Sent"},"metadata":{}}'  # no messageId
    cases: list[tuple[str, SignedRequest, int]] = [
        ("wrong key", _with(good, headers={API_KEY_HEADER: "nope"}), 401),
        ("other tenant's key", _with(good, headers={API_KEY_HEADER: OTHER_TOKEN}), 401),
        ("tampered body", _with(good, body=tampered_body), 401),
        ("no signature", SignedRequest(good.url, good.body, unsigned), 401),
        ("signed with another secret", _signed(good, good.body, OTHER_SECRET), 401),
        ("text/plain", _with(good, headers={"content-type": "text/plain"}), 415),
        ("malformed report", _signed(good, malformed, TENANT_SECRET), 400),
        ("not JSON", _signed(good, b"{not json", TENANT_SECRET), 400),
        ("unknown tenant", _with(good, url=good.url.replace("/acme/", "/ghost/")), 404),
    ]

    for name, request, expected in cases:
        status, answer, _ = await post(client, request)
        assert status == expected, name
        assert answer["error"], name

    recorded = simulator.received()
    assert len(recorded) == len(cases)
    assert all(r["rejected"] for r in recorded)
    assert [r["status"] for r in recorded] == [expected for _, _, expected in cases]
    assert "mismatch" in recorded[2]["reason"]
    assert "missing" in recorded[3]["reason"]
    tally = simulator.tally(TENANT)[TENANT]
    assert tally["reports"] == 0
    assert tally["rejected_requests"] == len(cases) - 1  # the last named no known tenant


async def test_failure_mode_for_a_number_of_requests(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    async with client.post(
        f"{simulator.url}/_simulator/mode",
        json={"status": 503, "count": 2, "retry_after": 7, "tenant": TENANT},
    ) as response:
        assert response.status == 200
        assert (await response.json())[TENANT]["remaining"] == 2

    tenant = settings.tenants[TENANT]
    first = await post(client, CONTRACT.delivery_report(tenant, report("m-1", "sent", "Sent")))
    assert first[0] == 503
    assert first[2]["Retry-After"] == "7"
    # Another tenant and the handshake are not affected.
    assert await deliver(client, settings, report("m-9", "sent", "Sent", tenant=OTHER)) == 200
    handshake = CONTRACT.handshake(tenant, "https://sms.example/x")
    assert (await post(client, handshake))[0] == 200
    assert await deliver(client, settings, report("m-1", "sent", "Sent")) == 503
    assert await deliver(client, settings, report("m-1", "sent", "Sent")) == 200
    assert await deliver(client, settings, report("m-2", "sent", "Sent")) == 200

    assert simulator.tally(TENANT)[TENANT]["reports"] == 2
    assert [r["status"] for r in simulator.received(tenant=TENANT)] == [503, 200, 503, 200, 200]
    assert simulator.modes() == {}


async def test_failure_mode_for_a_time_and_slow_answers(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    async with client.post(
        f"{simulator.url}/_simulator/mode", json={"status": 500, "seconds": 0.4}
    ) as response:
        assert response.status == 200
    for tenant in (TENANT, OTHER):
        assert await deliver(client, settings, report("m-1", "sent", "Sent", tenant=tenant)) == 500
    await asyncio.sleep(0.5)
    assert await deliver(client, settings, report("m-1", "sent", "Sent")) == 200

    async with client.post(
        f"{simulator.url}/_simulator/mode", json={"delay_ms": 600, "count": 1}
    ) as response:
        assert response.status == 200
    slow = CONTRACT.delivery_report(settings.tenants[TENANT], report("m-2", "sent", "Sent"))
    with pytest.raises(TimeoutError):
        await post(client, slow, timeout_s=0.2)
    fast_started = asyncio.get_running_loop().time()
    assert (await post(client, slow, timeout_s=0.5))[0] == 200
    assert asyncio.get_running_loop().time() - fast_started < 0.4

    # Until ended: one tenant only, set in-process.
    simulator.set_mode(FailureMode(status=502), tenant=OTHER)
    assert await deliver(client, settings, report("m-3", "sent", "Sent", tenant=OTHER)) == 502
    assert await deliver(client, settings, report("m-3", "sent", "Sent", tenant=OTHER)) == 502
    assert await deliver(client, settings, report("m-3", "sent", "Sent")) == 200
    async with client.delete(f"{simulator.url}/_simulator/mode") as response:
        assert await response.json() == {}
    assert await deliver(client, settings, report("m-3", "sent", "Sent", tenant=OTHER)) == 200


async def test_invalid_modes_are_refused(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    for body in ({"status": 99}, {"count": 0}, {"seconds": -1}, {"tenant": "ghost"}, {"x": 1}):
        async with client.post(f"{simulator.url}/_simulator/mode", json=body) as response:
            assert response.status in (400, 404), body
    assert simulator.modes() == {}


async def test_tally_counts_final_reports_per_message(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    events = [
        report("m-1", "sent", "Sent"),
        report("m-1", "delivered", "Delivered"),
        report("m-2", "sent", "Sent"),
        report("m-2", "failed", "Rejected"),
        report("m-3", "failed", "InvalidNumber"),
        report("m-3", "failed", "InvalidNumber"),  # a duplicate final report
        report("m-4", "sent", "Sent"),  # no final report yet
        report("m-5", "delivered", "Delivered", campaign_id="autumn"),
        report("m-6", "delivered", "Delivered", tenant=OTHER),
    ]
    for event in events:
        assert await deliver(client, settings, event) == 200
    reply = InboundMessage(
        event_id="e",
        tenant=TENANT,
        to="ACME",
        from_number="44",
        text="hi",
        sent_at=datetime.now(UTC),
    )
    incoming = CONTRACT.incoming_messages(settings.tenants[TENANT], [reply] * 3)
    assert (await post(client, incoming))[0] == 200

    async with client.get(f"{simulator.url}/_simulator/tally") as response:
        tally = await response.json()
    assert tally[TENANT] == {
        "reports": 8,
        "messages": 5,
        "final": 4,
        "delivered": 2,
        "failed": 2,
        "final_by_status": {
            "Delivered": {"Delivered": 2},
            "Failed": {"InvalidNumber": 1, "Rejected": 1},
        },
        "duplicates": 1,
        "incoming_messages": 3,
        "incoming_requests": 1,
        "handshakes": 0,
        "rejected_requests": 0,
    }
    assert tally[OTHER]["delivered"] == 1

    async with client.get(
        f"{simulator.url}/_simulator/tally", params={"tenant": TENANT, "campaign_id": "autumn"}
    ) as response:
        autumn = (await response.json())[TENANT]
    assert (autumn["reports"], autumn["final"], autumn["delivered"]) == (1, 1, 1)
    async with client.get(f"{simulator.url}/_simulator/tally?tenant=ghost") as response:
        assert response.status == 404


async def test_report_times_give_each_message_its_first_and_first_final_arrival(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    before = time.time()
    assert await deliver(client, settings, report("m-1", "sent", "Sent")) == 200
    assert await deliver(client, settings, report("m-1", "delivered", "Delivered")) == 200
    first_final_answered = time.time()
    await asyncio.sleep(0.02)
    assert await deliver(client, settings, report("m-1", "delivered", "Delivered")) == 200
    assert await deliver(client, settings, report("m-2", "sent", "Sent")) == 200
    assert await deliver(client, settings, report("m-3", "sent", "Sent", campaign_id="o")) == 200
    after = time.time()

    url = f"{simulator.url}/_simulator/report-times"
    async with client.get(url, params={"tenant": TENANT, "campaign_id": "spring"}) as response:
        times = await response.json()
    assert set(times["first_report"]) == {"m-1", "m-2"}
    assert set(times["first_final"]) == {"m-1"}  # m-2 has no final report yet
    first, final = times["first_report"]["m-1"], times["first_final"]["m-1"]
    assert before <= first <= final <= first_final_answered <= after  # not the duplicate's time
    async with client.get(url, params={"tenant": TENANT}) as response:
        assert set((await response.json())["first_report"]) == {"m-1", "m-2", "m-3"}
    async with client.get(url, params={"tenant": "ghost"}) as response:
        assert response.status == 404


async def test_campaign_simulator_follows_the_tally(
    simulator: OptimoveSimulator, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(simulator)
    progress: list[int] = []

    async def reporter() -> None:
        for index in range(6):
            await deliver(client, settings, report(f"m-{index}", "sent", "Sent", campaign_id="c1"))
            final = report(f"m-{index}", "delivered", "Delivered", campaign_id="c1")
            await deliver(client, settings, final)
            await asyncio.sleep(0.05)

    reporting = asyncio.create_task(reporter())
    tally = await follow_tally(
        client,
        simulator.url,
        TENANT,
        "c1",
        expected=6,
        timeout_s=10,
        on_progress=lambda t: progress.append(t["final"]),
        poll_interval_s=0.05,
        settle_s=0.2,
    )
    await reporting

    assert judge(tally, expected=6).ok
    assert progress[-1] == 6
    assert len(set(progress)) > 2  # it followed, rather than reading once at the end

    incomplete = await follow_tally(
        client, simulator.url, TENANT, "c1", expected=7, timeout_s=0.2, poll_interval_s=0.05
    )
    verdict = judge(incomplete, expected=7)
    assert not verdict.ok
    assert verdict.missing == 1


def _with(
    request: SignedRequest,
    *,
    url: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> SignedRequest:
    return SignedRequest(
        url=url or request.url,
        body=request.body if body is None else body,
        headers={**request.headers, **(headers or {})},
    )


def _signed(request: SignedRequest, body: bytes, secret: str) -> SignedRequest:
    return _with(request, body=body, headers={SIGNATURE_HEADER: sign(body, secret)})
