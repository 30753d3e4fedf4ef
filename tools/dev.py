"""``smsbridge dev``: the whole pipeline on one machine, in one process group.

Starts the embedded broker (when ``kafka.bootstrap_servers = "embedded"``: Apache Kafka, its data
kept in ``kafka.embedded_data_dir``, else the Tansu fallback; ``shared.kafka.broker``), creates the
topics, then runs the six services and the two simulators as child processes of their own, exactly
as they run in production, with every log line prefixed by its service. Ctrl-C (or SIGTERM) stops
the children with SIGTERM, waits for them, and stops the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from services import SERVICES
from shared.config import EMBEDDED_BROKER, Settings, dev_config_path, load_settings
from shared.contract.topics import ensure_topics
from shared.kafka.broker import (
    EMBEDDED_BROKER_ENV,
    ApacheKafkaBroker,
    BrokerError,
    EmbeddedBroker,
    embedded_broker,
)
from shared.kafka.clients import EMBEDDED_BOOTSTRAP_ENV, make_admin

SIMULATORS = ("optimove", "providers")
_COLOURS = ("36", "32", "33", "35", "34", "31", "37")


@dataclass
class Child:
    name: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None


def child_commands(config_path: str, with_simulators: bool) -> list[Child]:
    base = [sys.executable, "-m", "tools.cli", "--config", config_path]
    children = [Child(name, [*base, "run", name]) for name in SERVICES]
    if with_simulators:
        children += [Child(f"sim-{name}", [*base, "simulate", name]) for name in SIMULATORS]
    return children


async def _pump(child: Child, colour: str, stream: asyncio.StreamReader) -> None:
    prefix = (
        f"\x1b[{colour}m{child.name:>14}\x1b[0m | " if sys.stdout.isatty() else f"{child.name} | "
    )
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode("utf-8", "replace"))
        sys.stdout.flush()


async def _ensure_topics(settings: Settings) -> None:
    admin = make_admin(settings.kafka)
    await admin.start()
    try:
        await ensure_topics(admin, settings.kafka.replication_factor)
    finally:
        await admin.close()


async def run_children(children: list[Child], env: dict[str, str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    pumps: list[asyncio.Task[None]] = []
    for index, child in enumerate(children):
        child.process = await asyncio.create_subprocess_exec(
            *child.argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert child.process.stdout is not None
        pumps.append(
            asyncio.create_task(_pump(child, _COLOURS[index % len(_COLOURS)], child.process.stdout))
        )
    waits = {asyncio.create_task(c.process.wait()): c for c in children if c.process}
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task in waits:
            child = waits[task]
            print(f"{child.name} exited with code {task.result()}; stopping the stack", flush=True)
            exit_code = 1
    for child in children:
        if child.process and child.process.returncode is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        if child.process is None:
            continue
        try:
            await asyncio.wait_for(child.process.wait(), 30)
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
    stopper.cancel()
    for pump in pumps:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pump, 2)
    return exit_code


def describe(broker: EmbeddedBroker) -> str:
    if isinstance(broker, ApacheKafkaBroker):
        return f"Apache Kafka, data in {broker.root} (delete it to start afresh)"
    return "Tansu, memory only: everything is lost when it stops"


def run_dev(args: argparse.Namespace) -> int:
    config_path = dev_config_path(args.config)
    if not Path(config_path).exists():
        print(f"configuration {config_path} not found", file=sys.stderr)
        return 2
    settings = load_settings(config_path)
    env = {**os.environ, "SMSBRIDGE_CONFIG": str(Path(config_path).resolve())}
    broker: EmbeddedBroker | None = None
    if settings.kafka.bootstrap_servers == EMBEDDED_BROKER:
        try:
            broker = embedded_broker(
                settings.kafka.embedded_port, data_dir=Path(settings.kafka.embedded_data_dir)
            )
            broker.start()
        except BrokerError as exc:
            print(f"embedded broker: {exc}", file=sys.stderr)
            return 1
        env[EMBEDDED_BOOTSTRAP_ENV] = os.environ[EMBEDDED_BOOTSTRAP_ENV] = broker.bootstrap_servers
        env[EMBEDDED_BROKER_ENV] = broker.kind
        print(f"embedded broker on {broker.bootstrap_servers}: {describe(broker)}", flush=True)
    try:
        asyncio.run(_ensure_topics(settings))
        children = child_commands(config_path, with_simulators=not args.no_simulators)
        print(
            f"ingress on http://{settings.ingress.listen}, callbacks on "
            f"http://{settings.callbacks.listen}, campaigns admin API on "
            f"http://{settings.campaigns.listen}; Ctrl-C stops everything",
            flush=True,
        )
        print(
            f"/metrics, /healthz, /readyz: ingress on http://{settings.ingress.ops_listen}, "
            f"callbacks on http://{settings.callbacks.ops_listen}",
            flush=True,
        )
        return asyncio.run(run_children(children, env))
    finally:
        if broker is not None:
            broker.stop()
