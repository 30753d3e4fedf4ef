"""Garbage collector settings for a service process that handles many records per second.

CPython's cyclic collector runs its youngest generation every 700 net allocations of container
objects, and now and then a full collection over everything the process holds: the modules,
schemas and clients of start-up (tens of thousands of objects) and the records in flight. Almost
nothing the record path allocates is cyclic garbage (reference counting frees it), so those
collections free nothing, yet in the normalizer they took a third of its CPU (timed with
``gc.callbacks`` during ``python -m bench stages``: 6.3 of 18.7 CPU s for 20,000 messages).

``tune_for_throughput`` moves what exists at start-up out of every later collection
(``gc.freeze``) and lets the youngest generation grow to ``YOUNG_THRESHOLD`` objects before it
is collected (then 0.15 of 12.7 CPU s). Cyclic garbage still goes, a little later: at most that
many objects wait for it. Every long-running process gets this policy from
``shared.kafka.service.run``.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_for_throughput() -> None:
    """Call once at start-up, after the imports, before the records flow."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
