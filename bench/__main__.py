"""``make bench``: the benchmark suite. Each benchmark prints its own table."""

from __future__ import annotations

import sys

from bench import callbacks, sender

BENCHMARKS = {"sender": sender.main, "callbacks": callbacks.main}


def main(argv: list[str]) -> int:
    """Run every benchmark, or those named on the command line; non-zero if any check failed."""
    chosen = argv or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    failed = [name for name in chosen if BENCHMARKS[name]() != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
