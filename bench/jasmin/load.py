"""Load driver and measurement of the Jasmin comparison benchmark (bench/jasmin/run.sh).

Posts N messages to Jasmin's HTTP API (``/send``) from a few concurrent clients, each one
request at a time on a kept-alive connection, and asks the SMPP sink (bench/jasmin/sink.py)
when the last submit_sm arrived. The figure: N / (last submit_sm at the sink - first HTTP
request). CPU seconds (user + system, from /proc) of each process group (a root pid and its
descendants) are read at the first request and at the end.

With ``--dlr`` every message asks for delivery receipts (``dlr-level``, default 3: one
callback when the SMSC accepts, one when the handset's receipt comes back) thrown by Jasmin to
a small HTTP server here; the run then ends at the last expected callback.

A warm-up (``--warmup`` messages, not counted) runs first, so that the connector is bound and
the route known. Every wait is bounded by ``--timeout`` (seconds from the first measured
request); a run that does not finish in time is reported as incomplete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import web

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(roots: list[int]) -> float:
    """User + system CPU seconds of the live processes under (and including) roots."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    wanted = {pid for pid in roots if pid in times}
    grew = True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in wanted and pid not in wanted}
        wanted |= more
        grew = bool(more)
    return sum(times[pid] for pid in wanted)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Sink:
    """The sink's control port."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def ask(self, line: str, wait_s: float = 10.0) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), wait_s)
            return answer.decode().strip()
        finally:
            writer.close()

    async def bound(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if json.loads(await self.ask("STATS"))["binds"]:
                return True
            await asyncio.sleep(0.2)
        return False

    async def reset(self) -> None:
        await self.ask("RESET")

    async def wait(self, count: int, timeout_s: float) -> dict[str, Any]:
        timeout_s = max(0.0, timeout_s)
        answer = await self.ask(f"WAIT {count} {timeout_s:.3f}", wait_s=timeout_s + 10)
        result: dict[str, Any] = json.loads(answer)
        return result


class Receipts:
    """Receives the delivery receipts Jasmin throws (HTTP), answering what Jasmin expects."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.want = 0
        self.done = asyncio.Event()

    def reset(self, want: int) -> None:
        self.count, self.last, self.want = 0, 0.0, want
        self.done.clear()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.count += 1
        self.last = time.time()
        if self.count >= self.want:
            self.done.set()
        return web.Response(text="ACK/Jasmin")


class Sender:
    def __init__(self, args: argparse.Namespace, dlr_url: str | None) -> None:
        self.args = args
        self.dlr_url = dlr_url
        self.accepted = 0
        self.errors: list[str] = []
        self.last_accept = 0.0

    def form(self, i: int) -> dict[str, str]:
        data = {
            "username": self.args.user,
            "password": self.args.password,
            "to": f"336{i:08d}",
            "from": "BENCH",
            "content": f"Benchmark message {i}: your code is {i % 1000000:06d}",
        }
        if self.dlr_url:
            data.update(
                {
                    "dlr": "yes",
                    "dlr-url": self.dlr_url,
                    "dlr-level": str(self.args.dlr_level),
                    "dlr-method": "POST",
                }
            )
        return data

    async def client(self, session: aiohttp.ClientSession, numbers: Iterator[int]) -> None:
        for i in numbers:
            try:
                async with session.post(self.args.url, data=self.form(i)) as response:
                    body = await response.text()
                if response.status == 200 and body.startswith("Success"):
                    self.accepted += 1
                    self.last_accept = time.time()
                else:
                    self.errors.append(f"{response.status} {body.strip()[:200]}")
            except aiohttp.ClientError as error:
                self.errors.append(repr(error))
            if len(self.errors) > 20:
                return

    async def send(self, first: int, count: int, clients: int) -> None:
        numbers = iter(range(first, first + count))  # shared: each number sent once
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(self.client(session, numbers) for _ in range(clients)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    groups: dict[str, list[int]] = {}
    for spec in args.group:
        name, _, pids = spec.partition("=")
        groups[name] = [int(p) for p in pids.split(",") if p]
    sink = Sink(args.sink_control)
    receipts = Receipts()
    per_message = {1: 1, 2: 1, 3: 2}[args.dlr_level] if args.dlr else 0
    runner: web.AppRunner | None = None
    dlr_url = None
    if args.dlr:
        app = web.Application()
        app.router.add_post("/dlr", receipts.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.dlr_port).start()
        dlr_url = f"http://127.0.0.1:{args.dlr_port}/dlr"

    try:
        if not await sink.bound(30.0):
            raise SystemExit("Jasmin's connector did not bind to the sink within 30 s")
        # Warm-up, not measured.
        if args.warmup:
            receipts.reset(args.warmup * per_message)
            warm = Sender(args, dlr_url)
            await warm.send(0, args.warmup, args.clients)
            if warm.errors:
                raise SystemExit(f"warm-up: Jasmin refused messages: {warm.errors[:3]}")
            got = await sink.wait(args.warmup, args.timeout)
            if got["submits"] < args.warmup:
                raise SystemExit(f"warm-up: the sink got {got['submits']} of {args.warmup}")
            if per_message:
                await asyncio.wait_for(receipts.done.wait(), args.timeout)
            await asyncio.sleep(1.0)
        await sink.reset()
        receipts.reset(args.n * per_message)

        # Measured run.
        cpu0 = {name: process_tree_cpu(pids) for name, pids in groups.items()}
        own0 = own_cpu()
        t0 = time.time()
        sender = Sender(args, dlr_url)
        await asyncio.wait_for(sender.send(args.warmup, args.n, args.clients), args.timeout)
        got = await sink.wait(args.n, args.timeout - (time.time() - t0))
        if per_message:
            left = args.timeout - (time.time() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receipts.done.wait(), max(0.0, left))
        end = time.time()
        cpu1 = {name: process_tree_cpu(pids) for name, pids in groups.items()}
        own1 = own_cpu()
    finally:
        if runner:
            await runner.cleanup()

    last_submit = got["last"] or end
    complete = got["submits"] >= args.n and receipts.count >= args.n * per_message
    result: dict[str, Any] = {
        "messages": args.n,
        "clients": args.clients,
        "accepted": sender.accepted,
        "http_errors": len(sender.errors),
        "first_errors": sender.errors[:3],
        "submits_at_sink": got["submits"],
        "complete": complete,
        "seconds_to_last_accept": round(max(sender.last_accept - t0, 0.0), 3),
        "seconds_to_last_submit": round(last_submit - t0, 3),
        "msgs_per_s_to_last_submit": round(got["submits"] / max(last_submit - t0, 1e-9), 1),
        "cpu_seconds": {name: round(cpu1[name] - cpu0[name], 2) for name in groups},
        "cpu_seconds_load_driver": round(own1 - own0, 2),
        "cpu_window_s": round(end - t0, 3),
    }
    if per_message:
        result.update(
            {
                "dlr_level": args.dlr_level,
                "receipt_callbacks": receipts.count,
                "receipt_callbacks_expected": args.n * per_message,
                "receipts_sent_by_sink": got["receipts"],
                "seconds_to_last_callback": round(max(receipts.last - t0, 0.0), 3),
                "msgs_per_s_to_last_callback": round(args.n / max(receipts.last - t0, 1e-9), 1),
            }
        )
    return result


def report(result: dict[str, Any], jasmin_groups: list[str]) -> str:
    r = result
    lines = [
        f"Jasmin end to end: {r['messages']} messages, {r['clients']} HTTP clients"
        + ("" if r["complete"] else "  ** INCOMPLETE (timeout) **"),
        f"  accepted by HTTP API : {r['accepted']} ({r['http_errors']} errors), last accepted"
        f" at {r['seconds_to_last_accept']:.2f} s",
        f"  submit_sm at sink    : {r['submits_at_sink']}, last at"
        f" {r['seconds_to_last_submit']:.2f} s -> {r['msgs_per_s_to_last_submit']:.1f} msg/s"
        " (first HTTP request -> last submit_sm)",
    ]
    if "receipt_callbacks" in r:
        lines.append(
            f"  receipt callbacks    : {r['receipt_callbacks']} of"
            f" {r['receipt_callbacks_expected']} (dlr-level {r['dlr_level']}), last at"
            f" {r['seconds_to_last_callback']:.2f} s -> {r['msgs_per_s_to_last_callback']:.1f}"
            " msg/s (first HTTP request -> last receipt callback)"
        )
    lines.append(f"  CPU seconds over the {r['cpu_window_s']:.2f} s run (user + system):")
    for name, seconds in r["cpu_seconds"].items():
        lines.append(f"    {name:<22} {seconds:8.2f}")
    gateway = sum(r["cpu_seconds"].get(name, 0.0) for name in jasmin_groups)
    lines.append(f"    {'= gateway (' + ', '.join(jasmin_groups) + ')':<22} {gateway:8.2f}")
    lines.append(f"    {'load driver (harness)':<22} {r['cpu_seconds_load_driver']:8.2f}")
    if r["first_errors"]:
        lines.append(f"  first errors: {r['first_errors']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:11401/send")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="benchpwd")
    parser.add_argument("-n", type=int, default=10_000, help="messages")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=55.0, help="seconds, the whole run")
    parser.add_argument("--sink-control", type=int, default=12777)
    parser.add_argument("--dlr", action="store_true", help="ask for receipts, wait for them")
    parser.add_argument("--dlr-level", type=int, choices=(1, 2, 3), default=3)
    parser.add_argument("--dlr-port", type=int, default=12778)
    parser.add_argument(
        "--group", action="append", default=[], help="NAME=PID[,PID]: a process tree to time"
    )
    parser.add_argument(
        "--gateway", default="jasmind,rabbitmq,redis", help="groups summed as the gateway"
    )
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(report(result, [g for g in args.gateway.split(",") if g in result["cpu_seconds"]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not result["complete"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
