"""A process harness: the whole pipeline as child processes, for benchmarks and chaos tests.

``Stack`` starts a fresh embedded broker, creates every topic, writes one configuration, then
starts any set of services and simulators as child processes, exactly as ``smsbridge run`` /
``smsbridge simulate`` run in production, each known by its name (``"sender"``, ``"sender-2"``,
``"sim-optimove"``)::

    async with Stack(Path(run_dir), provider_options=ProviderSimulatorOptions(latency_ms=0)) as s:
        await s.start(*SERVICES, *SIMULATORS)       # waits until every /readyz answers 200
        await s.kill("normalizer"); await s.restart("normalizer")

Linux only (``rss`` and ``cpu_seconds`` read ``/proc``). More: docs/benchmarks.md, "Harness".
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from services import SERVICES as SERVICES
from shared.config import Settings
from shared.contract.topics import ensure_topics, partition_numbers
from shared.kafka.broker import embedded_broker, free_port
from shared.kafka.clients import (
    OutRecord,
    Publisher,
    connection_kwargs,
    is_tansu,
    make_admin,
    make_producer,
)
from tools.dev import SIMULATORS as SIMULATORS

REPO = Path(__file__).resolve().parent.parent

TENANT = "bench"
API_TOKEN = "bench-api-token"  # what we send to Optimove (app-api-key)
TENANT_SECRET = "bench-shared-secret"  # HMAC key, both directions
AGGREGATOR_API_KEY = "bench-aggregator-key"  # what Optimove sends us (X-API-Key)
PROVIDER = "otpiq-bench"
CALLBACK_TOKEN = "bench-callback-token"
OTPIQ_WEBHOOK_SECRET = "bench-otpiq-webhook-secret"
SENDER_ID = "BENCH"

BROKER = "broker"  # for pid, rss and cpu_seconds
OPTIMOVE_SIMULATOR = "sim-optimove"
PROVIDER_SIMULATOR = "sim-providers"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def code_under_test() -> Path:
    """The checkout whose services the benchmarks run: ``$BENCH_SOURCE_DIR`` (another checkout,
    for before/after comparisons: ``git archive <sha> | tar -x -C DIR``), else this one."""
    return Path(os.environ.get("BENCH_SOURCE_DIR", REPO))


def setting_overrides() -> dict[str, Any]:
    """``$BENCH_SETTINGS``: a JSON object deep-merged over every stack's configuration, to
    compare a setting's values, e.g. ``{"kafka": {"linger_ms": 20}}``."""
    text = os.environ.get("BENCH_SETTINGS", "").strip()
    return dict(orjson.loads(text)) if text else {}


class StackError(RuntimeError):
    """A child did not start, did not become ready, or exited when nobody stopped it."""


# -- configuration ---------------------------------------------------------------------------------


def deep_merge(target: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``target`` with ``extra`` merged in, tables recursively (``target`` is changed)."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("-", "").replace("_", "").isalnum()
    return key if bare else orjson.dumps(key).decode()


def to_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """TOML for a configuration dictionary: nested dictionaries as tables, lists inline."""
    lines = [
        f"{_toml_key(key)} = {_toml_value(value)}"
        for key, value in data.items()
        if not isinstance(value, Mapping)
    ]
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{_prefix}{_toml_key(key)}"
            lines += ["", f"[{name}]", to_toml(value, f"{name}.").strip("\n")]
    return "\n".join(lines) + "\n"


def _section_fields(service: str) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(Settings.model_fields[service].annotation, "model_fields", {})
    return fields


def service_addresses(services: Iterable[str]) -> dict[str, Any]:
    """A free loopback port for each service's ``listen``, ``ops_listen`` and ``metrics_listen``
    (whichever it has), and ``public_url`` to match ``listen`` where there is one."""
    sections: dict[str, Any] = {}
    for service in services:
        fields = _section_fields(service)
        section: dict[str, str] = {}
        for name in ("listen", "ops_listen", "metrics_listen"):
            if name in fields:
                section[name] = f"127.0.0.1:{free_port()}"
        if "public_url" in fields and "listen" in section:
            section["public_url"] = f"http://{section['listen']}"
        sections[service] = section
    return sections


def base_config(
    *,
    bootstrap_servers: str,
    optimove_url: str,
    provider_url: str,
    log_level: str = "WARNING",
    broker_kind: str = "kafka",
) -> dict[str, Any]:
    """One tenant (``TENANT``) routed to one OTPIQ account on the provider simulator, reporting to
    the Optimove simulator; every service's listen address a free loopback port."""
    return {
        "log_level": log_level,
        "allow_plain_http": True,  # the services and simulators on loopback speak plain HTTP
        "kafka": {"bootstrap_servers": bootstrap_servers, "broker_kind": broker_kind},
        **service_addresses(SERVICES),
        "tenants": {
            TENANT: {
                "optimove_base_url": f"{optimove_url}/{TENANT}",
                "api_token": API_TOKEN,
                "secret_key": TENANT_SECRET,
                "aggregator_api_key": AGGREGATOR_API_KEY,
                "default_sender_id": SENDER_ID,
                "default_region": "GB",
                "routes": [{"provider": PROVIDER}],
            }
        },
        "providers": {
            PROVIDER: {
                "kind": "otpiq",
                "base_url": f"{provider_url}/otpiq/api",
                "api_key": "sk_bench",
                "callback_token": CALLBACK_TOKEN,
                "webhook_secret": OTPIQ_WEBHOOK_SECRET,
            }
        },
    }


def ops_address(settings: Settings, service: str) -> str:
    """Where a service answers /readyz: its ``ops_listen`` (ingress, callbacks) or
    ``metrics_listen`` (consumers), else its HTTP ``listen`` (campaigns)."""
    section = getattr(settings, service)
    address: str = (
        getattr(section, "ops_listen", None)
        or getattr(section, "metrics_listen", None)
        or section.listen
    )
    return address


def instance_config(
    base: Mapping[str, Any], service: str, state_dir: Path, *, fresh_ports: bool
) -> dict[str, Any]:
    """The base configuration with ``service``'s own ``state_dir`` (and, for a further instance,
    its own ports): instances of one service must not share either."""
    data = copy.deepcopy(dict(base))
    section = data.setdefault(service, {})
    if "state_dir" in _section_fields(service):
        section["state_dir"] = str(state_dir)
    if fresh_ports:
        section.update(service_addresses([service])[service])
    return data


@dataclass(frozen=True)
class ProviderSimulatorOptions:
    """``smsbridge simulate providers`` options (see simulators/providers/)."""

    latency_ms: float = 0.0
    callback_delay_ms: float = 0.0
    fail_rate: float = 0.0
    http_error_rate: float = 0.0
    callback_attempts: int = 4
    seed: int | None = None

    def argv(self) -> list[str]:
        args = [
            f"--latency-ms={self.latency_ms}",
            f"--callback-delay-ms={self.callback_delay_ms}",
            f"--fail-rate={self.fail_rate}",
            f"--http-error-rate={self.http_error_rate}",
            f"--callback-attempts={self.callback_attempts}",
        ]
        return args if self.seed is None else [*args, f"--seed={self.seed}"]


# -- processes -------------------------------------------------------------------------------------


@dataclass
class Child:
    """One child process; ``argv`` and ``ready_url`` are reused by a restart."""

    name: str
    argv: list[str]
    log_path: Path
    ready_url: str | None
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    starts: int = 0
    # Set while the harness itself stops or kills it: that exit is not a failure.
    stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self, cwd: Path) -> None:
        """Start (again) with the same command, appending to the same log."""
        self.starts += 1
        self.stopping = False
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts} at {time.strftime('%X')} ----\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=cwd,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def kill(self, signum: int = signal.SIGKILL) -> int:
        """Send ``signum`` and wait for the exit; returns the exit code (negative: the signal)."""
        if self.process is None or not self.running:
            raise StackError(f"{self.name} is not running")
        self.stopping = True
        self.process.send_signal(signum)
        return await self.process.wait()

    async def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code (None if never started)."""
        if self.process is None or not self.running:
            return self.process.returncode if self.process is not None else None
        self.stopping = True
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()


def process_rss(pid: int) -> int:
    """Resident set size of a process, in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name (field 2) may hold spaces; the fields after it are positional.
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def process_syscalls(pid: int) -> int:
    """Read and write system calls of a process (all its threads) so far (0 when it is gone).
    A count the machine's speed leaves alone: socket reads and writes, SQLite's file access."""
    try:
        with open(f"/proc/{pid}/io", "rb") as io:
            fields = dict(line.split(b": ") for line in io.read().splitlines())
        return int(fields[b"syscr"]) + int(fields[b"syscw"])
    except (OSError, KeyError, ValueError):
        return 0


async def count_records(settings: Settings, topic: str, timeout_s: float = 30.0) -> int:
    """How many records ``topic`` holds (the sum of its partitions' end offsets; nothing is
    compacted or deleted in a benchmark's lifetime). On Tansu, which cannot answer ListOffsets
    for the latest offset, read from fetch responses."""
    consumer = AIOKafkaConsumer(
        **connection_kwargs(settings.kafka),
        enable_auto_commit=False,
        max_partition_fetch_bytes=1024,
        fetch_max_bytes=64 * 1024,
    )
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        numbers = await partition_numbers(admin, topic) or []
    finally:
        await admin.close()
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in numbers]
        consumer.assign(partitions)
        if not is_tansu(settings.kafka):
            return sum((await consumer.end_offsets(partitions)).values())
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        while any(consumer.highwater(tp) is None for tp in partitions):
            if time.monotonic() > deadline:
                raise StackError(f"no high watermark for every partition of {topic}")
            await consumer.getmany(*partitions, timeout_ms=200, max_records=1)
        return sum(consumer.highwater(tp) for tp in partitions)
    finally:
        await consumer.stop()


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 0.25,
) -> None:
    """Poll ``check`` (sync or async) until it is true; StackError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)


class SimulatorPeers:
    """What the Optimove and provider simulators of a run tell (and take) over HTTP."""

    optimove_url: str
    providers_url: str
    _session: aiohttp.ClientSession | None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise StackError("the stack is not open")
        return self._session

    async def get_json(self, url: str, **params: str) -> Any:
        async with self.session.get(url, params=params) as response:
            body = await response.read()
            if response.status != 200:
                raise StackError(f"GET {url} answered {response.status}: {body[:200]!r}")
        return orjson.loads(body)

    async def send_json(self, method: str, url: str, payload: Any = None) -> Any:
        async with self.session.request(method, url, json=payload) as response:
            body = await response.read()
            if response.status != 200:
                raise StackError(f"{method} {url} answered {response.status}: {body[:200]!r}")
        return orjson.loads(body)

    async def optimove_tally(self, campaign_id: str | None = None) -> dict[str, Any]:
        """The Optimove simulator's tally of ``TENANT`` (one campaign's, or all of them)."""
        params = {"tenant": TENANT, **({"campaign_id": campaign_id} if campaign_id else {})}
        tally: dict[str, Any] = (
            await self.get_json(f"{self.optimove_url}/_simulator/tally", **params)
        )[TENANT]
        return tally

    async def optimove_report_times(self, campaign_id: str | None = None) -> dict[str, Any]:
        """Per message id, when its first report and its first final report arrived (Unix s)."""
        params = {"tenant": TENANT, **({"campaign_id": campaign_id} if campaign_id else {})}
        times: dict[str, Any] = await self.get_json(
            f"{self.optimove_url}/_simulator/report-times", **params
        )
        return times

    async def provider_sends(self) -> dict[str, Any]:
        """Every send the provider simulator accepted; counts per (provider, phone, text)."""
        sends: dict[str, Any] = await self.get_json(f"{self.providers_url}/_simulator/sends")
        return sends

    async def provider_configure(self, **changes: Any) -> Any:
        """Change the provider simulator's options (``fail_rate``, ``latency_ms``, ...)."""
        return await self.send_json("POST", f"{self.providers_url}/_simulator/config", changes)


class Stack(SimulatorPeers):
    """Broker, configuration and child processes of one run; see the module docstring.

    ``overrides`` are deep-merged over ``base_config`` (for example
    ``{"providers": {PROVIDER: {"rate_limit_per_s": 1000}}}``); the result is validated at once.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        provider_options: ProviderSimulatorOptions = ProviderSimulatorOptions(),
        optimove_max_recorded: int = 200_000,
        log_level: str = "WARNING",
        env: Mapping[str, str] | None = None,
        source_dir: Path | None = None,
        broker_kind: str | None = None,
    ) -> None:
        """``broker_kind``: "kafka" or "tansu"; None chooses as ``smsbridge dev`` does."""
        self.run_dir = run_dir
        # The children run the code of this checkout (another one: before/after comparisons).
        self.source_dir = source_dir or code_under_test()
        self.broker = embedded_broker(kind=broker_kind)
        self.optimove_url = f"http://127.0.0.1:{free_port()}"
        self.providers_url = f"http://127.0.0.1:{free_port()}"
        self.provider_options = provider_options
        self.optimove_max_recorded = optimove_max_recorded
        self.config = deep_merge(
            base_config(
                bootstrap_servers=self.broker.bootstrap_servers,
                optimove_url=self.optimove_url,
                provider_url=self.providers_url,
                log_level=log_level,
                broker_kind=self.broker.kind,
            ),
            deep_merge(setting_overrides(), overrides or {}),
        )
        self.settings = Settings(**self.config)
        self.config_path = run_dir / "smsbridge.toml"
        self.env = {**os.environ, **(env or {})}
        self.children: dict[str, Child] = {}
        self._session: aiohttp.ClientSession | None = None

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def ingress_url(self) -> str:
        return f"http://{self.settings.ingress.listen}"

    @property
    def campaign_url(self) -> str:
        """Where Optimove posts the tenant's campaign batches."""
        return f"{self.ingress_url}/optimove/{TENANT}/campaigns"

    @property
    def callbacks_url(self) -> str:
        return f"http://{self.settings.callbacks.listen}"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Stack:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def open(self) -> None:
        """Start the broker, create every topic, write the base configuration."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config").mkdir(exist_ok=True)
        self.config_path.write_text(to_toml(self.config), encoding="utf-8")
        await asyncio.to_thread(self.broker.start)
        admin = make_admin(self.settings.kafka)
        await admin.start()
        try:
            await ensure_topics(admin)
        finally:
            await admin.close()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    async def create_topic(self, name: str, partitions: int) -> None:
        """A topic of the benchmark's own (e.g. a raw-produce baseline beside a real one)."""
        admin = make_admin(self.settings.kafka)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, partitions, replication_factor=1)])
        finally:
            await admin.close()

    async def start(self, *names: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start services (``SERVICES``) and simulators (``SIMULATORS``) by name, the simulators
        first; return once every one of them answers ready."""
        unknown = [n for n in names if n not in SERVICES and n not in SIMULATORS]
        if unknown:
            raise StackError(f"unknown: {unknown}; services {SERVICES}, simulators {SIMULATORS}")
        simulators = [self._simulator_child(n) for n in names if n in SIMULATORS]
        await self._launch_all(simulators, timeout_s)
        services = [self._service_child(n, n) for n in names if n in SERVICES]
        await self._launch_all(services, timeout_s)

    async def start_service(
        self,
        service: str,
        instance: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        timeout_s: float = READY_TIMEOUT_S,
    ) -> Child:
        """Start one instance of ``service``; a further instance (``instance="sender-2"``) gets
        its own ports. ``overrides`` are merged over this instance's configuration only."""
        child = self._service_child(service, instance or service, overrides)
        await self._launch_all([child], timeout_s)
        return child

    async def start_child(
        self,
        name: str,
        argv: Sequence[str],
        ready_url: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = READY_TIMEOUT_S,
    ) -> Child:
        """Any other child process (a tuned simulator, a load generator), managed like the rest."""
        child = self._child(name, list(argv), ready_url, env)
        await self._launch_all([child], timeout_s)
        return child

    async def kill(self, name: str, signum: int = signal.SIGKILL) -> int:
        """Send ``signum`` and wait for the exit; returns the exit code (negative: the signal)."""
        return await self.children[name].kill(signum)

    async def terminate(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code (None if it was not running)."""
        return await self.children[name].terminate(timeout_s)

    async def restart(
        self, name: str, *, wait_ready: bool = True, timeout_s: float = READY_TIMEOUT_S
    ) -> Child:
        """Start a stopped or killed child again with the same command (SIGTERM it first if it
        still runs)."""
        child = self.children[name]
        if child.running:
            await self.terminate(name)
        await child.spawn(self.source_dir)
        if wait_ready:
            await self.wait_ready(name, timeout_s)
        return child

    async def stop(self) -> None:
        """SIGTERM every child (services before simulators), then stop the broker."""
        services = [n for n, c in self.children.items() if c.running and n not in _SIMULATOR_NAMES]
        await asyncio.gather(*(self.terminate(name) for name in services))
        others = [name for name, child in self.children.items() if child.running]
        await asyncio.gather(*(self.terminate(name) for name in others))
        if self._session is not None:
            await self._session.close()
            self._session = None
        await asyncio.to_thread(self.broker.close)

    def check_alive(self) -> None:
        """StackError naming every child that exited although nobody stopped it."""
        dead = [
            f"{name} (exit {child.process.returncode}, log {child.log_path})"
            for name, child in self.children.items()
            if child.process is not None and not child.running and not child.stopping
        ]
        if dead:
            raise StackError("exited unexpectedly: " + ", ".join(dead))

    async def wait_ready(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the child's ready URL answers 200 (a consumer: it holds its partitions)."""
        child = self.children[name]
        if child.ready_url is None:
            return
        url = child.ready_url

        async def answers() -> bool:
            if not child.running:
                assert child.process is not None
                raise StackError(
                    f"{name} exited with code {child.process.returncode} before it was ready; "
                    f"see {child.log_path}"
                )
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as answer:
                    return answer.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until(answers, timeout_s, f"{name} to be ready at {url}", interval_s=0.2)

    # -- measurements ------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """A running child's process id; ``"broker"`` is the embedded broker."""
        if name == BROKER:
            return self.broker.pid
        child = self.children.get(name)
        return child.pid if child is not None and child.running else None

    @property
    def broker_pid(self) -> int | None:
        return self.broker.pid

    def rss(self, name: str) -> int:
        """The child's resident set size in bytes now (0 when it is not running)."""
        pid = self.pid(name)
        return process_rss(pid) if pid is not None else 0

    def cpu_seconds(self, name: str) -> float:
        """CPU time the child's current process has used (restarts start from 0)."""
        pid = self.pid(name)
        return process_cpu_seconds(pid) if pid is not None else 0.0

    async def wait_for_final_reports(
        self,
        campaign_id: str | None,
        expected: int,
        timeout_s: float,
        interval_s: float = 0.5,
        on_progress: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Until the campaign's tally has ``expected`` final reports; the tally. Fails at once when
        a child exits unexpectedly."""
        latest: dict[str, Any] = {}

        async def done() -> bool:
            self.check_alive()
            latest.update(await self.optimove_tally(campaign_id))
            if on_progress is not None:
                on_progress(latest)
            return int(latest["final"]) >= expected

        await wait_until(done, timeout_s, f"{expected} final reports", interval_s)
        return latest

    async def publish(self, records: Iterable[OutRecord], role: str = "bench") -> None:
        """Publish records from this process (acks=all), bypassing ingress."""
        producer = make_producer(self.settings.kafka, role)
        await producer.start()
        try:
            await Publisher(producer, 60.0).publish(records)
        finally:
            await producer.stop()

    # -- internals ---------------------------------------------------------------------------------

    def _child(
        self,
        name: str,
        argv: list[str],
        ready_url: str | None,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        if name in self.children:
            raise StackError(f"a child named {name} exists already")
        child = Child(
            name=name,
            argv=argv,
            log_path=self.run_dir / "logs" / f"{name}.log",
            ready_url=ready_url,
            env={**self.env, **(env or {})},
        )
        self.children[name] = child
        return child

    def _cli(self, config: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "tools.cli", "--config", str(config), *args]

    def _service_child(
        self, service: str, name: str, overrides: Mapping[str, Any] | None = None
    ) -> Child:
        data = instance_config(
            self.config, service, self.run_dir / "state" / name, fresh_ports=name != service
        )
        deep_merge(data, overrides or {})
        settings = Settings(**data)
        config = self.run_dir / "config" / f"{name}.toml"
        config.write_text(to_toml(data), encoding="utf-8")
        ready = f"http://{ops_address(settings, service)}/readyz"
        return self._child(name, self._cli(config, "run", service), ready)

    def _simulator_child(self, simulator: str) -> Child:
        if simulator == "optimove":
            listen = self.optimove_url.removeprefix("http://")
            args = ["simulate", "optimove", f"--listen={listen}"]
            args.append(f"--max-recorded={self.optimove_max_recorded}")
            ready = f"{self.optimove_url}/_simulator/mode"
        else:
            listen = self.providers_url.removeprefix("http://")
            args = ["simulate", "providers", f"--listen={listen}", *self.provider_options.argv()]
            ready = f"{self.providers_url}/_simulator/config"
        return self._child(f"sim-{simulator}", self._cli(self.config_path, *args), ready)

    async def _launch_all(self, children: Sequence[Child], timeout_s: float) -> None:
        for child in children:
            await child.spawn(self.source_dir)
        await asyncio.gather(*(self.wait_ready(child.name, timeout_s) for child in children))


_SIMULATOR_NAMES = frozenset({OPTIMOVE_SIMULATOR, PROVIDER_SIMULATOR})


# -- sampling --------------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the sampler started
    rss: dict[str, int]  # bytes, per child name
    progress: float | None = None  # what the sampler's progress callback said, if any


@dataclass
class ResourceSampler:
    """Samples the RSS of named children every ``interval_s`` in the background (restarted
    children are followed by name); ``progress`` (any number, e.g. final reports so far) is
    recorded with each sample when given."""

    stack: Stack
    names: Sequence[str]
    interval_s: float = 1.0
    progress: Callable[[], float | None] | None = None
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _started: float = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._take(time.monotonic() - self._started)

    def peak(self, name: str) -> int:
        return max((sample.rss.get(name, 0) for sample in self.samples), default=0)

    async def _run(self) -> None:
        while True:
            self._take(time.monotonic() - self._started)
            await asyncio.sleep(self.interval_s)

    def _take(self, at: float) -> None:
        progress = self.progress() if self.progress is not None else None
        rss = {name: self.stack.rss(name) for name in self.names}
        self.samples.append(Sample(at, rss, progress))
