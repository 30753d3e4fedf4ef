"""Event encodings that other processes read back."""

from __future__ import annotations

import orjson

from shared.contract.events import StateChange, decode


def test_a_state_change_encodes_to_the_generic_event_bytes() -> None:
    # Its own to_bytes skips pydantic's walk of the value: the bytes must not change, for the
    # changelogs already on Kafka are restored with the same reader.
    value = {
        "dispatch": {"context": {"tenant": "acme", "metadata_json": '{"a":1}'}, "segments": 2},
        "held": [],
        "held_since": None,
        "status": "sent",
        "finished_at": 1700000000.25,
        "seen_event_ids": ["e-1", "é-2"],
    }
    for due_at in (1700000100.5, None):
        change = StateChange(value=value, due_at=due_at)

        assert change.to_bytes() == orjson.dumps(change.model_dump(mode="python"))
        assert decode(StateChange, change.to_bytes()) == change
