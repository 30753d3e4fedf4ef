"""What every provider module offers: send, error classes, callback parsing, status map.

One module per provider (``otpiq.py``, ``opensms.py``, ``octopush.py``), each holding its send call,
its error mapping, its callback parsing and status map, and ``FIXTURES``: payloads copied from the
provider's documentation, used by the tests and by the provider simulator.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import orjson

from shared.config import ProviderSettings
from shared.contract.events import CanonicalStatus, ProviderEventKind
from shared.contract.numbers import NumberStyle
from shared.contract.statuses import SubStatus
from shared.http_client import HttpClient, HttpError
from shared.providers.http import is_retryable_status, parse_retry_after


@dataclass(frozen=True)
class OutboundSms:
    message_id: str
    destination: str  # E.164
    text: str
    sender_id: str


@dataclass(frozen=True)
class SendAccepted:
    message_id: str
    provider_message_id: str
    correlation_key: str


class SendError(Exception):
    """A send the provider did not accept. ``retryable`` decides between retry and a report."""

    def __init__(
        self,
        detail: str,
        *,
        retryable: bool,
        sub_status: str = SubStatus.PROVIDER_ERROR,
        retry_after_s: float | None = None,
        status_code: int | None = None,
        maybe_accepted: bool = False,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.sub_status = sub_status
        self.retry_after_s = retry_after_s
        self.status_code = status_code
        # The request may have reached the provider and been accepted before this failure (a
        # timeout, a connection broken after sending): sending it again could send it twice.
        self.maybe_accepted = maybe_accepted


SendResult = SendAccepted | SendError


class CallbackRejected(ValueError):
    """The callback body is malformed or not one of this provider's shapes (answer 400)."""


@dataclass(frozen=True)
class ParsedCallback:
    kind: ProviderEventKind
    provider_message_id: str = ""
    number: str = ""
    provider_status: str = ""
    reason: str = ""
    text: str = ""
    to: str = ""
    occurred_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallbackReply:
    """What the provider expects as an answer to its callback."""

    status: int = 200
    body: bytes = b'{"status":"received"}'
    content_type: str | None = "application/json"


class Provider(ABC):
    kind: ClassVar[str]
    # How many messages one send call may carry; messages in one call share text and sender.
    max_batch: ClassVar[int] = 1
    number_style: ClassVar[NumberStyle] = "plus"
    # provider status (upper-cased) -> (canonical status, sub-status)
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]]
    callback_reply: ClassVar[CallbackReply] = CallbackReply()
    # True when the provider refuses a call identical to one it already accepted (same messages
    # in the same order; Octopush's ``request_id``): such a call may be sent again when its first
    # outcome is unknown.
    deduplicates_resends: ClassVar[bool] = False
    # True when the send answer may name no message (OpenSMS): ``correlation_key`` is then the
    # account and number, and the normalizer matches a report to a recent send to that number
    # (``services/normalizer/number_match.py``).
    matched_by_number: ClassVar[bool] = False

    def __init__(
        self,
        account: str,
        settings: ProviderSettings,
        session: HttpClient,
        callback_url: str,
    ) -> None:
        self.account = account
        self.settings = settings
        self.session = session
        self.callback_url = callback_url

    @abstractmethod
    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        """Send every message in ``batch``; one result per message, in the same order.

        Network failures and timeouts come back as retryable ``SendError``s, never raised.
        """

    async def post_json(
        self,
        url: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        call: Sequence[OutboundSms],
        read: Callable[[Sequence[OutboundSms], int, bytes, Mapping[str, str]], list[SendResult]],
    ) -> list[SendResult]:
        """POST ``body`` as JSON for the messages of ``call``; ``read(call, status, raw, headers)``
        turns the answer into one result per message.

        Network failures come back as results (``network_error``) for every message of the call.
        """
        data = orjson.dumps(body)
        json_headers = {**headers, "Content-Type": "application/json"}
        try:
            answer = await self.session.post(url, data, json_headers)
        except HttpError as exc:
            return [network_error(exc) for _ in call]
        return read(call, answer.status, answer.body, answer.headers)

    @classmethod
    def correlation_key(cls, account: str, provider_message_id: str, number: str) -> str:
        """Joins a callback to its dispatch; the normalizer partitions on it."""
        return f"{account}:{provider_message_id}"

    @classmethod
    def verify_callback(cls, settings: ProviderSettings, headers: Mapping[str, str]) -> bool:
        """Checks beyond the secret URL token (which the callbacks service always checks)."""
        return True

    @classmethod
    @abstractmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        """Every event in one callback body, or CallbackRejected."""

    @classmethod
    def canonical(cls, provider_status: str) -> tuple[CanonicalStatus, str] | None:
        return cls.status_map.get(provider_status.strip().upper())


def http_error(status: int, detail: str, retry_after: str | None = None) -> SendError:
    """The default reading of an HTTP failure: 429 and 5xx retry, other 4xx are terminal."""
    if is_retryable_status(status):
        return SendError(
            detail,
            retryable=True,
            retry_after_s=parse_retry_after(retry_after),
            status_code=status,
        )
    return SendError(detail, retryable=False, sub_status=SubStatus.REJECTED, status_code=status)


def fallback_error(
    status: int, message: str, retry_after_s: float | None, invalid_number: re.Pattern[str]
) -> SendError:
    """A refusal without an error code the provider documents: the HTTP status and text decide.

    ``invalid_number`` is the provider's wording for a bad number; ``retry_after_s`` delays the
    retryable cases.
    """
    text = message or f"HTTP {status}"
    if status in (401, 403) or is_retryable_status(status):
        # 401/403: our credentials or account, not the message: retry later (and fail over),
        # another route may work.
        return SendError(text, retryable=True, retry_after_s=retry_after_s, status_code=status)
    if invalid_number.search(text):
        return SendError(
            text, retryable=False, sub_status=SubStatus.INVALID_NUMBER, status_code=status
        )
    if status < 300:
        # A refusal inside a 2xx answer.
        return SendError(text, retryable=False, sub_status=SubStatus.REJECTED, status_code=status)
    return http_error(status, text)


def first_message(body: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The first non-blank text among ``fields`` of an answer (an object's own ``message``)."""
    for name in fields:
        value = body.get(name)
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, str) and value.strip():
            return value.strip()[:200]
    return ""


def network_error(exc: HttpError) -> SendError:
    # Only a connection that was never made proves the provider did not get the request.
    return SendError(f"{type(exc).__name__}: {exc}", retryable=True, maybe_accepted=exc.sent)
