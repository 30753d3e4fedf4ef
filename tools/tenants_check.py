"""``smsbridge tenants check``: every problem of every tenant and provider, never a secret."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource

from shared.config import ProviderSettings, Settings, TenantSettings
from shared.secrets import RotatingSecret

_SECRET_KEYS = ("api_token", "secret_key", "aggregator_api_key")
EXPIRY_NOTICE = timedelta(days=7)


@dataclass(frozen=True)
class Problem:
    key: str  # dotted, relative to its tenant or provider
    message: str  # never a secret's value: pydantic's message, or ours


@dataclass
class ConfigurationCheck:
    general: list[Problem] = field(default_factory=list)
    tenants: dict[str, list[Problem]] = field(default_factory=dict)
    providers: dict[str, list[Problem]] = field(default_factory=dict)
    # Per tenant: the providers its routes name, as written.
    routes: dict[str, list[str]] = field(default_factory=dict)
    # Previous values of rotated secrets that expire soon or have expired (not problems).
    warnings: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return (
            len(self.general)
            + sum(map(len, self.tenants.values()))
            + sum(map(len, self.providers.values()))
        )


def check_configuration(data: Mapping[str, Any]) -> ConfigurationCheck:
    """Every problem of every tenant and provider, per key, with environment overrides applied.

    ``load_settings`` stops at the first invalid configuration; this validates each tenant and
    provider on its own so that one broken tenant does not hide another's problems.
    """
    check = ConfigurationCheck()
    merged = _merge(dict(data), EnvSettingsSource(Settings)())
    try:
        check.warnings = expiring_secrets(Settings(**data), datetime.now(UTC))
    except ValidationError as exc:
        check.general = [
            Problem(_dotted(error["loc"]), _message(error))
            for error in exc.errors()
            # Tenants and providers are checked one by one below; the root check is the
            # routes', repeated below per tenant.
            if error["loc"] and error["loc"][0] not in ("tenants", "providers")
        ]
    providers: dict[str, Any] = merged.get("providers") or {}
    for name, raw in sorted(providers.items()):
        check.providers[name] = _problems(ProviderSettings, raw)
    tenants: dict[str, Any] = merged.get("tenants") or {}
    if not tenants:
        check.general.append(Problem("tenants", "no tenant is configured"))
    for slug, raw in sorted(tenants.items()):
        problems = _problems(TenantSettings, raw)
        routes = raw.get("routes") if isinstance(raw, dict) else None
        named: list[str] = []
        for index, route in enumerate(routes if isinstance(routes, list) else []):
            provider = route.get("provider") if isinstance(route, dict) else None
            if not isinstance(provider, str):
                continue  # reported by the tenant's own validation
            named.append(provider)
            if provider not in providers:
                known = ", ".join(sorted(providers)) or "none"
                problems.append(
                    Problem(
                        f"routes.{index}.provider",
                        f"unknown provider {provider!r} (known: {known})",
                    )
                )
            elif check.providers[provider]:
                problems.append(
                    Problem(
                        f"routes.{index}.provider",
                        f"provider {provider!r} has problems (see below)",
                    )
                )
        check.tenants[slug] = problems
        check.routes[slug] = named
    return check


def expiring_secrets(settings: Settings, now: datetime) -> list[str]:
    """A line for each previous value of a rotated secret that expires within ``EXPIRY_NOTICE``
    (finish the rotation at the other end) or has expired (remove it from the file)."""
    sections: list[tuple[str, BaseModel]] = [("campaigns", settings.campaigns)]
    sections += [(f"tenants.{slug}", tenant) for slug, tenant in settings.tenants.items()]
    sections += [(f"providers.{name}", account) for name, account in settings.providers.items()]
    lines = []
    for prefix, section in sections:
        for key in type(section).model_fields:
            secret = getattr(section, key)
            if not isinstance(secret, RotatingSecret):
                continue
            for expires in secret.expiries():
                when = expires.strftime("%Y-%m-%d %H:%M UTC")
                if expires <= now:
                    lines.append(f"{prefix}.{key}: a previous value expired {when}; remove it")
                elif expires - now <= EXPIRY_NOTICE:
                    lines.append(f"{prefix}.{key}: a previous value expires {when}")
    return lines


def tenants_check_command(data: Mapping[str, Any], out: TextIO = sys.stdout) -> int:
    check = check_configuration(data)
    for line in check.warnings:
        print(f"warning: {line}", file=out)
    for slug, problems in check.tenants.items():
        if problems:
            print(f"tenant {slug}: {_count(len(problems), 'problem')}", file=out)
            for problem in problems:
                print(f"  {problem.key}: {problem.message}", file=out)
        else:
            routes = ", ".join(check.routes[slug])
            secrets = ", ".join(_SECRET_KEYS)
            print(f"tenant {slug}: ok ({secrets} resolve; routes: {routes})", file=out)
    for name, problems in check.providers.items():
        print(
            f"provider {name}: {_count(len(problems), 'problem') if problems else 'ok'}", file=out
        )
        for problem in problems:
            print(f"  {problem.key}: {problem.message}", file=out)
    for problem in check.general:
        print(f"configuration {problem.key}: {problem.message}", file=out)
    if check.problems:
        print(f"{_count(check.problems, 'problem')} found", file=out)
        return 1
    print(f"{_count(len(check.tenants), 'tenant')} ready", file=out)
    return 0


def _problems(model: type[BaseModel], raw: object) -> list[Problem]:
    try:
        model.model_validate(raw)
    except ValidationError as exc:
        # ``msg`` only: pydantic keeps the offending input in ``input``, which may be a secret.
        return [
            Problem(_dotted(error["loc"]) or "(all)", _message(error)) for error in exc.errors()
        ]
    return []


def _message(error: Any) -> str:
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def _dotted(loc: Iterable[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _merge(target: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
            target[key] = _merge(dict(target[key]), value)
        else:
            target[key] = value
    return target


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
