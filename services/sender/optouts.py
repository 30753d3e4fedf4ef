"""Whether the opt-out list stops a message: plain decisions, no Kafka (the handler asks).

An opted-out customer gets nothing (decisions.md §6), with one exception: Optimove answers a
customer's message, a STOP included, with an **auto reply** (optimove-sms-api.md §3.4: a request
whose ``batchId``, ``metadata.brandId`` and ``metadata.campaignId`` are all ``""``), e.g. the
confirmation of the STOP. Such a message goes out when the customer wrote to the tenant within
``[sender] reply_window_s`` before Optimove handed it to us (``sms.last-inbound``, written by the
normalizer for every reply). Campaign messages, and auto replies to customers who have not
written lately, stay suppressed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from shared.contract.events import LastInbound, MessageContext, RecipientMessage


class OptOutVerdict(StrEnum):
    SEND = "send"  # not opted out
    SEND_AUTO_REPLY = "send_auto_reply"  # opted out, but answering what the customer just wrote
    SUPPRESS = "suppress"  # opted out: reported Failed / OptedOut


def is_auto_reply(context: MessageContext) -> bool:
    """The request had ``batchId``, ``metadata.brandId`` and ``metadata.campaignId`` all ``""``.

    All three exactly as documented: a request that leaves one out is taken as a campaign, so a
    doubt keeps an opted-out customer's message suppressed.
    """
    if context.batch_id != "" or context.campaign_id != "":
        return False
    try:
        metadata = orjson.loads(context.metadata_json)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(metadata, dict)
        and metadata.get("brandId") == ""
        and metadata.get("campaignId") == ""
    )


def is_opted_out(entry: Mapping[str, Any] | None) -> bool:
    """An ``sms.opt-outs`` record (``OptOutChange``) says the customer is opted out."""
    return entry is not None and entry.get("opted_out") is True


def wrote_at(entry: Mapping[str, Any] | None) -> datetime | None:
    """When an ``sms.last-inbound`` record says the customer last wrote; None if unreadable."""
    if entry is None:
        return None
    try:
        return _aware(LastInbound.model_validate(entry).at)
    except ValidationError:
        return None


def opt_out_verdict(
    message: RecipientMessage,
    opt_out: Mapping[str, Any] | None,
    last_inbound: Callable[[], Mapping[str, Any] | None],
    window_s: float,
) -> OptOutVerdict:
    """What the opt-out list does to ``message``.

    ``opt_out`` is the recipient's ``sms.opt-outs`` record; ``last_inbound`` reads its
    ``sms.last-inbound`` record (asked only for an opted-out auto reply). The window is counted
    back from when ingress accepted the message, so a retried or replayed decision is the same.
    """
    if not is_opted_out(opt_out):
        return OptOutVerdict.SEND
    if not is_auto_reply(message.context):
        return OptOutVerdict.SUPPRESS
    wrote = wrote_at(last_inbound())
    if wrote is None or wrote < _aware(message.accepted_at) - timedelta(seconds=window_s):
        return OptOutVerdict.SUPPRESS
    return OptOutVerdict.SEND_AUTO_REPLY


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
