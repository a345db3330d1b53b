"""The functional API against the float64 reference (tests/reference.py).

Every layout of conftest.ALL_CASES (dtype x shape x axis x memory order) is run through
``batch_norm_train``, ``batch_norm`` in training and eval mode, and ``batch_norm_backward``
in both modes; test ids name all four. Two property tests draw layouts at random: small
ones of any rank, axis, memory order and magnitude, and large ones (20K to 400K values) as
the kernels plan them, at any offset from a cache line. Then the array-handling contract:
``out=``, in-place operation, optional affine parameters, untouched and read-only inputs,
byte-swapped and unaligned input, and channels whose variance is zero.

Tolerances are ``factor * (eps * scale + tiny)`` (conftest.assert_close; tiny, the smallest
subnormal, for results below the normal range):
- elementwise outputs (y, grad_x): FORWARD_FACTOR, relative to the largest value: each
  value is a handful of rounded operations (subtract, multiply, add) on rounded constants;
- per-channel statistics (mean, invstd, running stats): STATISTIC_FACTOR, relative to
  their own size (rounded once or twice to the dtype) plus the typical error of a float64
  sum of M terms, sqrt(M) * eps(float64), relative to mean|x| (conftest.accumulation);
- per-channel sums (grad_weight, grad_bias): SUM_FACTOR, relative to the sum of the
  absolute values of the terms, the condition of a sum.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbn
from fastbn._core import _may_share_memory
import reference
from conftest import (
    ALL_CASES,
    DENSE_ORDERS,
    DTYPES,
    ORDERS,
    Case,
    accumulation,
    assert_close,
    assert_laid_out_for,
    assert_same_values,
    assert_unchanged,
    cases,
    grad_x_terms,
    in_order,
    snapshot,
)

FORWARD_FACTOR = 8
STATISTIC_FACTOR = 4
SUM_FACTOR = 8
EPS = 1e-5
MOMENTUM = 0.3


def check_batch_statistics(case, x, mean, invstd, eps=EPS):
    """mean and invstd as batch_norm_train returns them: rounded to x's dtype once (relative
    to their own size), after a float64 accumulation (relative to mean|x| for the mean)."""
    expected_mean, expected_var, count = reference.batch_moments(x, case.axis)
    expected_invstd = 1.0 / np.sqrt(expected_var + eps)
    summation = accumulation(case.dtype, count)
    assert mean.dtype == invstd.dtype == case.dtype
    assert mean.shape == invstd.shape == (case.channels,)
    magnitude = np.abs(reference.as_channel_rows(x, case.axis)).mean(axis=1)
    assert_close(
        mean,
        expected_mean,
        factor=STATISTIC_FACTOR,
        scale=np.abs(expected_mean) + summation * magnitude,
        what=f"mean {case.id}",
    )
    assert_close(
        invstd,
        expected_invstd,
        factor=STATISTIC_FACTOR,
        scale=expected_invstd * (1 + summation),
        what=f"invstd {case.id}",
    )


def check_running_stats(case, x, running_mean, running_var, old_mean, old_var, momentum):
    """The running statistics after one training step against the reference rule."""
    expected_mean, expected_var = reference.updated_running_stats(
        x, old_mean, old_var, momentum=momentum, axis=case.axis
    )
    batch_mean, _, count = reference.batch_moments(x, case.axis)
    summation = accumulation(case.dtype, count)
    magnitude = np.abs(reference.as_channel_rows(x, case.axis)).mean(axis=1)
    assert running_mean.dtype.type == running_var.dtype.type == np.dtype(case.dtype).type
    assert_close(
        running_mean,
        expected_mean,
        factor=STATISTIC_FACTOR,
        scale=np.abs(expected_mean)
        + (1 - momentum) * np.abs(old_mean.astype(np.float64))
        + momentum * (np.abs(batch_mean) + summation * magnitude),
        what=f"running_mean {case.id}",
    )
    # tiny: a variance below the smallest normal number is stored with an absolute error
    # of up to half the smallest subnormal, eps * tiny / 2.
    assert_close(
        running_var,
        expected_var,
        factor=STATISTIC_FACTOR,
        scale=expected_var * (1 + summation) + np.finfo(case.dtype).tiny,
        what=f"running_var {case.id}",
    )


def check_moments(case, x):
    """fastbn.moments against the reference: count exact; mean and m2 in float64, the mean
    within the rounding of a float64 sum of M terms (relative to mean|x|), m2 within the
    same relative to m2 times 1 + |mean| / std, the condition number of the variance."""
    expected_mean, expected_var, count = reference.batch_moments(x, case.axis)
    expected_m2 = expected_var * count
    got = fastbn.moments(x, axis=case.axis)
    for name in ("count", "mean", "m2"):
        value = getattr(got, name)
        assert value.dtype == np.float64 and value.shape == (case.channels,), name
    np.testing.assert_array_equal(got.count, float(count), err_msg=f"count {case.id}")
    summation = 1 + accumulation(np.float64, count)
    magnitude = np.abs(reference.as_channel_rows(x, case.axis)).mean(axis=1)
    assert_close(
        got.mean,
        expected_mean,
        factor=STATISTIC_FACTOR,
        scale=np.abs(expected_mean) + summation * magnitude,
        what=f"moments mean {case.id}",
    )
    condition_times_m2 = expected_m2 + np.sqrt(expected_m2 * count) * np.abs(expected_mean)
    assert_close(
        got.m2,
        expected_m2,
        factor=STATISTIC_FACTOR,
        scale=summation * condition_times_m2,
        what=f"moments m2 {case.id}",
    )


def check_y(case, y, expected, what="y", scale=None):
    """An elementwise output: x's shape and dtype, laid out as x where x fills one block of
    memory (else C order), within FORWARD_FACTOR ulps of the largest value (or of
    ``scale``)."""
    assert y.dtype == case.dtype, f"{what}: dtype {y.dtype}"
    assert_laid_out_for(y, case, what)
    assert_close(y, expected, factor=FORWARD_FACTOR, scale=scale, what=f"{what} {case.id}")


def check_train_y(case, y, x, weight=None, bias=None, eps=EPS, what="y"):
    """y normalized with x's batch statistics, against the reference. Besides the largest
    value, its scale has the batch mean's own rounding, carried into y: the statistics are
    accurate to about (|mean| / std) * eps(float64) (README: Numerics), which matters for
    float64 data whose |mean| / std is large, such as a channel of a few close values."""
    expected, mean, invstd = reference.forward_train(x, weight, bias, eps=eps, axis=case.axis)
    gain = np.abs(mean * invstd) * (1.0 if weight is None else np.abs(weight.astype(np.float64)))
    mean_rounding = np.finfo(np.float64).eps / np.finfo(case.dtype).eps * float(np.max(gain))
    largest = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    check_y(case, y, expected, what, scale=largest + mean_rounding)


def _running_stats(case, rng):
    running_mean = case.per_channel(rng)
    running_var = rng.uniform(0.5, 2.0, case.channels).astype(case.dtype)
    return running_mean, running_var


def _eval_constants(case, rng):
    """What an eval-mode backward pass takes as mean and invstd: running_mean and
    1 / sqrt(running_var + eps), in x's dtype."""
    running_mean, running_var = _running_stats(case, rng)
    invstd = (1.0 / np.sqrt(running_var.astype(np.float64) + EPS)).astype(case.dtype)
    return running_mean, invstd


def _backward_inputs(case, rng):
    """x, grad_out, weight, and the batch mean/invstd (from the reference, in x's dtype)."""
    x = case.array(rng)
    grad_out = in_order(rng.standard_normal(case.shape).astype(case.dtype), case.order)
    weight = case.per_channel(rng)
    _, mean, invstd = reference.forward_train(x, eps=EPS, axis=case.axis)
    return x, grad_out, weight, mean.astype(case.dtype), invstd.astype(case.dtype)


def _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, training):
    """The three gradients against the reference, each relative to the size of its terms.

    grad_x = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) in training (terms
    that may cancel, and means that carry the rounding of their sums), weight * invstd * dy
    in eval; grad_weight and grad_bias are sums, whose rounding is relative to the sum of
    the absolute values of their terms.
    """
    grad_x, grad_weight, grad_bias = got
    expected_x, expected_weight, expected_bias = expected
    for name, value in (("grad_x", grad_x), ("grad_weight", grad_weight), ("grad_bias", grad_bias)):
        assert value.dtype == case.dtype, f"{name} has dtype {value.dtype}"
    assert_laid_out_for(grad_x, case, "grad_x")
    dy = reference.as_channel_rows(grad_out, case.axis)
    column = lambda per_channel: np.asarray(per_channel, dtype=np.float64)[:, None]  # noqa: E731
    xhat = (reference.as_channel_rows(x, case.axis) - column(mean)) * column(invstd)
    slope = np.abs(column(invstd) * (1.0 if weight is None else column(weight)))
    terms = grad_x_terms(dy, xhat, training)
    grad_x_scale = np.moveaxis(
        (slope * terms).reshape(np.moveaxis(x, case.axis, 0).shape), 0, case.axis
    )
    assert_close(
        grad_x, expected_x, factor=FORWARD_FACTOR, scale=grad_x_scale, what=f"grad_x {case.id}"
    )
    assert_close(
        grad_weight,
        expected_weight,
        factor=SUM_FACTOR,
        scale=np.abs(dy * xhat).sum(axis=1),
        what=f"grad_weight {case.id}",
    )
    assert_close(
        grad_bias,
        expected_bias,
        factor=SUM_FACTOR,
        scale=np.abs(dy).sum(axis=1),
        what=f"grad_bias {case.id}",
    )


# -------------------------------------------------------------- against the reference


@pytest.mark.parametrize("case", ALL_CASES)
def test_batch_norm_train_matches_reference(case, rng):
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, eps=EPS, axis=case.axis)

    check_train_y(case, y, x, weight, bias)
    check_batch_statistics(case, x, mean, invstd)


@pytest.mark.parametrize("case", ALL_CASES)
def test_batch_norm_training_matches_reference_and_updates_running_stats(case, rng):
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    old_mean, old_var = running_mean.copy(), running_var.copy()

    y = fastbn.batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training=True,
        momentum=MOMENTUM,
        eps=EPS,
        axis=case.axis,
    )

    check_train_y(case, y, x, weight, bias)
    check_running_stats(case, x, running_mean, running_var, old_mean, old_var, MOMENTUM)


@pytest.mark.parametrize("case", ALL_CASES)
def test_batch_norm_eval_matches_reference(case, rng):
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    before = snapshot(running_mean, running_var)

    y = fastbn.batch_norm(
        x, running_mean, running_var, weight, bias, training=False, eps=EPS, axis=case.axis
    )

    expected = reference.forward_eval(
        x, running_mean, running_var, weight, bias, eps=EPS, axis=case.axis
    )
    check_y(case, y, expected)
    assert_unchanged(before, [running_mean, running_var], ["running_mean", "running_var"])


@pytest.mark.parametrize("case", ALL_CASES)
def test_backward_training_matches_reference(case, rng):
    x, grad_out, weight, mean, invstd = _backward_inputs(case, rng)

    got = fastbn.batch_norm_backward(
        grad_out, x, mean, invstd, weight, training=True, axis=case.axis
    )

    expected = reference.backward_train(grad_out, x, mean, invstd, weight, axis=case.axis)
    _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, True)


#: A channel's grad_out and x of 3 MB (float32) or more, larger than any core's L2 cache, in
#: runs of 256 KiB: the training backward goes a channel at a time all the same, reading it
#: again from L3 (csrc/plan.c), on one thread or several (4 channels: 2 per thread).
LARGE_CHANNELS = cases((((6, 4, 65536), 1),), orders=("C",))


@pytest.mark.parametrize("case", LARGE_CHANNELS)
@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-threads"])
def test_backward_of_channels_larger_than_l2_matches_reference(case, threads, rng,
                                                               restore_threads):
    fastbn.set_num_threads(threads)
    x, grad_out, weight, mean, invstd = _backward_inputs(case, rng)

    got = fastbn.batch_norm_backward(
        grad_out, x, mean, invstd, weight, training=True, axis=case.axis
    )

    expected = reference.backward_train(grad_out, x, mean, invstd, weight, axis=case.axis)
    _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, True)


@pytest.mark.parametrize("case", ALL_CASES)
def test_backward_eval_matches_reference(case, rng):
    x, grad_out, weight, _, _ = _backward_inputs(case, rng)
    running_mean, invstd = _eval_constants(case, rng)

    got = fastbn.batch_norm_backward(
        grad_out, x, running_mean, invstd, weight, training=False, axis=case.axis
    )

    expected = reference.backward_eval(grad_out, x, running_mean, invstd, weight, axis=case.axis)
    _assert_gradients_match(case, got, expected, grad_out, x, running_mean, invstd, weight, False)


@st.composite
def _random_cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:  # training needs two values per channel
        shape[(axis + 1) % ndim] = 2
    dtype = draw(st.sampled_from(DTYPES))
    order = draw(st.sampled_from(ORDERS))
    return Case(dtype, tuple(shape), axis, order)


#: Value magnitudes of the property test: 10**k, k from -30 to 30. Every value stays finite
#: in both dtypes; for float32, the variance of data above ~1e19 is not (see
#: test_reliability.py's overflow test), and below ~1e-19 it is subnormal or 0.
LOG10_MAGNITUDES = st.floats(-30.0, 30.0)

def _scaled_running_stats(case, rng, magnitude):
    """Running statistics for data of this magnitude: mean ~ magnitude, variance ~
    magnitude**2, capped below the dtype's largest value (rounded to 0 when it underflows)."""
    running_mean = (case.per_channel(rng).astype(np.float64) * magnitude).astype(case.dtype)
    variance = rng.uniform(0.5, 2.0, case.channels) * magnitude**2
    running_var = np.minimum(variance, np.finfo(case.dtype).max / 4).astype(case.dtype)
    return running_mean, running_var


@given(
    case=_random_cases(),
    seed=st.integers(0, 2**32 - 1),
    affine=st.booleans(),
    log10_magnitude=LOG10_MAGNITUDES,
)
def test_random_layouts_match_reference(case, seed, affine, log10_magnitude):
    """Any rank, any axis, any small size (size-1 axes too), any memory order, either dtype,
    values of any magnitude from 1e-30 to 1e30: every function in every mode, and moments.

    grad_out stays of order 1: the gradients scale with 1 / magnitude, and their products
    with magnitude-sized values would leave float32's range for reasons of the test's own.
    """
    rng = np.random.default_rng(seed)
    magnitude = 10.0**log10_magnitude
    channels = case.channels
    x = case.array(
        rng,
        loc=rng.uniform(-3.0, 3.0, channels) * magnitude,
        scale=rng.uniform(0.5, 2.0, channels) * magnitude,
    )
    assert np.all(np.isfinite(x))
    weight = case.per_channel(rng) if affine else None
    bias = case.per_channel(rng) if affine else None
    running_mean, running_var = _scaled_running_stats(case, rng, magnitude)
    grad_out = in_order(rng.standard_normal(case.shape).astype(case.dtype), case.order)
    _check_everything(case, x, weight, bias, running_mean, running_var, grad_out)

    old_mean, old_var = running_mean.copy(), running_var.copy()
    _, expected_var = reference.updated_running_stats(
        x, old_mean, old_var, momentum=MOMENTUM, axis=case.axis
    )
    if np.max(expected_var) > np.finfo(case.dtype).max:
        return  # the updated running variance overflows the dtype: test_reliability.py
    y = fastbn.batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training=True,
        momentum=MOMENTUM,
        axis=case.axis,
    )
    check_train_y(case, y, x, weight, bias)
    check_running_stats(case, x, running_mean, running_var, old_mean, old_var, MOMENTUM)


@st.composite
def _large_cases(draw):
    """A layout of 20K to 400K values, C-contiguous, as the kernels plan for it: runs of
    any length along channels first ((N, C, inner): tiles, short runs spread over columns),
    rows ((N, C): blocks, chunks of wide rows, eval of few rows split by columns) or
    channels last ((A, B, C)), from one channel to 4096."""
    def log_uniform(low, high):  # integers spread evenly in log2, in tenths
        return round(2 ** (draw(st.integers(round(10 * low), round(10 * high))) / 10))

    values = log_uniform(14.3, 18.6)
    channels = min(log_uniform(0, 12), values // 2)
    layout = draw(st.sampled_from(["runs", "rows", "channels last"]))
    if layout == "runs":
        inner = min(log_uniform(0, 12), values // channels)
        outer = max(values // (channels * inner), 1 if inner > 1 else 2)
        shape, axis = (outer, channels, inner), 1
    elif layout == "rows":
        shape, axis = (values // channels, channels), 1
    else:
        positions, first = values // channels, draw(st.integers(1, 8))
        shape, axis = (first, -(-positions // first), channels), -1
    return Case(draw(st.sampled_from(DTYPES)), shape, axis, "C")


@settings(
    max_examples=max(settings().max_examples // 4, 10),
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # it only restores, at the end
)
@given(
    case=_large_cases(),
    seed=st.integers(0, 2**32 - 1),
    x_offset=st.integers(0, 63),
    grad_offset=st.integers(0, 63),
    one_thread=st.booleans(),
)
def test_random_large_layouts_match_reference(
    case, seed, x_offset, grad_offset, one_thread, restore_threads
):
    """The kernels' plans over random layouts large enough for threads (on one thread or
    all), tiles, spreading and blocks, with x and grad_out at any element of a cache line:
    every function in every mode, and moments."""
    rng = np.random.default_rng(seed)
    itemsize = np.dtype(case.dtype).itemsize
    fastbn.set_num_threads(1 if one_thread else None)
    x = _placed(case.array(rng), x_offset // itemsize * itemsize)
    grad_out = _placed(rng.standard_normal(case.shape).astype(case.dtype),
                       grad_offset // itemsize * itemsize)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    _check_everything(case, x, weight, bias, running_mean, running_var, grad_out)


# ------------------------------------------------------------- parameters and modes

SOME_CASES = cases((((3, 4, 5), 1), ((6, 5), 1), ((2, 3, 4, 5), -1)), orders=("C",))


@pytest.mark.parametrize("case", SOME_CASES)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_weight_and_bias_are_optional(case, with_weight, with_bias, rng):
    """None means weight 1 and bias 0, in every function."""
    x = case.array(rng)
    weight = case.per_channel(rng) if with_weight else None
    bias = case.per_channel(rng) if with_bias else None
    running_mean, running_var = _running_stats(case, rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    _check_everything(case, x, weight, bias, running_mean, running_var, grad_out)


@pytest.mark.parametrize("case", SOME_CASES)
def test_training_without_running_stats(case, rng):
    """training=True with running_mean = running_var = None just normalizes."""
    x = case.array(rng)
    y = fastbn.batch_norm(x, None, None, training=True, axis=case.axis)
    check_train_y(case, y, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5])
def test_momentum_limits(dtype, momentum, rng):
    """momentum=0 keeps the running stats; momentum=1 replaces them by the batch's."""
    case = Case(dtype, (7, 3, 2), 1, "C")
    x = case.array(rng)
    running_mean, running_var = _running_stats(case, rng)
    old_mean, old_var = running_mean.copy(), running_var.copy()

    fastbn.batch_norm(x, running_mean, running_var, training=True, momentum=momentum)

    if momentum == 0.0:
        np.testing.assert_array_equal(running_mean, old_mean)
        np.testing.assert_array_equal(running_var, old_var)
    check_running_stats(case, x, running_mean, running_var, old_mean, old_var, momentum)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_and_eval_backward_accept_one_value_per_channel(dtype, rng):
    """Only training needs more than one value per channel."""
    case = Case(dtype, (1, 4), 1, "C")
    x = case.array(rng)
    running_mean, running_var = _running_stats(case, rng)
    y = fastbn.batch_norm(x, running_mean, running_var, training=False)
    check_y(case, y, reference.forward_eval(x, running_mean, running_var))
    invstd = (1 / np.sqrt(running_var + EPS)).astype(dtype)
    grad_out = rng.standard_normal(x.shape).astype(dtype)
    got = fastbn.batch_norm_backward(grad_out, x, running_mean, invstd, training=False)
    expected = reference.backward_eval(grad_out, x, running_mean, invstd)
    _assert_gradients_match(case, got, expected, grad_out, x, running_mean, invstd, None, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 7, 33, 512])
@pytest.mark.parametrize("affine", [False, True])
def test_one_example_in_eval_is_its_row_of_a_batch_bit_for_bit(dtype, channels, affine, rng):
    """A single example takes its own short path through the eval kernel: it must give
    exactly what the same example gives within a batch, and match the reference."""
    case = Case(dtype, (5, channels), 1, "C")
    batch = case.array(rng)
    running_mean, running_var = _running_stats(case, rng)
    weight, bias = (case.per_channel(rng), case.per_channel(rng)) if affine else (None, None)
    batched = fastbn.batch_norm(batch, running_mean, running_var, weight, bias)
    for row in range(batch.shape[0]):
        one = fastbn.batch_norm(batch[row : row + 1], running_mean, running_var, weight, bias)
        assert_same_values(one, batched[row : row + 1], f"row {row}")
    check_y(case, batched, reference.forward_eval(batch, running_mean, running_var, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "layout", [((6, 3, 5), 1), ((9, 4), 1), ((2, 4, 4100), 1), ((4096, 3), 1)], ids=str
)
@pytest.mark.parametrize("values", [(2.5, -7.25), (0.1, -7.3)], ids=["dyadic", "non-dyadic"])
def test_constant_channels_give_bias(dtype, layout, values, rng):
    """A channel of equal values has variance 0: its output is finite and equal to bias.

    Exactly equal when the mean is computed exactly: always for float32 data (sums of float32
    in double are exact here) and for float64 values whose sums are exact (dyadic). Otherwise
    the mean may be off by the rounding of a sum of M terms, at most M * eps * |value|, and
    that error is amplified by weight * invstd = weight / sqrt(eps) in y.
    """
    shape, axis = layout
    case = Case(dtype, shape, axis, "C")
    x = case.array(rng)
    constant_channels = [0, 2]  # the others stay random
    for c, value in zip(constant_channels, values, strict=True):
        x[:, c] = value
    weight, bias = case.per_channel(rng), case.per_channel(rng)

    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, eps=EPS)
    y_running = fastbn.batch_norm(
        x,
        np.zeros(case.channels, dtype),
        np.ones(case.channels, dtype),
        weight,
        bias,
        training=True,
        eps=EPS,
    )

    exact = dtype == np.float32 or values == (2.5, -7.25)
    for output in (y, y_running):
        assert np.all(np.isfinite(output))
        for c, value in zip(constant_channels, values, strict=True):
            channel = output[:, c].astype(np.float64)
            if exact:
                np.testing.assert_array_equal(channel, bias[c], err_msg=f"channel {c}")
            else:
                mean_error = case.count * case.eps * abs(value)
                bound = abs(weight[c]) / np.sqrt(EPS) * mean_error + case.eps * abs(bias[c])
                assert np.max(np.abs(channel - bias[c])) <= bound, f"channel {c}"
    check_batch_statistics(case, x, mean, invstd)


# ------------------------------------------------------------------------- out=


def _call_forward(function, x, case, rng, out):
    """Runs one forward function with ``out``; returns (result, reference result).

    The reference is computed from a copy of x taken before the call, and with
    batch_norm(training=True) the running stats are checked too: they must come from x as it
    was, even when out overwrites x.
    """
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    original = x.copy()
    if function == "batch_norm_train":
        y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=case.axis, out=out)
        check_batch_statistics(case, original, mean, invstd)
        return y, reference.forward_train(original, weight, bias, axis=case.axis)[0]
    running_mean, running_var = _running_stats(case, rng)
    if function == "batch_norm(training=True)":
        old_mean, old_var = running_mean.copy(), running_var.copy()
        y = fastbn.batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training=True,
            momentum=MOMENTUM,
            axis=case.axis,
            out=out,
        )
        check_running_stats(case, original, running_mean, running_var, old_mean, old_var, MOMENTUM)
        return y, reference.forward_train(original, weight, bias, axis=case.axis)[0]
    y = fastbn.batch_norm(
        x, running_mean, running_var, weight, bias, training=False, axis=case.axis, out=out
    )
    return y, reference.forward_eval(
        original, running_mean, running_var, weight, bias, axis=case.axis
    )


FORWARD_FUNCTIONS = ["batch_norm_train", "batch_norm(training=True)", "batch_norm(training=False)"]
OUT_CASES = cases(
    (
        ((3, 4, 5), 1),
        ((5, 7), 1),
        ((32, 64, 8, 8), 1),
        ((2, 3, 40000), 1),
        ((4096, 256), 1),
        ((40000, 3), 1),
    ),
    orders=DENSE_ORDERS,
)


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("function", FORWARD_FUNCTIONS)
def test_out_receives_the_result(function, case, rng):
    """out laid out as x (here numpy.full_like: C order for C-ordered x, Fortran order for
    Fortran-ordered x, ...) receives the result."""
    x = case.array(rng)
    out = np.full_like(x, np.nan)
    y, expected = _call_forward(function, x, case, rng, out)
    assert y is out
    check_y(case, out, expected)


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("function", FORWARD_FUNCTIONS)
def test_out_may_be_x(function, case, rng):
    """out=x normalizes in place, with the statistics of x before it is overwritten."""
    x = case.array(rng)
    y, expected = _call_forward(function, x, case, rng, x)
    assert y is x
    check_y(case, x, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("function", FORWARD_FUNCTIONS)
def test_out_overlapping_x_gives_the_result_for_the_original_x(function, dtype, rng):
    """out one element past x in the same buffer: every x value is read before it is written."""
    case = Case(dtype, (6, 5, 3), 1, "C")
    buffer = case.array(rng).reshape(-1)
    buffer = np.concatenate([buffer, buffer[:1]])
    x = buffer[:-1].reshape(case.shape)
    out = buffer[1:].reshape(case.shape)
    y, expected = _call_forward(function, x, case, rng, out)
    assert y is out
    check_y(case, out, expected)


def _views_of_one_buffer():
    buffer = np.arange(48.0).reshape(6, 8)
    return {
        "same": buffer, "rows 1:": buffer[1:], "rows :3": buffer[:3], "rows 3:": buffer[3:],
        "even columns": buffer[:, ::2], "odd columns": buffer[:, 1::2],
        "reversed": buffer[::-1], "reversed, last 2 rows": buffer[::-1][4:],
        "transposed": buffer.T, "empty": buffer[:0], "other buffer": np.zeros((6, 8)),
    }


@pytest.mark.parametrize("second", list(_views_of_one_buffer()))
@pytest.mark.parametrize("first", list(_views_of_one_buffer()))
def test_overlap_check_agrees_with_numpy_may_share_memory(first, second):
    """The kernels' overlap test of out against the inputs (numpy's bounds test, without its
    call overhead) answers as numpy.may_share_memory, negative strides included."""
    views = _views_of_one_buffer()
    a, b = views[first], views[second]
    assert _may_share_memory(a, b) == np.may_share_memory(a, b)


def _call_backward(training, case, rng, arrange):
    """batch_norm_backward with out=: ``arrange(grad_out, x)`` returns the (grad_out, x, out)
    to pass, equal in value to the inputs it got. Checks grad_x against the reference of
    copies taken before the call; returns (grad_x, out)."""
    x, grad_out, weight, mean, invstd = _backward_inputs(case, rng)
    if not training:
        mean, invstd = _eval_constants(case, rng)
    original_x, original_grad_out = x.copy(), grad_out.copy()
    grad_out, x, out = arrange(grad_out, x)
    got = fastbn.batch_norm_backward(
        grad_out, x, mean, invstd, weight, training=training, axis=case.axis, out=out
    )
    backward = reference.backward_train if training else reference.backward_eval
    expected = backward(original_grad_out, original_x, mean, invstd, weight, axis=case.axis)
    _assert_gradients_match(
        case, got, expected, original_grad_out, original_x, mean, invstd, weight, training
    )
    return got[0], out


BACKWARD_OUT_CASES = cases(
    (((3, 4, 5), 1), ((32, 64, 8, 8), 1), ((600, 64, 3), 1), ((4096, 256), 1), ((40000, 3), 1),
     ((2000, 72), 1), ((300, 600), 1)),
    orders=DENSE_ORDERS,
)


@pytest.mark.parametrize("case", BACKWARD_OUT_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize(
    "arrange",
    [
        lambda grad_out, x: (grad_out, x, np.full_like(x, np.nan)),
        lambda grad_out, x: (grad_out, x, grad_out),
        lambda grad_out, x: (grad_out, x, x),
    ],
    ids=["new-array", "out=grad_out", "out=x"],
)
def test_backward_out_receives_grad_x_also_in_place(training, case, arrange, rng):
    """out= takes grad_x; out=grad_out and out=x work in place (every value is read before
    its place is written)."""
    grad_x, out = _call_backward(training, case, rng, arrange)
    assert grad_x is out


def _one_element_before_out(array):
    """A copy of ``array`` and an out array one element further on in the same buffer."""
    buffer = np.concatenate([array.reshape(-1), array.reshape(-1)[:1]])
    return buffer[:-1].reshape(array.shape), buffer[1:].reshape(array.shape)


def _out_overlapping_grad_out(grad_out, x):
    grad_out, out = _one_element_before_out(grad_out)
    return grad_out, x, out


def _out_overlapping_x(grad_out, x):
    x, out = _one_element_before_out(x)
    return grad_out, x, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("arrange", [_out_overlapping_grad_out, _out_overlapping_x])
def test_backward_out_overlapping_an_input_gives_the_result_for_the_original(
    dtype, training, arrange, rng
):
    """out one element past grad_out (or x) in the same buffer: the input is read as it was."""
    grad_x, out = _call_backward(training, Case(dtype, (6, 5, 3), 1, "C"), rng, arrange)
    assert grad_x is out


# ----------------------------------------------------------- what inputs may be


def _check_everything(case, x, weight, bias, running_mean, running_var, grad_out):
    """Calls every function (running stats in eval mode only, so they are not updated), and
    fastbn.moments, and checks each against the reference."""
    axis = case.axis
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis)
    check_train_y(case, y, x, weight, bias, what="batch_norm_train y")
    check_batch_statistics(case, x, mean, invstd)

    y = fastbn.batch_norm(x, None, None, weight, bias, training=True, axis=axis)
    check_train_y(case, y, x, weight, bias, what="training y")
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, axis=axis)
    expected_y = reference.forward_eval(x, running_mean, running_var, weight, bias, axis=axis)
    check_y(case, y, expected_y, "eval y")

    for training, backward in ((True, reference.backward_train), (False, reference.backward_eval)):
        got = fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight, training=training, axis=axis
        )
        expected = backward(grad_out, x, mean, invstd, weight, axis=axis)
        _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, training)

    check_moments(case, x)


INPUT_CASES = cases((((4, 3, 5), 1), ((7, 3), 1), ((2, 3, 4, 5), -1)))


@pytest.mark.parametrize("case", INPUT_CASES)
def test_inputs_are_not_modified(case, rng):
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    grad_out = in_order(rng.standard_normal(case.shape).astype(case.dtype), case.order)
    arrays = [x, weight, bias, running_mean, running_var, grad_out]
    names = ["x", "weight", "bias", "running_mean", "running_var", "grad_out"]
    before = snapshot(*arrays)

    _, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=case.axis)
    stats_before = snapshot(mean, invstd)
    fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=False, axis=case.axis)
    fastbn.batch_norm(x, None, None, weight, bias, training=True, axis=case.axis)
    for training in (True, False):
        fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight, training=training, axis=case.axis
        )

    assert_unchanged(before, arrays, names)
    assert_unchanged(stats_before, [mean, invstd], ["mean", "invstd"])


def _make_read_only(*arrays):
    for array in arrays:
        array.flags.writeable = False
    return arrays


@pytest.mark.parametrize(
    "case", cases((((4, 3, 5), 1), ((7, 3), 1), ((32, 64, 8, 8), 1)), orders=("C", "F"))
)
def test_read_only_inputs_are_accepted(case, rng):
    """x, weight, bias, grad_out, mean, invstd, and running stats in eval, may be read-only."""
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    _make_read_only(x, weight, bias, running_mean, running_var, grad_out)
    _check_everything(case, x, weight, bias, running_mean, running_var, grad_out)

    _, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=case.axis)
    mean, invstd = _make_read_only(mean, invstd)
    got = fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight, axis=case.axis)
    expected = reference.backward_train(grad_out, x, mean, invstd, weight, axis=case.axis)
    _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, True)


def _byte_swapped(array):
    swapped = array.astype(array.dtype.newbyteorder("S"))
    assert not swapped.dtype.isnative
    return swapped


def _unaligned(array):
    """A copy of ``array`` at an odd byte offset, in the same memory order (C or F)."""
    order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    raw = np.zeros(array.nbytes + 1, dtype=np.uint8)
    view = raw[1:].view(array.dtype).reshape(array.shape, order=order)
    view[...] = array
    assert not view.flags.aligned
    return view


TRANSFORMS = pytest.mark.parametrize(
    "transform", [_byte_swapped, _unaligned], ids=["byte-swapped", "unaligned"]
)


@pytest.mark.parametrize(
    "case",
    cases(
        (((4, 3, 5), 1), ((9, 3), 1), ((2, 3, 4100), 1), ((8, 16, 16, 32), -1)),
        orders=("C", "F"),
    ),
)
@TRANSFORMS
def test_byte_swapped_and_unaligned_inputs(case, transform, rng):
    """Every array argument byte-swapped (or at an odd address) gives the native answer."""
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    x, weight, bias, running_mean, running_var, grad_out = (
        transform(a) for a in (x, weight, bias, running_mean, running_var, grad_out)
    )
    _check_everything(case, x, weight, bias, running_mean, running_var, grad_out)


@pytest.mark.parametrize("dtype", DTYPES)
@TRANSFORMS
def test_byte_swapped_and_unaligned_running_stats_are_updated(dtype, transform, rng):
    case = Case(dtype, (6, 3, 4), 1, "C")
    x = case.array(rng)
    old_mean, old_var = _running_stats(case, rng)
    running_mean, running_var = transform(old_mean), transform(old_var)

    fastbn.batch_norm(x, running_mean, running_var, training=True, momentum=MOMENTUM)

    check_running_stats(case, x, running_mean, running_var, old_mean, old_var, MOMENTUM)


def _placed(array, offset):
    """A C-contiguous copy of ``array`` starting ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(array.nbytes + 128, dtype=np.uint8)
    start = -raw.ctypes.data % 64 + offset
    view = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    view[...] = array
    return view


def _every_result(x, grad_out, weight, bias, running_mean, running_var, axis):
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=axis)
    eval_y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, axis=axis)
    gradients = [
        fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight, training=training,
                                   axis=axis)
        for training in (True, False)
    ]
    return [y, mean, invstd, eval_y, *(g for grads in gradients for g in grads)]


@pytest.mark.parametrize(
    "case",
    cases(
        (((96, 1024), 1), ((256, 1024), 1), ((64, 640), 1), ((80, 256), 1), ((512, 128), 1),
         ((24, 64, 9), 1), ((1024, 1024), 1), ((16, 4096), 1), ((16386, 8), 1), ((3000, 3), 1)),
        orders=("C",),
    ),
)
def test_where_an_array_starts_in_its_cache_line_changes_nothing(case, rng):
    """Rows of 2 KiB or more start their passes at x's first 64-byte boundary (NumPy's
    arrays start 16 bytes past one), and the normalize pass and the backward's sums do
    from 1 KiB ((80, 256) float32, (512, 128) float64): the results are bit for bit those
    of an aligned x, at every element offset, on rows by position ((1024, 1024)), on tiles
    of columns (the backward by channel of (96, 1024), (256, 1024) and (16, 4096), whose
    tiles after the first then start on a line of x) and on short runs seen as rows
    ((24, 64, 9)), and eval by columns ((16, 4096)). The normalize pass computes every
    value with the same operations wherever x starts (on AVX-512 CPUs row by row from a
    lead, or whole rows as one flat run, as for narrow rows seen as wide ones: (16386, 8),
    whose second thread starts mid wide row, and (3000, 3)), so y is bit for bit too.
    grad_out may start at another offset than x (in float64 on AVX-512 CPUs the
    backward's sums then join each vector of grad_out from the whole lines it straddles):
    bit for bit too."""
    x = case.array(rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    per_channel = (weight, bias, running_mean, running_var)
    aligned = _every_result(_placed(x, 0), _placed(grad_out, 0), *per_channel, case.axis)
    check_train_y(case, aligned[0], x, weight, bias)
    itemsize = np.dtype(case.dtype).itemsize
    offsets = range(itemsize, 64, itemsize)
    pairs = [(o, o) for o in offsets] + [(0, o) for o in offsets] + [(o, 0) for o in offsets]
    for x_offset, grad_offset in pairs:
        placed = _every_result(_placed(x, x_offset), _placed(grad_out, grad_offset),
                               *per_channel, case.axis)
        for got, expected in zip(placed, aligned):
            np.testing.assert_array_equal(
                got, expected, err_msg=f"x at offset {x_offset}, grad_out at {grad_offset}"
            )


@pytest.mark.parametrize(
    "case",
    cases(
        (((256, 256), 1), ((4096, 8), 1), ((512, 96), 1), ((4, 24, 70), 1), ((3, 10, 8, 10), 1)),
        orders=("C",),
    ),
)
def test_where_out_starts_after_x_changes_nothing(case, rng):
    """Where out starts 48 to 191 bytes after x modulo 4096, the normalize pass walks
    backward (walked forward, the loads of x would wait on the stores to out with the same
    low address bits): whole rows as one run, or runs along H*W each from its end, the
    channels from the last. So does the backward's grad_x pass, where grad_x starts so after
    x or grad_out. y and grad_x are bit for bit those of a new array at every distance, for
    x (and grad_out) on a cache line and past one, in training and in eval."""
    x = case.array(rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    running_mean, running_var = _running_stats(case, rng)
    train, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=case.axis)
    evaluated = fastbn.batch_norm(x, running_mean, running_var, weight, bias, axis=case.axis)
    grad_x = fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight, axis=case.axis)[0]
    itemsize = np.dtype(case.dtype).itemsize
    gap = -x.nbytes % 4096  # each array starts at x's offset in a page; out, a distance on
    raw = np.empty(4096 + 3 * (x.nbytes + gap) + 512, dtype=np.uint8)
    for x_offset in (0, 16):
        start = -raw.ctypes.data % 4096 + x_offset
        placed = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
        placed[...] = x
        grad_start = start + x.nbytes + gap
        placed_grad = raw[grad_start:grad_start + x.nbytes].view(x.dtype).reshape(x.shape)
        placed_grad[...] = grad_out
        for distance in range(0, 256, itemsize):
            at = grad_start + x.nbytes + gap + distance
            out = raw[at:at + x.nbytes].view(x.dtype).reshape(x.shape)
            fastbn.batch_norm_train(placed, weight, bias, axis=case.axis, out=out)
            np.testing.assert_array_equal(out, train, err_msg=f"train, distance {distance}")
            fastbn.batch_norm(placed, running_mean, running_var, weight, bias, axis=case.axis,
                              out=out)
            np.testing.assert_array_equal(out, evaluated, err_msg=f"eval, distance {distance}")
            fastbn.batch_norm_backward(placed_grad, placed, mean, invstd, weight,
                                       axis=case.axis, out=out)
            np.testing.assert_array_equal(out, grad_x, err_msg=f"backward, distance {distance}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_per_channel_arrays(dtype, rng):
    """weight, bias, running stats, mean and invstd that are views with a step are read
    right, and running stats written right."""
    case = Case(dtype, (5, 4, 3), 1, "C")
    x = case.array(rng)

    def strided(values):
        wide = np.zeros(2 * len(values), dtype=dtype)
        wide[::2] = values
        return wide[::2]

    weight, bias = strided(case.per_channel(rng)), strided(case.per_channel(rng))
    running_mean, running_var = (strided(a) for a in _running_stats(case, rng))
    grad_out = rng.standard_normal(case.shape).astype(dtype)
    _check_everything(case, x, weight, bias, running_mean, running_var, grad_out)

    _, mean, invstd = fastbn.batch_norm_train(x, weight, bias)
    mean, invstd = strided(mean), strided(invstd)
    got = fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight)
    expected = reference.backward_train(grad_out, x, mean, invstd, weight)
    _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, True)

    old_mean, old_var = running_mean.copy(), running_var.copy()
    fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=MOMENTUM)
    check_running_stats(case, x, running_mean, running_var, old_mean, old_var, MOMENTUM)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    cases((((32, 128, 32, 32), 1), ((32, 32, 32, 128), -1), ((262144, 16), 1)), orders=("C",)),
)
def test_very_large_inputs_match_reference(case, rng):
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    y, mean, invstd = fastbn.batch_norm_train(x, weight, bias, axis=case.axis)
    check_train_y(case, y, x, weight, bias)
    check_batch_statistics(case, x, mean, invstd)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    got = fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight, axis=case.axis)
    expected = reference.backward_train(grad_out, x, mean, invstd, weight, axis=case.axis)
    _assert_gradients_match(case, got, expected, grad_out, x, mean, invstd, weight, True)
