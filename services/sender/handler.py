"""The sender's handler: every ``RecipientMessage`` ends in exactly one outcome, sent at most once.

A message comes from ``sms.recipients`` (``process``) or from its parked entry (``on_due``);
``decide`` says what to do with it now (fail, cancel, park, or send on a route), then
``attempts.py`` makes the call, ``outcomes.py`` records what it ended in and ``parking.py`` parks
it and wakes it up. What is guaranteed, and why: docs/sending.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import TopicPartition

from services.sender import metrics
from services.sender.attempts import Attempts
from services.sender.controls import released_by
from services.sender.fairness import Flow, flow_of, lane_of
from services.sender.lookups import Lookups, TableLookup
from services.sender.outcomes import Outcomes, may_resend
from services.sender.parking import PARKED_PREFIXES, Timers, park
from services.sender.routing import (
    Exhausted,
    RouteChoice,
    UseRoute,
    WaitForCircuit,
    choose_route,
    due_at,
    expires_at,
    is_expired,
    routes_for,
)
from services.sender.state import STAGE, ParkReason, SendState, StateWriter, message_of
from services.sender.status import (
    StatusPublisher,
    WindowWaits,
    instance_name,
    status_of,
    window_markers,
)
from services.sender.windows import opens_at, window_for
from shared.config import Route, Settings, TenantSettings
from shared.contract.campaign_controls import Effect
from shared.contract.events import RecipientMessage
from shared.contract.statuses import SubStatus
from shared.contract.topics import PRIORITY_RECIPIENTS, RECIPIENTS, SENDER_STATE
from shared.kafka.clients import KafkaUnavailable, Publisher
from shared.kafka.runner import Record, SelfPublishing, decode_or_poison
from shared.kafka.store import ChangelogStore, KeyLocks, PartitionNotReady
from shared.logs import mask_number
from shared.providers.base import Provider
from shared.retry import RetryPolicy
from shared.tasks import finish_or_cancel

log = logging.getLogger(__name__)

# Co-partitioned (the range assignor gives both topics' partition N to one instance): the state
# of partition N holds the messages of either.
INPUTS = (RECIPIENTS, PRIORITY_RECIPIENTS)
_RELEASED = metrics.CAMPAIGN_CONTROL.labels("released")
_CANCELLED = metrics.CAMPAIGN_CONTROL.labels("cancelled")


# -- the decision ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fail:
    sub_status: str
    detail: str
    dead_letter: bool = False


@dataclass(frozen=True)
class Cancel:
    """Its campaign was cancelled: reported ``Cancelled``, never sent."""


@dataclass(frozen=True)
class Park:
    due: float
    reason: ParkReason


@dataclass(frozen=True)
class Send:
    route: Route


Action = Fail | Cancel | Park | Send


@dataclass(frozen=True)
class Decision:
    action: Action
    # The message was held and its campaign resumed: it passed the controls' gate this time.
    released: bool = False


def decide(
    state: SendState,
    tenant: TenantSettings | None,
    *,
    now: float,
    effect: Callable[[], Effect],
    opted_out: Callable[[], bool],
    routes: Callable[[TenantSettings], list[Route]],
    choose: Callable[[list[Route]], RouteChoice],
    monotonic_now: Callable[[], float],
    window_opens: Callable[[], float | None] = lambda: None,
) -> Decision:
    """What to do with a message not sent yet, now (wall-clock ``now``). The callables are
    asked in this order and only when the decision gets that far."""
    message = message_of(state)
    if tenant is None:
        # Never configured, or removed by a live reload: not sent with credentials gone stale.
        detail = f"tenant {message.context.tenant!r} is not in the configuration (removed?)"
        return Decision(Fail(SubStatus.NO_ROUTE, detail, dead_letter=True))
    expiry = expires_at(message, tenant.validity_s).timestamp()
    if is_expired(message, tenant.validity_s, datetime.fromtimestamp(now, UTC)):
        return Decision(
            Fail(SubStatus.EXPIRED, f"older than the validity of {tenant.validity_s:g}s")
        )
    gate = effect()
    if gate is Effect.CANCEL:
        return Decision(Cancel())
    due = due_at(message).timestamp()
    if due > now:
        return Decision(Park(due, "scheduled"))
    if gate is Effect.HOLD:
        # Until the campaign is resumed or cancelled; when its validity ends it is expired.
        return Decision(Park(expiry + 0.001, "held"))
    released = state.park_reason == "held"
    opens = window_opens()
    if opens is not None:
        if opens > expiry:
            detail = "its send window does not open before its validity ends"
            return Decision(Fail(SubStatus.OUTSIDE_SEND_WINDOW, detail), released)
        return Decision(Park(opens, "window"), released)
    if opted_out():
        return Decision(Fail(SubStatus.OPTED_OUT, "recipient opted out"), released)
    serving = routes(tenant)
    if not serving:
        detail = "no route serves this destination"
        return Decision(Fail(SubStatus.NO_ROUTE, detail, dead_letter=True), released)
    choice = choose(serving)
    if isinstance(choice, Exhausted):
        tried = ", ".join(state.given_up) or "none"
        detail = f"every route failed (tried {tried}); last error: {state.last_error}"
        return Decision(Fail(SubStatus.PROVIDER_ERROR, detail, dead_letter=True), released)
    if isinstance(choice, WaitForCircuit):
        wall = now + max(0.0, choice.until - monotonic_now())
        return Decision(Park(min(wall, expiry + 0.001), "circuit"), released)
    return Decision(Send(choice.route), released)


def choose_for(
    state: SendState, routes: list[Route], blocked_until: Callable[[str], float | None]
) -> RouteChoice:
    """``routing.choose_route``, but a resend is the identical call, on the same account, or
    nothing (``state.py``)."""
    if state.resend and state.account:
        until = blocked_until(state.account)
        pinned = next((r for r in routes if r.provider == state.account), None)
        if pinned is None:
            return Exhausted()
        return UseRoute(pinned) if until is None else WaitForCircuit(until)
    return choose_route(routes, state.given_up, blocked_until)


# -- the handler -------------------------------------------------------------------------------


class SenderHandler(SelfPublishing):
    """The runner's handler (it publishes its outputs itself, as they happen): partition-aware
    (state restore and drop, rate-limit share), with a timer task for parked messages."""

    def __init__(
        self,
        settings: Settings,
        *,
        providers: Mapping[str, Provider] | None = None,
        opt_outs: TableLookup | None = None,
        last_inbound: TableLookup | None = None,
        controls: TableLookup | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``providers``: ready clients by account (others are built on first use); the tables
        not given are mirrored from Kafka (``lookups.py``)."""
        self.settings = settings
        sender = settings.sender
        self.store = ChangelogStore(
            settings.kafka,
            SENDER_STATE,
            state_dir=sender.state_dir,
            name=STAGE,
            counted_prefixes=PARKED_PREFIXES.values(),
        )
        self.locks = KeyLocks()
        self.clock = clock
        self.monotonic = monotonic
        self.writer = StateWriter(self.store, name=STAGE)
        # Attempts on one route, and the waits between them (a provider's Retry-After wins).
        schedule = RetryPolicy(
            base_s=sender.retry_base_delay_s,
            cap_s=sender.retry_max_delay_s,
            max_attempts=sender.max_attempts_per_route,
        )
        self.schedule = schedule
        self.outcomes = Outcomes(settings, self.writer, schedule, clock)
        self.attempts = Attempts(
            settings,
            self.writer,
            self.outcomes,
            providers=providers or {},
            clock=clock,
            monotonic=monotonic,
        )
        self.lookups = Lookups(
            settings,
            name=STAGE,
            opt_outs=opt_outs,
            last_inbound=last_inbound,
            controls=controls,
            on_controls_change=self.controls_changed,
        )
        self._owned: set[int] = set()
        self._closing: set[int] = set()
        self.window_waits = WindowWaits()
        instance = instance_name()
        self.status = StatusPublisher(
            instance,
            lambda: status_of(instance, self.attempts.fair_queues(), self.window_waits),
            self.writer.publish,
        )
        self.timers = Timers(
            settings,
            self.store,
            self.locks,
            self.attempts,
            self.lookups,
            self.on_due,
            closing=self._closing,
            clock=clock,
            monotonic=monotonic,
        )

    @property
    def lease_s(self) -> float:
        return self.attempts.lease_s

    # -- lifecycle (ConsumerService) -----------------------------------------------------------

    def attach(self, publisher: Publisher) -> None:
        """Where outputs go (``start`` does it; tests attach a recording publisher)."""
        self.writer.attach(publisher)

    async def start(self, publisher: Publisher) -> None:
        self.attach(publisher)
        self.attempts.start()
        await self.lookups.start()
        self.timers.start()
        self.status.start()

    async def stop(self) -> None:
        await self.status.stop()
        await self.timers.stop()
        await self.settle_work(None)
        await self.attempts.close()
        await self.lookups.stop()
        self.store.close()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        numbers = _recipient_partitions(partitions)
        self.take_partitions(numbers)
        try:
            await self.store.restore(numbers)
        except KafkaUnavailable as exc:
            # Not fatal: ``handle`` restores a partition before touching it and retries.
            log.warning("%s: restoring state failed (%s); will retry on first use", STAGE, exc)
        for partition in numbers:
            if self.store.is_ready(partition):
                self.window_waits.recount(partition, window_markers(self.store, partition))
        # Held messages of campaigns resumed (or cancelled) while nobody owned them.
        self.timers.look_again(numbers)
        self.timers.refresh_gauges()

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        numbers = _recipient_partitions(partitions)
        self._closing |= numbers
        try:
            self.release_partitions(numbers)
            await self.settle_work(numbers)
            self.store.drop(numbers)
            self.window_waits.drop(numbers)
        finally:
            self._closing -= numbers
        self.timers.refresh_gauges()

    def take_partitions(self, numbers: Iterable[int]) -> None:
        self._owned |= set(numbers)
        self.attempts.limits.set_share(len(self._owned))

    def release_partitions(self, numbers: Iterable[int]) -> None:
        self._owned -= set(numbers)
        self.attempts.limits.set_share(len(self._owned))

    async def settle_work(self, partitions: set[int] | None) -> None:
        """Stop the work of ``partitions`` (None: all): what wrote no intent yet is cancelled,
        calls in flight are waited for so that their outcome is recorded."""

        def mine(partition: int) -> bool:
            return partitions is None or partition in partitions

        waiting = self.timers.settle(mine) + self.attempts.settle(mine)
        deadline = self.settings.sender.runner.shutdown_deadline_s
        if cancelled := await finish_or_cancel(waiting, deadline):
            # Kafka has been away for the whole deadline: these outcomes are lost here and
            # will read "outcome unknown after restart" (the intents are on Kafka).
            log.error(
                "%s: %d send(s) still unrecorded after %gs; giving up on them",
                STAGE,
                cancelled,
                deadline,
            )

    def controls_changed(self, keys: Sequence[str] = ()) -> None:
        """The campaign controls changed (the control table's ``on_change``): every answer is
        asked afresh, at once, and this instance's parked messages are looked at again."""
        self.lookups.controls_changed(keys)
        self.timers.look_again(self.store.partitions())

    # -- pacing (shared/kafka/backlog.py) -------------------------------------------------------

    def lane_of(self, record: Record) -> Flow | None:
        return lane_of(record, self.settings.tenants)

    @property
    def read_ahead_limit(self) -> int:
        return self.settings.sender.read_ahead_records

    def lane_limit(self, lane: Hashable) -> int:
        assert isinstance(lane, Flow)
        return self.attempts.lane_limit(lane)

    # -- a message -----------------------------------------------------------------------------

    async def handle(self, record: Record) -> None:
        message = decode_or_poison(RecipientMessage, record.value)
        if record.partition in self._closing:
            raise PartitionNotReady(f"{RECIPIENTS.name}[{record.partition}] is being revoked")
        if not self.store.is_ready(record.partition):
            await self.store.restore({record.partition})
        await self.process(record.partition, message)

    async def process(self, partition: int, message: RecipientMessage) -> None:
        """One message from ``sms.recipients`` (new, redelivered or replayed)."""
        message_id = message.context.message_id
        async with self.locks.hold(partition, message_id):
            await self.attempts.finished(message_id)
            entry = self.store.get_entry(partition, message_id)
            if entry is None:
                await self._advance(partition, SendState.fresh(message))
                return
            state = SendState.from_value(entry.value)
            if state.phase == "done":
                metrics.DUPLICATE_RECORDS.inc()
                await self.outcomes.republish(state)
            elif state.phase == "sending":
                await self._recover(partition, state, cause="restart")
            # parked: its timer sends it

    async def on_due(self, partition: int, key: str, now: float, released: bool) -> None:
        """A parked entry is due (``released``: the campaign controls ended its wait early)."""
        try:
            async with self.locks.hold(partition, key):
                await self.attempts.finished(key)
                entry = self.store.get_entry(partition, key)
                if entry is None or entry.due_at is None:
                    return
                if entry.due_at > now and not released:
                    return
                state = SendState.from_value(entry.value)
                if entry.due_at > now and not self._released(state):
                    return  # the controls changed back meanwhile: it waits for its time
                if state.phase == "parked":
                    await self._advance(partition, state)
                elif released:
                    return  # no longer parked: whatever it does is not the controls' business
                elif state.phase == "sending":
                    await self._recover(partition, state, cause="lease")
                else:
                    # Its validity is over: a replay can no longer send it anyway.
                    await self.writer.publish_persistently([self.store.put(partition, key, None)])
        except PartitionNotReady:
            return  # revoked meanwhile
        except KafkaUnavailable as exc:
            log.warning("%s: parked message not sent (%s); next pass retries", STAGE, exc)
        except Exception:
            log.exception("%s: parked message failed", STAGE, extra={"message_id": key})

    async def _advance(self, partition: int, state: SendState) -> None:
        """Take a message not sent yet as far as it goes now: sent, failed, or parked."""
        following: SendState | None = state
        while following is not None:
            following = await self._step(partition, following)

    async def _step(self, partition: int, state: SendState) -> SendState | None:
        """Decide and do it; returns the state to decide again with at once, if any (a route
        given up on, a circuit that opened, a call the controls withheld)."""
        message = message_of(state)
        tenant = self.settings.tenants.get(message.context.tenant)
        window = window_for(message, tenant) if tenant is not None else None

        def window_opens() -> float | None:
            return None if window is None else opens_at(window, message.destination, self.clock())

        decision = decide(
            state,
            tenant,
            now=self.clock(),
            effect=lambda: self.lookups.effect_on(message),
            opted_out=lambda: self.lookups.opted_out(message),
            routes=lambda tenant: [
                r for r in routes_for(tenant, message.destination) if self.attempts.usable(r)
            ],
            choose=lambda routes: choose_for(state, routes, self.attempts.blocked_until),
            monotonic_now=self.monotonic,
            window_opens=window_opens,
        )
        self.window_waits.track(
            partition,
            message,
            was=state.park_reason == "window",
            will=isinstance(decision.action, Park) and decision.action.reason == "window",
        )
        if decision.released:
            _RELEASED.inc()
            log.debug(
                "released %s: campaign resumed",
                mask_number(message.destination),
                extra={"message_id": message.context.message_id},
            )
        match decision.action:
            case Fail(sub_status, detail, dead_letter):
                await self.outcomes.fail(
                    partition, state, sub_status, detail, dead_letter=dead_letter
                )
            case Cancel():
                _CANCELLED.inc()
                detail = self.lookups.cancel_detail(message)
                await self.outcomes.fail(partition, state, SubStatus.CANCELLED, detail)
            case Park(due, reason):
                await park(self.writer, partition, state, due, reason)
            case Send(route):
                if state.account != route.provider:
                    state.account, state.attempt = route.provider, 0
                assert tenant is not None  # decided to send: the tenant is configured
                attempt = await self.attempts.run(
                    partition,
                    state,
                    tenant,
                    flow_of(message, tenant),
                    # Asked again at the call's turn: a pause, or a window that closed meanwhile.
                    withheld=lambda: (
                        self.lookups.effect_on(message) is not Effect.SEND
                        or window_opens() is not None
                    ),
                )
                return attempt.state
        return None

    async def _recover(self, partition: int, state: SendState, cause: str) -> None:
        """An intent without an outcome, orphaned by a crash (docs/sending.md)."""
        account = state.account
        provider = self.attempts.provider_type(account)
        if may_resend(provider, state) and self.schedule.may_retry(state.attempt):
            log.warning(
                "resending the identical call to %s after a restart (the provider de-duplicates)",
                account,
                extra={"message_id": state.message_id},
            )
            state.phase, state.resend = "parked", True
            await self._advance(partition, state)
            return
        metrics.UNKNOWN_OUTCOMES.labels(account or "unknown", cause).inc()
        detail = (
            f"outcome unknown after restart: the call to {account} (attempt {state.attempt}) "
            "may have reached the provider; not sent again to avoid a double send"
        )
        await self.outcomes.fail(partition, state, SubStatus.PROVIDER_ERROR, detail, account)

    def _released(self, state: SendState) -> bool:
        """Do the controls in force end this parked message's wait now?"""
        if state.phase != "parked" or state.message is None:
            return False
        return released_by(self.lookups.effect_on(state.message), state.park_reason or "")


def _recipient_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    names = {topic.name for topic in INPUTS}  # asked now: the names carry the topic prefix
    return {tp.partition for tp in partitions if tp.topic in names}
