"""Which message a delivery report is for, when the provider's send answer named none.

OpenSMS answers a send with ``{"status":"success","data":"sms reports with all details"}``
(providers.md §2.1): no id per recipient. Its reports carry their own ``message_id`` and the
``phone``. So for such providers (``Provider.matched_by_number``) dispatches and reports share
the correlation key ``account:+E164``, and the join state of that key keeps every recent message
sent to the number on the account, one ``NumberSlot`` each. A report goes to (``pick``):

1. the message whose provider id it names: the send answer's id when there was one, else the
   id learned from the first report given to that message (``pending``, then ``delivered``);
2. else the latest message without an id that was sent at most ``window_s`` before the report
   was received (or up to ``skew_s`` after: a fast report may overtake the sender's record of
   its send, and hosts' clocks differ a little);
3. else none: the report is held like any report that came before its dispatch record, and
   dead-lettered with the reason if no message turns up within ``unmatched_after_s``.

Times are the report's ``received_at`` (our clock, in the stored event: a replay matches the
same way; the provider's own ``timestamp`` may be late or wrong) and the dispatch's
``dispatched_at``. Two sends to one number awaiting their first report at once can only be told
apart by order: the latest takes the first report, which is right when reports follow their
send within seconds, as they do. Pure functions over plain values; ``join.py`` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from shared.events import FINAL_STATUSES, CanonicalStatus, DispatchRecord


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
