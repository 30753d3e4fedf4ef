"""Process lifecycle shared by all five services: signals, /metrics, /healthz, /readyz.

``run_service`` runs one service until SIGTERM/SIGINT (or until it fails), then stops it within its
deadline. ``ConsumerService`` is the whole of a consumer service's plumbing: producer, consumer,
the shared runner and the service's handler; the service itself only writes the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.config import RunnerSettings, Settings, split_listen
from shared.kafka import Publisher, make_consumer, make_producer
from shared.runner import ConsumerRunner, Handler, PartitionAware

log = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def wait(self) -> None:
        """Return (or raise) when the service ends on its own."""
        ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...


def add_ops_routes(app: web.Application, ready: Callable[[], bool]) -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        is_ready = ready()
        return web.json_response(
            {"status": "ready" if is_ready else "not ready"}, status=200 if is_ready else 503
        )

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


async def serve(app: web.Application, listen: str) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = split_listen(listen)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


async def run_service(service: Service, ops_listen: str | None = None) -> None:
    """Run ``service`` until a signal arrives or it ends; serve ops endpoints on ``ops_listen``."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    ops_runner: web.AppRunner | None = None
    await service.start()
    if ops_listen:
        ops_app = web.Application()
        add_ops_routes(ops_app, service.ready)
        ops_runner = await serve(ops_app, ops_listen)
    log.info("%s started", service.name)
    ended = asyncio.create_task(service.wait())
    signalled = asyncio.create_task(stop_requested.wait())
    try:
        await asyncio.wait({ended, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("%s stopping", service.name)
        await service.stop()
        signalled.cancel()
        if ops_runner is not None:
            await ops_runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if ended.done() and not ended.cancelled() and ended.exception() is not None:
        raise ended.exception()  # type: ignore[misc]
    log.info("%s stopped", service.name)


class HandlerLifecycle(Protocol):
    async def start(self, publisher: Publisher) -> None: ...

    async def stop(self) -> None: ...


class ConsumerService:
    """Producer + consumer group + shared runner around one handler."""

    def __init__(
        self,
        *,
        name: str,
        settings: Settings,
        runner_settings: RunnerSettings,
        topics: Sequence[str],
        handler: Handler,
        group_id: str | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.runner_settings = runner_settings
        self.topics = topics
        self.handler = handler
        self.group_id = group_id or f"smsbridge-{name}"
        self.producer = make_producer(settings.kafka, name)
        self.publisher = Publisher(self.producer, settings.kafka.produce_timeout_s)
        self.consumer = make_consumer(
            settings.kafka,
            self.group_id,
            role=name,
            max_poll_records=runner_settings.max_poll_records,
            session_timeout_ms=runner_settings.session_timeout_ms,
            heartbeat_interval_ms=runner_settings.heartbeat_interval_ms,
        )
        listener = cast(PartitionAware, handler) if _is_partition_aware(handler) else None
        self.runner = ConsumerRunner(
            name=name,
            consumer=self.consumer,
            topics=topics,
            handler=handler,
            publisher=self.publisher,
            settings=runner_settings,
            partition_listener=listener,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        if _has_lifecycle(self.handler):
            await cast(HandlerLifecycle, self.handler).start(self.publisher)
        await self.consumer.start()
        self._task = asyncio.create_task(self.runner.run(), name=f"{self.name}-runner")

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        self.runner.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(
                        asyncio.shield(self._task), self.runner_settings.shutdown_deadline_s + 5
                    )
                except TimeoutError:
                    self._task.cancel()
                except Exception:
                    log.exception("%s runner ended with an error", self.name)
        await self.consumer.stop()
        if _has_lifecycle(self.handler):
            await cast(HandlerLifecycle, self.handler).stop()
        await self.producer.stop()

    def ready(self) -> bool:
        return self.runner.ready


def _is_partition_aware(handler: object) -> bool:
    return callable(getattr(handler, "on_assigned", None)) and callable(
        getattr(handler, "on_revoked", None)
    )


def _has_lifecycle(handler: object) -> bool:
    return callable(getattr(handler, "start", None)) and callable(getattr(handler, "stop", None))


__all__ = [
    "ConsumerService",
    "HandlerLifecycle",
    "PartitionAware",
    "Service",
    "add_ops_routes",
    "run_service",
    "serve",
]
