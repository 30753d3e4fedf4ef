"""Process lifecycle shared by all six services (``services.SERVICES``): event loop, signals,
/metrics, /healthz, /readyz.

``run`` starts every long-running process (services and simulators) on the configured event loop.

``run_service`` runs one service until SIGTERM/SIGINT (or until it fails), then stops it within its
deadline. ``ConsumerService`` is the whole of a consumer service's plumbing: producer, consumer,
the shared runner and the service's handler; the service itself only writes the handler.

A consumer service's stop fits in ``runner.shutdown_deadline_s``, counted from the signal: intake
stops, in-flight records get the deadline less ``close_reserve_s`` to finish (the rest are handed
back uncommitted), the finished ones are committed, then the group is left (so that the remaining
members take the partitions over at once, not after a session timeout) and the clients close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.group import LeaveGroupRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import gcpolicy
from shared.config import KafkaSettings, RunnerSettings, Settings, split_listen
from shared.kafka.backlog import Backlog, Paced
from shared.kafka.clients import (
    Publisher,
    client_id,
    connection_kwargs,
    is_tansu,
    make_consumer,
)
from shared.kafka.runner import ConsumerRunner, PartitionAware, RecordHandler
from shared.metrics import HTTP_DURATION, HTTP_REQUESTS

log = logging.getLogger(__name__)

T = TypeVar("T")


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop ``Settings.event_loop`` names; asyncio's own, with a warning, without uvloop."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("event_loop is uvloop but uvloop is not installed: using asyncio's loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Run a long-running process's ``main`` to completion on the configured event loop, with
    the garbage collector tuned for many records per second (``shared.gcpolicy``)."""
    gcpolicy.tune_for_throughput()
    with asyncio.Runner(loop_factory=event_loop_factory(event_loop)) as runner:
        return runner.run(_collecting_when_grown(main))


async def _collecting_when_grown(main: Coroutine[Any, Any, T]) -> T:
    collector = asyncio.create_task(gcpolicy.collect_when_grown())
    try:
        return await main
    finally:
        collector.cancel()


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def wait(self) -> None:
        """Return (or raise) when the service ends on its own."""
        ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...


def http_metrics(service: str) -> Middleware:
    """Counts and times every answer of an HTTP service by route pattern (never by path: paths
    hold tenants and ids)."""

    @web.middleware
    async def count_and_time(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            HTTP_REQUESTS.labels(service, route, str(status)).inc()
            HTTP_DURATION.labels(service, route).observe(time.perf_counter() - started)

    return count_and_time


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
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on an address of their own: never on a port the
    internet reaches (ingress, callbacks), where they would tell strangers our metrics."""

    def __init__(self, listen: str, ready: Callable[[], bool]) -> None:
        self.listen = listen
        self.app = web.Application()
        add_ops_routes(self.app, ready)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if self._runner is None:
            self._runner = await serve(self.app, self.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


async def run_service(service: Service, ops_listen: str | None = None) -> None:
    """Run ``service`` until a signal arrives or it ends; serve ops endpoints on ``ops_listen``
    from before it starts (alive, not ready), so that a slow start is not taken for a hang."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    ops = OpsServer(ops_listen, service.ready) if ops_listen else None
    try:
        if ops is not None:
            await ops.start()
        await service.start()
    except BaseException:
        if ops is not None:
            await ops.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        raise
    log.info("%s started", service.name)
    ended = asyncio.create_task(service.wait())
    signalled = asyncio.create_task(stop_requested.wait())
    try:
        await asyncio.wait({ended, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("%s stopping", service.name)
        await service.stop()
        signalled.cancel()
        if ops is not None:
            await ops.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if ended.done() and not ended.cancelled() and ended.exception() is not None:
        raise ended.exception()  # type: ignore[misc]
    log.info("%s stopped", service.name)


@runtime_checkable
class HandlerLifecycle(Protocol):
    """Optional on a handler: started with the service's publisher, stopped before the group is
    left (its timers and batches end while the partitions are still this member's)."""

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
        handler: RecordHandler,
        group_id: str | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.runner_settings = runner_settings
        self.topics = topics
        self.handler = handler
        self.group_id = group_id or f"smsbridge-{name}"
        self.publisher = Publisher.for_service(settings.kafka, name)
        self.consumer = make_consumer(
            settings.kafka,
            self.group_id,
            role=name,
            max_poll_records=runner_settings.max_poll_records,
            session_timeout_ms=runner_settings.session_timeout_ms,
            heartbeat_interval_ms=runner_settings.heartbeat_interval_ms,
        )
        listener = handler if isinstance(handler, PartitionAware) else None
        self.backlog = (
            Backlog(
                handler,
                name,
                lambda: make_consumer(settings.kafka, None, role=f"{name}-backlog"),
            )
            if isinstance(handler, Paced)
            else None
        )
        self.runner = ConsumerRunner(
            name=name,
            consumer=self.consumer,
            topics=topics,
            handler=handler,
            publisher=self.publisher,
            settings=runner_settings,
            partition_listener=listener,
            tansu_lag=is_tansu(settings.kafka),
            backlog=self.backlog,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        lifecycle = self.handler if isinstance(self.handler, HandlerLifecycle) else None
        handler_started = False
        try:
            await self.publisher.start()
            if lifecycle is not None:
                await lifecycle.start(self.publisher)
                handler_started = True
            await self.consumer.start()
        except BaseException:
            # Close what was made or started: a failed start (Kafka unreachable) ends with its
            # own error, not with warnings about clients left open.
            if lifecycle is not None and handler_started:
                await _bounded(lifecycle.stop(), 5.0, f"{self.name} handler")
            await self.close()
            raise
        self._task = asyncio.create_task(self.runner.run(), name=f"{self.name}-runner")

    async def close(self) -> None:
        """Close the Kafka clients of a service whose start failed or was never called (they
        are made with the service, and warn about being left open when collected)."""
        await _bounded(self.consumer.stop(), 5.0, f"{self.name} consumer")
        if self.backlog is not None:
            await _bounded(self.backlog.close(), 5.0, f"{self.name} backlog reader")
        await self.publisher.stop(f"{self.name} producer", 1.0)

    async def wait(self) -> None:
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        deadline = ShutdownDeadline.start(self.runner_settings.shutdown_deadline_s)
        self.runner.stop(drain_s=deadline.drain_s)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    # The runner drains within drain_s, then commits: half the reserve for that.
                    await asyncio.wait_for(
                        asyncio.shield(self._task), deadline.left() - deadline.close_reserve_s / 2
                    )
                except TimeoutError:
                    log.warning("%s: runner did not end in time; cancelled", self.name)
                    self._task.cancel()
                except Exception:
                    log.exception("%s runner ended with an error", self.name)
        # The handler's own work (timers, batches) ends while the partitions are still ours:
        # once the group is left, another member may already be working on them.
        if isinstance(self.handler, HandlerLifecycle):
            await _bounded(
                self.handler.stop(),
                deadline.left(share=0.5),
                f"{self.name} handler",
            )
        membership = group_membership(self.consumer)
        await _bounded(self.consumer.stop(), deadline.left(share=0.5), f"{self.name} consumer")
        if self.backlog is not None:
            await _bounded(self.backlog.close(), 1.0, f"{self.name} backlog reader")
        if membership is not None and membership.left_behind:
            await _bounded(
                leave_group(self.settings.kafka, membership),
                deadline.left(share=0.5),
                f"{self.name} leave group",
            )
        elif membership is not None and membership.member_id:
            log.info("left consumer group %s", membership.group_id)  # aiokafka sent LeaveGroup
        await self.publisher.stop(f"{self.name} producer", max(1.0, deadline.left()))

    def ready(self) -> bool:
        return self.runner.ready


@dataclass(frozen=True)
class ShutdownDeadline:
    """The time a stop may take, split between draining records and closing the clients."""

    ends_at: float  # time.monotonic()
    close_reserve_s: float

    @classmethod
    def start(cls, deadline_s: float) -> ShutdownDeadline:
        # Closing (commit, leave group, handler, producer flush) gets a quarter, at most 5 s.
        return cls(time.monotonic() + deadline_s, min(5.0, deadline_s / 4))

    @property
    def drain_s(self) -> float:
        """How long in-flight records may still run."""
        return max(0.0, self.left() - self.close_reserve_s)

    def left(self, share: float = 1.0) -> float:
        """``share`` of the time left (a step leaves the rest to the steps after it)."""
        return max(0.0, (self.ends_at - time.monotonic()) * share)


async def _bounded(step: Awaitable[None], timeout_s: float, what: str) -> None:
    """Run one stop step within ``timeout_s``; one failing step must not skip the next ones."""
    try:
        await asyncio.wait_for(step, timeout_s)
    except TimeoutError:
        log.warning("%s: not done within the shutdown deadline; abandoned", what)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the stop itself is cancelled
        log.warning("%s: interrupted while stopping", what)
    except Exception:
        log.exception("%s: failed while stopping", what)


@dataclass(frozen=True)
class GroupMembership:
    group_id: str
    member_id: str
    generation: int

    @property
    def left_behind(self) -> bool:
        """aiokafka sends LeaveGroup only for generation > 0; Tansu never leaves generation 0."""
        return bool(self.member_id) and self.generation == 0


def group_membership(consumer: AIOKafkaConsumer) -> GroupMembership | None:
    """The consumer's current group membership, read before it stops (None if it has none).

    aiokafka keeps it on the private coordinator; read defensively so that a change there only
    costs the explicit leave, never the stop.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    group_id = getattr(coordinator, "group_id", None)
    member_id = getattr(coordinator, "member_id", "")
    generation = getattr(coordinator, "generation", -1)
    if not isinstance(group_id, str) or not isinstance(member_id, str):
        return None
    if not isinstance(generation, int):
        return None
    return GroupMembership(group_id, member_id, generation)


async def leave_group(settings: KafkaSettings, membership: GroupMembership) -> None:
    """Send LeaveGroup for a member aiokafka did not take out of its group.

    Without it the member stays listed until another member joins and its session expires: the
    group's other members wait that long for its partitions, and ``smsbridge replay`` sees a live
    member and refuses.
    """
    client = AIOKafkaClient(
        **connection_kwargs(settings),
        client_id=client_id(settings, "leave"),
        request_timeout_ms=settings.request_timeout_ms,
    )
    await client.bootstrap()
    try:
        node_id = await client.coordinator_lookup(0, membership.group_id)
        response = await client.send(
            node_id, LeaveGroupRequest(membership.group_id, membership.member_id)
        )
        if response.error_code:
            log.warning("LeaveGroup %s answered error %d", membership.group_id, response.error_code)
        else:
            log.info("left consumer group %s", membership.group_id)
    finally:
        await client.close()


__all__ = [
    "ConsumerService",
    "GroupMembership",
    "HandlerLifecycle",
    "OpsServer",
    "PartitionAware",
    "Service",
    "ShutdownDeadline",
    "add_ops_routes",
    "group_membership",
    "leave_group",
    "run_service",
    "serve",
]


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_until_signalled(server: Startable) -> None:
    """Start ``server``, wait for SIGTERM or SIGINT, stop it (the simulators' main loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
