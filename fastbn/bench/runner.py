"""A whole benchmark run: :func:`run` measures every case, operation and thread count.

It makes each case's inputs, sets thread counts, builds the contenders, times them
(waiting for idle cores and retrying disturbed measurements with ``wait_idle_s``) and
collects the medians into a :class:`~fastbn.bench.report.Report`.
"""

import contextlib
import datetime
import time

import numpy as np

import fastbn

from .cases import LARGE_NUMEL, OP_TITLES, OPS
from .contender import Inputs, contenders, fastbn_call, fastbn_layer, import_torch, split_copy
from .load import BUSY_CORES, OtherLoad, wait_for_idle
from .report import Report, Result, ScalingResult, threads_phrase
from .timing import measure


def run(cases, *, ops=OPS, threads=None, use_torch=True, rounds=None, budget_s=80.0,
        quick=False, scaling=True, wait_idle_s=0.0, progress=None):
    """Measures ``cases`` x ``ops`` at each thread count in ``threads``; returns a :class:`Report`.

    ``threads`` defaults to ``[fastbn.get_num_threads()]``. ``scaling`` also times fastbn
    (``out=``) and the copy at 1 thread against the largest count on the large cases (every
    case with ``quick``): the copy's speedup is what a memory-bound pass can gain.
    ``wait_idle_s`` > 0: before each measurement, wait up to that long for other processes to
    leave the cores idle (the wait does not count against ``budget_s``). ``progress``, if
    given, is called with a line of text before each measurement.
    """
    started = time.perf_counter()
    initial_threads = fastbn.get_num_threads()
    threads = list(threads or [initial_threads])
    report = Report(threads=tuple(threads), started=datetime.datetime.now().astimezone())
    torch = None
    if use_torch:
        torch, report.torch_note = import_torch()
    else:
        report.torch_note = "not run (--no-torch)"
    if torch is not None:
        report.torch_version = torch.__version__
        initial_torch_threads = torch.get_num_threads()

    scaling_threads = sorted(set(threads)) if len(set(threads)) > 1 else sorted({1, threads[0]})
    scaling_cases = []
    if scaling and len(scaling_threads) > 1 and fastbn.openmp_enabled():
        scaling_cases = [c for c in cases if not c.single and (quick or c.numel >= LARGE_NUMEL)]

    jobs = [("compare", n, case, op) for n in threads for case in cases
            for op in ops if op in case.ops]
    jobs += [("scaling", None, case, op) for case in scaling_cases for op in ops if op in case.ops]
    measure_options = dict(min_rounds=3, max_rounds=20, warm_s=0.005) if quick else {}

    inputs_cache = {}
    try:
        for index, (kind, n, case, op) in enumerate(jobs):
            if case not in inputs_cache:
                inputs_cache.clear()  # keep one case's arrays alive at a time
                inputs_cache[case] = Inputs.make(case)
            inputs = inputs_cache[case]
            label = f"[{index + 1}/{len(jobs)}] {case.name} {case.dtype} {OP_TITLES[op]}"
            setup, layer = None, None
            if kind == "compare":
                label += f", {threads_phrase(n)}"
                fastbn.set_num_threads(n)
                if torch is not None:
                    torch.set_num_threads(n)
                layer = fastbn_layer(case, inputs) if op == "eval" and case.single else None
                calls = contenders(case, op, inputs, n, torch, layer)
            else:
                label += ", fastbn and copy at " + " vs ".join(map(str, scaling_threads))
                label += " threads"
                calls, setup = _scaling_calls(case, op, inputs, scaling_threads)

            # With wait_idle_s, a measurement that other processes disturbed is taken again
            # (twice at most); the least disturbed one is kept.
            kept = None
            for attempt in range(3 if wait_idle_s > 0 else 1):
                if wait_idle_s > 0:
                    report.waited_s += wait_for_idle(wait_idle_s)
                if progress:
                    progress(label + (f" (again: {kept[2]:.1f} busy cores)" if attempt else ""))
                remaining_s = budget_s - (time.perf_counter() - started - report.waited_s)
                job_budget_s = max(remaining_s, 0.0) / (len(jobs) - index)
                no_grad = torch.no_grad() if torch is not None else contextlib.nullcontext()
                with no_grad, OtherLoad() as load:
                    medians, done = measure(calls, budget_s=job_budget_s, rounds=rounds,
                                            setup=setup, **measure_options)
                if kept is None or (load.cores or 0.0) < kept[2]:
                    kept = (medians, done, load.cores or 0.0, load.cores)
                if load.cores is None or load.cores < BUSY_CORES:
                    break
            medians, done, _, other_load = kept
            if kind == "compare":
                report.results.append(
                    Result(case, op, n, medians, done, other_load, layer is not None)
                )
            else:
                fastbn_medians = {n: medians[("fastbn", n)] for n in scaling_threads}
                copy_medians = {n: min(medians["copyto"], medians[("split-copy", n)])
                                for n in scaling_threads}
                report.scaling.append(
                    ScalingResult(case, op, fastbn_medians, done, other_load, copy_medians)
                )
    finally:
        fastbn.set_num_threads(None)  # back to OpenMP's default, unless it was set otherwise
        if fastbn.get_num_threads() != initial_threads:
            fastbn.set_num_threads(initial_threads)
        if torch is not None:
            torch.set_num_threads(initial_torch_threads)
    report.seconds = time.perf_counter() - started
    return report


def _scaling_calls(case, op, inputs, thread_counts):
    """fastbn with ``out=`` and the split copy at each thread count, and numpy.copyto:
    ``(calls, setup)`` for measure, keyed ``("fastbn", n)``, ``("split-copy", n)`` and
    ``"copyto"``. The copy floor at n threads is the faster of the two copies."""
    x, target = inputs.x, np.empty_like(inputs.x)
    call = fastbn_call(case, op, inputs, out=np.empty_like(x))
    calls, setup = {"copyto": lambda: np.copyto(target, x)}, {}
    for count in thread_counts:
        calls[("fastbn", count)] = call
        calls[("split-copy", count)] = lambda: split_copy(target, x)
        for name in ("fastbn", "split-copy"):
            setup[(name, count)] = lambda c=count: fastbn.set_num_threads(c)
    return calls, setup
