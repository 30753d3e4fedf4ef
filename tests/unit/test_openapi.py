"""docs/openapi.yaml describes exactly the routes the HTTP services register (no Kafka needed:
the services are built, not started; in a loop, as their Kafka clients want)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from aiohttp import web
from openapi_spec_validator import validate

from services.callbacks.app import ROUTE as CALLBACK_ROUTE
from services.callbacks.app import CallbacksService
from services.campaigns.app import CampaignsService
from services.ingress.app import IngressService
from shared.config import ProviderSettings
from shared.http_server import HttpServer
from tests.support import make_settings

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch")
# The kinds an account can have: the only ones the callbacks service answers for.
CALLBACK_KINDS = get_args(ProviderSettings.model_fields["kind"].annotation)
CONTROL_ACTIONS = ("pause", "resume", "cancel")


def spec() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return document


def routes(app: web.Application | HttpServer) -> set[tuple[str, str]]:
    """(method, path template) of every route; aiohttp adds HEAD beside each GET."""
    if isinstance(app, HttpServer):
        return {(route.method.lower(), route.pattern) for route in app.routes}
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def documented() -> set[tuple[str, str]]:
    """(method, path template) of every operation; a provider's callback path and a control's
    path (one per action) as the route that serves them."""
    found: set[tuple[str, str]] = set()
    for path, item in spec()["paths"].items():
        segments = path.split("/")
        if segments[1] == "callbacks" and segments[2] in CALLBACK_KINDS:
            path = CALLBACK_ROUTE
        elif segments[1] == "admin" and segments[-1] in CONTROL_ACTIONS:
            path = "/".join([*segments[:-1], "{action}"])
        found |= {(method, path) for method in METHODS if method in item}
    return found


def test_the_description_is_valid_openapi() -> None:
    # Raises, naming the place, for what a YAML parser takes but OpenAPI does not (a flow
    # mapping whose text holds a comma, a schema keyword misspelt, a $ref to nowhere).
    validate(spec())


async def test_every_route_of_ingress_and_callbacks_is_documented_and_nothing_else() -> None:
    settings = make_settings()
    ingress, callbacks = IngressService(settings), CallbacksService(settings)
    served = routes(ingress.app) | routes(callbacks.http) | routes(CampaignsService(settings).app)
    served |= routes(ingress.ops.app) | routes(callbacks.ops.app)
    assert documented() == served


async def test_the_public_listeners_serve_no_operations_endpoint() -> None:
    settings = make_settings()
    ingress, callbacks = IngressService(settings), CallbacksService(settings)
    operations = {("get", path) for path in ("/metrics", "/healthz", "/readyz")}
    assert routes(ingress.ops.app) == routes(callbacks.ops.app) == operations
    assert not operations & (routes(ingress.app) | routes(callbacks.http))
    assert ingress.ops.listen == settings.ingress.ops_listen != settings.ingress.listen
    assert callbacks.ops.listen == settings.callbacks.ops_listen != settings.callbacks.listen


def test_each_provider_kind_has_its_callback_documented() -> None:
    paths = spec()["paths"]
    for kind in CALLBACK_KINDS:
        operation = paths[f"/callbacks/{kind}/{{account}}/{{token}}"]["post"]
        assert operation["requestBody"]["required"] is True


def test_every_operation_documents_its_refusals_and_only_503_as_a_server_error() -> None:
    for path, item in spec()["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            statuses = set(item[method]["responses"])
            assert all(not status.startswith("5") or status == "503" for status in statuses), path
            if method == "post":
                assert {"400", "401", "404", "413", "503"} <= statuses, path
                retry_later = item[method]["responses"]["503"]
                assert retry_later == {"$ref": "#/components/responses/RetryLater"}, path
    headers = spec()["components"]["responses"]["RetryLater"]["headers"]
    assert headers["Retry-After"]["required"] is True
