"""Benchmarks: fastbn against PyTorch, plain NumPy and a copy of the same array.

Run ``python -m fastbn bench`` (``--help`` for the options). For every case (shape, dtype,
layout) and operation (training forward, training backward, eval forward) the contenders are:

fastbn
    ``batch_norm_train``, ``batch_norm_backward`` and ``batch_norm(training=False)``; for a
    single example (one value per channel) the eval-mode ``BatchNorm`` layer when there is one.
torch
    ``torch.ops.aten.native_batch_norm`` and ``native_batch_norm_backward`` under
    ``torch.no_grad()``, on tensors that share the NumPy arrays' memory (channels-last input
    becomes a ``channels_last`` tensor), with as many threads as fastbn. Only when torch can be
    imported; it is never a requirement.
numpy
    A plain NumPy implementation (:func:`numpy_train`, :func:`numpy_backward`,
    :func:`numpy_eval`), computed in the input's dtype.
copy
    The floor for a memory-bound operation: one read of x and one write of an array of the
    same size. The faster of ``numpy.copyto`` and a copy split over fastbn's thread count.

The machine may be shared and noisy, so the contenders are interleaved: every round calls
each of them in turn (a few calls each, in a rotating order), and the table reports each
contender's median per-call time over all rounds. The number of rounds adapts to a time
budget for the whole run (``--budget``).

Importing this module does not import torch; :func:`run` imports it only when asked to.
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import gc
import math
import os
import platform
import re
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace

import numpy as np

import fastbn

OPS = ("train", "backward", "eval")
OP_TITLES = {"train": "train forward", "backward": "backward", "eval": "eval forward"}
DTYPES = ("float32", "float64")
EPS = 1e-5

#: Cases at least this large (in elements) are also timed with 1 thread against more.
LARGE_NUMEL = 1 << 20

#: A timed block lasts at least this long, so the clock's own cost stays negligible.
_BLOCK_NS = 50_000


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One input to benchmark: a shape, a dtype and where its channel axis is."""

    shape: tuple
    dtype: str = "float32"
    channels_last: bool = False

    @property
    def axis(self):
        return -1 if self.channels_last else 1

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def single(self):
        """One value per channel: only eval mode is defined."""
        return self.numel == self.channels

    @property
    def ops(self):
        return ("eval",) if self.single else OPS

    @property
    def layout(self):
        if len(self.shape) == 2:
            return "NC"
        if self.channels_last:
            return "NHWC" if len(self.shape) == 4 else "channels-last"
        return "NCHW" if len(self.shape) == 4 else "channels-first"

    @property
    def name(self):
        """The spelling ``--shapes`` accepts: ``32x56x56x64-nhwc``, ``256x1024-f64``."""
        name = "x".join(map(str, self.shape))
        if self.channels_last and len(self.shape) > 2:
            name += "-nhwc" if len(self.shape) == 4 else "-last"
        if self.dtype != "float32":
            name += "-f64"
        return name


DEFAULT_CASES = (
    Case((1, 512)),
    Case((256, 1024)),
    Case((4096, 256)),
    Case((8, 256, 14, 14)),
    Case((32, 64, 56, 56)),
    Case((32, 56, 56, 64), channels_last=True),
    Case((16, 64, 56, 56), "float64"),
    Case((256, 1024), "float64"),
)

#: ``--quick``: the same kinds of case, small enough for a smoke test.
QUICK_CASES = (
    Case((1, 512)),
    Case((64, 256)),
    Case((4, 32, 14, 14)),
    Case((4, 14, 14, 32), channels_last=True),
    Case((64, 256), "float64"),
)

_ALIASES = {
    "single": ("1x512",),
    "nc": ("256x1024", "4096x256"),
    "nchw": ("32x64x56x56",),
    "nhwc": ("32x56x56x64-nhwc",),
    "f64": ("16x64x56x56-f64", "256x1024-f64"),
    "large": tuple(case.name for case in DEFAULT_CASES if case.numel >= LARGE_NUMEL),
    "all": tuple(case.name for case in DEFAULT_CASES),
    "default": tuple(case.name for case in DEFAULT_CASES),
}

_TAGS = {
    "nhwc": ("channels_last", True),
    "last": ("channels_last", True),
    "cl": ("channels_last", True),
    "f32": ("dtype", "float32"),
    "float32": ("dtype", "float32"),
    "f64": ("dtype", "float64"),
    "float64": ("dtype", "float64"),
}


def parse_case(spec):
    """A :class:`Case` from ``32x64x56x56``, ``32x56x56x64-nhwc``, ``256x1024-f64``."""
    shape_text, *tags = spec.strip().lower().split("-")
    if not re.fullmatch(r"\d+(x\d+)+", shape_text):
        raise ValueError(
            f"bad shape {spec!r}: expected a case name ({', '.join(sorted(_ALIASES))}) "
            "or sizes joined by 'x' with at least 2 dimensions, e.g. 32x64x56x56, "
            "optionally followed by -nhwc (channels last) and/or -f64"
        )
    fields = {"shape": tuple(int(size) for size in shape_text.split("x"))}
    for tag in tags:
        if tag not in _TAGS:
            raise ValueError(f"bad tag {tag!r} in {spec!r}: expected one of {', '.join(_TAGS)}")
        key, value = _TAGS[tag]
        fields[key] = value
    if 0 in fields["shape"]:
        raise ValueError(f"bad shape {spec!r}: sizes must be positive")
    return Case(**fields)


def select_cases(shapes=None, dtypes=None, quick=False):
    """The cases to run: ``shapes`` (names, aliases or shapes) with ``dtypes`` forced if given."""
    if shapes is None:
        cases = list(QUICK_CASES if quick else DEFAULT_CASES)
    else:
        cases = []
        for spec in shapes:
            names = _ALIASES.get(spec.strip().lower(), (spec,))
            cases.extend(parse_case(name) for name in names)
    if dtypes:
        cases = [replace(case, dtype=dtype) for dtype in dtypes for case in cases]
    return list(dict.fromkeys(cases))  # in order, without duplicates


# ------------------------------------------------------------------ NumPy reference


def _layout(ndim, axis):
    """The axes to reduce over and the shape a per-channel array broadcasts with."""
    axis = axis % ndim
    broadcast = [1] * ndim
    broadcast[axis] = -1
    return tuple(i for i in range(ndim) if i != axis), tuple(broadcast)


def numpy_train(x, weight, bias, eps=EPS, axis=1):
    """Training forward in plain NumPy, in x's dtype: ``(y, mean, invstd)``."""
    reduce, broadcast = _layout(x.ndim, axis)
    mean = x.mean(axis=reduce)
    centred = x - mean.reshape(broadcast)
    var = np.square(centred).mean(axis=reduce)
    invstd = 1 / np.sqrt(var + eps)
    centred *= (weight * invstd).reshape(broadcast)
    centred += bias.reshape(broadcast)
    return centred, mean, invstd


def numpy_backward(grad_out, x, mean, invstd, weight, axis=1):
    """Training backward in plain NumPy: ``(grad_x, grad_weight, grad_bias)``."""
    reduce, broadcast = _layout(x.ndim, axis)
    count = x.size // x.shape[axis]
    xhat = x - mean.reshape(broadcast)
    xhat *= invstd.reshape(broadcast)
    grad_bias = grad_out.sum(axis=reduce)
    grad_weight = (grad_out * xhat).sum(axis=reduce)
    xhat *= (grad_weight / count).reshape(broadcast)
    grad_x = grad_out - xhat
    grad_x -= (grad_bias / count).reshape(broadcast)
    grad_x *= (weight * invstd).reshape(broadcast)
    return grad_x, grad_weight, grad_bias


def numpy_eval(x, running_mean, running_var, weight, bias, eps=EPS, axis=1):
    """Eval forward in plain NumPy: ``y = a*x + b`` from the running statistics."""
    _, broadcast = _layout(x.ndim, axis)
    scale = weight / np.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    y = x * scale.reshape(broadcast)
    y += shift.reshape(broadcast)
    return y


# ---------------------------------------------------------------------- contenders


@dataclass
class Inputs:
    """Arrays for one case, made once and shared by every contender."""

    x: np.ndarray
    grad_out: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    mean: np.ndarray = None
    invstd: np.ndarray = None

    @classmethod
    def make(cls, case, seed=0):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(case.dtype)
        channels = case.channels

        def per_channel(low, high):
            return rng.uniform(low, high, channels).astype(dtype)

        inputs = cls(
            x=rng.standard_normal(case.shape, dtype=dtype),
            grad_out=rng.standard_normal(case.shape, dtype=dtype),
            weight=per_channel(0.5, 1.5),
            bias=per_channel(-0.5, 0.5),
            running_mean=per_channel(-0.1, 0.1),
            running_var=per_channel(0.5, 2.0),
        )
        if not case.single:
            _, inputs.mean, inputs.invstd = fastbn.batch_norm_train(
                inputs.x, inputs.weight, inputs.bias, EPS, axis=case.axis
            )
        return inputs


class ThreadedCopy:
    """Copies ``source`` into ``target`` in ``threads`` chunks, one per thread.

    The calling thread copies the last chunk itself; ``numpy.copyto`` releases the GIL, so
    the chunks are copied in parallel.
    """

    def __init__(self, target, source, threads, pool):
        target, source = target.reshape(-1), source.reshape(-1)
        bounds = np.linspace(0, source.size, threads + 1).astype(np.int64)
        self.chunks = [
            (target[start:stop], source[start:stop]) for start, stop in zip(bounds, bounds[1:])
        ]
        self.pool = pool

    def __call__(self):
        *others, (target, source) = self.chunks
        futures = [self.pool.submit(np.copyto, t, s) for t, s in others]
        np.copyto(target, source)
        for future in futures:
            future.result()


def _fastbn_layer(case, inputs):
    """An eval-mode ``fastbn.BatchNorm`` for a single-example case, or None if unavailable."""
    layer_class = getattr(fastbn, "BatchNorm", None)
    if layer_class is None:
        return None
    try:
        layer = layer_class(case.channels, axis=case.axis, dtype=np.dtype(case.dtype))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, name)[...] = getattr(inputs, name)  # the functional API's numbers
        layer.eval()
        layer(inputs.x)
    except Exception:  # a layer this module cannot drive: time the functional API instead
        return None
    return layer


def _torch_tensors(torch, case, inputs):
    """Tensors sharing the inputs' memory, channel axis at 1 as PyTorch wants it."""

    def batch(array):
        tensor = torch.from_numpy(array).movedim(case.axis, 1)
        if case.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)  # already is: no copy
        return tensor

    names = ("weight", "bias", "running_mean", "running_var")
    tensors = {name: torch.from_numpy(getattr(inputs, name)) for name in names}
    tensors["x"], tensors["grad_out"] = batch(inputs.x), batch(inputs.grad_out)
    return tensors


def fastbn_call(case, op, inputs, layer=None):
    """fastbn's callable for one case and operation; ``layer`` is timed for eval if given."""
    x, axis = inputs.x, case.axis
    weight, bias = inputs.weight, inputs.bias
    if op == "train":
        return lambda: fastbn.batch_norm_train(x, weight, bias, EPS, axis=axis)
    if op == "backward":
        grad_out, mean, invstd = inputs.grad_out, inputs.mean, inputs.invstd
        return lambda: fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight, training=True, axis=axis
        )
    if op == "eval":
        if layer is not None:
            return lambda: layer(x)
        running_mean, running_var = inputs.running_mean, inputs.running_var
        return lambda: fastbn.batch_norm(
            x, running_mean, running_var, weight, bias, False, 0.1, EPS, axis=axis
        )
    raise ValueError(f"unknown operation {op!r}: expected one of {', '.join(OPS)}")


def contenders(case, op, inputs, threads, torch=None, copy_pool=None, layer=None):
    """The callables to time for one case and operation, by contender name.

    Names: ``fastbn`` (``layer`` for eval if given), ``torch`` (when ``torch`` is given),
    ``torch F`` (single-example eval: ``torch.nn.functional.batch_norm``), ``numpy``,
    ``copyto`` and ``threaded-copy`` (when ``threads`` > 1 and ``copy_pool`` is given). Torch
    calls must run under ``torch.no_grad()``.
    """
    x, axis = inputs.x, case.axis
    weight, bias = inputs.weight, inputs.bias
    running_mean, running_var = inputs.running_mean, inputs.running_var
    grad_out, mean, invstd = inputs.grad_out, inputs.mean, inputs.invstd
    calls = {"fastbn": fastbn_call(case, op, inputs, layer)}
    if torch is not None:
        calls.update(_torch_contenders(torch, case, op, inputs))

    if op == "train":
        calls["numpy"] = lambda: numpy_train(x, weight, bias, EPS, axis)
    elif op == "backward":
        calls["numpy"] = lambda: numpy_backward(grad_out, x, mean, invstd, weight, axis)
    else:
        calls["numpy"] = lambda: numpy_eval(x, running_mean, running_var, weight, bias, EPS, axis)

    target = np.empty_like(x)
    calls["copyto"] = lambda: np.copyto(target, x)
    if threads > 1 and copy_pool is not None:
        calls["threaded-copy"] = ThreadedCopy(target, x, threads, copy_pool)
    return calls


def _torch_contenders(torch, case, op, inputs):
    t = _torch_tensors(torch, case, inputs)
    aten = torch.ops.aten
    x, weight, bias = t["x"], t["weight"], t["bias"]
    if op == "train":
        return {
            "torch": lambda: aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, EPS)
        }
    if op == "backward":
        with torch.no_grad():
            _, mean, invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, EPS)
        grad_out, wanted = t["grad_out"], [True, True, True]
        return {
            "torch": lambda: aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, EPS, wanted
            )
        }
    running_mean, running_var = t["running_mean"], t["running_var"]
    calls = {
        "torch": lambda: aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.1, EPS
        )
    }
    if case.single:
        functional = torch.nn.functional.batch_norm
        calls["torch F"] = lambda: functional(
            x, running_mean, running_var, weight, bias, False, 0.1, EPS
        )
    return calls


# ------------------------------------------------------------------------- timing


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


# ------------------------------------------------------------------ other processes

#: Other processes using more cores than this during a measurement make its numbers suspect.
BUSY_CORES = 0.25

try:
    _TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):  # no sysconf: Windows
    _TICKS_PER_SECOND = 100


def _busy_seconds():
    """CPU seconds the whole machine has been busy since boot (all cores), or None.

    From /proc/stat: everything but idle and iowait, so time the hypervisor stole for other
    machines counts as busy too. None where there is no /proc/stat.
    """
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 8:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS_PER_SECOND


class OtherLoad:
    """Context manager: how many cores other processes kept busy while it was open.

    The machine's busy time minus this process's own CPU time, over the wall time: while a
    measurement runs, its own threads are not counted. ``cores`` stays None without
    /proc/stat, or when open for less than 0.2 s.

    Why it matters: every thread of an OpenMP team must run to pass a barrier, so with the
    cores oversubscribed a multi-threaded call can wait a scheduler time slice per parallel
    region; medians do not remove load that lasts a whole measurement.
    """

    cores = None

    def __enter__(self):
        self._start = (_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc_info):
        busy_start, own_start, wall_start = self._start
        busy, own, wall = _busy_seconds(), time.process_time(), time.perf_counter()
        # /proc/stat counts in ticks of 10 ms: shorter spans say too little.
        if busy is not None and busy_start is not None and wall - wall_start >= 0.2:
            others = (busy - busy_start) - (own - own_start)
            self.cores = max(others, 0.0) / (wall - wall_start)
        return False


def background_load(seconds):
    """Cores other processes keep busy, measured while this one sleeps ``seconds``; or None."""
    with OtherLoad() as load:
        time.sleep(seconds)
    return load.cores


def wait_for_idle(max_wait_s, probe_s=0.25):
    """Sleeps until other processes leave the cores idle or for ``max_wait_s``; returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        load = background_load(probe_s)
        if load is None or load < BUSY_CORES:
            break
    return time.perf_counter() - started


# --------------------------------------------------------------------------- runs


@dataclass
class Result:
    """Medians (ns per call) for one case, operation and thread count."""

    case: Case
    op: str
    threads: int
    medians: dict
    rounds: int
    other_load: float = None  # cores other processes kept busy meanwhile (OtherLoad)
    fastbn_layer: bool = False

    @property
    def copy(self):
        copies = ("copyto", "threaded-copy")
        return min(self.medians[name] for name in copies if name in self.medians)


@dataclass
class ScalingResult:
    """fastbn's median (ns per call) at each thread count, for one case and operation."""

    case: Case
    op: str
    medians: dict  # thread count -> ns
    rounds: int
    other_load: float = None


@dataclass
class Report:
    results: list = field(default_factory=list)
    scaling: list = field(default_factory=list)
    threads: tuple = ()
    torch_version: str = None
    torch_note: str = None
    started: datetime.datetime = None
    waited_s: float = 0.0  # waiting for idle cores (wait_idle_s)
    seconds: float = 0.0


def import_torch():
    """``(torch, None)``, or ``(None, why not)`` when torch cannot be imported."""
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install: run without it
        return None, f"not importable ({type(error).__name__}: {error})"
    return torch, None


def run(cases, *, ops=OPS, threads=None, use_torch=True, rounds=None, budget_s=80.0,
        quick=False, scaling=True, wait_idle_s=0.0, progress=None):
    """Measures ``cases`` x ``ops`` at each thread count in ``threads``; returns a :class:`Report`.

    ``threads`` defaults to ``[fastbn.get_num_threads()]``. ``scaling`` also times fastbn alone
    at 1 thread against the largest count on the large cases (every case with ``quick``).
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

    pools = {}
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
                label += f", {_threads_phrase(n)}"
                fastbn.set_num_threads(n)
                if torch is not None:
                    torch.set_num_threads(n)
                if n > 1 and n not in pools:
                    pools[n] = concurrent.futures.ThreadPoolExecutor(n)
                layer = _fastbn_layer(case, inputs) if op == "eval" and case.single else None
                calls = contenders(case, op, inputs, n, torch, pools.get(n), layer)
            else:
                label += ", fastbn at " + " vs ".join(map(str, scaling_threads)) + " threads"
                call = fastbn_call(case, op, inputs)
                calls = {count: call for count in scaling_threads}
                setup = {count: (lambda c=count: fastbn.set_num_threads(c))
                         for count in scaling_threads}

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
                report.scaling.append(ScalingResult(case, op, medians, done, other_load))
    finally:
        for pool in pools.values():
            pool.shutdown()
        fastbn.set_num_threads(None)  # back to OpenMP's default, unless it was set otherwise
        if fastbn.get_num_threads() != initial_threads:
            fastbn.set_num_threads(initial_threads)
        if torch is not None:
            torch.set_num_threads(initial_torch_threads)
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------- output


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_description():
    """CPU model and core count, e.g. ``AMD EPYC, 2 cores``."""
    model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    cores = _cores()
    return f"{model}, {cores} core{'s' if cores != 1 else ''}"


def _microseconds(ns):
    us = ns / 1e3
    if us < 10:
        return f"{us:.2f}"
    if us < 100:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def _ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}×"


def _threads_phrase(n):
    return f"{n} thread{'s' if n != 1 else ''}"


def header(report):
    """One line: machine, date, library versions, thread counts."""
    torch_part = f"torch {report.torch_version or report.torch_note}"
    threads = ", ".join(map(str, report.threads[:-1])) + (", " if len(report.threads) > 1 else "")
    return (
        f"fastbn {fastbn.__version__} ({fastbn.build_info()['simd']}) on {machine_description()}"
        f" · {report.started:%Y-%m-%d %H:%M %Z} · Python {platform.python_version()}"
        f" · numpy {np.__version__} · {torch_part}"
        f" · {threads}{_threads_phrase(report.threads[-1])}"
    )


def _busy_mark(result):
    return " †" if result.other_load is not None and result.other_load >= BUSY_CORES else ""


def busy_warning(report):
    """A warning when other processes disturbed some measurements, else None."""
    measured = report.results + report.scaling
    busy = [r.other_load for r in measured if _busy_mark(r)]
    if not busy:
        return None
    return (
        f"Warning: other processes kept up to {max(busy):.1f} of {os.cpu_count()} cores busy"
        f" during {len(busy)} of {len(measured)} measurements (marked †). Multi-threaded"
        " timings suffer most; rerun on an idle machine (or with --wait-idle) for numbers to"
        " publish."
    )


def _result_rows(report):
    torch_used = report.torch_version is not None
    multi_threads = len(set(report.threads)) > 1
    columns = ["case", "layout", "dtype", "op"]
    if multi_threads:
        columns.append("threads")
    columns += ["fastbn µs"] + (["torch µs"] if torch_used else []) + ["numpy µs", "copy µs"]
    columns += (["fastbn/torch"] if torch_used else []) + ["fastbn/copy", "numpy/fastbn"]
    rows = []
    for result in report.results:
        medians, case = result.medians, result.case
        torch_names = [name for name in ("torch", "torch F") if name in medians]
        for torch_name in torch_names or [None]:
            op = OP_TITLES[result.op]
            if torch_name == "torch F":
                op += " vs F.batch_norm"
            elif result.fastbn_layer:
                op += " (layer)"
            op += _busy_mark(result)
            row = [case.name, case.layout, case.dtype, op]
            if multi_threads:
                row.append(str(result.threads))
            fast = medians["fastbn"]
            row.append(_microseconds(fast))
            if torch_used:
                row.append(_microseconds(medians[torch_name]) if torch_name else "—")
            row += [_microseconds(medians["numpy"]), _microseconds(result.copy)]
            if torch_used:
                row.append(_ratio(fast, medians[torch_name]) if torch_name else "—")
            row += [_ratio(fast, result.copy), _ratio(medians["numpy"], fast)]
            rows.append(row)
    return columns, rows


def _scaling_rows(report):
    counts = sorted({n for result in report.scaling for n in result.medians})
    columns = ["case", "layout", "dtype", "op"] + [f"{_threads_phrase(n)} µs" for n in counts]
    columns.append(f"speedup {counts[0]}→{counts[-1]}" if counts else "speedup")
    rows = []
    for result in report.scaling:
        op = OP_TITLES[result.op] + _busy_mark(result)
        row = [result.case.name, result.case.layout, result.case.dtype, op]
        row += [_microseconds(result.medians[n]) for n in counts]
        row.append(_ratio(result.medians[counts[0]], result.medians[counts[-1]]))
        rows.append(row)
    return columns, rows


def _text_table(columns, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]
    numeric = [i >= 4 for i in range(len(columns))]

    def line(cells):
        return "  ".join(
            str(cell).rjust(width) if right else str(cell).ljust(width)
            for cell, width, right in zip(cells, widths, numeric)
        ).rstrip()

    rule = line("-" * width for width in widths)
    return "\n".join([line(columns), rule] + [line(row) for row in rows])


def _markdown_table(columns, rows):
    align = ["---" if i < 4 else "--:" for i in range(len(columns))]
    lines = ["| " + " | ".join(cells) + " |" for cells in [columns, align, *rows]]
    return "\n".join(lines)


def _footnote(report):
    rounds = [r.rounds for r in report.results] + [r.rounds for r in report.scaling]
    copy_threads = [n for n in report.threads if n > 1]
    copy = "numpy.copyto"
    if copy_threads:
        counts = "/".join(map(str, copy_threads))
        copy = f"the faster of numpy.copyto and a copy split over {counts} threads"
    span = f"{min(rounds)}" if min(rounds) == max(rounds) else f"{min(rounds)}–{max(rounds)}"
    seconds = f"{report.seconds:.{0 if report.seconds >= 10 else 1}f}"
    notes = [
        f"Median time per call over {span} interleaved rounds ({seconds} s in all)."
        f" copy: {copy} of the same array, the floor for one read of x and one write of y.",
    ]
    if report.waited_s > 0:
        notes.append(f"Waited {report.waited_s:.0f} s in all for idle cores between measurements.")
    loads = [r.other_load for r in report.results + report.scaling if r.other_load is not None]
    if loads:
        notes.append(
            f"Other processes kept {statistics.mean(loads):.2f} cores busy on average during"
            f" the measurements (at most {max(loads):.2f})."
        )
    if report.torch_version:
        notes.append(
            "torch: torch.ops.aten.native_batch_norm / native_batch_norm_backward under"
            " no_grad, channels_last tensors for NHWC, same thread count."
        )
    if any(r.fastbn_layer for r in report.results):
        notes.append("(layer): fastbn.BatchNorm in eval mode, called on the example.")
    return notes


def format_report(report, markdown=False):
    """The report as text: a header line, the comparison table, the thread-scaling table."""
    table = _markdown_table if markdown else _text_table
    parts = [(f"**{header(report)}**" if markdown else header(report)), ""]
    warning = busy_warning(report)
    if warning:
        parts += [warning, ""]
    if report.results:
        parts += [table(*_result_rows(report)), ""]
    if report.scaling:
        parts += ["Thread scaling, fastbn only:", "", table(*_scaling_rows(report)), ""]
    if report.results or report.scaling:
        notes = " ".join(_footnote(report))
        parts += [notes if markdown else textwrap.fill(notes, 100)]
    else:
        parts += ["Nothing to measure: no selected case has a selected operation."]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- CLI


def _comma_list(convert, choices=None):
    def parse(text):
        values = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {item!r} (choose from {', '.join(choices)})"
                )
            values.append(convert(item))
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _thread_count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"thread count must be >= 1, got {value}")
    return value


def add_arguments(parser):
    """Adds ``bench``'s options to an argparse parser (``python -m fastbn bench``)."""
    names = ", ".join(case.name for case in DEFAULT_CASES)
    parser.add_argument(
        "--shapes", type=_comma_list(str), metavar="LIST",
        help="comma-separated cases: names or shapes such as 32x64x56x56, 32x56x56x64-nhwc "
             "(channel axis last), 256x1024-f64; aliases single, nc, nchw, nhwc, f64, large, "
             f"all. Default: {names}",
    )
    parser.add_argument(
        "--dtype", type=_comma_list(str, DTYPES), metavar="LIST",
        help="run every selected case in this dtype (float32, float64 or both, comma-separated); "
             "default: each case's own",
    )
    parser.add_argument(
        "--ops", type=_comma_list(str, OPS + ("all",)), metavar="LIST",
        help="operations: train (training forward), backward (training backward), eval; "
             "default: all",
    )
    parser.add_argument(
        "--threads", type=_comma_list(_thread_count), metavar="LIST",
        help="thread counts for fastbn, torch and the copy, e.g. 1,2: one table per count, and "
             "fastbn alone at each count on the large cases. Default: fastbn.get_num_threads() "
             f"(now {fastbn.get_num_threads()}), compared with 1 thread on the large cases",
    )
    parser.add_argument(
        "--repeat", type=int, metavar="ROUNDS",
        help="interleaved rounds per measurement (default: adapted to --budget)",
    )
    parser.add_argument(
        "--budget", type=float, metavar="SECONDS",
        help="aim for the whole run to take about this long (default 80; 1 with --quick)",
    )
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to leave the "
             "cores idle (for a shared machine; not counted in --budget)",
    )
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--no-scaling", action="store_true", help="skip the thread-scaling table")
    parser.add_argument(
        "--markdown", action="store_true",
        help="print Markdown (header line and tables) for the README",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run in seconds: small shapes, few rounds (numbers are rough)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def run_from_args(args):
    """Runs ``bench`` with parsed arguments, prints the report; returns the exit status."""
    if args.repeat is not None and args.repeat < 1:
        raise SystemExit("fastbn bench: --repeat must be >= 1")
    try:
        cases = select_cases(args.shapes, args.dtype, quick=args.quick)
    except ValueError as error:
        raise SystemExit(f"fastbn bench: {error}") from None
    ops = OPS if not args.ops or "all" in args.ops else tuple(op for op in OPS if op in args.ops)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 80.0)

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    report = run(
        cases, ops=ops, threads=args.threads, use_torch=not args.no_torch, rounds=args.repeat,
        budget_s=budget, quick=args.quick, scaling=not args.no_scaling, wait_idle_s=args.wait_idle,
        progress=None if args.quiet else progress,
    )
    print(format_report(report, markdown=args.markdown))
    return 0


def main(argv=None):
    """``python -m fastbn bench`` as a function: ``main(["--quick", "--no-torch"])``."""
    parser = argparse.ArgumentParser(
        prog="python -m fastbn bench", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
