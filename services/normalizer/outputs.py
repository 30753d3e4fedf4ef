"""What one change of a correlation key's state puts on Kafka, and its metrics and logs.

Plain functions: the handler (``handler.py``) stores and publishes what these return, under the
key's lock, and runs ``observe`` once Kafka acknowledged it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.normalizer import metrics
from services.normalizer.join import JoinResult
from services.normalizer.replies import RoutedReply
from shared.contract.events import DeadLetter, NumberFormat, ProviderEvent
from shared.contract.ids import tenant_number_key
from shared.contract.topics import (
    DEAD_LETTERS,
    INBOUND,
    LAST_INBOUND,
    NUMBER_FORMATS,
    OPT_OUTS,
    PROVIDER_EVENTS,
    STATUSES,
)
from shared.kafka.clients import OutRecord
from shared.kafka.store import Entry
from shared.logs import mask_number

log = logging.getLogger(__name__)

NAME = "normalizer"


@dataclass(frozen=True)
class Reply:
    """A reply to forward (to each tenant in ``routed``) or to dead-letter (``unroutable``)."""

    event: ProviderEvent
    routed: tuple[RoutedReply, ...] = ()
    unroutable: str = ""


@dataclass(frozen=True)
class Change:
    """One key's join result, with the entry it replaces (to undo it if publishing fails)."""

    key: str
    previous: Entry | None
    result: JoinResult
    received: ProviderEvent | None = None
    # How Optimove wrote the number of a dispatch joined by this change, if worth recording.
    number_format: NumberFormat | None = None
    replies: tuple[Reply, ...] = ()


def result_outputs(change: Change) -> list[OutRecord]:
    """The statuses and dead letters of a change."""
    result = change.result
    outputs = [OutRecord(STATUSES, s.context.message_id, s) for s in result.statuses]
    outputs.extend(
        OutRecord(DEAD_LETTERS, dead.key or change.key, dead) for dead in result.dead_letters
    )
    return outputs


def number_format_output(record: NumberFormat) -> OutRecord:
    return OutRecord(NUMBER_FORMATS, tenant_number_key(record.tenant, record.number), record)


def reply_outputs(reply: Reply) -> list[OutRecord]:
    """A routed reply's messages, opt-out changes and last-inbound stamps; else its dead letter."""
    event, routed = reply.event, reply.routed
    if not routed:
        dead = DeadLetter(
            source_topic=PROVIDER_EVENTS.name,
            stage=NAME,
            reason=reply.unroutable,
            key=event.correlation_key,
            payload=event.to_bytes().decode("utf-8"),
            attempts=1,
            redrive_topic=PROVIDER_EVENTS.name,
        )
        return [OutRecord(DEAD_LETTERS, event.correlation_key, dead)]
    outputs = []
    for each in routed:
        key = tenant_number_key(each.tenant, each.number)
        outputs.append(OutRecord(INBOUND, each.tenant, each.inbound))
        if each.opt_out_change is not None:
            outputs.append(OutRecord(OPT_OUTS, key, each.opt_out_change))
        outputs.append(OutRecord(LAST_INBOUND, key, each.last_inbound))
    return outputs


def observe(change: Change, classify: Callable[[ProviderEvent], tuple[str, str] | None]) -> None:
    """Metrics and logs of a change that Kafka acknowledged."""
    result = change.result
    event = change.received
    if change.number_format is not None:
        metrics.NUMBER_FORMATS_WRITTEN.inc()
    if event is not None:
        mapped = classify(event)
        metrics.DLR_RECEIVED.labels(event.provider_kind, mapped[0] if mapped else "unknown").inc()
        if mapped is None:
            log.warning(
                "unknown %s status ignored",
                event.provider_kind,
                extra={
                    "provider_account": event.provider_account,
                    "provider_message_id": event.provider_message_id,
                    "provider_status": event.provider_status[:40],
                },
            )
    for status in result.statuses:
        metrics.STATUS_CHANGES.labels(status.status).inc()
        log.debug(
            "status %s/%s",
            status.status,
            status.sub_status,
            extra={"message_id": status.context.message_id},
        )
    for reason in result.dropped:
        metrics.STATUS_DROPPED.labels(reason).inc()
    for provider in result.unmatched_providers:
        metrics.DLR_UNMATCHED.labels(provider).inc()
        log.warning("%s provider event dead-lettered: no dispatch record in time", provider)
    for provider in result.unmatched_reply_providers:
        metrics.INBOUND_UNROUTABLE.labels(provider).inc()
        log.warning("%s reply dead-lettered: no tenant and no dispatch record in time", provider)
    for reply in change.replies:
        if reply.routed:
            for routed in reply.routed:
                _observe_reply(reply.event, routed)
        else:
            metrics.INBOUND_UNROUTABLE.labels(reply.event.provider_kind).inc()
            log.warning("reply dead-lettered: %s", reply.unroutable)


def _observe_reply(event: ProviderEvent, routed: RoutedReply) -> None:
    """Metrics and log of a reply that Kafka acknowledged."""
    metrics.INBOUND_MESSAGES.labels(event.provider_kind, event.kind).inc()
    change = routed.opt_out_change
    source = routed.opt_out_source
    if source is not None:
        metrics.OPT_OUTS.labels(source).inc()
    elif change is not None:
        metrics.OPT_INS.inc()
    log.info(
        "reply forwarded%s",
        "" if change is None else (" (opt-out)" if change.opted_out else " (opt-in)"),
        extra={
            "tenant": routed.tenant,
            "number": mask_number(routed.number),
            "provider_account": event.provider_account,
            **({"message_id": routed.message_id} if routed.message_id else {}),
        },
    )
