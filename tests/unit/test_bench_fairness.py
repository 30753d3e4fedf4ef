"""The fairness benchmark's own logic (bench/fairness.py): what it posts is what it claims to
post, and its checks fail a run that misses the targets of issue 17."""

from __future__ import annotations

from bench import fairness
from bench.closed_window import ClosedWindow, closed_window
from bench.fairness import Answer, Sends, Sizes, auto_reply, campaign_requests, group_of
from bench.stack import base_config, deep_merge
from services.ingress.batch import build_records, parse_campaign
from services.ingress.e164 import reader
from services.sender.optouts import is_auto_reply
from shared.config import Settings
from shared.contract.events import RecipientMessage, utcnow
from tests.support import make_settings

BEGAN = 1_000_000.0


def settings() -> Settings:
    config = base_config(
        bootstrap_servers="127.0.0.1:1",
        optimove_url="http://127.0.0.1:2",
        provider_url="http://127.0.0.1:3",
    )
    return Settings(**deep_merge(config, fairness.overrides()))


def messages(tenant: str, body: bytes) -> list[RecipientMessage]:
    """What ingress puts on sms.recipients for ``body``."""
    tenant_settings = settings().tenants[tenant]
    records = build_records(
        tenant=tenant,
        settings=tenant_settings,
        campaign=parse_campaign(body),
        read=reader(tenant_settings.default_region, tenant_settings.bare_digits),
        accepted_at=utcnow(),
        request_key="c:bench",
    )
    return [RecipientMessage.model_validate_json(value) for _, value in records.recipients]


def test_both_tenants_route_to_the_one_limited_account() -> None:
    configured = settings()
    routes = {name: [r.provider for r in t.routes] for name, t in configured.tenants.items()}
    assert routes == {fairness.TENANT_A: ["otpiq-bench"], fairness.TENANT_B: ["otpiq-bench"]}
    assert configured.providers["otpiq-bench"].rate_limit_per_s == fairness.RATE_LIMIT


def test_an_auto_reply_is_one_to_the_sender_and_its_number_names_it() -> None:
    [reply] = messages(fairness.TENANT_B, auto_reply(fairness.B, 7).body)
    assert is_auto_reply(reply.context)
    assert group_of(reply.destination) == ("replies", 7)


def test_campaign_numbers_name_their_campaign_and_are_no_auto_replies() -> None:
    [request] = campaign_requests(fairness.B, "fair-b", "B", 3)
    sent = messages(fairness.TENANT_B, request.body)
    assert [group_of(m.destination) for m in sent] == [("B", 0), ("B", 1), ("B", 2)]
    assert not any(is_auto_reply(m.context) for m in sent)


def run(b_first_send_s: float, *, repeat_one: bool = False) -> list[str]:
    """The checks of a synthetic run: A 1,000 recipients at 500/s from 0.5 s, B 500 posted at
    10 s sending at 250/s from ``b_first_send_s``, two auto replies sent 0.3 s after their 202."""
    sizes = Sizes(big=1_000, small=500, replies=2)
    a = [Answer(r, BEGAN, BEGAN + 0.4) for r in campaign_requests(fairness.A, "a", "A", 1_000)]
    b = [Answer(r, BEGAN + 10, BEGAN + 10.1) for r in campaign_requests(fairness.B, "b", "B", 500)]
    replies = [Answer(auto_reply(fairness.A, i), BEGAN + i, BEGAN + i + 0.05) for i in range(2)]
    sends = Sends()
    for i in range(1_000):
        sends.add(f"447400{i:06d}", BEGAN + 0.5 + i / 500)
    for i in range(500):
        sends.add(f"447500{i:06d}", BEGAN + 10 + b_first_send_s + i / 250)
    for i in range(2):
        sends.add(f"447800{i:06d}", BEGAN + i + 0.35)
    if repeat_one:
        sends.add("447500000001", BEGAN + 30)
    for times in sends.times.values():
        times.sort()
    outcome = fairness.outcome(sizes, BEGAN, (a, b, replies), sends, 1_502, 1_502)
    return fairness.report(outcome, 30.0).failures


def test_a_fair_run_passes() -> None:
    assert run(b_first_send_s=0.5) == []


def test_a_small_campaign_waiting_behind_the_big_one_fails() -> None:
    failures = run(b_first_send_s=5.0)
    assert any(f.startswith("B started") for f in failures)
    assert any(f.startswith("B completed") for f in failures)


def test_a_message_sent_twice_fails() -> None:
    assert any("1 duplicates" in f for f in run(b_first_send_s=0.5, repeat_one=True))


async def test_the_closed_window_scenario_sends_nothing_inside_it_and_everything_after() -> None:
    window = await closed_window(make_settings(), messages=40, short_lived=5)
    assert window.parked == 40
    assert window.sent_while_closed == 0
    assert window.sent_after == 40
    assert window.expired == 5
    assert window.ok
    assert not ClosedWindow(40, 1, 39, 5, 40, 5).ok  # one send inside the window fails it
