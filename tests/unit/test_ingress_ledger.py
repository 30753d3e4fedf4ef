"""services/ingress/ledger.py: the in-memory ledger of accepted requests (no Kafka)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from services.ingress.ledger import RequestLedger, ledger_key
from shared.contract.events import IngressRequestAccepted
from shared.contract.ids import content_request_key

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def accepted(request_key: str, at: float, accepted: int = 3) -> IngressRequestAccepted:
    return IngressRequestAccepted(
        tenant="acme",
        request_key=request_key,
        accepted=accepted,
        rejected=[{"index": 3, "reason": "empty message"}],
        at=datetime.fromtimestamp(at, UTC),
    )


def test_key_is_tenant_and_request_key() -> None:
    assert ledger_key("acme", "r:req-1") == "acme:r:req-1"


def test_remembers_counts_of_accepted_requests() -> None:
    ledger = RequestLedger(retention_s=24 * HOUR, clock=Clock())
    assert ledger.get("acme:r:1") is None
    ledger.remember("acme:r:1", accepted("r:1", NOW))
    entry = ledger.get("acme:r:1")
    assert entry is not None
    assert (entry.accepted, entry.rejected) == (3, [{"index": 3, "reason": "empty message"}])
    assert ledger.get("other:r:1") is None


def test_applies_topic_records_and_tombstones() -> None:
    ledger = RequestLedger(retention_s=24 * HOUR, clock=Clock())
    ledger.apply(b"acme:r:1", accepted("r:1", NOW, accepted=5).to_bytes())
    entry = ledger.get("acme:r:1")
    assert entry is not None and entry.accepted == 5
    ledger.apply(b"acme:r:1", None)
    assert ledger.get("acme:r:1") is None


def test_skips_records_it_cannot_read() -> None:
    ledger = RequestLedger(retention_s=24 * HOUR, clock=Clock())
    ledger.apply(b"acme:r:1", b"not json")
    ledger.apply(None, accepted("r:2", NOW).to_bytes())
    ledger.apply(
        b"acme:r:3", accepted("r:3", NOW).model_copy(update={"schema_version": 9}).to_bytes()
    )
    assert len(ledger) == 0


def test_forgets_entries_past_the_retention() -> None:
    clock = Clock()
    ledger = RequestLedger(retention_s=24 * HOUR, clock=clock)
    ledger.apply(b"acme:r:old", accepted("r:old", NOW - 25 * HOUR).to_bytes())  # already too old
    ledger.remember("acme:r:1", accepted("r:1", NOW - 2 * HOUR))
    ledger.remember("acme:r:2", accepted("r:2", NOW))
    assert len(ledger) == 2
    assert ledger.get("acme:r:old") is None

    clock.now = NOW + 23 * HOUR  # r:1 is now 25 h old, r:2 23 h
    assert ledger.get("acme:r:1") is None
    assert ledger.get("acme:r:2") is not None
    ledger.expire()
    assert len(ledger) == 1

    clock.now = NOW + 25 * HOUR
    ledger.expire()
    assert len(ledger) == 0


# -- id-less requests (issue 14, point 1) ----------------------------------------------------------

MINUTE = 60.0
CONTENT = "c:" + "ab" * 16  # shared.contract.ids.content_key of some auto reply


def claim(first_at: float, *, pending: bool = True, accepted: int = 0) -> IngressRequestAccepted:
    return IngressRequestAccepted(
        tenant="acme",
        request_key=content_request_key(CONTENT, int(first_at * 1000)),
        accepted=accepted,
        pending=pending,
        at=datetime.fromtimestamp(first_at, UTC),
    )


def test_id_less_requests_are_remembered_for_the_short_window_only() -> None:
    clock = Clock()
    ledger = RequestLedger(retention_s=7 * 24 * HOUR, content_window_s=10 * MINUTE, clock=clock)
    key = ledger_key("acme", CONTENT)
    ledger.remember(key, claim(NOW, pending=False, accepted=1))
    ledger.remember("acme:r:1", accepted("r:1", NOW))
    clock.now = NOW + 9 * MINUTE
    entry = ledger.get(key)
    assert entry is not None and not entry.pending
    assert entry.request_key == content_request_key(CONTENT, int(NOW * 1000))
    clock.now = NOW + 24 * HOUR  # the same auto reply a day later is a new message
    assert ledger.get(key) is None
    ledger.expire()
    assert len(ledger) == 1  # the request with ids is kept for its week
    assert ledger.get("acme:r:1") is not None


def test_the_first_claim_in_the_topic_wins_on_every_instance() -> None:
    """Two instances claiming one content at once: whatever order each learns of its own
    claim, every ledger that applies the topic keeps the first one."""
    key = ledger_key("acme", CONTENT).encode()
    first, second = claim(NOW), claim(NOW + 0.2)
    clock = Clock()
    ledger = RequestLedger(retention_s=24 * HOUR, content_window_s=10 * MINUTE, clock=clock)
    for event in (first, second):
        ledger.apply(key, event.to_bytes())
    entry = ledger.get(key.decode())
    assert entry is not None and entry.pending and entry.request_key == first.request_key
    # The winner's final entry replaces its claim; a late claim does not displace it either.
    ledger.apply(key, claim(NOW, pending=False, accepted=2).to_bytes())
    ledger.apply(key, claim(NOW + 0.4).to_bytes())
    entry = ledger.get(key.decode())
    assert entry is not None and not entry.pending and entry.accepted == 2
    # Past the window the same content may be claimed anew.
    clock.now = NOW + 11 * MINUTE
    ledger.apply(key, claim(NOW + 11 * MINUTE).to_bytes())
    entry = ledger.get(key.decode())
    assert entry is not None and entry.pending
    assert entry.request_key == content_request_key(CONTENT, int((NOW + 11 * MINUTE) * 1000))


async def test_claimed_waits_until_the_follower_applies_a_claim() -> None:
    ledger = RequestLedger(retention_s=24 * HOUR, content_window_s=10 * MINUTE, clock=Clock())
    key = ledger_key("acme", CONTENT)
    assert await ledger.claimed(key, timeout_s=0.05) is None
    waiting = asyncio.create_task(ledger.claimed(key, timeout_s=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    ledger.apply(key.encode(), claim(NOW).to_bytes())
    entry = await asyncio.wait_for(waiting, 1)
    assert entry is not None and entry.request_key == claim(NOW).request_key


def test_an_entry_keeps_what_a_repeated_answer_needs() -> None:
    ledger = RequestLedger(retention_s=24 * HOUR, clock=Clock())
    event = accepted("r:1", NOW).model_copy(
        update={"ambiguous": [0, 4], "ambiguous_read_as": "international"}
    )
    ledger.apply(b"acme:r:1", event.to_bytes())
    entry = ledger.get("acme:r:1")
    assert entry is not None
    assert (entry.ambiguous, entry.ambiguous_read_as) == ((0, 4), "international")
    assert entry.request_key == "r:1" and not entry.pending
