"""Octopush (octopush.com, API v1): bulk campaigns under one ticket, three kinds of callback.

Send: ``POST {base_url}/sms-campaign/send``, up to 500 recipients sharing text and sender, with
``auto_remove_blacklisted_numbers`` on and ``request_id`` derived from our message ids (Octopush
de-duplicates a resent call for 24 h). The answer's ``sms_ticket`` covers the whole call:
``correlation_key`` is ``account:ticket:number``. Callbacks: ``stop_date`` -> opt-out, else
``answer_date``/``reception_date`` -> inbound, else ``delivery_date`` -> delivery report.
Every guess at what the documentation leaves out lives here (callback dates in Paris time, the
error body, a STOP without text, a duplicate ``request_id``): docs/providers.md, "Octopush".
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import orjson
from multidict import CIMultiDict

from shared.contract.events import CanonicalStatus, ProviderEventKind
from shared.contract.numbers import digits_only, in_style
from shared.contract.statuses import SubStatus
from shared.providers.base import (
    CallbackRejected,
    CallbackReply,
    OutboundSms,
    ParsedCallback,
    Provider,
    SendAccepted,
    SendError,
    SendResult,
    fallback_error,
    first_message,
)
from shared.providers.bulk import send_in_calls
from shared.providers.http import parse_retry_after
from shared.times import parse_iso

PARIS = ZoneInfo("Europe/Paris")
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
SMS_TYPE = "sms_premium"  # the low-cost type sends no delivery reports

FIXTURES: dict[str, Any] = {
    "send_request": {
        "recipients": [{"phone_number": "+33600000000"}],
        "text": "Here is your message",
        "type": "sms_premium",
        "purpose": "alert",
        "sender": "MyCompany",
        "request_id": "my-request-1",
        "with_replies": True,
        "auto_optimize_text": False,
        "auto_remove_blacklisted_numbers": True,
    },
    "send_response": {
        "sms_ticket": "sms_5fec89fe97109",
        "number_of_contacts": 1,
        "total_cost": 0.0333,
        "number_of_sms_needed": 1,
        "residual_credit": 99.5,
    },
    "callback_delivered": {
        "channel": "sms",
        "message_id": "sms_0000000000000000000000",
        "list_name": "List Name",
        "number": "+33600112233",
        "status": "DELIVERED",
        "unit_price": 0.5,
        "delivery_date": "2025-01-22 11:46:06",
        "meta_data": {},
    },
    "callback_inbound": {
        "message_id": "sms_5fa275dbf21dc",
        "number": "+33600000000",
        "text": "some reply",
        "sim_card_number": "12345",
        "reception_date": "2020-11-04 11:11:45",
    },
    "callback_stop": {
        "message_id": "sms_5fa275dbf21dc",
        "number": "+33600000000",
        "text": "stop",
        "stop_date": "2020-11-04 11:11:45",
    },
    # The legacy API's answer, for the error-code field it documents.
    "legacy_send_response": {
        "error_code": "000",
        "cost": 0.055,
        "balance": 6.93,
        "ticket": "api110000000021",
        "sending_date": 1501503703,
        "number_of_sendings": 1,
        "currency_code": "€",
        "failures": [],
        "successs": {
            "recipient": 33601010101,
            "country_code": "FR",
            "cost": 0.550,
            "sms_needed": 1,
        },
    },
}

DUPLICATE_REQUEST = 120
# Legacy error code -> (retryable, sub-status, meaning). Account problems retry (and fail over):
# nothing is wrong with the message itself.
ERROR_CODES: dict[int, tuple[bool, str, str]] = {
    101: (True, SubStatus.PROVIDER_ERROR, "bad login"),
    102: (False, SubStatus.REJECTED, "text too long for this SMS type"),
    103: (False, SubStatus.INVALID_NUMBER, "no valid recipients"),
    104: (True, SubStatus.PROVIDER_ERROR, "out of credit"),
    105: (True, SubStatus.PROVIDER_ERROR, "out of credit"),
    106: (False, SubStatus.REJECTED, "bad sender: 3-11 letters or digits"),
    107: (False, SubStatus.EMPTY_MESSAGE, "missing text"),
    110: (False, SubStatus.INVALID_NUMBER, "no valid recipients"),
    113: (True, SubStatus.PROVIDER_ERROR, "account not validated"),
    114: (True, SubStatus.PROVIDER_ERROR, "account under fraud investigation"),
    117: (False, SubStatus.INVALID_NUMBER, "no valid recipients"),
    119: (False, SubStatus.REJECTED, "text too long for this SMS type"),
    DUPLICATE_REQUEST: (False, SubStatus.PROVIDER_ERROR, "duplicate request_id"),
    121: (False, SubStatus.REJECTED, "missing STOP mention"),
    122: (False, SubStatus.REJECTED, "missing STOP mention"),
    150: (False, SubStatus.INVALID_NUMBER, "country not found"),
    # Another route may serve the country.
    151: (True, SubStatus.PROVIDER_ERROR, "country not served"),
    152: (False, SubStatus.REJECTED, "low cost not allowed, use premium"),
    153: (True, SubStatus.PROVIDER_ERROR, "route congested"),
    500: (True, SubStatus.PROVIDER_ERROR, "internal error"),
    501: (True, SubStatus.PROVIDER_ERROR, "connection error"),
}
_CODE_FIELDS = ("code", "error_code", "errorCode")
_MESSAGE_FIELDS = ("message", "error", "error_message", "detail", "title")
_DUPLICATE_TEXT = re.compile(r"request[_ ]?id.*(duplicat|already|exist|used)", re.I | re.S)
_INVALID_NUMBER_TEXT = re.compile(r"\binvalid\b.*\b(phone|number|recipient)", re.I | re.S)

STOP_DATE, DELIVERY_DATE = "stop_date", "delivery_date"
# The customer's words of a STOP callback that gives none (see the module docstring).
STOP_TEXT = "STOP"
INBOUND_DATES = ("answer_date", "reception_date")


class Octopush(Provider):
    kind = "octopush"
    max_batch = 500
    number_style = "plus"
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]] = {
        "ACK": ("sent", SubStatus.ACKNOWLEDGED),
        "DELIVERED": ("delivered", SubStatus.DELIVERED),
        "READ": ("delivered", SubStatus.DELIVERED),
        "NOT_DELIVERED": ("failed", SubStatus.UNDELIVERABLE),
        "NOT_ALLOWED": ("failed", SubStatus.REJECTED),
        "BAD_DESTINATION": ("failed", SubStatus.INVALID_NUMBER),
        "BLACKLISTED_NUMBER": ("failed", SubStatus.BLACKLISTED),
        # Octopush's last word without an outcome: reported as a report that never came.
        "UNKNOWN_DELIVERY": ("failed", SubStatus.EXPIRED),
        "UNDEFINED": ("failed", SubStatus.EXPIRED),
    }
    # Nothing displayed, not even a content type (providers.md §3.2).
    callback_reply = CallbackReply(status=200, body=b"", content_type=None)
    # ``request_id`` is derived from the call's message ids, in order: an identical resend is
    # refused as a duplicate instead of being sent twice.
    deduplicates_resends = True

    @property
    def send_url(self) -> str:
        return f"{self.settings.base_url.rstrip('/')}/sms-campaign/send"

    @classmethod
    def correlation_key(cls, account: str, provider_message_id: str, number: str) -> str:
        return f"{account}:{provider_message_id}:{number}"

    def request_body(self, call: Sequence[OutboundSms]) -> dict[str, Any]:
        first = call[0]
        body: dict[str, Any] = {
            "recipients": [
                {"phone_number": in_style(sms.destination, self.number_style)} for sms in call
            ],
            "text": first.text,
            "type": SMS_TYPE,
            "purpose": self.settings.purpose,
            "request_id": request_id(call),
            "with_replies": self.settings.with_replies,
            "auto_optimize_text": False,
            "auto_remove_blacklisted_numbers": True,
        }
        if first.sender_id:
            body["sender"] = first.sender_id
        return body

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        return await send_in_calls(batch, self.max_batch, self._send_call)

    async def _send_call(self, call: list[OutboundSms]) -> list[SendResult]:
        headers = {
            "api-key": self.settings.api_key.get_secret_value(),
            "api-login": self.settings.api_login,
            "cache-control": "no-cache",
        }
        return await self.post_json(
            self.send_url, self.request_body(call), headers, call, self.read_send_response
        )

    def read_send_response(
        self,
        call: Sequence[OutboundSms],
        status: int,
        raw: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> list[SendResult]:
        """One result per message of ``call``; a call succeeds or fails as a whole."""
        received = CIMultiDict(headers or {})
        try:
            body: Any = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            detail = f"HTTP {status} with an unreadable body"
            if status < 300:
                # Accepted or not? Unknown: only an identical resend (same request_id) is safe.
                return [
                    SendError(
                        detail,
                        retryable=False,
                        sub_status=SubStatus.PROVIDER_ERROR,
                        status_code=status,
                        maybe_accepted=True,
                    )
                    for _ in call
                ]
            return [error_for(status, {}, received, detail) for _ in call]
        if status < 300:
            ticket = body.get("sms_ticket")
            if isinstance(ticket, str) and ticket.strip():
                return [self._accepted(sms, ticket.strip()) for sms in call]
            if error_code(body) is None:
                return [
                    SendError(
                        f"HTTP {status} without sms_ticket",
                        retryable=False,
                        sub_status=SubStatus.PROVIDER_ERROR,
                        status_code=status,
                    )
                    for _ in call
                ]
        return [error_for(status, body, received) for _ in call]

    def _accepted(self, sms: OutboundSms, ticket: str) -> SendAccepted:
        number = in_style(sms.destination, self.number_style)
        key = self.correlation_key(self.account, ticket, number)
        return SendAccepted(sms.message_id, ticket, key)

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        payload = decode_callback(body, content_type)
        fields = {str(name).strip().lower(): value for name, value in payload.items()}
        if STOP_DATE in fields:
            return [_inbound(fields, payload, "opt_out", STOP_DATE)]
        inbound_date = next((name for name in INBOUND_DATES if name in fields), None)
        if inbound_date is not None:
            return [_inbound(fields, payload, "inbound", inbound_date)]
        if DELIVERY_DATE in fields:
            return [_delivery_report(fields, payload)]
        raise CallbackRejected(
            "not an Octopush callback: no stop_date, answer_date, reception_date or delivery_date"
        )


def request_id(call: Sequence[OutboundSms]) -> str:
    """The same messages give the same id, so Octopush refuses a resent call for 24 h."""
    digest = hashlib.sha256("\x1f".join(sms.message_id for sms in call).encode("utf-8"))
    return "sb-" + digest.hexdigest()[:40]


def error_for(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str], detail: str | None = None
) -> SendError:
    """A refused call: the legacy error code when there is one, else the HTTP status."""
    message = detail or first_message(body, _MESSAGE_FIELDS)
    wait = parse_retry_after(headers.get("Retry-After"))
    code = error_code(body)
    if code == DUPLICATE_REQUEST or (code is None and _DUPLICATE_TEXT.search(message)):
        return SendError(
            "Octopush already accepted this very call (duplicate request_id): it went through "
            "earlier, but its ticket is unknown, so its delivery reports cannot be matched"
            + (f" ({message})" if message else ""),
            retryable=False,
            sub_status=SubStatus.PROVIDER_ERROR,
            status_code=status,
        )
    if code is not None:
        retryable, sub_status, meaning = ERROR_CODES[code]
        return SendError(
            f"Octopush error {code} ({meaning}): {message or meaning}"[:300],
            retryable=retryable,
            sub_status=sub_status,
            retry_after_s=wait if retryable else None,
            status_code=status,
        )
    # 401/403 is our key, login or account.
    return fallback_error(status, message, wait, _INVALID_NUMBER_TEXT)


def error_code(body: Mapping[str, Any]) -> int | None:
    """A known legacy error code in an answer; ``000`` (the legacy "OK") is none."""
    places: list[Mapping[str, Any]] = [body]
    nested = body.get("error")
    if isinstance(nested, dict):
        places.append(nested)
    for place in places:
        for name in _CODE_FIELDS:
            value = place.get(name)
            code: int | None = None
            if isinstance(value, int) and not isinstance(value, bool):
                code = value
            elif isinstance(value, str) and value.strip().isdigit():
                code = int(value.strip())
            if code in ERROR_CODES:
                return code
    return None


def decode_callback(body: bytes, content_type: str) -> dict[str, Any]:
    """The callback's fields, from JSON or a form body (whichever it is when not labelled)."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media == "application/x-www-form-urlencoded":
        return _form(body, _charset(parameters))
    if media.endswith("json") or (not media.startswith("multipart") and body.lstrip()[:1] == b"{"):
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CallbackRejected("body is not JSON") from None
        if not isinstance(payload, dict):
            raise CallbackRejected("body is not a JSON object")
        return payload
    return _form(body, _charset(parameters))


def _charset(parameters: str) -> str:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


def _form(body: bytes, charset: str) -> dict[str, Any]:
    """Form fields. Text not valid in its charset is read as Latin-1 rather than refused: a
    customer's "ARRÊT" matters more than how the page that posted it encoded it."""
    for encoding in (charset, "latin-1"):
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode(encoding),
                keep_blank_values=True,
                strict_parsing=True,
                encoding=encoding,
                errors="strict",
            )
        except (LookupError, UnicodeDecodeError):  # unknown charset, or not valid in it
            continue
        except ValueError:
            raise CallbackRejected("body is neither JSON nor a form") from None
        fields: dict[str, Any] = {}
        for name, value in pairs:
            fields.setdefault(name, value)
        return fields
    raise CallbackRejected("form body cannot be decoded")


def _delivery_report(fields: Mapping[str, Any], raw: Mapping[str, Any]) -> ParsedCallback:
    message_id = _text(fields.get("message_id"))
    if not message_id:
        raise CallbackRejected("message_id is missing")
    status = _text(fields.get("status"))
    if not status:
        raise CallbackRejected("status is missing")
    return ParsedCallback(
        kind="status",
        provider_message_id=message_id,
        number=_number(fields),
        provider_status=status,
        occurred_at=paris_time(fields.get(DELIVERY_DATE)),
        raw=raw,
    )


def _inbound(
    fields: Mapping[str, Any], raw: Mapping[str, Any], kind: ProviderEventKind, date_field: str
) -> ParsedCallback:
    text = fields.get("text")
    if isinstance(text, int | float) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        if kind != "opt_out":
            raise CallbackRejected("text is missing")
        text = STOP_TEXT  # a STOP is a STOP, whatever the customer wrote (providers.md §3.4)
    return ParsedCallback(
        kind=kind,
        provider_message_id=_text(fields.get("message_id")),
        number=_number(fields),
        text=text,
        to=_text(fields.get("sim_card_number")),
        occurred_at=paris_time(fields.get(date_field)),
        raw=raw,
    )


def _number(fields: Mapping[str, Any]) -> str:
    """E.164 with ``+``, also when a form body turned an unencoded ``+`` into a space (or the
    number came with the ``00`` international prefix)."""
    digits = digits_only(_text(fields.get("number")))
    if digits.startswith("00"):
        digits = digits[2:]
    if not digits:
        raise CallbackRejected("number is missing")
    return "+" + digits


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def paris_time(value: Any) -> datetime | None:
    """A callback date in UTC. Octopush writes Paris wall-clock time without a zone."""
    return parse_iso(value, naive_zone=PARIS)


def paris_date(moment: datetime) -> str:
    """``moment`` as Octopush writes callback dates (used by the provider simulator)."""
    return moment.astimezone(PARIS).strftime(DATE_FORMAT)
