"""The normalizer's join: dispatch records and provider status events per correlation key.

Pure logic over plain values: given the state stored for one correlation key and one input (a
dispatch record, a provider status event, or the clock), a ``Joiner`` returns the next state, the
status events to emit and the events it gives up on. The pipeline's one monotonic guard lives
here (``shared.contract.statuses.is_forward``). Replies held for their dispatch record and
matching by number (``number_match.py``) are explained in ``docs/normalizer.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.normalizer import number_match
from services.normalizer.number_match import NumberSlot
from shared.contract import ids
from shared.contract.events import (
    FINAL_STATUSES,
    CanonicalStatus,
    DeadLetter,
    DispatchRecord,
    ProviderEvent,
    StatusEvent,
)
from shared.contract.statuses import SubStatus, is_forward
from shared.contract.topics import PROVIDER_EVENTS
from shared.providers import PROVIDER_KINDS

STAGE = "normalizer"
REPLY_KINDS: frozenset[str] = frozenset({"inbound", "opt_out"})

DropReason = Literal["duplicate", "after_final", "not_forward", "unknown_status"]

# (provider kind, provider status) -> (canonical status, sub-status), or None when unknown.
StatusMapper = Callable[[str, str], tuple[CanonicalStatus, str] | None]


def provider_status_mapper(
    provider_kind: str, provider_status: str
) -> tuple[CanonicalStatus, str] | None:
    """Each provider module's own status map; an unknown provider maps nothing."""
    provider = PROVIDER_KINDS.get(provider_kind)
    return provider.canonical(provider_status) if provider is not None else None


def matched_by_number(provider_kind: str) -> bool:
    """Are this provider's reports matched to sends by number (``number_match.py``)?"""
    provider = PROVIDER_KINDS.get(provider_kind)
    return provider is not None and provider.matched_by_number


@dataclass(frozen=True)
class JoinPolicy:
    # A provider event whose dispatch record has not arrived by then is dead-lettered.
    unmatched_after_s: float
    # A message still not final this long after its dispatch is reported Failed/Expired.
    dlr_timeout_s: float
    # How long a finished message is remembered, so that late or repeated reports are dropped.
    keep_finished_s: float = 24 * 3600.0
    # Provider event ids remembered per message to recognise a repeated callback.
    max_seen_event_ids: int = 32
    # Keys matched by number (number_match.py): how long before a report its message may have
    # been sent, how long after (clock skew, a report overtaking its dispatch record), and how
    # many messages one number's key remembers.
    number_window_s: float = 24 * 3600.0
    number_skew_s: float = 60.0
    max_messages_per_number: int = 32


class JoinState(BaseModel):
    """Everything the normalizer remembers about one correlation key (stored as JSON)."""

    dispatch: DispatchRecord | None = None
    # Provider events that arrived before the dispatch record, in arrival order.
    held: list[ProviderEvent] = Field(default_factory=list)
    held_since: float | None = None
    status: CanonicalStatus | None = None
    sub_status: str = ""
    finished_at: float | None = None
    seen_event_ids: list[str] = Field(default_factory=list)
    # A key matched by number: every recent message sent to it (the fields above but ``held``,
    # ``held_since`` and ``seen_event_ids`` stay unused).
    messages: list[NumberSlot] = Field(default_factory=list)

    def to_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_value(cls, value: dict[str, Any] | None) -> JoinState | None:
        return cls.model_validate(value) if value is not None else None


@dataclass
class JoinResult:
    """What one input did. ``state`` None with ``changed`` means: delete the key."""

    state: JoinState | None
    changed: bool = False
    statuses: list[StatusEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Provider kinds of the held events given up on, one per dead letter.
    unmatched_providers: list[str] = field(default_factory=list)
    # The same for held replies (counted apart: they are not delivery reports).
    unmatched_reply_providers: list[str] = field(default_factory=list)
    dropped: list[DropReason] = field(default_factory=list)
    # Held replies the dispatch record arrived for: the caller routes them with it.
    released_replies: list[ProviderEvent] = field(default_factory=list)


class Joiner:
    def __init__(self, policy: JoinPolicy, status_mapper: StatusMapper = provider_status_mapper):
        self.policy = policy
        self.status_mapper = status_mapper

    def classify(self, event: ProviderEvent) -> tuple[CanonicalStatus, str] | None:
        return self.status_mapper(event.provider_kind, event.provider_status)

    def due_at(self, state: JoinState | None) -> float | None:
        """When ``on_timer`` has something to do for this state (Unix seconds), if ever."""
        if state is None:
            return None
        unmatched = (
            state.held_since + self.policy.unmatched_after_s
            if state.held_since is not None
            else None
        )
        if state.messages:
            due = number_match.due_at(
                state.messages,
                dlr_timeout_s=self.policy.dlr_timeout_s,
                keep_finished_s=self.policy.keep_finished_s,
            )
            return min(t for t in (due, unmatched) if t is not None)
        if state.dispatch is None:
            return unmatched
        if state.status in FINAL_STATUSES and state.finished_at is not None:
            return state.finished_at + self.policy.keep_finished_s
        return state.dispatch.dispatched_at.timestamp() + self.policy.dlr_timeout_s

    # -- inputs ------------------------------------------------------------------------------------

    def on_dispatch(
        self, stored: JoinState | None, dispatch: DispatchRecord, now: float
    ) -> JoinResult:
        if dispatch.outcome == "accepted" and matched_by_number(dispatch.provider_kind):
            return self._on_number_dispatch(stored, dispatch, now)
        state = _working_copy(stored)
        result = JoinResult(state, changed=True)
        if state.dispatch is None:
            state.dispatch = dispatch
        self._dispatched(state, result, dispatch, now)
        held, state.held, state.held_since = state.held, [], None
        for event in held:
            if event.kind in REPLY_KINDS:
                result.released_replies.append(event)
            else:
                self._apply_event(state, result, event, now)
        if result.released_replies:
            # From here the caller's own record of forwarded replies recognises a repeat, and a
            # reply it could not route stays re-drivable.
            released = {event.event_id for event in result.released_replies}
            state.seen_event_ids = [i for i in state.seen_event_ids if i not in released]
        # A replayed dispatch record changes nothing and needs no write.
        result.changed = state != stored
        return result

    def on_status_event(
        self, stored: JoinState | None, event: ProviderEvent, now: float
    ) -> JoinResult:
        if stored is not None and event.event_id in stored.seen_event_ids:
            return JoinResult(stored, dropped=["duplicate"])
        if self.classify(event) is None:
            return JoinResult(stored, dropped=["unknown_status"])
        state = _working_copy(stored)
        result = JoinResult(state, changed=True)
        state.seen_event_ids = [*state.seen_event_ids, event.event_id][
            -self.policy.max_seen_event_ids :
        ]
        target: JoinState | NumberSlot | None = state if state.dispatch is not None else None
        if matched_by_number(event.provider_kind):
            target = self._slot_for(state, event)
        if target is None:
            state.held.append(event)
            if state.held_since is None:
                state.held_since = now
            return result
        self._apply_event(target, result, event, now)
        return result

    def hold_reply(self, stored: JoinState | None, event: ProviderEvent, now: float) -> JoinResult:
        """Keep a reply until its dispatch record arrives (the caller found no tenant without)."""
        if stored is not None and stored.dispatch is not None:
            raise ValueError("the dispatch record is here: route the reply, do not hold it")
        if stored is not None and event.event_id in stored.seen_event_ids:
            return JoinResult(stored, dropped=["duplicate"])
        state = _working_copy(stored)
        state.seen_event_ids = [*state.seen_event_ids, event.event_id][
            -self.policy.max_seen_event_ids :
        ]
        state.held.append(event)
        if state.held_since is None:
            state.held_since = now
        return JoinResult(state, changed=True)

    def on_timer(self, stored: JoinState | None, now: float) -> JoinResult:
        due = self.due_at(stored)
        if stored is None or due is None:
            return JoinResult(None, changed=stored is not None)
        if due > now:
            # Not due after all (the policy changed since): the caller re-arms it at ``due``.
            return JoinResult(stored, changed=True)
        if stored.messages:
            return self._on_number_timer(stored, now)
        if stored.dispatch is None:
            given_up = JoinResult(None, changed=True)
            _dead_letter_held(stored.held, given_up, self.policy.number_window_s)
            return given_up
        if stored.status not in FINAL_STATUSES:
            state = _working_copy(stored)
            result = JoinResult(state, changed=True)
            self._expire(state, result, now)
            return result
        # Finished long enough ago: late reports no longer need recognising.
        return JoinResult(None, changed=True)

    # -- keys matched by number (number_match.py) ------------------------------------------

    def _on_number_dispatch(
        self, stored: JoinState | None, dispatch: DispatchRecord, now: float
    ) -> JoinResult:
        state = _working_copy(stored)
        result = JoinResult(state, changed=True)
        message_id = dispatch.context.message_id
        if any(slot.dispatch.context.message_id == message_id for slot in state.messages):
            return JoinResult(stored)  # a replayed dispatch record
        slot = NumberSlot(dispatch=dispatch, provider_message_id=dispatch.provider_message_id)
        state.messages = number_match.insert(state.messages, slot)
        self._dispatched(slot, result, dispatch, now)
        while len(state.messages) > self.policy.max_messages_per_number:
            evicted = state.messages.pop(number_match.to_evict(state.messages))
            if not evicted.finished:
                self._expire(
                    evicted,
                    result,
                    now,
                    f"more than {self.policy.max_messages_per_number} messages to this number "
                    "awaiting reports; the oldest is given up",
                )
        # Reports that came before this record may be for it (or for nothing sent yet).
        held, state.held = state.held, []
        for event in held:
            target = self._slot_for(state, event)
            if target is None:
                state.held.append(event)
            else:
                self._apply_event(target, result, event, now)
        if not state.held:
            state.held_since = None
        result.changed = state != stored
        return result

    def _slot_for(self, state: JoinState, event: ProviderEvent) -> NumberSlot | None:
        """The message of ``state`` this report is for, which learns the report's id."""
        index = number_match.pick(
            state.messages,
            event.provider_message_id,
            event.received_at.timestamp(),
            window_s=self.policy.number_window_s,
            skew_s=self.policy.number_skew_s,
        )
        if index is None:
            return None
        slot = state.messages[index]
        if not slot.provider_message_id:
            slot.provider_message_id = event.provider_message_id
        return slot

    def _on_number_timer(self, stored: JoinState, now: float) -> JoinResult:
        state = _working_copy(stored)
        result = JoinResult(state, changed=True)
        kept: list[NumberSlot] = []
        for slot in state.messages:
            if slot.finished:
                if slot.finished_at is not None and (
                    slot.finished_at + self.policy.keep_finished_s <= now
                ):
                    continue  # late reports for it no longer need recognising
            elif slot.sent_at + self.policy.dlr_timeout_s <= now:
                self._expire(slot, result, now)
            kept.append(slot)
        state.messages = kept
        if state.held_since is not None and state.held_since + self.policy.unmatched_after_s <= now:
            _dead_letter_held(state.held, result, self.policy.number_window_s)
            state.held, state.held_since = [], None
        if not state.messages and not state.held:
            result.state = None
        return result

    # -- steps -------------------------------------------------------------------------------------

    def _dispatched(
        self,
        target: JoinState | NumberSlot,
        result: JoinResult,
        dispatch: DispatchRecord,
        now: float,
    ) -> None:
        if dispatch.outcome == "accepted":
            status: CanonicalStatus = "sent"
            # ``Sent``, or a dry run's ``DryRun:Sent`` (shared/providers/dryrun.py).
            sub_status = dispatch.sub_status or SubStatus.SENT.value
        else:
            status = "failed"
            sub_status = dispatch.sub_status or SubStatus.PROVIDER_ERROR.value
        _advance(
            target,
            result,
            status,
            sub_status,
            now=now,
            detail=dispatch.detail,
            occurred_at=dispatch.dispatched_at,
            provider_account=dispatch.provider_account,
            provider_message_id=dispatch.provider_message_id,
        )

    def _expire(
        self, target: JoinState | NumberSlot, result: JoinResult, now: float, detail: str = ""
    ) -> None:
        dispatch = target.dispatch
        assert dispatch is not None, "only a dispatched message expires"
        _advance(
            target,
            result,
            "failed",
            SubStatus.EXPIRED.value,
            now=now,
            detail=detail or f"no final delivery report within {self.policy.dlr_timeout_s:g}s",
            occurred_at=datetime.fromtimestamp(now, UTC),
            provider_account=dispatch.provider_account,
            provider_message_id=(
                target.provider_message_id
                if isinstance(target, NumberSlot)
                else dispatch.provider_message_id
            ),
        )

    def _apply_event(
        self,
        target: JoinState | NumberSlot,
        result: JoinResult,
        event: ProviderEvent,
        now: float,
    ) -> None:
        mapped = self.classify(event)
        if mapped is None:
            result.dropped.append("unknown_status")
            return
        status, sub_status = mapped
        _advance(
            target,
            result,
            status,
            sub_status,
            now=now,
            detail=event.reason,
            occurred_at=event.occurred_at or event.received_at,
            provider_account=event.provider_account,
            provider_message_id=event.provider_message_id,
        )


def _advance(
    target: JoinState | NumberSlot,
    result: JoinResult,
    status: CanonicalStatus,
    sub_status: str,
    *,
    now: float,
    detail: str,
    occurred_at: datetime,
    provider_account: str,
    provider_message_id: str,
) -> None:
    """Move one message forward to ``status`` and emit it, or count why not."""
    if not is_forward(target.status, status):
        final = target.status in FINAL_STATUSES
        result.dropped.append("after_final" if final else "not_forward")
        return
    dispatch = target.dispatch
    assert dispatch is not None, "a status needs the dispatch record's context"
    target.status = status
    target.sub_status = sub_status
    if status in FINAL_STATUSES:
        target.finished_at = now
    message_id = dispatch.context.message_id
    result.statuses.append(
        StatusEvent(
            event_id=ids.event_id(message_id, status),
            context=dispatch.context,
            status=status,
            sub_status=sub_status,
            provider_account=provider_account or dispatch.provider_account,
            provider_message_id=provider_message_id or dispatch.provider_message_id,
            detail=detail,
            occurred_at=occurred_at,
        )
    )


def _dead_letter_held(
    held: list[ProviderEvent], result: JoinResult, number_window_s: float
) -> None:
    """Dead-letter the held events, each with the reason nothing matched it."""
    for event in held:
        if event.kind in REPLY_KINDS:
            result.unmatched_reply_providers.append(event.provider_kind)
            reason = (
                f"{event.kind}: no tenant for the reply and no dispatch record for "
                f"{event.correlation_key}"
            )
        elif matched_by_number(event.provider_kind):
            result.unmatched_providers.append(event.provider_kind)
            # No number in the reason: the key (which holds it) is the dead letter's own.
            reason = (
                f"no message sent to this number on {event.provider_account} in the "
                f"{number_window_s:g}s before the report, none named by its message id"
            )
        else:
            result.unmatched_providers.append(event.provider_kind)
            reason = f"no dispatch record for {event.correlation_key}"
        result.dead_letters.append(
            DeadLetter(
                source_topic=PROVIDER_EVENTS.name,
                stage=STAGE,
                reason=reason,
                key=event.correlation_key,
                payload=event.to_bytes().decode("utf-8"),
                attempts=1,
                redrive_topic=PROVIDER_EVENTS.name,
            )
        )


def _working_copy(state: JoinState | None) -> JoinState:
    """A copy the joiner may change without changing ``state`` (the caller still reads it).

    The joiner assigns fields and appends to the lists; the records inside are frozen events.
    So new lists are enough: a deep copy of every record was a tenth of the normalizer's time.
    A number-matched key's messages are copied one level down: their fields change too.
    """
    if state is None:
        return JoinState()
    return state.model_copy(
        update={
            "held": list(state.held),
            "seen_event_ids": list(state.seen_event_ids),
            "messages": [slot.model_copy() for slot in state.messages],
        }
    )
