"""The reporter's retry policy (decisions.md §7), its delivery loop, and the inbound batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from services.reporter.batching import InboundBatcher
from services.reporter.delivery import (
    Action,
    AttemptResult,
    Decision,
    DeliveryOutcome,
    ReportSender,
    RetryPolicy,
)
from shared.config import ReporterSettings
from shared.contract.events import InboundMessage
from shared.contract.optimove import SignedRequest
from shared.http_client import HttpClient
from shared.providers.http import is_retryable_status, parse_retry_after

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(give_up_after_s=600.0, max_backoff_s=60.0, base_backoff_s=1.0)


def answer(status: int, retry_after_s: float | None = None) -> AttemptResult:
    return AttemptResult(status_code=status, retry_after_s=retry_after_s)


NETWORK_ERROR = AttemptResult(status_code=None, error="ClientConnectorError: refused")


# -- which answers are retried ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 599])
def test_server_errors_and_429_are_retryable(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 301, 400, 401, 403, 404, 408, 409, 413, 415, 422])
def test_other_statuses_are_not_retryable(status: int) -> None:
    assert not is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_accepted(status: int) -> None:
    assert POLICY.decide(answer(status), attempts=1, elapsed_s=0).action is Action.ACCEPTED


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 415, 422])
def test_other_answers_are_refused_at_once(status: int) -> None:
    decision = POLICY.decide(answer(status), attempts=1, elapsed_s=0)
    assert decision.action is Action.REFUSED
    assert f"HTTP {status}" in decision.reason


@pytest.mark.parametrize("result", [answer(503), answer(429), answer(500), NETWORK_ERROR])
def test_transient_failures_are_retried(result: AttemptResult) -> None:
    decision = POLICY.decide(result, attempts=1, elapsed_s=0, jitter=lambda: 0.5)
    assert decision.action is Action.RETRY
    assert decision.delay_s == pytest.approx(0.5)


def test_a_refusal_is_not_retried_even_when_young() -> None:
    decision = POLICY.decide(answer(400, retry_after_s=1), attempts=1, elapsed_s=0)
    assert decision.action is Action.REFUSED


# -- how long to wait ------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    ceilings = [POLICY.backoff_ceiling_s(n) for n in range(1, 10)]
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert POLICY.backoff_ceiling_s(10_000) == 60  # no overflow after days of retries


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.999])
def test_full_jitter_spreads_over_the_whole_ceiling(jitter: float) -> None:
    decision = POLICY.decide(answer(503), attempts=4, elapsed_s=10, jitter=lambda: jitter)
    assert decision.delay_s == pytest.approx(8 * jitter)


def test_retry_after_is_honoured_instead_of_backoff() -> None:
    decision = POLICY.decide(answer(503, retry_after_s=7), attempts=1, elapsed_s=0)
    assert decision == Decision(Action.RETRY, delay_s=7, reason="HTTP 503")


def test_retry_after_is_capped_by_max_backoff() -> None:
    decision = POLICY.decide(answer(429, retry_after_s=3600), attempts=1, elapsed_s=0)
    assert decision.delay_s == 60


# -- giving up -------------------------------------------------------------------------------------


def test_gives_up_once_the_first_attempt_is_old_enough() -> None:
    decision = POLICY.decide(answer(503), attempts=42, elapsed_s=600.0)
    assert decision.action is Action.GIVE_UP
    assert "42 attempts" in decision.reason
    assert "HTTP 503" in decision.reason


def test_keeps_retrying_just_before_the_give_up_age() -> None:
    decision = POLICY.decide(NETWORK_ERROR, attempts=42, elapsed_s=599.0, jitter=lambda: 0.9)
    assert decision.action is Action.RETRY
    # The wait never overshoots the give-up age: one last attempt happens at it.
    assert decision.delay_s == pytest.approx(1.0)


def test_policy_from_settings() -> None:
    policy = RetryPolicy.from_settings(ReporterSettings(give_up_after_s=5, max_backoff_s=2))
    assert (policy.give_up_after_s, policy.max_backoff_s) == (5, 2)


# -- Retry-After parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Sun, 01 Mar 2026 12:00:30 GMT", 30.0),
        ("Sun, 01 Mar 2026 11:59:00 GMT", 0.0),  # already past: retry now
        ("Sunday, 01-Mar-26 12:01:00 GMT", 60.0),  # obsolete RFC 850 form, still valid
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


# -- the delivery loop -----------------------------------------------------------------------------


class ScriptedSender(ReportSender):
    """The real loop, with attempts answered from a script and time that only moves on sleep."""

    def __init__(self, script: Sequence[AttemptResult], policy: RetryPolicy = POLICY) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)
            self.now += seconds

        super().__init__(
            session=None,  # type: ignore[arg-type]  # never used: attempt() is scripted
            policy=policy,
            request_timeout_s=1.0,
            clock=lambda: self.now,
            sleep=sleep,
            jitter=lambda: 1.0,
        )
        self.script = list(script)
        self.requests: list[SignedRequest] = []

    async def attempt(self, request: SignedRequest) -> AttemptResult:
        self.requests.append(request)
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


REQUEST = SignedRequest(url="http://optimove.invalid/x", body=b"{}", headers={})


async def test_deliver_retries_until_accepted() -> None:
    sender = ScriptedSender([answer(503), NETWORK_ERROR, answer(429, retry_after_s=9), answer(200)])
    seen: list[tuple[int | None, Action]] = []

    outcome = await sender.deliver(REQUEST, lambda r, d: seen.append((r.status_code, d.action)))

    assert outcome.accepted
    assert outcome.attempts == 4
    assert sender.sleeps == [1.0, 2.0, 9.0]
    assert seen == [
        (503, Action.RETRY),
        (None, Action.RETRY),
        (429, Action.RETRY),
        (200, Action.ACCEPTED),
    ]
    assert sender.requests == [REQUEST] * 4


async def test_deliver_stops_at_a_refusal() -> None:
    refused = AttemptResult(status_code=400, response_excerpt='{"error":"bad"}')
    sender = ScriptedSender([answer(503), refused, answer(200)])

    outcome = await sender.deliver(REQUEST)

    assert outcome.decision.action is Action.REFUSED
    assert outcome.attempts == 2
    assert outcome.last == refused


async def test_deliver_gives_up_after_the_give_up_age() -> None:
    sender = ScriptedSender([answer(503)], RetryPolicy(give_up_after_s=30, max_backoff_s=8))

    outcome = await sender.deliver(REQUEST)

    assert outcome.decision.action is Action.GIVE_UP
    assert outcome.elapsed_s == pytest.approx(30)
    # 1 + 2 + 4 + 8 + 8 = 23, then the wait is cut to the 7 s left, then the last attempt.
    assert sender.sleeps == [1, 2, 4, 8, 8, 7]
    assert outcome.attempts == 7


class Gate:
    """A gate that lets ``allowed`` requests through, then none; remembers what it was told."""

    def __init__(self, allowed: int, next_attempt_at: float = 42.0) -> None:
        self.allowed = allowed
        self.released: list[tuple[object, int | None]] = []
        self._next = next_attempt_at

    def acquire(self) -> object | None:
        if self.allowed == 0:
            return None
        self.allowed -= 1
        return "permit"

    def release(self, permit: object, result: AttemptResult | None) -> None:
        self.released.append((permit, result.status_code if result is not None else None))

    def next_attempt_at(self) -> float:
        return self._next


async def test_a_closed_gate_stops_before_any_attempt() -> None:
    sender = ScriptedSender([answer(200)])

    outcome = await sender.deliver(REQUEST, gate=Gate(allowed=0, next_attempt_at=30.0))

    assert outcome.decision.action is Action.RETRY
    assert outcome.decision.delay_s == 30.0  # the gate's next turn, on the sender's clock
    assert outcome.attempts == 0
    assert outcome.last.status_code is None
    assert "not attempted" in outcome.decision.reason
    assert sender.requests == []


async def test_the_gate_sees_every_result_and_can_stop_the_loop() -> None:
    sender = ScriptedSender([answer(503), answer(502), answer(200)])
    gate = Gate(allowed=2)

    outcome = await sender.deliver(REQUEST, gate=gate)

    assert outcome.decision.action is Action.RETRY
    assert outcome.attempts == 2
    assert outcome.last.status_code == 502
    assert gate.released == [("permit", 503), ("permit", 502)]


async def test_the_budget_ends_the_loop_before_a_wait_that_would_overrun_it() -> None:
    # Waits are 1, 2, 4 s (jitter 1.0): after 1 + 2 = 3 s, the next wait of 4 s overruns 5 s.
    sender = ScriptedSender([answer(503)])

    outcome = await sender.deliver(REQUEST, budget_s=5.0)

    assert outcome.decision.action is Action.RETRY
    assert outcome.decision.delay_s == 4.0
    assert outcome.attempts == 3
    assert sender.sleeps == [1.0, 2.0]


async def test_the_give_up_age_counts_from_an_earlier_first_attempt() -> None:
    sender = ScriptedSender([answer(503)], RetryPolicy(give_up_after_s=30, max_backoff_s=8))
    sender.now = 100.0

    outcome = await sender.deliver(REQUEST, first_attempt_at=60.0)

    assert outcome.decision.action is Action.GIVE_UP
    assert outcome.attempts == 1


async def test_attempt_reports_network_errors_without_raising() -> None:
    async with HttpClient() as session:
        sender = ReportSender(session, POLICY, request_timeout_s=2.0)
        # Port 9 on loopback: nothing listens, the connection is refused.
        result = await sender.attempt(
            SignedRequest(url="http://127.0.0.1:9/x", body=b"{}", headers={})
        )
    assert result.status_code is None
    assert "cannot connect to 127.0.0.1:9" in result.error
    assert POLICY.decide(result, 1, 0).action is Action.RETRY


# -- batching incoming messages --------------------------------------------------------------------


def reply(text: str, tenant: str = "acme") -> InboundMessage:
    return InboundMessage(
        event_id=f"e-{text}",
        tenant=tenant,
        to="ACME",
        from_number="447911123456",
        text=text,
        sent_at=NOW,
    )


ACCEPTED = DeliveryOutcome(Decision(Action.ACCEPTED), 1, answer(200), 0.0)


class RecordingDelivery:
    def __init__(self, outcome: DeliveryOutcome = ACCEPTED, pause_s: float = 0.0) -> None:
        self.outcome = outcome
        self.pause_s = pause_s
        self.batches: list[tuple[str, list[str]]] = []

    async def __call__(self, tenant: str, messages: list[InboundMessage]) -> DeliveryOutcome:
        self.batches.append((tenant, [m.text for m in messages]))
        await asyncio.sleep(self.pause_s)
        return self.outcome


async def test_full_batches_go_at_once_and_the_rest_after_the_delay() -> None:
    delivery = RecordingDelivery()
    batcher = InboundBatcher(delivery, max_size=3, max_delay_s=0.4)
    loop = asyncio.get_running_loop()
    started = loop.time()

    waiters = [asyncio.create_task(batcher.submit("acme", reply(str(i)))) for i in range(7)]
    first_three = await asyncio.gather(*waiters[:3])
    full_batch_after = loop.time() - started
    rest = await asyncio.gather(*waiters[3:])

    assert all(o is ACCEPTED for o in [*first_three, *rest])
    assert full_batch_after < 0.3  # did not wait for the delay
    assert loop.time() - started >= 0.4  # the last, partial batch did
    assert delivery.batches == [
        ("acme", ["0", "1", "2"]),
        ("acme", ["3", "4", "5"]),
        ("acme", ["6"]),
    ]


async def test_tenants_are_batched_separately() -> None:
    delivery = RecordingDelivery()
    batcher = InboundBatcher(delivery, max_size=10, max_delay_s=0.05)

    await asyncio.gather(
        batcher.submit("acme", reply("a1")),
        batcher.submit("beta", reply("b1", "beta")),
        batcher.submit("acme", reply("a2")),
    )

    assert sorted(delivery.batches) == [("acme", ["a1", "a2"]), ("beta", ["b1"])]


async def test_one_tenants_batches_are_sent_one_at_a_time_in_order() -> None:
    delivery = RecordingDelivery(pause_s=0.05)
    in_flight = 0
    most_in_flight = 0

    async def deliver(tenant: str, messages: list[InboundMessage]) -> DeliveryOutcome:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            return await delivery(tenant, messages)
        finally:
            in_flight -= 1

    batcher = InboundBatcher(deliver, max_size=1, max_delay_s=1.0)
    await asyncio.gather(*(batcher.submit("acme", reply(str(i))) for i in range(5)))

    assert most_in_flight == 1
    assert [texts for _, texts in delivery.batches] == [["0"], ["1"], ["2"], ["3"], ["4"]]


async def test_every_member_of_a_batch_gets_its_outcome() -> None:
    refused = DeliveryOutcome(Decision(Action.REFUSED, reason="HTTP 400"), 1, answer(400), 0.0)
    batcher = InboundBatcher(RecordingDelivery(refused), max_size=2, max_delay_s=1.0)

    outcomes = await asyncio.gather(
        batcher.submit("acme", reply("x")), batcher.submit("acme", reply("y"))
    )

    assert list(outcomes) == [refused, refused]


async def test_a_delivery_bug_reaches_every_waiter() -> None:
    async def broken(tenant: str, messages: list[InboundMessage]) -> DeliveryOutcome:
        raise RuntimeError("bug")

    batcher = InboundBatcher(broken, max_size=2, max_delay_s=1.0)
    results = await asyncio.gather(
        batcher.submit("acme", reply("x")),
        batcher.submit("acme", reply("y")),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]


async def test_a_cancelled_waiter_does_not_cancel_its_batch() -> None:
    delivery = RecordingDelivery(pause_s=0.05)
    batcher = InboundBatcher(delivery, max_size=2, max_delay_s=1.0)
    leaving = asyncio.create_task(batcher.submit("acme", reply("x")))
    await asyncio.sleep(0)
    staying = asyncio.create_task(batcher.submit("acme", reply("y")))
    await asyncio.sleep(0.01)

    leaving.cancel()

    assert await staying is ACCEPTED
    assert delivery.batches == [("acme", ["x", "y"])]


async def test_close_abandons_undelivered_batches() -> None:
    delivery = RecordingDelivery(pause_s=10)
    batcher = InboundBatcher(delivery, max_size=2, max_delay_s=10)
    sending = [asyncio.create_task(batcher.submit("acme", reply(t))) for t in ("x", "z")]
    waiting = asyncio.create_task(batcher.submit("beta", reply("y", "beta")))
    await asyncio.sleep(0.01)
    assert delivery.batches == [("acme", ["x", "z"])]  # beta's batch is still open

    await batcher.close()

    for task in (*sending, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
