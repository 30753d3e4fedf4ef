"""Who goes next on a provider account: priority first, then a weighted fair share.

Every send waits for its turn here (``FairQueue.turn``) before it asks the rate limit for a send
time; a few turns at a time are out, so the order of the limit's bookings is the fair order. A
campaign holds at most its fair part of what the account keeps waiting; its further records wait
in the log (``Attempts.lane_limit``, ``shared/kafka/backlog.py``) while the sender reads on. How
the shares are computed, and why: docs/sending.md, "Fair share and priority".
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson
from aiokafka.structs import ConsumerRecord

from shared.config import ProviderSettings, TenantSettings
from shared.contract.events import RecipientMessage
from shared.contract.priority import is_priority
from shared.contract.topics import RECIPIENTS

# How long the shares shown per flow look back.
SHARE_HORIZON_S = 10.0
# How far ahead of the rate limit turns are given out: enough sends to cover an intent's trip
# to Kafka, few enough that a priority message waits only about that long.
TURN_AHEAD_S = 0.05


@dataclass(frozen=True)
class Flow:
    """The traffic that shares an account fairly: one campaign of one tenant (``campaign`` is
    "" for auto replies). ``priority`` flows go before every bulk flow."""

    tenant: str
    campaign: str
    priority: bool


def flow_of(message: RecipientMessage, tenant: TenantSettings) -> Flow:
    """Auto replies (no batch and no campaign id, optimove-sms-api.md §3.4) and the campaigns the
    tenant lists in ``priority_campaigns`` are priority traffic."""
    context = message.context
    priority = is_priority(context.batch_id, context.campaign_id, tenant.priority_campaigns)
    return Flow(context.tenant, context.campaign_id, priority)


def lane_of(
    record: ConsumerRecord[bytes, bytes], tenants: Mapping[str, TenantSettings]
) -> Flow | None:
    """A bulk record's campaign, which waits in the log while it is over its fair part
    (``shared/kafka/backlog.py``); None for priority traffic, which never waits. Read from the
    raw value: this runs for every record read, ahead of the decoding."""
    if record.topic != RECIPIENTS.name or record.value is None:
        return None
    try:
        context = orjson.loads(record.value)["context"]
        tenant = tenants.get(context["tenant"])
        batch_id, campaign_id = context.get("batch_id"), context.get("campaign_id") or ""
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # the handler says what is wrong with it
    if tenant is None or is_priority(batch_id, campaign_id, tenant.priority_campaigns):
        return None
    return Flow(context["tenant"], campaign_id, priority=False)


def turn_window(account: ProviderSettings, max_batch: int) -> int:
    """How many turns may be out at once on an account: its sends of ``TURN_AHEAD_S`` (a full
    bulk call at least); without a rate limit, every call slot's worth."""
    if account.rate_limit_per_s <= 0:
        return account.max_in_flight * max(1, max_batch)
    return max(4, max_batch, math.ceil(account.rate_limit_per_s * TURN_AHEAD_S))


@dataclass
class _Waiter:
    cost: float
    admitted: asyncio.Future[None]


@dataclass
class _FlowQueue:
    waiters: deque[_Waiter] = field(default_factory=deque)
    cost: float = 0.0  # of the waiters
    virtual_time: float = 0.0


@dataclass
class _TenantQueue:
    flows: dict[Flow, _FlowQueue] = field(default_factory=dict)
    virtual_time: float = 0.0
    clock: float = 0.0  # the virtual time of its last turn: where a returning campaign starts

    def active(self) -> list[tuple[Flow, _FlowQueue]]:
        return [(flow, queue) for flow, queue in self.flows.items() if queue.waiters]


class Ticket:
    """One admitted turn; ``release`` (once its send time is booked, or it left) lets the next
    one in."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


class FairQueue:
    """One account's queue of sends waiting for their turn.

    Start-time fair queueing on two levels: each tenant has a virtual time that advances by
    cost / tenant weight at each of its turns, each campaign within it likewise by its weight;
    the lowest goes next. A tenant or campaign coming back after an idle spell starts at the
    current virtual time, so idleness is not saved up as credit.
    """

    def __init__(
        self,
        window: int,
        tenant_weight: Callable[[str], float],
        campaign_weight: Callable[[str, str], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = max(1, window)
        self.tenant_weight = tenant_weight
        self.campaign_weight = campaign_weight
        self.clock = clock
        self._tenants: dict[str, _TenantQueue] = {}
        self._out = 0
        self._virtual_time = 0.0
        self._waiting_cost = 0.0
        self._turns: dict[Flow, deque[tuple[float, float]]] = {}

    # -- what the handler asks ------------------------------------------------------------------

    def waiting(self, flow: Flow | None = None) -> float:
        """Cost waiting for a turn: of ``flow``, or of every flow."""
        if flow is None:
            return self._waiting_cost
        tenant = self._tenants.get(flow.tenant)
        queue = tenant.flows.get(flow) if tenant else None
        return queue.cost if queue else 0.0

    def fair_part(self, flow: Flow) -> float:
        """The part of the account ``flow`` gets while every flow waiting now (and it) stays."""
        tenants = {name: t for name, t in self._tenants.items() if t.active()}
        tenants.setdefault(flow.tenant, self._tenants.get(flow.tenant) or _TenantQueue())
        total = sum(self.tenant_weight(name) for name in tenants)
        campaigns = {f.campaign for f, _ in tenants[flow.tenant].active()} | {flow.campaign}
        weights = {c: self.campaign_weight(flow.tenant, c) for c in campaigns}
        tenant_part = self.tenant_weight(flow.tenant) / total
        return tenant_part * weights[flow.campaign] / sum(weights.values())

    def rates(self) -> dict[Flow, float]:
        """Each flow's turns per second (by cost) over the last ``SHARE_HORIZON_S``."""
        since = self.clock() - SHARE_HORIZON_S
        rates: dict[Flow, float] = {}
        for flow, turns in list(self._turns.items()):
            while turns and turns[0][0] < since:
                turns.popleft()
            if turns:
                rates[flow] = sum(cost for _, cost in turns) / SHARE_HORIZON_S
            else:
                del self._turns[flow]
        return rates

    def shares(self) -> dict[Flow, float]:
        """Each flow's part of the turns of the last ``SHARE_HORIZON_S`` (by cost)."""
        rates = self.rates()
        everything = sum(rates.values())
        return {flow: rate / everything for flow, rate in rates.items()} if everything else {}

    # -- turns ---------------------------------------------------------------------------------

    async def turn(self, flow: Flow, cost: float) -> Ticket:
        """Wait for this send's turn; the ticket must be released once its time is booked."""
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self._enqueue(flow, waiter)
        self._admit()
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self._returned()  # admitted just as it was cancelled: give the turn back
            else:
                self._withdraw(flow, waiter)
            raise
        return Ticket(self._returned)

    def _enqueue(self, flow: Flow, waiter: _Waiter) -> None:
        tenant = self._tenants.get(flow.tenant)
        if tenant is None:
            tenant = self._tenants[flow.tenant] = _TenantQueue()
        if not tenant.active():
            tenant.virtual_time = max(tenant.virtual_time, self._virtual_time)
        queue = tenant.flows.get(flow)
        if queue is None:
            queue = tenant.flows[flow] = _FlowQueue()
        if not queue.waiters:
            queue.virtual_time = max(queue.virtual_time, tenant.clock)
        queue.waiters.append(waiter)
        queue.cost += waiter.cost
        self._waiting_cost += waiter.cost

    def _withdraw(self, flow: Flow, waiter: _Waiter) -> None:
        tenant = self._tenants.get(flow.tenant)
        queue = tenant.flows.get(flow) if tenant else None
        if queue is not None and waiter in queue.waiters:
            queue.waiters.remove(waiter)
            queue.cost -= waiter.cost
            self._waiting_cost -= waiter.cost
            self._forget_idle(flow)

    def _returned(self) -> None:
        self._out -= 1
        self._admit()

    def _admit(self) -> None:
        while self._out < self.window:
            picked = self._pick()
            if picked is None:
                return
            flow, waiter = picked
            self._out += 1
            now = self.clock()
            turns = self._turns.setdefault(flow, deque())
            turns.append((now, waiter.cost))
            while turns[0][0] < now - SHARE_HORIZON_S:
                turns.popleft()
            waiter.admitted.set_result(None)

    def _pick(self) -> tuple[Flow, _Waiter] | None:
        """The next turn: priority flows before bulk, lowest virtual time first at each level."""
        candidates = [(name, t) for name, t in self._tenants.items() if t.active()]
        if not candidates:
            return None
        if any(flow.priority for _, t in candidates for flow, _ in t.active()):
            candidates = [
                (name, t) for name, t in candidates if any(f.priority for f, _ in t.active())
            ]
        name, tenant = min(candidates, key=lambda item: (item[1].virtual_time, item[0]))
        flows = tenant.active()
        if any(flow.priority for flow, _ in flows):
            flows = [(flow, queue) for flow, queue in flows if flow.priority]
        flow, queue = min(flows, key=lambda item: (item[1].virtual_time, item[0].campaign))
        waiter = queue.waiters.popleft()
        queue.cost -= waiter.cost
        self._waiting_cost -= waiter.cost
        self._virtual_time = tenant.virtual_time
        tenant.virtual_time += waiter.cost / self.tenant_weight(name)
        tenant.clock = queue.virtual_time
        queue.virtual_time += waiter.cost / self.campaign_weight(name, flow.campaign)
        if waiter.admitted.done():  # cancelled while waiting: not a turn
            return self._pick()
        self._forget_idle(flow)
        return flow, waiter

    def _forget_idle(self, flow: Flow) -> None:
        """Keep memory to the flows waiting now (a tenant's virtual time survives: it is one
        float per tenant, and keeps a returning tenant from jumping the queue)."""
        tenant = self._tenants.get(flow.tenant)
        if tenant is None:
            return
        queue = tenant.flows.get(flow)
        if queue is not None and not queue.waiters:
            del tenant.flows[flow]
