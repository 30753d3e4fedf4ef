"""``smsbridge topics ensure``: create the pipeline's topics, print what each one is."""

from __future__ import annotations

from shared.config import Settings
from shared.contract.topics import ALL_TOPICS, ensure_topics, topic_configs
from shared.kafka.clients import make_admin


async def ensure_topics_command(settings: Settings) -> int:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        result = await ensure_topics(admin, settings.kafka.replication_factor)
    finally:
        await admin.close()
    rf = settings.kafka.replication_factor
    print(f"{'topic':34} {'partitions':>10} {'cleanup.policy':>14} {'min.insync.replicas':>19}")
    for topic in ALL_TOPICS:
        configs = topic_configs(topic, rf)
        print(
            f"{topic.name:34} {topic.partitions:>10} {configs['cleanup.policy']:>14} "
            f"{configs['min.insync.replicas']:>19}  {result[topic.name]}"
        )
    return 1 if any(state.startswith("exists with") for state in result.values()) else 0
