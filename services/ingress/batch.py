"""Campaign Transmission requests (optimove-sms-api.md §3): parse, validate, turn into records.

No I/O here: the HTTP handler hands in the raw body and publishes what comes out. The hot path is
``build_records``, run once per recipient of batches of up to 100,000, so it builds each Kafka
value from a per-request template instead of constructing pydantic models recipient by recipient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import TenantSettings
from shared.contract.events import DispatchRecord, MessageContext, RecipientMessage
from shared.contract.ids import (
    content_key,
    message_id,
    request_key,
    tenant_number_key,
    unsent_correlation_key,
)
from shared.contract.numbers import InvalidNumber, Reading
from shared.contract.priority import is_priority
from shared.contract.statuses import SubStatus

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")
_DECODER: Final = json.JSONDecoder()

MISSING_NUMBER = "missing mobile number"
EMPTY_MESSAGE = "empty message"


class InvalidJson(ValueError):
    """The body is not JSON at all."""


class SchemaViolation(ValueError):
    """The body is JSON but not a campaign request; ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class CampaignMetadata(BaseModel):
    """The parts of ``metadata`` ingress reads; the whole object travels on as received."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    app_id: int = Field(alias="appId")
    # "" in auto replies; null is read as absent.
    campaign_id: str | None = Field(default=None, alias="campaignId")
    # Unix epoch milliseconds.
    scheduled_time: int | None = Field(default=None, alias="scheduledTime")


class CampaignRequest(BaseModel):
    """The JSON Schema of optimove-sms-api.md §3.6; unknown fields are tolerated."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    batch_id: str = Field(alias="batchId")  # "" in auto replies
    metadata: CampaignMetadata
    # Items are checked by parse_campaign: a model per recipient would dominate the request's cost.
    recipients: list[Any] | None = None
    request_id: str | None = Field(default=None, alias="requestId")
    sender_id: str | None = Field(default=None, alias="senderId")


@dataclass(frozen=True)
class ParsedCampaign:
    request: CampaignRequest
    # What the ledger knows the request by: its batchId and requestId, or without either (auto
    # replies) its content, whatever the whitespace (shared/contract/ids.py).
    identity: str
    by_content: bool
    # The exact JSON text of the top-level "metadata" value, as received.
    metadata_json: str
    scheduled_at: datetime | None

    @property
    def recipients(self) -> list[dict[str, Any]]:
        return self.request.recipients or []


_RECIPIENT_STRING_FIELDS: Final = ("message", "mobileNumber", "customerId")


def parse_campaign(raw: bytes) -> ParsedCampaign:
    """Validate a request body; raises InvalidJson or SchemaViolation."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SchemaViolation("(root)", "must be a JSON object")
    try:
        request = CampaignRequest.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise SchemaViolation(path, first["msg"]) from None
    for index, recipient in enumerate(request.recipients or ()):
        if not isinstance(recipient, dict):
            raise SchemaViolation(f"recipients.{index}", "must be an object")
        for name in _RECIPIENT_STRING_FIELDS:
            value = recipient.get(name)
            if value is not None and not isinstance(value, str):
                raise SchemaViolation(f"recipients.{index}.{name}", "must be a string")
    try:
        metadata_json = metadata_text(raw.decode("utf-8"), document["metadata"])
    except RecursionError:
        # orjson reads 1,024 levels, Python's json (which finds the exact text) fewer.
        raise SchemaViolation("(root)", "nested too deeply") from None
    identity = request_key(request.batch_id, request.request_id)
    return ParsedCampaign(
        request=request,
        identity=identity if identity is not None else _content_identity(document),
        by_content=identity is None,
        metadata_json=metadata_json,
        scheduled_at=scheduled_at(request.metadata.scheduled_time),
    )


def _content_identity(document: dict[str, Any]) -> str:
    """The content key of the parsed body: a body that verified only in its compact
    re-serialisation, sent again with other whitespace, is the same request."""
    try:
        canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        # orjson writes 254 levels; such a body is no auto reply.
        raise SchemaViolation("(root)", "nested too deeply") from None
    return content_key(canonical)


def scheduled_at(epoch_ms: int | None) -> datetime | None:
    """``metadata.scheduledTime`` as a time; absent, zero or negative means "now"."""
    if epoch_ms is None or epoch_ms <= 0:
        return None
    try:
        return _EPOCH + timedelta(milliseconds=epoch_ms)
    except OverflowError:
        raise SchemaViolation("metadata.scheduledTime", "out of range") from None


def _skip_whitespace(text: str, position: int) -> int:
    match = _WHITESPACE.match(text, position)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def top_level_members(text: str) -> Iterator[tuple[str, Any, int, int]]:
    """(name, value, start, end) of each member of the JSON object ``text``, in order.

    ``text[start:end]`` is the member's value exactly as written. ``text`` must be valid JSON.
    """
    position = _skip_whitespace(text, 0)
    if text[position : position + 1] != "{":
        raise ValueError("not a JSON object")
    position = _skip_whitespace(text, position + 1)
    if text[position : position + 1] == "}":
        return
    while True:
        if text[position : position + 1] != '"':
            raise ValueError(f"expected a member name at {position}")
        name, position = _DECODER.raw_decode(text, position)
        position = _skip_whitespace(text, position)
        if text[position : position + 1] != ":":
            raise ValueError(f"expected ':' at {position}")
        start = _skip_whitespace(text, position + 1)
        value, end = _DECODER.raw_decode(text, start)
        yield name, value, start, end
        position = _skip_whitespace(text, end)
        separator = text[position : position + 1]
        if separator == "}":
            return
        if separator != ",":
            raise ValueError(f"expected ',' or '}}' at {position}")
        position = _skip_whitespace(text, position + 1)


def metadata_text(text: str, parsed_metadata: Any) -> str:
    """The exact text of the top-level ``metadata`` value, to be reported back byte for byte.

    Stops at the first ``metadata`` member whose value is the one the parser kept, so the large
    ``recipients`` array after it is never decoded twice. A body repeating the member (parsers keep
    the last) is still answered with the text of the value that was validated.
    """
    last: str | None = None
    for name, value, start, end in top_level_members(text):
        if name == "metadata":
            last = text[start:end]
            if value == parsed_metadata:
                return last
    if last is None:
        raise SchemaViolation("metadata", "Field required")
    return last


@dataclass(frozen=True)
class Rejection:
    index: int
    reason: str
    sub_status: SubStatus

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason}


@dataclass
class CampaignRecords:
    """What one request puts on Kafka, as (key, value) pairs ready for the producer."""

    request_key: str
    # An auto reply or a priority campaign: its recipients go to sms.recipients-priority.
    priority: bool = False
    recipients: list[tuple[bytes, bytes]] = field(default_factory=list)  # sms.recipients
    dispatches: list[tuple[bytes, bytes]] = field(default_factory=list)  # sms.dispatches
    rejections: list[Rejection] = field(default_factory=list)
    # Indexes of sent recipients whose bare digits were a valid number both ways, and how the
    # tenant's bare_digits read them.
    ambiguous: list[int] = field(default_factory=list)
    ambiguous_read_as: str = ""

    @property
    def accepted(self) -> int:
        return len(self.recipients)


def build_records(
    *,
    tenant: str,
    settings: TenantSettings,
    campaign: ParsedCampaign,
    read: Callable[[str], Reading],
    accepted_at: datetime,
    request_key: str | None = None,
) -> CampaignRecords:
    """One RecipientMessage per sendable recipient, one failed DispatchRecord per rejected one.

    ``read`` turns a number into its E.164 reading or raises InvalidNumber
    (``shared.contract.numbers.read_number`` or an equivalent). ``request_key``, what the
    message ids derive from, is the request's identity unless given (an id-less request's key
    carries its first acceptance time: services/ingress/ledger.py).
    """
    request = campaign.request
    key = request_key if request_key is not None else campaign.identity
    context_template = MessageContext(
        tenant=tenant,
        message_id="",
        batch_id=request.batch_id,
        request_id=request.request_id,
        campaign_id=request.metadata.campaign_id or "",
        mobile_number="",
        metadata_json=campaign.metadata_json,
    )
    # Every value is this model's to_bytes() with the per-recipient fields replaced: the
    # template keeps the schema (field order, defaults, schema_version) in one place.
    message_template = RecipientMessage(
        context=context_template,
        destination="",
        text="",
        sender_id=request.sender_id or settings.default_sender_id,
        scheduled_at=campaign.scheduled_at,
        accepted_at=accepted_at,
    ).model_dump(mode="python")
    context_fields = message_template["context"]
    records = CampaignRecords(
        request_key=key,
        priority=is_priority(
            request.batch_id, request.metadata.campaign_id, settings.priority_campaigns
        ),
        ambiguous_read_as=settings.bare_digits,
    )
    append_recipient = records.recipients.append
    dumps = orjson.dumps
    for index, recipient in enumerate(campaign.recipients):
        number: str | None = recipient.get("mobileNumber")
        text: str | None = recipient.get("message")
        customer_id = recipient.get("customerId") or ""
        mobile_number = number or ""
        identifier = message_id(tenant, key, index, mobile_number)
        destination, ambiguous, rejection = _check_recipient(index, number, text, read)
        if rejection is not None:
            records.rejections.append(rejection)
            context_of_rejected = context_template.model_copy(
                update={
                    "message_id": identifier,
                    "customer_id": customer_id,
                    "mobile_number": mobile_number,
                }
            )
            records.dispatches.append(
                _rejected_dispatch(context_of_rejected, rejection, destination, accepted_at)
            )
            continue
        context = context_fields.copy()
        context["message_id"] = identifier
        context["customer_id"] = customer_id
        context["mobile_number"] = mobile_number
        message = message_template.copy()
        message["context"] = context
        message["destination"] = destination
        message["text"] = text
        append_recipient((tenant_number_key(tenant, destination).encode(), dumps(message)))
        if ambiguous:
            records.ambiguous.append(index)
    return records


def _check_recipient(
    index: int, number: str | None, text: str | None, read: Callable[[str], Reading]
) -> tuple[str, bool, Rejection | None]:
    """The E.164 destination ("" if none), whether its digits read another valid number the
    other way, and why the recipient cannot be sent, if it cannot."""
    if number is None:
        return "", False, Rejection(index, MISSING_NUMBER, SubStatus.INVALID_NUMBER)
    try:
        destination, ambiguous = read(number)
    except InvalidNumber as exc:
        return "", False, Rejection(index, str(exc), SubStatus.INVALID_NUMBER)
    if text is None or not text.strip():
        return destination, ambiguous, Rejection(index, EMPTY_MESSAGE, SubStatus.EMPTY_MESSAGE)
    return destination, ambiguous, None


def _rejected_dispatch(
    context: MessageContext, rejection: Rejection, destination: str, at: datetime
) -> tuple[bytes, bytes]:
    correlation_key = unsent_correlation_key(context.message_id)
    record = DispatchRecord(
        context=context,
        correlation_key=correlation_key,
        outcome="failed",
        sub_status=rejection.sub_status.value,
        destination=destination,
        detail=rejection.reason,
        dispatched_at=at,
    )
    return correlation_key.encode(), record.to_bytes()
