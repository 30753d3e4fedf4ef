"""The runner's handler contract: outputs returned or published by the handler itself (declared
by type), optional abilities found by type, retries on the shared policy, poison dead-lettered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.config import RunnerSettings
from shared.contract.events import DeadLetter, RecipientMessage
from shared.contract.topics import DEAD_LETTERS, STATUSES
from shared.kafka import runner as runner_module
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.runner import (
    ConsumerRunner,
    OrderedBy,
    PartitionAware,
    PoisonRecord,
    Record,
    RecordHandler,
    SelfPublishing,
    decode_or_poison,
)
from shared.kafka.service import HandlerLifecycle
from shared.retry import RetryPolicy
from tests.support.records import consumer_record


def record(value: bytes = b"{}", offset: int = 7) -> Record:
    return consumer_record("sms.recipients", value, partition=1, offset=offset)


def a_letter() -> OutRecord:
    return OutRecord(STATUSES, "k", None)


class Returning:
    """Returns its outputs; fails as told first."""

    def __init__(self, failures: Sequence[Exception] = ()) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def handle(self, record: Record) -> Sequence[OutRecord]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return [a_letter()]


class PublishesItself(SelfPublishing):
    def __init__(self) -> None:
        self.handled: list[int] = []

    async def handle(self, record: Record) -> None:
        self.handled.append(record.offset)


class WithEverything(PublishesItself):
    def ordering_key(self, record: Record) -> bytes | None:
        return None

    async def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    async def on_revoked(self, partitions: set[TopicPartition]) -> None: ...

    async def start(self, publisher: Publisher) -> None: ...

    async def stop(self) -> None: ...


def make_runner(handler: RecordHandler, max_handler_attempts: int = 3) -> ConsumerRunner:
    return ConsumerRunner(
        name="test",
        consumer=cast(AIOKafkaConsumer, object()),
        topics=["sms.recipients"],
        handler=handler,
        publisher=cast(Publisher, object()),
        settings=RunnerSettings(),
        max_handler_attempts=max_handler_attempts,
    )


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "HANDLER_RETRY", RetryPolicy(base_s=0.001, cap_s=0.002))


async def test_returned_outputs_are_the_runners_to_publish() -> None:
    outputs = await make_runner(Returning())._handle_with_retries(record())
    assert list(outputs) == [a_letter()]


async def test_a_self_publishing_handler_leaves_nothing_to_publish() -> None:
    handler = PublishesItself()
    outputs = await make_runner(handler)._handle_with_retries(record(offset=3))
    assert list(outputs) == []
    assert handler.handled == [3]


def test_optional_abilities_are_found_by_type() -> None:
    plain, full = PublishesItself(), WithEverything()
    assert not isinstance(plain, OrderedBy | PartitionAware | HandlerLifecycle)
    assert isinstance(full, OrderedBy)
    assert isinstance(full, PartitionAware)
    assert isinstance(full, HandlerLifecycle)
    assert not isinstance(Returning(), SelfPublishing)  # publishing itself is declared, not guessed


async def test_the_runner_orders_by_the_handlers_key_only_when_it_has_one() -> None:
    assert make_runner(WithEverything())._ordered_by is not None
    assert make_runner(PublishesItself())._ordered_by is None


async def test_a_failing_handler_is_retried_then_its_record_dead_lettered() -> None:
    handler = Returning([ValueError("boom")] * 5)
    outputs = await make_runner(handler, max_handler_attempts=3)._handle_with_retries(record())

    assert handler.calls == 3
    [dead] = outputs
    assert dead.topic == DEAD_LETTERS
    assert isinstance(dead.value, DeadLetter)
    assert dead.value.attempts == 3
    assert dead.value.reason == "ValueError: boom"


async def test_kafka_being_down_is_waited_for_beyond_the_attempts() -> None:
    handler = Returning([KafkaUnavailable("down")] * 4)
    outputs = await make_runner(handler, max_handler_attempts=2)._handle_with_retries(record())

    assert handler.calls == 5
    assert list(outputs) == [a_letter()]


async def test_poison_is_dead_lettered_at_once() -> None:
    handler = Returning([PoisonRecord("unreadable")])
    [dead] = await make_runner(handler)._handle_with_retries(record())

    assert handler.calls == 1
    assert isinstance(dead.value, DeadLetter)
    assert (dead.value.reason, dead.value.attempts) == ("unreadable", 1)


def test_decode_or_poison() -> None:
    with pytest.raises(PoisonRecord, match="RecipientMessage"):
        decode_or_poison(RecipientMessage, b'{"not": "a message"}')
    with pytest.raises(PoisonRecord, match="empty record"):
        decode_or_poison(RecipientMessage, None)
    assert decode_or_poison(DeadLetter, _letter_bytes()).reason == "r"


def _letter_bytes() -> bytes:
    letter = DeadLetter(source_topic="t", stage="s", reason="r", payload="")
    return letter.to_bytes()
