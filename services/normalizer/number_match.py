"""Which message a delivery report is for, when the provider's send answer named none.

For providers whose send answer names no message (OpenSMS, ``Provider.matched_by_number``)
dispatches and reports share the key ``account:+E164``, and its join state keeps every recent
message sent there, one ``NumberSlot`` each. ``pick`` gives a report to the message whose
provider id it names, else the latest message without an id sent within ``window_s`` before it,
else none (held like an early report). Pure functions over plain values; ``join.py`` applies
them. Why, and the clock rules: ``docs/normalizer.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from shared.contract.events import FINAL_STATUSES, CanonicalStatus, DispatchRecord


class NumberSlot(BaseModel):
    """One message sent to the number of a number-matched key, and how far it got."""

    dispatch: DispatchRecord
    status: CanonicalStatus | None = None
    sub_status: str = ""
    finished_at: float | None = None
    # The send answer's id, else the one learned from the first report matched to this message.
    provider_message_id: str = ""

    @property
    def sent_at(self) -> float:
        return self.dispatch.dispatched_at.timestamp()

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES and self.finished_at is not None


def pick(
    slots: Sequence[NumberSlot],
    provider_message_id: str,
    received_at: float,
    *,
    window_s: float,
    skew_s: float,
) -> int | None:
    """The index of the message a report is for (see the module docstring), or None."""
    if provider_message_id:
        for index, slot in enumerate(slots):
            if slot.provider_message_id == provider_message_id:
                return index
    chosen: int | None = None
    for index, slot in enumerate(slots):
        if slot.provider_message_id:
            continue  # another report's message: its id is not this one
        if received_at - window_s <= slot.sent_at <= received_at + skew_s and (
            chosen is None or slot.sent_at >= slots[chosen].sent_at
        ):
            chosen = index
    return chosen


def to_evict(slots: Sequence[NumberSlot]) -> int:
    """The message to forget when there are too many: the oldest finished one, else the oldest
    (which the caller then reports expired: it would never be reported otherwise)."""
    if not slots:
        raise ValueError("nothing to evict")
    finished = [index for index, slot in enumerate(slots) if slot.finished]
    candidates = finished or range(len(slots))
    return min(candidates, key=lambda index: slots[index].sent_at)


def insert(slots: Sequence[NumberSlot], slot: NumberSlot) -> list[NumberSlot]:
    """``slots`` with ``slot`` added, oldest send first."""
    return sorted([*slots, slot], key=lambda item: item.sent_at)


def due_at(
    slots: Sequence[NumberSlot], *, dlr_timeout_s: float, keep_finished_s: float
) -> float | None:
    """When the earliest message needs the timer: to expire it, or to forget it once finished."""
    times = [
        slot.finished_at + keep_finished_s
        if slot.finished and slot.finished_at is not None
        else slot.sent_at + dlr_timeout_s
        for slot in slots
    ]
    return min(times, default=None)
