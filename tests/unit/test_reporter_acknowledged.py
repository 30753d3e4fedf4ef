"""What Optimove acknowledged, as plain decisions: each report's identity, whether a record read
again is posted, what is stored on acceptance and what the timer forgets (``acknowledged.py``)."""

from __future__ import annotations

from datetime import UTC, datetime

from services.reporter.acknowledged import (
    Remembered,
    already_acknowledged,
    delivery_identity,
    forgotten,
    incoming_identity,
    is_acknowledgement,
    remember,
)
from services.reporter.parking import delivery_key, incoming_key
from shared.contract.events import InboundMessage, MessageContext, StatusEvent
from shared.kafka.store import Entry

NOW = 1_700_000_000.0


def status(message_id: str, canonical: str, sub_status: str, event_id: str = "e-1") -> StatusEvent:
    return StatusEvent.model_validate(
        {
            "event_id": event_id,
            "context": MessageContext(
                tenant="acme",
                message_id=message_id,
                batch_id="b",
                mobile_number="+447911123456",
                metadata_json="{}",
            ),
            "status": canonical,
            "sub_status": sub_status,
        }
    )


def reply(event_id: str, text: str = "hi") -> InboundMessage:
    return InboundMessage(
        event_id=event_id,
        tenant="acme",
        to="ACME",
        from_number="447911123456",
        text=text,
        sent_at=datetime(2026, 1, 2, tzinfo=UTC),
    )


def test_a_delivery_report_is_known_by_its_message_status_and_sub_status() -> None:
    sent = delivery_identity(status("m-1", "sent", "Sent"))
    assert sent == "acknowledged/delivery/acme/m-1/sent/Sent"
    # The same report written again (another event id, another offset) is the same report...
    assert delivery_identity(status("m-1", "sent", "Sent", event_id="e-2")) == sent
    # ...another status or sub-status of the message, or another message, is not.
    others = {
        delivery_identity(status("m-1", "delivered", "Delivered")),
        delivery_identity(status("m-1", "failed", "Undeliverable")),
        delivery_identity(status("m-1", "failed", "Expired")),
        delivery_identity(status("m-2", "sent", "Sent")),
    }
    assert sent not in others and len(others) == 4


def test_an_incoming_message_is_known_by_its_event_id() -> None:
    assert incoming_identity(reply("e-in-1")) == "acknowledged/incoming/acme/e-in-1"
    assert incoming_identity(reply("e-in-1", "other text")) == incoming_identity(reply("e-in-1"))
    assert incoming_identity(reply("e-in-2")) != incoming_identity(reply("e-in-1"))


def test_acknowledgements_never_share_keys_with_parked_entries() -> None:
    assert is_acknowledgement(delivery_identity(status("m-1", "sent", "Sent")))
    assert is_acknowledgement(incoming_identity(reply("e-in-1")))
    assert not is_acknowledgement(delivery_key("acme", "m-1"))
    assert not is_acknowledgement(incoming_key("acme", "e-in-1"))


def test_a_report_is_skipped_only_while_its_acknowledgement_is_remembered() -> None:
    assert not already_acknowledged(None, NOW)  # never acknowledged: posted
    remembered = Entry({"acknowledged_at": NOW - 10}, NOW + 60)
    assert already_acknowledged(remembered, NOW)
    # Past its time it counts as forgotten, whether or not the timer has deleted it yet.
    assert not already_acknowledged(remembered, NOW + 60)
    assert not already_acknowledged(remembered, NOW + 61)


def test_an_acceptance_is_remembered_for_the_configured_time() -> None:
    keys = ["acknowledged/incoming/acme/e-1", "acknowledged/incoming/acme/e-2"]
    assert remember(keys, NOW, 3600.0) == [
        Remembered(key, {"acknowledged_at": NOW}, NOW + 3600.0) for key in keys
    ]
    assert remember(keys, NOW, 0.0) == []  # 0 remembers nothing


def test_the_timer_forgets_only_acknowledgements_whose_time_came() -> None:
    due = [
        ("acknowledged/delivery/acme/m-1/sent/Sent", Entry({}, NOW - 1)),
        ("acknowledged/delivery/acme/m-2/sent/Sent", Entry({}, NOW)),
        # Renewed since the pass read it (a replay past the time posted and stored it again).
        ("acknowledged/delivery/acme/m-3/sent/Sent", Entry({}, NOW + 100)),
        ("acknowledged/delivery/acme/m-4/sent/Sent", None),  # deleted meanwhile
        ("delivery/acme/m-5", Entry({}, NOW - 1)),  # a parked entry: not the forgetting's
    ]
    assert forgotten(due, NOW) == [
        Remembered("acknowledged/delivery/acme/m-1/sent/Sent", None, None),
        Remembered("acknowledged/delivery/acme/m-2/sent/Sent", None, None),
    ]
