"""``smsbridge topics ensure [--fix]``: create the pipeline's missing topics and check the others.

An existing topic is compared with ours (partition count, cleanup.policy, min.insync.replicas and
our other configs) and each difference is printed. Nothing existing changes without ``--fix``;
with it, configs are set and a partition count is raised only where that moves no key away from
its state (``shared.contract.topics.partition_refusal``); a count is never lowered. The exit code
is 1 while any difference remains.
"""

from __future__ import annotations

from shared.config import Settings
from shared.contract.topics import (
    ALL_TOPICS,
    Drift,
    ensure_topics,
    fix_drift,
    topic_configs,
    topic_drift,
)
from shared.kafka.clients import make_admin


async def ensure_topics_command(settings: Settings, fix: bool = False) -> int:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        states = await ensure_topics(admin, settings.kafka.replication_factor)
        existing = [topic for topic in ALL_TOPICS if states[topic.name] == "exists"]
        drift = await topic_drift(admin, existing)
        fixed: list[Drift] = []
        if fix and any(d.refused is None for d in drift):
            await fix_drift(admin, drift)
            before, drift = drift, await topic_drift(admin, existing)
            fixed = [d for d in before if d not in drift]
    finally:
        await admin.close()
    print_report(settings, states, drift, fixed, fix)
    return 1 if drift else 0


def print_report(
    settings: Settings, states: dict[str, str], drift: list[Drift], fixed: list[Drift], fix: bool
) -> None:
    """One line per topic (state: created, ok, fixed or drift), then each difference."""
    rf = settings.kafka.replication_factor
    drifting = {d.topic for d in drift}
    repaired = {d.topic for d in fixed}
    print(f"{'topic':34} {'partitions':>10} {'cleanup.policy':>14} {'min.insync.replicas':>19}")
    for topic in ALL_TOPICS:
        configs = topic_configs(topic, rf)
        state = states[topic.name]
        if state == "exists":
            state = (
                "drift" if topic.name in drifting else "fixed" if topic.name in repaired else "ok"
            )
        print(
            f"{topic.name:34} {topic.partitions:>10} {configs['cleanup.policy']:>14} "
            f"{configs['min.insync.replicas']:>19}  {state}"
        )
    for d in fixed:
        print(f"fixed: {d}")
    for d in drift:
        print(f"drift: {d}")
    if not fix and any(d.refused is None for d in drift):
        print("`smsbridge topics ensure --fix` changes what can be changed safely")
