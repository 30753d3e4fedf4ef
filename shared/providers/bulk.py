"""Sending a batch through a bulk API: which messages may share one call, and reassembling results.

A bulk call carries one text and one sender for all its recipients, and the provider's answer (and
later its callbacks) tell recipients apart only by number. So messages share a call only when
text and sender are equal, and a call never names the same destination twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from shared.providers.base import OutboundSms, SendResult

SendCall = Callable[[list[OutboundSms]], Awaitable[list[SendResult]]]


def plan_calls(batch: Sequence[OutboundSms], max_batch: int) -> list[list[int]]:
    """Indices of ``batch`` grouped into calls of at most ``max_batch``, in order of appearance."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    calls: list[list[int]] = []
    destinations: list[set[str]] = []
    open_calls: dict[tuple[str, str], list[int]] = {}  # (text, sender) -> positions in ``calls``
    for index, sms in enumerate(batch):
        candidates = open_calls.setdefault((sms.text, sms.sender_id), [])
        chosen = next(
            (
                position
                for position in candidates
                if len(calls[position]) < max_batch
                and sms.destination not in destinations[position]
            ),
            None,
        )
        if chosen is None:
            chosen = len(calls)
            calls.append([])
            destinations.append(set())
            candidates.append(chosen)
        calls[chosen].append(index)
        destinations[chosen].add(sms.destination)
    return calls


async def send_in_calls(
    batch: Sequence[OutboundSms], max_batch: int, send_call: SendCall
) -> list[SendResult]:
    """Run ``send_call`` once per planned call, one after the other; results in batch order.

    Calls run in sequence so that a provider's rate limit sees one request at a time from us; the
    sender already runs many batches concurrently.
    """
    results: list[SendResult | None] = [None] * len(batch)
    for call in plan_calls(batch, max_batch):
        outcome = await send_call([batch[index] for index in call])
        if len(outcome) != len(call):
            raise RuntimeError(f"send call returned {len(outcome)} results for {len(call)}")
        for index, result in zip(call, outcome, strict=True):
            results[index] = result
    return [result for result in results if result is not None]
