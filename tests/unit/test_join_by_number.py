"""The join for providers whose send answer names no message (OpenSMS): reports by number."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from services.callbacks.app import provider_events
from services.normalizer.join import Joiner, JoinPolicy, JoinResult, JoinState
from services.normalizer.number_match import NumberSlot, pick, to_evict
from shared.contract.events import DispatchRecord, MessageContext, ProviderEvent
from shared.providers.opensms import OpenSms

ACCOUNT = "opensms-ke"
PHONE = "+254712345678"
KEY = f"{ACCOUNT}:{PHONE}"
T0 = 1_800_000_000.0
POLICY = JoinPolicy(
    unmatched_after_s=600.0,
    dlr_timeout_s=3600.0,
    keep_finished_s=7200.0,
    number_window_s=1800.0,
    number_skew_s=60.0,
    max_messages_per_number=3,
)
joiner = Joiner(POLICY)

# providers.md §2.2, verbatim: the documented webhook example.
DOCUMENTED_FAILED = (
    b'{"event":"sms.failed","message_id":"msg_123456","phone":"+254712345678",\n'
    b' "status":"failed","error":"Invalid phone number","timestamp":"2024-01-13T12:00:00Z"}'
)


def dispatch(message_id: str, at: float, provider_id: str = "") -> DispatchRecord:
    """An accepted OpenSMS send, as the sender records it for the documented success answer
    (no provider id) or for an answer that named one."""
    return DispatchRecord(
        context=MessageContext(
            tenant="acme",
            message_id=message_id,
            batch_id="batch-1",
            mobile_number="254712345678",
            metadata_json="{}",
        ),
        correlation_key=OpenSms.correlation_key(ACCOUNT, provider_id, PHONE),
        outcome="accepted",
        sub_status="Sent",
        provider_kind="opensms",
        provider_account=ACCOUNT,
        provider_message_id=provider_id,
        destination=PHONE,
        dispatched_at=datetime.fromtimestamp(at, UTC),
    )


def report(received_at: float, raw: bytes = DOCUMENTED_FAILED, **changes: object) -> ProviderEvent:
    """The event the callbacks service stores for this OpenSMS webhook body."""
    body = orjson.dumps({**orjson.loads(raw), **changes}) if changes else raw
    parsed = OpenSms.parse_callback(body, "application/json")
    [event] = provider_events(
        OpenSms, ACCOUNT, body, parsed, datetime.fromtimestamp(received_at, UTC)
    )
    return event


def delivered(received_at: float, message_id: str = "msg_123456") -> ProviderEvent:
    return report(
        received_at, event="sms.delivered", status="delivered", error=None, message_id=message_id
    )


def pending(received_at: float, message_id: str = "msg_123456") -> ProviderEvent:
    return report(
        received_at, event="sms.pending", status="pending", error=None, message_id=message_id
    )


def stored(result: JoinResult) -> JoinState | None:
    """The state as it comes back from the store (JSON round trip)."""
    return JoinState.from_value(result.state.to_value()) if result.state is not None else None


def statuses(result: JoinResult) -> list[tuple[str, str, str]]:
    return [(s.context.message_id, s.status, s.sub_status) for s in result.statuses]


def test_reports_and_sends_share_the_number_key() -> None:
    assert report(T0).correlation_key == KEY
    assert dispatch("m-1", T0).correlation_key == KEY
    assert dispatch("m-1", T0, provider_id="msg_9").correlation_key == KEY


def test_send_without_id_is_sent_then_the_documented_report_finishes_it() -> None:
    sent = joiner.on_dispatch(None, dispatch("m-1", T0), T0)
    assert statuses(sent) == [("m-1", "sent", "Sent")]

    failed = joiner.on_status_event(stored(sent), report(T0 + 5), T0 + 5)
    assert statuses(failed) == [("m-1", "failed", "InvalidNumber")]
    assert failed.statuses[0].provider_message_id == "msg_123456"
    assert failed.statuses[0].detail == "Invalid phone number"
    assert failed.dead_letters == []


def test_a_report_learns_its_message_so_the_next_one_follows() -> None:
    state = stored(joiner.on_dispatch(None, dispatch("m-1", T0), T0))
    state = stored(joiner.on_dispatch(state, dispatch("m-2", T0 + 100), T0 + 100))
    # m-2's pending report arrives first: the latest send without an id takes it.
    first = joiner.on_status_event(state, pending(T0 + 101, "msg_2"), T0 + 101)
    assert first.dropped == ["not_forward"]  # pending is "sent": no status, but m-2 has its id
    # m-1's report names an unknown id: m-1 is the only send without one left.
    second = joiner.on_status_event(stored(first), delivered(T0 + 102, "msg_1"), T0 + 102)
    assert statuses(second) == [("m-1", "delivered", "Delivered")]
    third = joiner.on_status_event(stored(second), delivered(T0 + 103, "msg_2"), T0 + 103)
    assert statuses(third) == [("m-2", "delivered", "Delivered")]
    # A later report of msg_1 goes to m-1 again, which is final: dropped.
    fourth = joiner.on_status_event(stored(third), report(T0 + 104, message_id="msg_1"), T0 + 104)
    assert (statuses(fourth), fourth.dropped) == ([], ["after_final"])


def test_an_id_from_the_send_answer_is_matched_by_id() -> None:
    state = stored(joiner.on_dispatch(None, dispatch("m-1", T0, provider_id="msg_123456"), T0))
    # A newer send without an id does not take the report that names m-1's id.
    state = stored(joiner.on_dispatch(state, dispatch("m-2", T0 + 10), T0 + 10))
    result = joiner.on_status_event(state, report(T0 + 20), T0 + 20)
    assert statuses(result) == [("m-1", "failed", "InvalidNumber")]
    # A report with another id is not m-1's: it goes to the send without one.
    other = joiner.on_status_event(stored(result), delivered(T0 + 21, "msg_other"), T0 + 21)
    assert statuses(other) == [("m-2", "delivered", "Delivered")]


def test_a_report_before_its_send_is_held_then_matched() -> None:
    early = report(T0 + 1)
    held = joiner.on_status_event(None, early, T0 + 1)
    assert (statuses(held), held.dead_letters) == ([], [])
    assert joiner.due_at(held.state) == T0 + 1 + POLICY.unmatched_after_s

    # The sender's record of the send is a little later than the report (clock skew).
    joined = joiner.on_dispatch(stored(held), dispatch("m-1", T0 + 3), T0 + 4)
    assert statuses(joined) == [("m-1", "sent", "Sent"), ("m-1", "failed", "InvalidNumber")]
    assert joined.state is not None and joined.state.held == []
    assert joined.state.held_since is None


def test_a_report_long_after_any_send_is_dead_lettered_without_the_number() -> None:
    state = stored(joiner.on_dispatch(None, dispatch("m-1", T0), T0))
    late_at = T0 + POLICY.number_window_s + 1
    held = joiner.on_status_event(state, report(late_at), late_at)
    assert statuses(held) == []
    assert held.state is not None and len(held.state.held) == 1

    due = joiner.due_at(held.state)
    assert due == late_at + POLICY.unmatched_after_s
    given_up = joiner.on_timer(stored(held), due)
    [letter] = given_up.dead_letters
    assert given_up.unmatched_providers == ["opensms"]
    assert letter.key == KEY
    assert "in the 1800s before the report" in letter.reason
    assert "254712345678" not in letter.reason
    # The message itself is still waiting for its own report.
    assert given_up.state is not None and len(given_up.state.messages) == 1


def test_a_replayed_send_changes_nothing() -> None:
    first = joiner.on_dispatch(None, dispatch("m-1", T0), T0)
    again = joiner.on_dispatch(stored(first), dispatch("m-1", T0), T0 + 30)
    assert (again.changed, again.statuses) == (False, [])


def test_the_same_report_twice_is_one_status() -> None:
    state = stored(joiner.on_dispatch(None, dispatch("m-1", T0), T0))
    event = report(T0 + 5)
    once = joiner.on_status_event(state, event, T0 + 5)
    twice = joiner.on_status_event(stored(once), event, T0 + 6)
    assert (statuses(twice), twice.dropped) == ([], ["duplicate"])


def test_too_many_sends_to_one_number_stay_bounded_and_reported() -> None:
    state: JoinState | None = None
    for index in range(3):
        result = joiner.on_dispatch(state, dispatch(f"m-{index}", T0 + index), T0 + index)
        state = stored(result)
    assert state is not None
    # The report goes to the latest send, m-2, now finished: the first to go for a fourth send.
    state = stored(joiner.on_status_event(state, delivered(T0 + 3, "msg_1"), T0 + 3))
    assert state is not None
    assert [(s.dispatch.context.message_id, s.status) for s in state.messages] == [
        ("m-0", "sent"),
        ("m-1", "sent"),
        ("m-2", "delivered"),
    ]
    fourth = joiner.on_dispatch(state, dispatch("m-3", T0 + 4), T0 + 4)
    assert fourth.state is not None
    kept = [slot.dispatch.context.message_id for slot in fourth.state.messages]
    assert kept == ["m-0", "m-1", "m-3"]
    assert statuses(fourth) == [("m-3", "sent", "Sent")]
    # None finished: the oldest is given up and reported, never silently dropped.
    fifth = joiner.on_dispatch(stored(fourth), dispatch("m-4", T0 + 5), T0 + 5)
    assert statuses(fifth) == [("m-4", "sent", "Sent"), ("m-0", "failed", "Expired")]
    assert fifth.state is not None and len(fifth.state.messages) == 3


def test_timers_expire_silent_sends_forget_finished_ones_then_the_key() -> None:
    state = stored(joiner.on_dispatch(None, dispatch("m-1", T0), T0))
    state = stored(joiner.on_dispatch(state, dispatch("m-2", T0 + 10), T0 + 10))
    state = stored(joiner.on_status_event(state, delivered(T0 + 11, "msg_2"), T0 + 11))
    assert joiner.due_at(state) == T0 + POLICY.dlr_timeout_s

    expired = joiner.on_timer(state, T0 + POLICY.dlr_timeout_s)
    assert statuses(expired) == [("m-1", "failed", "Expired")]
    state = stored(expired)
    assert state is not None and len(state.messages) == 2
    assert joiner.due_at(state) == T0 + 11 + POLICY.keep_finished_s

    forgotten = joiner.on_timer(state, T0 + 11 + POLICY.keep_finished_s)
    assert forgotten.state is not None
    assert [s.dispatch.context.message_id for s in forgotten.state.messages] == ["m-1"]
    end = T0 + POLICY.dlr_timeout_s + POLICY.keep_finished_s
    assert joiner.due_at(forgotten.state) == end
    gone = joiner.on_timer(stored(forgotten), end)
    assert (gone.state, gone.changed, gone.statuses) == (None, True, [])


def test_timer_before_due_keeps_the_state() -> None:
    state = stored(joiner.on_dispatch(None, dispatch("m-1", T0), T0))
    early = joiner.on_timer(state, T0 + 10)
    assert early.state == state and early.statuses == []


# -- number_match -------------------------------------------------------------------------------


def slot(message_id: str, at: float, provider_id: str = "") -> NumberSlot:
    return NumberSlot(dispatch=dispatch(message_id, at), provider_message_id=provider_id)


def test_pick_prefers_the_named_id_then_the_latest_send_without_one_in_the_window() -> None:
    slots = [slot("m-1", T0), slot("m-2", T0 + 10, "msg_2"), slot("m-3", T0 + 20)]
    window = {"window_s": 100.0, "skew_s": 5.0}
    assert pick(slots, "msg_2", T0 + 500, **window) == 1  # an id matches outside any window
    assert pick(slots, "msg_x", T0 + 30, **window) == 2
    assert pick(slots, "msg_x", T0 + 16, **window) == 2  # m-3 within the skew after
    assert pick(slots, "msg_x", T0 + 14, **window) == 0  # m-3 too far after: m-1
    assert pick(slots, "msg_x", T0 + 110, **window) == 2  # m-1 left the window
    assert pick(slots, "msg_x", T0 + 121, **window) is None
    assert pick([], "msg_x", T0, **window) is None


def test_to_evict_takes_the_oldest_finished_else_the_oldest() -> None:
    slots = [slot("m-1", T0), slot("m-2", T0 + 1), slot("m-3", T0 + 2)]
    assert to_evict(slots) == 0
    slots[2] = slots[2].model_copy(update={"status": "delivered", "finished_at": T0 + 3})
    slots[1] = slots[1].model_copy(update={"status": "failed", "finished_at": T0 + 4})
    assert to_evict(slots) == 1
