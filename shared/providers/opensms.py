"""OpenSMS Kenya (opensms.co.ke, REST v3): bulk sends, delivery reports set in the dashboard.

Send: ``POST {base_url}/sms/send`` with ``Authorization: Bearer``; ``recipient`` takes several
numbers separated by commas, so one call carries up to ``max_batch`` messages sharing text and
sender. Callback: JSON ``{event, message_id, phone, status, error, timestamp}`` to the one URL
set in the dashboard (the secret token in our URL is the only check). The send answer names no
message: reports are matched by number (``correlation_key`` is ``account:+E164``).
Every guess at what the documentation leaves out lives here (ids in the answer, error codes,
duplicates, rate-limit headers): docs/providers.md, "OpenSMS".
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from multidict import CIMultiDict

from shared.contract.events import CanonicalStatus
from shared.contract.numbers import digits_only, in_style
from shared.contract.statuses import SubStatus
from shared.providers.base import (
    CallbackRejected,
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

FIXTURES: dict[str, Any] = {
    "send_request": {
        "recipient": "31612345678",
        "sender_id": "YourName",
        "type": "plain",
        "message": "This is a test message",
    },
    "send_request_bulk": {
        "recipient": "31612345678,880172145789",
        "sender_id": "YourName",
        "type": "plain",
        "message": "This is a test message",
    },
    # The documented success answer is a placeholder: "data" holds no message id.
    "send_response": {"status": "success", "data": "sms reports with all details"},
    "error_response": {
        "status": "error",
        "message": "A human-readable description of the error.",
    },
    "callback_failed": {
        "event": "sms.failed",
        "message_id": "msg_123456",
        "phone": "+254712345678",
        "status": "failed",
        "error": "Invalid phone number",
        "timestamp": "2024-01-13T12:00:00Z",
    },
    # The docs show the failed example; these two follow its field table.
    "callback_delivered": {
        "event": "sms.delivered",
        "message_id": "msg_123456",
        "phone": "+254712345678",
        "status": "delivered",
        "timestamp": "2024-01-13T12:00:00Z",
    },
    "callback_pending": {
        "event": "sms.pending",
        "message_id": "msg_123456",
        "phone": "+254712345678",
        "status": "pending",
        "timestamp": "2024-01-13T12:00:00Z",
    },
    "callback_reply": {"status": "received"},
}

DUPLICATE_MESSAGE = 1005
# code -> (retryable, sub-status, meaning), from the documented SMS error codes.
ERROR_CODES: dict[int, tuple[bool, str, str]] = {
    1001: (False, SubStatus.INVALID_NUMBER, "invalid phone number"),
    1002: (False, SubStatus.REJECTED, "message too long"),
    # Money runs out for every message alike: retry later and fail over.
    1003: (True, SubStatus.PROVIDER_ERROR, "insufficient balance"),
    1004: (False, SubStatus.REJECTED, "invalid or unapproved sender ID"),
    DUPLICATE_MESSAGE: (False, SubStatus.PROVIDER_ERROR, "duplicate message sent recently"),
    1006: (False, SubStatus.REJECTED, "invalid message type"),
    1007: (True, SubStatus.PROVIDER_ERROR, "network error"),
    1008: (False, SubStatus.REJECTED, "schedule time in the past"),
}
_CODE_IN_TEXT = re.compile(r"\b(100[1-8])\b")
_CODE_FIELDS = ("code", "error_code", "errorCode")
_MESSAGE_FIELDS = ("message", "error", "error_message", "detail")
_ID_FIELDS = ("message_id", "uid", "messageId", "id")
_NUMBER_FIELDS = ("recipient", "phone", "to", "number", "msisdn")
_LIST_FIELDS = ("messages", "data", "reports", "recipients")
_INVALID_NUMBER_TEXT = re.compile(r"\binvalid\b.*\b(phone|number|recipient|msisdn)\b", re.I)
# Anything smaller is a number of seconds, not a Unix time.
_UNIX_TIME_FLOOR = 1_000_000_000

# Our refinement of "failed" when the report's ``error`` says the number is invalid: the
# normalizer maps on the provider status alone, so the parser folds the reason into it.
FAILED_INVALID_NUMBER = "failed_invalid_number"


class OpenSms(Provider):
    kind = "opensms"
    # Not documented; a comma-separated list of a hundred numbers keeps requests small.
    max_batch = 100
    number_style = "plus"
    matched_by_number = True
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]] = {
        "PENDING": ("sent", SubStatus.SENT),
        "DELIVERED": ("delivered", SubStatus.DELIVERED),
        "FAILED": ("failed", SubStatus.UNDELIVERABLE),
        FAILED_INVALID_NUMBER.upper(): ("failed", SubStatus.INVALID_NUMBER),
    }

    @property
    def send_url(self) -> str:
        return f"{self.settings.base_url.rstrip('/')}/sms/send"

    @classmethod
    def correlation_key(cls, account: str, provider_message_id: str, number: str) -> str:
        """``account:+E164``: the send answer may name no message, the reports name the phone."""
        digits = digits_only(number)
        if digits:
            return f"{account}:+{digits}"
        return f"{account}:id:{provider_message_id}"

    def request_body(self, call: Sequence[OutboundSms]) -> dict[str, Any]:
        first = call[0]
        return {
            "recipient": ",".join(in_style(sms.destination, self.number_style) for sms in call),
            "sender_id": first.sender_id,
            "type": "plain",
            "message": first.text,
        }

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        return await send_in_calls(batch, self.max_batch, self._send_call)

    async def _send_call(self, call: list[OutboundSms]) -> list[SendResult]:
        if not call[0].sender_id:
            return [
                SendError(
                    "OpenSMS requires a sender_id and none was given",
                    retryable=False,
                    sub_status=SubStatus.REJECTED,
                )
                for _ in call
            ]
        headers = {
            "Authorization": f"Bearer {self.settings.api_key.get_secret_value()}",
            "Accept": "application/json",
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
        now: float | None = None,
    ) -> list[SendResult]:
        """One result per message of ``call`` from the provider's answer to it."""
        received = CIMultiDict(headers or {})
        clock = time.time() if now is None else now
        try:
            body: Any = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            if status < 300:
                # Accepted or not? Unknown: retrying risks a double send, so report it instead.
                return [
                    SendError(
                        f"HTTP {status} with an unreadable body",
                        retryable=False,
                        sub_status=SubStatus.PROVIDER_ERROR,
                        status_code=status,
                        maybe_accepted=True,
                    )
                    for _ in call
                ]
            detail = f"HTTP {status} with an unreadable body"
            return [error_for(status, {}, received, clock, detail) for _ in call]
        if status >= 300 or str(body.get("status", "")).lower() == "error":
            return [error_for(status, body, received, clock) for _ in call]
        return self._accepted(call, body)

    def _accepted(self, call: Sequence[OutboundSms], body: Mapping[str, Any]) -> list[SendResult]:
        """Every recipient of an accepted call is sent, with its id when the answer names one."""
        ids = message_ids(body, [sms.destination for sms in call])
        results: list[SendResult] = []
        for sms in call:
            provider_id = ids.get(sms.destination, "")
            key = self.correlation_key(self.account, provider_id, sms.destination)
            results.append(SendAccepted(sms.message_id, provider_id, key))
        return results

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CallbackRejected("body is not JSON") from None
        if not isinstance(payload, dict):
            raise CallbackRejected("body is not a JSON object")
        message_id = _text(payload.get("message_id"))
        if not message_id:
            raise CallbackRejected("message_id is missing")
        given = payload.get("status")
        status = given.strip() if isinstance(given, str) else ""
        if not status:
            event = payload.get("event")
            event = event.strip() if isinstance(event, str) else ""
            status = event.removeprefix("sms.") if event.startswith("sms.") else ""
        if not status:
            raise CallbackRejected("status is missing")
        error = payload.get("error")
        reason = error.strip() if isinstance(error, str) else ""
        if status.lower() == "failed" and _INVALID_NUMBER_TEXT.search(reason):
            status = FAILED_INVALID_NUMBER
        return [
            ParsedCallback(
                kind="status",
                provider_message_id=message_id,
                number=_text(payload.get("phone")),
                provider_status=status,
                reason=reason,
                occurred_at=parse_iso(payload.get("timestamp")),  # ISO-8601 UTC, as documented
                raw=payload,
            )
        ]


def error_for(
    status: int,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    now: float,
    detail: str | None = None,
) -> SendError:
    """A refused send: the documented error code when there is one, else the HTTP status."""
    message = detail or first_message(body, _MESSAGE_FIELDS)
    code = error_code(body)
    wait = retry_wait(status, headers, now)
    if code is not None:
        retryable, sub_status, meaning = ERROR_CODES[code]
        return SendError(
            f"OpenSMS error {code} ({meaning}): {message or meaning}"[:300],
            retryable=retryable,
            sub_status=sub_status,
            retry_after_s=wait if retryable else None,
            status_code=status,
            # The recent identical message may have been an earlier attempt of ours.
            maybe_accepted=code == DUPLICATE_MESSAGE,
        )
    # 401/403 is our token or account; a 200 with ``"status": "error"`` is a refusal.
    return fallback_error(status, message, wait, _INVALID_NUMBER_TEXT)


def error_code(body: Mapping[str, Any]) -> int | None:
    """The documented SMS error code (1001-1008) in an error answer, if any."""
    places: list[Mapping[str, Any]] = [body]
    nested = body.get("error")
    if isinstance(nested, dict):
        places.append(nested)
    for place in places:
        for name in _CODE_FIELDS:
            code = _as_int(place.get(name))
            if code in ERROR_CODES:
                return code
    found = _CODE_IN_TEXT.search(first_message(body, _MESSAGE_FIELDS))
    return int(found.group(1)) if found else None


def retry_wait(status: int, headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait before the next call: ``Retry-After``, else the rate-limit window's end."""
    after = parse_retry_after(headers.get("Retry-After"))
    if after is not None:
        return after
    remaining = (headers.get("X-RateLimit-Remaining") or "").strip()
    reset = headers.get("X-RateLimit-Reset")
    if reset is None or (status != 429 and remaining != "0"):
        return None
    try:
        value = float(reset)
    except ValueError:
        return None
    return max(0.0, value - now if value >= _UNIX_TIME_FLOOR else value)


def message_ids(answer: Mapping[str, Any], destinations: Sequence[str]) -> dict[str, str]:
    """Provider message id per destination, from an accepted send's answer (see module doc)."""
    records = _records(answer)
    if not records:
        return {}
    found: dict[str, str] = {}
    if len(records) == 1 and len(destinations) == 1:
        provider_id = _record_id(records[0])
        if provider_id:
            found[destinations[0]] = provider_id
        return found
    numbers = [_record_number(record) for record in records]
    if all(numbers):
        numbered = [
            (digits_only(number), provider_id)
            for record, number in zip(records, numbers, strict=True)
            if (provider_id := _record_id(record)) and "," not in number
        ]
        for destination in destinations:
            wanted = digits_only(destination)
            matches = {pid for digits, pid in numbered if _same_number(digits, wanted)}
            if len(matches) == 1:
                found[destination] = matches.pop()
    elif len(records) == len(destinations):
        for destination, record in zip(destinations, records, strict=True):
            provider_id = _record_id(record)
            if provider_id:
                found[destination] = provider_id
    # One id for several recipients cannot tell their reports apart: none of them gets it.
    shared = {provider_id for provider_id, n in Counter(found.values()).items() if n > 1}
    return {d: provider_id for d, provider_id in found.items() if provider_id not in shared}


def _same_number(written: str, e164_digits: str) -> bool:
    """The provider may echo a number internationally or nationally (``0712…`` for ``254712…``)."""
    if written == e164_digits:
        return True
    national = written.lstrip("0")
    return (
        len(national) >= 7 and len(national) < len(e164_digits) and e164_digits.endswith(national)
    )


def _records(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    data = answer.get("data")
    candidate: Any = data if isinstance(data, dict | list) else answer
    if isinstance(candidate, dict):
        for name in _LIST_FIELDS:
            if isinstance(candidate.get(name), list):
                candidate = candidate[name]
                break
    if isinstance(candidate, dict):
        return [candidate]
    if isinstance(candidate, list) and all(isinstance(item, dict) for item in candidate):
        return candidate
    return []


def _record_id(record: Mapping[str, Any]) -> str:
    for name in _ID_FIELDS:
        value = _text(record.get(name))
        if value:
            return value
    return ""


def _record_number(record: Mapping[str, Any]) -> str:
    for name in _NUMBER_FIELDS:
        value = _text(record.get(name))
        if value:
            return value
    return ""


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None
