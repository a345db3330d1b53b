"""Reliability: what a long-running service needs besides correct results on good input.

- Byte-swapped and unaligned input to the BatchNorm layer gives the native answer
  (the functions and moments: test_functional.py).
- NaN or inf in one channel's input affects only that channel's output, in every function
  and the layer, for small inputs (serial) and large ones (split across threads by channel
  or by position), with the channel axis inside (inner > 1) and last (inner == 1).
- The edges of the floating-point range: a running variance beyond float32's becomes inf
  quietly (the functions and the layer); training gradients at extreme magnitudes.
- Memory: thousands of calls of every public function and of the layer, error paths too,
  do not grow the process's memory, measured by its resident set size and by tracemalloc.

Bad input: test_bad_input.py. Threads and fork: test_threads.py, test_concurrency.py.
"""

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import fastbn
import reference
from conftest import DTYPES, Case, assert_close
from test_functional import _assert_gradients_match

# ------------------------------------------------------ byte-swapped and unaligned input


def _byte_swapped(array):
    swapped = array.astype(array.dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative
    return swapped


def _unaligned(array):
    """A copy of ``array`` at an odd byte offset."""
    raw = np.zeros(array.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(array.dtype).reshape(array.shape)
    view[...] = array
    assert not view.flags.aligned
    return view


TRANSFORMS = [
    pytest.param(_byte_swapped, id="byte-swapped"),
    pytest.param(_unaligned, id="unaligned"),
]
#: (N, C, L), (N, C), and large enough (>= 64K values) to run on several threads.
LAYER_LAYOUTS = pytest.mark.parametrize(
    "shape", [(6, 3, 4), (9, 3), (32, 64, 8, 8)], ids=lambda shape: str(shape)
)


def _twin_layers(shape, dtype, rng):
    """Two layers with the same trained state, and an input and grad_out of ``shape``."""
    channels = shape[1]
    layers = [fastbn.BatchNorm(channels, dtype=dtype) for _ in range(2)]
    warm_up = rng.standard_normal((5,) + shape[1:]).astype(dtype)
    weight = rng.uniform(0.5, 2.0, channels)
    for bn in layers:
        bn.weight[...] = weight
        bn(warm_up)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    grad_out = rng.standard_normal(shape).astype(dtype)
    return layers, x, grad_out


def _assert_same_layers(native, other):
    for name in ("running_mean", "running_var", "num_batches_tracked", "grad_weight", "grad_bias"):
        np.testing.assert_array_equal(getattr(other, name), getattr(native, name), err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@LAYER_LAYOUTS
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layer_training_step_on_byte_swapped_or_unaligned_input(transform, shape, dtype, rng):
    """Forward and backward in training mode: the same bits as on native, aligned arrays."""
    (native, other), x, grad_out = _twin_layers(shape, dtype, rng)

    y, grad_x = other(transform(x)), other.backward(transform(grad_out))

    np.testing.assert_array_equal(y, native(x))
    np.testing.assert_array_equal(grad_x, native.backward(grad_out))
    _assert_same_layers(native, other)


@pytest.mark.parametrize("dtype", DTYPES)
@LAYER_LAYOUTS
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layer_eval_on_byte_swapped_or_unaligned_input(transform, shape, dtype, rng):
    """Eval forward (a batch and one example) and backward: the native bits."""
    (native, other), x, grad_out = _twin_layers(shape, dtype, rng)
    native.eval(), other.eval()

    np.testing.assert_array_equal(other(transform(x)), native(x))
    np.testing.assert_array_equal(other.backward(transform(grad_out)), native.backward(grad_out))
    example = np.ascontiguousarray(x[0].reshape(shape[1], -1)[:, 0])
    np.testing.assert_array_equal(other(transform(example)), native(example))
    _assert_same_layers(native, other)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layer_recalibrate_on_byte_swapped_or_unaligned_batches(transform, dtype, rng):
    (native, other), x, _ = _twin_layers((7, 3, 5), dtype, rng)
    batches = [x, x[:2] * 3, x[0, :, 0]]  # the last is one example
    native.recalibrate(batches)
    other.recalibrate([transform(np.ascontiguousarray(batch)) for batch in batches])
    _assert_same_layers(native, other)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layer_backward_with_grad_out_in_another_byte_order_than_x(transform, rng):
    """A native forward and a byte-swapped grad_out (from another source), and unaligned;
    then the reverse, a transformed x and a native grad_out."""
    (native, other), x, grad_out = _twin_layers((6, 3, 4), np.float32, rng)
    native(x), other(x)
    np.testing.assert_array_equal(other.backward(transform(grad_out)), native.backward(grad_out))
    native(x), other(transform(x))
    np.testing.assert_array_equal(other.backward(grad_out), native.backward(grad_out))
    _assert_same_layers(native, other)


# ----------------------------------------------------------- NaN and inf stay in their channel

#: (shape, axis): small (serial) and >= 64K values, split across threads by channel or by
#: position; inner > 1 and inner == 1 (channels-last and (N, C)); short runs seen as rows of
#: columns (spread: (6, 4, 5) and (600, 64, 3); (100, 40, 49) and, by channel in the
#: training forward, (160, 64, 49) in the reductions only).
ISOLATION_LAYOUTS = (
    ((6, 4, 5), 1),
    ((600, 64, 3), 1),
    ((100, 40, 49), 1),
    ((160, 64, 49), 1),
    ((9, 4), 1),
    ((5, 3, 4), -1),
    ((32, 64, 8, 8), 1),
    ((3, 2, 30001), 1),
    ((40000, 3), 1),
    ((8, 16, 16, 32), -1),
)

#: Which part of each output a bad value in one channel may change: the whole channel
#: (a batch statistic of it is NaN), one element (elementwise outputs), or nothing.
CHANNEL, ELEMENT, NOTHING = "channel", "element", "nothing"
SPREAD_FROM_X = {
    "train y": CHANNEL, "train mean": CHANNEL, "train invstd": CHANNEL,
    "training y": CHANNEL, "running_mean": CHANNEL, "running_var": CHANNEL,
    "eval y": ELEMENT,
    "grad_x training": CHANNEL, "grad_weight training": CHANNEL, "grad_bias training": NOTHING,
    "grad_x eval": NOTHING, "grad_weight eval": CHANNEL, "grad_bias eval": NOTHING,
    "moments mean": CHANNEL, "moments m2": CHANNEL,
    "layer y": CHANNEL, "layer running_mean": CHANNEL, "layer running_var": CHANNEL,
    "layer grad_x": CHANNEL, "layer grad_weight": CHANNEL, "layer grad_bias": NOTHING,
    "layer eval y": ELEMENT,
}  # fmt: skip
SPREAD_FROM_GRAD_OUT = {
    "grad_x training": CHANNEL, "grad_weight training": CHANNEL, "grad_bias training": CHANNEL,
    "grad_x eval": ELEMENT, "grad_weight eval": CHANNEL, "grad_bias eval": CHANNEL,
    "layer grad_x": CHANNEL, "layer grad_weight": CHANNEL, "layer grad_bias": CHANNEL,
}  # fmt: skip


def _everything(case, x, grad_out, statistics, running):
    """Every output of every function and of the layer on (x, grad_out); the backward passes
    get the given batch ``statistics`` (mean, invstd), eval mode the ``running`` ones."""
    axis, out = case.axis, {}
    running_mean, running_var = running
    out["train y"], out["train mean"], out["train invstd"] = fastbn.batch_norm_train(x, axis=axis)
    out["running_mean"], out["running_var"] = running_mean.copy(), running_var.copy()
    out["training y"] = fastbn.batch_norm(
        x, out["running_mean"], out["running_var"], training=True, axis=axis
    )
    out["eval y"] = fastbn.batch_norm(x, running_mean, running_var, axis=axis)
    for training, mode in ((True, "training"), (False, "eval")):
        grads = fastbn.batch_norm_backward(grad_out, x, *statistics, training=training, axis=axis)
        out[f"grad_x {mode}"], out[f"grad_weight {mode}"], out[f"grad_bias {mode}"] = grads
    moments = fastbn.moments(x, axis=axis)
    out["moments mean"], out["moments m2"] = moments.mean, moments.m2

    bn = fastbn.BatchNorm(case.channels, axis=axis, dtype=case.dtype)
    bn.running_mean[...], bn.running_var[...] = running_mean, running_var
    out["layer y"] = bn(x)
    out["layer running_mean"], out["layer running_var"] = (
        bn.running_mean.copy(),
        bn.running_var.copy(),
    )
    out["layer grad_x"] = bn.backward(grad_out)
    out["layer grad_weight"], out["layer grad_bias"] = bn.grad_weight, bn.grad_bias
    bn.running_mean[...], bn.running_var[...] = running_mean, running_var
    out["layer eval y"] = bn.eval()(x)
    return out


def _channel_first(array, case):
    """Per-channel arrays as they are; arrays of x's shape with the channel axis first."""
    return array if array.ndim == 1 else np.moveaxis(array, case.axis, 0)


def _poisoned(array, case, channel, position, bad):
    """A copy of ``array`` with the value at ``position`` of ``channel`` set to ``bad``."""
    poisoned = array.copy()
    np.moveaxis(poisoned, case.axis, 0)[channel].flat[position] = bad
    return poisoned


def _check_spread(case, clean, dirty, spread, channel, position, what):
    others = [c for c in range(case.channels) if c != channel]
    for name, value in dirty.items():
        got, expected = _channel_first(value, case), _channel_first(clean[name], case)
        where = f"{name}, {what}"
        np.testing.assert_array_equal(got[others], expected[others], err_msg=where)
        kind = spread.get(name, NOTHING)
        if kind == NOTHING:
            np.testing.assert_array_equal(got[channel], expected[channel], err_msg=where)
        elif kind == CHANNEL:
            assert not np.any(np.isfinite(got[channel])), f"{where}: finite values in the channel"
        else:
            element = got[channel].reshape(-1)
            assert not np.isfinite(element[position]), f"{where}: the bad element is finite"
            rest = np.delete(np.arange(element.size), position)
            np.testing.assert_array_equal(
                element[rest], expected[channel].reshape(-1)[rest], err_msg=where
            )


ISOLATION_CASES = [
    pytest.param(Case(dtype, shape, axis, "C"), id=Case(dtype, shape, axis, "C").id)
    for dtype in DTYPES
    for shape, axis in ISOLATION_LAYOUTS
]


def _isolation_inputs(case, rng):
    x = case.array(rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    _, mean, invstd = fastbn.batch_norm_train(x, axis=case.axis)
    running = case.per_channel(rng), rng.uniform(0.5, 2.0, case.channels).astype(case.dtype)
    # the middle channel; a position past the middle, in another thread's part than the start
    return x, grad_out, (mean, invstd), running, case.channels // 2, case.count // 2 + 1


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", ISOLATION_CASES)
def test_a_bad_value_affects_only_its_own_channel(case, bad, rng):
    """One NaN or inf in channel c of x, or of grad_out: every other channel's output is bit
    for bit what it is without it, and channel c's outputs are non-finite exactly where its
    statistics or its element reach (SPREAD_FROM_X, SPREAD_FROM_GRAD_OUT)."""
    fastbn.set_num_threads(3)  # large inputs: uneven parts, each with every channel
    x, grad_out, statistics, running, channel, position = _isolation_inputs(case, rng)
    clean = _everything(case, x, grad_out, statistics, running)

    dirty_x = _poisoned(x, case, channel, position, bad)
    dirty = _everything(case, dirty_x, grad_out, statistics, running)
    what = f"{bad} in channel {channel} of x, {case.id}"
    _check_spread(case, clean, dirty, SPREAD_FROM_X, channel, position, what)

    dirty_grad_out = _poisoned(grad_out, case, channel, position, bad)
    dirty = _everything(case, x, dirty_grad_out, statistics, running)
    what = f"{bad} in channel {channel} of grad_out, {case.id}"
    _check_spread(case, clean, dirty, SPREAD_FROM_GRAD_OUT, channel, position, what)


# ------------------------------------------------------------ the edges of the float range


def test_a_float32_running_variance_beyond_float32_becomes_inf_quietly():
    """Finite float32 data whose variance exceeds float32's range (~3.4e38): the running
    variance becomes inf, as PyTorch's does, and the call completes without a warning (the
    suite turns warnings into errors) and y is right; nothing is left half-updated."""
    x = np.array([[-3e19, 1e19], [3e19, -1e19], [1e19, 2e19]], np.float32)
    running_mean, running_var = np.zeros(2, np.float32), np.ones(2, np.float32)
    y = fastbn.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)
    expected_mean, expected_var = reference.updated_running_stats(
        x, np.zeros(2), np.ones(2), momentum=0.5
    )
    assert np.isinf(expected_var[0]) or expected_var[0] > np.finfo(np.float32).max
    np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-6)
    assert np.isinf(running_var[0]) and np.isfinite(running_var[1])
    assert_close(y, reference.forward_train(x)[0], factor=8)


def test_a_layer_running_variance_beyond_float32_becomes_inf_quietly():
    x = np.array([[-3e19, 1e19], [3e19, -1e19], [1e19, 2e19]], np.float32)
    bn = fastbn.BatchNorm(2, momentum=0.5)
    bn(x)
    assert bn.num_batches_tracked == 1
    assert np.isinf(bn.running_var[0]) and np.isfinite(bn.running_var[1])


@pytest.mark.parametrize(
    ("dtype", "magnitude", "eps"),
    [(np.float32, 1e21, 1e-5), (np.float32, 1e28, 1e-5), (np.float32, 1e-20, 0.0),
     (np.float64, 1e150, 1e-5)],
    ids=["float32-1e21", "float32-1e28", "float32-1e-20-eps=0", "float64-1e150"],
)  # fmt: skip
def test_training_backward_at_extreme_magnitudes(dtype, magnitude, eps):
    """The training gradient at any data magnitude whose statistics are finite, against the
    float64 reference (tolerances of test_functional.py)."""
    case = Case(dtype, (64, 3, 5), 1, "C")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(case.shape) * magnitude).astype(dtype)
    grad_out = rng.standard_normal(case.shape).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_train(x, eps=eps)
    assert np.all(np.isfinite(invstd)) and np.all(invstd > 0)
    got = fastbn.batch_norm_backward(grad_out, x, mean, invstd)
    expected = reference.backward_train(grad_out, x, mean, invstd)
    _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, None, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_negative_running_variance_gives_nan_in_its_channel_quietly(dtype, rng):
    """Eval mode does not check running_var >= 0 (it is the user's state): a negative value
    gives NaN in that channel, and only there, without a warning, forward and backward."""
    x = rng.standard_normal((4, 3, 2)).astype(dtype)
    running_mean, running_var = np.zeros(3, dtype), np.array([1.0, -1.0, 2.0], dtype)
    y = fastbn.batch_norm(x, running_mean, running_var)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))
    bn = fastbn.BatchNorm(3, dtype=dtype).eval()
    bn.running_var[...] = running_var
    np.testing.assert_array_equal(bn(x), y)
    grad_x = bn.backward(np.ones_like(x))
    assert np.all(np.isnan(grad_x[:, 1])) and np.all(np.isfinite(grad_x[:, [0, 2]]))
    weight, bias = fastbn.fold(np.ones((3, 2), dtype), np.zeros(3, dtype), bn)
    assert np.all(np.isnan(weight[1])) and np.isnan(bias[1])
    assert np.all(np.isfinite(weight[[0, 2]])) and np.all(np.isfinite(bias[[0, 2]]))


# ----------------------------------------------------------------------------- memory

#: The resident-memory check: calls per function, on inputs with many channels so that the
#: kernels' per-channel scratch space (>= 1 KB a call) and per-channel results count, and
#: the growth allowed. A leak of 400 bytes a call would exceed it; of one output (8 KB),
#: 40 MB. Large inputs (the threaded plans) get fewer calls: one leaked output is 512 KB.
RSS_SHAPE, RSS_CALLS = (8, 256), 5_000
RSS_LARGE_SHAPE, RSS_LARGE_CALLS = (32, 64, 8, 8), 10
RSS_BOUND = 2 * 2**20
#: tracemalloc sees Python objects and NumPy's data buffers: less than 16 bytes a call may
#: remain (a leaked Python int is 28 bytes, a leaked (C,) array over 100; what stays now
#: is under 100 bytes in all).
TRACED_SHAPE, TRACED_CALLS = (16, 8, 16), 500
TRACED_BOUND = 16 * TRACED_CALLS


def _workload(shape, dtype=np.float32):
    """name -> a call of one public function (or the layer), on fixed inputs of ``shape``.
    Error paths are included: a failed call must free what it allocated too."""
    rng = np.random.default_rng(0)
    channels = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    x_fortran, x_swapped = np.asfortranarray(x), _byte_swapped(x)
    grad_out = rng.standard_normal(shape).astype(dtype)
    weight, bias = np.ones(channels, dtype), np.zeros(channels, dtype)
    running_mean, running_var = np.zeros(channels, dtype), np.ones(channels, dtype)
    _, mean, invstd = fastbn.batch_norm_train(x)
    out = np.empty_like(x)
    train_layer = fastbn.BatchNorm(channels, dtype=dtype)
    eval_layer = fastbn.BatchNorm(channels, dtype=dtype).eval()
    example = np.ascontiguousarray(x.reshape(shape[0], channels, -1)[0, :, 0])
    wrong_weight = np.ones(channels + 1, dtype)
    x_other_dtype = x.astype(np.float64)

    def failing_function_call():
        try:  # fails after x was copied to native byte order
            fastbn.batch_norm(x_swapped, running_mean, running_var, wrong_weight)
        except ValueError:
            pass

    def failing_layer_call():
        try:  # the eval fast path fails, then the checked path
            eval_layer(x_other_dtype)
        except TypeError:
            pass

    return {
        "batch_norm(eval)": lambda: fastbn.batch_norm(x, running_mean, running_var, weight, bias),
        "batch_norm(eval, out)": lambda: fastbn.batch_norm(x, running_mean, running_var, out=out),
        "batch_norm(training)": lambda: fastbn.batch_norm(
            x, running_mean, running_var, weight, bias, training=True
        ),
        "batch_norm_train": lambda: fastbn.batch_norm_train(x, weight, bias),
        "batch_norm_train(fortran, byte-swapped)": lambda: (
            fastbn.batch_norm_train(x_fortran),
            fastbn.batch_norm_train(x_swapped),
        ),
        "batch_norm_backward(training)": lambda: fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight
        ),
        "batch_norm_backward(eval)": lambda: fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight, training=False
        ),
        "moments": lambda: fastbn.moments(x) + fastbn.moments(x),
        "BatchNorm(training) forward+backward": lambda: (
            train_layer(x),
            train_layer.backward(grad_out),
        ),
        "BatchNorm(eval) forward+backward": lambda: (eval_layer(x), eval_layer.backward(grad_out)),
        "BatchNorm(eval) one example": lambda: eval_layer(example),
        "BatchNorm.recalibrate": lambda: train_layer.recalibrate([x]),
        "set_num_threads": lambda: fastbn.set_num_threads(fastbn.get_num_threads()),
        "failing function call": failing_function_call,
        "failing layer call": failing_layer_call,
    }


WORKLOAD_NAMES = list(_workload((2, 1)))


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_growth(call, calls):
    for _ in range(max(5, calls // 5)):  # warm-up: caches, free lists, the allocator's arenas
        call()
    before = _resident_bytes()
    for _ in range(calls):
        call()
    return _resident_bytes() - before


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"),
    reason="resident memory is read from Linux's /proc/self/statm",
)
@pytest.mark.skipif(
    "sanitize" in fastbn.build_info()["flags"],
    reason="AddressSanitizer's quarantine keeps freed memory resident",
)
@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_many_calls_do_not_grow_resident_memory(name):
    for shape, calls in ((RSS_SHAPE, RSS_CALLS), (RSS_LARGE_SHAPE, RSS_LARGE_CALLS)):
        growth = _rss_growth(_workload(shape)[name], calls)
        assert growth < RSS_BOUND, (
            f"{name}: resident memory grew by {growth / 2**20:.1f} MB over {calls} calls "
            f"on input of shape {shape}"
        )


# In a fresh process whose only large arrays are x and out (no large temporaries have
# raised glibc's thresholds), calls with out= into the same arrays: the kernels' scratch
# (here 1.6 MB of per-column statistics and constants) must not be mapped and zeroed anew
# each call. It was: 335 page faults per training forward, 1.4 ms instead of 0.7.
_PAGE_FAULTS_PER_CALL = """
import resource, sys
import numpy as np
import fastbn
x = np.empty((64, 512, 7, 7), np.float32)
x[...] = 1.5
x[0] = 2.0
out, mean, invstd = fastbn.batch_norm_train(x)
calls = {
    "batch_norm_train": lambda: fastbn.batch_norm_train(x, out=out),
    "batch_norm_backward": lambda: fastbn.batch_norm_backward(x, x, mean, invstd, out=out),
    "moments": lambda: fastbn.moments(x),
}
call = calls[sys.argv[1]]
call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    call()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, getrusage")
@pytest.mark.skipif(
    "sanitize" in fastbn.build_info()["flags"],
    reason="AddressSanitizer's allocator is not the one users have",
)
@pytest.mark.parametrize("name", ["batch_norm_train", "batch_norm_backward", "moments"])
def test_repeated_calls_do_not_page_fault_for_scratch(name, tmp_path):
    result = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_PER_CALL, name],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 5, f"{name}: {result.stdout.strip()} page faults per call"


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_many_calls_leave_no_python_objects_or_numpy_buffers_behind(name):
    call = _workload(TRACED_SHAPE)[name]
    for _ in range(TRACED_CALLS // 5):
        call()
    tracemalloc.start()
    try:
        call()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(TRACED_CALLS):
            call()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < TRACED_BOUND, (
        f"{name}: {after - before} bytes more traced after {TRACED_CALLS} calls"
    )
