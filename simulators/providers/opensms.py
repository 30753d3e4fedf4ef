"""OpenSMS's send API as the simulator serves it (providers.md §2)."""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.contract.events import utcnow
from shared.http_server import Request, Response
from simulators.providers.protocol import (
    AcceptedSend,
    PlannedCallback,
    ProviderProtocol,
    bearer_token,
    iso_now,
    json_response,
    recipients_of,
    retry_after,
)

if TYPE_CHECKING:
    from simulators.providers.server import ProviderSimulator


class OpenSmsProtocol(ProviderProtocol):
    """``POST /opensms/api/v3/sms/send`` (providers.md §2): comma-separated recipients.

    Delivery reports go to the URL the account set "in the dashboard": the simulator's callback
    map, keyed by the Bearer token. The error body of the real API is undocumented; the simulator
    answers ``{"status": "error", "code": 1001, "message": ...}`` (the code only where one is
    documented). Every answer carries ``X-RateLimit-*`` headers for a per-minute window.
    """

    kind = "opensms"
    send_path = "/opensms/api/v3/sms/send"
    number_pattern = re.compile(r"^\+?[1-9][0-9]{7,14}$")
    sender_pattern = re.compile(r"^(\+?[0-9]{6,15}|[A-Za-z0-9 ]{1,11})$")
    schedule_format = "%Y-%m-%d %H:%M"
    max_message_length = 160  # error 1002
    rate_limit_per_minute = 10_000  # the Professional plan
    failure_error = "Delivery failed"

    def __init__(self, simulator: ProviderSimulator) -> None:
        super().__init__(simulator)
        self.windows: dict[str, tuple[int, int]] = {}  # token -> (minute, requests in it)
        self.clock: Callable[[], float] = time.time

    @staticmethod
    def error(
        status: int,
        message: str,
        code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        body: dict[str, Any] = {"status": "error", "message": message}
        if code is not None:
            body["code"] = code
        return json_response(body, status=status, headers=headers)

    def rate_limited(self, wait_s: float) -> Response:
        return self.error(429, "Too Many Attempts.", headers={"Retry-After": retry_after(wait_s)})

    def take_request(self, token: str, now: float) -> tuple[dict[str, str], bool]:
        """Count one request in the token's window: the rate-limit headers, and whether it fits."""
        minute = int(now // 60)
        window, used = self.windows.get(token, (minute, 0))
        if window != minute:
            used = 0
        allowed = used < self.rate_limit_per_minute
        if allowed:
            used += 1
        self.windows[token] = (minute, used)
        reset = (minute + 1) * 60
        headers = {
            "X-RateLimit-Limit": str(self.rate_limit_per_minute),
            "X-RateLimit-Remaining": str(max(0, self.rate_limit_per_minute - used)),
            "X-RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(reset - now)))
        return headers, allowed

    async def send(self, request: Request) -> Response:
        token = bearer_token(request)
        if token is None:
            return self.error(401, "Unauthenticated.")
        limits, allowed = self.take_request(token, self.clock())
        if not allowed:
            return self.error(429, "Too Many Attempts.", headers=limits)
        try:
            body = request.json()
        except ValueError:
            return self.error(400, "Request body must be valid JSON", headers=limits)
        if not isinstance(body, dict):
            return self.error(400, "Request body must be a JSON object", headers=limits)
        problem = self.validate(body)
        if problem is not None:
            code, message = problem
            return self.error(400, message, code, headers=limits)
        if self.simulator.draw_http_error():
            return self.error(500, "Internal server error", headers=limits)
        records = [self.accept(token, number, body) for number in recipients_of(body)]
        data: Any = records[0] if len(records) == 1 else records
        return json_response({"status": "success", "data": data}, headers=limits)

    def accept(self, token: str, number: str, body: Mapping[str, Any]) -> dict[str, Any]:
        message_id = f"msg_{secrets.token_hex(8)}"
        self.simulator.record_send(
            AcceptedSend(
                provider=self.kind,
                account=token,
                phone=number,
                text=str(body["message"]),
                sender=str(body["sender_id"]),
                provider_message_id=message_id,
                at=utcnow(),
            )
        )
        url = self.simulator.callback_url_for(self.kind, token)
        if url is not None:
            self.simulator.deliver_callbacks(
                self.kind, message_id, self.plan_callbacks(url, message_id, number)
            )
        return {"message_id": message_id, "recipient": number, "status": "pending"}

    def validate(self, body: Mapping[str, Any]) -> tuple[int | None, str] | None:
        """The first problem with a send body as (documented error code, message); None if valid."""
        recipient = body.get("recipient")
        if not isinstance(recipient, str) or not recipient.strip():
            return None, "The recipient field is required."
        if not all(self.number_pattern.match(n) for n in recipients_of(body)):
            return 1001, "Invalid phone number (use the international format +254...)"
        sender = body.get("sender_id")
        if not isinstance(sender, str) or not self.sender_pattern.match(sender):
            return 1004, "Invalid sender ID: a phone number or at most 11 letters and digits"
        if body.get("type") != "plain":
            return 1006, "Invalid message type: use plain"
        message = body.get("message")
        if not isinstance(message, str) or not message:
            return None, "The message field is required."
        if len(message) > self.max_message_length:
            return 1002, f"Message exceeds {self.max_message_length} characters"
        schedule = body.get("schedule_time")
        if schedule is not None:
            try:
                at = datetime.strptime(str(schedule), self.schedule_format).replace(tzinfo=UTC)
            except ValueError:
                return None, "The schedule time does not match the format Y-m-d H:i."
            if at < utcnow():
                return 1008, "Schedule time is in the past"
        return None

    def plan_callbacks(self, url: str, message_id: str, number: str) -> list[PlannedCallback]:
        """``sms.pending``, then ``sms.delivered`` or ``sms.failed``."""
        phone = "+" + number.lstrip("+")
        base = {"message_id": message_id, "phone": phone}
        pending = {"event": "sms.pending", **base, "status": "pending", "timestamp": iso_now()}
        if self.simulator.draw_failure():
            final = {
                "event": "sms.failed",
                **base,
                "status": "failed",
                "error": self.failure_error,
                "timestamp": iso_now(),
            }
        else:
            final = {
                "event": "sms.delivered",
                **base,
                "status": "delivered",
                "timestamp": iso_now(),
            }
        return [PlannedCallback(url, pending), PlannedCallback(url, final)]
