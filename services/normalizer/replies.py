"""Replies and STOPs: a provider ``inbound`` or ``opt_out`` event made into what Optimove needs.

Plain logic over plain values (decisions.md §5, §6): which tenant a reply belongs to, how its
``from`` and ``to`` are written for Optimove's Incoming Message flow, and whether it changes the
customer's opt-out. Nothing here touches Kafka; the number directory is read through a lookup
function (in the service, ``GlobalTable.get`` on ``sms.number-formats``).

Which tenant:
1. the tenant of the dispatch the reply's correlation key joins (a reply carrying the original
   message id);
2. else the tenants whose routes use the provider account: exactly one is it; among several, the
   one whose number directory saw the number most recently;
3. else nobody: ``UnroutableReply``. The service then holds a reply that names its message until
   that message's dispatch record arrives (``join.Joiner.hold_reply``), and dead-letters any
   other with the reason.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from shared import ids
from shared.config import Settings, TenantSettings
from shared.events import (
    DispatchRecord,
    InboundMessage,
    NumberFormat,
    OptOutChange,
    ProviderEvent,
)
from shared.keywords import KeywordRules
from shared.logs import mask_number
from shared.numbers import InvalidNumber, digits_only, to_e164

log = logging.getLogger(__name__)

# ``OptOutChange.source`` values, also the ``source`` label of ``smsbridge_optout_total``.
OptOutSource = Literal["keyword", "provider"]

# A number a provider already wrote in international form: "+" then 6 to 15 digits.
_INTERNATIONAL = re.compile(r"\+[1-9][0-9]{5,14}")


class UnroutableReply(ValueError):
    """A reply no tenant can be found for (or without a usable number); the text says why."""


def tenant_number_key(tenant: str, e164: str) -> str:
    """Key of ``sms.opt-outs`` and ``sms.number-formats``: one customer of one tenant."""
    return f"{tenant}:{e164}"


def customer_e164(raw: str, region: str) -> str | None:
    """The customer's number in E.164, as ingress would have normalised it, or None.

    A number ``phonenumbers`` finds invalid is still kept when the provider wrote it as
    "+digits" or as international digits: the provider knows where the reply came from, and a
    STOP must not be lost to a numbering-plan table that is behind.
    """
    try:
        return to_e164(raw, region)
    except InvalidNumber:
        pass
    compact = raw.strip().replace(" ", "").replace("-", "")
    if _INTERNATIONAL.fullmatch(compact):
        return compact
    digits = digits_only(compact)
    if compact == digits and _INTERNATIONAL.fullmatch("+" + digits):
        return "+" + digits
    return None


def optimove_from(e164: str, known_as: str | None) -> str:
    """``from`` for Optimove: as Optimove wrote the number when known, else digits without ``+``."""
    return known_as if known_as else e164.removeprefix("+")


def reply_to(received_on: str, dispatch_sender: str, default_sender: str) -> str:
    """``to`` for Optimove: the number that received the reply, else the replied-to sender."""
    return received_on or dispatch_sender or default_sender


def as_utc(moment: datetime) -> datetime:
    """A provider's naive timestamp is taken as UTC (the callbacks service parses zones)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def tenants_by_account(tenants: Mapping[str, TenantSettings]) -> dict[str, tuple[str, ...]]:
    """Provider account -> the tenants whose routes use it, in configuration order."""
    found: dict[str, list[str]] = {}
    for slug, tenant in tenants.items():
        for route in tenant.routes:
            users = found.setdefault(route.provider, [])
            if slug not in users:
                users.append(slug)
    return {account: tuple(users) for account, users in found.items()}


def choose_tenant(
    account: str, candidates: Sequence[str], last_seen: Callable[[str], datetime | None]
) -> str:
    """The tenant an unmatched reply on ``account`` belongs to; ``last_seen(tenant)`` says when
    that tenant's number directory last saw the number (None: never)."""
    if not candidates:
        raise UnroutableReply(f"provider account {account!r} is in no tenant's routes")
    if len(candidates) == 1:
        return candidates[0]
    seen = [(moment, tenant) for tenant in candidates if (moment := last_seen(tenant)) is not None]
    if not seen:
        raise UnroutableReply(
            f"provider account {account!r} serves tenants {sorted(candidates)} "
            "and none of them has sent to this number"
        )
    return max(seen)[1]


class NumberDirectory:
    """How Optimove wrote each tenant's numbers: reads a compacted topic, says what to write.

    ``lookup`` reads the topic's latest value for a key. Records this instance decided to write
    are also remembered locally (a bounded LRU) from the moment it decides, so that neither the
    topic's short lag behind our own writes nor two messages to one number handled at once make
    a campaign write the same number twice.
    """

    def __init__(
        self,
        lookup: Callable[[str], Mapping[str, Any] | None],
        *,
        refresh_s: float,
        remember_at_most: int = 50_000,
    ) -> None:
        self.lookup = lookup
        self.refresh_s = refresh_s
        self.remember_at_most = remember_at_most
        self._written: OrderedDict[str, NumberFormat] = OrderedDict()

    def known(self, tenant: str, e164: str) -> NumberFormat | None:
        key = tenant_number_key(tenant, e164)
        written = self._written.get(key)
        stored = _number_format(self.lookup(key))
        if written is None or (stored is not None and stored.seen_at > written.seen_at):
            return stored
        return written

    def update_for(self, dispatch: DispatchRecord, now: datetime) -> NumberFormat | None:
        """The record to write for this newly joined dispatch, or None if the directory has it."""
        if dispatch.outcome != "accepted" or not dispatch.destination:
            return None
        tenant = dispatch.context.tenant
        current = self.known(tenant, dispatch.destination)
        if (
            current is not None
            and current.mobile_number == dispatch.context.mobile_number
            and (now - current.seen_at).total_seconds() < self.refresh_s
        ):
            return None
        record = NumberFormat(
            tenant=tenant,
            number=dispatch.destination,
            mobile_number=dispatch.context.mobile_number,
            seen_at=now,
        )
        self._remember(record)
        return record

    def withdraw(self, record: NumberFormat) -> None:
        """``record`` from ``update_for`` could not be written: let the next dispatch write it."""
        key = tenant_number_key(record.tenant, record.number)
        if self._written.get(key) is record:
            del self._written[key]

    def _remember(self, record: NumberFormat) -> None:
        key = tenant_number_key(record.tenant, record.number)
        self._written[key] = record
        self._written.move_to_end(key)
        while len(self._written) > self.remember_at_most:
            self._written.popitem(last=False)


def _number_format(value: Mapping[str, Any] | None) -> NumberFormat | None:
    if value is None:
        return None
    try:
        return NumberFormat.model_validate(value)
    except ValidationError:
        log.error("unreadable sms.number-formats record ignored")
        return None


@dataclass(frozen=True)
class RoutedReply:
    """What one reply becomes: the message for Optimove and, maybe, an opt-out change."""

    tenant: str
    number: str  # E.164
    inbound: InboundMessage
    opt_out_change: OptOutChange | None
    # The message replied to, when the reply joined its dispatch.
    message_id: str | None

    @property
    def opt_out_source(self) -> OptOutSource | None:
        change = self.opt_out_change
        if change is None or not change.opted_out:
            return None
        return "provider" if change.source == "provider" else "keyword"


class ReplyRouter:
    def __init__(
        self,
        tenants: Mapping[str, TenantSettings],
        keywords: KeywordRules,
        directory: NumberDirectory,
    ) -> None:
        self.tenants = tenants
        self.keywords = keywords
        self.directory = directory
        self.accounts = tenants_by_account(tenants)

    @classmethod
    def from_settings(cls, settings: Settings, directory: NumberDirectory) -> ReplyRouter:
        normalizer = settings.normalizer
        keywords = KeywordRules.of(normalizer.opt_out_keywords, normalizer.opt_in_keywords)
        return cls(settings.tenants, keywords, directory)

    def route(self, event: ProviderEvent, dispatch: DispatchRecord | None) -> RoutedReply:
        """Raises UnroutableReply when no tenant or no usable number can be found."""
        if event.kind not in ("inbound", "opt_out"):
            raise ValueError(f"not a reply: {event.kind}")
        tenant, e164 = self._tenant_and_number(event, dispatch)
        settings = self.tenants[tenant]
        if dispatch is not None:
            known_as: str | None = dispatch.context.mobile_number
            dispatch_sender = dispatch.sender_id
        else:
            known = self.directory.known(tenant, e164)
            known_as = known.mobile_number if known is not None else None
            dispatch_sender = ""
        sent_at = as_utc(event.occurred_at or event.received_at)
        change = self._opt_out_change(event, tenant, e164, sent_at)
        inbound = InboundMessage(
            event_id=ids.event_id("inbound", event.event_id),
            tenant=tenant,
            to=reply_to(event.to, dispatch_sender, settings.default_sender_id),
            from_number=optimove_from(e164, known_as),
            text=event.text,
            sent_at=sent_at,
            provider_account=event.provider_account,
            opt_out=change is not None and change.opted_out,
            opt_in=change is not None and not change.opted_out,
        )
        return RoutedReply(
            tenant=tenant,
            number=e164,
            inbound=inbound,
            opt_out_change=change,
            message_id=dispatch.context.message_id if dispatch is not None else None,
        )

    def _tenant_and_number(
        self, event: ProviderEvent, dispatch: DispatchRecord | None
    ) -> tuple[str, str]:
        if dispatch is not None:
            tenant = dispatch.context.tenant
            if tenant not in self.tenants:
                raise UnroutableReply(
                    f"tenant {tenant!r} of the replied-to message is not configured"
                )
            # The number the message went to is the one the sender checks opt-outs under.
            e164 = dispatch.destination or customer_e164(
                event.number, self.tenants[tenant].default_region
            )
            if e164 is None:
                raise UnroutableReply("reply without a usable sender number")
            return tenant, e164
        candidates = self.accounts.get(event.provider_account, ())
        numbers = {
            tenant: e164
            for tenant in candidates
            if (e164 := customer_e164(event.number, self.tenants[tenant].default_region))
        }
        if candidates and not numbers:
            raise UnroutableReply(
                f"reply without a usable sender number ({mask_number(event.number)})"
            )

        def last_seen(tenant: str) -> datetime | None:
            known = self.directory.known(tenant, numbers[tenant]) if tenant in numbers else None
            return known.seen_at if known is not None else None

        tenant = choose_tenant(
            event.provider_account, [t for t in candidates if t in numbers], last_seen
        )
        return tenant, numbers[tenant]

    def _opt_out_change(
        self, event: ProviderEvent, tenant: str, e164: str, at: datetime
    ) -> OptOutChange | None:
        if event.kind == "opt_out":
            return OptOutChange(
                tenant=tenant, number=e164, opted_out=True, source="provider", at=at
            )
        action = self.keywords.classify(event.text)
        if action is None:
            return None
        return OptOutChange(
            tenant=tenant, number=e164, opted_out=action == "opt_out", source="keyword", at=at
        )
