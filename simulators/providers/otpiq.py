"""OTPIQ's send API as the simulator serves it (providers.md §1)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.contract.events import utcnow
from shared.http_server import Request, Response
from shared.providers.otpiq import WEBHOOK_SECRET_HEADER
from simulators.providers.protocol import (
    AcceptedSend,
    PlannedCallback,
    ProviderProtocol,
    json_response,
)

if TYPE_CHECKING:
    from simulators.providers.server import ProviderSimulator


class OtpiqProtocol(ProviderProtocol):
    """``POST /otpiq/api/sms`` (providers.md §1): one number per request, per-request DLR URL."""

    kind = "otpiq"
    send_path = "/otpiq/api/sms"
    phone_pattern = re.compile(r"^[0-9]{10,15}$")
    sms_types = frozenset({"verification", "custom"})
    routings = frozenset(
        {
            "auto",
            "whatsapp-sms",
            "telegram-sms",
            "whatsapp-telegram-sms",
            "sms",
            "whatsapp",
            "telegram",
        }
    )
    report_types = frozenset({"all", "final"})
    cost_per_sms = 200  # IQD, the documented example
    initial_credit = 100_000_000
    failure_reason = "Carrier rejected the message"

    def __init__(self, simulator: ProviderSimulator) -> None:
        super().__init__(simulator)
        self.credit: dict[str, int] = {}

    @staticmethod
    def error(status: int, body: dict[str, Any]) -> Response:
        return json_response(body, status=status)

    def rate_limited(self, wait_s: float) -> Response:
        # The SDK's 429 fields; the real API's numbers are undocumented.
        wait = {"waitMinutes": round(wait_s / 60, 4), "maxRequests": 100, "timeWindowMinutes": 1}
        return self.error(429, wait)

    async def send(self, request: Request) -> Response:
        authorization = request.headers.get("Authorization", "")
        scheme, _, api_key = authorization.partition(" ")
        if scheme != "Bearer" or not api_key.strip():
            return self.error(401, {"message": "Unauthorized"})
        try:
            body = request.json()
        except ValueError:
            return self.error(400, {"message": "Request body must be valid JSON"})
        if not isinstance(body, dict):
            return self.error(400, {"message": "Request body must be a JSON object"})
        problem = self.validate(body)
        if problem is not None:
            return self.error(400, {"message": problem})
        if self.simulator.draw_http_error():
            return self.error(500, {"message": "Internal server error"})
        account = api_key.strip()
        credit = self.credit.get(account, self.initial_credit)
        if credit < self.cost_per_sms:
            return self.error(
                400,
                {
                    "error": "Insufficient credit",
                    "yourCredit": credit,
                    "requiredCredit": self.cost_per_sms,
                    "canCover": False,
                },
            )
        self.credit[account] = credit - self.cost_per_sms
        sms_id = f"sms-{secrets.token_hex(12)}"
        sender = str(body.get("senderId") or "")
        text = (
            str(body["customMessage"])
            if body["smsType"] == "custom"
            else f"Your verification code is {body.get('verificationCode') or '000000'}"
        )
        self.simulator.record_send(
            AcceptedSend(
                provider=self.kind,
                account=account,
                phone=body["phoneNumber"],
                text=text,
                sender=sender,
                provider_message_id=sms_id,
                at=utcnow(),
            )
        )
        report = body.get("deliveryReport")
        if isinstance(report, dict):
            self.simulator.deliver_callbacks(
                self.kind, sms_id, self.plan_callbacks(report, sms_id, sender)
            )
        return json_response(
            {
                "message": "SMS task created successfully",
                "smsId": sms_id,
                "remainingCredit": self.credit[account],
                "cost": self.cost_per_sms,
                "canCover": True,
                "paymentType": "prepaid",
            }
        )

    def validate(self, body: Mapping[str, Any]) -> str | None:
        """The first problem with a send body, worded like a validation error; None if valid."""
        phone = body.get("phoneNumber")
        if not isinstance(phone, str) or not self.phone_pattern.match(phone):
            return "phoneNumber must be 10-15 digits in international format without +"
        sms_type = body.get("smsType")
        if sms_type not in self.sms_types:
            return f"smsType must be one of: {', '.join(sorted(self.sms_types))}"
        if sms_type == "custom":
            message = body.get("customMessage")
            if not isinstance(message, str) or not message:
                return "customMessage is required for smsType custom"
        else:
            code = body.get("verificationCode")
            if code is not None and (not isinstance(code, str) or not 1 <= len(code) <= 20):
                return "verificationCode must be 1-20 characters"
        sender = body.get("senderId")
        if sender is not None and (not isinstance(sender, str) or len(sender) > 11):
            return "senderId must be a string of at most 11 characters"
        routing = body.get("provider")
        if routing is not None and routing not in self.routings:
            return f"provider must be one of: {', '.join(sorted(self.routings))}"
        report = body.get("deliveryReport")
        if report is not None:
            if not isinstance(report, dict):
                return "deliveryReport must be an object"
            url = report.get("webhookUrl")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                return "deliveryReport.webhookUrl must be a URL"
            if report.get("deliveryReportType", "all") not in self.report_types:
                return "deliveryReport.deliveryReportType must be all or final"
            secret = report.get("webhookSecret")
            if secret is not None and not isinstance(secret, str):
                return "deliveryReport.webhookSecret must be a string"
        return None

    def plan_callbacks(
        self, report: Mapping[str, Any], sms_id: str, sender: str
    ) -> list[PlannedCallback]:
        """``sent`` (unless only final reports were asked for), then ``delivered`` or ``failed``."""
        report_type = str(report.get("deliveryReportType", "all"))
        headers: dict[str, str] = {}
        secret = report.get("webhookSecret")
        if isinstance(secret, str) and secret:
            headers[WEBHOOK_SECRET_HEADER] = secret
        base: dict[str, Any] = {
            "smsId": sms_id,
            "deliveryReportType": report_type,
            "channel": "sms",
        }
        if sender:
            base["senderId"] = sender
        url = str(report["webhookUrl"])
        planned: list[PlannedCallback] = []
        if report_type == "all":
            planned.append(
                PlannedCallback(url, {**base, "isFinal": False, "status": "sent"}, headers)
            )
        if self.simulator.draw_failure():
            final = {**base, "isFinal": True, "status": "failed", "reason": self.failure_reason}
        else:
            final = {**base, "isFinal": True, "status": "delivered"}
        planned.append(PlannedCallback(url, final, headers))
        return planned
