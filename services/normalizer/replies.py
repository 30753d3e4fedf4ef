"""Replies and STOPs: a provider ``inbound`` or ``opt_out`` event made into what Optimove needs.

Plain logic over plain values (decisions.md §5, §6): which tenant a reply belongs to (the
joined dispatch's, else the one tenant of the account, else the one that sent to the number
there last, else ``UnroutableReply``), which tenants a STOP or START concerns, how ``from`` and
``to`` are written for Optimove, and whether the opt-out changes. Nothing here touches Kafka; the
number directory is read through a lookup function. The rules in full: ``docs/normalizer.md``.
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

from shared.config import Settings, TenantSettings
from shared.contract import ids
from shared.contract.events import (
    DispatchRecord,
    InboundMessage,
    LastInbound,
    NumberFormat,
    OptOutChange,
    ProviderEvent,
)
from shared.contract.ids import tenant_number_key
from shared.contract.keywords import KeywordAction, KeywordRules
from shared.contract.numbers import InvalidNumber, digits_only, to_e164
from shared.logs import mask_number

log = logging.getLogger(__name__)

# ``OptOutChange.source`` values, also the ``source`` label of ``smsbridge_optout_total``.
OptOutSource = Literal["keyword", "provider"]

# A number a provider already wrote in international form: "+" then 6 to 15 digits.
_INTERNATIONAL = re.compile(r"\+[1-9][0-9]{5,14}")


class UnroutableReply(ValueError):
    """A reply no tenant can be found for (or without a usable number); the text says why."""


def customer_e164(raw: str, region: str) -> str | None:
    """The customer's number in E.164, or None. Providers write international digits, so bare
    digits valid both ways are read internationally (6596234567 is Singapore, not +1 659...).

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
    that tenant last sent to the number through the account (None: never)."""
    if not candidates:
        raise UnroutableReply(f"provider account {account!r} is in no tenant's routes")
    if len(candidates) == 1:
        return candidates[0]
    seen = [(moment, tenant) for tenant in candidates if (moment := last_seen(tenant)) is not None]
    if not seen:
        raise _nobody_sent(account, candidates)
    return max(seen)[1]


def opt_out_tenants(
    account: str,
    candidates: Sequence[str],
    joined: str | None,
    last_seen: Callable[[str], datetime | None],
) -> tuple[str, ...]:
    """Every tenant a STOP (or START) on ``account`` concerns, the one it would be a reply of
    first: the tenant of the replied-to message (``joined``) and each of the account's tenants
    that sent to the number through it, most recent first. On an account of one tenant, that
    tenant even if it never sent there (as ``choose_tenant``)."""
    sent = [(moment, tenant) for tenant in candidates if (moment := last_seen(tenant)) is not None]
    others = tuple(tenant for _, tenant in sorted(sent, reverse=True) if tenant != joined)
    if joined is not None:
        return (joined, *others)
    if others:
        return others
    return (choose_tenant(account, candidates, last_seen),)


def _nobody_sent(account: str, candidates: Sequence[str]) -> UnroutableReply:
    return UnroutableReply(
        f"provider account {account!r} serves tenants {sorted(candidates)} "
        "and none of them has sent to this number"
    )


def sent_through(record: NumberFormat | None, account: str) -> datetime | None:
    """When ``record``'s tenant last sent to its number through ``account`` (None: never). A
    record written before accounts were recorded counts for every account, from its ``seen_at``."""
    if record is None:
        return None
    if not record.accounts:
        return record.seen_at
    return record.accounts.get(account)


def stamp_due(
    current: NumberFormat | None,
    mobile_number: str,
    account: str,
    now: datetime,
    refresh_s: float,
    rivals_since: Callable[[datetime], bool],
) -> bool:
    """Whether a dispatch to the number through ``account`` must be written to the directory.

    When nothing is known, Optimove respelt the number, the account is new for the tenant, the
    stamp is older than ``refresh_s``, or ``rivals_since(stamp)``: another tenant sharing the
    account sent to the number since our stamp, so that a reply still goes to whoever sent last.
    """
    if current is None or current.mobile_number != mobile_number:
        return True
    stamp = current.accounts.get(account) if account else current.seen_at
    if stamp is None:
        return True
    return (now - stamp).total_seconds() >= refresh_s or rivals_since(stamp)


class NumberDirectory:
    """How Optimove wrote each tenant's numbers: reads a compacted topic, says what to write.

    ``lookup`` reads the topic's latest value for a key. Records this instance decided to write
    are also remembered locally (a bounded LRU) from the moment it decides, so that neither the
    topic's short lag behind our own writes nor two messages to one number handled at once make
    a campaign write the same number twice.

    Each record also says when its tenant last sent to the number through each provider account
    (``NumberFormat.accounts``): ``tenants_by_account`` names the tenants sharing an account, whose
    later stamps make ours stale (``stamp_due``).
    """

    def __init__(
        self,
        lookup: Callable[[str], Mapping[str, Any] | None],
        *,
        refresh_s: float,
        tenants_by_account: Mapping[str, Sequence[str]] | None = None,
        remember_at_most: int = 50_000,
    ) -> None:
        self.lookup = lookup
        self.refresh_s = refresh_s
        self.tenants_by_account = dict(tenants_by_account or {})
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
        tenant, number = dispatch.context.tenant, dispatch.destination
        account = dispatch.provider_account
        current = self.known(tenant, number)

        def rivals_since(stamp: datetime) -> bool:
            return any(
                (theirs := sent_through(self.known(rival, number), account)) is not None
                and theirs > stamp
                for rival in self.tenants_by_account.get(account, ())
                if rival != tenant
            )

        mobile_number = dispatch.context.mobile_number
        if not stamp_due(current, mobile_number, account, now, self.refresh_s, rivals_since):
            return None
        accounts = dict(current.accounts) if current is not None else {}
        if account:
            accounts[account] = now
        record = NumberFormat(
            tenant=tenant,
            number=number,
            mobile_number=mobile_number,
            seen_at=now,
            accounts=accounts,
        )
        self._remember(record)
        return record

    def sent_through(self, tenant: str, e164: str, account: str) -> datetime | None:
        """When ``tenant`` last sent to ``e164`` through ``account``, as far as known."""
        return sent_through(self.known(tenant, e164), account)

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
    """What one reply becomes for one tenant: the message for Optimove, the time the customer
    wrote (for auto replies, ``sms.last-inbound``) and, maybe, an opt-out change."""

    tenant: str
    number: str  # E.164
    inbound: InboundMessage
    last_inbound: LastInbound
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

    def route(
        self, event: ProviderEvent, dispatch: DispatchRecord | None
    ) -> tuple[RoutedReply, ...]:
        """One ``RoutedReply`` per tenant concerned: one for a reply, every tenant that sent to
        the number through the account for a STOP or START. Raises UnroutableReply when no
        tenant or no usable number can be found."""
        if event.kind not in ("inbound", "opt_out"):
            raise ValueError(f"not a reply: {event.kind}")
        action: KeywordAction | None = (
            "opt_out" if event.kind == "opt_out" else self.keywords.classify(event.text)
        )
        targets = self._targets(event, dispatch, every=action is not None)
        return tuple(
            self._routed(event, tenant, e164, dispatch if index == 0 else None, action, index)
            for index, (tenant, e164) in enumerate(targets)
        )

    def _routed(
        self,
        event: ProviderEvent,
        tenant: str,
        e164: str,
        dispatch: DispatchRecord | None,
        action: KeywordAction | None,
        index: int,
    ) -> RoutedReply:
        """``dispatch``: the replied-to message, when it is this tenant's."""
        settings = self.tenants[tenant]
        if dispatch is not None:
            known_as: str | None = dispatch.context.mobile_number
            dispatch_sender = dispatch.sender_id
        else:
            known = self.directory.known(tenant, e164)
            known_as = known.mobile_number if known is not None else None
            dispatch_sender = ""
        sent_at = as_utc(event.occurred_at or event.received_at)
        change = None
        if action is not None:
            change = OptOutChange(
                tenant=tenant,
                number=e164,
                opted_out=action == "opt_out",
                source="provider" if event.kind == "opt_out" else "keyword",
                at=sent_at,
            )
        inbound = InboundMessage(
            # The first tenant keeps the id a reply always had; the others' are their own.
            event_id=ids.event_id("inbound", event.event_id, *([tenant] if index else [])),
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
            # Our clock: the provider's may be off by hours (Octopush writes Paris time).
            last_inbound=LastInbound(tenant=tenant, number=e164, at=as_utc(event.received_at)),
            opt_out_change=change,
            message_id=dispatch.context.message_id if dispatch is not None else None,
        )

    def _targets(
        self, event: ProviderEvent, dispatch: DispatchRecord | None, *, every: bool
    ) -> list[tuple[str, str]]:
        """(tenant, E.164) the reply goes to, the replied-to message's tenant first; ``every``:
        all the tenants a STOP or START concerns (``opt_out_tenants``), else one."""
        joined: tuple[str, str] | None = None
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
            joined = (tenant, e164)
            if not every:
                return [joined]
        account = event.provider_account
        candidates = self.accounts.get(account, ())
        numbers = {
            tenant: e164
            for tenant in candidates
            if (e164 := customer_e164(event.number, self.tenants[tenant].default_region))
        }
        if joined is not None:
            numbers[joined[0]] = joined[1]
        elif candidates and not numbers:
            raise UnroutableReply(
                f"reply without a usable sender number ({mask_number(event.number)})"
            )

        def last_seen(tenant: str) -> datetime | None:
            if tenant not in numbers:
                return None
            return self.directory.sent_through(tenant, numbers[tenant], account)

        usable = [t for t in candidates if t in numbers]
        if every:
            chosen = opt_out_tenants(account, usable, joined[0] if joined else None, last_seen)
            return [(tenant, numbers[tenant]) for tenant in chosen]
        tenant = choose_tenant(account, usable, last_seen)
        return [(tenant, numbers[tenant])]
