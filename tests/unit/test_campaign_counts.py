"""What each input record adds to which campaign (services/campaigns/counts.py), and the status
table the CLI prints of it."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from services.campaigns.client import COLUMNS, admin_url, campaign_path, progress, render
from services.campaigns.counts import (
    MAX_SCHEDULE_BUCKETS,
    REPLIES,
    UNKNOWN,
    Contribution,
    Counts,
    contributions,
    dead_letter_campaign,
    read_counts,
    summarize,
    to_event,
)
from shared.contract.campaign_controls import AUTO_REPLIES
from shared.contract.events import (
    DeadLetter,
    InboundMessage,
    IngressRequestAccepted,
    MessageContext,
    ProviderEvent,
    RecipientMessage,
    ReportOutcome,
    StatusEvent,
)
from shared.contract.topics import (
    DEAD_LETTERS,
    INGRESS_REQUESTS,
    RECIPIENTS,
    REPORT_OUTCOMES,
    STATUSES,
)

NOW = 1_800_000_000.0
AT = NOW - 5


def context(campaign_id: str = "spring", tenant: str = "acme") -> MessageContext:
    return MessageContext(
        tenant=tenant,
        message_id="m-1",
        batch_id="b-1",
        campaign_id=campaign_id,
        mobile_number="07911 123456",
        metadata_json=orjson.dumps({"campaignId": campaign_id}).decode(),
    )


def status(status: str, sub_status: str, campaign_id: str = "spring") -> bytes:
    return StatusEvent(
        event_id="e-1",
        context=context(campaign_id),
        status=status,  # type: ignore[arg-type]
        sub_status=sub_status,
    ).to_bytes()


def only(found: list[Contribution]) -> Contribution:
    assert len(found) == 1, found
    return found[0]


def test_an_ingress_request_counts_accepted_and_rejected_under_its_campaign() -> None:
    value = IngressRequestAccepted(
        tenant="acme",
        request_key="req-1",
        campaign_id="spring",
        accepted=240,
        rejected=[{"index": 3, "reason": "bad"}, {"index": 9, "reason": "bad"}],
    ).to_bytes()
    found = only(contributions(INGRESS_REQUESTS.name, value, AT, NOW))
    assert (found.tenant, found.campaign) == ("acme", "spring")
    assert (found.counts.accepted, found.counts.rejected) == (240, 2)
    assert found.counts.first_at == found.counts.last_at == AT


def test_auto_replies_are_grouped_apart_from_campaigns() -> None:
    request = IngressRequestAccepted(tenant="acme", request_key="h", accepted=1).to_bytes()
    assert only(contributions(INGRESS_REQUESTS.name, request, AT, NOW)).campaign == AUTO_REPLIES
    delivered = status("delivered", "Delivered", campaign_id="")
    assert only(contributions(STATUSES.name, delivered, AT, NOW)).campaign == AUTO_REPLIES


def test_status_events_count_sent_delivered_and_failed_by_sub_status() -> None:
    sent = only(contributions(STATUSES.name, status("sent", "Sent"), AT, NOW)).counts
    delivered = only(contributions(STATUSES.name, status("delivered", "Delivered"), AT, NOW))
    opted_out = only(contributions(STATUSES.name, status("failed", "OptedOut"), AT, NOW)).counts
    assert (sent.sent, sent.delivered, sent.failed) == (1, 0, {})
    assert delivered.counts.delivered == 1
    assert opted_out.failed == {"OptedOut": 1}
    assert opted_out.opted_out == 1 and opted_out.failed_total == 1


def test_a_recipient_counts_only_while_its_scheduled_time_is_ahead() -> None:
    def recipient(scheduled_at: datetime | None) -> bytes:
        return RecipientMessage(
            context=context(),
            destination="+447911123456",
            text="hi",
            sender_id="ACME",
            scheduled_at=scheduled_at,
        ).to_bytes()

    later = datetime.fromtimestamp(NOW + 3600.5, UTC)
    found = only(contributions(RECIPIENTS.name, recipient(later), AT, NOW))
    assert found.counts.scheduled == {int(NOW) + 3601: 1}
    assert contributions(RECIPIENTS.name, recipient(None), AT, NOW) == []
    earlier = datetime.fromtimestamp(NOW - 1, UTC)
    assert contributions(RECIPIENTS.name, recipient(earlier), AT, NOW) == []


def test_held_for_schedule_is_what_is_still_ahead_when_asked() -> None:
    counts = Counts(scheduled={int(NOW) + 60: 100, int(NOW) + 600: 50})
    assert counts.held(NOW) == 150
    assert counts.held(NOW + 60) == 50  # the first 100 are due at NOW + 60: no longer held
    assert counts.held(NOW + 600) == 0
    counts.forget_past_schedule(NOW + 60)
    assert counts.scheduled == {int(NOW) + 600: 50}


def test_schedule_buckets_are_bounded_and_merge_into_the_later_second() -> None:
    counts = Counts(scheduled={int(NOW) + i: 1 for i in range(1, MAX_SCHEDULE_BUCKETS + 3)})
    counts.forget_past_schedule(NOW)
    assert len(counts.scheduled) == MAX_SCHEDULE_BUCKETS
    assert counts.held(NOW) == MAX_SCHEDULE_BUCKETS + 2  # nobody lost
    # The three earliest seconds went into the fourth: held until then, never released early.
    assert counts.scheduled[int(NOW) + 3] == 3
    assert counts.held(NOW + 2.5) == MAX_SCHEDULE_BUCKETS + 2


def dead_letter(payload: str) -> bytes:
    return DeadLetter(
        source_topic="sms.statuses", stage="reporter", reason="refused", payload=payload
    ).to_bytes()


def test_dead_letters_are_counted_under_the_campaign_their_payload_names() -> None:
    message = status("failed", "Undeliverable").decode()
    request = IngressRequestAccepted(
        tenant="acme", request_key="r", campaign_id="autumn", accepted=1
    ).to_bytes()
    reply = InboundMessage(
        event_id="e",
        tenant="acme",
        to="ACME",
        from_number="07911123456",
        text="STOP",
        sent_at=datetime(2026, 1, 1, tzinfo=UTC),
    ).to_bytes()
    unmatched = ProviderEvent(
        event_id="p",
        kind="status",
        provider_kind="otpiq",
        provider_account="a",
        correlation_key="k",
    ).to_bytes()
    assert dead_letter_campaign(message) == ("acme", "spring")
    assert dead_letter_campaign(request.decode()) == ("acme", "autumn")
    assert dead_letter_campaign(reply.decode()) == ("acme", REPLIES)
    assert dead_letter_campaign('{"tenant": "acme"}') == ("acme", UNKNOWN)
    assert dead_letter_campaign(unmatched.decode()) == (UNKNOWN, UNKNOWN)
    assert dead_letter_campaign("not json at all") == (UNKNOWN, UNKNOWN)
    assert dead_letter_campaign("[1, 2]") == (UNKNOWN, UNKNOWN)

    found = only(contributions(DEAD_LETTERS.name, dead_letter(message), AT, NOW))
    assert (found.tenant, found.campaign, found.counts.dead_lettered) == ("acme", "spring", 1)
    # A dead letter that is itself unreadable still counts: it is a message given up on.
    garbage = only(contributions(DEAD_LETTERS.name, b"\xff not json", AT, NOW))
    assert (garbage.tenant, garbage.campaign, garbage.counts.dead_lettered) == (
        UNKNOWN,
        UNKNOWN,
        1,
    )


def test_unreadable_records_of_other_topics_count_nothing() -> None:
    for topic in (INGRESS_REQUESTS, RECIPIENTS, STATUSES, REPORT_OUTCOMES):
        assert contributions(topic.name, b"{not json", AT, NOW) == []
        assert contributions(topic.name, b'{"context": 3, "tenant": 7}', AT, NOW) == []
        assert contributions(topic.name, None, AT, NOW) == []


def test_report_outcomes_count_acknowledged_reports_per_campaign_and_replies_apart() -> None:
    delivery = ReportOutcome(
        tenant="acme", kind="delivery", counts={"spring": 2, "": 1, "zero": 0}
    ).to_bytes()
    found = {
        c.campaign: c.counts.reports_acknowledged
        for c in contributions(REPORT_OUTCOMES.name, delivery, AT, NOW)
    }
    assert found == {"spring": 2, AUTO_REPLIES: 1}
    incoming = ReportOutcome(tenant="acme", kind="incoming", counts={"": 5}).to_bytes()
    replies = only(contributions(REPORT_OUTCOMES.name, incoming, AT, NOW))
    assert (replies.campaign, replies.counts.replies_acknowledged) == (REPLIES, 5)


def test_counters_of_several_partitions_add_up_and_survive_the_round_trip() -> None:
    one = Counts(
        accepted=10,
        scheduled={int(NOW) + 60: 4},
        failed={"OptedOut": 1},
        first_at=AT,
        last_at=AT,
    )
    two = Counts(delivered=7, failed={"OptedOut": 2, "Expired": 1}, first_at=AT - 9, last_at=NOW)
    events = [
        to_event("acme", "spring", STATUSES.name, 0, 41, one),
        to_event("acme", "spring", STATUSES.name, 1, 17, two),
        to_event("acme", "other", STATUSES.name, 1, 18, Counts(sent=1, first_at=AT, last_at=AT)),
    ]
    stored = list(read_counts(orjson.loads(event.to_bytes()) for event in events))
    assert stored[0].counts == one
    assert (stored[0].source_topic, stored[0].source_partition, stored[0].offset) == (
        STATUSES.name,
        0,
        41,
    )
    total = summarize(stored)[("acme", "spring")]
    assert (total.accepted, total.delivered, total.held(NOW)) == (10, 7, 4)
    assert total.failed == {"OptedOut": 3, "Expired": 1}
    assert (total.first_at, total.last_at) == (AT - 9, NOW)
    assert set(summarize(stored)) == {("acme", "spring"), ("acme", "other")}


def test_unreadable_counts_records_are_skipped_not_fatal() -> None:
    good = orjson.loads(
        to_event("acme", "spring", STATUSES.name, 0, 3, Counts(sent=2, last_at=AT)).to_bytes()
    )
    assert [s.counts.sent for s in read_counts([good])] == [2]
    for broken in (
        {**good, "sent": "two"},
        {**good, "schema_version": 99},
        {**good, "failed": [1]},
        {k: v for k, v in good.items() if k != "tenant"},
        {**good, "last_at": "yesterday"},
    ):
        assert list(read_counts([broken])) == [], broken


def campaign_json(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "tenant": "acme",
        "campaign": "spring",
        "accepted": 280,
        "rejected": 20,
        "held_for_schedule": 0,
        "waiting_for_window": 12,
        "sent": 270,
        "delivered": 225,
        "failed": 75,
        "failed_by_sub_status": {"InvalidNumber": 20, "OptedOut": 10, "Undeliverable": 45},
        "opted_out": 10,
        "dead_lettered": 0,
        "reports_acknowledged": 570,
        "replies_acknowledged": 0,
        "share": 0.5,
        "sends_per_s": 250.0,
        "first_activity_at": "2026-11-23T15:30:00.000+00:00",
        "last_activity_at": "2026-11-23T15:32:38.500+00:00",
        "control": {"tenant": None, "campaign": None, "effect": "hold"},
    }
    return {**base, **overrides}


def test_the_status_table_shows_each_number_under_its_column() -> None:
    table = render([campaign_json(), campaign_json(campaign="autumn", accepted=0, rejected=0)])
    header, row, detail, other, *_ = table.splitlines()
    assert header.split() == [w for c in COLUMNS for w in c.split()]
    cells = [cell.strip() for cell in row.split("  ") if cell.strip()]
    assert cells == [
        "acme",
        "spring",
        "100%",
        "280",
        "20",
        "0",
        "12",
        "270",
        "225",
        "75",
        "10",
        "0",
        "570",
        "50%",
        "paused",
        "2026-11-23 15:32:38",
    ]
    assert detail.strip() == "failed: InvalidNumber 20, OptedOut 10, Undeliverable 45"
    assert other.split()[:3] == ["acme", "autumn", "-"]


def test_follow_mode_draws_progress_bars() -> None:
    half = campaign_json(delivered=100, failed=50, failed_by_sub_status={"Expired": 50})
    assert progress(half) == 0.5
    row = render([half], bars=True).splitlines()[1]
    assert "██████████░░░░░░░░░░  50%" in row
    assert render([]) == "no campaign counted yet\n"


def test_the_cli_finds_the_api_and_addresses_auto_replies_and_odd_ids() -> None:
    assert admin_url("0.0.0.0:8085") == "http://127.0.0.1:8085"
    assert admin_url("10.0.0.5:9000") == "http://10.0.0.5:9000"
    assert campaign_path("acme", None) == "/admin/campaigns/acme"
    assert campaign_path("acme", "") == "/admin/campaigns/acme/%28auto%20replies%29"
    assert campaign_path("acme", "spring/sale 2") == "/admin/campaigns/acme/spring%2Fsale%202"
