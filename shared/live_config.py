"""Live configuration: a running service takes a changed configuration without a restart.

It reloads on SIGHUP, and when the file or a ``file:`` secret it names changes (content, not
times: a Kubernetes Secret is updated by a symlink swap). The new configuration is validated in
full first; an invalid one is refused with its key named, and the one in force stays. What may
change live (``LIVE``: tenants, provider accounts, routes, dry-run flags, send windows, the log
level, the admin token) is set on the one ``Settings`` object every component holds, in one
step of the event loop, so a record or request reads it whole before or after. Anything else is
logged as "needs a restart" and left as it was. docs/rotation.md, "Live configuration".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import weakref
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import BaseModel

from shared.config import ConfigError, Settings, configured_path, load_settings, read_configuration

log = logging.getLogger(__name__)

# Top-level keys taken live, and keys of sections.
LIVE = ("tenants", "providers", "log_level")
LIVE_IN_SECTIONS = (("campaigns", "admin_token"),)
POLL_S = 1.0
ENV_PREFIX = "SMSBRIDGE_"
T = TypeVar("T")

GENERATION = Gauge(
    "smsbridge_config_generation",
    "The configuration in force: 1 at start, one more per reload taken.",
    ["service"],
)
LAST_RELOAD_FAILED = Gauge(
    "smsbridge_config_last_reload_failed",
    "1 when the last reload was refused (invalid configuration; the previous one stays).",
    ["service"],
)
RELOADS = Counter("smsbridge_config_reloads_total", "Reloads, by result.", ["service", "result"])

Listener = Callable[[Settings], None]
_listeners: list[weakref.WeakMethod[Listener]] = []


def on_reload(listener: Listener) -> None:
    """Call ``listener`` (a bound method: held weakly) after every reload taken, to rebuild
    what was derived from the settings (a rate limiter, a provider client)."""
    _listeners.append(weakref.WeakMethod(listener))


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The keys that differ between ``old`` and ``new`` but cannot change live."""
    live_sections = {section for section, _ in LIVE_IN_SECTIONS}
    changed = []
    for key in type(old).model_fields:
        if key in LIVE:
            continue
        before, after = getattr(old, key), getattr(new, key)
        if key in live_sections:
            skip = {field for section, field in LIVE_IN_SECTIONS if section == key}
            before, after = (
                before.model_copy(update=dict.fromkeys(skip)),
                after.model_copy(update=dict.fromkeys(skip)),
            )
        changed.extend(_differences(key, _plain(before), _plain(after)))
    return changed


def apply(settings: Settings, new: Settings) -> None:
    """Set what may change live on ``settings`` (the object in use), from ``new``."""
    for key in LIVE:
        setattr(settings, key, getattr(new, key))
    for section, key in LIVE_IN_SECTIONS:
        setattr(getattr(settings, section), key, getattr(getattr(new, section), key))
    logging.getLogger().setLevel(settings.log_level)


class LiveConfig:
    """Watches the configuration of one service and takes what may change live."""

    def __init__(
        self,
        settings: Settings,
        path: str | Path | None,
        service: str,
        load: Callable[[str | Path | None], Settings] = load_settings,
    ) -> None:
        self.settings = settings
        self.path = configured_path(path)
        self.service = service
        self._load = load
        self.generation = 1
        self._fingerprint = self.fingerprint()
        GENERATION.labels(service).set(1)
        LAST_RELOAD_FAILED.labels(service).set(0)

    def fingerprint(self) -> str:
        """A digest of the file and of every ``file:`` secret it names, as read now."""
        digest = hashlib.sha256()
        files = [Path(self.path)] if self.path else []
        for path in [*files, *self._secret_files()]:
            digest.update(str(path).encode())
            try:
                digest.update(path.read_bytes())
            except OSError as exc:
                digest.update(f"unreadable: {exc.errno}".encode())
        return digest.hexdigest()

    def _secret_files(self) -> list[Path]:
        """The ``file:`` references of the file and of the environment (SMSBRIDGE_...)."""
        try:
            data = read_configuration(self.path)
        except ConfigError:
            data = {}
        named = [value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)]
        texts = [*_strings(data), *named]
        return sorted({Path(text[5:]) for text in texts if text.startswith("file:")})

    def reload(self, reason: str) -> bool:
        """Load, validate and take the configuration now; False (and logged) if refused."""
        try:
            new = self._load(self.path)
        except ConfigError as exc:
            LAST_RELOAD_FAILED.labels(self.service).set(1)
            RELOADS.labels(self.service, "refused").inc()
            log.error("configuration reload (%s) refused, the one in force stays: %s", reason, exc)
            return False
        if restart := needs_restart(self.settings, new):
            log.warning("needs a restart to take effect: %s", ", ".join(restart))
        apply(self.settings, new)
        self.generation += 1
        GENERATION.labels(self.service).set(self.generation)
        LAST_RELOAD_FAILED.labels(self.service).set(0)
        RELOADS.labels(self.service, "taken").inc()
        for reference in list(_listeners):
            listener = reference()
            if listener is None:
                _listeners.remove(reference)
                continue
            listener(self.settings)
        log.info("configuration generation %d in force (%s)", self.generation, reason)
        return True

    async def alongside(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` (a service) while watching."""
        watcher = asyncio.create_task(self.watch())
        try:
            return await main
        finally:
            watcher.cancel()

    async def watch(self, poll_s: float = POLL_S) -> None:
        """For ever: reload on SIGHUP, and when the fingerprint changed."""
        hangup = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, hangup.set)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hangup.wait(), poll_s)
            asked = hangup.is_set()
            hangup.clear()
            now = self.fingerprint()
            if asked or now != self._fingerprint:
                # Remembered even when refused: an invalid file is reported once, not each poll.
                self._fingerprint = now
                self.reload("SIGHUP" if asked else "file changed")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _plain(value: Any) -> Any:
    """Comparable form of a setting (secrets by value: a changed password counts)."""
    if isinstance(value, BaseModel):
        return {key: _plain(getattr(value, key)) for key in type(value).model_fields}
    if hasattr(value, "get_secret_value"):
        return hashlib.sha256(value.get_secret_value().encode()).hexdigest()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _differences(prefix: str, before: Any, after: Any) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [
            difference
            for key in keys
            for difference in _differences(f"{prefix}.{key}", before.get(key), after.get(key))
        ]
    return [] if before == after else [prefix]
