"""``make bench``: the benchmark suite. Each benchmark prints its own table.

``python -m bench [NAME ...] [--recipients N] [--profile]`` runs every benchmark, or those named;
the results (with the machine's details) go to ``bench/results/`` and the README's table. Every
benchmark runs on Apache Kafka, the embedded broker of ``shared.kafka.broker``; ``--broker tansu``
runs them on Tansu (memory only) instead, and ``--compare-brokers`` adds e2e's throughput phase on
the other broker (``bench/e2e.py``). The broker is recorded with each benchmark's figures. The
campaign sizes of ``e2e`` and ``memory`` can also come from ``BENCH_E2E_RECIPIENTS`` and
``BENCH_MEMORY_RECIPIENTS``; the memory benchmark's time budget from ``--max-minutes`` or
``BENCH_MEMORY_MAX_MINUTES``; ``--dry-run`` runs it on a dry-run tenant (``bench/memory.py``).
``--big``, ``--small`` and ``--replies`` size the fairness benchmark (``bench/fairness.py``).
Exit status 1 when a check failed, 2 for an unknown name.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from bench import callbacks, e2e, fairness, ingress, memory, sender, stages
from bench.results import (
    BROKERS,
    Options,
    Report,
    broker_info,
    machine,
    record,
    render_latest,
    run_markdown,
)

BENCHMARKS: dict[str, Callable[[Options], Report]] = {
    "sender": sender.bench,
    "fairness": fairness.bench,
    "callbacks": callbacks.bench,
    "ingress": ingress.bench,
    "e2e": e2e.bench,
    "memory": memory.bench,
}
# Run only when named.
EXTRA: dict[str, Callable[[Options], Report]] = {"stages": stages.bench}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join([*BENCHMARKS, *EXTRA]))
    parser.add_argument(
        "--recipients", type=int, help="campaign size of e2e and memory (defaults: theirs)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="e2e, stages: record py-spy profiles of the services (needs py-spy and ptrace rights)",
    )
    parser.add_argument(
        "--stage",
        action="append",
        choices=stages.STAGES,
        help="stages: measure only this stage (may be given more than once)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="memory: post for at most this long, then check the campaign posted so far",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="memory: a dry-run tenant (dry_run = true): the sender simulates the provider call "
        "and its delivery report, so the provider simulator and the callbacks service idle; "
        "the figures say so",
    )
    parser.add_argument(
        "--big", type=int, help="fairness: tenant A's campaign (default: 200,000 recipients)"
    )
    parser.add_argument(
        "--small", type=int, help="fairness: tenant B's campaign (default: 2,000 recipients)"
    )
    parser.add_argument("--replies", type=int, help="fairness: auto replies (default: 100)")
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="kafka",
        help="the embedded broker every benchmark runs on (default: kafka, i.e. Apache Kafka)",
    )
    parser.add_argument(
        "--compare-brokers",
        action="store_true",
        help="e2e: run its throughput phase on the other broker too, and compare the two",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print only; write nothing to bench/results"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="run nothing: rewrite bench/results/latest.md and README's table from latest.json",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    if args.render:
        render_latest()
        return 0
    chosen = args.names or list(BENCHMARKS)
    known = {**BENCHMARKS, **EXTRA}
    unknown = [name for name in chosen if name not in known]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return 2
    options = Options(
        recipients=args.recipients,
        profile=args.profile,
        stages=tuple(args.stage) if args.stage else None,
        max_minutes=args.max_minutes,
        dry_run=args.dry_run,
        broker=args.broker,
        compare_brokers=args.compare_brokers,
        big_campaign=args.big,
        small_campaign=args.small,
        auto_replies=args.replies,
    )
    broker = broker_info(options.broker)
    reports: list[Report] = []
    for name in chosen:
        started = time.monotonic()
        details = machine()  # the load average before this benchmark started
        details["broker"] = broker["name"]
        try:
            report = known[name](options)
        except Exception as exc:
            traceback.print_exc()
            report = Report(name, [], "", {}, failures=[f"{type(exc).__name__}: {exc}"])
            report.duration_s = time.monotonic() - started
        report.figures["broker"] = broker
        report.machine = details
        reports.append(report)
        print(f"\n{name}: {'PASS' if report.ok else 'FAIL'} in {report.duration_s:.0f} s\n")
        for failure in report.failures:
            print(f"FAILED {name}: {failure}", file=sys.stderr)
    if not args.no_record:
        recorded = [report for report in reports if report.summary]
        if recorded:
            try:
                path = record(recorded)
            except (OSError, TypeError, ValueError):
                # The figures took minutes to measure: show them even when they cannot be kept.
                traceback.print_exc()
                print(run_markdown(recorded))
                return 1
            print(f"results: {path}.json, {path}.md, bench/results/latest.md, README.md")
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
