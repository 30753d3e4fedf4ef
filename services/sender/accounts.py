"""One provider account as the sender uses it: calls in flight, rate limit, circuit, bulk calls.

``AccountSender.send(job)`` sends one message and returns its ``SendResult``: a slot among the
account's ``max_in_flight`` calls, the circuit breaker's permission (``CircuitOpen``), a send
time booked from the rate limiter, the intent on Kafka, then at the booked time the provider call
(a bulk call for jobs gathered over ``batch_window_s``). A job whose campaign was paused or
cancelled meanwhile is answered ``Withheld``. A job is ``committed`` from its intent on, and its
slot stays taken until its outcome is recorded. The steps and why: docs/sending.md, "One
provider account".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.sender import metrics
from services.sender.fairness import FairQueue, Flow, Ticket
from services.sender.ratelimit import SlidingWindowLimiter
from shared.circuit import CircuitBreaker
from shared.kafka.clients import OutRecord
from shared.kafka.unit_of_work import UnitOfWork
from shared.providers.base import OutboundSms, Provider, SendAccepted, SendError, SendResult

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[OutRecord]], Awaitable[None]]


class CircuitOpen(Exception):
    """The account's circuit breaker refused the call; nothing was sent."""


@dataclass(frozen=True)
class Withheld:
    """The job was left out of its call because it may no longer go; nothing was sent.
    ``after_intent``: its intent was already on Kafka (its outcome must still be recorded)."""

    after_intent: bool


class CallSlot:
    """One of the account's ``max_in_flight`` slots, held by a call until every message in it
    has its outcome recorded: so that no more than ``max_in_flight`` calls can ever be caught
    between intent and outcome by a crash."""

    def __init__(self, release: Callable[[], None], holders: int) -> None:
        self._release = release
        self._holders = holders
        if holders <= 0:
            release()

    def release_one(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._release()


@dataclass(eq=False)
class SendJob:
    sms: OutboundSms
    cost: float
    # The ``sending`` state for a call carrying these message ids: the changes it stored and
    # the records to publish, undone if they are not acknowledged.
    prepare_intent: Callable[[list[str]], UnitOfWork]
    alone: bool = False
    # Asked at the call's turn, before the intent and right before the provider call: True
    # when the message may not go any more (its campaign was paused or cancelled meanwhile).
    withheld: Callable[[], bool] = lambda: False
    dry_run: bool = False
    flow: Flow = field(default_factory=lambda: Flow("", "", priority=False))
    ticket: Ticket = field(default_factory=lambda: Ticket(lambda: None))
    committed: bool = False
    slot: CallSlot | None = None
    outcome_done: bool = False
    result: asyncio.Future[SendResult | Withheld] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def outcome_recorded(self) -> None:
        """The caller recorded this message's outcome (or gave up on it): its share of the
        call's slot goes back."""
        if self.outcome_done:
            return
        self.outcome_done = True
        if self.slot is not None:
            self.slot.release_one()


class AccountSender:
    def __init__(
        self,
        account: str,
        provider: Provider,
        *,
        max_in_flight: int,
        publish: Publish,
        breaker: CircuitBreaker,
        limiter: SlidingWindowLimiter | None = None,
        # Called instead of ``provider`` for dry-run jobs (``shared.providers.dryrun``).
        dry_run: Provider,
        batch_window_s: float = 0.02,
        # How early a rate-limited call is woken before its send time to record its intent;
        # longer than Kafka's usual acknowledgement, short enough to keep the crash window small.
        intent_lead_s: float = 0.25,
        # Whose turn it is (fairness.py); None: first come, first served.
        fair: FairQueue | None = None,
    ) -> None:
        self.account = account
        self.fair = fair or FairQueue(
            window=max(4, provider.max_batch), tenant_weight=_equal, campaign_weight=_equal
        )
        self.intent_lead_s = intent_lead_s
        self.provider = provider
        self.dry_run = dry_run
        self.publish = publish
        self.breaker = breaker
        self.limiter = limiter
        self.batch_window_s = batch_window_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._slot_time = metrics.slot_time(account)
        metrics.CALL_SLOTS.labels(account).set(max_in_flight)
        self._gathering: dict[tuple[bool, str, str], list[SendJob]] = {}
        self._flushers: set[asyncio.Task[None]] = set()
        # Label lookups cost more than the increments: done once per account.
        self._throttled = metrics.THROTTLED.labels(account)
        self._throttle_wait = metrics.THROTTLE_WAIT.labels(account)
        self._late = metrics.LATE.labels(account)
        self._duration = metrics.PROVIDER_SEND_DURATION.labels(account)
        self._batch_size = metrics.PROVIDER_BATCH_SIZE.labels(account)
        self._results = {
            label: metrics.PROVIDER_SENDS.labels(account, label)
            for label in ("accepted", "rejected", "retryable", "unknown")
        }

    @property
    def max_batch(self) -> int:
        size = max(1, int(self.provider.max_batch))
        if self.limiter is not None:
            # A call costing more than this instance's limit could only go into an empty window.
            size = min(size, max(1, int(self.limiter.limit)))
        return size

    async def send(self, job: SendJob) -> SendResult | Withheld:
        """Wait for the job's turn (``fairness.py``), then send it: the turn is given back once
        its intent is on Kafka (its send time is booked by then), or when it leaves."""
        waited_from = time.monotonic()
        job.ticket = await self.fair.turn(job.flow, job.cost)
        metrics.TURN_WAIT.labels(_class_of(job.flow)).observe(time.monotonic() - waited_from)
        try:
            return await self._send(job)
        finally:
            job.ticket.release()

    async def _send(self, job: SendJob) -> SendResult | Withheld:
        if self.max_batch == 1 or job.alone:
            results = await self._call([job])
            return results[0] if results else job.result.result()
        self._gather(job)
        try:
            return await asyncio.shield(job.result)
        except asyncio.CancelledError:
            if not job.committed:
                self._withdraw(job)
                job.result.cancel()  # a call already formed leaves it out
            raise

    async def close(self) -> None:
        """Send what is being gathered now and wait for those calls."""
        for key in list(self._gathering):
            self._flush(key)
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)

    # -- gathering (bulk providers) ----------------------------------------------------------

    def _gather(self, job: SendJob) -> None:
        key = _gathering_key(job)
        waiting = self._gathering.setdefault(key, [])
        waiting.append(job)
        if len(waiting) >= self.max_batch:
            self._flush(key)
        elif len(waiting) == 1:
            loop = asyncio.get_running_loop()
            loop.call_later(self.batch_window_s, self._flush_if_waiting, key, job)

    def _flush_if_waiting(self, key: tuple[bool, str, str], first: SendJob) -> None:
        waiting = self._gathering.get(key)
        if waiting and waiting[0] is first:
            self._flush(key)

    def _flush(self, key: tuple[bool, str, str]) -> None:
        jobs = self._gathering.pop(key, [])
        while jobs:
            batch, jobs = jobs[: self.max_batch], jobs[self.max_batch :]
            task = asyncio.create_task(self._call_for(batch), name=f"send-{self.account}")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)

    def _withdraw(self, job: SendJob) -> None:
        key = _gathering_key(job)
        waiting = self._gathering.get(key)
        if waiting is not None and job in waiting:
            waiting.remove(job)
            if not waiting:
                del self._gathering[key]

    async def _call_for(self, jobs: list[SendJob]) -> None:
        """Run one gathered call and hand each job its result (or the reason there is none)."""
        try:
            results = await self._call(jobs)
        except BaseException as exc:
            for job in jobs:
                if not job.result.done():
                    job.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for job, result in zip(jobs, results, strict=True):
            if not job.result.done():
                job.result.set_result(result)

    # -- one provider call --------------------------------------------------------------------

    async def _call(self, jobs: list[SendJob]) -> list[SendResult]:
        """One provider call for ``jobs``; the list is left holding the jobs sent, in the order
        of the results. A job left out has its ``result`` set (``Withheld``) or cancelled."""
        await self._slots.acquire()
        self._slot_time.move(None, metrics.SLOT_BUSY)
        handed_over = False
        try:
            if not self.breaker.allow():
                raise CircuitOpen(self.account)
            try:
                send_at = await self._book(sum(job.cost for job in jobs))
                _withhold(jobs, after_intent=False)
                await self._publish_intents(jobs)
                for job in jobs:
                    job.ticket.release()
            except BaseException:
                self.breaker.release()
                raise
            if not jobs:
                self.breaker.release()
                return []
            if send_at is not None and self.limiter is not None:
                send_at = await self._keep(send_at, sum(job.cost for job in jobs))
            # The last look: nothing but the call itself comes after it.
            withheld = _withhold(jobs, after_intent=True)
            if jobs:
                results = await self._provider_call([job.sms for job in jobs], jobs[0].dry_run)
            else:
                self.breaker.release()
                results = []
            # Withheld jobs wrote an intent too: they keep the slot until it is answered.
            recorded_later = [job for job in (*jobs, *withheld) if not job.outcome_done]
            slot = CallSlot(self._release_slot, len(recorded_later))
            for job in recorded_later:
                job.slot = slot
            handed_over = True
        finally:
            if not handed_over:
                self._release_slot()
        if results:
            self.breaker.record(healthy(results))
        return results

    def _release_slot(self) -> None:
        self._slot_time.move(metrics.SLOT_BUSY, None)
        self._slots.release()

    async def _rate_limited(self, wait: Awaitable[float]) -> float:
        """Await a rate-limit wait with the call's slot counted as ``rate_limited``."""
        self._slot_time.move(metrics.SLOT_BUSY, metrics.SLOT_RATE_LIMITED)
        try:
            return await wait
        finally:
            self._slot_time.move(metrics.SLOT_RATE_LIMITED, metrics.SLOT_BUSY)

    async def _book(self, cost: float) -> float | None:
        """The time the rate limit gives this call; returns early enough to record the intent."""
        if self.limiter is None:
            return None
        asked = self.limiter.clock()
        send_at = await self._rate_limited(self.limiter.acquire(cost, lead_s=self.intent_lead_s))
        waited = send_at - asked
        if waited > 0:
            self._throttled.inc()
            self._throttle_wait.inc(waited)
        return send_at

    async def _keep(self, send_at: float, cost: float) -> float:
        assert self.limiter is not None
        sent_at = await self._rate_limited(self.limiter.keep(send_at, cost))
        if sent_at - send_at > self.limiter.quantum_s:
            self._late.inc()
        return sent_at

    async def _publish_intents(self, jobs: list[SendJob]) -> None:
        # A job withdrawn while it waited for its turn is not part of the call any more.
        jobs[:] = [job for job in jobs if not job.result.done()]
        call = [job.sms.message_id for job in jobs]
        prepared: list[tuple[SendJob, UnitOfWork]] = []
        try:
            for job in jobs:
                job.committed = True
                prepared.append((job, job.prepare_intent(call)))
            await self.publish([record for _, work in prepared for record in work.records])
        except BaseException:
            for job, work in prepared:
                with contextlib.suppress(Exception):
                    work.undo()
                job.committed = False
            raise

    async def _provider_call(self, batch: list[OutboundSms], dry_run: bool) -> list[SendResult]:
        provider = self.dry_run if dry_run else self.provider
        started = time.perf_counter()
        try:
            results = await provider.send(batch)
        except Exception as exc:
            # Provider modules return failures; an exception here is a bug in one. The request
            # may have gone out, so the outcome is unknown rather than retryable.
            log.exception("%s.send raised instead of returning results", provider.kind)
            results = [
                SendError(f"{type(exc).__name__}: {exc}", retryable=False, maybe_accepted=True)
                for _ in batch
            ]
        finally:
            self._duration.observe(time.perf_counter() - started)
            self._batch_size.observe(len(batch))
        if len(results) != len(batch):
            log.error(
                "%s.send returned %d results for %d messages",
                provider.kind,
                len(results),
                len(batch),
            )
            results = [
                SendError(
                    f"{provider.kind} answered {len(results)} results for {len(batch)}",
                    retryable=False,
                    maybe_accepted=True,
                )
                for _ in batch
            ]
        for result in results:
            self._results[result_label(result)].inc()
        return results


def _gathering_key(job: SendJob) -> tuple[bool, str, str]:
    """Jobs that may share a call: same text and sender, and all dry or all real."""
    return job.dry_run, job.sms.text, job.sms.sender_id


def _withhold(jobs: list[SendJob], *, after_intent: bool) -> list[SendJob]:
    """Take the jobs that may no longer go out of ``jobs`` (answering them ``Withheld``) and
    return them. A job already answered (withdrawn by its caller) is left for the caller."""
    withheld = [job for job in jobs if not job.result.done() and job.withheld()]
    if withheld:
        jobs[:] = [job for job in jobs if job not in withheld]
        for job in withheld:
            job.result.set_result(Withheld(after_intent=after_intent))
    return withheld


def _equal(*_: str) -> float:
    return 1.0


def _class_of(flow: Flow) -> str:
    return "priority" if flow.priority else "bulk"


def result_label(result: SendResult) -> str:
    if isinstance(result, SendAccepted):
        return "accepted"
    if result.maybe_accepted:
        return "unknown"
    return "retryable" if result.retryable else "rejected"


def healthy(results: Sequence[SendResult]) -> bool:
    """Did the provider answer like a working provider (whatever it thought of the messages)?"""
    return not any(
        isinstance(result, SendError) and (result.retryable or result.maybe_accepted)
        for result in results
    )
