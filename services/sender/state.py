"""What the sender remembers about one message, in ``sms.sender-state`` keyed by message id.

A message moves through three phases, each written to the changelog before what it allows:
``parked`` (waiting for its scheduled time, a retry, a circuit, or its campaign's resume; the
entry's ``due_at`` is when the timer looks again), ``sending`` (the intent, acknowledged before
the provider is called; ``due_at`` is a lease) and ``done`` (the outcome, written before the
dispatch record is published; ``due_at`` is when it may be forgotten). A parked message also has
a marker ``parked:<reason>:<message id>`` naming its tenant and campaign, so that parked messages
are counted by reason and found by campaign without reading every one. Details:
docs/sending.md, "The sender's state".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contract.events import DispatchRecord, RecipientMessage, StateChange
from shared.contract.topics import SENDER_STATE
from shared.kafka.clients import KafkaUnavailable, OutRecord, Publisher
from shared.kafka.outbox import Outbox
from shared.kafka.store import ChangelogStore
from shared.kafka.unit_of_work import UnitOfWork
from shared.retry import RetryPolicy, retry

log = logging.getLogger(__name__)

STAGE = "sender"  # the service's name: its consumer group, logs, dead letters, metrics
# Kafka away: publish again, waiting up to 30 s between tries, for as long as it takes.
_KAFKA_WAIT = RetryPolicy(base_s=0.5, cap_s=30.0)

Phase = Literal["parked", "sending", "done"]
# "window": outside its send window (windows.py).
ParkReason = Literal["scheduled", "retry", "circuit", "held", "window"]
PARK_REASONS: tuple[ParkReason, ...] = ("scheduled", "retry", "circuit", "held", "window")
PARKED_PREFIX = "parked:"


def parked_key(reason: str, message_id: str) -> str:
    return f"{PARKED_PREFIX}{reason}:{message_id}"


def parse_parked_key(key: str) -> tuple[str, str]:
    """(reason, message id) of a marker key."""
    reason, _, message_id = key.removeprefix(PARKED_PREFIX).partition(":")
    return reason, message_id


class ParkedMarker(BaseModel):
    """The value of a parked marker: whose message it is (empty in markers of older versions)."""

    model_config = ConfigDict(extra="ignore")

    tenant: str = ""
    campaign_id: str = ""

    @classmethod
    def of(cls, message: RecipientMessage) -> ParkedMarker:
        return cls(tenant=message.context.tenant, campaign_id=message.context.campaign_id)

    def to_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SendState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    phase: Phase
    # Kept until the message is done: a parked or orphaned message is sent or reported from it.
    message: RecipientMessage | None = None
    # The route being tried, attempts made on it, and the routes given up on, in order.
    account: str = ""
    attempt: int = 0
    given_up: list[str] = Field(default_factory=list)
    attempts: int = 0  # on every route together
    park_reason: ParkReason | None = None
    # The next attempt must be the identical call on ``account``, alone: the outcome of the last
    # one is unknown and the provider recognises a resent call (``deduplicates_resends``).
    resend: bool = False
    # ``sending``: message ids of the provider call, in call order (a bulk call has several).
    call: list[str] = Field(default_factory=list)
    last_error: str = ""
    last_status_code: int | None = None
    dispatch: DispatchRecord | None = None

    @classmethod
    def fresh(cls, message: RecipientMessage) -> SendState:
        return cls(phase="parked", message=message)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> SendState:
        return cls.model_validate(value)

    def to_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True)

    @property
    def message_id(self) -> str:
        if self.message is not None:
            return self.message.context.message_id
        if self.dispatch is not None:
            return self.dispatch.context.message_id
        raise ValueError("a send state without its message or dispatch")


def message_of(state: SendState) -> RecipientMessage:
    if state.message is None:
        raise ValueError("a send state without its message")
    return state.message


class StateWriter:
    """Writes a message's state and its parked marker to the store, and publishes what the
    sender writes to Kafka (through one ``Outbox``)."""

    def __init__(self, store: ChangelogStore, *, name: str) -> None:
        self.store = store
        self.name = name
        self._outbox: Outbox | None = None

    def attach(self, publisher: Publisher) -> None:
        self._outbox = Outbox(publisher, name=self.name)

    def put(
        self, partition: int, state: SendState, due: float | None, stored_reason: ParkReason | None
    ) -> list[OutRecord]:
        """Store ``state`` (and its parked marker) and return the changelog records."""
        records = [self.store.put(partition, state.message_id, state.to_value(), due)]
        records += self._mark(partition, state, stored_reason)
        return records

    def intent(
        self, partition: int, state: SendState, lease: float, stored_reason: ParkReason | None
    ) -> UnitOfWork:
        """The intent of a call: only Kafka gets the ``sending`` state (nothing in this process
        reads it, an attempt in flight is known in memory; only a restore after a crash does), so
        the local file keeps the previous state until the outcome replaces it. A parked marker it
        removes is put back if Kafka does not take the intent."""
        work = UnitOfWork(self.store, partition)
        change = StateChange(value=state.to_value(), due_at=lease)
        work.add([OutRecord(SENDER_STATE, state.message_id, change, partition=partition)])
        if stored_reason is not None:
            work.put(parked_key(stored_reason, state.message_id), None)
        return work

    def _mark(
        self, partition: int, state: SendState, stored_reason: ParkReason | None
    ) -> list[OutRecord]:
        """The parked marker follows the state's park reason."""
        message_id = state.message_id
        reason = state.park_reason if state.phase == "parked" else None
        if reason == stored_reason:
            return []
        records = []
        if stored_reason is not None:
            records.append(self.store.put(partition, parked_key(stored_reason, message_id), None))
        if reason is not None:
            marker = ParkedMarker.of(message_of(state)).to_value()
            records.append(self.store.put(partition, parked_key(reason, message_id), marker))
        return records

    async def publish(self, records: Sequence[OutRecord]) -> None:
        if self._outbox is None:
            raise RuntimeError(f"{self.name} handler used before start()")
        await self._outbox.publish(records)

    async def publish_persistently(self, records: list[OutRecord]) -> None:
        """Publish until Kafka acknowledges: what these records say has already happened."""
        await retry(
            lambda: self.publish(records),
            _KAFKA_WAIT,
            on=KafkaUnavailable,
            on_retry=lambda _, exc, __: log.warning(
                "%s: publish failed (%s); retrying", self.name, exc
            ),
        )
