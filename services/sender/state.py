"""What the sender remembers about one message, in ``sms.sender-state`` keyed by message id.

A message moves through three phases, each written to the changelog before what it allows:

- ``parked``: waiting for its scheduled time, a retry, a circuit to close, or its campaign's
  ``resume`` (``held``: paused by the operator, ``shared/campaigns.py``); the entry's ``due_at``
  is when the timer looks at it again (for a held message: when its validity ends). The input
  offset is committed meanwhile.
- ``sending``: the intent. Written, and acknowledged by Kafka, before the provider is called;
  ``due_at`` is a lease after which an intent nobody here is working on is known to be orphaned
  (its sender died between the provider call and the outcome).
- ``done``: the outcome and the dispatch record, written before the dispatch is published;
  ``due_at`` is when the entry may be forgotten (its message can no longer be sent anyway).

Besides, a parked message has a marker key ``parked:<reason>:<message id>`` whose value names
the message's tenant and campaign (``ParkedMarker``), written in the same produce batch, so that
parked messages can be counted by reason from the key index, and those of one campaign found
when its controls change without reading every message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.events import DispatchRecord, RecipientMessage

Phase = Literal["parked", "sending", "done"]
ParkReason = Literal["scheduled", "retry", "circuit", "held"]
PARK_REASONS: tuple[ParkReason, ...] = ("scheduled", "retry", "circuit", "held")
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
    given_up: list[str] = []
    attempts: int = 0  # on every route together
    park_reason: ParkReason | None = None
    # The next attempt must be the identical call on ``account``, alone: the outcome of the last
    # one is unknown and the provider recognises a resent call (``deduplicates_resends``).
    resend: bool = False
    # ``sending``: message ids of the provider call, in call order (a bulk call has several).
    call: list[str] = []
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
