from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from services.callbacks.app import provider_events
from services.normalizer.join import Joiner, JoinPolicy, JoinResult, JoinState
from shared.contract import ids
from shared.contract.events import (
    DispatchOutcome,
    DispatchRecord,
    MessageContext,
    ProviderEvent,
    utcnow,
)
from shared.contract.topics import PROVIDER_EVENTS
from shared.providers.otpiq import FIXTURES, Otpiq

ACCOUNT = "otpiq-main"
POLICY = JoinPolicy(unmatched_after_s=600.0, dlr_timeout_s=3600.0, keep_finished_s=7200.0)
T0 = 1_800_000_000.0


def dispatch(
    sms_id: str = "sms-aaa",
    *,
    message_id: str = "m-1",
    outcome: DispatchOutcome = "accepted",
    sub_status: str = "Sent",
    at: float = T0,
) -> DispatchRecord:
    return DispatchRecord(
        context=MessageContext(
            tenant="acme",
            message_id=message_id,
            batch_id="batch-1",
            mobile_number="447700900123",
            metadata_json='{"campaign":"x"}',
        ),
        correlation_key=Otpiq.correlation_key(ACCOUNT, sms_id, ""),
        outcome=outcome,
        sub_status=sub_status,
        provider_kind="otpiq",
        provider_account=ACCOUNT,
        provider_message_id=sms_id if outcome == "accepted" else "",
        destination="+447700900123",
        detail="" if outcome == "accepted" else "invalid number",
        dispatched_at=datetime.fromtimestamp(at, UTC),
    )


def otpiq_event(fixture: str, sms_id: str = "sms-aaa", **changes: object) -> ProviderEvent:
    """A provider event exactly as the callbacks service builds it from OTPIQ's callback."""
    body = orjson.dumps({**FIXTURES[fixture], "smsId": sms_id, **changes})
    parsed = Otpiq.parse_callback(body, "application/json")
    [event] = provider_events(Otpiq, ACCOUNT, body, parsed, utcnow())
    return event


def statuses(result: JoinResult) -> list[tuple[str, str]]:
    return [(s.status, s.sub_status) for s in result.statuses]


def stored(result: JoinResult) -> JoinState | None:
    """The state as it comes back from the store (JSON round trip)."""
    return JoinState.from_value(result.state.to_value()) if result.state is not None else None


joiner = Joiner(POLICY)


def test_accepted_dispatch_then_provider_reports() -> None:
    first = joiner.on_dispatch(None, dispatch(), T0)
    assert statuses(first) == [("sent", "Sent")]
    sent = first.statuses[0]
    assert sent.event_id == ids.event_id("m-1", "sent")
    assert sent.context.message_id == "m-1"
    assert sent.provider_message_id == "sms-aaa"
    assert sent.provider_account == ACCOUNT

    second = joiner.on_status_event(stored(first), otpiq_event("callback_sent"), T0 + 1)
    assert statuses(second) == []
    assert second.dropped == ["not_forward"]

    third = joiner.on_status_event(stored(second), otpiq_event("callback_delivered"), T0 + 2)
    assert statuses(third) == [("delivered", "Delivered")]
    assert third.statuses[0].event_id == ids.event_id("m-1", "delivered")
    assert joiner.due_at(third.state) == T0 + 2 + POLICY.keep_finished_s


def test_event_before_dispatch_is_held_then_joined() -> None:
    delivered = otpiq_event("callback_delivered")
    held = joiner.on_status_event(None, delivered, T0)
    assert held.changed
    assert statuses(held) == []
    assert held.state is not None and [e.event_id for e in held.state.held] == [delivered.event_id]
    assert joiner.due_at(held.state) == T0 + POLICY.unmatched_after_s

    joined = joiner.on_dispatch(stored(held), dispatch(), T0 + 5)
    assert statuses(joined) == [("sent", "Sent"), ("delivered", "Delivered")]
    assert joined.state is not None and joined.state.held == []
    assert joined.state.status == "delivered"


def test_held_events_apply_in_arrival_order_through_the_guard() -> None:
    state = stored(joiner.on_status_event(None, otpiq_event("callback_delivered"), T0))
    state = stored(joiner.on_status_event(state, otpiq_event("callback_sent"), T0 + 1))

    joined = joiner.on_dispatch(state, dispatch(), T0 + 2)

    assert statuses(joined) == [("sent", "Sent"), ("delivered", "Delivered")]
    assert joined.dropped == ["after_final"]


def test_the_same_event_twice_is_one_status_change() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(), T0))
    delivered = otpiq_event("callback_delivered")

    first = joiner.on_status_event(state, delivered, T0 + 1)
    again = joiner.on_status_event(stored(first), delivered, T0 + 2)

    assert statuses(first) == [("delivered", "Delivered")]
    assert statuses(again) == []
    assert again.dropped == ["duplicate"]
    assert not again.changed


def test_a_repeated_event_before_the_dispatch_is_held_once() -> None:
    sent = otpiq_event("callback_sent")
    state = stored(joiner.on_status_event(None, sent, T0))
    again = joiner.on_status_event(state, sent, T0 + 1)

    assert again.dropped == ["duplicate"]
    assert again.state is not None and len(again.state.held) == 1


def test_sent_after_delivered_is_dropped() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(), T0))
    state = stored(joiner.on_status_event(state, otpiq_event("callback_delivered"), T0 + 1))

    late = joiner.on_status_event(state, otpiq_event("callback_sent"), T0 + 2)
    failed = joiner.on_status_event(stored(late), otpiq_event("callback_failed"), T0 + 3)

    assert statuses(late) == []
    assert late.dropped == ["after_final"]
    assert statuses(failed) == []
    assert failed.dropped == ["after_final"]


def test_failed_dispatch_reports_its_sub_status_and_nothing_after() -> None:
    key_state = joiner.on_dispatch(None, dispatch(outcome="failed", sub_status="InvalidNumber"), T0)
    assert statuses(key_state) == [("failed", "InvalidNumber")]
    assert key_state.statuses[0].detail == "invalid number"

    late = joiner.on_status_event(stored(key_state), otpiq_event("callback_delivered"), T0 + 1)
    assert statuses(late) == []
    assert late.dropped == ["after_final"]


def test_replayed_dispatch_changes_nothing() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(), T0))

    replay = joiner.on_dispatch(state, dispatch(), T0 + 1)

    assert statuses(replay) == []
    assert not replay.changed


def test_failed_provider_report_carries_the_reason() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(), T0))
    result = joiner.on_status_event(state, otpiq_event("callback_failed"), T0 + 1)

    assert statuses(result) == [("failed", "Undeliverable")]
    assert result.statuses[0].detail == "Carrier rejected the message"
    assert result.statuses[0].event_id == ids.event_id("m-1", "failed")


def test_unknown_provider_status_is_counted_and_ignored() -> None:
    strange = otpiq_event("callback_sent", status="teleported")
    before_dispatch = joiner.on_status_event(None, strange, T0)
    assert before_dispatch.dropped == ["unknown_status"]
    assert before_dispatch.state is None and not before_dispatch.changed

    state = stored(joiner.on_dispatch(None, dispatch(), T0))
    after_dispatch = joiner.on_status_event(state, strange, T0 + 1)
    assert after_dispatch.dropped == ["unknown_status"]
    assert statuses(after_dispatch) == []

    unknown_provider = strange.model_copy(update={"provider_kind": "carrier-pigeon"})
    assert joiner.on_status_event(state, unknown_provider, T0).dropped == ["unknown_status"]


def test_no_final_report_within_the_dlr_timeout_expires_the_message() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(at=T0), T0))
    due = joiner.due_at(state)
    assert due == T0 + POLICY.dlr_timeout_s

    expired = joiner.on_timer(state, due)

    assert statuses(expired) == [("failed", "Expired")]
    assert expired.statuses[0].occurred_at == datetime.fromtimestamp(due, UTC)
    assert expired.statuses[0].provider_message_id == "sms-aaa"
    late = joiner.on_status_event(stored(expired), otpiq_event("callback_delivered"), due + 1)
    assert late.dropped == ["after_final"]


def test_delivered_message_does_not_expire_and_is_forgotten_later() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(at=T0), T0))
    state = stored(joiner.on_status_event(state, otpiq_event("callback_delivered"), T0 + 10))
    due = joiner.due_at(state)
    assert due == T0 + 10 + POLICY.keep_finished_s

    forgotten = joiner.on_timer(state, due)

    assert statuses(forgotten) == []
    assert forgotten.changed and forgotten.state is None  # delete the key


def test_unmatched_event_is_dead_lettered_after_the_wait() -> None:
    first = otpiq_event("callback_sent")
    second = otpiq_event("callback_delivered")
    state = stored(joiner.on_status_event(None, first, T0))
    state = stored(joiner.on_status_event(state, second, T0 + 100))
    assert joiner.due_at(state) == T0 + POLICY.unmatched_after_s  # the first wait counts

    given_up = joiner.on_timer(state, T0 + POLICY.unmatched_after_s)

    assert given_up.changed and given_up.state is None
    assert statuses(given_up) == []
    assert given_up.unmatched_providers == ["otpiq", "otpiq"]
    letters = given_up.dead_letters
    assert [letter.reason for letter in letters] == [
        f"no dispatch record for {ACCOUNT}:sms-aaa"
    ] * 2
    assert {letter.redrive_topic for letter in letters} == {PROVIDER_EVENTS.name}
    assert {letter.source_topic for letter in letters} == {PROVIDER_EVENTS.name}
    assert {letter.stage for letter in letters} == {"normalizer"}
    redriven = [ProviderEvent.model_validate_json(letter.payload) for letter in letters]
    assert redriven == [first, second]  # re-drivable as they were


def test_timer_before_due_changes_nothing_observable() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(at=T0), T0))
    early = joiner.on_timer(state, T0 + 1)

    assert statuses(early) == []
    assert early.dead_letters == []
    assert early.state == state


def test_status_occurred_at_prefers_the_providers_time() -> None:
    state = stored(joiner.on_dispatch(None, dispatch(at=T0), T0))
    event = otpiq_event("callback_delivered")
    stamped = event.model_copy(update={"occurred_at": datetime(2030, 1, 1, tzinfo=UTC)})

    result = joiner.on_status_event(state, stamped, T0 + 1)
    plain = joiner.on_status_event(state, event, T0 + 1)

    assert result.statuses[0].occurred_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert abs(plain.statuses[0].occurred_at - event.received_at) < timedelta(seconds=1)


def test_seen_event_ids_stay_bounded() -> None:
    small = Joiner(JoinPolicy(unmatched_after_s=1, dlr_timeout_s=1, max_seen_event_ids=3))
    state = stored(small.on_dispatch(None, dispatch(), T0))
    for index in range(10):
        state = stored(small.on_status_event(state, otpiq_event("callback_sent", n=index), T0))

    assert state is not None and len(state.seen_event_ids) == 3
