"""The dry-run stand-in: deterministic ids and outcomes, the tenant's mix, and its reports read
by the normalizer the way any provider's are."""

from __future__ import annotations

from collections import Counter

import pytest

from services.normalizer.join import Joiner, JoinPolicy, provider_status_mapper
from shared.config import ProviderSettings
from shared.contract.events import DispatchRecord, MessageContext
from shared.providers import PROVIDER_KINDS
from shared.providers.base import OutboundSms
from shared.providers.dryrun import (
    DryRun,
    delivery_report,
    is_marked,
    marked,
    outcome_for,
    provider_message_id,
)

MIX = {"Delivered": 0.95, "Undeliverable": 0.05}
IDS = [f"m-{index:05d}" for index in range(20_000)]


def account_settings() -> ProviderSettings:
    return ProviderSettings(
        kind="otpiq", base_url="http://127.0.0.1:9", api_key="k", callback_token="t"
    )


def test_the_same_message_always_gets_the_same_outcome_whatever_the_order_of_the_mix() -> None:
    reordered = {"Undeliverable": 0.05, "Delivered": 0.95}
    first = [outcome_for(message_id, MIX) for message_id in IDS]
    assert first == [outcome_for(message_id, MIX) for message_id in IDS]
    assert first == [outcome_for(message_id, reordered) for message_id in IDS]


@pytest.mark.parametrize(
    "mix",
    [
        MIX,
        {"Delivered": 1, "Undeliverable": 1, "Expired": 2},
        {"Delivered": 3.0, "Rejected": 0.0, "Undeliverable": 1.0},
    ],
)
def test_a_campaign_follows_the_mix(mix: dict[str, float]) -> None:
    counts = Counter(outcome_for(message_id, mix) for message_id in IDS)
    total = sum(mix.values())
    for outcome, weight in mix.items():
        expected = len(IDS) * weight / total
        # Four standard deviations of a binomial count: fails only if the draw is biased.
        margin = 4 * (len(IDS) * (weight / total) * (1 - weight / total)) ** 0.5
        assert abs(counts[outcome] - expected) <= margin, (outcome, counts)
    assert "Rejected" not in counts  # a zero weight is never drawn


def test_a_mix_without_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        outcome_for("m-1", {"Delivered": 0.0})


async def test_every_send_is_accepted_with_an_id_derived_from_the_message() -> None:
    provider = DryRun("otpiq-main", account_settings())
    batch = [OutboundSms(f"m-{i}", f"+4477009000{i}", "hi", "ACME") for i in range(3)]
    results = [provider.accept(sms) for sms in batch]
    assert await provider.send(batch) == results

    for sms, result in zip(batch, results, strict=True):
        assert result.message_id == sms.message_id
        assert result.provider_message_id == provider_message_id(sms.message_id)
        assert result.correlation_key == f"otpiq-main:{result.provider_message_id}"
    assert len({r.provider_message_id for r in results}) == 3
    assert await provider.send(batch) == results  # a replay: the same ids, nothing else happens


def test_the_normalizer_finds_the_stand_in_like_any_provider_and_reads_the_mark() -> None:
    assert PROVIDER_KINDS["dryrun"] is DryRun
    assert provider_status_mapper("dryrun", "Delivered") == ("delivered", "DryRun:Delivered")
    assert provider_status_mapper("dryrun", "Undeliverable") == ("failed", "DryRun:Undeliverable")
    assert provider_status_mapper("dryrun", "") is None
    assert marked("Sent") == "DryRun:Sent" and is_marked("DryRun:Sent")
    assert not is_marked("Delivered")


def test_a_dry_run_dispatch_and_its_report_join_into_marked_statuses() -> None:
    message_id = "m-00042"
    provider_id = provider_message_id(message_id)
    dispatch = DispatchRecord(
        context=MessageContext(
            tenant="acme",
            message_id=message_id,
            batch_id="b",
            mobile_number="447700900001",
            metadata_json="{}",
        ),
        correlation_key=f"otpiq-main:{provider_id}",
        outcome="accepted",
        sub_status=marked("Sent"),
        provider_kind="dryrun",
        provider_account="otpiq-main",
        provider_message_id=provider_id,
        destination="+447700900001",
    )
    report = delivery_report(dispatch, MIX)
    assert report == delivery_report(dispatch, MIX)  # same event id: a republish is recognised
    assert report.correlation_key == dispatch.correlation_key

    joiner = Joiner(JoinPolicy(unmatched_after_s=600, dlr_timeout_s=3600))
    # The report may arrive first (two topics): it waits for its dispatch either way.
    early = joiner.on_status_event(None, report, now=1.0)
    joined = joiner.on_dispatch(early.state, dispatch, now=2.0)
    outcome = outcome_for(message_id, MIX)
    final = "delivered" if outcome == "Delivered" else "failed"
    assert [(s.status, s.sub_status) for s in joined.statuses] == [
        ("sent", "DryRun:Sent"),
        (final, f"DryRun:{outcome}"),
    ]
    assert joiner.on_status_event(joined.state, report, now=3.0).statuses == []
