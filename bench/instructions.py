"""Instructions per message of the normalizer's handler, counted by valgrind: the same on every run.

CPU time on these machines moves by a third within minutes, so two versions of a hot path can
only be told apart by alternating many runs. An instruction count does not move: ``python -m
bench.instructions [--against DIR]`` runs the normalizer's handler (no Kafka: its outbox's
publisher only encodes the records) over two campaign sizes under ``valgrind --tool=callgrind``
and prints the difference per message, for this tree and for the checkout in ``DIR``. How to
read it: docs/performance.md, "Counting instructions".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIZES = (1_000, 3_000)
PARTITIONS = 12


async def _handle_all(messages: int, lag: int, window: int) -> None:
    """The handler over ``messages`` messages: each dispatch record, its ``sent`` callback
    ``lag`` messages later and its ``delivered`` callback ``2 * lag`` later."""
    from aiokafka.structs import ConsumerRecord

    from bench.stack import base_config
    from bench.stages import normalizer_input
    from services.normalizer.handler import NormalizerHandler
    from shared.config import Settings
    from shared.kafka.outbox import Outbox

    class EncodingPublisher:
        async def publish(self, records: Any) -> None:
            for record in records:
                record.encoded  # noqa: B018

    # The stage benchmark's configuration (its tenant and provider account), no peer reached.
    nowhere = "127.0.0.1:9"
    config = base_config(
        bootstrap_servers=nowhere,
        optimove_url=f"http://{nowhere}",
        provider_url=f"http://{nowhere}",
    )
    handler = NormalizerHandler(Settings(**config))
    for partition in range(PARTITIONS):
        handler.store.load(partition, [])
    # Time runs ~50 times slower under valgrind: the stores' write window is set by count.
    handler.store.flush_after_s = 1e9
    handler.store.max_pending = window
    handler._outbox = Outbox(EncodingPublisher(), name="instructions")  # type: ignore[arg-type]
    inputs = normalizer_input(messages, "instructions")
    order = sorted(range(len(inputs)), key=lambda i: (i // 3 + lag * (i % 3), i % 3))
    records = []
    for offset, index in enumerate(order):
        key, value = inputs[index].encoded
        partition = sum(key) % PARTITIONS  # not hash(): the same on every run
        records.append(
            ConsumerRecord(
                inputs[index].topic.name, partition, offset, 0, 0, key, value, None, 0, 0, []
            )
        )
    for start in range(0, len(records), 300):  # as the runner's in-flight records
        await asyncio.gather(*(handler.handle(r) for r in records[start : start + 300]))


def _count(source: Path, messages: int, lag: int, window: int) -> int:
    """Instructions of one run of the handler (start-up included) in ``source``'s code."""
    with_callgrind = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        str(messages),
        "--lag",
        str(lag),
        "--window",
        str(window),
    ]
    environment = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        with_callgrind, cwd=source, env=environment, capture_output=True, text=True, check=True
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-500:]}")
    return int(found.group(1))


def per_message(source: Path, lag: int, window: int) -> float:
    small, big = SIZES
    with ThreadPoolExecutor(2) as pool:  # two processes: one per core
        counts = list(pool.map(lambda n: _count(source, n, lag, window), SIZES))
    return (counts[1] - counts[0]) / (big - small)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--against", type=Path, help="another checkout, counted the same way")
    parser.add_argument("--lag", type=int, default=300, help="messages between a message's inputs")
    parser.add_argument("--window", type=int, default=250, help="stores' writes held per partition")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child is not None:
        import uvloop

        from shared import gcpolicy

        gcpolicy.tune_for_throughput()
        uvloop.run(_handle_all(options.child, options.lag, options.window))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    sources = {"this tree": REPO}
    if options.against is not None:
        sources[str(options.against)] = options.against.resolve()
    print(f"normalizer handler, lag {options.lag} messages, write window {options.window}")
    for name, source in sources.items():
        print(f"{name:40s} {per_message(source, options.lag, options.window):12,.0f} per message")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
