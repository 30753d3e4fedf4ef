"""Which messages go before bulk campaign traffic, and the topic that carries them.

Auto replies (a request without batch and campaign id, optimove-sms-api.md §3.4) and the
campaigns a tenant lists in ``priority_campaigns`` travel on ``sms.recipients-priority``, so that
no backlog of bulk recipients stands before them on a partition; the sender reads both topics
and gives priority messages the next turn on their account (docs/sending.md, "Fair share and
priority").
"""

from __future__ import annotations

from collections.abc import Collection

from shared.contract.topics import PRIORITY_RECIPIENTS, RECIPIENTS, Topic


def is_auto_reply(batch_id: str | None, campaign_id: str | None) -> bool:
    return not batch_id and not campaign_id


def is_priority(batch_id: str | None, campaign_id: str | None, listed: Collection[str]) -> bool:
    return is_auto_reply(batch_id, campaign_id) or (campaign_id or "") in listed


def recipients_topic(priority: bool) -> Topic:
    return PRIORITY_RECIPIENTS if priority else RECIPIENTS
