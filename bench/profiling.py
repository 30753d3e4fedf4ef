"""py-spy profiles of running children, and what dominates them.

``Profiler(stack, names, directory).start()`` runs ``py-spy record --format raw`` (collapsed
stacks, one line per distinct stack with its sample count) against each named child until
``stop()``; ``hot_spots(path)`` reads such a file back into the functions that take the most
samples, by themselves (``self``) and with what they call (``total``). py-spy comes from PyPI
(``pip install py-spy``) and needs ptrace rights over the children (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.stack import Stack, StackError

SAMPLES_PER_S = 100


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Profiler:
    stack: Stack
    names: Sequence[str]
    directory: Path
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.folded"

    async def start(self) -> None:
        executable = py_spy()
        if executable is None:
            raise StackError("py-spy is not installed: pip install py-spy")
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            pid = self.stack.pid(name)
            if pid is None:
                raise StackError(f"{name} is not running")
            with (self.directory / f"{name}.py-spy.log").open("wb") as log:
                self.processes[name] = await asyncio.create_subprocess_exec(
                    executable,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(SAMPLES_PER_S),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(self.path(name)),
                    stdout=log,
                    stderr=log,
                )

    async def stop(self) -> dict[str, Path]:
        """End the recordings (py-spy writes its file on SIGINT); the files written."""
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return {name: self.path(name) for name in self.processes if self.path(name).exists()}


@dataclass(frozen=True)
class HotSpots:
    samples: int
    idle: int  # samples in the event loop's wait for I/O (select/epoll)
    by_self: list[tuple[str, int]]
    by_total: list[tuple[str, int]]

    def describe(self, top: int = 12) -> str:
        busy = max(1, self.samples - self.idle)
        idle = self.idle / max(1, self.samples)
        lines = [f"{self.samples} samples ({SAMPLES_PER_S}/s), {idle:.0%} waiting for I/O"]
        lines.append("  self (share of busy samples):")
        lines += [f"    {n / busy:6.1%}  {frame}" for frame, n in self.by_self[:top]]
        lines.append("  total, with callees (share of busy samples):")
        lines += [f"    {n / busy:6.1%}  {frame}" for frame, n in self.by_total[:top]]
        return "\n".join(lines)


def _frame_name(frame: str) -> str:
    """``function (path/to/file.py:line)`` without the line, the path from the package on."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def hot_spots(path: Path) -> HotSpots:
    """Functions by samples from a py-spy ``--format raw`` file (``frame;frame;... count``)."""
    by_self: Counter[str] = Counter()
    by_total: Counter[str] = Counter()
    samples = idle = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        if frames[-1].endswith(".select (selectors.py)"):  # the event loop waiting for I/O
            idle += count
            continue
        by_self[frames[-1]] += count
        for frame in set(frames):
            by_total[frame] += count
    return HotSpots(samples, idle, by_self.most_common(), by_total.most_common())
