"""The opt-out list before a send: campaigns to opted-out customers never go out; Optimove's auto
reply (optimove-sms-api.md §3.4) does when the customer wrote to us within the reply window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from services.sender.optouts import OptOutVerdict, is_auto_reply, opt_out_verdict, wrote_at
from shared.config import SenderSettings
from shared.contract.events import LastInbound, MessageContext, OptOutChange, RecipientMessage
from tests.support.optimove_bodies import AUTO_REPLY_METADATA

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
WINDOW_S = 3600.0
NUMBER = "+33600000000"

CAMPAIGN_METADATA = {**AUTO_REPLY_METADATA, "brandId": "string", "campaignId": "string"}


def message(
    metadata: dict[str, Any] | str = AUTO_REPLY_METADATA,
    *,
    batch_id: str = "",
    campaign_id: str | None = None,
    accepted_at: datetime = T0,
) -> RecipientMessage:
    text = metadata if isinstance(metadata, str) else orjson.dumps(metadata).decode()
    if campaign_id is None:
        campaign_id = metadata.get("campaignId", "") if isinstance(metadata, dict) else ""
    return RecipientMessage(
        context=MessageContext(
            tenant="acme",
            message_id="m-1",
            batch_id=batch_id,
            campaign_id=campaign_id,
            mobile_number="33600000000",
            metadata_json=text,
        ),
        destination=NUMBER,
        text="You are unsubscribed.",
        sender_id="",
        accepted_at=accepted_at,
    )


def opted_out(value: bool = True) -> dict[str, Any]:
    change = OptOutChange(tenant="acme", number=NUMBER, opted_out=value, source="provider", at=T0)
    return change.model_dump(mode="json")


def wrote(at: datetime) -> dict[str, Any]:
    return LastInbound(tenant="acme", number=NUMBER, at=at).model_dump(mode="json")


def test_an_auto_reply_is_batch_brand_and_campaign_all_empty() -> None:
    assert is_auto_reply(message().context)
    campaign = message(CAMPAIGN_METADATA, batch_id="string")
    assert not is_auto_reply(campaign.context)
    assert not is_auto_reply(message(batch_id="b-1").context)
    assert not is_auto_reply(message({**AUTO_REPLY_METADATA, "brandId": "brand"}).context)
    assert not is_auto_reply(message({**AUTO_REPLY_METADATA, "campaignId": "c-1"}).context)
    # Left out is not documented as empty: taken as a campaign, so stays suppressed.
    without_brand = {k: v for k, v in AUTO_REPLY_METADATA.items() if k != "brandId"}
    assert not is_auto_reply(message(without_brand).context)
    null_campaign = {**AUTO_REPLY_METADATA, "campaignId": None}
    assert not is_auto_reply(message(null_campaign, campaign_id="").context)
    assert not is_auto_reply(message("not json").context)
    assert not is_auto_reply(message("[]").context)


def test_not_opted_out_is_sent_whatever_the_message() -> None:
    never = lambda: pytest.fail("the last-inbound record is not needed")  # noqa: E731
    for entry in (None, opted_out(False)):
        assert opt_out_verdict(message(), entry, never, WINDOW_S) is OptOutVerdict.SEND
        campaign = message(CAMPAIGN_METADATA, batch_id="b")
        assert opt_out_verdict(campaign, entry, never, WINDOW_S) is OptOutVerdict.SEND


def test_a_campaign_to_an_opted_out_customer_is_suppressed_even_right_after_a_reply() -> None:
    campaign = message(CAMPAIGN_METADATA, batch_id="b-1", accepted_at=T0)
    verdict = opt_out_verdict(campaign, opted_out(), lambda: wrote(T0), WINDOW_S)
    assert verdict is OptOutVerdict.SUPPRESS


@pytest.mark.parametrize(
    ("last_wrote", "verdict"),
    [
        (T0 - timedelta(minutes=3), OptOutVerdict.SEND_AUTO_REPLY),  # the STOP's confirmation
        (T0 - timedelta(seconds=WINDOW_S), OptOutVerdict.SEND_AUTO_REPLY),  # the window's edge
        (T0 + timedelta(seconds=2), OptOutVerdict.SEND_AUTO_REPLY),  # hosts' clocks differ
        (T0 - timedelta(seconds=WINDOW_S + 1), OptOutVerdict.SUPPRESS),
        (T0 - timedelta(days=30), OptOutVerdict.SUPPRESS),  # opted out long ago
        (None, OptOutVerdict.SUPPRESS),  # never wrote to this tenant
    ],
)
def test_an_auto_reply_to_an_opted_out_customer_goes_out_only_within_the_window(
    last_wrote: datetime | None, verdict: OptOutVerdict
) -> None:
    record = wrote(last_wrote) if last_wrote is not None else None
    assert opt_out_verdict(message(), opted_out(), lambda: record, WINDOW_S) is verdict


def test_the_window_is_counted_from_when_ingress_accepted_the_auto_reply() -> None:
    # Retried or replayed a day later, the decision is the same.
    late = message(accepted_at=T0)
    record = wrote(T0 - timedelta(minutes=3))
    assert opt_out_verdict(late, opted_out(), lambda: record, WINDOW_S) is (
        OptOutVerdict.SEND_AUTO_REPLY
    )
    naive = message(accepted_at=T0.replace(tzinfo=None) + timedelta(hours=2))
    assert opt_out_verdict(naive, opted_out(), lambda: record, WINDOW_S) is OptOutVerdict.SUPPRESS


def test_an_unreadable_last_inbound_record_suppresses() -> None:
    assert wrote_at({"tenant": "acme"}) is None
    verdict = opt_out_verdict(message(), opted_out(), lambda: {"at": "soon"}, WINDOW_S)
    assert verdict is OptOutVerdict.SUPPRESS


def test_the_reply_window_defaults_to_two_days() -> None:
    # Longer than the reporter's 24 h of retries to Optimove, after which Optimove answers.
    assert SenderSettings().reply_window_s == 48 * 3600.0
    with pytest.raises(ValueError, match="greater than 0"):
        SenderSettings(reply_window_s=0)
