"""OTPIQ (otpiq.com): one number per request, per-request delivery-report URL and secret.

Send: ``POST {base_url}/sms`` with ``Authorization: Bearer``; answers ``smsId``.
Callback: JSON ``{smsId, status: sent|delivered|failed, isFinal, reason?, ...}`` with the secret
echoed in ``X-OTPIQ-Webhook-Secret``. No SMS inbound or STOP webhook exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from shared.config import ProviderSettings
from shared.contract.events import CanonicalStatus
from shared.contract.numbers import in_style
from shared.contract.signing import constant_time_equals
from shared.contract.statuses import SubStatus
from shared.providers.base import (
    CallbackRejected,
    OutboundSms,
    ParsedCallback,
    Provider,
    SendAccepted,
    SendError,
    SendResult,
    http_error,
)
from shared.providers.http import parse_retry_after

WEBHOOK_SECRET_HEADER = "X-OTPIQ-Webhook-Secret"

FIXTURES: dict[str, Any] = {
    "send_request": {
        "phoneNumber": "964750123456",
        "smsType": "custom",
        "customMessage": "Your order has shipped",
        "senderId": "OTPIQ",
        "provider": "sms",
        "deliveryReport": {
            "webhookUrl": "https://your-app.com/webhooks/sms-status",
            "deliveryReportType": "all",
            "webhookSecret": "your_secret_123",
        },
    },
    "send_response": {
        "message": "SMS task created successfully",
        "smsId": "sms-1234567890abcdef123456",
        "remainingCredit": 14800,
        "cost": 200,
        "canCover": True,
        "paymentType": "prepaid",
    },
    "error_insufficient_credit": {
        "error": "Insufficient credit",
        "yourCredit": 100,
        "requiredCredit": 200,
        "canCover": False,
    },
    "error_spending_threshold": {"currentSpending": 9900, "spendingThreshold": 10000, "cost": 200},
    # The docs give only the shape ``{"message"}`` for 400/401/404; the texts below are ours.
    "error_validation": {"message": "phoneNumber must match ^[0-9]{10,15}$"},
    "error_sender_id": {"message": "Sender ID is not approved"},
    "error_not_found": {"message": "Not found"},
    "error_rate_limited": {"waitMinutes": 1, "maxRequests": 100, "timeWindowMinutes": 1},
    "error_unauthorized": {"message": "Unauthorized"},
    "error_server": {"message": "Internal server error"},
    "callback_failed": {
        "smsId": "sms-1234567890abcdef123456",
        "deliveryReportType": "all",
        "isFinal": True,
        "channel": "sms",
        "status": "failed",
        "reason": "Carrier rejected the message",
        "senderId": "OTPIQ",
    },
    "callback_sent": {
        "smsId": "sms-1234567890abcdef123456",
        "deliveryReportType": "all",
        "isFinal": False,
        "channel": "sms",
        "status": "sent",
    },
    "callback_delivered": {
        "smsId": "sms-1234567890abcdef123456",
        "deliveryReportType": "all",
        "isFinal": True,
        "channel": "sms",
        "status": "delivered",
    },
}


class Otpiq(Provider):
    kind = "otpiq"
    max_batch = 1
    number_style = "digits"
    status_map: ClassVar[Mapping[str, tuple[CanonicalStatus, str]]] = {
        "PENDING": ("sent", SubStatus.SENT),
        "SENT": ("sent", SubStatus.SENT),
        "DELIVERED": ("delivered", SubStatus.DELIVERED),
        "READ": ("delivered", SubStatus.DELIVERED),
        "FAILED": ("failed", SubStatus.UNDELIVERABLE),
        "EXPIRED": ("failed", SubStatus.EXPIRED),
    }

    def request_body(self, sms: OutboundSms) -> dict[str, Any]:
        delivery_report: dict[str, Any] = {
            "webhookUrl": self.callback_url,
            "deliveryReportType": "all",
        }
        if self.settings.webhook_secret is not None:
            delivery_report["webhookSecret"] = self.settings.webhook_secret.get_secret_value()
        body: dict[str, Any] = {
            "phoneNumber": in_style(sms.destination, self.number_style),
            "smsType": "custom",
            "customMessage": sms.text,
            "provider": "sms",
            "deliveryReport": delivery_report,
        }
        if sms.sender_id:
            body["senderId"] = sms.sender_id
        return body

    async def send(self, batch: list[OutboundSms]) -> list[SendResult]:
        if len(batch) == 1:
            # In the caller's own step, right after the rate limit let it go: a task of its own
            # would leave when the event loop next gets to it, and a busy loop bunches such
            # departures enough to put the provider's busiest second over the limit.
            return [await self._send_one(batch[0])]
        return list(await asyncio.gather(*(self._send_one(sms) for sms in batch)))

    async def _send_one(self, sms: OutboundSms) -> SendResult:
        headers = {"Authorization": f"Bearer {self.settings.api_key.get_secret_value()}"}
        [result] = await self.post_json(
            f"{self.settings.base_url.rstrip('/')}/sms",
            self.request_body(sms),
            headers,
            [sms],
            lambda _call, status, raw, answer_headers: [
                self.read_send_response(sms, status, raw, answer_headers.get("Retry-After"))
            ],
        )
        return result

    def read_send_response(
        self, sms: OutboundSms, status: int, raw: bytes, retry_after: str | None = None
    ) -> SendResult:
        try:
            body: Any = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            if status < 300:
                # Accepted or not? Unknown: retrying risks a double send, so report it instead.
                return SendError(
                    f"HTTP {status} with an unreadable body",
                    retryable=False,
                    sub_status=SubStatus.PROVIDER_ERROR,
                    status_code=status,
                )
            return http_error(status, f"HTTP {status} with an unreadable body", retry_after)
        if status < 300:
            sms_id = body.get("smsId")
            if not isinstance(sms_id, str) or not sms_id:
                return SendError(
                    f"HTTP {status} without smsId",
                    retryable=False,
                    sub_status=SubStatus.PROVIDER_ERROR,
                    status_code=status,
                )
            key = self.correlation_key(self.account, sms_id, "")
            return SendAccepted(sms.message_id, sms_id, key)
        if status == 429:
            wait_minutes = body.get("waitMinutes")
            if isinstance(wait_minutes, int | float) and not isinstance(wait_minutes, bool):
                wait: float | None = max(0.0, float(wait_minutes) * 60)
            else:
                wait = parse_retry_after(retry_after)
            return SendError(
                f"rate limited (waitMinutes={wait_minutes})",
                retryable=True,
                retry_after_s=wait,
                status_code=status,
            )
        detail = str(body.get("message") or body.get("error") or f"HTTP {status}")[:200]
        if status == 400 and ("requiredCredit" in body or "spendingThreshold" in body):
            # Money runs out for every message alike: retry later (and fail over) rather than
            # burning the campaign with terminal failures.
            return SendError(detail, retryable=True, status_code=status)
        if status == 400 and "sender" in detail.lower():
            return SendError(
                detail, retryable=False, sub_status=SubStatus.REJECTED, status_code=status
            )
        if status == 400 and "phone" in detail.lower():
            return SendError(
                detail, retryable=False, sub_status=SubStatus.INVALID_NUMBER, status_code=status
            )
        if status == 401:
            # Our key is wrong: nothing is wrong with the message; another route may work.
            return SendError(detail, retryable=True, status_code=status)
        return http_error(status, detail, retry_after)

    @classmethod
    def verify_callback(cls, settings: ProviderSettings, headers: Mapping[str, str]) -> bool:
        if settings.webhook_secret is None:
            return True
        given = headers.get(WEBHOOK_SECRET_HEADER)
        if given is None:
            # HTTP header names are case-insensitive; a plain dict is not.
            wanted = WEBHOOK_SECRET_HEADER.lower()
            given = next((v for k, v in headers.items() if k.lower() == wanted), None)
        return settings.webhook_secret.matches(
            lambda value: constant_time_equals(given, value), f"{cls.kind}.webhook_secret"
        )

    @classmethod
    def parse_callback(cls, body: bytes, content_type: str) -> list[ParsedCallback]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise CallbackRejected("body is not JSON") from None
        if not isinstance(payload, dict):
            raise CallbackRejected("body is not a JSON object")
        sms_id, status = payload.get("smsId"), payload.get("status")
        if not isinstance(sms_id, str) or not sms_id:
            raise CallbackRejected("smsId is missing")
        if not isinstance(status, str) or not status:
            raise CallbackRejected("status is missing")
        reason = payload.get("reason")
        return [
            ParsedCallback(
                kind="status",
                provider_message_id=sms_id,
                provider_status=status,
                reason=reason if isinstance(reason, str) else "",
                raw=payload,
            )
        ]
