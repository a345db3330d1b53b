"""Bad input: the right exception, a message that names the argument, and nothing modified.

Each case starts from a valid call of one of the functions (named in the test id), changes
one thing, and expects a TypeError (wrong kind or dtype) or a ValueError (wrong value or
shape; numpy.exceptions.AxisError for the axis). Afterwards every array argument must be
exactly as before: running statistics, ``out`` (filled with a sentinel), weight, bias, x.

Then empty input (eval mode returns an empty result), the BatchNorm layer's methods and
options (a second table: the layer's state must be unchanged too), and Moments.
set_num_threads's bad values are in test_threads.py.
"""

import re
from typing import NamedTuple

import numpy as np
import pytest

import fastbn
from conftest import DTYPES

CHANNELS = 3
SHAPE = (4, CHANNELS, 5)
ONE_VALUE = "Expected more than 1 value per channel when training"

#: The functions under test, each called in one mode.
FUNCTIONS = {
    "batch_norm(training=True)": lambda kw: fastbn.batch_norm(training=True, **kw),
    "batch_norm(training=False)": lambda kw: fastbn.batch_norm(training=False, **kw),
    "batch_norm_train": lambda kw: fastbn.batch_norm_train(**kw),
    "batch_norm_backward(training=True)": lambda kw: fastbn.batch_norm_backward(
        training=True, **kw
    ),
    "batch_norm_backward(training=False)": lambda kw: fastbn.batch_norm_backward(
        training=False, **kw
    ),
    "moments": lambda kw: fastbn.moments(**kw),
}
BATCH_NORM = ("batch_norm(training=True)", "batch_norm(training=False)")
FORWARD = BATCH_NORM + ("batch_norm_train",)
BACKWARD = ("batch_norm_backward(training=True)", "batch_norm_backward(training=False)")
TRAINING = ("batch_norm(training=True)", "batch_norm_train", "batch_norm_backward(training=True)")
ALL = FORWARD + BACKWARD
#: Functions that take x and axis alone among the arrays: x and axis cases apply to them too.
WITH_X = ALL + ("moments",)


def _valid_arguments(function, dtype):
    """Keyword arguments of a valid call of ``function`` on float ``dtype`` input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(dtype)
    if function == "moments":
        return {"x": x, "axis": 1}
    per_channel = lambda low, high: rng.uniform(low, high, CHANNELS).astype(dtype)  # noqa: E731
    arguments = {"x": x, "weight": per_channel(0.5, 2), "axis": 1}
    arguments["out"] = np.full(SHAPE, 7.0, dtype=dtype)  # a sentinel: must stay as it is
    if function in BACKWARD:
        arguments["grad_out"] = rng.standard_normal(SHAPE).astype(dtype)
        arguments["mean"] = per_channel(-1, 1)
        arguments["invstd"] = per_channel(0.5, 2)
        return arguments
    arguments["bias"] = per_channel(-1, 1)
    arguments["eps"] = 1e-5
    if function in BATCH_NORM:
        arguments["running_mean"] = per_channel(-1, 1)
        arguments["running_var"] = per_channel(0.5, 2)
        arguments["momentum"] = 0.1
    return arguments


def _other_float(dtype):
    return np.float32 if dtype == np.float64 else np.float64


def _read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


def _unaligned(array):
    raw = np.zeros(array.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(array.dtype).reshape(array.shape)
    view[...] = array
    return view


def _one_value_per_channel(shape, axis=1):
    """x of a shape with at most one value per channel (grad_out and out to match)."""

    def x_like(arguments, dtype):
        return np.ones(shape, dtype)

    def sentinel_like(arguments, dtype):
        return np.full(shape, 7.0, dtype)

    return {"x": x_like, "axis": axis, "grad_out": sentinel_like, "out": sentinel_like}


class Bad(NamedTuple):
    """One bad call: starting from a valid call of each of ``functions``, set the arguments
    in ``change`` (a value, or a function of (valid arguments, dtype) giving the value)."""

    id: str
    functions: tuple
    change: dict
    exception: type
    match: str


def _per_channel_cases(name, functions):
    """Every way a per-channel argument can be wrong."""
    shape = rf"^{name} must have shape \(3,\), one value per channel of x"
    dtype = rf"^{name} must have the input's dtype"
    kind = rf"^{name} must be a numpy.ndarray"
    # fmt: off
    return [
        Bad(f"{name}-too-long", functions, {name: lambda a, d: np.ones(CHANNELS + 1, d)},
            ValueError, shape),
        Bad(f"{name}-too-short", functions, {name: lambda a, d: np.ones(CHANNELS - 1, d)},
            ValueError, shape),
        Bad(f"{name}-2d", functions, {name: lambda a, d: np.ones((1, CHANNELS), d)},
            ValueError, shape),
        Bad(f"{name}-other-float-dtype", functions,
            {name: lambda a, d: np.ones(CHANNELS, _other_float(d))}, TypeError, dtype),
        Bad(f"{name}-int", functions, {name: np.ones(CHANNELS, np.int64)}, TypeError, dtype),
        Bad(f"{name}-float16", functions, {name: np.ones(CHANNELS, np.float16)}, TypeError, dtype),
        Bad(f"{name}-bool", functions, {name: np.ones(CHANNELS, np.bool_)}, TypeError, dtype),
        Bad(f"{name}-complex", functions, {name: np.ones(CHANNELS, np.complex128)},
            TypeError, dtype),
        Bad(f"{name}-object", functions, {name: np.ones(CHANNELS, object)}, TypeError, dtype),
        Bad(f"{name}-string", functions, {name: np.array(["1.0"] * CHANNELS)}, TypeError, dtype),
        Bad(f"{name}-list", functions, {name: [1.0] * CHANNELS}, TypeError, kind),
        Bad(f"{name}-python-scalar", functions, {name: 1.0}, TypeError, kind),
        Bad(f"{name}-numpy-scalar", functions, {name: lambda a, d: d(1.0)}, TypeError, kind),
    ]
    # fmt: on


X_KIND = r"^x must be a numpy.ndarray"
X_DTYPE = r"^x must have dtype float32 or float64"
X_NDIM = r"^x must have at least 2 dimensions"
AXIS_KIND = r"^axis must be an integer"
EPS_VALUE = r"^eps must be a finite number >= 0"
EPS_KIND = r"^eps must be a real number"
MOMENTUM_VALUE = r"^momentum must be in \[0, 1\]"
MOMENTUM_KIND = r"^momentum must be a real number"
EVAL_STATS = r"^running_mean and running_var are required when training=False"
TOGETHER = r"^running_mean and running_var must be given together"
OUT_KIND = r"^out must be a numpy.ndarray"
OUT_DTYPE = r"^out must have the input's dtype"
OUT_SHAPE = r"^out must have the input's shape"
OUT_LAYOUT = r"^out must be C-contiguous and aligned"
OUT_AS_X = r"^out must be aligned and laid out in memory as x \(strides"
GRAD_KIND = r"^grad_out must be a numpy.ndarray"
GRAD_SHAPE = r"^grad_out must have the input's shape"
GRAD_DTYPE = r"^grad_out must have dtype float32 or float64"
EVAL = ("batch_norm(training=False)",)
TRAIN = ("batch_norm(training=True)",)

# fmt: off
CASES = [
    # x
    Bad("x-list", WITH_X, {"x": lambda a, d: a["x"].tolist()}, TypeError, X_KIND),
    Bad("x-python-scalar", WITH_X, {"x": 1.5}, TypeError, X_KIND),
    Bad("x-none", WITH_X, {"x": None}, TypeError, X_KIND),
    Bad("x-int", WITH_X, {"x": lambda a, d: a["x"].astype(np.int64)}, TypeError, X_DTYPE),
    Bad("x-float16", WITH_X, {"x": lambda a, d: a["x"].astype(np.float16)}, TypeError, X_DTYPE),
    Bad("x-complex", WITH_X, {"x": lambda a, d: a["x"].astype(np.complex128)}, TypeError, X_DTYPE),
    Bad("x-bool", WITH_X, {"x": lambda a, d: a["x"] > 0}, TypeError, X_DTYPE),
    Bad("x-object", WITH_X, {"x": lambda a, d: a["x"].astype(object)}, TypeError, X_DTYPE),
    Bad("x-string", WITH_X, {"x": lambda a, d: a["x"].astype(str)}, TypeError, X_DTYPE),
    Bad("x-bytes", WITH_X, {"x": np.array([[b"a"] * CHANNELS] * 2)}, TypeError, X_DTYPE),
    Bad("x-1d", WITH_X, {"x": lambda a, d: np.ones(4, d), "axis": 0}, ValueError, X_NDIM),
    Bad("x-0d", WITH_X, {"x": lambda a, d: np.array(1.0, d), "axis": 0}, ValueError, X_NDIM),
    # axis
    Bad("axis-too-large", WITH_X, {"axis": 3}, np.exceptions.AxisError, r"axis 3 is out of bounds"),
    Bad("axis-too-negative", WITH_X, {"axis": -4}, np.exceptions.AxisError,
        r"axis -4 is out of bounds"),
    Bad("axis-float", WITH_X, {"axis": 1.0}, TypeError, AXIS_KIND),
    Bad("axis-bool", WITH_X, {"axis": True}, TypeError, AXIS_KIND),
    Bad("axis-none", WITH_X, {"axis": None}, TypeError, AXIS_KIND),
    # eps
    Bad("eps-negative", FORWARD, {"eps": -1e-5}, ValueError, EPS_VALUE),
    Bad("eps-nan", FORWARD, {"eps": float("nan")}, ValueError, EPS_VALUE),
    Bad("eps-inf", FORWARD, {"eps": float("inf")}, ValueError, EPS_VALUE),
    Bad("eps-string", FORWARD, {"eps": "1e-5"}, TypeError, EPS_KIND),
    Bad("eps-none", FORWARD, {"eps": None}, TypeError, EPS_KIND),
    Bad("eps-array", FORWARD, {"eps": np.array([1e-5])}, TypeError, EPS_KIND),
    # momentum
    Bad("momentum-negative", BATCH_NORM, {"momentum": -0.1}, ValueError, MOMENTUM_VALUE),
    Bad("momentum-above-one", BATCH_NORM, {"momentum": 1.5}, ValueError, MOMENTUM_VALUE),
    Bad("momentum-nan", BATCH_NORM, {"momentum": float("nan")}, ValueError, MOMENTUM_VALUE),
    Bad("momentum-string", BATCH_NORM, {"momentum": "0.1"}, TypeError, MOMENTUM_KIND),
    Bad("momentum-none", BATCH_NORM, {"momentum": None}, TypeError, MOMENTUM_KIND),
    # per-channel arrays
    *_per_channel_cases("weight", ALL),
    *_per_channel_cases("bias", FORWARD),
    *_per_channel_cases("running_mean", BATCH_NORM),
    *_per_channel_cases("running_var", BATCH_NORM),
    *_per_channel_cases("mean", BACKWARD),
    *_per_channel_cases("invstd", BACKWARD),
    Bad("mean-none", BACKWARD, {"mean": None}, TypeError, r"^mean must be a numpy.ndarray"),
    Bad("invstd-none", BACKWARD, {"invstd": None}, TypeError, r"^invstd must be a numpy.ndarray"),
    # running statistics
    Bad("running-stats-missing-in-eval", EVAL, {"running_mean": None, "running_var": None},
        ValueError, EVAL_STATS),
    Bad("running-mean-missing-in-eval", EVAL, {"running_mean": None}, ValueError, EVAL_STATS),
    Bad("running-var-missing-in-eval", EVAL, {"running_var": None}, ValueError, EVAL_STATS),
    Bad("running-var-alone-in-training", TRAIN, {"running_mean": None}, ValueError, TOGETHER),
    Bad("running-mean-alone-in-training", TRAIN, {"running_var": None}, ValueError, TOGETHER),
    Bad("running-mean-read-only-in-training", TRAIN,
        {"running_mean": lambda a, d: _read_only(a["running_mean"])},
        ValueError, r"^running_mean is read-only, but training updates it in place"),
    Bad("running-var-read-only-in-training", TRAIN,
        {"running_var": lambda a, d: _read_only(a["running_var"])},
        ValueError, r"^running_var is read-only, but training updates it in place"),
    # one value (or none) per channel in training
    Bad("one-value-(1,C)", TRAINING, _one_value_per_channel((1, CHANNELS)), ValueError, ONE_VALUE),
    Bad("one-value-(1,C,1)", TRAINING, _one_value_per_channel((1, CHANNELS, 1)),
        ValueError, ONE_VALUE),
    Bad("one-value-(1,C,1,1)", TRAINING, _one_value_per_channel((1, CHANNELS, 1, 1)),
        ValueError, ONE_VALUE),
    Bad("one-value-(1,C)-axis=-1", TRAINING, _one_value_per_channel((1, CHANNELS), axis=-1),
        ValueError, ONE_VALUE),
    Bad("one-value-(C,1)-axis=0", TRAINING, _one_value_per_channel((CHANNELS, 1), axis=0),
        ValueError, ONE_VALUE),
    Bad("no-value-(0,C)", TRAINING, _one_value_per_channel((0, CHANNELS)), ValueError, ONE_VALUE),
    Bad("no-value-(2,C,0)", TRAINING, _one_value_per_channel((2, CHANNELS, 0)),
        ValueError, ONE_VALUE),
    # out
    Bad("out-list", ALL, {"out": lambda a, d: a["out"].tolist()}, TypeError, OUT_KIND),
    Bad("out-python-scalar", ALL, {"out": 0.0}, TypeError, OUT_KIND),
    Bad("out-other-float-dtype", ALL,
        {"out": lambda a, d: a["out"].astype(_other_float(d))}, TypeError, OUT_DTYPE),
    Bad("out-int", ALL, {"out": np.full(SHAPE, 7, np.int64)}, TypeError, OUT_DTYPE),
    Bad("out-float16", ALL, {"out": np.full(SHAPE, 7, np.float16)}, TypeError, OUT_DTYPE),
    Bad("out-complex", ALL, {"out": np.full(SHAPE, 7, np.complex128)}, TypeError, OUT_DTYPE),
    Bad("out-bool", ALL, {"out": np.ones(SHAPE, np.bool_)}, TypeError, OUT_DTYPE),
    Bad("out-object", ALL, {"out": np.full(SHAPE, 7.0, object)}, TypeError, OUT_DTYPE),
    Bad("out-string", ALL, {"out": np.full(SHAPE, "7")}, TypeError, OUT_DTYPE),
    Bad("out-per-channel-shape", ALL, {"out": lambda a, d: np.full(CHANNELS, 7.0, d)},
        ValueError, OUT_SHAPE),
    Bad("out-byte-swapped", ALL,
        {"out": lambda a, d: a["out"].astype(a["out"].dtype.newbyteorder("S"))},
        TypeError, OUT_DTYPE),
    Bad("out-wrong-shape", ALL, {"out": lambda a, d: np.full((4, CHANNELS, 6), 7.0, d)},
        ValueError, OUT_SHAPE),
    Bad("out-transposed-shape", ALL, {"out": lambda a, d: np.full(SHAPE[::-1], 7.0, d)},
        ValueError, OUT_SHAPE),
    Bad("out-fortran-order", ALL, {"out": lambda a, d: np.asfortranarray(a["out"])},
        ValueError, OUT_LAYOUT),
    Bad("out-strided", ALL, {"out": lambda a, d: np.full((4, CHANNELS, 10), 7.0, d)[..., ::2]},
        ValueError, OUT_LAYOUT),
    Bad("out-unaligned", ALL, {"out": lambda a, d: _unaligned(a["out"])},
        ValueError, OUT_LAYOUT),
    Bad("out-read-only", ALL, {"out": lambda a, d: _read_only(a["out"])},
        ValueError, r"^out is read-only"),
    # x read in place in its own order of axes: out must be laid out as x
    Bad("out-c-order-for-fortran-x", ALL, {"x": lambda a, d: np.asfortranarray(a["x"])},
        ValueError, OUT_AS_X),
    Bad("out-c-order-for-transposed-x", ALL,
        {"x": lambda a, d: np.ascontiguousarray(a["x"].transpose(2, 0, 1)).transpose(1, 2, 0)},
        ValueError, OUT_AS_X),
    Bad("out-fortran-order-for-transposed-x", ALL,
        {"x": lambda a, d: np.ascontiguousarray(a["x"].transpose(2, 0, 1)).transpose(1, 2, 0),
         "out": lambda a, d: np.asfortranarray(a["out"])},
        ValueError, OUT_AS_X),
    Bad("out-unaligned-for-fortran-x", ALL,
        {"x": lambda a, d: np.asfortranarray(a["x"]),
         "out": lambda a, d: _unaligned(a["out"].T).T},
        ValueError, OUT_AS_X),
    # grad_out
    Bad("grad_out-list", BACKWARD, {"grad_out": lambda a, d: a["grad_out"].tolist()},
        TypeError, GRAD_KIND),
    Bad("grad_out-none", BACKWARD, {"grad_out": None}, TypeError, GRAD_KIND),
    Bad("grad_out-python-scalar", BACKWARD, {"grad_out": 1.0}, TypeError, GRAD_KIND),
    Bad("grad_out-int", BACKWARD, {"grad_out": np.ones(SHAPE, np.int64)}, TypeError, GRAD_DTYPE),
    Bad("grad_out-float16", BACKWARD, {"grad_out": np.ones(SHAPE, np.float16)},
        TypeError, GRAD_DTYPE),
    Bad("grad_out-bool", BACKWARD, {"grad_out": np.ones(SHAPE, np.bool_)}, TypeError, GRAD_DTYPE),
    Bad("grad_out-complex", BACKWARD, {"grad_out": np.ones(SHAPE, np.complex128)},
        TypeError, GRAD_DTYPE),
    Bad("grad_out-object", BACKWARD, {"grad_out": np.ones(SHAPE, object)}, TypeError, GRAD_DTYPE),
    Bad("grad_out-string", BACKWARD, {"grad_out": np.full(SHAPE, "1")}, TypeError, GRAD_DTYPE),
    Bad("grad_out-other-float-dtype", BACKWARD,
        {"grad_out": lambda a, d: a["grad_out"].astype(_other_float(d))},
        TypeError, r"^grad_out must have the input's dtype"),
    Bad("grad_out-wrong-shape", BACKWARD, {"grad_out": lambda a, d: np.ones((4, CHANNELS, 6), d)},
        ValueError, GRAD_SHAPE),
    Bad("grad_out-transposed-shape", BACKWARD, {"grad_out": lambda a, d: np.ones(SHAPE[::-1], d)},
        ValueError, GRAD_SHAPE),
    Bad("grad_out-extra-axis", BACKWARD, {"grad_out": lambda a, d: np.ones((1, *SHAPE), d)},
        ValueError, GRAD_SHAPE),
]
# fmt: on


def _apply(change, arguments, dtype):
    """The valid ``arguments`` with ``change`` applied (only to arguments the function has,
    and x, axis)."""
    changed = dict(arguments)
    for name, value in change.items():
        if name not in arguments:
            continue
        changed[name] = value(arguments, dtype) if callable(value) else value
    return changed


def _params():
    params = []
    for bad in CASES:
        for function in bad.functions:
            for dtype in DTYPES:
                name = f"{bad.id}-{function}-{np.dtype(dtype).name}"
                params.append(pytest.param(function, dtype, bad, id=name))
    return params


def _snapshot(arguments):
    """Copies of every ndarray argument, byte for byte."""
    return {
        name: (value.dtype, value.shape, np.ascontiguousarray(value).tobytes())
        for name, value in arguments.items()
        if isinstance(value, np.ndarray)
    }


@pytest.mark.parametrize(("function", "dtype", "bad"), _params())
def test_bad_input_is_rejected_and_nothing_is_modified(function, dtype, bad):
    arguments = _apply(bad.change, _valid_arguments(function, dtype), dtype)
    before = _snapshot(arguments)

    with pytest.raises(bad.exception, match=bad.match):
        FUNCTIONS[function](arguments)

    after = _snapshot(arguments)
    for name in before:
        assert after[name] == before[name], f"{name} was modified by a call that failed"


@pytest.mark.parametrize("function", WITH_X)
@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_arguments_of_these_tests_are_accepted(function, dtype):
    """The starting point of every case above is a valid call: each failure is the change's."""
    arguments = _valid_arguments(function, dtype)
    before = _snapshot(arguments)
    FUNCTIONS[function](arguments)
    if function in FORWARD:
        assert _snapshot(arguments)["out"] != before["out"], "out was not written"


def test_axis_error_is_a_value_error():
    """numpy.exceptions.AxisError derives from ValueError (and IndexError): callers catching
    ValueError for bad arguments catch it too."""
    x = np.ones(SHAPE)
    with pytest.raises(ValueError, match="axis"):
        fastbn.batch_norm_train(x, axis=5)


# ------------------------------------------------------------------ empty input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, CHANNELS), (0, CHANNELS, 5), (4, CHANNELS, 0)], ids=str)
def test_empty_input_in_eval_mode_gives_an_empty_result(shape, dtype):
    """Eval mode has nothing to compute and returns empty results; the sums of nothing are 0.
    Training raises instead (the "no-value" cases above; the layer's below)."""
    x = np.ones(shape, dtype)
    running_mean, running_var = np.zeros(CHANNELS, dtype), np.ones(CHANNELS, dtype)

    y = fastbn.batch_norm(x, running_mean, running_var)
    assert y.shape == shape and y.dtype == dtype
    out = np.empty(shape, dtype)
    assert fastbn.batch_norm(x, running_mean, running_var, out=out) is out

    grad_x, grad_weight, grad_bias = fastbn.batch_norm_backward(
        x, x, running_mean, running_var, training=False
    )
    assert grad_x.shape == shape and grad_x.dtype == dtype
    np.testing.assert_array_equal(grad_weight, np.zeros(CHANNELS, dtype))
    np.testing.assert_array_equal(grad_bias, np.zeros(CHANNELS, dtype))

    moments = fastbn.moments(x)
    np.testing.assert_array_equal(moments.to_array(), np.zeros(3 * CHANNELS))

    bn = fastbn.BatchNorm(CHANNELS, dtype=dtype).eval()
    assert bn(x).shape == shape
    assert bn.backward(x).shape == shape
    np.testing.assert_array_equal(bn.grad_weight, 0)


# ---------------------------------------------------------------------- the layer
#
# test_layer.py has the layer's basic failures: a wrong feature count; int, float16,
# other-float, list, NumPy-scalar and 0-d x; a 1-D x of the wrong length; one value per
# channel in training; backward before forward; a grad_out of another shape or dtype, or a
# list; out of another shape or dtype; recalibrate's, load_state_dict's and fold's basic
# failures. The table below has the rest, checked the same way as the functions above: the
# exception, a message naming the argument, and the layer (parameters, running statistics,
# num_batches_tracked, gradients, mode, the forward context backward uses) and every array
# argument unchanged.

LAYER_SHAPE = (4, CHANNELS, 2)
TRAIN, EVAL_MODE = ("train",), ("eval",)
BOTH = TRAIN + EVAL_MODE
LAYER_X_DTYPE = r"^x must have a float dtype"
LAYER_X_KIND = r"^x must be a numpy.ndarray"
LAYER_GRAD_KIND = r"^grad_out must be a numpy.ndarray"
LAYER_GRAD_DTYPE = r"^grad_out must have the last forward call's dtype"
LAYER_GRAD_SHAPE = r"^grad_out must have the shape of the last forward call's output"


class LayerBad(NamedTuple):
    """One bad call on a layer in each of ``modes``: ``setup(bn)``, if given, first changes the
    layer as a user may (replaces a buffer, makes one read-only); ``call(bn, arrays)`` makes
    the call, with ``arrays`` fresh valid arrays of the layer's dtype: "x" (LAYER_SHAPE),
    "out" (x's shape, a sentinel), "example" (one example, 1-D) and "grad_out" (x's shape).
    ``bug``: the reason of a known bug, which marks the case xfail."""

    id: str
    modes: tuple
    call: object
    exception: type
    match: str
    setup: object = None
    bug: str = ""


def _set(name, value):
    """A setup that sets the layer's attribute ``name`` to ``value(bn)``."""
    return lambda bn: setattr(bn, name, value(bn))


def _freeze(name):
    """A setup that makes the layer's array ``name`` read-only."""
    return lambda bn: setattr(getattr(bn, name).flags, "writeable", False)


def _state_with(**changes):
    """A call of load_state_dict with a valid state dict (the layer's own, plus 1) changed."""

    def call(bn, arrays):
        state = {name: value + 1 for name, value in bn.state_dict().items()}
        state.update({k: v(bn) if callable(v) else v for k, v in changes.items()})
        return bn.load_state_dict(state)

    return call


# fmt: off
LAYER_CASES = [
    # forward: x of a kind or dtype the layer does not take; empty in training
    LayerBad("x-bool", BOTH, lambda bn, a: bn(a["x"] > 0), TypeError, LAYER_X_DTYPE),
    LayerBad("x-complex", BOTH, lambda bn, a: bn(a["x"].astype(np.complex128)),
             TypeError, LAYER_X_DTYPE),
    LayerBad("x-object", BOTH, lambda bn, a: bn(a["x"].astype(object)), TypeError, LAYER_X_DTYPE),
    LayerBad("x-string", BOTH, lambda bn, a: bn(a["x"].astype(str)), TypeError, LAYER_X_DTYPE),
    LayerBad("x-none", BOTH, lambda bn, a: bn(None), TypeError, LAYER_X_KIND),
    LayerBad("x-python-int", BOTH, lambda bn, a: bn(3), TypeError, LAYER_X_KIND),
    LayerBad("x-empty", TRAIN, lambda bn, a: bn(a["x"][:0]), ValueError, ONE_VALUE),
    LayerBad("x-empty-inner", TRAIN, lambda bn, a: bn(a["x"][..., :0]), ValueError, ONE_VALUE),
    # forward: a bad out, for a batch and for one example
    LayerBad("out-list", BOTH, lambda bn, a: bn(a["x"], out=a["x"].tolist()), TypeError, OUT_KIND),
    LayerBad("out-python-scalar", BOTH, lambda bn, a: bn(a["x"], out=0.0), TypeError, OUT_KIND),
    LayerBad("out-read-only", BOTH, lambda bn, a: bn(a["x"], out=_read_only(a["out"])),
             ValueError, r"^out is read-only"),
    LayerBad("out-fortran-order", BOTH,
             lambda bn, a: bn(a["x"], out=np.asfortranarray(a["out"])), ValueError, OUT_LAYOUT),
    LayerBad("out-c-order-for-fortran-x", BOTH,
             lambda bn, a: bn(np.asfortranarray(a["x"]), out=a["out"]), ValueError, OUT_AS_X),
    LayerBad("out-strided", BOTH,
             lambda bn, a: bn(a["x"], out=np.repeat(a["out"], 2, axis=-1)[..., ::2]),
             ValueError, OUT_LAYOUT),
    LayerBad("out-unaligned", BOTH, lambda bn, a: bn(a["x"], out=_unaligned(a["out"])),
             ValueError, OUT_LAYOUT),
    LayerBad("out-byte-swapped", BOTH,
             lambda bn, a: bn(a["x"], out=a["out"].astype(a["out"].dtype.newbyteorder("S"))),
             TypeError, OUT_DTYPE),
    LayerBad("out-float16", BOTH, lambda bn, a: bn(a["x"], out=a["out"].astype(np.float16)),
             TypeError, OUT_DTYPE),
    LayerBad("out-per-channel-shape", BOTH, lambda bn, a: bn(a["x"], out=a["example"]),
             ValueError, OUT_SHAPE),
    LayerBad("example-out-list", BOTH, lambda bn, a: bn(a["example"], out=[0.0] * CHANNELS),
             TypeError, OUT_KIND),
    LayerBad("example-out-2d", BOTH, lambda bn, a: bn(a["example"], out=a["out"][:1, :, 0]),
             ValueError, r"^out must have x's shape"),
    LayerBad("example-out-read-only", EVAL_MODE,
             lambda bn, a: bn(a["example"], out=_read_only(a["out"][0, :, 0])),
             ValueError, r"^out is read-only"),
    LayerBad("example-out-other-float-dtype", EVAL_MODE,
             lambda bn, a: bn(a["example"], out=a["out"][0, :, 0].astype(
                 _other_float(a["out"].dtype.type))),
             TypeError, OUT_DTYPE),
    # forward: the layer's own arrays, replaced or made read-only by the user
    LayerBad("running_mean-read-only", TRAIN, lambda bn, a: bn(a["x"]),
             ValueError, r"^running_mean must be a writable array", setup=_freeze("running_mean")),
    LayerBad("running_var-read-only", TRAIN, lambda bn, a: bn(a["x"]),
             ValueError, r"^running_var must be a writable array", setup=_freeze("running_var")),
    LayerBad("num_batches_tracked-read-only", TRAIN, lambda bn, a: bn(a["x"]),
             ValueError, r"^num_batches_tracked must be a writable",
             setup=_freeze("num_batches_tracked")),
    LayerBad("running_var-wrong-shape", TRAIN, lambda bn, a: bn(a["x"]),
             ValueError, r"^running_var must be a writable array of shape \(3,\)",
             setup=_set("running_var", lambda bn: np.ones(CHANNELS + 1, bn.dtype))),
    LayerBad("running_var-wrong-shape", EVAL_MODE, lambda bn, a: bn(a["x"]),
             ValueError, r"^running_var must have shape \(3,\)",
             setup=_set("running_var", lambda bn: np.ones(CHANNELS + 1, bn.dtype))),
    LayerBad("running_mean-other-float-dtype", EVAL_MODE, lambda bn, a: bn(a["x"]),
             TypeError, r"^running_mean must have the input's dtype",
             setup=_set("running_mean", lambda bn: np.zeros(CHANNELS, _other_float(bn.dtype)))),
    LayerBad("weight-wrong-shape", BOTH, lambda bn, a: bn(a["x"]),
             ValueError, r"^weight must have shape \(3,\)",
             setup=_set("weight", lambda bn: np.ones(CHANNELS - 1, bn.dtype))),
    LayerBad("bias-other-float-dtype", BOTH, lambda bn, a: bn(a["x"]),
             TypeError, r"^bias must have the input's dtype",
             setup=_set("bias", lambda bn: np.zeros(CHANNELS, _other_float(bn.dtype)))),
    # backward
    LayerBad("grad_out-none", BOTH, lambda bn, a: bn.backward(None), TypeError, LAYER_GRAD_KIND),
    LayerBad("grad_out-python-scalar", BOTH, lambda bn, a: bn.backward(1.0),
             TypeError, LAYER_GRAD_KIND),
    LayerBad("grad_out-bool", BOTH, lambda bn, a: bn.backward(a["grad_out"] > 0),
             TypeError, LAYER_GRAD_DTYPE),
    LayerBad("grad_out-complex", BOTH,
             lambda bn, a: bn.backward(a["grad_out"].astype(np.complex128)),
             TypeError, LAYER_GRAD_DTYPE),
    LayerBad("grad_out-string", BOTH, lambda bn, a: bn.backward(a["grad_out"].astype(str)),
             TypeError, LAYER_GRAD_DTYPE),
    LayerBad("grad_out-float16", BOTH, lambda bn, a: bn.backward(a["grad_out"].astype(np.float16)),
             TypeError, LAYER_GRAD_DTYPE),
    LayerBad("grad_out-extra-axis", BOTH, lambda bn, a: bn.backward(a["grad_out"][None]),
             ValueError, LAYER_GRAD_SHAPE),
    LayerBad("grad_out-per-channel-shape", BOTH, lambda bn, a: bn.backward(a["example"]),
             ValueError, LAYER_GRAD_SHAPE),
    LayerBad("backward-out-list", BOTH,
             lambda bn, a: bn.backward(a["grad_out"], out=a["out"].tolist()), TypeError, OUT_KIND),
    LayerBad("backward-out-read-only", BOTH,
             lambda bn, a: bn.backward(a["grad_out"], out=_read_only(a["out"])),
             ValueError, r"^out is read-only"),
    LayerBad("backward-out-fortran-order", BOTH,
             lambda bn, a: bn.backward(a["grad_out"], out=np.asfortranarray(a["out"])),
             ValueError, OUT_LAYOUT),
    LayerBad("backward-out-float16", BOTH,
             lambda bn, a: bn.backward(a["grad_out"], out=a["out"].astype(np.float16)),
             TypeError, OUT_DTYPE),
    LayerBad("backward-out-per-channel-shape", BOTH,
             lambda bn, a: bn.backward(a["grad_out"], out=a["example"]),
             ValueError, r"^out must have the shape of the last forward call's output"),
    # recalibrate
    LayerBad("batches-none", BOTH, lambda bn, a: bn.recalibrate(None), TypeError, r"^batches"),
    LayerBad("batch-0d", BOTH, lambda bn, a: bn.recalibrate([a["x"], np.array(1.0, bn.dtype)]),
             ValueError, r"^batch 1 must be an array of shape"),
    LayerBad("batch-1d-wrong-length", BOTH,
             lambda bn, a: bn.recalibrate([np.ones(CHANNELS + 1, bn.dtype)]),
             ValueError, r"^batch 0 has 4 features"),
    LayerBad("batch-string", BOTH, lambda bn, a: bn.recalibrate([a["x"], a["x"].astype(str)]),
             TypeError, r"^batch 1 must have dtype float32 or float64"),
    LayerBad("batch-float16", BOTH, lambda bn, a: bn.recalibrate([a["x"].astype(np.float16)]),
             TypeError, r"^batch 0 must have dtype float32 or float64"),
    LayerBad("batch-complex", BOTH,
             lambda bn, a: bn.recalibrate([a["x"], a["x"].astype(np.complex64)]),
             TypeError, r"^batch 1 must have dtype float32 or float64"),
    LayerBad("batch-empty", BOTH, lambda bn, a: bn.recalibrate([a["x"][:0]]),
             ValueError, r"more than 1 value per channel in all, got 0"),
    LayerBad("recalibrate-running_mean-read-only", BOTH, lambda bn, a: bn.recalibrate([a["x"]]),
             ValueError, r"^running_mean must be a writable array", setup=_freeze("running_mean")),
    # load_state_dict
    LayerBad("state-weight-string", BOTH, _state_with(weight=np.array(["1"] * CHANNELS)),
             TypeError, r"^state_dict\['weight'\] must have a float dtype"),
    LayerBad("state-weight-complex", BOTH, _state_with(weight=np.ones(CHANNELS, np.complex128)),
             TypeError, r"^state_dict\['weight'\] must have a float dtype"),
    LayerBad("state-bias-none", BOTH, _state_with(bias=None),
             TypeError, r"^state_dict\['bias'\] must have a float dtype"),
    LayerBad("state-running_mean-object", BOTH,
             _state_with(running_mean=np.ones(CHANNELS, object)),
             TypeError, r"^state_dict\['running_mean'\] must have a float dtype"),
    LayerBad("state-running_var-python-scalar", BOTH, _state_with(running_var=1.0),
             ValueError, r"^state_dict\['running_var'\] must have shape \(3,\)"),
    LayerBad("state-num_batches_tracked-bool", BOTH, _state_with(num_batches_tracked=True),
             TypeError, r"^state_dict\['num_batches_tracked'\] must be an integer"),
    LayerBad("state-key-not-a-string", BOTH,
             lambda bn, a: bn.load_state_dict({**bn.state_dict(), 0: np.zeros(CHANNELS)}),
             ValueError, r"unexpected keys \[0\]"),
    LayerBad("state-none", BOTH, lambda bn, a: bn.load_state_dict(None),
             TypeError, r"^state_dict must be a mapping"),
    LayerBad("state-into-read-only-running_var", BOTH, _state_with(),
             ValueError, r"^the layer's running_var is not a writable array",
             setup=_freeze("running_var")),
    # reset methods on arrays the user made read-only
    LayerBad("reset_running_stats-running_var-read-only", BOTH,
             lambda bn, a: bn.reset_running_stats(), ValueError, r"running_var",
             setup=_freeze("running_var")),
    LayerBad("reset_parameters-bias-read-only", BOTH,
             lambda bn, a: bn.reset_parameters(), ValueError, r"bias",
             setup=_freeze("bias")),
    # fold, with the layer in eval mode
    LayerBad("fold-weight-complex", EVAL_MODE,
             lambda bn, a: fastbn.fold(np.ones((CHANNELS, 2), np.complex128), None, bn),
             TypeError, r"^weight must be a numpy.ndarray of a float dtype"),
    LayerBad("fold-weight-none", EVAL_MODE, lambda bn, a: fastbn.fold(None, None, bn),
             TypeError, r"^weight must be a numpy.ndarray of a float dtype"),
    LayerBad("fold-bias-complex", EVAL_MODE,
             lambda bn, a: fastbn.fold(a["out"][:, :, 0].T, np.ones(CHANNELS, np.complex128), bn),
             TypeError, r"^bias must be None or a numpy.ndarray of a float dtype"),
    LayerBad("fold-bias-2d", EVAL_MODE,
             lambda bn, a: fastbn.fold(a["out"][:, :, 0].T, a["out"][:1, :, 0].T, bn),
             ValueError, r"^bias must have shape \(3,\)"),
    LayerBad("fold-bn-none", EVAL_MODE, lambda bn, a: fastbn.fold(a["out"][:, :, 0].T, None, None),
             TypeError, r"^bn must be a fastbn.BatchNorm"),
]
# fmt: on


def _layer_params():
    params = []
    for bad in LAYER_CASES:
        marks = pytest.mark.xfail(strict=True, reason=f"bug: {bad.bug}") if bad.bug else ()
        for mode in bad.modes:
            for dtype in DTYPES:
                name = f"{bad.id}-{mode}-{np.dtype(dtype).name}"
                params.append(pytest.param(mode, dtype, bad, id=name, marks=marks))
    return params


def _layer_and_arrays(mode, dtype):
    """A layer with state of its own (trained, random parameters, one forward and backward
    in ``mode`` done), and fresh valid arrays for a call."""
    rng = np.random.default_rng(1)
    bn = fastbn.BatchNorm(CHANNELS, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 2.0, CHANNELS)
    bn.bias[...] = rng.uniform(-1.0, 1.0, CHANNELS)
    for n in (5, 7):
        bn(rng.standard_normal((n, CHANNELS, 2)).astype(dtype))
    bn.train(mode == "train")
    previous = rng.standard_normal(LAYER_SHAPE).astype(dtype)
    bn(previous)
    bn.backward(np.ones_like(previous))
    arrays = {
        "x": rng.standard_normal(LAYER_SHAPE).astype(dtype),
        "out": np.full(LAYER_SHAPE, 7.0, dtype),
        "example": rng.standard_normal(CHANNELS).astype(dtype),
        "grad_out": rng.standard_normal(LAYER_SHAPE).astype(dtype),
    }
    return bn, arrays


LAYER_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
               "grad_weight", "grad_bias")


def _layer_state(bn):
    """Everything observable about the layer: its arrays byte for byte (and which array
    objects they are), its mode, and the forward context its backward would use."""
    state = {name: (id(getattr(bn, name)), _snapshot({name: getattr(bn, name)}))
             for name in LAYER_STATE}
    state["training"] = bn.training
    state["context"] = id(bn._context)
    return state


@pytest.mark.parametrize(("mode", "dtype", "bad"), _layer_params())
def test_bad_layer_call_is_rejected_and_nothing_is_modified(mode, dtype, bad):
    bn, arrays = _layer_and_arrays(mode, dtype)
    if bad.setup is not None:
        bad.setup(bn)
    before, arrays_before = _layer_state(bn), _snapshot(arrays)

    with pytest.raises(bad.exception, match=bad.match):
        bad.call(bn, arrays)

    assert _layer_state(bn) == before, "the layer's state changed in a call that failed"
    assert _snapshot(arrays) == arrays_before, "an argument was modified by a call that failed"


def test_backward_after_only_failed_forward_calls_still_needs_a_forward():
    """A forward call that fails leaves no context behind for backward."""
    bn = fastbn.BatchNorm(CHANNELS)
    for call in (lambda: bn(np.ones((1, CHANNELS), np.float32)),  # one value per channel
                 lambda: bn(np.ones((4, CHANNELS + 1), np.float32)),
                 lambda: bn.eval()(np.ones((4, CHANNELS), np.float64))):
        with pytest.raises((TypeError, ValueError)):
            call()
        with pytest.raises(RuntimeError, match=r"^backward\(\) needs a forward call first"):
            bn.backward(np.ones((4, CHANNELS), np.float32))


# fmt: off
LAYER_OPTIONS = [  # beyond test_layer.py's test_constructor_rejects_bad_options
    ({"eps": float("inf")}, ValueError, r"^eps must be a finite number >= 0"),
    ({"eps": True}, TypeError, r"^eps must be a real number"),
    ({"eps": None}, TypeError, r"^eps must be a real number"),
    ({"momentum": float("nan")}, ValueError, r"^momentum must be in \[0, 1\] or None"),
    ({"momentum": True}, TypeError, r"^momentum must be a real number"),
    ({"dtype": np.complex128}, TypeError, r"^dtype must be numpy.float32 or numpy.float64"),
    ({"dtype": np.bool_}, TypeError, r"^dtype must be numpy.float32 or numpy.float64"),
    ({"dtype": object}, TypeError, r"^dtype must be numpy.float32 or numpy.float64"),
    ({"dtype": str}, TypeError, r"^dtype must be numpy.float32 or numpy.float64"),
    ({"dtype": "float99"}, TypeError, r"^dtype must be numpy.float32 or numpy.float64"),
    ({"track_running_stats": 1}, TypeError, r"^track_running_stats must be True or False"),
    ({"affine": None}, TypeError, r"^affine must be True or False"),
    ({"debias": "yes"}, TypeError, r"^debias must be True or False"),
    ({"axis": True}, TypeError, r"^axis must be an integer"),
    ({"axis": None}, TypeError, r"^axis must be an integer"),
    ({"axis": "1"}, TypeError, r"^axis must be an integer"),
]
# fmt: on


@pytest.mark.parametrize(("options", "exception", "match"), LAYER_OPTIONS, ids=repr)
def test_bad_layer_options_are_rejected(options, exception, match):
    with pytest.raises(exception, match=match):
        fastbn.BatchNorm(CHANNELS, **options)


@pytest.mark.parametrize(
    ("num_features", "exception"),
    [(None, TypeError), (3.0, TypeError), (np.float64(3), TypeError), ([3], TypeError),
     (np.array([3]), TypeError)],
    ids=repr,
)
def test_bad_num_features_are_rejected(num_features, exception):
    with pytest.raises(exception, match=r"^num_features must be a positive integer"):
        fastbn.BatchNorm(num_features)


# ------------------------------------------- statistics from a layer's statistics hook


class _HookedBatchNorm(fastbn.BatchNorm):
    """A layer whose _normalize_with_batch_statistics hook (SyncBatchNorm's) returns the
    statistics that ``spoil`` makes of the real ones."""

    def __init__(self, spoil, **options):
        super().__init__(CHANNELS, **options)
        self.spoil = spoil

    def _normalize_with_batch_statistics(self, batch_x, batch_out):
        y, mean, var, count, synchronized = super()._normalize_with_batch_statistics(
            batch_x, batch_out)
        mean, var = self.spoil(mean, var)
        return y, mean, var, count, synchronized


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda mean, var: (mean.astype(np.float32), var), r"^mean must be a C-contiguous"),
        (lambda mean, var: (mean, var[:-1]), r"^var must have shape \(3,\), got \(2,\)"),
        (lambda mean, var: (mean, np.repeat(var, 2)[::2]), r"^var must be a C-contiguous"),
        (lambda mean, var: (mean[:-1], var[:-1]), r"^mean must have shape \(3,\)"),
    ],
    ids=["float32-mean", "short-var", "strided-var", "short-both"],
)
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_bad_statistics_from_a_hook_are_rejected_and_nothing_is_modified(
        spoil, match, track_running_stats):
    """The float64 statistics a layer's hook hands back are read by C loops (the running
    update and the backward's mean and invstd): a wrong dtype, layout or length is refused
    before the running statistics, num_batches_tracked or what backward() differentiates
    change, with running statistics or without."""
    layer = _HookedBatchNorm(lambda mean, var: (mean, var),
                             track_running_stats=track_running_stats)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    grad_out = np.ones_like(x)
    layer(x)  # some state to keep: a first batch's statistics and its context
    expected_grads = layer.backward(grad_out)
    layer(x)
    layer.spoil = spoil
    before = {name: value.copy() for name, value in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        layer(x)
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    for got, expected in zip(layer.backward(grad_out), expected_grads):
        np.testing.assert_array_equal(got, expected)  # the first call's context still


def test_private_statistics_helpers_refuse_what_they_cannot_read():
    mean, var = np.zeros(CHANNELS), np.ones(CHANNELS)
    with pytest.raises(ValueError, match=r"^var must be a C-contiguous 1-D float64"):
        fastbn._core._mean_invstd(mean, var.astype(np.float32), 1e-5, np.float32)
    with pytest.raises(ValueError, match=r"^mean must be a C-contiguous 1-D float64"):
        fastbn._core._mean_invstd(np.array(0.0), np.array(1.0), 1e-5, np.float32)  # 0-d
    with pytest.raises(TypeError, match=r"^dtype must be float32 or float64, got int16"):
        fastbn._core._mean_invstd(mean, var, 1e-5, np.int16)
    running_mean, running_var = np.zeros(CHANNELS + 1), np.ones(CHANNELS + 1)
    with pytest.raises(ValueError, match=r"^mean must have shape \(4,\), got \(3,\)"):
        fastbn._core._update_running(running_mean, running_var, mean, var, 0.1, 10.0)
    np.testing.assert_array_equal(running_mean, 0.0)
    np.testing.assert_array_equal(running_var, 1.0)


# ---------------------------------------------------------------------------- Moments

# fmt: off
MOMENTS_CASES = [  # (id, call, exception, match, the known bug or "")
    ("count-none", lambda: fastbn.Moments(None, [0.0], [0.0]), TypeError, r"count", ""),
    ("count-nan", lambda: fastbn.Moments([np.nan], [0.0], [0.0]), ValueError, r"count", ""),
    ("count-string", lambda: fastbn.Moments(["a"], [0.0], [0.0]), TypeError, r"count", ""),
    ("mean-complex", lambda: fastbn.Moments([1.0], [1j], [0.0]), TypeError, r"mean", ""),
    ("count-negative", lambda: fastbn.Moments([-1.0], [0.0], [0.0]), ValueError,
     r"^count must be >= 0", ""),
    ("shapes-differ", lambda: fastbn.Moments([1.0, 2.0], [0.0], [0.0]), ValueError,
     r"^count, mean and m2 must be 1-D arrays of one shape", ""),
    ("2d", lambda: fastbn.Moments(*[np.ones((2, 2))] * 3), ValueError,
     r"^count, mean and m2 must be 1-D arrays of one shape", ""),
    ("from_array-2d", lambda: fastbn.Moments.from_array(np.zeros((2, 3))), ValueError,
     r"^expected a flat array of length 3\*C", ""),
    ("merge_all-not-moments", lambda: fastbn.Moments.merge_all([1, 2]), TypeError,
     r"^can only merge Moments", ""),
    ("merge-list", lambda: fastbn.Moments.empty(3).merge([0.0] * 9), TypeError,
     r"^can only merge Moments", ""),
]
# fmt: on


@pytest.mark.parametrize(
    ("call", "exception", "match"),
    [pytest.param(call, exception, match, id=name,
                  marks=pytest.mark.xfail(strict=True, reason=f"bug: {bug}") if bug else ())
     for name, call, exception, match, bug in MOMENTS_CASES],
)
def test_bad_moments_arguments_are_rejected(call, exception, match):
    with pytest.raises(exception, match=match):
        call()


# ------------------------------------------------------------- out's layout, checked early


def _layouts(shape):
    base = np.arange(float(np.prod(shape))).reshape(shape)
    wide = np.zeros(shape[:-1] + (2 * shape[-1],))
    wide_fortran = np.asfortranarray(wide)
    return {
        "C": base, "F": np.asfortranarray(base),
        "transposed": np.ascontiguousarray(base.transpose(2, 0, 1)).transpose(1, 2, 0),
        "strided C": wide[..., ::2], "strided F": wide_fortran[..., ::2],
        "reversed": base[::-1],
    }


@pytest.mark.parametrize("out_layout", ["C", "F", "transposed"])
@pytest.mark.parametrize("x_layout", list(_layouts(SHAPE)))
def test_the_early_out_check_agrees_with_the_kernel_call(x_layout, out_layout):
    """fastbn._core._check_out_layout (which SyncBatchNorm runs before its collective calls)
    raises exactly what a kernel call on x would raise for out's layout, and nothing when
    the call accepts out."""
    from fastbn._core import _check_out_layout

    x = _layouts(SHAPE)[x_layout]
    out = _layouts(SHAPE)[out_layout].copy(order="K")
    running_mean, running_var = np.zeros(CHANNELS), np.ones(CHANNELS)
    try:
        fastbn.batch_norm(x, running_mean, running_var, out=out)
    except ValueError as error:
        with pytest.raises(ValueError, match=f"^{re.escape(str(error))}$"):
            _check_out_layout(x, out)
    else:
        _check_out_layout(x, out)
