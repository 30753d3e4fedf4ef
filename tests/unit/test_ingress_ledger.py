"""services/ingress/ledger.py: the in-memory ledger of accepted requests (no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.ingress.ledger import RequestLedger, ledger_key
from shared.events import IngressRequestAccepted

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
