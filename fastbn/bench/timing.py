"""The timing engine: :func:`measure` times callables interleaved and reports their medians.

Each contender is warmed up, given a :class:`Plan` (calls per timed block, blocks per
round), then timed in rounds that rotate the order of the contenders.
"""

import gc
import math
import statistics
import time
from dataclasses import dataclass

#: A timed block lasts at least this long, so the clock's own cost stays negligible.
_BLOCK_NS = 50_000


@dataclass
class Plan:
    """How one contender is timed in each round: ``repeats`` blocks of ``inner`` calls."""

    inner: int
    repeats: int
    estimate_ns: float

    @property
    def round_ns(self):
        return self.inner * self.repeats * self.estimate_ns


def _warm_up(call, warm_ns):
    """Runs ``call`` until it is warm; returns an estimate of its time per call in ns."""
    call()  # first touch of fresh memory, lazy initialisation
    times = []
    spent = 0
    while len(times) < 3 or (spent < warm_ns and len(times) < 1000):
        start = time.perf_counter_ns()
        call()
        elapsed = time.perf_counter_ns() - start
        times.append(elapsed)
        spent += elapsed
    return max(statistics.median(times), 1.0)


def _plan(estimate_ns):
    inner = max(1, math.ceil(_BLOCK_NS / estimate_ns))
    block_ns = inner * estimate_ns
    repeats = 3 if block_ns <= 2e6 else 2 if block_ns <= 1e7 else 1
    return Plan(inner, repeats, estimate_ns)


def measure(calls, *, budget_s=2.0, rounds=None, min_rounds=5, max_rounds=200, warm_s=0.05,
            setup=None):
    """Median time per call, in ns, of each callable in ``calls``, interleaved.

    Each round runs every contender in turn, starting one further along each round; a
    contender's turn is ``repeats`` timed blocks of ``inner`` back-to-back calls, each block
    giving one per-call sample. ``inner`` makes a block last at least 50 µs; ``repeats`` is
    3 for fast calls, fewer for slow ones. ``rounds`` defaults to as many as fit in
    ``budget_s``, within ``[min_rounds, max_rounds]``. ``setup`` maps a name to a callable run,
    untimed, before that contender's turn (to set a thread count, say).

    Returns ``(medians, rounds)``: ``{name: median ns per call}`` and the rounds run.
    """
    setup = setup or {}
    names = list(calls)
    plans = {}
    for name in names:
        if name in setup:
            setup[name]()
        plans[name] = _plan(_warm_up(calls[name], warm_s * 1e9))
    if rounds is None:
        round_ns = sum(plan.round_ns for plan in plans.values())
        rounds = int(min(max(budget_s * 1e9 / round_ns, min_rounds), max_rounds))
    samples = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if name in setup:
                    setup[name]()
                call, plan = calls[name], plans[name]
                for _ in range(plan.repeats):
                    start = time.perf_counter_ns()
                    for _ in range(plan.inner):
                        call()
                    samples[name].append((time.perf_counter_ns() - start) / plan.inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}, rounds
