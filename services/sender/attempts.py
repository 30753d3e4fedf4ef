"""One attempt to send a message: its intent on Kafka, the provider call, then its outcome.

``Attempts`` also holds the provider accounts (``accounts.AccountSender`` each, with its circuit
breaker and its share of the rate limit). An attempt runs in a task of its own, so that once its
intent is written its outcome is always recorded (docs/sending.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.sender import metrics
from services.sender.accounts import AccountSender, CircuitOpen, SendJob, Withheld
from services.sender.fairness import FairQueue, Flow, turn_window
from services.sender.limits import AccountLimits
from services.sender.outcomes import Next, Outcomes
from services.sender.state import SendState, StateWriter, message_of
from shared.circuit import CircuitBreaker, CircuitState
from shared.config import ProviderSettings, Route, Settings, TenantSettings
from shared.contract.segments import count_segments
from shared.http_client import HttpClient
from shared.kafka.unit_of_work import UnitOfWork
from shared.live_config import on_reload
from shared.providers import PROVIDER_KINDS, callback_url, provider_class
from shared.providers.base import OutboundSms, Provider
from shared.providers.dryrun import DryRun

log = logging.getLogger(__name__)

# An intent older than the request timeout plus this margin, with nobody here working on it,
# was orphaned by a crash (the timer finds those whose record was committed long ago).
_LEASE_MARGIN_S = 60.0


@dataclass
class _Attempt:
    partition: int
    task: asyncio.Task[Next]
    job: SendJob


class Attempts:
    def __init__(
        self,
        settings: Settings,
        writer: StateWriter,
        outcomes: Outcomes,
        *,
        providers: Mapping[str, Provider],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``providers``: ready clients by account (others are built on first use)."""
        self.settings = settings
        self.writer = writer
        self.outcomes = outcomes
        self.clock = clock
        self.monotonic = monotonic
        self.lease_s = settings.sender.request_timeout_s + _LEASE_MARGIN_S
        self._runner_slots = settings.sender.runner.max_in_flight
        # The account each campaign was last sent on (lane_limit asks it), the latest 10,000.
        self._flow_accounts: OrderedDict[Flow, str] = OrderedDict()
        self._given_providers = dict(providers)
        self._session: HttpClient | None = None
        self._accounts: dict[str, AccountSender] = {}
        self._retired: set[asyncio.Future[None]] = set()  # replaced by a reload, closing
        self._in_flight: dict[str, _Attempt] = {}
        self.breakers = {
            account: self._breaker(account, provider)
            for account, provider in settings.providers.items()
        }
        self.limits = AccountLimits(settings.providers, monotonic)
        self._known = dict(settings.providers)
        on_reload(self.refresh)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        # Calls in flight are bounded per account (max_in_flight), not by the connection pool.
        self._session = HttpClient(timeout_s=self.settings.sender.request_timeout_s, limit=None)
        for account, provider in self.settings.providers.items():
            if provider.kind not in PROVIDER_KINDS:
                log.error("provider account %s: kind %s is not supported", account, provider.kind)

    async def close(self) -> None:
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
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

    def refresh(self, settings: Settings) -> None:
        """The configuration changed live (shared/live_config.py): an account whose settings
        changed gets a new client for its next call (calls in flight finish on the old one)
        and keeps its rate limiter, with the new limit in force at once over the sends
        already counted; a new account is ready for its first call."""
        for account, provider in settings.providers.items():
            if self._known.get(account) == provider:
                continue
            self._known[account] = provider
            if account not in self.breakers:
                self.breakers[account] = self._breaker(account, provider)
            self.limits.configure(account, provider)
            if (old := self._accounts.pop(account, None)) is not None:
                self._retired.add(asyncio.ensure_future(old.close()))
                self._retired = {task for task in self._retired if not task.done()}
        self.limits.export()

    # -- what the decision asks ----------------------------------------------------------------

    def blocked_until(self, account: str) -> float | None:
        return self.breakers[account].blocked_until(self.monotonic())

    def usable(self, route: Route) -> bool:
        provider = self.settings.providers.get(route.provider)
        return provider is not None and (
            route.provider in self._given_providers or provider.kind in PROVIDER_KINDS
        )

    def fair_queues(self) -> dict[str, FairQueue]:
        """Each account's queue of turns (those used so far)."""
        return {account: sender.fair for account, sender in self._accounts.items()}

    def lane_limit(self, flow: Flow) -> int:
        """How many records of a bulk ``flow`` the runner may hold at once: its fair part of
        what its account keeps waiting, ``[sender] fair_queue_s`` of the account's rate (and
        never more than half the runner's records, so that it can always read ahead)."""
        account = self._flow_accounts.get(flow) or self._first_account(flow.tenant)
        limiter = self.limits.get(account) if account else None
        if account is None or limiter is None:
            return self._runner_slots  # no rate limit: nothing waits for a turn
        queue = self._account(account).fair
        rate = limiter.limit / limiter.window_s
        capacity = max(
            float(queue.window),
            min(rate * self.settings.sender.fair_queue_s, self._runner_slots / 2),
        )
        return max(1, math.ceil(queue.fair_part(flow) * capacity))

    def _first_account(self, tenant: str) -> str | None:
        settings = self.settings.tenants.get(tenant)
        return settings.routes[0].provider if settings is not None else None

    def provider_type(self, account: str) -> type[Provider] | None:
        given = self._given_providers.get(account)
        if given is not None:
            return type(given)
        settings = self.settings.providers.get(account)
        if settings is None or settings.kind not in PROVIDER_KINDS:
            return None
        return provider_class(settings.kind)

    # -- attempts in flight --------------------------------------------------------------------

    def in_flight(self, message_id: str) -> bool:
        return message_id in self._in_flight

    async def finished(self, message_id: str) -> None:
        """Wait for a call of this message still in flight here (its caller was cancelled)."""
        while (attempt := self._in_flight.get(message_id)) is not None:
            await asyncio.wait([attempt.task])

    def settle(self, mine: Callable[[int], bool]) -> list[asyncio.Task[Any]]:
        """Cancel the attempts of the partitions ``mine`` names that wrote no intent yet; returns
        every one of their tasks (those with an intent are left to record their outcome)."""
        for attempt in list(self._in_flight.values()):
            if mine(attempt.partition) and not attempt.job.committed:
                attempt.task.cancel()
        return [a.task for a in self._in_flight.values() if mine(a.partition)]

    # -- one attempt ---------------------------------------------------------------------------

    async def run(
        self,
        partition: int,
        state: SendState,
        tenant: TenantSettings,
        flow: Flow,
        withheld: Callable[[], bool],
    ) -> Next:
        """The attempt runs in a task of its own: once its intent is written, cancelling the
        caller (a drain, a stop) no longer stops it, so its outcome is always recorded.
        ``withheld`` is asked at the call's turn (the campaign was paused or cancelled)."""
        message_id = state.message_id
        job = self._job(partition, state, tenant, flow, withheld)
        task = asyncio.create_task(self._attempt(partition, state, job))
        self._in_flight[message_id] = _Attempt(partition, task, job)

        def forget(finished: asyncio.Task[Next]) -> None:
            attempt = self._in_flight.get(message_id)
            if attempt is not None and attempt.task is finished:
                del self._in_flight[message_id]

        task.add_done_callback(forget)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not job.committed:
                task.cancel()
            raise

    def _job(
        self,
        partition: int,
        state: SendState,
        tenant: TenantSettings,
        flow: Flow,
        withheld: Callable[[], bool],
    ) -> SendJob:
        message = message_of(state)
        provider = self.settings.providers[state.account]
        self._flow_accounts[flow] = state.account
        self._flow_accounts.move_to_end(flow)
        if len(self._flow_accounts) > 10_000:
            self._flow_accounts.popitem(last=False)
        sms = OutboundSms(
            message_id=message.context.message_id,
            destination=message.destination,
            text=message.text,
            sender_id=message.sender_id or tenant.default_sender_id,
        )
        cost = count_segments(sms.text).segments if provider.rate_limit_unit == "segments" else 1
        stored_reason = state.park_reason

        def prepare_intent(call: list[str]) -> UnitOfWork:
            state.phase = "sending"
            state.park_reason = None
            state.attempt += 1
            state.attempts += 1
            state.call = list(call)
            lease = self.clock() + self.lease_s
            return self.writer.intent(partition, state, lease, stored_reason)

        return SendJob(
            sms,
            cost,
            prepare_intent,
            alone=state.resend,
            withheld=withheld,
            dry_run=tenant.dry_run,
            flow=flow,
        )

    async def _attempt(self, partition: int, state: SendState, job: SendJob) -> Next:
        try:
            sender = self._account(state.account)
            try:
                result = await sender.send(job)
            except CircuitOpen:
                return Next(state)  # nothing was written: choose again
            if isinstance(result, Withheld):
                return Next(_withheld(state, result))
            return await self.outcomes.settle(partition, state, job, result, sender.provider)
        finally:
            job.outcome_recorded()

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
                    raise RuntimeError("the sender's start() was not called")
                provider = provider_class(settings.kind)(
                    account, settings, self._session, callback_url(self.settings, account)
                )
            sender = AccountSender(
                account,
                provider,
                max_in_flight=settings.max_in_flight,
                publish=self.writer.publish,
                breaker=self.breakers[account],
                limiter=self.limits.get(account),
                dry_run=DryRun(account, settings),
                batch_window_s=self.settings.sender.batch_window_s,
                fair=FairQueue(
                    window=turn_window(settings, provider.max_batch),
                    tenant_weight=self._tenant_weight,
                    campaign_weight=self._campaign_weight,
                    clock=self.monotonic,
                ),
            )
            self._accounts[account] = sender
        return sender

    def _tenant_weight(self, tenant: str) -> float:
        settings = self.settings.tenants.get(tenant)
        return settings.share_weight if settings is not None else 1.0

    def _campaign_weight(self, tenant: str, campaign: str) -> float:
        settings = self.settings.tenants.get(tenant)
        return settings.campaign_weights.get(campaign, 1.0) if settings is not None else 1.0


def _withheld(state: SendState, withheld: Withheld) -> SendState:
    """The state to decide again with after the controls stopped its call: an intent already
    written is undone in memory (the next decision writes the state that replaces it)."""
    if withheld.after_intent:
        state.attempt -= 1
        state.attempts -= 1
        state.call = []
    return state
