"""Operator commands that talk to Kafka directly (topics; later replay and dead letters)."""

from __future__ import annotations

from shared.config import Settings
from shared.kafka import make_admin
from shared.topics import ensure_topics


async def ensure_topics_command(settings: Settings) -> int:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        result = await ensure_topics(admin, settings.kafka.replication_factor)
    finally:
        await admin.close()
    for name, state in result.items():
        print(f"{name:28} {state}")
    return 0
