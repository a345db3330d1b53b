"""Bad input: the right exception, a message that names the argument, and nothing modified.

Each case starts from a valid call of one of the functions (named in the test id), changes
one thing, and expects a TypeError (wrong kind or dtype) or a ValueError (wrong value or
shape; numpy.exceptions.AxisError for the axis). Afterwards every array argument must be
exactly as before: running statistics, ``out`` (filled with a sentinel), weight, bias, x.
"""

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
    "batch_norm_backward(training=True)": lambda kw: fastbn.batch_norm_backward(training=True, **kw),
    "batch_norm_backward(training=False)": lambda kw: fastbn.batch_norm_backward(training=False, **kw),
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
    """x (and grad_out, out) of a shape with at most one value per channel."""

    def change(arguments, dtype):
        changed = {"x": np.ones(shape, dtype=dtype), "axis": axis}
        for name in ("grad_out", "out"):
            if name in arguments:
                changed[name] = np.full(shape, 7.0, dtype=dtype)
        return changed

    return change


def _per_channel_cases(name, functions):
    """Every way a per-channel argument can be wrong."""
    return [
        (f"{name}-too-long", functions,
         lambda a, d: {name: np.ones(CHANNELS + 1, d)}, ValueError, rf"^{name} must have shape \(3,\)"),
        (f"{name}-too-short", functions,
         lambda a, d: {name: np.ones(CHANNELS - 1, d)}, ValueError, rf"^{name} must have shape \(3,\)"),
        (f"{name}-2d", functions,
         lambda a, d: {name: np.ones((1, CHANNELS), d)}, ValueError, rf"^{name} must have shape \(3,\)"),
        (f"{name}-other-float-dtype", functions,
         lambda a, d: {name: np.ones(CHANNELS, _other_float(d))}, TypeError,
         rf"^{name} must have the input's dtype"),
        (f"{name}-int", functions,
         lambda a, d: {name: np.ones(CHANNELS, np.int64)}, TypeError, rf"^{name} must have the input's dtype"),
        (f"{name}-list", functions,
         lambda a, d: {name: [1.0] * CHANNELS}, TypeError, rf"^{name} must be a numpy.ndarray"),
        (f"{name}-python-scalar", functions,
         lambda a, d: {name: 1.0}, TypeError, rf"^{name} must be a numpy.ndarray"),
        (f"{name}-numpy-scalar", functions,
         lambda a, d: {name: d(1.0)}, TypeError, rf"^{name} must be a numpy.ndarray"),
    ]


CASES = [
    # x
    ("x-list", ALL, lambda a, d: {"x": a["x"].tolist()}, TypeError, r"^x must be a numpy.ndarray"),
    ("x-python-scalar", ALL, lambda a, d: {"x": 1.5}, TypeError, r"^x must be a numpy.ndarray"),
    ("x-none", ALL, lambda a, d: {"x": None}, TypeError, r"^x must be a numpy.ndarray"),
    ("x-int", ALL, lambda a, d: {"x": a["x"].astype(np.int64)}, TypeError,
     r"^x must have dtype float32 or float64"),
    ("x-float16", ALL, lambda a, d: {"x": a["x"].astype(np.float16)}, TypeError,
     r"^x must have dtype float32 or float64"),
    ("x-complex", ALL, lambda a, d: {"x": a["x"].astype(np.complex128)}, TypeError,
     r"^x must have dtype float32 or float64"),
    ("x-bool", ALL, lambda a, d: {"x": a["x"] > 0}, TypeError, r"^x must have dtype float32 or float64"),
    ("x-object", ALL, lambda a, d: {"x": a["x"].astype(object)}, TypeError,
     r"^x must have dtype float32 or float64"),
    ("x-1d", ALL, lambda a, d: {"x": a["x"][:, 0, 0].copy(), "axis": 0}, ValueError,
     r"^x must have at least 2 dimensions"),
    ("x-0d", ALL, lambda a, d: {"x": np.array(1.0, d), "axis": 0}, ValueError,
     r"^x must have at least 2 dimensions"),
    # axis
    ("axis-too-large", ALL, lambda a, d: {"axis": 3}, np.exceptions.AxisError, r"axis 3 is out of bounds"),
    ("axis-too-negative", ALL, lambda a, d: {"axis": -4}, np.exceptions.AxisError,
     r"axis -4 is out of bounds"),
    ("axis-float", ALL, lambda a, d: {"axis": 1.0}, TypeError, r"^axis must be an integer"),
    ("axis-bool", ALL, lambda a, d: {"axis": True}, TypeError, r"^axis must be an integer"),
    ("axis-none", ALL, lambda a, d: {"axis": None}, TypeError, r"^axis must be an integer"),
    # eps
    ("eps-negative", FORWARD, lambda a, d: {"eps": -1e-5}, ValueError, r"^eps must be a finite number >= 0"),
    ("eps-nan", FORWARD, lambda a, d: {"eps": float("nan")}, ValueError, r"^eps must be a finite number >= 0"),
    ("eps-inf", FORWARD, lambda a, d: {"eps": float("inf")}, ValueError, r"^eps must be a finite number >= 0"),
    ("eps-string", FORWARD, lambda a, d: {"eps": "1e-5"}, TypeError, r"^eps must be a real number"),
    ("eps-none", FORWARD, lambda a, d: {"eps": None}, TypeError, r"^eps must be a real number"),
    ("eps-array", FORWARD, lambda a, d: {"eps": np.array([1e-5])}, TypeError, r"^eps must be a real number"),
    # momentum
    ("momentum-negative", BATCH_NORM, lambda a, d: {"momentum": -0.1}, ValueError, r"^momentum must be in \[0, 1\]"),
    ("momentum-above-one", BATCH_NORM, lambda a, d: {"momentum": 1.5}, ValueError, r"^momentum must be in \[0, 1\]"),
    ("momentum-nan", BATCH_NORM, lambda a, d: {"momentum": float("nan")}, ValueError,
     r"^momentum must be in \[0, 1\]"),
    ("momentum-string", BATCH_NORM, lambda a, d: {"momentum": "0.1"}, TypeError, r"^momentum must be a real number"),
    ("momentum-none", BATCH_NORM, lambda a, d: {"momentum": None}, TypeError, r"^momentum must be a real number"),
    # per-channel arrays
    *_per_channel_cases("weight", ALL),
    *_per_channel_cases("bias", FORWARD),
    *_per_channel_cases("running_mean", BATCH_NORM),
    *_per_channel_cases("running_var", BATCH_NORM),
    *_per_channel_cases("mean", BACKWARD),
    *_per_channel_cases("invstd", BACKWARD),
    ("mean-none", BACKWARD, lambda a, d: {"mean": None}, TypeError, r"^mean must be a numpy.ndarray"),
    ("invstd-none", BACKWARD, lambda a, d: {"invstd": None}, TypeError, r"^invstd must be a numpy.ndarray"),
    # running statistics
    ("running-stats-missing-in-eval", ("batch_norm(training=False)",),
     lambda a, d: {"running_mean": None, "running_var": None}, ValueError,
     r"^running_mean and running_var are required when training=False"),
    ("running-mean-missing-in-eval", ("batch_norm(training=False)",),
     lambda a, d: {"running_mean": None}, ValueError, r"^running_mean and running_var are required"),
    ("running-var-missing-in-eval", ("batch_norm(training=False)",),
     lambda a, d: {"running_var": None}, ValueError, r"^running_mean and running_var are required"),
    ("running-mean-alone-in-training", ("batch_norm(training=True)",),
     lambda a, d: {"running_var": None}, ValueError, r"^running_mean and running_var must be given together"),
    ("running-var-alone-in-training", ("batch_norm(training=True)",),
     lambda a, d: {"running_mean": None}, ValueError, r"^running_mean and running_var must be given together"),
    ("running-mean-read-only-in-training", ("batch_norm(training=True)",),
     lambda a, d: {"running_mean": _read_only(a["running_mean"])}, ValueError,
     r"^running_mean is read-only, but training updates it in place"),
    ("running-var-read-only-in-training", ("batch_norm(training=True)",),
     lambda a, d: {"running_var": _read_only(a["running_var"])}, ValueError,
     r"^running_var is read-only, but training updates it in place"),
    # one value (or none) per channel in training
    ("one-value-(1,C)", TRAINING, _one_value_per_channel((1, CHANNELS)), ValueError, ONE_VALUE),
    ("one-value-(1,C,1)", TRAINING, _one_value_per_channel((1, CHANNELS, 1)), ValueError, ONE_VALUE),
    ("one-value-(1,C,1,1)", TRAINING, _one_value_per_channel((1, CHANNELS, 1, 1)), ValueError, ONE_VALUE),
    ("one-value-(1,C)-axis=-1", TRAINING, _one_value_per_channel((1, CHANNELS), axis=-1), ValueError, ONE_VALUE),
    ("one-value-(C,1)-axis=0", TRAINING, _one_value_per_channel((CHANNELS, 1), axis=0), ValueError, ONE_VALUE),
    ("no-value-(0,C)", TRAINING, _one_value_per_channel((0, CHANNELS)), ValueError, ONE_VALUE),
    ("no-value-(2,C,0)", TRAINING, _one_value_per_channel((2, CHANNELS, 0)), ValueError, ONE_VALUE),
    # out
    ("out-list", FORWARD, lambda a, d: {"out": a["out"].tolist()}, TypeError, r"^out must be a numpy.ndarray"),
    ("out-python-scalar", FORWARD, lambda a, d: {"out": 0.0}, TypeError, r"^out must be a numpy.ndarray"),
    ("out-other-float-dtype", FORWARD, lambda a, d: {"out": np.full(SHAPE, 7.0, _other_float(d))}, TypeError,
     r"^out must have the input's dtype"),
    ("out-int", FORWARD, lambda a, d: {"out": np.full(SHAPE, 7, np.int64)}, TypeError,
     r"^out must have the input's dtype"),
    ("out-byte-swapped", FORWARD,
     lambda a, d: {"out": a["out"].astype(np.dtype(d).newbyteorder("S"))}, TypeError,
     r"^out must have the input's dtype"),
    ("out-wrong-shape", FORWARD, lambda a, d: {"out": np.full((4, CHANNELS, 6), 7.0, d)}, ValueError,
     r"^out must have the input's shape"),
    ("out-transposed-shape", FORWARD, lambda a, d: {"out": np.full(SHAPE[::-1], 7.0, d)}, ValueError,
     r"^out must have the input's shape"),
    ("out-fortran-order", FORWARD, lambda a, d: {"out": np.asfortranarray(a["out"])}, ValueError,
     r"^out must be C-contiguous"),
    ("out-strided", FORWARD, lambda a, d: {"out": np.full((4, CHANNELS, 10), 7.0, d)[..., ::2]}, ValueError,
     r"^out must be C-contiguous"),
    ("out-unaligned", FORWARD, lambda a, d: {"out": _unaligned(a["out"])}, ValueError,
     r"^out must be C-contiguous and aligned"),
    ("out-read-only", FORWARD, lambda a, d: {"out": _read_only(a["out"])}, ValueError, r"^out is read-only"),
    # grad_out
    ("grad_out-list", BACKWARD, lambda a, d: {"grad_out": a["grad_out"].tolist()}, TypeError,
     r"^grad_out must be a numpy.ndarray"),
    ("grad_out-none", BACKWARD, lambda a, d: {"grad_out": None}, TypeError, r"^grad_out must be a numpy.ndarray"),
    ("grad_out-int", BACKWARD, lambda a, d: {"grad_out": np.ones(SHAPE, np.int64)}, TypeError,
     r"^grad_out must have dtype float32 or float64"),
    ("grad_out-other-float-dtype", BACKWARD, lambda a, d: {"grad_out": np.ones(SHAPE, _other_float(d))},
     TypeError, r"^grad_out must have the input's dtype"),
    ("grad_out-wrong-shape", BACKWARD, lambda a, d: {"grad_out": np.ones((4, CHANNELS, 6), d)}, ValueError,
     r"^grad_out must have the input's shape"),
    ("grad_out-transposed-shape", BACKWARD, lambda a, d: {"grad_out": np.ones(SHAPE[::-1], d)}, ValueError,
     r"^grad_out must have the input's shape"),
    ("grad_out-extra-axis", BACKWARD, lambda a, d: {"grad_out": np.ones((1,) + SHAPE, d)}, ValueError,
     r"^grad_out must have the input's shape"),
]


def _params():
    params = []
    for case_id, functions, change, exception, match in CASES:
        for function in functions:
            for dtype in DTYPES:
                params.append(
                    pytest.param(
                        function, dtype, change, exception, match,
                        id=f"{case_id}-{function}-{np.dtype(dtype).name}",
                    )
                )
    return params


def _snapshot(arguments):
    """Copies of every ndarray argument, byte for byte."""
    return {
        name: (value.dtype, value.shape, np.ascontiguousarray(value).tobytes())
        for name, value in arguments.items()
        if isinstance(value, np.ndarray)
    }


@pytest.mark.parametrize(("function", "dtype", "change", "exception", "match"), _params())
def test_bad_input_is_rejected_and_nothing_is_modified(function, dtype, change, exception, match):
    arguments = _valid_arguments(function, dtype)
    arguments.update(change(arguments, dtype))
    before = _snapshot(arguments)

    with pytest.raises(exception, match=match):
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
