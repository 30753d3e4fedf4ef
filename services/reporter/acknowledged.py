"""What Optimove acknowledged, remembered so that a replay of the reporter posts nothing twice.

One entry per report Optimove accepted, on ``sms.reporter-state`` beside the parked entries, in
the partition of the record it came from (the inputs and the state are co-partitioned):

- a delivery report: key ``acknowledged/delivery/{tenant}/{message id}/{status}/{sub-status}``,
  the report's identity (one message has one report per status);
- an incoming message: key ``acknowledged/incoming/{tenant}/{event id}``.

The entry is stored and published in the same unit of work as the report's ``ReportOutcome``
(and the parked entry it concludes), so it is on Kafka before the input offset is committed. Its
``due_at`` is when it is forgotten (``[reporter] remember_acknowledged_s`` after the
acknowledgement): the timer deletes it, so the state stays bounded, and a replay reaching further
back than that posts again. See docs/reporter.md, "Replays".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from services.reporter.metrics import KIND_DELIVERY, KIND_INCOMING
from shared.contract.events import InboundMessage, StatusEvent
from shared.kafka.store import Entry

PREFIX = "acknowledged/"


class Remembered(NamedTuple):
    """One store write of an acknowledgement: a value to keep until ``due_at``, or None (forget)."""

    key: str
    value: dict[str, Any] | None
    due_at: float | None


def delivery_identity(event: StatusEvent) -> str:
    """The key of a delivery report: its message, status and sub-status."""
    context = event.context
    return (
        f"{PREFIX}{KIND_DELIVERY}/{context.tenant}/{context.message_id}/"
        f"{event.status}/{event.sub_status}"
    )


def incoming_identity(event: InboundMessage) -> str:
    """The key of an incoming message: its event id (deterministic, set by the normalizer)."""
    return f"{PREFIX}{KIND_INCOMING}/{event.tenant}/{event.event_id}"


def is_acknowledgement(key: str) -> bool:
    return key.startswith(PREFIX)


def already_acknowledged(entry: Entry | None, now: float) -> bool:
    """Whether a report whose acknowledgement entry is ``entry`` must not be posted again.

    An entry past its time counts as forgotten even before the timer deleted it, so what a replay
    does depends on the setting, not on how far behind the timer is.
    """
    return entry is not None and (entry.due_at is None or entry.due_at > now)


def remember(keys: Iterable[str], now: float, remember_s: float) -> list[Remembered]:
    """The writes recording that Optimove accepted these reports at ``now`` (none when nothing
    is to be remembered)."""
    if remember_s <= 0:
        return []
    forget_at = now + remember_s
    return [Remembered(key, {"acknowledged_at": now}, forget_at) for key in keys]


def forgotten(due: Iterable[tuple[str, Entry | None]], now: float) -> list[Remembered]:
    """The deletes of the acknowledgements among ``due`` (key, current entry) whose time came."""
    return [
        Remembered(key, None, None)
        for key, entry in due
        if is_acknowledgement(key)
        and entry is not None
        and entry.due_at is not None
        and entry.due_at <= now
    ]
