"""The sender's handler with scripted providers, a recording publisher and a local store.

No broker, no network: the state store is loaded empty (or from changelog records), the publisher
records what would go to Kafka, and the clocks are fakes, so every decision can be checked
exactly: what is written before the provider is called, what a crash leaves behind, what is
never sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from services.sender.handler import Fail, Park, Send, SenderHandler, decide
from services.sender.routing import UseRoute, WaitForCircuit
from services.sender.state import SendState
from services.sender.status import window_markers
from shared.config import Route
from shared.contract import topics
from shared.contract.campaign_controls import Effect
from shared.contract.events import (
    CanonicalStatus,
    DeadLetter,
    DispatchRecord,
    MessageContext,
    RecipientMessage,
    StateChange,
)
from shared.contract.statuses import SubStatus
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.runner import PoisonRecord
from shared.logs import JsonFormatter
from shared.providers.base import (
    CallbackRejected,
    OutboundSms,
    ParsedCallback,
    Provider,
    SendAccepted,
    SendError,
    SendResult,
)
from tests.support import TENANT, make_settings

PRIMARY, BACKUP = "otpiq-main", "otpiq-backup"
NOW = 1_800_000_000.0
NUMBER = "+447700900123"

Script = Callable[[OutboundSms], SendResult]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingPublisher(Publisher):
    """Records what would be published; ``fail`` makes the next publishes fail."""

    def __init__(self) -> None:
        self.records: list[OutRecord] = []
        self.fail = 0

    async def publish(self, records: Iterable[OutRecord]) -> None:
        batch = list(records)
        if self.fail:
            self.fail -= 1
            raise KafkaUnavailable("broker down")
        self.records.extend(batch)
        await asyncio.sleep(0.001)  # the acknowledgement takes a moment: others run meanwhile

    def on(self, topic: topics.Topic) -> list[OutRecord]:
        return [record for record in self.records if record.topic == topic]

    def dispatches(self) -> list[DispatchRecord]:
        return [r.value for r in self.on(topics.DISPATCHES) if isinstance(r.value, DispatchRecord)]

    def states(self, message_id: str) -> list[SendState]:
        return [
            SendState.from_value(r.value.value)
            for r in self.on(topics.SENDER_STATE)
            if r.key == message_id and isinstance(r.value, StateChange)
        ]


class ScriptedProvider(Provider):
    """Answers each message with ``script(sms)``; remembers every call and what Kafka held."""

    kind = "otpiq"
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]] = {}

    def __init__(self, account: str, script: Script, publisher: RecordingPublisher) -> None:
        self.account = account
        self.script = script
        self.publisher = publisher
        self.calls: list[list[OutboundSms]] = []
        self.states_at_call: list[list[SendState]] = []
        self.called = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        self.calls.append(batch)
        self.called.set()
        self.states_at_call.append(
            [s for sms in batch for s in self.publisher.states(sms.message_id)]
        )
        await self.release.wait()
        return [self.script(sms) for sms in batch]

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        raise CallbackRejected("not used")


class DeduplicatingProvider(ScriptedProvider):
    deduplicates_resends = True


class BulkProvider(ScriptedProvider):
    max_batch = 3


def accept(account: str) -> Script:
    return lambda sms: SendAccepted(
        sms.message_id, f"sms-{sms.message_id}", f"{account}:sms-{sms.message_id}"
    )


def fail_503(sms: OutboundSms) -> SendResult:
    return SendError("HTTP 503", retryable=True, status_code=503)


def in_turn(*scripts: Script) -> Script:
    remaining = list(scripts)
    return lambda sms: remaining.pop(0)(sms)


def message(
    index: int = 1,
    *,
    destination: str = NUMBER,
    text: str = "hello",
    tenant: str = TENANT,
    scheduled_at: float | None = None,
    accepted_at: float = NOW,
) -> RecipientMessage:
    return RecipientMessage(
        context=MessageContext(
            tenant=tenant,
            message_id=f"m-{index}",
            batch_id="b-1",
            mobile_number=destination.lstrip("+"),
            metadata_json="{}",
        ),
        destination=destination,
        text=text,
        sender_id="SHOP",
        scheduled_at=datetime.fromtimestamp(scheduled_at, UTC) if scheduled_at else None,
        accepted_at=datetime.fromtimestamp(accepted_at, UTC),
    )


class Harness:
    def __init__(
        self,
        scripts: dict[str, Script] | None = None,
        *,
        opt_outs: dict[str, dict[str, Any]] | None = None,
        controls: dict[str, dict[str, Any]] | None = None,
        provider_class: type[ScriptedProvider] = ScriptedProvider,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        scripts = scripts if scripts is not None else {PRIMARY: accept(PRIMARY)}
        provider_settings = {
            account: {
                "kind": "otpiq",
                "base_url": "http://127.0.0.1:9",
                "api_key": f"key-{account}",
                "callback_token": "token",
                "circuit_min_calls": 2,
                "circuit_cool_down_s": 30,
            }
            for account in scripts
        }
        settings = make_settings(
            overrides={
                "providers": provider_settings,
                "tenants": {TENANT: {"routes": [{"provider": a} for a in scripts]}},
                "sender": {
                    "max_attempts_per_route": 2,
                    "retry_base_delay_s": 1.0,
                    "retry_max_delay_s": 10.0,
                },
                **(overrides or {}),
            }
        )
        self.publisher = RecordingPublisher()
        self.wall = Clock(NOW)
        self.monotonic = Clock(500.0)
        self.providers = {
            account: provider_class(account, script, self.publisher)
            for account, script in scripts.items()
        }
        self.dispatcher = SenderHandler(
            settings,
            providers=self.providers,
            opt_outs=opt_outs if opt_outs is not None else {},
            controls=controls if controls is not None else {},
            clock=self.wall,
            monotonic=self.monotonic,
        )
        self.dispatcher.attach(self.publisher)
        self.dispatcher.store.load(0, [])

    async def fire_timers(self, now: float) -> int:
        """What a pass of the timer task does at ``now``: start the due work; then wait for it."""
        tasks = self.dispatcher.timers.fire(now)
        if tasks:
            await asyncio.wait(tasks)
        return len(tasks)

    def calls(self, account: str = PRIMARY) -> list[list[OutboundSms]]:
        return self.providers[account].calls

    def only_dispatch(self) -> DispatchRecord:
        [dispatch] = self.publisher.dispatches()
        return dispatch

    def entry(self, message_id: str = "m-1") -> SendState | None:
        value = self.dispatcher.store.get(0, message_id)
        return SendState.from_value(value) if value is not None else None

    def parked(self, reason: str) -> int:
        return self.dispatcher.store.count_prefix(0, f"parked:{reason}:")


# -- sent once ---------------------------------------------------------------------------------


async def test_the_intent_is_on_kafka_before_the_call_and_the_outcome_before_the_dispatch() -> None:
    harness = Harness()
    await harness.dispatcher.process(0, message())

    [[sms]] = harness.calls()
    assert (sms.message_id, sms.destination, sms.text, sms.sender_id) == (
        "m-1",
        NUMBER,
        "hello",
        "SHOP",
    )
    # What Kafka held when the provider was called: the intent, naming this call.
    [[intent]] = harness.providers[PRIMARY].states_at_call
    assert (intent.phase, intent.account, intent.attempt, intent.call) == (
        "sending",
        PRIMARY,
        1,
        ["m-1"],
    )
    kinds = [
        (r.topic.name, SendState.from_value(r.value.value).phase)
        if isinstance(r.value, StateChange)
        else (r.topic.name, "")
        for r in harness.publisher.records
    ]
    assert kinds == [
        (topics.SENDER_STATE.name, "sending"),
        (topics.SENDER_STATE.name, "done"),
        (topics.DISPATCHES.name, ""),
    ]
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status) == ("accepted", SubStatus.SENT)
    assert dispatch.correlation_key == f"{PRIMARY}:sms-m-1"
    assert dispatch.provider_message_id == "sms-m-1"
    assert dispatch.sender_id == "SHOP"
    assert dispatch.segments == 1
    stored = harness.entry()
    assert stored is not None and stored.phase == "done" and stored.dispatch == dispatch
    assert stored.message is None  # an outcome does not keep the message text around


async def test_a_settled_message_seen_again_is_not_sent_again_and_its_dispatch_is_republished() -> (
    None
):
    harness = Harness()
    await harness.dispatcher.process(0, message())
    await harness.dispatcher.process(0, message())  # redelivered after a crash, or a replay

    assert len(harness.calls()) == 1
    first, second = harness.publisher.dispatches()
    assert first == second


async def test_an_outcome_is_forgotten_once_its_message_could_no_longer_be_sent() -> None:
    harness = Harness()
    await harness.dispatcher.process(0, message())
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    day = 24 * 3600.0
    # The message's validity (a day after it was due) plus keep_outcome_s (a day by default).
    assert entry is not None and entry.due_at == pytest.approx(NOW + day + day)

    harness.wall.now = NOW + 2 * day
    assert await harness.fire_timers(harness.wall.now) == 1
    assert harness.entry() is None
    assert harness.publisher.records[-1].key == "m-1"
    assert harness.publisher.records[-1].value is None  # a tombstone on the changelog
    # A replay this late finds the message expired: still not sent.
    await harness.dispatcher.process(0, message())
    assert len(harness.calls()) == 1
    assert harness.publisher.dispatches()[-1].sub_status == SubStatus.EXPIRED


async def test_an_orphaned_intent_is_reported_unknown_and_never_sent_again() -> None:
    harness = Harness()
    orphan = SendState(phase="sending", message=message(), account=PRIMARY, attempt=1)
    orphan.call = ["m-1"]
    record = OutRecord(topics.SENDER_STATE, "m-1", StateChange(value=orphan.to_value()), 0)
    harness.dispatcher.store.load(0, [record.encoded])  # what a restart restores

    await harness.dispatcher.process(0, message())

    assert harness.calls() == []
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.PROVIDER_ERROR)
    assert dispatch.detail.startswith("outcome unknown after restart")
    assert dispatch.correlation_key == "message:m-1"
    assert dispatch.provider_account == PRIMARY


async def test_an_intent_whose_record_was_committed_long_ago_is_found_by_its_lease() -> None:
    """A parked message sent by the timer has no record to be redelivered: the lease finds it."""
    harness = Harness()
    orphan = SendState(phase="sending", message=message(), account=PRIMARY, attempt=1)
    lease = NOW + harness.dispatcher.lease_s
    change = StateChange(value=orphan.to_value(), due_at=lease)
    harness.dispatcher.store.load(0, [OutRecord(topics.SENDER_STATE, "m-1", change, 0).encoded])

    assert await harness.fire_timers(lease - 1) == 0
    harness.wall.now = lease
    assert await harness.fire_timers(lease) == 1

    assert harness.calls() == []
    assert harness.only_dispatch().detail.startswith("outcome unknown after restart")
    stored = harness.entry()
    assert stored is not None and stored.phase == "done"


@pytest.mark.parametrize(("call", "resent"), [(["m-1"], True), (["m-1", "m-2"], False)])
async def test_an_orphaned_call_is_resent_only_when_the_provider_would_recognise_it(
    call: list[str], resent: bool
) -> None:
    harness = Harness(provider_class=DeduplicatingProvider)
    orphan = SendState(phase="sending", message=message(), account=PRIMARY, attempt=1, call=call)
    record = OutRecord(topics.SENDER_STATE, "m-1", StateChange(value=orphan.to_value()), 0)
    harness.dispatcher.store.load(0, [record.encoded])

    await harness.dispatcher.process(0, message())

    dispatch = harness.only_dispatch()
    if resent:
        [[sms]] = harness.calls()
        assert sms.message_id == "m-1"
        assert dispatch.outcome == "accepted"
        [[intent]] = harness.providers[PRIMARY].states_at_call
        assert intent.attempt == 2  # the same route, the identical call
    else:
        assert harness.calls() == []
        assert dispatch.detail.startswith("outcome unknown after restart")


async def test_a_call_whose_outcome_is_unknown_is_not_retried() -> None:
    timeout = SendError("TimeoutError: ", retryable=True, maybe_accepted=True)
    harness = Harness({PRIMARY: lambda sms: timeout, BACKUP: accept(BACKUP)})
    await harness.dispatcher.process(0, message())

    assert len(harness.calls(PRIMARY)) == 1
    assert harness.calls(BACKUP) == []  # another route could send it a second time
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.PROVIDER_ERROR)
    assert dispatch.detail.startswith("outcome unknown: TimeoutError")


async def test_an_intent_kafka_did_not_take_means_nothing_is_sent() -> None:
    harness = Harness()
    harness.publisher.fail = 1
    with pytest.raises(KafkaUnavailable):
        await harness.dispatcher.process(0, message())
    assert harness.calls() == []
    assert harness.entry() is None  # the runner retries the record from scratch

    await harness.dispatcher.process(0, message())
    assert len(harness.calls()) == 1
    assert harness.only_dispatch().outcome == "accepted"


# -- not sent --------------------------------------------------------------------------------


async def test_an_opted_out_recipient_never_reaches_a_provider() -> None:
    opt_outs = {f"{TENANT}:{NUMBER}": {"opted_out": True}, f"{TENANT}:+447700900999": {}}
    harness = Harness(opt_outs=opt_outs)
    await harness.dispatcher.process(0, message())
    opted_back_in = {"opted_out": False}
    opt_outs[f"{TENANT}:+447700900124"] = opted_back_in
    await harness.dispatcher.process(0, message(2, destination="+447700900124"))

    [[sms]] = harness.calls()
    assert sms.message_id == "m-2"
    first, second = harness.publisher.dispatches()
    assert (first.outcome, first.sub_status) == ("failed", SubStatus.OPTED_OUT)
    assert first.correlation_key == "message:m-1"
    assert second.outcome == "accepted"
    assert harness.publisher.on(topics.DEAD_LETTERS) == []


async def test_an_expired_message_is_failed_expired_without_a_send() -> None:
    harness = Harness()
    day = 24 * 3600.0
    await harness.dispatcher.process(0, message(accepted_at=NOW - day - 1))
    assert harness.calls() == []
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.EXPIRED)


async def test_unknown_tenants_and_unserved_destinations_are_dead_lettered() -> None:
    harness = Harness(
        overrides={"tenants": {TENANT: {"routes": [{"provider": PRIMARY, "prefixes": ["964"]}]}}}
    )
    await harness.dispatcher.process(0, message(1, tenant="globex"))
    await harness.dispatcher.process(0, message(2))

    assert harness.calls() == []
    first, second = harness.publisher.dispatches()
    assert (first.sub_status, second.sub_status) == (SubStatus.NO_ROUTE, SubStatus.NO_ROUTE)
    assert "globex" in first.detail
    letters = [r.value for r in harness.publisher.on(topics.DEAD_LETTERS)]
    assert [letter.reason for letter in letters if isinstance(letter, DeadLetter)] == [
        "NoRoute: tenant 'globex' is not in the configuration (removed?)",
        "NoRoute: no route serves this destination",
    ]


async def test_a_terminal_error_is_reported_with_its_sub_status_and_not_retried() -> None:
    invalid = SendError("bad phone", retryable=False, sub_status=SubStatus.INVALID_NUMBER)
    harness = Harness({PRIMARY: lambda sms: invalid, BACKUP: accept(BACKUP)})
    await harness.dispatcher.process(0, message())

    assert len(harness.calls(PRIMARY)) == 1
    assert harness.calls(BACKUP) == []
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status, dispatch.detail) == (
        "failed",
        SubStatus.INVALID_NUMBER,
        "bad phone",
    )
    assert dispatch.provider_account == PRIMARY


# -- later: schedule, retries, failover, circuits --------------------------------------------------


async def test_a_scheduled_message_is_parked_and_sent_by_the_timer_once_due() -> None:
    harness = Harness()
    due = NOW + 3600
    await harness.dispatcher.process(0, message(scheduled_at=due))

    assert harness.calls() == []
    assert harness.publisher.dispatches() == []
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    assert entry is not None and entry.due_at == due
    assert harness.parked("scheduled") == 1

    assert await harness.fire_timers(due - 1) == 0
    assert harness.calls() == []
    harness.wall.now = due
    assert await harness.fire_timers(due) == 1
    assert len(harness.calls()) == 1
    assert harness.only_dispatch().outcome == "accepted"
    assert harness.parked("scheduled") == 0
    # The marker left Kafka in the same batch as the intent that replaced it.
    tombstones = [r for r in harness.publisher.on(topics.SENDER_STATE) if r.value is None]
    assert [r.key for r in tombstones] == ["parked:scheduled:m-1"]


def sender_gauge(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(f"smsbridge_sender_{name}", labels or {})


async def test_the_gauges_show_the_parked_messages_and_the_state_entries() -> None:
    harness = Harness()
    due = NOW + 3600
    for index in (1, 2):
        await harness.dispatcher.process(0, message(index, scheduled_at=due))

    harness.dispatcher.timers.refresh_gauges()
    assert sender_gauge("parked_messages", {"reason": "scheduled"}) == 2
    assert sender_gauge("parked_messages", {"reason": "held"}) == 0
    assert sender_gauge("state_entries") == 4  # each message's state and its parked marker

    harness.wall.now = due
    assert await harness.fire_timers(due) == 2
    harness.dispatcher.timers.refresh_gauges()
    assert sender_gauge("parked_messages", {"reason": "scheduled"}) == 0
    assert sender_gauge("state_entries") == 2  # the outcomes, remembered against a replay


async def test_a_retryable_error_parks_the_message_for_a_backed_off_retry() -> None:
    harness = Harness({PRIMARY: in_turn(fail_503, accept(PRIMARY))})
    await harness.dispatcher.process(0, message())

    assert len(harness.calls()) == 1
    assert harness.publisher.dispatches() == []
    entry = harness.dispatcher.store.get_entry(0, "m-1")
    assert entry is not None and entry.due_at is not None
    assert NOW <= entry.due_at <= NOW + 1.0  # full jitter under the first ceiling
    state = harness.entry()
    assert state is not None and (state.phase, state.park_reason, state.attempt) == (
        "parked",
        "retry",
        1,
    )
    assert state.last_error == "HTTP 503"

    harness.wall.now = entry.due_at
    await harness.fire_timers(entry.due_at)
    assert len(harness.calls()) == 2
    assert harness.only_dispatch().outcome == "accepted"


async def test_retries_used_up_on_one_route_fail_over_to_the_next() -> None:
    harness = Harness({PRIMARY: fail_503, BACKUP: accept(BACKUP)})
    await harness.dispatcher.process(0, message())
    harness.wall.now += 20
    await harness.fire_timers(harness.wall.now)

    assert len(harness.calls(PRIMARY)) == 2  # max_attempts_per_route
    assert len(harness.calls(BACKUP)) == 1
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.provider_account) == ("accepted", BACKUP)
    assert dispatch.correlation_key == f"{BACKUP}:sms-m-1"


async def test_when_every_route_fails_the_message_is_dead_lettered_and_reported() -> None:
    harness = Harness({PRIMARY: fail_503, BACKUP: fail_503})
    await harness.dispatcher.process(0, message())
    for _ in range(3):
        harness.wall.now += 20
        await harness.fire_timers(harness.wall.now)

    assert [len(harness.calls(a)) for a in (PRIMARY, BACKUP)] == [2, 2]
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.PROVIDER_ERROR)
    assert f"tried {PRIMARY}, {BACKUP}" in dispatch.detail
    [letter_record] = harness.publisher.on(topics.DEAD_LETTERS)
    letter = letter_record.value
    assert isinstance(letter, DeadLetter)
    assert letter.stage == "sender"
    assert letter.source_topic == letter.redrive_topic == topics.RECIPIENTS.name
    assert letter.key == f"{TENANT}:{NUMBER}"
    assert letter.attempts == 4
    assert letter.status_code == 503
    assert RecipientMessage.model_validate_json(letter.payload).context.message_id == "m-1"


async def test_an_open_circuit_is_routed_around_and_waited_for_when_nothing_is_left() -> None:
    harness = Harness({PRIMARY: accept(PRIMARY), BACKUP: accept(BACKUP)})
    breaker = harness.dispatcher.attempts.breakers[PRIMARY]
    breaker.record(False)
    breaker.record(False)
    assert breaker.state == "open"
    await harness.dispatcher.process(0, message(1))
    assert harness.calls(PRIMARY) == []
    assert harness.only_dispatch().provider_account == BACKUP

    harness.dispatcher.attempts.breakers[BACKUP].record(False)
    harness.dispatcher.attempts.breakers[BACKUP].record(False)
    await harness.dispatcher.process(0, message(2, destination="+447700900124"))
    assert harness.parked("circuit") == 1
    entry = harness.dispatcher.store.get_entry(0, "m-2")
    assert entry is not None and entry.due_at == pytest.approx(NOW + 30)  # the cool-down

    harness.monotonic.now += 30
    harness.wall.now += 30
    await harness.fire_timers(harness.wall.now)
    assert [d.context.message_id for d in harness.publisher.dispatches()] == ["m-1", "m-2"]
    assert harness.parked("circuit") == 0


async def test_a_bulk_provider_gets_one_call_per_text_and_sender() -> None:
    harness = Harness(provider_class=BulkProvider, overrides={"sender": {"batch_window_s": 0.05}})
    messages = [
        message(1, destination="+447700900001"),
        message(2, destination="+447700900002"),
        message(3, destination="+447700900003", text="other text"),
        message(4, destination="+447700900004"),
    ]
    await asyncio.gather(*(harness.dispatcher.process(0, m) for m in messages))

    calls = sorted([sorted(s.message_id for s in call) for call in harness.calls()])
    assert calls == [["m-1", "m-2", "m-4"], ["m-3"]]
    [intents, _] = sorted(harness.providers[PRIMARY].states_at_call, key=len, reverse=True)
    assert {tuple(state.call) for state in intents} == {("m-1", "m-2", "m-4")}
    assert len(harness.publisher.dispatches()) == 4


async def test_a_call_keeps_its_slot_until_its_outcome_is_recorded() -> None:
    """So that a crash can never catch more than max_in_flight calls between intent and outcome."""
    one_slot = {"kind": "otpiq", "base_url": "http://127.0.0.1:9", "api_key": "k"}
    harness = Harness(
        overrides={"providers": {PRIMARY: {**one_slot, "callback_token": "t", "max_in_flight": 1}}}
    )
    await asyncio.gather(
        harness.dispatcher.process(0, message(1)),
        harness.dispatcher.process(0, message(2, destination="+447700900124")),
    )
    order = [
        (record.key, SendState.from_value(record.value.value).phase)
        if isinstance(record.value, StateChange)
        else (record.value.context.message_id, "dispatch")
        for record in harness.publisher.records
        if isinstance(record.value, StateChange | DispatchRecord)
    ]
    first = order[0][0]
    second = "m-2" if first == "m-1" else "m-1"
    assert order == [
        (first, "sending"),
        (first, "done"),
        (first, "dispatch"),
        (second, "sending"),
        (second, "done"),
        (second, "dispatch"),
    ]


async def test_each_instance_takes_the_share_of_the_limit_its_partitions_stand_for() -> None:
    limited = {"kind": "otpiq", "base_url": "http://127.0.0.1:9", "api_key": "k"}
    harness = Harness(
        overrides={
            "providers": {PRIMARY: {**limited, "callback_token": "t", "rate_limit_per_s": 1200}}
        }
    )
    limiter = harness.dispatcher.attempts.limits.by_account[PRIMARY]
    assert limiter.limit == 0  # nothing owned, nothing sent
    harness.dispatcher.take_partitions(range(6))  # 6 of 12 partitions of sms.recipients
    assert limiter.limit == 0  # raised only once a window has passed...
    harness.monotonic.now += limiter.window_s
    assert limiter.limit == 600  # ...to half the account's limit
    harness.dispatcher.release_partitions([0, 1, 2])
    assert limiter.limit == 300  # lowered at once


# -- cancellation (drain, stop) ------------------------------------------------------------


async def test_a_cancelled_caller_still_gets_its_outcome_recorded_once_the_intent_is_out() -> None:
    harness = Harness()
    provider = harness.providers[PRIMARY]
    provider.release.clear()  # the provider takes its time
    task = asyncio.create_task(harness.dispatcher.process(0, message()))
    await provider.called.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    provider.release.set()
    await harness.dispatcher.settle_work(None)

    assert harness.only_dispatch().outcome == "accepted"
    stored = harness.entry()
    assert stored is not None and stored.phase == "done"


async def test_a_caller_cancelled_before_its_intent_leaves_nothing_behind() -> None:
    harness = Harness(
        overrides={
            "providers": {
                PRIMARY: {
                    "kind": "otpiq",
                    "base_url": "http://127.0.0.1:9",
                    "api_key": "k",
                    "callback_token": "t",
                    "max_in_flight": 1,
                }
            }
        }
    )
    provider = harness.providers[PRIMARY]
    provider.release.clear()
    first = asyncio.create_task(harness.dispatcher.process(0, message(1)))
    await provider.called.wait()
    second = asyncio.create_task(
        harness.dispatcher.process(0, message(2, destination="+447700900124"))
    )
    await asyncio.sleep(0.01)  # waiting for the account's only slot
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    provider.release.set()
    await first

    assert [call[0].message_id for call in provider.calls] == ["m-1"]
    assert harness.publisher.states("m-2") == []
    assert harness.entry("m-2") is None


async def test_an_undecodable_record_is_poison() -> None:
    harness = Harness()
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topics.RECIPIENTS.name, 0, 0, 0, 0, b"acme:+44", b'{"destination": 1}', None, 0, 0, []
    )
    with pytest.raises(PoisonRecord, match="RecipientMessage"):
        await harness.dispatcher.handle(record)


async def test_every_log_line_about_a_message_names_it_and_masks_its_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator follows one message through the logs by its id, never by its number."""
    caplog.set_level(logging.DEBUG, logger="services.sender")
    harness = Harness({PRIMARY: fail_503, BACKUP: fail_503})
    await harness.dispatcher.process(0, message())
    for _ in range(3):
        harness.wall.now += 20
        await harness.fire_timers(harness.wall.now)

    formatter = JsonFormatter("sender")
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith("services.sender")]
    entries = [orjson.loads(line) for line in lines]
    # Retries on both routes, giving up on each, the failure: each names the message. (The
    # circuits opening are about the accounts.)
    about = [e for e in entries if not str(e["msg"]).startswith("circuit of")]
    assert len(about) == 5, entries
    assert all(entry.get("message_id") == "m-1" for entry in about), about
    assert not any(NUMBER.lstrip("+") in line for line in lines)


# -- the decision alone ------------------------------------------------------------------------


def never_asked(*_: object) -> Any:
    raise AssertionError("asked after the decision was made")


def test_the_decision_asks_only_as_far_as_it_needs() -> None:
    settings = make_settings()
    tenant = settings.tenants[TENANT]
    state = SendState.fresh(message(scheduled_at=NOW + 60))
    decision = decide(
        state,
        tenant,
        now=NOW,
        effect=lambda: Effect.SEND,
        opted_out=never_asked,
        routes=never_asked,
        choose=never_asked,
        monotonic_now=never_asked,
    )
    assert decision.action == Park(NOW + 60, "scheduled")
    assert decide(
        state,
        None,
        now=NOW,
        effect=never_asked,
        opted_out=never_asked,
        routes=never_asked,
        choose=never_asked,
        monotonic_now=never_asked,
    ).action == Fail(
        SubStatus.NO_ROUTE,
        f"tenant {TENANT!r} is not in the configuration (removed?)",
        dead_letter=True,
    )


def test_a_held_message_whose_campaign_resumed_is_released_to_a_route_or_a_circuit() -> None:
    tenant = make_settings().tenants[TENANT]
    state = SendState.fresh(message())
    state.park_reason = "held"
    route = Route(provider=PRIMARY)

    def decision(choice: Any) -> Any:
        return decide(
            state,
            tenant,
            now=NOW,
            effect=lambda: Effect.SEND,
            opted_out=lambda: False,
            routes=lambda _: [route],
            choose=lambda _: choice,
            monotonic_now=lambda: 500.0,
        )

    sent = decision(UseRoute(route))
    assert (sent.action, sent.released) == (Send(route), True)
    waiting = decision(WaitForCircuit(530.0))
    assert (waiting.action, waiting.released) == (Park(NOW + 30, "circuit"), True)


# -- send windows --------------------------------------------------------------------------

# NOW is Friday 15 January 2027, 08:00 in London (UTC in winter), where NUMBER is.
FRIDAY_9_TO_5 = {"hours": {"fri": ["09:00-17:00"], "sat": ["09:00-17:00"]}}


def windowed(window: dict[str, Any]) -> Harness:
    return Harness(
        overrides={"tenants": {TENANT: {"routes": [{"provider": PRIMARY}], "send_window": window}}}
    )


def auto_reply() -> RecipientMessage:
    reply = message(9)
    context = reply.context.model_copy(update={"batch_id": "", "campaign_id": ""})
    return reply.model_copy(update={"context": context})


async def test_a_message_outside_its_window_is_parked_and_goes_when_it_opens() -> None:
    harness = windowed(FRIDAY_9_TO_5)
    await harness.dispatcher.process(0, message())
    assert harness.calls() == []
    assert harness.parked("window") == 1
    opening = NOW + 3600
    assert await harness.fire_timers(opening - 1) == 0
    harness.wall.now = opening
    assert harness.dispatcher.window_waits.totals() == {(TENANT, ""): 1}  # campaign status
    assert await harness.fire_timers(opening) == 1
    assert [sms.message_id for call in harness.calls() for sms in call] == ["m-1"]
    assert harness.only_dispatch().outcome == "accepted"
    assert harness.parked("window") == 0
    assert harness.dispatcher.window_waits.totals() == {}


async def test_auto_replies_are_not_held_by_the_window() -> None:
    harness = windowed(FRIDAY_9_TO_5)
    await harness.dispatcher.process(0, auto_reply())
    assert [sms.message_id for call in harness.calls() for sms in call] == ["m-9"]


async def test_a_window_closing_during_a_campaign_parks_the_rest_until_it_opens_again() -> None:
    harness = windowed({"hours": {"fri": ["07:00-08:00"], "sat": ["07:00-08:00"]}})
    harness.wall.now = NOW - 60  # 07:59: open
    await harness.dispatcher.process(0, message(1, accepted_at=NOW - 120))
    harness.wall.now = NOW + 60  # 08:01: closed until tomorrow 07:00
    await harness.dispatcher.process(0, message(2, destination="+447700900124"))
    assert [sms.message_id for call in harness.calls() for sms in call] == ["m-1"]
    tomorrow = NOW + 23 * 3600
    entry = harness.dispatcher.store.get_entry(0, "m-2")
    assert entry is not None and entry.due_at == tomorrow
    harness.wall.now = tomorrow
    assert await harness.fire_timers(tomorrow) == 1
    assert [sms.message_id for call in harness.calls() for sms in call] == ["m-1", "m-2"]


async def test_a_message_whose_validity_ends_in_a_closed_window_fails_and_says_why() -> None:
    # Saturday is a closed date: from Friday 17:00 the window next opens a week later, after
    # the day of validity.
    harness = windowed({**FRIDAY_9_TO_5, "closed_dates": ["2027-01-16"]})
    harness.wall.now = NOW + 9 * 3600
    await harness.dispatcher.process(0, message())
    assert harness.calls() == []
    dispatch = harness.only_dispatch()
    assert (dispatch.outcome, dispatch.sub_status) == ("failed", SubStatus.OUTSIDE_SEND_WINDOW)
    assert "send window" in dispatch.detail
    assert harness.publisher.on(topics.DEAD_LETTERS) == []  # a rule kept, not a failure


async def test_messages_parked_for_the_window_survive_a_restart() -> None:
    before = windowed(FRIDAY_9_TO_5)
    for index in range(3):
        await before.dispatcher.process(0, message(index, destination=f"+44770090010{index}"))
    changelog = [r.encoded for r in before.publisher.on(topics.SENDER_STATE)]

    after = windowed(FRIDAY_9_TO_5)  # a new instance, its state restored from Kafka
    after.dispatcher.store.load(0, changelog)
    assert after.parked("window") == 3
    # What the campaign status counts is counted again from the markers (as on assignment).
    after.dispatcher.window_waits.recount(0, window_markers(after.dispatcher.store, 0))
    assert after.dispatcher.window_waits.totals() == {(TENANT, ""): 3}
    opening = NOW + 3600
    after.wall.now = opening
    assert await after.fire_timers(opening) == 3
    sent = sorted(sms.message_id for call in after.calls() for sms in call)
    assert sent == ["m-0", "m-1", "m-2"]
    assert before.calls() == []


async def test_a_tenant_removed_by_a_live_reload_has_its_messages_failed_not_sent() -> None:
    """Issue 18: its messages already on Kafka are reported Failed with a clear sub-status, not
    sent with the credentials of a configuration that is gone."""
    from shared.live_config import apply

    harness = Harness()
    await harness.dispatcher.process(0, message(1))
    assert len(harness.calls()) == 1
    settings = harness.dispatcher.settings
    apply(settings, settings.model_copy(update={"tenants": {}}))
    await harness.dispatcher.process(0, message(2))
    assert len(harness.calls()) == 1  # nothing more reached the provider
    failed = harness.publisher.dispatches()[-1]
    assert (failed.outcome, failed.sub_status) == ("failed", SubStatus.NO_ROUTE)
    assert failed.detail == f"tenant {TENANT!r} is not in the configuration (removed?)"
