"""Octopush's send API, its replies and STOPs, as the simulator serves them (providers.md §3)."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.contract.events import utcnow
from shared.contract.keywords import KeywordRules
from shared.contract.segments import count_segments
from shared.http_server import Request, Response
from shared.providers.octopush import paris_date
from simulators.providers.protocol import (
    AcceptedSend,
    PlannedCallback,
    ProviderProtocol,
    json_response,
    retry_after,
)

if TYPE_CHECKING:
    from simulators.providers.server import ProviderSimulator

# What a simulated reply must say to count as an opt-out (decisions.md §6).
OPT_OUT_WORDS = KeywordRules.of()


class OctopushProtocol(ProviderProtocol):
    """``POST /octopush/v1/public/sms-campaign/send`` (providers.md §3): up to 500 recipients.

    Authenticated by ``api-key`` and ``api-login``. Callbacks go to the URL the account set in
    its dashboard: the simulator's callback map, keyed by the API key (or the login). Delivery
    reports only for ``sms_premium``: ``ACK`` then ``DELIVERED`` or ``NOT_DELIVERED`` per recipient.
    The v1 error body is undocumented; the simulator answers ``{"code", "message"}`` with the
    legacy code where one fits. ``send_at`` is accepted but the send happens at once.
    """

    kind = "octopush"
    send_path = "/octopush/v1/public/sms-campaign/send"
    phone_pattern = re.compile(r"^\+[1-9][0-9]{7,14}$")
    sender_pattern = re.compile(r"^[A-Za-z0-9]{3,11}$")
    sms_types = frozenset({"sms_premium", "sms_low_cost"})
    purposes = frozenset({"alert", "wholesale"})
    flags = (
        "with_replies",
        "simulation_mode",
        "auto_optimize_text",
        "auto_remove_blacklisted_numbers",
    )
    max_recipients = 500
    max_text_length = 1224
    price_per_sms = 0.0333  # EUR, the documented example
    initial_credit = 1_000_000.0
    request_id_window_s = 24 * 3600.0
    reply_short_code = "38100"  # the free short number replies arrive on in France

    def __init__(self, simulator: ProviderSimulator) -> None:
        super().__init__(simulator)
        self.credit: dict[str, float] = {}
        self.request_ids: dict[tuple[str, str], float] = {}  # (api key, request_id) -> first seen

    @staticmethod
    def error(
        status: int,
        message: str,
        code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        body: dict[str, Any] = {"message": message}
        if code is not None:
            body["code"] = code
        return json_response(body, status=status, headers=headers)

    def rate_limited(self, wait_s: float) -> Response:
        # Octopush's rate limits are undocumented: a plain 429 with Retry-After.
        return self.error(429, "Too many requests", headers={"Retry-After": retry_after(wait_s)})

    async def send(self, request: Request) -> Response:
        api_key = request.headers.get("api-key", "").strip()
        login = request.headers.get("api-login", "").strip()
        if not api_key or not login:
            return self.error(401, "Bad login: api-key and api-login are required", 101)
        try:
            body = request.json()
        except ValueError:
            return self.error(400, "Request body must be valid JSON")
        if not isinstance(body, dict):
            return self.error(400, "Request body must be a JSON object")
        problem = self.validate(body)
        if problem is not None:
            code, message = problem
            return self.error(400, message, code)
        if self.simulator.draw_http_error():
            return self.error(500, "Internal server error", 500)
        request_id = body.get("request_id")
        now = time.time()
        if isinstance(request_id, str) and request_id:
            first_seen = self.request_ids.get((api_key, request_id))
            if first_seen is not None and now - first_seen < self.request_id_window_s:
                return self.error(400, "request_id already used in the last 24 hours", 120)
        numbers = [str(contact["phone_number"]) for contact in body["recipients"]]
        text = str(body["text"])
        sms_needed = count_segments(text).segments * len(numbers)
        cost = round(sms_needed * self.price_per_sms, 4)
        credit = self.credit.get(api_key, self.initial_credit)
        if credit < cost:
            return self.error(400, "Not enough credit", 104)
        ticket = f"sms_{secrets.token_hex(7)[:13]}"
        if not body.get("simulation_mode"):
            self.credit[api_key] = credit - cost
            if isinstance(request_id, str) and request_id:
                self.request_ids[(api_key, request_id)] = now
            self.accept(api_key, login, ticket, numbers, body)
        return json_response(
            {
                "sms_ticket": ticket,
                "number_of_contacts": len(numbers),
                "total_cost": cost,
                "number_of_sms_needed": sms_needed,
                "residual_credit": round(self.credit.get(api_key, credit), 4),
            },
            status=201,
        )

    def accept(
        self, api_key: str, login: str, ticket: str, numbers: list[str], body: Mapping[str, Any]
    ) -> None:
        url = self.simulator.callback_url_for(self.kind, api_key, login)
        reports = body["type"] == "sms_premium" and url is not None
        for number in numbers:
            self.simulator.record_send(
                AcceptedSend(
                    provider=self.kind,
                    account=api_key,
                    phone=number,
                    text=str(body["text"]),
                    sender=str(body.get("sender") or ""),
                    provider_message_id=ticket,
                    at=utcnow(),
                )
            )
            if reports and url is not None:
                self.simulator.deliver_callbacks(
                    self.kind, ticket, self.plan_callbacks(url, ticket, number)
                )

    def validate(self, body: Mapping[str, Any]) -> tuple[int | None, str] | None:
        """The first problem with a send body as (legacy error code, message); None if valid."""
        recipients = body.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            return 103, "recipients: at least one contact is required"
        if len(recipients) > self.max_recipients:
            return None, f"recipients: at most {self.max_recipients} contacts per campaign"
        for index, contact in enumerate(recipients):
            number = contact.get("phone_number") if isinstance(contact, dict) else None
            if not isinstance(number, str) or not self.phone_pattern.match(number):
                return None, (
                    f"recipients[{index}].phone_number: invalid phone number, "
                    "expected international format like +33600000000"
                )
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return 107, "text is required"
        if len(text) > self.max_text_length:
            return None, f"text must be at most {self.max_text_length} characters"
        if body.get("type") not in self.sms_types:
            return None, f"type must be one of: {', '.join(sorted(self.sms_types))}"
        sender = body.get("sender")
        if sender is not None and (
            not isinstance(sender, str) or not self.sender_pattern.match(sender)
        ):
            return 106, "sender must be 3 to 11 letters or digits"
        purpose = body.get("purpose")
        if purpose is not None and purpose not in self.purposes:
            return None, f"purpose must be one of: {', '.join(sorted(self.purposes))}"
        request_id = body.get("request_id")
        if request_id is not None and not isinstance(request_id, str):
            return None, "request_id must be a string"
        for flag in self.flags:
            if flag in body and not isinstance(body[flag], bool):
                return None, f"{flag} must be a boolean"
        return None

    def plan_callbacks(self, url: str, ticket: str, number: str) -> list[PlannedCallback]:
        """``ACK`` from the first carrier, then ``DELIVERED`` or ``NOT_DELIVERED``."""
        final = "NOT_DELIVERED" if self.simulator.draw_failure() else "DELIVERED"
        return [
            PlannedCallback(url, self.delivery_report(ticket, number, status))
            for status in ("ACK", final)
        ]

    def delivery_report(self, ticket: str, number: str, status: str) -> dict[str, Any]:
        return {
            "channel": "sms",
            "message_id": ticket,
            "number": number,
            "status": status,
            "unit_price": self.price_per_sms,
            "delivery_date": paris_date(utcnow()),
            "meta_data": {},
        }

    def reply_payload(
        self, account_key: str, number: str, text: str, message_id: str | None
    ) -> dict[str, Any]:
        """What Octopush posts when ``number`` texts back: STOP words opt out, the rest is a reply.

        Without a given ``message_id`` the latest campaign sent to that number is named, as
        Octopush does "if it's found".
        """
        if message_id is None:
            message_id = self.simulator.latest_ticket(self.kind, account_key, number)
        payload: dict[str, Any] = {} if message_id is None else {"message_id": message_id}
        payload.update({"number": number, "text": text})
        if OPT_OUT_WORDS.classify(text) == "opt_out":
            payload["stop_date"] = paris_date(utcnow())
        else:
            payload["sim_card_number"] = self.reply_short_code
            payload["reception_date"] = paris_date(utcnow())
        return payload
