"""The reporter's handler, driven record by record with a hand-moved clock.

Optimove is the simulator on a loopback port (real HTTP); Kafka is replaced by a publisher that
records what it is given, and the store's partitions are loaded empty, so that every step of
parking, queueing behind, probing, rescheduling and giving up can be watched exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from services.reporter.handler import ReporterHandler
from shared.config import Settings
from shared.contract.events import (
    CanonicalStatus,
    DeadLetter,
    Event,
    InboundMessage,
    MessageContext,
    ReportOutcome,
    StateChange,
    StatusEvent,
    decode,
)
from shared.contract.topics import DEAD_LETTERS, INBOUND, REPORT_OUTCOMES, REPORTER_STATE, STATUSES
from shared.kafka.broker import free_port
from shared.kafka.clients import OutRecord, Publisher
from shared.kafka.runner import Record
from simulators.optimove import FailureMode, OptimoveSimulator
from tests.support import TENANT, TENANT_API_TOKEN, TENANT_SECRET, make_settings, wait_for

OTHER = "beta"
OTHER_TOKEN = "beta-api-token"
OTHER_SECRET = "beta-shared-secret"
PARTITION = 3
START = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class RecordingPublisher(Publisher):
    """Takes every record at once, as Kafka would acknowledge it."""

    def __init__(self) -> None:
        self.published: list[OutRecord] = []

    async def publish(self, records: Iterable[OutRecord]) -> None:
        self.published.extend(records)

    def changelog(self) -> list[tuple[bytes, bytes | None]]:
        return [r.encoded for r in self.published if r.topic == REPORTER_STATE]

    def dead_letters(self) -> list[DeadLetter]:
        return [decode(DeadLetter, r.encoded[1]) for r in self.published if r.topic == DEAD_LETTERS]


def settings_for(port: int, tenants: Sequence[str] = (TENANT, OTHER)) -> Settings:
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        optimove_url=url,
        overrides={
            "tenants": {
                OTHER: {
                    "optimove_base_url": f"{url}/{OTHER}",
                    "api_token": OTHER_TOKEN,
                    "secret_key": OTHER_SECRET,
                    "aggregator_api_key": "beta-aggregator-key",
                    "routes": [{"provider": "otpiq-main"}],
                }
            },
            "reporter": {
                # No in-memory retries and no timer of its own: every step is the test's.
                "inline_retry_s": 0,
                "parked_poll_interval_s": 3600,
                "circuit_failure_threshold": 1,
                "give_up_after_s": 600,
                "max_backoff_s": 60,
                "inbound_batch_delay_s": 0.05,
            },
        },
    )
    settings.tenants = {slug: settings.tenants[slug] for slug in tenants}
    return settings


@pytest.fixture
async def simulator() -> AsyncIterator[OptimoveSimulator]:
    started = OptimoveSimulator(
        "127.0.0.1",
        free_port(),
        {TENANT: (TENANT_API_TOKEN, TENANT_SECRET), OTHER: (OTHER_TOKEN, OTHER_SECRET)},
    )
    await started.start()
    yield started
    await started.stop()


class Harness:
    def __init__(self, settings: Settings) -> None:
        self.clock = Clock()
        self.handler = ReporterHandler(settings, clock=self.clock, jitter=lambda: 1.0)
        self.publisher = RecordingPublisher()
        self.offsets = 0

    async def __aenter__(self) -> Harness:
        self.handler.store.load(PARTITION, [])
        await self.handler.start(self.publisher)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.handler.stop()

    def record(self, topic: str, key: str, event: Event, offset: int | None = None) -> Record:
        if offset is None:
            self.offsets += 1
            offset = self.offsets
        value = event.to_bytes()
        return ConsumerRecord(
            topic=topic,
            partition=PARTITION,
            offset=offset,
            timestamp=0,
            timestamp_type=0,
            key=key.encode(),
            value=value,
            checksum=None,
            serialized_key_size=len(key),
            serialized_value_size=len(value),
            headers=[],
        )

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        return await self.handler.handle(record)

    async def pass_at(self, seconds_later: float) -> int:
        """Move the clock, run one timer pass and wait for the retries it started."""
        self.clock.now += seconds_later
        touched = await self.handler.fire_due(self.clock.now)
        await wait_for(lambda: self.handler.retrying == 0, what="retries of the pass")
        return touched

    def parked(self, key: str) -> StateChange | None:
        entry = self.handler.store.get_entry(PARTITION, key)
        return StateChange(value=entry.value, due_at=entry.due_at) if entry else None

    def parked_entries(self) -> int:
        """Entries of parked reports (the store also remembers what Optimove acknowledged)."""
        store = self.handler.store
        return store.count_prefix(PARTITION, "delivery/") + store.count_prefix(
            PARTITION, "incoming/"
        )

    def acknowledgements(self) -> int:
        return self.handler.store.count_prefix(PARTITION, "acknowledged/")

    def queue(self, key: str) -> list[str]:
        entry = self.handler.store.get(PARTITION, key)
        return [report["source"] for report in entry["reports"]] if entry else []


def status(message_id: str, canonical: CanonicalStatus, tenant: str = TENANT) -> StatusEvent:
    return StatusEvent(
        event_id=f"e-{message_id}-{canonical}",
        context=MessageContext(
            tenant=tenant,
            message_id=message_id,
            batch_id="b",
            mobile_number="+447911123456",
            metadata_json='{"campaignId": "c"}',
        ),
        status=canonical,
        sub_status=canonical.capitalize(),
    )


def reply(index: int, tenant: str = OTHER) -> InboundMessage:
    return InboundMessage(
        event_id=f"e-in-{index}",
        tenant=tenant,
        to="ACME",
        from_number=f"4479111234{index:02d}",
        text=f"reply {index}",
        sent_at=datetime(2026, 1, 2, tzinfo=UTC),
    )


def bodies(simulator: OptimoveSimulator, tenant: str, endpoint: str) -> list[tuple[int, object]]:
    return [
        (r["status"], orjson.loads(r["body"]))
        for r in simulator.received(endpoint=endpoint, tenant=tenant)
    ]


def requests_timed(tenant: str, kind: str = "delivery") -> float:
    name = "smsbridge_report_request_duration_seconds_count"
    return REGISTRY.get_sample_value(name, {"tenant": tenant, "kind": kind}) or 0.0


def gauge(tenant: str, kind: str = "delivery") -> float | None:
    return REGISTRY.get_sample_value("smsbridge_reports_parked", {"tenant": tenant, "kind": kind})


async def test_a_newer_report_queues_behind_a_parked_one_and_order_is_kept(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503, remaining=1), tenant=TENANT)
    async with Harness(settings_for(simulator.port)) as h:
        sent = h.record(STATUSES.name, "m-1", status("m-1", "sent"))
        delivered = h.record(STATUSES.name, "m-1", status("m-1", "delivered"))

        assert await h.handle(sent) == []
        assert await h.handle(delivered) == []  # Optimove is fine again, but order comes first

        key = f"delivery/{TENANT}/m-1"
        assert h.queue(key) == [f"sms.statuses:{PARTITION}:1", f"sms.statuses:{PARTITION}:2"]
        assert len(simulator.received(tenant=TENANT)) == 1
        assert gauge(TENANT) == 1
        parked = h.parked(key)
        assert parked is not None and parked.due_at == pytest.approx(START + 1.0)

        assert await h.pass_at(0.5) == 0  # not due yet
        await h.pass_at(0.5)
        assert h.queue(key) == [f"sms.statuses:{PARTITION}:2"]
        await h.pass_at(0.0)  # the next report of the message goes on the next pass

        assert h.parked(key) is None
        assert gauge(TENANT) == 0
        assert h.publisher.changelog()[-1] == (key.encode(), None)  # a tombstone
    statuses = [
        (code, body["type"]["status"])  # type: ignore[index]
        for code, body in bodies(simulator, TENANT, "delivery-report")
    ]
    assert statuses == [(503, "Sent"), (200, "Sent"), (200, "Delivered")]


async def test_a_failing_tenant_parks_new_reports_without_asking_while_others_flow(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    timed_before = requests_timed(OTHER), requests_timed(TENANT)
    async with Harness(settings_for(simulator.port)) as h:
        await h.handle(h.record(STATUSES.name, "m-b1", status("m-b1", "sent", OTHER)))
        await h.handle(h.record(STATUSES.name, "m-b2", status("m-b2", "sent", OTHER)))
        await h.handle(h.record(STATUSES.name, "m-a1", status("m-a1", "sent")))

        # beta was asked once: its circuit opened, and its second report parked unasked.
        assert len(simulator.received(tenant=OTHER)) == 1
        # Each request is timed under its own tenant: the slow Optimove is the one to see.
        assert requests_timed(OTHER) - timed_before[0] == 1
        assert requests_timed(TENANT) - timed_before[1] == 1
        assert [c for c, _ in bodies(simulator, TENANT, "delivery-report")] == [200]
        second = h.handler.store.get(PARTITION, f"delivery/{OTHER}/m-b2")
        assert second is not None
        assert second["reports"][0]["attempts"] == 0
        assert gauge(OTHER) == 2

        # Its turn comes: one probe goes, the other report waits for a later turn.
        assert await h.pass_at(1.0) == 2
        assert len(simulator.received(tenant=OTHER)) == 2
        waits = sorted(
            report["waits"]
            for key in (f"delivery/{OTHER}/m-b1", f"delivery/{OTHER}/m-b2")
            for report in h.handler.store.get(PARTITION, key)["reports"]  # type: ignore[index]
        )
        assert waits == [0, 1]

        # Past the give-up age both are dead-lettered with what was last heard.
        await h.pass_at(600.0)
        await h.pass_at(0.0)
        letters = h.publisher.dead_letters()
        assert sorted(letter.key for letter in letters) == ["m-b1", "m-b2"]  # type: ignore[type-var]
        for letter in letters:
            assert letter.source_topic == letter.redrive_topic == STATUSES.name
            assert "gave up" in letter.reason
            assert letter.stage == "reporter"
        attempted = [letter for letter in letters if letter.attempts]
        assert attempted and all(letter.status_code == 503 for letter in attempted)
        assert all("simulated failure" in letter.response_excerpt for letter in attempted)
        assert gauge(OTHER) == 0
        assert h.parked_entries() == 0


async def test_a_record_read_twice_is_parked_once(simulator: OptimoveSimulator) -> None:
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as h:
        report = h.record(STATUSES.name, "m-b1", status("m-b1", "sent", OTHER), offset=7)
        await h.handle(report)
        await h.handle(report)
        assert h.queue(f"delivery/{OTHER}/m-b1") == [f"sms.statuses:{PARTITION}:7"]

        incoming = h.record(INBOUND.name, OTHER, reply(1), offset=8)
        await h.handle(incoming)
        requests = len(simulator.received(tenant=OTHER))
        await h.handle(incoming)
        assert len(simulator.received(tenant=OTHER)) == requests
        assert h.parked_entries() == 2


async def test_parked_replies_of_a_tenant_go_in_one_request(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503, remaining=1), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as h:
        results = await asyncio.gather(
            *(h.handle(h.record(INBOUND.name, OTHER, reply(i))) for i in range(3))
        )
        assert list(results) == [[], [], []]
        assert gauge(OTHER, "incoming") == 3

        await h.pass_at(1.0)

        assert gauge(OTHER, "incoming") == 0
        assert h.parked_entries() == 0
    requests = bodies(simulator, OTHER, "incoming-message")
    assert [(code, len(body["messages"])) for code, body in requests] == [(503, 3), (200, 3)]  # type: ignore[index]


async def test_refusals_are_dead_lettered_at_once_and_not_parked(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=400, remaining=1), tenant=TENANT)
    async with Harness(settings_for(simulator.port)) as h:
        outputs = await h.handle(h.record(STATUSES.name, "m-1", status("m-1", "sent")))

        assert [o.topic for o in outputs] == [DEAD_LETTERS]
        letter = outputs[0].value
        assert isinstance(letter, DeadLetter)
        assert (letter.status_code, letter.attempts) == (400, 1)
        assert h.parked_entries() == 0
        assert h.publisher.published == []


async def test_a_parked_report_of_a_tenant_no_longer_configured_is_dead_lettered(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as before:
        await before.handle(before.record(STATUSES.name, "m-b1", status("m-b1", "sent", OTHER)))
        changelog = before.publisher.changelog()

    async with Harness(settings_for(simulator.port, tenants=[TENANT])) as after:
        after.handler.store.load(PARTITION, changelog)
        await after.pass_at(3600.0)

        (letter,) = after.publisher.dead_letters()
        assert letter.key == "m-b1"
        assert "no longer" in letter.reason
        assert after.parked_entries() == 0


async def test_a_retry_that_ends_before_its_request_returns_the_probe(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as h:
        await h.handle(h.record(STATUSES.name, "m-b1", status("m-b1", "sent", OTHER)))
        circuit = h.handler.circuits.get(OTHER)
        assert circuit.is_open

        h.clock.now += 1.0
        assert await h.handler.fire_due(h.clock.now) == 1  # the probe's task is started...
        h.handler.store.drop([PARTITION])  # ...and its partition is taken away before it runs
        await wait_for(lambda: h.handler.retrying == 0, what="the retry to end")

        assert len(simulator.received(tenant=OTHER)) == 1  # no request went
        assert circuit.acquire() is not None  # the probe's place is free again


@pytest.mark.parametrize("places", [100, 2])
async def test_once_optimove_answers_again_every_parked_report_goes_at_once(
    simulator: OptimoveSimulator, places: int
) -> None:
    # The first request and two probes fail; the third probe finds Optimove back.
    simulator.set_mode(FailureMode(status=503, remaining=3), tenant=OTHER)
    messages = [f"m-b{i}" for i in range(1, 7)]
    settings = settings_for(simulator.port)
    settings.reporter.parked_max_in_flight = places
    async with Harness(settings) as h:
        for message in messages:
            await h.handle(h.record(STATUSES.name, message, status(message, "sent", OTHER)))
        circuit = h.handler.circuits.get(OTHER)
        while circuit.is_open:
            await h.pass_at(max(0.0, circuit.next_attempt_at() - h.clock.now))
        parked = [h.parked(f"delivery/{OTHER}/{m}") for m in messages]
        waiting = [entry for entry in parked if entry is not None]
        # The outage pushed their turns out (skipped turns lengthen the wait)...
        assert len(waiting) == len(messages) - 1
        assert all(e.due_at is not None and e.due_at > h.clock.now + 1 for e in waiting)

        # ...yet the first passes after the recovery send them all, as places allow.
        for _ in range(-(-len(waiting) // places)):
            await h.pass_at(0.0)

        assert all(h.parked(f"delivery/{OTHER}/{m}") is None for m in messages)
        assert gauge(OTHER) == 0
    accepted = [
        body["messageId"]  # type: ignore[index]
        for code, body in bodies(simulator, OTHER, "delivery-report")
        if code == 200
    ]
    assert sorted(accepted) == messages  # each once


def outcomes(records: Iterable[OutRecord]) -> list[tuple[str, str, dict[str, int]]]:
    return [
        (r.value.tenant, r.value.kind, r.value.counts)
        for r in records
        if r.topic == REPORT_OUTCOMES and isinstance(r.value, ReportOutcome)
    ]


async def test_every_request_optimove_accepts_is_counted_once_on_report_outcomes(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503, remaining=1), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as h:
        # Accepted at once: counted in the publish that stores the acknowledgement, on Kafka
        # before the record is done (so before its commit).
        outputs = await h.handle(h.record(STATUSES.name, "m-a1", status("m-a1", "sent")))
        assert outputs == []
        assert outcomes(h.publisher.published) == [(TENANT, "delivery", {"": 1})]
        assert [r.key for r in h.publisher.published] == [
            TENANT,
            f"acknowledged/delivery/{TENANT}/m-a1/sent/Sent",
        ]
        h.publisher.published.clear()
        # Refused once (503): parked, nothing counted; accepted on retry: counted then.
        parked = await h.handle(h.record(STATUSES.name, "m-b1", status("m-b1", "sent", OTHER)))
        assert outcomes(parked) == []
        replies = await asyncio.gather(
            *(h.handle(h.record(INBOUND.name, OTHER, reply(i))) for i in range(3))
        )
        assert all(outcomes(r) == [] for r in replies)
        assert outcomes(h.publisher.published) == []
        for _ in range(5):  # the circuit probes with one request, then lets the rest go
            await h.pass_at(10.0)
        assert h.parked_entries() == 0
        assert sorted(outcomes(h.publisher.published)) == [
            (OTHER, "delivery", {"": 1}),
            (OTHER, "incoming", {"": 3}),
        ]
        # Replies accepted at once: one record per request, published before they are done.
        await asyncio.gather(
            *(h.handle(h.record(INBOUND.name, TENANT, reply(i, TENANT))) for i in (7, 8))
        )
        assert outcomes(h.publisher.published)[-1] == (TENANT, "incoming", {"": 2})


def posted(simulator: OptimoveSimulator, tenant: str, endpoint: str) -> int:
    return len(simulator.received(endpoint=endpoint, tenant=tenant))


def skipped(tenant: str, kind: str) -> float:
    labels = {"tenant": tenant, "kind": kind}
    name = "smsbridge_reports_already_acknowledged_total"
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_replayed_report_optimove_accepted_is_not_posted_again(
    simulator: OptimoveSimulator,
) -> None:
    skipped_before = skipped(TENANT, "delivery"), skipped(TENANT, "incoming")
    async with Harness(settings_for(simulator.port)) as first:
        sent = first.record(STATUSES.name, "m-1", status("m-1", "sent"), offset=1)
        answer = first.record(INBOUND.name, TENANT, reply(1, TENANT), offset=2)
        assert await first.handle(sent) == []
        assert await first.handle(answer) == []
        assert first.acknowledgements() == 2
        # Read again by the same instance (the group's offsets were reset): not posted.
        await first.handle(sent)
        await first.handle(answer)
        # The same report written twice upstream (another offset, another event id): not either.
        copy = status("m-1", "sent").model_copy(update={"event_id": "e-again"})
        await first.handle(first.record(STATUSES.name, "m-1", copy, offset=3))
        assert posted(simulator, TENANT, "delivery-report") == 1
        assert posted(simulator, TENANT, "incoming-message") == 1
        changelog = first.publisher.changelog()

    # A new instance restores what was acknowledged from the changelog: a replay from the
    # beginning posts only what is new.
    async with Harness(settings_for(simulator.port)) as second:
        second.handler.store.load(PARTITION, changelog)
        await second.handle(second.record(STATUSES.name, "m-1", status("m-1", "sent"), offset=1))
        await second.handle(second.record(INBOUND.name, TENANT, reply(1, TENANT), offset=2))
        await second.handle(
            second.record(STATUSES.name, "m-1", status("m-1", "delivered"), offset=4)
        )
    assert posted(simulator, TENANT, "incoming-message") == 1
    statuses = [
        body["type"]["status"]  # type: ignore[index]
        for _, body in bodies(simulator, TENANT, "delivery-report")
    ]
    assert statuses == ["Sent", "Delivered"]
    assert skipped(TENANT, "delivery") - skipped_before[0] == 3
    assert skipped(TENANT, "incoming") - skipped_before[1] == 2


async def test_a_report_accepted_on_a_retry_is_remembered_too(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503, remaining=1), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as h:
        sent = h.record(STATUSES.name, "m-b1", status("m-b1", "sent", OTHER), offset=1)
        await h.handle(sent)  # 503: parked
        answers = [h.record(INBOUND.name, OTHER, reply(i), offset=2 + i) for i in range(2)]
        await asyncio.gather(*(h.handle(record) for record in answers))  # parked
        assert h.acknowledgements() == 0
        for _ in range(3):
            await h.pass_at(10.0)
        assert h.parked_entries() == 0
        assert h.acknowledgements() == 3
        requests = len(simulator.received(tenant=OTHER))

        for record in (sent, *answers):
            assert await h.handle(record) == []
        assert len(simulator.received(tenant=OTHER)) == requests
    accepted = [code for code, _ in bodies(simulator, OTHER, "delivery-report") if code == 200]
    assert accepted == [200]


async def test_acknowledgements_are_forgotten_after_remember_acknowledged_s(
    simulator: OptimoveSimulator,
) -> None:
    settings = settings_for(simulator.port)
    settings.reporter.remember_acknowledged_s = 100.0
    async with Harness(settings) as h:
        sent = h.record(STATUSES.name, "m-1", status("m-1", "sent"), offset=1)
        await h.handle(sent)
        key = f"acknowledged/delivery/{TENANT}/m-1/sent/Sent"
        remembered = h.parked(key)
        assert remembered is not None and remembered.due_at == START + 100.0

        await h.pass_at(99.0)
        assert h.acknowledgements() == 1
        await h.pass_at(1.0)
        # Deleted, on the changelog too: the state stays bounded however many reports go.
        assert h.acknowledgements() == 0
        assert h.publisher.changelog()[-1] == (key.encode(), None)

        # A replay reaching back further than that posts the report again (documented).
        await h.handle(sent)
        assert posted(simulator, TENANT, "delivery-report") == 2
        assert h.acknowledgements() == 1


async def test_a_report_queued_twice_while_parked_is_posted_once(
    simulator: OptimoveSimulator,
) -> None:
    simulator.set_mode(FailureMode(status=503, remaining=1), tenant=OTHER)
    async with Harness(settings_for(simulator.port)) as h:
        sent = status("m-b1", "sent", OTHER)
        await h.handle(h.record(STATUSES.name, "m-b1", sent, offset=1))  # 503: parked
        # The same report written again upstream queues behind the parked one (order first).
        copy = sent.model_copy(update={"event_id": "e-again"})
        await h.handle(h.record(STATUSES.name, "m-b1", copy, offset=2))
        assert len(h.queue(f"delivery/{OTHER}/m-b1")) == 2

        await h.pass_at(10.0)  # the first copy is accepted...
        await h.pass_at(0.0)  # ...so the second is done without a request
        assert h.parked_entries() == 0
    assert [code for code, _ in bodies(simulator, OTHER, "delivery-report")] == [503, 200]
