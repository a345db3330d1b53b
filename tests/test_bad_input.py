"""Bad input: the right exception, a message that names the argument, and nothing modified.

Each case starts from a valid call of one of the functions (named in the test id), changes
one thing, and expects a TypeError (wrong kind or dtype) or a ValueError (wrong value or
shape; numpy.exceptions.AxisError for the axis). Afterwards every array argument must be
exactly as before: running statistics, ``out`` (filled with a sentinel), weight, bias, x.
"""

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
}
BATCH_NORM = ("batch_norm(training=True)", "batch_norm(training=False)")
FORWARD = BATCH_NORM + ("batch_norm_train",)
BACKWARD = ("batch_norm_backward(training=True)", "batch_norm_backward(training=False)")
TRAINING = ("batch_norm(training=True)", "batch_norm_train", "batch_norm_backward(training=True)")
ALL = FORWARD + BACKWARD


def _valid_arguments(function, dtype):
    """Keyword arguments of a valid call of ``function`` on float ``dtype`` input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(dtype)
    per_channel = lambda low, high: rng.uniform(low, high, CHANNELS).astype(dtype)  # noqa: E731
    arguments = {"x": x, "weight": per_channel(0.5, 2), "axis": 1}
    if function in BACKWARD:
        arguments["grad_out"] = rng.standard_normal(SHAPE).astype(dtype)
        arguments["mean"] = per_channel(-1, 1)
        arguments["invstd"] = per_channel(0.5, 2)
        return arguments
    arguments["bias"] = per_channel(-1, 1)
    arguments["eps"] = 1e-5
    arguments["out"] = np.full(SHAPE, 7.0, dtype=dtype)  # a sentinel: must stay as it is
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
GRAD_KIND = r"^grad_out must be a numpy.ndarray"
GRAD_SHAPE = r"^grad_out must have the input's shape"
EVAL = ("batch_norm(training=False)",)
TRAIN = ("batch_norm(training=True)",)

# fmt: off
CASES = [
    # x
    Bad("x-list", ALL, {"x": lambda a, d: a["x"].tolist()}, TypeError, X_KIND),
    Bad("x-python-scalar", ALL, {"x": 1.5}, TypeError, X_KIND),
    Bad("x-none", ALL, {"x": None}, TypeError, X_KIND),
    Bad("x-int", ALL, {"x": lambda a, d: a["x"].astype(np.int64)}, TypeError, X_DTYPE),
    Bad("x-float16", ALL, {"x": lambda a, d: a["x"].astype(np.float16)}, TypeError, X_DTYPE),
    Bad("x-complex", ALL, {"x": lambda a, d: a["x"].astype(np.complex128)}, TypeError, X_DTYPE),
    Bad("x-bool", ALL, {"x": lambda a, d: a["x"] > 0}, TypeError, X_DTYPE),
    Bad("x-object", ALL, {"x": lambda a, d: a["x"].astype(object)}, TypeError, X_DTYPE),
    Bad("x-1d", ALL, {"x": lambda a, d: np.ones(4, d), "axis": 0}, ValueError, X_NDIM),
    Bad("x-0d", ALL, {"x": lambda a, d: np.array(1.0, d), "axis": 0}, ValueError, X_NDIM),
    # axis
    Bad("axis-too-large", ALL, {"axis": 3}, np.exceptions.AxisError, r"axis 3 is out of bounds"),
    Bad("axis-too-negative", ALL, {"axis": -4}, np.exceptions.AxisError,
        r"axis -4 is out of bounds"),
    Bad("axis-float", ALL, {"axis": 1.0}, TypeError, AXIS_KIND),
    Bad("axis-bool", ALL, {"axis": True}, TypeError, AXIS_KIND),
    Bad("axis-none", ALL, {"axis": None}, TypeError, AXIS_KIND),
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
    Bad("out-list", FORWARD, {"out": lambda a, d: a["out"].tolist()}, TypeError, OUT_KIND),
    Bad("out-python-scalar", FORWARD, {"out": 0.0}, TypeError, OUT_KIND),
    Bad("out-other-float-dtype", FORWARD,
        {"out": lambda a, d: a["out"].astype(_other_float(d))}, TypeError, OUT_DTYPE),
    Bad("out-int", FORWARD, {"out": np.full(SHAPE, 7, np.int64)}, TypeError, OUT_DTYPE),
    Bad("out-byte-swapped", FORWARD,
        {"out": lambda a, d: a["out"].astype(a["out"].dtype.newbyteorder("S"))},
        TypeError, OUT_DTYPE),
    Bad("out-wrong-shape", FORWARD, {"out": lambda a, d: np.full((4, CHANNELS, 6), 7.0, d)},
        ValueError, OUT_SHAPE),
    Bad("out-transposed-shape", FORWARD, {"out": lambda a, d: np.full(SHAPE[::-1], 7.0, d)},
        ValueError, OUT_SHAPE),
    Bad("out-fortran-order", FORWARD, {"out": lambda a, d: np.asfortranarray(a["out"])},
        ValueError, OUT_LAYOUT),
    Bad("out-strided", FORWARD, {"out": lambda a, d: np.full((4, CHANNELS, 10), 7.0, d)[..., ::2]},
        ValueError, OUT_LAYOUT),
    Bad("out-unaligned", FORWARD, {"out": lambda a, d: _unaligned(a["out"])},
        ValueError, OUT_LAYOUT),
    Bad("out-read-only", FORWARD, {"out": lambda a, d: _read_only(a["out"])},
        ValueError, r"^out is read-only"),
    # grad_out
    Bad("grad_out-list", BACKWARD, {"grad_out": lambda a, d: a["grad_out"].tolist()},
        TypeError, GRAD_KIND),
    Bad("grad_out-none", BACKWARD, {"grad_out": None}, TypeError, GRAD_KIND),
    Bad("grad_out-int", BACKWARD, {"grad_out": np.ones(SHAPE, np.int64)},
        TypeError, r"^grad_out must have dtype float32 or float64"),
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


@pytest.mark.parametrize("function", ALL)
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
