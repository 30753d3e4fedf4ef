"""Event schemas: the pydantic models every producer writes and every consumer reads.

Each model carries ``schema_version``; a consumer that meets a version it does not know
dead-letters the record instead of guessing. Values are orjson-encoded JSON.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

CanonicalStatus = Literal["sent", "delivered", "failed"]
FINAL_STATUSES: frozenset[str] = frozenset({"delivered", "failed"})


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="python"))


E = TypeVar("E", bound=Event)


class SchemaError(ValueError):
    """A record that cannot be decoded as the expected event."""


def decode(model: type[E], raw: bytes | None) -> E:
    if raw is None:
        raise SchemaError(f"{model.__name__}: empty record")
    try:
        event = model.model_validate_json(raw)
    except ValueError as exc:
        raise SchemaError(f"{model.__name__}: {exc}") from None
    expected = model.model_fields["schema_version"].default
    if event.schema_version != expected:
        raise SchemaError(
            f"{model.__name__}: schema_version {event.schema_version}, expected {expected}"
        )
    return event


class MessageContext(BaseModel):
    """What every later stage needs to report on one message, carried along unchanged."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    message_id: str
    batch_id: str
    request_id: str | None = None
    campaign_id: str = ""
    customer_id: str = ""
    # Exactly the string Optimove sent; reported back verbatim.
    mobile_number: str
    # The campaign request's ``metadata`` object, as the exact JSON text received.
    metadata_json: str


class RecipientMessage(Event):
    """ingress -> sender: one SMS to send."""

    context: MessageContext
    destination: str  # E.164, "+" and digits
    text: str
    sender_id: str
    scheduled_at: datetime | None = None
    accepted_at: datetime = Field(default_factory=utcnow)


DispatchOutcome = Literal["accepted", "failed"]


class DispatchRecord(Event):
    """sender (or ingress, for rejected recipients) -> normalizer: the result of a send."""

    context: MessageContext
    correlation_key: str
    outcome: DispatchOutcome
    sub_status: str
    provider_kind: str = ""
    provider_account: str = ""
    provider_message_id: str = ""
    destination: str = ""
    detail: str = ""
    segments: int = 0
    dispatched_at: datetime = Field(default_factory=utcnow)
    # The sender id or number the message went out from: where a reply to it is addressed.
    sender_id: str = ""


ProviderEventKind = Literal["status", "inbound", "opt_out"]


class ProviderEvent(Event):
    """callbacks -> normalizer: one provider callback, parsed only enough to be routed."""

    event_id: str  # deterministic from the body, so a repeated callback is recognised
    kind: ProviderEventKind
    provider_kind: str
    provider_account: str
    correlation_key: str
    provider_message_id: str = ""
    number: str = ""
    provider_status: str = ""
    reason: str = ""
    text: str = ""
    to: str = ""
    occurred_at: datetime | None = None
    received_at: datetime = Field(default_factory=utcnow)
    raw: dict[str, Any] = {}


class StatusEvent(Event):
    """normalizer -> reporter: one forward move of a message's status."""

    event_id: str
    context: MessageContext
    status: CanonicalStatus
    sub_status: str
    provider_account: str = ""
    provider_message_id: str = ""
    detail: str = ""
    occurred_at: datetime = Field(default_factory=utcnow)


class InboundMessage(Event):
    """normalizer -> reporter: a customer's reply, in Optimove's Incoming Message shape."""

    event_id: str
    tenant: str
    to: str
    from_number: str  # as Optimove wrote that number when known (decisions.md §5)
    text: str
    sent_at: datetime
    provider_account: str = ""
    opt_out: bool = False
    opt_in: bool = False


class OptOutChange(Event):
    """Compacted, keyed by tenant and E.164 number: the latest word wins."""

    tenant: str
    number: str
    opted_out: bool
    source: str
    at: datetime = Field(default_factory=utcnow)


class NumberFormat(Event):
    """Compacted, keyed by tenant and E.164 number: how Optimove last wrote that number.

    Written by the normalizer when it joins an accepted dispatch, so that a reply's ``from`` is
    reported the way Optimove knows the customer (decisions.md §5); ``seen_at`` tells which
    tenant sent to the number last when several share a provider account.
    """

    tenant: str
    number: str  # E.164
    mobile_number: str  # exactly as Optimove sent it
    seen_at: datetime = Field(default_factory=utcnow)
    # Provider account -> when this tenant last sent to the number through it: who a reply or a
    # STOP on a shared account concerns. Empty in records written before it existed.
    accounts: dict[str, datetime] = {}


class LastInbound(Event):
    """Compacted, keyed by tenant and E.164 number: when the customer last wrote to the tenant.

    Written by the normalizer for every reply it forwards (a STOP included); the sender reads it
    to let Optimove's auto reply to an opted-out customer who just wrote to us go out.
    """

    tenant: str
    number: str  # E.164
    # When the callbacks service received the customer's message (our clock, not the provider's).
    at: datetime


class IngressRequestAccepted(Event):
    """Compacted, keyed by tenant and the request's ids, or for a request without ids (auto
    replies) its content key: a campaign request already on Kafka (services/ingress/ledger.py).
    """

    tenant: str
    # What its message ids derive from; for an id-less request, content and first acceptance.
    request_key: str
    campaign_id: str = ""  # metadata.campaignId; "" for auto replies
    accepted: int
    rejected: list[dict[str, Any]] = []
    # Recipients whose bare-digit number was valid both ways, read as ambiguous_read_as says.
    ambiguous: list[int] = []
    ambiguous_read_as: str = ""
    # An id-less request's claim on its request key, written before its records: a retry after
    # a failure reuses the key (hence the message ids). Nothing is on Kafka yet.
    pending: bool = False
    at: datetime = Field(default_factory=utcnow)


class DeadLetter(Event):
    """Anything a stage gave up on, with enough to understand and re-drive it."""

    source_topic: str
    stage: str
    reason: str
    key: str | None = None
    payload: str  # the original record value, UTF-8 (or repr for binary)
    attempts: int = 0
    status_code: int | None = None
    response_excerpt: str = ""
    redrive_topic: str = ""
    at: datetime = Field(default_factory=utcnow)


class StateChange(Event):
    """Compacted changelog of a local state store (``shared/kafka/store.py``), keyed by the store
    key.

    A null value (tombstone) deletes the key; ``due_at`` (Unix seconds) arms the key's timer.
    """

    value: dict[str, Any]
    due_at: float | None = None

    def to_bytes(self) -> bytes:
        # ``value`` is JSON-shaped already (stores keep what orjson wrote): the generic encoding
        # walked all of it again through pydantic's serializer of ``Any``, for the same bytes.
        return orjson.dumps(
            {"schema_version": self.schema_version, "value": self.value, "due_at": self.due_at}
        )


ControlAction = Literal["pause", "resume", "cancel"]


class CampaignControl(Event):
    """Compacted, keyed by ``shared.contract.campaign_controls.control_key``: the operator's
    latest word on one campaign, or on every campaign of a tenant (``campaign_id`` None).
    ``shared.contract.campaign_controls`` says what a message does under it."""

    tenant: str
    campaign_id: str | None = None  # None: the whole tenant, auto replies included
    action: ControlAction
    reason: str = ""
    requested_by: str = ""
    at: datetime = Field(default_factory=utcnow)


class CampaignPace(BaseModel):
    """How one campaign goes on one sender instance (``SenderStatus``)."""

    tenant: str
    campaign: str  # "" for auto replies
    account: str = ""
    # Its part of the account's sends here over the last seconds (0..1), and its sends/s.
    share: float = 0.0
    sends_per_s: float = 0.0
    waiting_for_window: int = 0  # parked until its send window opens


class SenderStatus(Event):
    """Compacted ``sms.sender-status``, keyed by sender instance, published every few seconds
    (a tombstone when it stops): what the campaign status shows as share and window waits."""

    instance: str
    at: datetime = Field(default_factory=utcnow)
    campaigns: list[CampaignPace] = []


ReportKind = Literal["delivery", "incoming"]


class ReportOutcome(Event):
    """reporter -> campaigns (``sms.report-outcomes``, keyed by tenant): one request to Optimove
    that Optimove accepted, counted in messages per campaign id.

    A delivery report counts one message under its ``metadata.campaignId`` ("" for auto
    replies); an incoming-message request counts its replies under "" (a reply belongs to no
    campaign)."""

    tenant: str
    kind: ReportKind
    counts: dict[str, int]
    at: datetime = Field(default_factory=utcnow)


class CampaignCounts(Event):
    """Compacted ``sms.campaign-counts``, keyed by tenant, campaign group and input partition
    (``services/campaigns/counts.py``): what the campaigns service counted of one campaign in one
    partition of one input topic, every record up to and including input ``offset``."""

    tenant: str
    campaign: (
        str  # shared.contract.campaign_controls.campaign_group: auto replies under AUTO_REPLIES
    )
    source_topic: str
    source_partition: int
    offset: int
    accepted: int = 0
    rejected: int = 0
    # Recipients scheduled for later: (Unix second of their scheduled time, recipients); "held
    # for schedule" is what is still in the future when asked.
    scheduled: list[tuple[int, int]] = []
    sent: int = 0
    delivered: int = 0
    failed: dict[str, int] = {}  # sub-status -> messages
    dead_lettered: int = 0
    reports_acknowledged: int = 0  # delivery reports Optimove accepted
    replies_acknowledged: int = 0  # replies Optimove accepted (incoming messages)
    first_at: datetime
    last_at: datetime


class RedriveMarker(Event):
    """A dead letter already sent back (compacted, keyed by its partition and offset)."""

    dead_letter_at: datetime
    redrive_topic: str
    redriven_at: datetime = Field(default_factory=utcnow)
