"""The simulator's own routes under ``/_simulator`` (not part of any provider's API): options,
the record of sends and callbacks, simulated replies. Each is described in docs/simulators.md."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from shared.http_server import Request, Response, Route
from simulators.providers.options import OptionsError
from simulators.providers.protocol import json_response

if TYPE_CHECKING:
    from simulators.providers.server import ProviderSimulator

CONTROL_PREFIX = "/_simulator"


class ReplyError(ValueError):
    """A simulated customer reply that cannot be made."""


def control_routes(simulator: ProviderSimulator) -> list[Route]:
    control = Control(simulator)
    return [
        Route("GET", f"{CONTROL_PREFIX}/config", control.get_config),
        Route("POST", f"{CONTROL_PREFIX}/config", control.set_config),
        Route("GET", f"{CONTROL_PREFIX}/sends", control.get_sends),
        Route("DELETE", f"{CONTROL_PREFIX}/sends", control.delete_sends),
        Route("GET", f"{CONTROL_PREFIX}/callbacks", control.get_callbacks),
        Route("POST", f"{CONTROL_PREFIX}/reply", control.post_reply),
    ]


class Control:
    """The handlers of the control routes, for one simulator."""

    def __init__(self, simulator: ProviderSimulator) -> None:
        self.simulator = simulator

    def config(self) -> dict[str, Any]:
        simulator = self.simulator
        return {**asdict(simulator.options), "callback_urls": dict(simulator.callback_urls)}

    async def get_config(self, request: Request) -> Response:
        return json_response(self.config())

    async def set_config(self, request: Request) -> Response:
        try:
            changes = request.json()
        except ValueError:
            return json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(changes, dict):
            return json_response({"error": "body must be a JSON object"}, status=400)
        try:
            self.simulator.configure(**changes)
        except OptionsError as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response(self.config())

    async def get_sends(self, request: Request) -> Response:
        simulator = self.simulator
        return json_response(
            {
                "total": len(simulator.sends),
                "sends": [send.as_json() for send in simulator.sends],
                "counts": simulator.counts(),
                "answers": {
                    kind: dict(counter) for kind, counter in simulator.answers.items() if counter
                },
            }
        )

    async def delete_sends(self, request: Request) -> Response:
        self.simulator.reset()
        return json_response({"total": 0})

    async def get_callbacks(self, request: Request) -> Response:
        return json_response([delivery.as_json() for delivery in self.simulator.callbacks])

    async def post_reply(self, request: Request) -> Response:
        try:
            body = request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return json_response({"error": "body must be a JSON object"}, status=400)
        message_id = body.get("message_id")
        fields_ok = all(
            isinstance(body.get(name), str)
            for name in ("provider", "account_key", "number", "text")
        ) and (message_id is None or isinstance(message_id, str))
        if not fields_ok:
            return json_response(
                {"error": "provider, account_key, number and text are required strings"},
                status=400,
            )
        try:
            delivery = await self.simulator.reply(
                body["provider"], body["account_key"], body["number"], body["text"], message_id
            )
        except ReplyError as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response(delivery.as_json())
