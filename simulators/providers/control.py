"""The simulator's own routes under ``/_simulator`` (not part of any provider's API): options,
the record of sends and callbacks, simulated replies. Each is described in docs/simulators.md."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from simulators.providers.options import OptionsError

if TYPE_CHECKING:
    from simulators.providers.server import ProviderSimulator

CONTROL_PREFIX = "/_simulator"
SIMULATOR: web.AppKey[ProviderSimulator] = web.AppKey("provider_simulator")


class ReplyError(ValueError):
    """A simulated customer reply that cannot be made."""


def add_control_routes(app: web.Application, simulator: ProviderSimulator) -> None:
    app[SIMULATOR] = simulator
    app.router.add_get(f"{CONTROL_PREFIX}/config", _get_config)
    app.router.add_post(f"{CONTROL_PREFIX}/config", _set_config)
    app.router.add_get(f"{CONTROL_PREFIX}/sends", _get_sends)
    app.router.add_delete(f"{CONTROL_PREFIX}/sends", _delete_sends)
    app.router.add_get(f"{CONTROL_PREFIX}/callbacks", _get_callbacks)
    app.router.add_post(f"{CONTROL_PREFIX}/reply", _post_reply)


def _config(simulator: ProviderSimulator) -> dict[str, Any]:
    return {**asdict(simulator.options), "callback_urls": dict(simulator.callback_urls)}


async def _get_config(request: web.Request) -> web.Response:
    simulator = request.app[SIMULATOR]
    return web.json_response(_config(simulator))


async def _set_config(request: web.Request) -> web.Response:
    simulator = request.app[SIMULATOR]
    try:
        changes = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    if not isinstance(changes, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    try:
        simulator.configure(**changes)
    except OptionsError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(_config(simulator))


async def _get_sends(request: web.Request) -> web.Response:
    simulator = request.app[SIMULATOR]
    return web.json_response(
        {
            "total": len(simulator.sends),
            "sends": [send.as_json() for send in simulator.sends],
            "counts": simulator.counts(),
            "answers": {
                kind: dict(counter) for kind, counter in simulator.answers.items() if counter
            },
        }
    )


async def _delete_sends(request: web.Request) -> web.Response:
    simulator = request.app[SIMULATOR]
    simulator.reset()
    return web.json_response({"total": 0})


async def _get_callbacks(request: web.Request) -> web.Response:
    simulator = request.app[SIMULATOR]
    return web.json_response([delivery.as_json() for delivery in simulator.callbacks])


async def _post_reply(request: web.Request) -> web.Response:
    simulator = request.app[SIMULATOR]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    message_id = body.get("message_id")
    fields_ok = all(
        isinstance(body.get(name), str) for name in ("provider", "account_key", "number", "text")
    ) and (message_id is None or isinstance(message_id, str))
    if not fields_ok:
        return web.json_response(
            {"error": "provider, account_key, number and text are required strings"},
            status=400,
        )
    try:
        delivery = await simulator.reply(
            body["provider"], body["account_key"], body["number"], body["text"], message_id
        )
    except ReplyError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(delivery.as_json())
