"""The sender's logic: every ``RecipientMessage`` ends in exactly one outcome, sent at most once.

Every message ends in a dispatch record: ``accepted`` with the provider's message id, or
``failed`` with a sub-status (``NoRoute``, ``Expired``, ``OptedOut``, the provider's terminal
error, or ``ProviderError`` when every route failed or the outcome of a send is unknown). What
nothing could send (no route, every route failed) also goes to ``sms.dead-letters`` with the
reason. Nothing is dropped.

Sending guarantees
------------------
State lives in ``sms.sender-state`` (a ``ChangelogStore`` co-partitioned with ``sms.recipients``,
keyed by message id; see ``state.py`` for the phases). For every provider call:

1. the **intent** (account, attempt, the message ids of the call) is written and acknowledged by
   Kafka (acks=all) *before* the provider is called;
2. the **outcome** (the dispatch record, or the next parking) is written and acknowledged
   *before* the dispatch record is published, and both before the input offset is committed.

A message whose stored state is ``done`` is never sent again: a redelivered or replayed record
only republishes its dispatch record (consumers de-duplicate: same correlation key). A message
whose state is ``sending`` with nobody here working on it was orphaned by a crash after step 1:
its provider may or may not have accepted it. It is **not sent again**; it is reported
``Failed``/``ProviderError`` "outcome unknown after restart" — unless its provider recognises an
identical resent call (``Provider.deduplicates_resends``, Octopush's ``request_id``) and the call
carried this message alone, in which case the identical call is sent again and the provider
decides. The same rule covers a call whose failure leaves the outcome open (a timeout, a
connection broken after sending: ``SendError.maybe_accepted``).

So: **at most once per route**, always; a message is sent on a second route only after the first
route answered with an explicit, retryable refusal (5xx, 429, a failed connection). The window
in which a message can end as "outcome unknown" is the time between its intent's acknowledgement
and its outcome's acknowledgement — one provider call plus one Kafka write, and under a rate
limit the wait for the booked send time (``AccountSender.intent_lead_s``) — and only a crash
(SIGKILL, OOM, power) or an ambiguous network failure inside it does that; the number of such
messages is bounded by the calls in flight (``max_in_flight`` per account). A graceful stop or a
rebalance waits for calls in flight to be recorded, and cancels only what has not yet written
an intent.

An outcome is remembered until ``keep_outcome_s`` after the message's validity ended; a replay
of ``sms.recipients`` later than that finds the message expired, so it is still not sent (it is
reported ``Expired`` again).

Scheduling and retries never block a partition: a message that is not due yet, waits for a
retry, or waits for a circuit breaker is parked in the store with its ``due_at`` and its input
offset is committed; the timer task sends it when due. Opt-outs (``sms.opt-outs``, mirrored by a
``GlobalTable``) are consulted right before every send attempt, scheduled ones included; an auto
reply to a customer who just wrote to us goes out all the same (``optouts.py``).

Campaign controls
-----------------
The operator's pause / resume / cancel (``sms.campaign-control``, mirrored by a ``GlobalTable``
on every instance; ``shared/campaigns.py`` for their meaning, ``controls.py`` for the gate) are
consulted beside the opt-outs before every send attempt, and again when the call's turn has come,
right before the provider is called (``accounts.py``). So a message is never sent once its
instance's table holds the control, which it does within one poll (~100 ms) of the control
reaching Kafka.

- **Paused**: the message is parked as ``held`` (with its validity's end as due time), its offset
  committed; nothing else waits for it. When the controls change, and when partitions are
  assigned, the parked messages of this instance are looked at (their markers name their
  campaign): held ones whose campaign was resumed are released to the timer and sent under the
  rate limit like any other.
- **Cancelled**: a message not sent yet, new or parked for any reason, is reported ``Failed`` /
  ``Cancelled`` (a ``failed`` dispatch record, as for an opt-out) and never sent.

Dry run
-------
A tenant with ``dry_run = true`` goes through all of the above; its calls go to the account's
``DryRun`` stand-in (``shared/providers/dryrun.py``) instead of the provider, and each accepted
dispatch record is published together with the delivery report the stand-in makes up, on
``sms.provider-events``, for the normalizer to join as any provider's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiokafka import TopicPartition

from services.sender import metrics
from services.sender.accounts import AccountSender, CircuitOpen, SendJob, Withheld
from services.sender.controls import ControlGate, released_by
from services.sender.optouts import OptOutVerdict, opt_out_verdict
from services.sender.routing import (
    Exhausted,
    RetrySchedule,
    UseRoute,
    WaitForCircuit,
    choose_route,
    due_at,
    expires_at,
    routes_for,
)
from services.sender.state import (
    PARK_REASONS,
    PARKED_PREFIX,
    ParkedMarker,
    ParkReason,
    SendState,
    parked_key,
    parse_parked_key,
)
from shared import metrics as shared_metrics
from shared.campaigns import Effect
from shared.circuit import CircuitBreaker, CircuitState
from shared.config import ProviderSettings, Route, Settings, TenantSettings
from shared.events import (
    DeadLetter,
    DispatchRecord,
    RecipientMessage,
    SchemaError,
    StateChange,
    decode,
    utcnow,
)
from shared.ids import unsent_correlation_key
from shared.kafka import KafkaUnavailable, OutRecord, Publisher
from shared.logs import mask_number, scrub
from shared.outbox import Outbox
from shared.providers import PROVIDER_KINDS, callback_url, dryrun, provider_class
from shared.providers.base import OutboundSms, Provider, SendAccepted, SendError, SendResult
from shared.providers.dryrun import DryRun
from shared.ratelimit import SlidingWindowLimiter
from shared.runner import PoisonRecord, Record
from shared.segments import count_segments
from shared.statuses import SubStatus
from shared.store import ChangelogStore, GlobalTable, KeyLocks, PartitionNotReady
from shared.timers import run_timer_passes
from shared.topics import (
    CAMPAIGN_CONTROL,
    DEAD_LETTERS,
    DISPATCHES,
    LAST_INBOUND,
    OPT_OUTS,
    PROVIDER_EVENTS,
    RECIPIENTS,
    SENDER_STATE,
)

log = logging.getLogger(__name__)

NAME = "sender"
# Used to decide how long an outcome is remembered when the tenant is not configured here.
_DEFAULT_VALIDITY_S = 24 * 3600.0
# An intent older than the request timeout plus this margin, with nobody here working on it,
# was orphaned by a crash (the timer finds those whose record was committed long ago).
_LEASE_MARGIN_S = 60.0
# Parked entries looked at per partition per timer pass.
_TIMER_BATCH = 500
# Parked markers read at a time when the campaign controls change.
_SCAN_PAGE = 1000
# The key prefix of each reason's parked markers, whose counts the PARKED gauge shows.
_PARKED_PREFIXES = {reason: parked_key(reason, "") for reason in PARK_REASONS}
# How often the timer loop refreshes the gauges.
_GAUGE_INTERVAL_S = 5.0
_EXPECTED_FAILURES = frozenset({SubStatus.OPTED_OUT, SubStatus.EXPIRED, SubStatus.CANCELLED})
_DEFAULT_DRY_RUN_OUTCOMES: dict[str, float] = TenantSettings.model_fields[
    "dry_run_outcomes"
].default
# Moved once per accepted message: label lookups done once.
_ACCEPTED = metrics.DISPATCHES.labels("accepted", SubStatus.SENT)
_DRY_RUN_SENT = dryrun.marked(SubStatus.SENT)
_HELD = metrics.CAMPAIGN_CONTROL.labels("held")
_RELEASED = metrics.CAMPAIGN_CONTROL.labels("released")
_CANCELLED = metrics.CAMPAIGN_CONTROL.labels("cancelled")
_SEGMENTS = {encoding: metrics.SEGMENTS.labels(encoding) for encoding in ("gsm7", "ucs2")}


class TableLookup(Protocol):
    """A mirror of a compacted topic (``GlobalTable``, or a dict in tests)."""

    def get(self, key: str) -> dict[str, Any] | None: ...


def recipient_key(tenant: str, e164: str) -> str:
    """How ``sms.recipients`` and ``sms.opt-outs`` key a recipient."""
    return f"{tenant}:{e164}"


@dataclass
class _Attempt:
    partition: int
    task: asyncio.Task[_Next]
    job: SendJob


@dataclass(frozen=True)
class _Next:
    """What an attempt left to do: nothing (settled), or go on at once with ``state``."""

    state: SendState | None = None


class Dispatcher:
    """The runner's handler: partition-aware (state restore/drop, rate-limit share), timers."""

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
        """``providers``: ready clients by account (others are built on first use);
        ``opt_outs``: the opt-out list (else a ``GlobalTable`` on ``sms.opt-outs`` is started);
        ``last_inbound``: when customers last wrote (else one on ``sms.last-inbound``; empty
        when only ``opt_outs`` is given);
        ``controls``: the campaign controls (else one on ``sms.campaign-control``; a caller
        that gives its own calls ``controls_changed`` when they change)."""
        self.settings = settings
        sender = settings.sender
        self.schedule = RetrySchedule(
            max_attempts=sender.max_attempts_per_route,
            base_delay_s=sender.retry_base_delay_s,
            max_delay_s=sender.retry_max_delay_s,
        )
        self.store = ChangelogStore(
            settings.kafka,
            SENDER_STATE,
            state_dir=sender.state_dir,
            name=NAME,
            counted_prefixes=_PARKED_PREFIXES.values(),
        )
        self.locks = KeyLocks()
        self.clock = clock
        self.monotonic = monotonic
        self.lease_s = sender.request_timeout_s + _LEASE_MARGIN_S
        self._outbox: Outbox | None = None
        self._given_providers = dict(providers or {})
        self._opt_outs = opt_outs
        self._opt_out_table: GlobalTable | None = None
        self._last_inbound: TableLookup | None = (
            last_inbound if opt_outs is None else (last_inbound or {})
        )
        self._last_inbound_table: GlobalTable | None = None
        self._gate = ControlGate(controls.get) if controls is not None else None
        self._control_table: GlobalTable | None = None
        # Partitions whose parked messages must be looked at again (the controls changed, or
        # they were assigned), the scan doing it, and the messages it released.
        self._rescan: set[int] = set()
        self._scan_task: asyncio.Task[None] | None = None
        self._releases: dict[tuple[int, str], None] = {}
        self._session: aiohttp.ClientSession | None = None
        self._accounts: dict[str, AccountSender] = {}
        self._breakers = {
            account: self._breaker(account, provider)
            for account, provider in settings.providers.items()
        }
        # Every instance starts with no share: it is given one with its partitions.
        self._limiters = {
            account: SlidingWindowLimiter(
                # Per second, kept over a second plus the jitter allowance.
                provider.rate_limit_per_s,
                window_s=1.0 + provider.rate_limit_jitter_s,
                share=0.0,
                clock=monotonic,
            )
            for account, provider in settings.providers.items()
            if provider.rate_limit_per_s > 0
        }
        self._owned: set[int] = set()
        self._closing: set[int] = set()
        self._attempts: dict[str, _Attempt] = {}
        self._timer_work: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._timer_task: asyncio.Task[None] | None = None
        self._max_timer_work = max(1, sender.runner.max_in_flight)
        self._gauges_refreshed_at = 0.0

    # -- lifecycle (ConsumerService) -----------------------------------------------------------

    def attach(self, publisher: Publisher) -> None:
        """Where outputs go (``start`` does it; tests attach a recording publisher)."""
        self._outbox = Outbox(publisher, name="sender")

    async def start(self, publisher: Publisher) -> None:
        self.attach(publisher)
        timeout = aiohttp.ClientTimeout(total=self.settings.sender.request_timeout_s)
        # Calls in flight are bounded per account (max_in_flight), not by the connection pool.
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        if self._opt_outs is None:
            self._opt_out_table = GlobalTable(
                self.settings.kafka, OPT_OUTS, name=f"{NAME}-opt-outs"
            )
            # No send without the opt-out list (decisions.md §6): a table that cannot catch up
            # fails the start.
            await self._opt_out_table.start()
            self._opt_outs = self._opt_out_table
        if self._last_inbound is None:
            self._last_inbound_table = GlobalTable(
                self.settings.kafka, LAST_INBOUND, name=f"{NAME}-last-inbound"
            )
            await self._last_inbound_table.start()
            self._last_inbound = self._last_inbound_table
        if self._gate is None:
            self._control_table = GlobalTable(
                self.settings.kafka,
                CAMPAIGN_CONTROL,
                name=f"{NAME}-campaign-control",
                on_change=self.controls_changed,
            )
            self._gate = ControlGate(self._control_table.get)
            # Nothing is sent before the operator's controls are known: a paused campaign
            # stays paused for an instance that starts now.
            await self._control_table.start()
        for account, provider in self.settings.providers.items():
            if provider.kind not in PROVIDER_KINDS:
                log.error("provider account %s: kind %s is not supported", account, provider.kind)
        self._timer_task = asyncio.create_task(self._run_timers(), name=f"{NAME}-timers")

    async def stop(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan_task
            self._scan_task = None
        await self._settle_work(None)
        for sender in self._accounts.values():
            await sender.close()
        self._accounts = {
            account: sender
            for account, sender in self._accounts.items()
            if account in self._given_providers
        }
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._opt_out_table is not None:
            await self._opt_out_table.stop()
            self._opt_out_table = None
            self._opt_outs = None
        if self._last_inbound_table is not None:
            await self._last_inbound_table.stop()
            self._last_inbound_table = None
            self._last_inbound = None
        if self._control_table is not None:
            await self._control_table.stop()
            self._control_table = None
            self._gate = None
        self.store.close()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        numbers = _recipient_partitions(partitions)
        self.take_partitions(numbers)
        try:
            await self.store.restore(numbers)
        except KafkaUnavailable as exc:
            # Not fatal: ``handle`` restores a partition before touching it and retries.
            log.warning("%s: restoring state failed (%s); will retry on first use", NAME, exc)
        # Held messages of campaigns resumed (or cancelled) while nobody owned them.
        self._rescan |= numbers
        self.refresh_gauges()

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        numbers = _recipient_partitions(partitions)
        self._closing |= numbers
        try:
            self.release_partitions(numbers)
            await self._settle_work(numbers)
            self.store.drop(numbers)
        finally:
            self._closing -= numbers
        self.refresh_gauges()

    def take_partitions(self, numbers: Iterable[int]) -> None:
        self._owned |= set(numbers)
        self._update_shares()

    def release_partitions(self, numbers: Iterable[int]) -> None:
        self._owned -= set(numbers)
        self._update_shares()

    def _update_shares(self) -> None:
        """Each instance takes the share of an account's limit its partitions stand for."""
        share = min(1.0, len(self._owned) / RECIPIENTS.partitions)
        for account, limiter in self._limiters.items():
            limiter.set_share(share)
            metrics.RATE_LIMIT.labels(account).set(limiter.limit / limiter.window_s)

    async def _settle_work(self, partitions: set[int] | None) -> None:
        """Stop the work of ``partitions`` (None: all): what wrote no intent yet is cancelled,
        calls in flight are waited for so that their outcome is recorded."""

        def mine(partition: int) -> bool:
            return partitions is None or partition in partitions

        for (partition, _), task in list(self._timer_work.items()):
            if mine(partition):
                task.cancel()
        for attempt in list(self._attempts.values()):
            if mine(attempt.partition) and not attempt.job.committed:
                attempt.task.cancel()
        waiting: list[asyncio.Task[Any]] = [
            task for (partition, _), task in self._timer_work.items() if mine(partition)
        ]
        waiting += [a.task for a in self._attempts.values() if mine(a.partition)]
        if not waiting:
            return
        deadline = self.settings.sender.runner.shutdown_deadline_s
        _, unfinished = await asyncio.wait(waiting, timeout=deadline)
        if unfinished:
            # Kafka has been away for the whole deadline: these outcomes are lost here and
            # will read "outcome unknown after restart" (the intents are on Kafka).
            log.error(
                "%s: %d send(s) still unrecorded after %gs; giving up on them",
                NAME,
                len(unfinished),
                deadline,
            )
            for task in unfinished:
                task.cancel()
            await asyncio.wait(unfinished)

    # -- records -------------------------------------------------------------------------------

    async def handle(self, record: Record) -> list[OutRecord]:
        try:
            message = decode(RecipientMessage, record.value)
        except SchemaError as exc:
            raise PoisonRecord(str(exc)) from None
        await self._ready(record.partition)
        await self.process(record.partition, message)
        return []

    async def process(self, partition: int, message: RecipientMessage) -> None:
        """One message from ``sms.recipients`` (new, redelivered or replayed)."""
        message_id = message.context.message_id
        async with self.locks.hold(partition, message_id):
            await self._after_attempt(message_id)
            entry = self.store.get_entry(partition, message_id)
            if entry is None:
                await self._advance(partition, SendState.fresh(message))
                return
            state = SendState.from_value(entry.value)
            if state.phase == "done":
                metrics.DUPLICATE_RECORDS.inc()
                if state.dispatch is not None:
                    await self._publish_persistently(self._dispatch_outputs(state.dispatch))
            elif state.phase == "sending":
                await self._recover(partition, state, cause="restart")
            # parked: its timer sends it

    async def _ready(self, partition: int) -> None:
        if partition in self._closing:
            raise PartitionNotReady(f"{RECIPIENTS.name}[{partition}] is being revoked")
        if not self.store.is_ready(partition):
            await self.store.restore({partition})

    async def _after_attempt(self, message_id: str) -> None:
        """Wait for a call of this message still in flight here (its caller was cancelled)."""
        while (attempt := self._attempts.get(message_id)) is not None:
            await asyncio.wait([attempt.task])

    # -- the decisions -----------------------------------------------------------------------

    async def _advance(self, partition: int, state: SendState) -> None:
        """Take a message not sent yet as far as it goes now: sent, failed, or parked."""
        while True:
            message = _message(state)
            now = self.clock()
            tenant = self.settings.tenants.get(message.context.tenant)
            if tenant is None:
                detail = f"unknown tenant {message.context.tenant!r}"
                await self._fail(partition, state, SubStatus.NO_ROUTE, detail, dead_letter=True)
                return
            expiry = expires_at(message, tenant.validity_s).timestamp()
            if now > expiry:
                detail = f"older than the validity of {tenant.validity_s:g}s"
                await self._fail(partition, state, SubStatus.EXPIRED, detail)
                return
            effect = self._effect(message)
            if effect is Effect.CANCEL:
                await self._cancel(partition, state)
                return
            due = due_at(message).timestamp()
            if due > now:
                await self._park(partition, state, due, "scheduled")
                return
            if effect is Effect.HOLD:
                await self._hold(partition, state, expiry)
                return
            if state.park_reason == "held":
                _RELEASED.inc()
                log.debug(
                    "released %s: campaign resumed",
                    mask_number(message.destination),
                    extra={"message_id": message.context.message_id},
                )
            if self._opted_out(message):
                await self._fail(partition, state, SubStatus.OPTED_OUT, "recipient opted out")
                return
            routes = [r for r in routes_for(tenant, message.destination) if self._usable(r)]
            if not routes:
                detail = "no route serves this destination"
                await self._fail(partition, state, SubStatus.NO_ROUTE, detail, dead_letter=True)
                return
            choice = self._choose(state, routes)
            if isinstance(choice, Exhausted):
                tried = ", ".join(state.given_up) or "none"
                detail = f"every route failed (tried {tried}); last error: {state.last_error}"
                await self._fail(
                    partition, state, SubStatus.PROVIDER_ERROR, detail, dead_letter=True
                )
                return
            if isinstance(choice, WaitForCircuit):
                wall = now + max(0.0, choice.until - self.monotonic())
                expiry = expires_at(message, tenant.validity_s).timestamp()
                await self._park(partition, state, min(wall, expiry + 0.001), "circuit")
                return
            if state.account != choice.route.provider:
                state.account, state.attempt = choice.route.provider, 0
            following = await self._run_attempt(partition, state, tenant)
            if following.state is None:
                return
            state = following.state

    def _choose(
        self, state: SendState, routes: list[Route]
    ) -> UseRoute | WaitForCircuit | Exhausted:
        if state.resend and state.account:
            # The identical call again, on the same account, or nothing (state.py).
            until = self._blocked_until(state.account)
            pinned = next((r for r in routes if r.provider == state.account), None)
            if pinned is None:
                return Exhausted()
            return UseRoute(pinned) if until is None else WaitForCircuit(until)
        return choose_route(routes, state.given_up, self._blocked_until)

    def _blocked_until(self, account: str) -> float | None:
        return self._breakers[account].blocked_until(self.monotonic())

    def _usable(self, route: Route) -> bool:
        provider = self.settings.providers.get(route.provider)
        return provider is not None and (
            route.provider in self._given_providers or provider.kind in PROVIDER_KINDS
        )

    def _effect(self, message: RecipientMessage) -> Effect:
        if self._gate is None:
            raise RuntimeError("Dispatcher.start() was not called (no campaign controls)")
        return self._gate.effect(message.context.tenant, message.context.campaign_id)

    def _opted_out(self, message: RecipientMessage) -> bool:
        """The opt-out list stops the message (``optouts.py`` decides)."""
        opt_outs, last_inbound = self._opt_outs, self._last_inbound
        if opt_outs is None or last_inbound is None:
            raise RuntimeError("Dispatcher.start() was not called (no opt-out list)")
        key = recipient_key(message.context.tenant, message.destination)
        verdict = opt_out_verdict(
            message,
            opt_outs.get(key),
            lambda: last_inbound.get(key),
            self.settings.sender.reply_window_s,
        )
        if verdict is OptOutVerdict.SEND_AUTO_REPLY:
            log.info(
                "auto reply to opted-out %s let through: the customer wrote to us lately",
                mask_number(message.destination),
                extra={"message_id": message.context.message_id},
            )
        return verdict is OptOutVerdict.SUPPRESS

    # -- one attempt: intent, provider call, outcome -------------------------------------------

    async def _run_attempt(self, partition: int, state: SendState, tenant: TenantSettings) -> _Next:
        """The attempt runs in a task of its own: once its intent is written, cancelling the
        caller (a drain, a stop) no longer stops it, so its outcome is always recorded."""
        message_id = state.message_id
        job = self._job(partition, state, tenant)
        task = asyncio.create_task(self._attempt(partition, state, job))
        self._attempts[message_id] = _Attempt(partition, task, job)

        def forget(finished: asyncio.Task[_Next]) -> None:
            attempt = self._attempts.get(message_id)
            if attempt is not None and attempt.task is finished:
                del self._attempts[message_id]

        task.add_done_callback(forget)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not job.committed:
                task.cancel()
            raise

    def _job(self, partition: int, state: SendState, tenant: TenantSettings) -> SendJob:
        message = _message(state)
        message_id = message.context.message_id
        provider = self.settings.providers[state.account]
        sms = OutboundSms(
            message_id=message_id,
            destination=message.destination,
            text=message.text,
            sender_id=message.sender_id or tenant.default_sender_id,
        )
        cost = count_segments(sms.text).segments if provider.rate_limit_unit == "segments" else 1
        stored_reason = state.park_reason

        def prepare_intent(call: list[str]) -> list[OutRecord]:
            state.phase = "sending"
            state.park_reason = None
            state.attempt += 1
            state.attempts += 1
            state.call = list(call)
            # Only Kafka gets the intent: nothing in this process reads it (an attempt in flight
            # is known in memory), only a restore after a crash does. The local file keeps the
            # previous state until the outcome replaces it, so there is nothing to undo.
            lease = self.clock() + self.lease_s
            return self._put(partition, state, lease, stored_reason, local=False)

        def undo_intent() -> None:
            if stored_reason is not None:
                self._restore_marker(partition, message, stored_reason)

        return SendJob(
            sms,
            cost,
            prepare_intent,
            undo_intent,
            alone=state.resend,
            withheld=lambda: self._effect(message) is not Effect.SEND,
            dry_run=tenant.dry_run,
        )

    async def _attempt(self, partition: int, state: SendState, job: SendJob) -> _Next:
        try:
            try:
                result = await self._account(state.account).send(job)
            except CircuitOpen:
                return _Next(state)  # nothing was written: choose again
            if isinstance(result, Withheld):
                return _Next(_withheld(state, result))
            return await self._settle(partition, state, job, result)
        finally:
            job.outcome_recorded()

    async def _settle(
        self, partition: int, state: SendState, job: SendJob, result: SendResult
    ) -> _Next:
        """Record what the provider said; returns the state to go on with at once, if any."""
        account = state.account
        sms = job.sms
        state.resend = False
        if isinstance(result, SendAccepted):
            dispatch = self._accepted(state, sms, result, dry_run=job.dry_run)
            await self._finish(partition, state, dispatch)
            return _Next()
        error = result
        state.last_error = scrub(error.detail)[:300]
        state.last_status_code = error.status_code
        provider = self._account(account).provider
        if error.maybe_accepted:
            if self._may_resend(type(provider), state) and self.schedule.may_retry(state.attempt):
                state.resend = True
                if await self._park_retry(partition, state, error):
                    return _Next()
                state.resend = False
            metrics.UNKNOWN_OUTCOMES.labels(account, "call").inc()
            detail = (
                f"outcome unknown: {state.last_error} (the call to {account} may have reached "
                "the provider; not sent again to avoid a double send)"
            )
            await self._fail(partition, state, SubStatus.PROVIDER_ERROR, detail, account)
            return _Next()
        if not error.retryable:
            await self._fail(partition, state, error.sub_status, state.last_error, account)
            return _Next()
        if self.schedule.may_retry(state.attempt) and await self._park_retry(
            partition, state, error
        ):
            return _Next()
        # This route is used up: the next one, at once (recorded first, so that a crash now
        # cannot leave the intent of a call that is known to have failed).
        metrics.FAILOVERS.labels(account).inc()
        log.info(
            "giving up on %s after %d attempt(s): %s",
            account,
            state.attempt,
            state.last_error,
            extra={"message_id": sms.message_id},
        )
        state.given_up.append(account)
        state.account, state.attempt = "", 0
        await self._park(partition, state, self.clock(), "retry")
        return _Next(state)

    async def _park_retry(self, partition: int, state: SendState, error: SendError) -> bool:
        """Park for another attempt on this route; False when it would land past validity."""
        message = _message(state)
        tenant = self.settings.tenants.get(message.context.tenant)
        validity = tenant.validity_s if tenant is not None else _DEFAULT_VALIDITY_S
        delay = self.schedule.delay(state.attempt, error.retry_after_s)
        due = self.clock() + delay
        if due > expires_at(message, validity).timestamp():
            return False
        metrics.RETRIES.labels(state.account).inc()
        log.debug(
            "send via %s failed (%s); attempt %d again in %.2fs",
            state.account,
            state.last_error,
            state.attempt + 1,
            delay,
            extra={"message_id": message.context.message_id},
        )
        await self._park(partition, state, due, "retry")
        return True

    def _may_resend(self, provider: type[Provider] | None, state: SendState) -> bool:
        """An identical call can be recognised by the provider: it de-duplicates resent calls
        and this message was a call of its own."""
        return (
            provider is not None
            and provider.deduplicates_resends
            and state.call == [state.message_id]
        )

    def _provider_type(self, account: str) -> type[Provider] | None:
        given = self._given_providers.get(account)
        if given is not None:
            return type(given)
        settings = self.settings.providers.get(account)
        if settings is None or settings.kind not in PROVIDER_KINDS:
            return None
        return provider_class(settings.kind)

    async def _recover(self, partition: int, state: SendState, cause: str) -> None:
        """An intent without an outcome, orphaned by a crash (see the module docstring)."""
        message_id = state.message_id
        account = state.account
        if self._may_resend(self._provider_type(account), state) and self.schedule.may_retry(
            state.attempt
        ):
            log.warning(
                "resending the identical call to %s after a restart (the provider de-duplicates)",
                account,
                extra={"message_id": message_id},
            )
            state.phase, state.resend = "parked", True
            await self._advance(partition, state)
            return
        metrics.UNKNOWN_OUTCOMES.labels(account or "unknown", cause).inc()
        detail = (
            f"outcome unknown after restart: the call to {account} (attempt {state.attempt}) "
            "may have reached the provider; not sent again to avoid a double send"
        )
        await self._fail(partition, state, SubStatus.PROVIDER_ERROR, detail, account)

    # -- outcomes ------------------------------------------------------------------------------

    def _accepted(
        self, state: SendState, sms: OutboundSms, accepted: SendAccepted, *, dry_run: bool
    ) -> DispatchRecord:
        message = _message(state)
        segments = count_segments(sms.text)
        _SEGMENTS[segments.encoding].inc(segments.segments)
        if dry_run:
            kind, sub_status = DryRun.kind, _DRY_RUN_SENT
            metrics.DISPATCHES.labels("accepted", sub_status).inc()
        else:
            kind, sub_status = self._account(state.account).provider.kind, SubStatus.SENT
            _ACCEPTED.inc()
        log.debug(
            "sent %s via %s as %s",
            mask_number(message.destination),
            state.account,
            accepted.provider_message_id,
            extra={"message_id": sms.message_id, "segments": segments.segments},
        )
        return DispatchRecord(
            context=message.context,
            correlation_key=accepted.correlation_key,
            outcome="accepted",
            sub_status=sub_status,
            provider_kind=kind,
            provider_account=state.account,
            provider_message_id=accepted.provider_message_id,
            destination=message.destination,
            segments=segments.segments,
            dispatched_at=utcnow(),
            sender_id=sms.sender_id,
        )

    async def _fail(
        self,
        partition: int,
        state: SendState,
        sub_status: str,
        detail: str,
        account: str = "",
        *,
        dead_letter: bool = False,
    ) -> None:
        message = _message(state)
        metrics.DISPATCHES.labels("failed", sub_status).inc()
        # Opt-outs and expiries are the business working as intended; the rest needs a look.
        level = logging.INFO if sub_status in _EXPECTED_FAILURES else logging.WARNING
        log.log(
            level,
            "not sent to %s: %s (%s)",
            mask_number(message.destination),
            sub_status,
            detail,  # JsonFormatter masks the digit runs a provider's text may echo
            extra={"message_id": message.context.message_id, "tenant": message.context.tenant},
        )
        provider = self.settings.providers.get(account) if account else None
        dispatch = DispatchRecord(
            context=message.context,
            correlation_key=unsent_correlation_key(message.context.message_id),
            outcome="failed",
            sub_status=sub_status,
            provider_kind=provider.kind if provider is not None else "",
            provider_account=account,
            destination=message.destination,
            detail=detail,
            dispatched_at=utcnow(),
            sender_id=message.sender_id,
        )
        letter = None
        if dead_letter:
            shared_metrics.DEAD_LETTERS.labels(NAME, RECIPIENTS.name).inc()
            letter = DeadLetter(
                source_topic=RECIPIENTS.name,
                stage=NAME,
                reason=f"{sub_status}: {detail}",
                key=recipient_key(message.context.tenant, message.destination),
                payload=message.to_bytes().decode("utf-8"),
                attempts=state.attempts,
                status_code=state.last_status_code,
                response_excerpt=state.last_error,
                redrive_topic=RECIPIENTS.name,
            )
        await self._finish(partition, state, dispatch, letter)

    async def _finish(
        self,
        partition: int,
        state: SendState,
        dispatch: DispatchRecord,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        """Outcome first, then the dispatch: a stored outcome always has its dispatch record
        published eventually (a redelivered record republishes it)."""
        message = _message(state)
        tenant = self.settings.tenants.get(message.context.tenant)
        validity = tenant.validity_s if tenant is not None else _DEFAULT_VALIDITY_S
        forget_at = (
            max(self.clock(), expires_at(message, validity).timestamp())
            + self.settings.sender.keep_outcome_s
        )
        stored_reason = state.park_reason
        state.phase, state.park_reason, state.call = "done", None, []
        state.dispatch, state.message = dispatch, None
        await self._publish_persistently(self._put(partition, state, forget_at, stored_reason))
        outputs = self._dispatch_outputs(dispatch)
        if dead_letter is not None:
            outputs.append(OutRecord(DEAD_LETTERS, dead_letter.key or "", dead_letter))
        await self._publish_persistently(outputs)

    def _dispatch_outputs(self, dispatch: DispatchRecord) -> list[OutRecord]:
        """A dispatch record, and for a dry run's accepted one the report the provider would
        have called back with (the same every time, so a republished pair changes nothing)."""
        outputs = [OutRecord(DISPATCHES, dispatch.correlation_key, dispatch)]
        if dispatch.provider_kind == DryRun.kind and dispatch.outcome == "accepted":
            tenant = self.settings.tenants.get(dispatch.context.tenant)
            outcomes = tenant.dry_run_outcomes if tenant is not None else _DEFAULT_DRY_RUN_OUTCOMES
            report = dryrun.delivery_report(dispatch, outcomes)
            outputs.append(OutRecord(PROVIDER_EVENTS, report.correlation_key, report))
        return outputs

    async def _cancel(self, partition: int, state: SendState) -> None:
        message = _message(state)
        assert self._gate is not None  # _effect answered
        detail = self._gate.cancel_detail(message.context.tenant, message.context.campaign_id)
        _CANCELLED.inc()
        await self._fail(partition, state, SubStatus.CANCELLED, detail)

    async def _hold(self, partition: int, state: SendState, expiry: float) -> None:
        """Park until the campaign is resumed or cancelled; its validity's end is the due time
        (then it is reported expired, resumed or not)."""
        if state.park_reason != "held":
            _HELD.inc()
            message = _message(state)
            log.debug(
                "held %s: campaign paused",
                mask_number(message.destination),
                extra={"message_id": message.context.message_id},
            )
        await self._park(partition, state, expiry + 0.001, "held")

    async def _park(self, partition: int, state: SendState, due: float, reason: ParkReason) -> None:
        stored_reason = state.park_reason
        state.phase, state.park_reason, state.call = "parked", reason, []
        await self._publish_persistently(self._put(partition, state, due, stored_reason))
        if reason == "scheduled":
            log.debug(
                "parked until %s",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due)),
                extra={"message_id": state.message_id},
            )

    # -- the store -----------------------------------------------------------------------------

    def _put(
        self,
        partition: int,
        state: SendState,
        due: float | None,
        stored_reason: ParkReason | None,
        *,
        local: bool = True,
    ) -> list[OutRecord]:
        """Store ``state`` (and its parked marker) and return the changelog records.

        ``local=False``: the changelog record only; the local file keeps its entry.
        """
        message_id = state.message_id
        value = state.to_value()
        if local:
            records = [self.store.put(partition, message_id, value, due)]
        else:
            change = StateChange(value=value, due_at=due)
            records = [OutRecord(SENDER_STATE, message_id, change, partition=partition)]
        reason = state.park_reason if state.phase == "parked" else None
        if reason != stored_reason:
            if stored_reason is not None:
                marker = parked_key(stored_reason, message_id)
                records.append(self.store.put(partition, marker, None))
            if reason is not None:
                marker_value = ParkedMarker.of(_message(state)).to_value()
                records.append(
                    self.store.put(partition, parked_key(reason, message_id), marker_value)
                )
        return records

    def _restore_marker(
        self, partition: int, message: RecipientMessage, reason: ParkReason
    ) -> None:
        """Put back a parked marker an unpublished intent removed (Kafka never saw it go)."""
        marker = parked_key(reason, message.context.message_id)
        with contextlib.suppress(PartitionNotReady):
            self.store.put(partition, marker, ParkedMarker.of(message).to_value())

    async def _publish(self, records: Sequence[OutRecord]) -> None:
        if self._outbox is None:
            raise RuntimeError(f"{NAME} handler used before start()")
        await self._outbox.publish(records)

    async def _publish_persistently(self, records: list[OutRecord]) -> None:
        """Publish until Kafka acknowledges: what these records say has already happened."""
        attempt = 0
        while True:
            try:
                await self._publish(records)
                return
            except KafkaUnavailable as exc:
                attempt += 1
                log.warning("%s: publish failed (%s); retrying", NAME, exc)
                await asyncio.sleep(min(30.0, 0.25 * 2 ** min(attempt, 7)))

    # -- accounts ------------------------------------------------------------------------------

    def _breaker(self, account: str, provider: ProviderSettings) -> CircuitBreaker:
        gauge = metrics.CIRCUIT_OPEN.labels(account)
        gauge.set(0)

        def on_change(state: CircuitState) -> None:
            gauge.set(0 if state == "closed" else 1)
            log.warning("circuit of %s is now %s", account, state.replace("_", "-"))

        return CircuitBreaker(
            failure_rate=provider.circuit_failure_rate,
            min_calls=provider.circuit_min_calls,
            window_s=provider.circuit_window_s,
            cool_down_s=provider.circuit_cool_down_s,
            clock=self.monotonic,
            on_change=on_change,
        )

    def _account(self, account: str) -> AccountSender:
        sender = self._accounts.get(account)
        if sender is None:
            settings = self.settings.providers[account]
            provider = self._given_providers.get(account)
            if provider is None:
                if self._session is None:
                    raise RuntimeError("Dispatcher.start() was not called")
                provider = provider_class(settings.kind)(
                    account, settings, self._session, callback_url(self.settings, account)
                )
            sender = AccountSender(
                account,
                provider,
                max_in_flight=settings.max_in_flight,
                publish=self._publish,
                breaker=self._breakers[account],
                limiter=self._limiters.get(account),
                dry_run=DryRun(account, settings),
                batch_window_s=self.settings.sender.batch_window_s,
            )
            self._accounts[account] = sender
        return sender

    # -- timers --------------------------------------------------------------------------------

    def fire_timers(self, now: float) -> list[asyncio.Task[None]]:
        """Start work on every parked entry due at ``now``, then on the messages the campaign
        controls released; returns the tasks started."""
        started: list[asyncio.Task[None]] = []
        for partition in self.store.partitions():
            if partition in self._closing:
                continue
            for key, _ in self.store.due(partition, now, limit=_TIMER_BATCH):
                if len(self._timer_work) >= self._max_timer_work:
                    return started
                task = self._start_timer_work(partition, key, now, released=False)
                if task is not None:
                    started.append(task)
        for slot in list(self._releases):
            if len(self._timer_work) >= self._max_timer_work:
                break
            partition, key = slot
            if partition in self._closing or not self.store.is_ready(partition):
                del self._releases[slot]  # revoked: its new owner looks at it
                continue
            task = self._start_timer_work(partition, key, now, released=True)
            if task is not None:
                del self._releases[slot]
                started.append(task)
        return started

    def _start_timer_work(
        self, partition: int, key: str, now: float, *, released: bool
    ) -> asyncio.Task[None] | None:
        slot = (partition, key)
        if slot in self._timer_work or key in self._attempts:
            return None
        if self.locks.is_held(partition, key):
            return None  # a record of this message is being handled; next pass
        task = asyncio.create_task(self._on_due(partition, key, now, released=released))
        self._timer_work[slot] = task
        task.add_done_callback(self._timer_work_done(slot))
        return task

    def _timer_work_done(self, slot: tuple[int, str]) -> Callable[[asyncio.Task[None]], None]:
        def forget(finished: asyncio.Task[None]) -> None:
            if self._timer_work.get(slot) is finished:
                del self._timer_work[slot]

        return forget

    async def run_due(self, now: float) -> int:
        """Fire the timers due at ``now`` and wait for that work (tests, tools)."""
        tasks = self.fire_timers(now)
        if tasks:
            await asyncio.wait(tasks)
        return len(tasks)

    async def _on_due(self, partition: int, key: str, now: float, *, released: bool) -> None:
        """``released``: the campaign controls ended the wait of a parked message early."""
        try:
            async with self.locks.hold(partition, key):
                await self._after_attempt(key)
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
                    await self._publish_persistently([self.store.put(partition, key, None)])
        except PartitionNotReady:
            return  # revoked meanwhile
        except KafkaUnavailable as exc:
            log.warning("%s: parked message not sent (%s); next pass retries", NAME, exc)
        except Exception:
            log.exception("%s: parked message failed", NAME, extra={"message_id": key})

    async def _run_timers(self) -> None:
        interval = self.settings.sender.timer_interval_s
        await run_timer_passes(self._run_timer_pass, lambda: asyncio.sleep(interval), name=NAME)

    async def _run_timer_pass(self) -> None:
        """One pass of the timer loop: it only starts work (each piece handles its own errors)."""
        if self._rescan and (self._scan_task is None or self._scan_task.done()):
            self._scan_task = asyncio.create_task(
                self._rescan_and_fire(), name=f"{NAME}-control-scan"
            )
        self.fire_timers(self.clock())
        if self.monotonic() - self._gauges_refreshed_at >= _GAUGE_INTERVAL_S:
            self._gauges_refreshed_at = self.monotonic()
            self.refresh_gauges()

    # -- campaign controls ---------------------------------------------------------------------

    def controls_changed(self, keys: Sequence[str] = ()) -> None:
        """The campaign controls changed (the control table's ``on_change``): every answer is
        asked afresh, at once, and this instance's parked messages are looked at again."""
        if self._gate is not None:
            self._gate.changed()
        self._rescan |= set(self.store.partitions())
        # The catch-up at start is not news; what changes afterwards is worth a line.
        if self._control_table is not None and self._control_table.ready:
            for key in keys:
                control = self._control_table.get(key)
                action = control.get("action") if control is not None else "(removed)"
                log.info("campaign control %s: %s", key, action)

    async def _rescan_and_fire(self) -> None:
        try:
            if await self.rescan():
                self.fire_timers(self.clock())
        except Exception:
            log.exception("%s: looking at parked messages after a control change failed", NAME)

    async def rescan(self) -> int:
        """Queue for the timer every parked message the controls now release (a resumed hold,
        any wait of a cancelled campaign) on the partitions due for a look; returns how many."""
        partitions, self._rescan = self._rescan, set()
        queued = 0
        for partition in sorted(partitions):
            try:
                queued += await self._scan_parked(partition)
            except PartitionNotReady:
                continue  # revoked meanwhile
        if queued:
            log.info("%s: %d parked message(s) released by campaign controls", NAME, queued)
        return queued

    async def _scan_parked(self, partition: int) -> int:
        assert self._gate is not None, "scanned before start()"
        queued = 0
        after = ""
        while True:
            if partition in self._closing:
                return queued
            page = self.store.scan_prefix(partition, PARKED_PREFIX, after=after, limit=_SCAN_PAGE)
            for key, value in page:
                reason, message_id = parse_parked_key(key)
                marker: ParkedMarker | None = ParkedMarker.model_validate(value)
                if marker is not None and not marker.tenant:
                    marker = self._marker_of(partition, message_id)
                if marker is None:
                    continue
                effect = self._gate.effect(marker.tenant, marker.campaign_id)
                if released_by(effect, reason) and (partition, message_id) not in self._releases:
                    self._releases[(partition, message_id)] = None
                    queued += 1
            if len(page) < _SCAN_PAGE:
                return queued
            after = page[-1][0]
            await asyncio.sleep(0)  # a long scan must not hold up the sends of others

    def _released(self, state: SendState) -> bool:
        """Do the controls in force end this parked message's wait now?"""
        if state.phase != "parked" or state.message is None:
            return False
        return released_by(self._effect(state.message), state.park_reason or "")

    def _marker_of(self, partition: int, message_id: str) -> ParkedMarker | None:
        """Whose message it is, read from its state (a marker written without it)."""
        value = self.store.get(partition, message_id)
        if value is None:
            return None
        state = SendState.from_value(value)
        return ParkedMarker.of(state.message) if state.message is not None else None

    def refresh_gauges(self) -> None:
        """Set the gauges from the store's running counts (no query)."""
        partitions = self.store.partitions()
        for reason, prefix in _PARKED_PREFIXES.items():
            metrics.PARKED.labels(reason).set(
                sum(self.store.count_prefix(p, prefix) for p in partitions)
            )
        metrics.STATE_ENTRIES.set(sum(self.store.count(p) for p in partitions))
        for account, limiter in self._limiters.items():
            metrics.RATE_LIMIT.labels(account).set(limiter.limit / limiter.window_s)


def _withheld(state: SendState, withheld: Withheld) -> SendState:
    """The state to decide again with after the controls stopped its call: an intent already
    written is undone in memory (the next decision writes the state that replaces it)."""
    if withheld.after_intent:
        state.attempt -= 1
        state.attempts -= 1
        state.call = []
    return state


def _message(state: SendState) -> RecipientMessage:
    if state.message is None:
        raise ValueError("a send state without its message")
    return state.message


def _recipient_partitions(partitions: Iterable[TopicPartition]) -> set[int]:
    return {tp.partition for tp in partitions if tp.topic == RECIPIENTS.name}
