"""What a benchmark run found, and where it is written.

Every benchmark returns a ``Report``: a few summary rows (what the README shows), its detailed
tables in markdown, its figures as JSON, and the checks that failed. ``record`` writes one run
(every benchmark it ran) to ``bench/results/<UTC time>-<names>.json`` and ``.md`` with the machine
it ran on, merges it into ``latest.json`` (the latest result of each benchmark, whichever run it
came from), renders ``latest.md``, and puts the summary table into README.md between the
``<!-- bench:latest -->`` markers. Each report names the broker its figures were measured on
(``figures["broker"]``, ``machine["broker"]``, a column of the table).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from shared.kafka.broker.distribution import kafka_version
from shared.text_table import text_table as shared_text_table

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR.parent / "README.md"
README_BEGIN = "<!-- bench:latest begin (written by `make bench`) -->"
README_END = "<!-- bench:latest end -->"
# The order of the README table, whatever order the benchmarks ran in.
ORDER = ("ingress", "sender", "fairness", "callbacks", "stages", "e2e", "memory")
_JSON = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
BROKERS = ("kafka", "tansu")


@dataclass(frozen=True)
class Options:
    """What ``python -m bench`` was asked for beyond the benchmarks' names."""

    # Campaign size of e2e / memory (each has its own default when None).
    recipients: int | None = None
    # e2e and stages: py-spy profiles of the services while measured, in bench/results/profiles.
    profile: bool = False
    # stages: only these stages (None: all six).
    stages: tuple[str, ...] | None = None
    # memory: stop posting after this many minutes and check what was posted.
    max_minutes: float | None = None
    # memory: the campaign's tenant has ``dry_run = true``: the sender simulates the provider call
    # and its delivery report (no provider HTTP calls, no callbacks).
    dry_run: bool = False
    # The embedded broker every benchmark's stack runs on: "kafka" (Apache Kafka) or "tansu".
    broker: str = "kafka"
    # e2e: its throughput phase on Apache Kafka and on Tansu, one after the other.
    compare_brokers: bool = False
    # fairness: the sizes of tenant A's campaign, tenant B's, and the auto replies (None: its
    # defaults, 200,000 / 2,000 / 100).
    big_campaign: int | None = None
    small_campaign: int | None = None
    auto_replies: int | None = None


def broker_info(kind: str) -> dict[str, str]:
    """The broker of ``kind`` as recorded with the figures: kind, version, a name for people."""
    if kind == "kafka":
        version = kafka_version()
        return {"kind": kind, "version": version, "name": f"Apache Kafka {version}"}
    if kind == "tansu":
        return {"kind": kind, "name": "Tansu (memory only)"}
    raise ValueError(f"unknown broker {kind!r}: expected one of {BROKERS}")


@dataclass
class Report:
    benchmark: str
    # (what was measured, the figure) rows of the README's table.
    summary: list[tuple[str, str]]
    # Detailed tables, markdown.
    details: str
    # Every figure, for machines.
    figures: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, numbers: bool = True
) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned when they hold
    ``numbers`` (left-aligned otherwise)."""
    align = [":--", *[("--:" if numbers else ":--")] * (len(header) - 1)]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table for a terminal: columns padded, the first one left-aligned."""
    return shared_text_table(header, rows, right=range(1, len(header)))


def percentile(ordered: Sequence[float], share: float) -> float:
    """The ``share`` percentile of sorted values (nearest rank)."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(share * len(ordered))))
    return ordered[rank - 1]


# -- the machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine() -> dict[str, Any]:
    """Where and on what a run happened."""
    sha = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "ram_gib": round(_ram_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_sha": sha + ("-dirty" if sha and dirty else ""),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def describe_machine(details: Mapping[str, Any]) -> str:
    """The machine and the code, without the date (one line for the runs of one machine)."""
    return (
        f"{details['cpu']}, {details['cores']} cores, {details['ram_gib']} GiB RAM, "
        f"Python {details['python']}, git {_short(details['git_sha'])}"
    )


def _short(sha: str) -> str:
    return (sha[:12] + ("-dirty" if sha.endswith("-dirty") else "")) if sha else "?"


# -- writing ---------------------------------------------------------------------------------------


def summary_markdown(reports: Sequence[Report]) -> str:
    rows = [
        (f"{report.benchmark}: {what}", report.machine.get("broker", "?"), figure)
        for report in sorted(reports, key=_order)
        for what, figure in report.summary
    ]
    table = markdown_table(["benchmark", "broker", "figure"], rows, numbers=False)
    lines = []
    for described in sorted({describe_machine(r.machine) for r in reports if r.machine}):
        dates = sorted(
            r.machine["date"][:16].replace("T", " ")
            for r in reports
            if r.machine and describe_machine(r.machine) == described
        )
        when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        lines.append(f"Measured on {described}; {when} UTC.")
    return table + "\n\n" + "\n".join(lines)


def _order(report: Report) -> int:
    return ORDER.index(report.benchmark) if report.benchmark in ORDER else len(ORDER)


def run_markdown(reports: Sequence[Report]) -> str:
    parts = ["# Benchmark results", "", summary_markdown(reports)]
    for report in sorted(reports, key=_order):
        verdict = "PASS" if report.ok else "FAIL: " + "; ".join(report.failures)
        broker = f" on {report.machine['broker']}" if "broker" in report.machine else ""
        parts += [
            "",
            f"## {report.benchmark}{broker} ({report.duration_s:.0f} s, {verdict})",
            "",
            report.details,
        ]
    return "\n".join(parts) + "\n"


def _load_latest(path: Path) -> dict[str, Report]:
    if not path.exists():
        return {}
    try:
        stored = orjson.loads(path.read_bytes())
        return {name: Report(**data) for name, data in stored.items()}
    except (orjson.JSONDecodeError, TypeError):
        return {}


def record(reports: Sequence[Report], directory: Path = RESULTS_DIR, readme: Path = README) -> Path:
    """Write this run, merge it into latest.json / latest.md, update the README; the run's path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    names = "-".join(report.benchmark for report in sorted(reports, key=_order))
    run = directory / f"{stamp}-{names}"
    payload = {report.benchmark: asdict(report) for report in reports}
    run.with_suffix(".json").write_bytes(orjson.dumps(payload, option=_JSON))
    run.with_suffix(".md").write_text(run_markdown(reports), encoding="utf-8")

    latest_path = directory / "latest.json"
    latest = _load_latest(latest_path)
    latest.update({report.benchmark: report for report in reports})
    latest_path.write_bytes(orjson.dumps({k: asdict(v) for k, v in latest.items()}, option=_JSON))
    render_latest(directory, readme)
    return run


def render_latest(directory: Path = RESULTS_DIR, readme: Path = README) -> None:
    """Write latest.md and the README's table from latest.json."""
    latest = list(_load_latest(directory / "latest.json").values())
    (directory / "latest.md").write_text(run_markdown(latest), encoding="utf-8")
    update_readme(readme, summary_markdown(latest))


def update_readme(readme: Path, table: str) -> bool:
    """Replace what is between the README's markers; False when it has none."""
    if not readme.exists():
        return False
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    updated = text[: start + len(README_BEGIN)] + "\n" + table + "\n" + text[end:]
    readme.write_text(updated, encoding="utf-8")
    return True
