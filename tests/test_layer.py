"""fastbn.BatchNorm and fastbn.fold, against a float64 NumPy reference and torch.nn.BatchNorm*d.

The reference below is written from the maths in DESIGN.md (PyTorch's rules), independently
of the layer: statistics per channel over every axis but the channel axis, unbiased variance
in the running average, eval with the running statistics.
"""

import copy
import pickle
import sys
import threading

import numpy as np
import pytest

from conftest import run_threads
from fastbn._core import batch_norm as functional_batch_norm
from fastbn.layer import BatchNorm, fold

DTYPES = [np.float32, np.float64]

# (shape of one batch with N = 1, axis): (N, C), (N, C, L), NCHW, NCDHW, channels-last.
LAYOUTS = [
    ((1, 5), 1),
    ((1, 4, 7), 1),
    ((1, 3, 4, 5), 1),
    ((1, 2, 3, 2, 4), 1),
    ((1, 4, 5, 3), -1),
]
LAYOUT_IDS = ["NC", "NCL", "NCHW", "NCDHW", "NHWC"]


def tolerance(dtype):
    eps = np.finfo(dtype).eps
    return {"rtol": 300 * eps, "atol": 300 * eps}


def batch(rng, example_shape, n, dtype, loc=0.5, scale=2.0):
    """n examples of shape example_shape[1:], with channels of different means and scales."""
    shape = (n,) + tuple(example_shape[1:])
    return (rng.normal(loc, scale, shape) * rng.uniform(0.5, 2.0)).astype(dtype)


# ----------------------------------------------------------------- the reference


def per_channel(a, axis):
    """a as a float64 (values, channels) matrix."""
    moved = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def broadcast(values, x, axis):
    """Per-channel values shaped to broadcast against x."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.asarray(values, np.float64).reshape(shape)


def ref_batch_moments(x, axis):
    flat = per_channel(x, axis)
    return flat.mean(axis=0), flat.var(axis=0), flat.shape[0]


def ref_normalize(x, mean, var, weight, bias, eps, axis):
    x64 = np.asarray(x, np.float64)
    y = (x64 - broadcast(mean, x, axis)) / np.sqrt(broadcast(var, x, axis) + eps)
    if weight is not None:
        y = y * broadcast(weight, x, axis) + broadcast(bias, x, axis)
    return y


class ReferenceBatchNorm:
    """PyTorch's BatchNorm rules in float64 NumPy."""

    def __init__(self, channels, eps=1e-5, momentum=0.1, affine=True, track=True):
        self.eps, self.momentum = eps, momentum
        self.weight = np.ones(channels) if affine else None
        self.bias = np.zeros(channels) if affine else None
        self.running_mean = np.zeros(channels) if track else None
        self.running_var = np.ones(channels) if track else None
        self.num_batches_tracked = 0

    def forward(self, x, axis, training):
        if training or self.running_mean is None:
            mean, var, count = ref_batch_moments(x, axis)
            if training and self.running_mean is not None:
                self.num_batches_tracked += 1
                factor = 1 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean = (1 - factor) * self.running_mean + factor * mean
                self.running_var = (1 - factor) * self.running_var + factor * var * count / (count - 1)
            return ref_normalize(x, mean, var, self.weight, self.bias, self.eps, axis)
        return ref_normalize(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.eps, axis)


def ref_backward(grad_out, x, weight, eps, axis, mean=None, var=None):
    """(grad_x, grad_weight, grad_bias); batch statistics when mean/var are None."""
    training = mean is None
    if training:
        mean, var, _ = ref_batch_moments(x, axis)
    count = per_channel(x, axis).shape[0]
    invstd = 1 / np.sqrt(np.asarray(var, np.float64) + eps)
    xhat = (np.asarray(x, np.float64) - broadcast(mean, x, axis)) * broadcast(invstd, x, axis)
    dy = np.asarray(grad_out, np.float64)
    grad_bias = per_channel(dy, axis).sum(axis=0)
    grad_weight = per_channel(dy * xhat, axis).sum(axis=0)
    w = np.ones_like(invstd) if weight is None else np.asarray(weight, np.float64)
    if training:
        grad_x = broadcast(w * invstd / count, x, axis) * (
            count * dy - broadcast(grad_bias, x, axis) - xhat * broadcast(grad_weight, x, axis)
        )
    else:
        grad_x = dy * broadcast(w * invstd, x, axis)
    return grad_x, grad_weight, grad_bias


def trained_layer(rng, channels=6, steps=(4, 9, 2), dtype=np.float32, **options):
    """A layer after a few training steps on (N, channels) batches, and those batches."""
    bn = BatchNorm(channels, dtype=dtype, **options)
    batches = [batch(rng, (1, channels), n, dtype) for n in steps]
    for x in batches:
        bn(x)
    return bn, batches


def snapshot(bn):
    """Everything observable about a layer's state, copied."""
    arrays = {name: None if getattr(bn, name) is None else np.array(getattr(bn, name))
              for name in ("weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked", "grad_weight", "grad_bias")}
    return arrays, bn.training


def assert_same_state(bn, expected):
    arrays, training = snapshot(bn)
    assert training == expected[1]
    for name, value in expected[0].items():
        if value is None:
            assert arrays[name] is None, name
        else:
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)


@pytest.fixture
def rng():
    return np.random.default_rng(20240603)


# ------------------------------------------------------------------ construction


def test_initial_state_is_pytorchs():
    bn = BatchNorm(4)
    np.testing.assert_array_equal(bn.weight, np.ones(4, np.float32))
    np.testing.assert_array_equal(bn.bias, np.zeros(4, np.float32))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(4, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(4, np.float32))
    for array in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert array.dtype == np.float32 and array.shape == (4,)
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    assert bn.num_batches_tracked == 0
    assert bn.training is True
    assert bn.grad_weight is None and bn.grad_bias is None
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.axis, bn.debias) == (
        1e-5, 0.1, True, True, 1, False)


def test_affine_false_and_no_running_stats_have_none():
    bn = BatchNorm(3, affine=False, track_running_stats=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert bn.dtype == np.float64


@pytest.mark.parametrize("arguments, error", [
    ((0,), ValueError), ((-3,), ValueError), ((2.0,), TypeError), ((True,), TypeError),
    (("4",), TypeError),
])
def test_num_features_must_be_a_positive_integer(arguments, error):
    with pytest.raises(error, match="num_features"):
        BatchNorm(*arguments)


@pytest.mark.parametrize("options, error, match", [
    ({"eps": -1e-5}, ValueError, "eps"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": "1e-5"}, TypeError, "eps"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"momentum": "0.1"}, TypeError, "momentum"),
    ({"dtype": np.float16}, TypeError, "dtype"),
    ({"dtype": np.int32}, TypeError, "dtype"),
    ({"axis": 1.0}, TypeError, "axis"),
    ({"affine": "yes"}, TypeError, "affine"),
    ({"debias": True, "track_running_stats": False}, ValueError, "debias"),
])
def test_constructor_rejects_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        BatchNorm(4, **options)


def test_momentum_may_be_none_zero_or_one():
    for momentum in (None, 0, 1, 0.5):
        assert BatchNorm(2, momentum=momentum).momentum == momentum


def test_train_and_eval_set_the_mode_and_return_the_layer():
    bn = BatchNorm(2)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    with pytest.raises(TypeError, match="mode"):
        bn.train("no")


def test_repr_names_the_configuration():
    assert repr(BatchNorm(64)) == (
        "BatchNorm(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=1)")
    assert repr(BatchNorm(8, eps=1e-3, momentum=None, affine=False, track_running_stats=False,
                          axis=-1, dtype=np.float64)) == (
        "BatchNorm(8, eps=0.001, momentum=None, affine=False, track_running_stats=False, "
        "axis=-1, dtype=float64)")
    assert repr(BatchNorm(2, debias=True)).endswith("axis=1, debias=True)")


# ------------------------------------------------------ forward against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("momentum", [0.1, 0.35, None])
def test_training_then_eval_matches_reference(rng, dtype, layout, axis, momentum):
    channels = layout[axis]
    bn = BatchNorm(channels, momentum=momentum, axis=axis, dtype=dtype, eps=1e-3)
    bn.weight[...] = rng.uniform(0.5, 2, channels)
    bn.bias[...] = rng.normal(size=channels)
    ref = ReferenceBatchNorm(channels, eps=1e-3, momentum=momentum)
    ref.weight, ref.bias = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    where = f"dtype={np.dtype(dtype).name} shape={layout} axis={axis} momentum={momentum}"
    for n in (2, 7, 3, 5):
        x = batch(rng, layout, n, dtype)
        y = bn(x)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, ref.forward(x, axis, True), **tolerance(dtype), err_msg=where)
    np.testing.assert_allclose(bn.running_mean, ref.running_mean, **tolerance(dtype), err_msg=where)
    np.testing.assert_allclose(bn.running_var, ref.running_var, **tolerance(dtype), err_msg=where)
    assert bn.num_batches_tracked == 4
    bn.eval()
    x = batch(rng, layout, 4, dtype)
    np.testing.assert_allclose(bn(x), ref.forward(x, axis, False), **tolerance(dtype), err_msg=where)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_backward_matches_reference_in_both_modes(rng, dtype, layout, axis):
    channels = layout[axis]
    bn = BatchNorm(channels, axis=axis, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 2, channels)
    where = f"dtype={np.dtype(dtype).name} shape={layout} axis={axis}"
    x = batch(rng, layout, 6, dtype)
    grad_out = batch(rng, layout, 6, dtype, loc=0.0, scale=1.0)
    bn(x)
    grad_x = bn.backward(grad_out)
    expected = ref_backward(grad_out, x, bn.weight, bn.eps, axis)
    for got, want, name in zip((grad_x, bn.grad_weight, bn.grad_bias), expected,
                               ("grad_x", "grad_weight", "grad_bias")):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=f"{name} {where}")

    bn.eval()
    bn(x)
    grad_x = bn.backward(grad_out)
    expected = ref_backward(grad_out, x, bn.weight, bn.eps, axis, bn.running_mean, bn.running_var)
    for got, want, name in zip((grad_x, bn.grad_weight, bn.grad_bias), expected,
                               ("grad_x", "grad_weight", "grad_bias")):
        np.testing.assert_allclose(got, want, **tolerance(dtype), err_msg=f"eval {name} {where}")


def test_momentum_none_is_the_cumulative_average_of_batch_statistics(rng):
    bn = BatchNorm(3, momentum=None, dtype=np.float64)
    means, variances = [], []
    for n in (2, 5, 3, 8, 4):
        x = batch(rng, (1, 3), n, np.float64)
        bn(x)
        means.append(x.mean(axis=0))
        variances.append(x.var(axis=0, ddof=1))
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-13)
    assert bn.num_batches_tracked == 5


def test_track_running_stats_false_uses_batch_statistics_in_eval_mode(rng):
    bn = BatchNorm(4, track_running_stats=False, dtype=np.float64).eval()
    x = batch(rng, (1, 4, 3), 5, np.float64)
    grad_out = batch(rng, (1, 4, 3), 5, np.float64)
    np.testing.assert_allclose(bn(x), ref_normalize(x, *ref_batch_moments(x, 1)[:2], bn.weight,
                                                    bn.bias, bn.eps, 1), rtol=1e-12, atol=1e-12)
    # the batch statistics depend on x, so their gradient counts, as in training mode
    np.testing.assert_allclose(bn.backward(grad_out), ref_backward(grad_out, x, None, bn.eps, 1)[0],
                               rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_false_normalizes_without_scale_and_shift(rng, dtype):
    bn = BatchNorm(5, affine=False, dtype=dtype)
    x = batch(rng, (1, 5), 8, dtype)
    np.testing.assert_allclose(bn(x), ref_normalize(x, *ref_batch_moments(x, 1)[:2], None, None,
                                                    bn.eps, 1), **tolerance(dtype))
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is None and bn.grad_bias is None


def test_channels_last_equals_channels_first_on_transposed_data(rng):
    first = BatchNorm(3, axis=1)
    last = BatchNorm(3, axis=-1)
    for n in (2, 4):
        x = batch(rng, (1, 3, 4, 5), n, np.float32)
        y_first = first(x)
        y_last = last(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(y_last, y_first.transpose(0, 2, 3, 1), **tolerance(np.float32))
    np.testing.assert_allclose(last.running_mean, first.running_mean, **tolerance(np.float32))
    np.testing.assert_allclose(last.running_var, first.running_var, **tolerance(np.float32))


def test_in_place_changes_to_state_are_used_by_the_next_call(rng):
    bn, _ = trained_layer(rng, channels=4)
    bn.eval()
    x = batch(rng, (1, 4), 3, np.float32)
    before = bn(x)
    bn.running_mean += 1
    bn.running_var *= 4
    bn.weight[0] = 3
    bn.bias[1] = -2
    expected = ref_normalize(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, 1)
    np.testing.assert_allclose(bn(x), expected, **tolerance(np.float32))
    assert not np.allclose(bn(x), before)
    bn.num_batches_tracked[...] = 41
    bn.train()
    bn(x)
    assert bn.num_batches_tracked == 42


def test_input_is_not_modified_and_may_be_read_only_or_strided(rng):
    bn = BatchNorm(4)
    x = batch(rng, (1, 4, 6), 5, np.float32)
    original = x.copy()
    x.flags.writeable = False
    y_train = bn(x)
    bn.eval()
    y_eval = bn(x)
    np.testing.assert_array_equal(x, original)
    strided = np.asfortranarray(original)[:, :, ::2]
    np.testing.assert_array_equal(bn(strided), bn(np.ascontiguousarray(strided)))
    assert y_train.flags.writeable and y_eval.flags.writeable


def test_out_receives_the_result(rng):
    bn = BatchNorm(3).eval()
    x = batch(rng, (1, 3), 4, np.float32)
    out = np.empty_like(x)
    assert bn(x, out=out) is out
    np.testing.assert_array_equal(out, bn(x))
    one = np.empty(3, np.float32)
    assert bn.forward(x[1], out=one) is one
    np.testing.assert_array_equal(one, out[1])


def test_in_place_forward_works_but_forbids_backward(rng):
    bn = BatchNorm(3)
    x = batch(rng, (1, 3), 4, np.float32)
    expected = bn.eval()(x)
    y = bn(x, out=x)
    assert y is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(RuntimeError, match="out=x"):
        bn.backward(np.ones_like(x))
    bn.train()
    bn(x, out=x)
    with pytest.raises(RuntimeError, match="out=x"):
        bn.backward(np.ones_like(x))


# ------------------------------------------------------------------ single examples


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_batched_eval_equals_one_example_at_a_time_exactly(rng, dtype, layout, axis):
    bn = BatchNorm(layout[axis], axis=axis, dtype=dtype, debias=layout[axis] % 2 == 0)
    for n in (3, 5):
        bn(batch(rng, layout, n, dtype))
    bn.eval()
    x = batch(rng, layout, 7, dtype)
    batched = bn(x)
    for i in range(len(x)):
        np.testing.assert_array_equal(bn(x[i:i + 1]), batched[i:i + 1])


@pytest.mark.parametrize("axis", [1, -1])
def test_a_1d_input_is_one_example_with_a_1d_result(rng, axis):
    bn, _ = trained_layer(rng, channels=6, axis=axis)
    bn.eval()
    x = batch(rng, (1, 6), 4, np.float32)
    batched = bn(x)
    for row, expected in zip(x, batched):
        y = bn(row)
        assert y.shape == (6,)
        np.testing.assert_array_equal(y, expected)
    grad_out = np.arange(6, dtype=np.float32)
    grad_x = bn.backward(grad_out)
    assert grad_x.shape == (6,)
    expected = ref_backward(grad_out[None], x[-1:], bn.weight, bn.eps, 1, bn.running_mean,
                            bn.running_var)
    np.testing.assert_allclose(grad_x, expected[0][0], **tolerance(np.float32))
    np.testing.assert_allclose(bn.grad_weight, expected[1], **tolerance(np.float32))


class _NoGeneralPath(BatchNorm):
    def _forward(self, x, out):
        raise AssertionError("the call took the general path")


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_with_running_statistics_goes_straight_to_the_kernel(rng, dtype):
    """bn(x) in eval mode, a batch or one example, out= or not, runs no Python code of the
    layer (LayerCall, in C): the inference hot path. Its results are the general path's."""
    fast = _NoGeneralPath(6, dtype=dtype).eval()
    general = BatchNorm(6, dtype=dtype).eval()
    for layer in (fast, general):
        layer.running_mean[...] = np.linspace(-1, 1, 6)
        layer.running_var[...] = np.linspace(0.5, 2, 6)
        layer.weight[...] = np.linspace(2, 3, 6)
    x = batch(rng, (1, 6), 4, dtype)
    out = np.empty_like(x)
    assert fast(x, out=out) is out
    np.testing.assert_array_equal(out, general._forward(x, None))
    example = x[0]
    np.testing.assert_array_equal(fast(example), general._forward(example, None))
    assert fast._context is example  # what backward differentiates
    example_out = np.empty_like(example)
    assert fast(example, out=example_out) is example_out
    np.testing.assert_array_equal(example_out, general._forward(example, None))
    fast.train()
    with pytest.raises(AssertionError, match="general path"):
        fast(x)


def test_a_1d_input_needs_num_features_values_and_axis_1_or_minus_1(rng):
    bn = BatchNorm(4).eval()
    with pytest.raises(ValueError, match="num_features=4"):
        bn(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="axis"):
        BatchNorm(4, axis=2).eval()(np.zeros(4, np.float32))


def test_a_single_example_in_training_mode_raises_pytorchs_error(rng):
    bn = BatchNorm(4)
    state = snapshot(bn)
    for x in (np.ones((1, 4), np.float32), np.ones(4, np.float32)):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            bn(x)
    assert_same_state(bn, state)
    # one example with several values per channel is a valid training batch, as in PyTorch
    bn(batch(rng, (1, 4, 3), 1, np.float32))
    assert bn.num_batches_tracked == 1


# -------------------------------------------------------------------- backward


def test_backward_without_forward_raises_runtime_error():
    with pytest.raises(RuntimeError, match="forward"):
        BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_backward_overwrites_gradients_and_uses_the_last_forward(rng):
    bn = BatchNorm(3)
    x1, x2 = batch(rng, (1, 3), 4, np.float32), batch(rng, (1, 3), 6, np.float32)
    bn(x1)
    bn(x2)
    grad_out = batch(rng, (1, 3), 6, np.float32)
    bn.backward(grad_out)
    first = (bn.grad_weight.copy(), bn.grad_bias.copy())
    bn.backward(grad_out)
    np.testing.assert_array_equal(bn.grad_weight, first[0])  # not accumulated
    np.testing.assert_array_equal(bn.grad_bias, first[1])
    np.testing.assert_allclose(bn.grad_weight, ref_backward(grad_out, x2, bn.weight, bn.eps, 1)[1],
                               **tolerance(np.float32))


def test_backward_follows_the_mode_of_the_forward_call_not_the_current_mode(rng):
    bn, _ = trained_layer(rng, channels=3, dtype=np.float64)
    x = batch(rng, (1, 3), 5, np.float64)
    grad_out = batch(rng, (1, 3), 5, np.float64)
    bn.eval()
    bn(x)
    bn.train()
    expected = ref_backward(grad_out, x, bn.weight, bn.eps, 1, bn.running_mean, bn.running_var)
    np.testing.assert_allclose(bn.backward(grad_out), expected[0], rtol=1e-12)
    bn(x)
    bn.eval()
    np.testing.assert_allclose(bn.backward(grad_out), ref_backward(grad_out, x, bn.weight, bn.eps, 1)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("one_example", [False, True], ids=["batch", "one-example"])
def test_backward_out_receives_grad_x_also_in_place(rng, mode, one_example):
    """out= takes grad_x, bit for bit what a new array gets; out=grad_out works in place."""
    bn, _ = trained_layer(rng, channels=3, dtype=np.float64)
    bn.train(mode == "train" and not one_example)
    x = batch(rng, (1, 3), 5, np.float64)
    grad_out = batch(rng, (1, 3), 5, np.float64)
    if one_example:
        bn.eval()
        x, grad_out = x[0], grad_out[0]
    bn(x)
    expected = bn.backward(grad_out)
    gradients = (bn.grad_weight.copy(), bn.grad_bias.copy())
    out = np.full_like(x, np.nan)
    assert bn.backward(grad_out, out=out) is out
    np.testing.assert_array_equal(out, expected)
    in_place = grad_out.copy()
    assert bn.backward(in_place, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, expected)
    np.testing.assert_array_equal(bn.grad_weight, gradients[0])
    np.testing.assert_array_equal(bn.grad_bias, gradients[1])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_out_may_not_be_the_forward_input(rng, mode):
    """backward reads the forward call's x (and may be called again): out=x is refused."""
    bn = BatchNorm(3).train(mode == "train")
    buffer = batch(rng, (1, 3), 5, np.float32).reshape(-1)
    x = buffer[:12].reshape(4, 3)
    bn(x)
    expected = bn.backward(np.ones_like(x))
    state, x_before = snapshot(bn), x.copy()
    for out in (x, buffer[3:].reshape(4, 3)):  # x itself, and rows 1-3 of x and one more row
        with pytest.raises(ValueError, match=r"^out must not share memory with the last forward"):
            bn.backward(np.ones_like(x), out=out)
    assert_same_state(bn, state)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(bn.backward(np.ones_like(x)), expected)


def test_backward_with_another_shape_or_dtype_raises_and_changes_nothing(rng):
    bn = BatchNorm(3)
    x = batch(rng, (1, 3), 4, np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    state = snapshot(bn)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        bn.backward(np.ones((5, 3), np.float32))
    with pytest.raises(TypeError, match="float32"):
        bn.backward(np.ones((4, 3), np.float64))
    with pytest.raises(TypeError, match="ndarray"):
        bn.backward([[1.0, 2.0, 3.0]] * 4)
    assert_same_state(bn, state)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("training", [True, False])
def test_bad_input_raises_clearly_and_changes_nothing(rng, training):
    bn, _ = trained_layer(rng, channels=4)
    bn.train(training)
    good = batch(rng, (1, 4), 3, np.float32)
    bn(good)
    bn.backward(np.ones_like(good))
    state = snapshot(bn)
    cases = [
        (np.ones((3, 5), np.float32), ValueError, "5 features on axis 1.*num_features=4"),
        (np.ones((3, 2, 4), np.float32), ValueError, "2 features on axis 1"),
        (np.ones((3, 4), np.int64), TypeError, "x must have a float dtype"),
        (np.ones((3, 4), np.float16), TypeError, "x must have a float dtype"),
        (np.ones((3, 4), np.float64), TypeError, "x has dtype float64.*float32"),
        ([[1.0] * 4] * 3, TypeError, "x must be a numpy.ndarray"),
        (np.float32(1.0), TypeError, "x must be a numpy.ndarray"),
        (np.array(1.0, np.float32), ValueError, "scalar"),
    ]
    for x, error, match in cases:
        with pytest.raises(error, match=match):
            bn(x)
        assert_same_state(bn, state)
    # the last good forward is still the one backward differentiates
    np.testing.assert_array_equal(bn.backward(np.ones_like(good)), bn.backward(np.ones_like(good)))
    assert_same_state(bn, state)


def test_a_missing_channel_axis_is_reported():
    with pytest.raises(ValueError, match="no channel axis 3"):
        BatchNorm(4, axis=3)(np.ones((2, 4, 3), np.float32))


def test_bad_out_raises_and_changes_nothing(rng):
    bn = BatchNorm(3)
    x = batch(rng, (1, 3), 4, np.float32)
    for training in (True, False):
        bn.train(training)
        state = snapshot(bn)
        with pytest.raises(ValueError, match="out"):
            bn(x, out=np.empty((4, 4), np.float32))
        with pytest.raises(TypeError, match="out"):
            bn(x, out=np.empty((4, 3), np.float64))
        assert_same_state(bn, state)


# ----------------------------------------------------------------- statistics modes


def test_debias_corrects_the_running_statistics_at_eval_time_only(rng):
    momentum = 0.2
    plain = BatchNorm(4, momentum=momentum, dtype=np.float64)
    debiased = BatchNorm(4, momentum=momentum, dtype=np.float64, debias=True)
    batches = [batch(rng, (1, 4), n, np.float64, loc=3.0, scale=0.5) for n in (5, 8, 3)]
    for x in batches:
        np.testing.assert_array_equal(debiased(x), plain(x))  # training is unchanged
    # the stored buffers stay PyTorch's
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_array_equal(getattr(debiased, name), getattr(plain, name))
    decay = (1 - momentum) ** 3
    mean = plain.running_mean / (1 - decay)
    var = (plain.running_var - decay) / (1 - decay)
    # = the momentum-weighted average of the batch statistics, with no pull towards 0 and 1
    weights = np.array([momentum * (1 - momentum) ** (2 - i) for i in range(3)])
    np.testing.assert_allclose(
        mean, sum(w * x.mean(0) for w, x in zip(weights, batches)) / weights.sum(), rtol=1e-12)
    np.testing.assert_allclose(
        var, sum(w * x.var(0, ddof=1) for w, x in zip(weights, batches)) / weights.sum(),
        rtol=1e-12)
    x = batch(rng, (1, 4), 6, np.float64)
    debiased.eval()
    expected = ref_normalize(x, mean, var, debiased.weight, debiased.bias, debiased.eps, 1)
    np.testing.assert_allclose(debiased(x), expected, rtol=1e-12, atol=1e-12)
    grad_out = batch(rng, (1, 4), 6, np.float64)
    np.testing.assert_allclose(
        debiased.backward(grad_out),
        ref_backward(grad_out, x, debiased.weight, debiased.eps, 1, mean, var)[0], rtol=1e-12)


def test_debias_before_training_and_with_momentum_none_changes_nothing(rng):
    x = batch(rng, (1, 3), 4, np.float32)
    assert np.array_equal(BatchNorm(3, debias=True).eval()(x), BatchNorm(3).eval()(x))
    cumulative = BatchNorm(3, momentum=None, debias=True)
    reference = BatchNorm(3, momentum=None)
    for n in (2, 5):
        data = batch(rng, (1, 3), n, np.float32)
        cumulative(data)
        reference(data)
    np.testing.assert_array_equal(cumulative.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, axis", LAYOUTS, ids=LAYOUT_IDS)
def test_recalibrate_sets_exact_population_statistics(rng, dtype, layout, axis):
    channels = layout[axis]
    bn = BatchNorm(channels, axis=axis, dtype=dtype)
    bn.weight[...] = 2.0
    bn(batch(rng, layout, 3, dtype))  # some training first
    before = snapshot(bn)
    data = batch(rng, layout, 41, dtype, loc=5.0)
    sizes = [1, 7, 13, 1, 19]  # batches of one example included
    batches = np.split(data, np.cumsum(sizes)[:-1])
    assert bn.recalibrate(iter(batches)) is bn  # any iterable, e.g. a generator
    flat = per_channel(data, axis)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(bn.running_mean, flat.mean(axis=0), rtol=rtol)
    np.testing.assert_allclose(bn.running_var, flat.var(axis=0, ddof=1), rtol=rtol)
    for name in ("weight", "bias", "num_batches_tracked"):
        np.testing.assert_array_equal(getattr(bn, name), before[0][name])


def test_recalibrate_does_not_depend_on_how_the_data_is_cut(rng):
    data = batch(rng, (1, 5, 3), 30, np.float64, loc=1e3)
    whole = BatchNorm(5, dtype=np.float64).recalibrate([data])
    pieces = BatchNorm(5, dtype=np.float64).recalibrate([data[i:i + 4] for i in range(0, 30, 4)])
    singles = BatchNorm(5, dtype=np.float64).recalibrate(list(data.reshape(30, 5, 3)[:, None]))
    for bn in (pieces, singles):
        np.testing.assert_allclose(bn.running_mean, whole.running_mean, rtol=1e-14)
        np.testing.assert_allclose(bn.running_var, whole.running_var, rtol=1e-11)


def test_recalibrate_handles_constant_channels_and_1d_examples():
    bn = BatchNorm(3)
    examples = [np.array([1.0, 2.0, 7.0], np.float32), np.array([1.0, 4.0, 7.0], np.float32)]
    bn.recalibrate(examples)
    np.testing.assert_array_equal(bn.running_mean, [1.0, 3.0, 7.0])
    np.testing.assert_array_equal(bn.running_var, [0.0, 2.0, 0.0])
    bn.recalibrate([np.full((4, 3), 5.0, np.float32)])  # a constant batch: variance 0
    np.testing.assert_array_equal(bn.running_var, [0.0, 0.0, 0.0])


def test_recalibrate_errors_change_nothing(rng):
    bn, _ = trained_layer(rng, channels=3)
    state = snapshot(bn)
    good = batch(rng, (1, 3), 5, np.float32)
    cases = [
        ([good[:1]], ValueError, "more than 1 value per channel"),
        ([], ValueError, "more than 1 value per channel"),
        ([good, np.ones((2, 4), np.float32)], ValueError, "batch 1.*num_features=3"),
        ([good, good.astype(np.int32)], TypeError, "batch 1"),
        ([good, "data"], TypeError, "batch 1"),
        (good, TypeError, r"pass \[x\]"),
    ]
    for batches, error, match in cases:
        with pytest.raises(error, match=match):
            bn.recalibrate(batches)
        assert_same_state(bn, state)
    with pytest.raises(ValueError, match="track_running_stats"):
        BatchNorm(3, track_running_stats=False).recalibrate([good])


def test_debias_leaves_recalibrated_statistics_alone_until_training_resumes(rng):
    bn, _ = trained_layer(rng, channels=3, dtype=np.float64, debias=True, momentum=0.3)
    data = batch(rng, (1, 3), 20, np.float64)
    bn.recalibrate([data]).eval()
    x = batch(rng, (1, 3), 4, np.float64)
    expected = ref_normalize(x, data.mean(0), data.var(0, ddof=1), bn.weight, bn.bias, bn.eps, 1)
    np.testing.assert_allclose(bn(x), expected, rtol=1e-12, atol=1e-12)
    bn.train()(data)
    decay = 0.7 ** int(bn.num_batches_tracked)
    mean = bn.running_mean / (1 - decay)
    var = (bn.running_var - decay) / (1 - decay)
    np.testing.assert_allclose(bn.eval()(x), ref_normalize(x, mean, var, bn.weight, bn.bias,
                                                           bn.eps, 1), rtol=1e-12, atol=1e-12)


def test_reset_running_stats_and_parameters_work_in_place(rng):
    bn, _ = trained_layer(rng, channels=3)
    bn.weight[...] = 3
    bn.bias[...] = 1
    arrays = [bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked]
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.weight, 3)  # parameters untouched
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    assert all(a is b for a, b in zip(arrays, [bn.weight, bn.bias, bn.running_mean,
                                                bn.running_var, bn.num_batches_tracked]))
    BatchNorm(2, affine=False, track_running_stats=False).reset_parameters()  # nothing to do


# ------------------------------------------------------------------- persistence


def test_state_dict_has_pytorchs_keys_dtypes_and_copies(rng):
    bn, _ = trained_layer(rng, channels=3)
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == np.int64
    assert state["num_batches_tracked"] == 3
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], getattr(bn, name))
    state["running_mean"][...] = 99  # a snapshot, not a view
    assert not np.any(bn.running_mean == 99)
    assert list(BatchNorm(2, affine=False).state_dict()) == [
        "running_mean", "running_var", "num_batches_tracked"]
    assert list(BatchNorm(2, track_running_stats=False).state_dict()) == ["weight", "bias"]


def test_load_state_dict_round_trip_and_float_casting(rng):
    source, _ = trained_layer(rng, channels=3, dtype=np.float64)
    target = BatchNorm(3)
    arrays = [target.weight, target.running_mean, target.num_batches_tracked]
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(target, name).dtype == np.float32
        np.testing.assert_allclose(getattr(target, name), getattr(source, name), rtol=1e-7)
    assert target.num_batches_tracked == 3 and target.num_batches_tracked.dtype == np.int64
    # loaded in place: references to the layer's arrays stay valid
    assert all(a is b for a, b in zip(arrays, [target.weight, target.running_mean,
                                               target.num_batches_tracked]))


def test_load_state_dict_not_strict_reports_keys_and_keeps_missing_values(rng):
    bn = BatchNorm(3)
    result = bn.load_state_dict({"running_mean": np.full(3, 2.0), "extra": np.zeros(1)},
                                strict=False)
    assert result.missing_keys == ["weight", "bias", "running_var", "num_batches_tracked"]
    assert result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(bn.running_mean, 2.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)


def test_load_state_dict_failures_change_nothing(rng):
    bn, _ = trained_layer(rng, channels=3)
    good = {name: value + 1 for name, value in bn.state_dict().items()}
    state = snapshot(bn)
    cases = [
        ({k: v for k, v in good.items() if k != "running_var"}, ValueError, "missing.*running_var"),
        (dict(good, extra=np.zeros(3)), ValueError, "unexpected.*extra"),
        (dict(good, running_var=np.ones(4)), ValueError, r"running_var.*\(3,\)"),
        (dict(good, weight=np.ones((3, 1))), ValueError, "weight"),
        (dict(good, bias=np.ones(3, np.int64)), TypeError, "bias.*float"),
        (dict(good, num_batches_tracked=np.array([3])), TypeError, "num_batches_tracked"),
        (dict(good, num_batches_tracked=np.array(2.0)), TypeError, "num_batches_tracked"),
        (dict(good, num_batches_tracked=np.array(-1)), ValueError, "num_batches_tracked"),
        (list(good.items()), TypeError, "mapping"),
    ]
    for state_dict, error, match in cases:
        with pytest.raises(error, match=match):
            bn.load_state_dict(state_dict)
        assert_same_state(bn, state)
    with pytest.raises(ValueError, match="running_var"):  # shapes are checked when not strict too
        bn.load_state_dict(dict(good, running_var=np.ones(4)), strict=False)
    assert_same_state(bn, state)


@pytest.mark.parametrize("options", [
    {},
    {"momentum": None, "eps": 1e-3, "axis": -1, "dtype": np.float64},
    {"affine": False, "debias": True, "momentum": 0.25},
    {"track_running_stats": False},
])
def test_save_and_load_restore_configuration_mode_and_state(rng, tmp_path, options):
    bn = BatchNorm(4, **options)
    bn(batch(rng, (1, 4), 5, bn.dtype))
    if bn.weight is not None:
        bn.weight[...] = rng.uniform(size=4)
    bn.eval()
    path = tmp_path / "bn.npz"
    bn.save(path)
    loaded = BatchNorm.load(path)
    assert repr(loaded) == repr(bn) and loaded.training is False
    for name, value in bn.state_dict().items():
        got = getattr(loaded, name)
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)
    x = batch(rng, (1, 4), 3, bn.dtype)
    np.testing.assert_array_equal(loaded(x), bn(x))
    with np.load(path, allow_pickle=False) as data:  # a plain .npz, no pickle needed
        assert set(bn.state_dict()) <= set(data.files)


def test_load_rejects_a_file_not_written_by_save(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weight=np.ones(3))
    with pytest.raises(ValueError, match="BatchNorm.save"):
        BatchNorm.load(path)


@pytest.mark.parametrize("clone", [lambda bn: pickle.loads(pickle.dumps(bn)), copy.deepcopy],
                         ids=["pickle", "deepcopy"])
def test_pickle_round_trip_keeps_everything(rng, clone):
    bn, batches = trained_layer(rng, channels=3, momentum=None, debias=True, eps=1e-4)
    bn.backward(np.ones_like(batches[-1]))
    bn.eval()
    copied = clone(bn)
    assert repr(copied) == repr(bn) and copied.training is False
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                 "grad_weight", "grad_bias"):
        assert getattr(copied, name) is not getattr(bn, name)
        np.testing.assert_array_equal(getattr(copied, name), getattr(bn, name))
    x = batch(rng, (1, 3), 4, np.float32)
    np.testing.assert_array_equal(copied(x), bn(x))
    copied.train()(x)  # the copy has its own working lock
    assert copied.num_batches_tracked == 4 and bn.num_batches_tracked == 3


# ------------------------------------------------------------------------- torch


TORCH_CASES = [  # (module name, shape of one example with N=1)
    ("BatchNorm1d", (1, 5)),
    ("BatchNorm1d", (1, 4, 6)),
    ("BatchNorm2d", (1, 3, 4, 5)),
    ("BatchNorm3d", (1, 2, 3, 4, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("module, layout", TORCH_CASES, ids=[f"{m}-{len(s)}d" for m, s in TORCH_CASES])
@pytest.mark.parametrize("options", [
    {"momentum": 0.1},
    {"momentum": None},
    {"momentum": 0.3, "affine": False},
    {"track_running_stats": False},
], ids=["ema", "cumulative", "no-affine", "no-running-stats"])
def test_matches_torch_in_training_and_eval(rng, dtype, module, layout, options):
    torch = pytest.importorskip("torch")
    channels = layout[1]
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float64
    reference = getattr(torch.nn, module)(channels, eps=1e-4, **options).to(torch_dtype)
    bn = BatchNorm(channels, eps=1e-4, dtype=dtype, **options)
    if bn.affine:
        weight = rng.uniform(0.5, 2, channels).astype(dtype)
        bias = rng.normal(size=channels).astype(dtype)
        bn.weight[...] = weight
        bn.bias[...] = bias
        with torch.no_grad():
            reference.weight.copy_(torch.from_numpy(weight))
            reference.bias.copy_(torch.from_numpy(bias))
    tol = tolerance(dtype)
    where = f"{module} {layout} {np.dtype(dtype).name} {options}"

    def compare(x):
        x_torch = torch.from_numpy(x).requires_grad_(True)
        y_torch = reference(x_torch)
        grad_out = batch(rng, layout, len(x), dtype, loc=0.0, scale=1.0)
        y_torch.backward(torch.from_numpy(grad_out))
        np.testing.assert_allclose(bn(x), y_torch.detach().numpy(), **tol, err_msg=where)
        np.testing.assert_allclose(bn.backward(grad_out), x_torch.grad.numpy(), **tol,
                                   err_msg=where)
        if bn.affine:
            np.testing.assert_allclose(bn.grad_weight, reference.weight.grad.numpy(), **tol,
                                       err_msg=where)
            np.testing.assert_allclose(bn.grad_bias, reference.bias.grad.numpy(), **tol,
                                       err_msg=where)
            reference.weight.grad = reference.bias.grad = None
        if bn.track_running_stats:
            np.testing.assert_allclose(bn.running_mean, reference.running_mean.numpy(), **tol,
                                       err_msg=where)
            np.testing.assert_allclose(bn.running_var, reference.running_var.numpy(), **tol,
                                       err_msg=where)
            assert bn.num_batches_tracked == reference.num_batches_tracked.item()

    for n in (2, 9, 4, 3):
        compare(batch(rng, layout, n, dtype, loc=1.5))
    bn.eval()
    reference.eval()
    compare(batch(rng, layout, 5, dtype, loc=1.5))
    if bn.track_running_stats:  # else eval normalizes with batch statistics, which need N > 1
        compare(batch(rng, layout, 1, dtype, loc=1.5))


def test_state_dicts_interchange_with_torch_both_ways(rng):
    torch = pytest.importorskip("torch")
    reference = torch.nn.BatchNorm2d(3, momentum=0.2)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
        reference.bias.normal_()
    for n in (2, 5):
        reference(torch.from_numpy(batch(rng, (1, 3, 4, 4), n, np.float32)))
    reference.eval()

    bn = BatchNorm(3, momentum=0.2)
    bn.load_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
    assert bn.num_batches_tracked == 2
    bn.eval()
    x = batch(rng, (1, 3, 4, 4), 3, np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(bn(x), reference(torch.from_numpy(x)).numpy(),
                                   **tolerance(np.float32))
    # tensors load too
    BatchNorm(3).load_state_dict(reference.state_dict())

    bn.train()(batch(rng, (1, 3, 4, 4), 4, np.float32))
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in bn.state_dict().items()})
    for name, value in back.state_dict().items():
        assert value.dtype == (torch.int64 if name == "num_batches_tracked" else torch.float32)
        np.testing.assert_array_equal(value.numpy(), getattr(bn, name))


# -------------------------------------------------------------------------- fold


def convolve(x, weight, bias):
    """Cross-correlation as torch's Conv1d/2d computes it: stride 1, no padding."""
    spatial = tuple(range(2, x.ndim))
    windows = np.lib.stride_tricks.sliding_window_view(x, weight.shape[2:], axis=spatial)
    letters = "hwd"[:len(spatial)]
    kernel = "ijk"[:len(spatial)]
    y = np.einsum(f"nc{letters}{kernel},oc{kernel}->no{letters}", windows, weight)
    return y if bias is None else y + bias.reshape((-1,) + (1,) * len(spatial))


def test_convolve_is_a_convolution():
    x = np.arange(2 * 2 * 4 * 5, dtype=np.float64).reshape(2, 2, 4, 5) % 7
    weight = np.arange(3 * 2 * 2 * 3, dtype=np.float64).reshape(3, 2, 2, 3) % 5 - 2
    y = convolve(x, weight, None)
    for n, o, h, w in np.ndindex(*y.shape):
        assert y[n, o, h, w] == np.sum(x[n, :, h:h + 2, w:w + 3] * weight[o])


def eval_layer(rng, channels, **options):
    bn = BatchNorm(channels, dtype=np.float64, **options)
    if bn.affine:
        bn.weight[...] = rng.uniform(0.5, 2, channels)
        bn.bias[...] = rng.normal(size=channels)
    for n in (4, 6):
        bn(batch(rng, (1, channels), n, np.float64, loc=2.0))
    return bn.eval()


@pytest.mark.parametrize("options", [{}, {"affine": False}, {"debias": True}])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_linear_layer(rng, options, with_bias):
    bn = eval_layer(rng, 4, **options)
    weight = rng.normal(size=(4, 6))
    bias = rng.normal(size=4) if with_bias else None
    originals = (weight.copy(), None if bias is None else bias.copy())
    folded_weight, folded_bias = fold(weight, bias, bn)
    x = rng.normal(size=(7, 6))
    layer_out = x @ weight.T + (0 if bias is None else bias)
    np.testing.assert_allclose(x @ folded_weight.T + folded_bias, bn(layer_out), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_array_equal(weight, originals[0])  # inputs not modified
    if bias is not None:
        np.testing.assert_array_equal(bias, originals[1])


@pytest.mark.parametrize("kernel", [(3,), (2, 3)], ids=["conv1d", "conv2d"])
def test_fold_into_convolution(rng, kernel):
    bn = eval_layer(rng, 5)
    weight = rng.normal(size=(5, 3) + kernel)
    bias = rng.normal(size=5)
    x = rng.normal(size=(2, 3) + (6,) * len(kernel))
    folded_weight, folded_bias = fold(weight, bias, bn)
    assert folded_weight.shape == weight.shape and folded_bias.shape == (5,)
    np.testing.assert_allclose(convolve(x, folded_weight, folded_bias),
                               bn(convolve(x, weight, bias)), rtol=1e-12, atol=1e-12)


def test_fold_keeps_the_float32_dtype(rng):
    bn = BatchNorm(3)
    bn(batch(rng, (1, 3), 5, np.float32))
    bn.eval()
    weight = rng.normal(size=(3, 2)).astype(np.float32)
    folded_weight, folded_bias = fold(weight, None, bn)
    assert folded_weight.dtype == np.float32 and folded_bias.dtype == np.float32
    x = rng.normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_allclose(x @ folded_weight.T + folded_bias, bn(x @ weight.T), rtol=1e-5,
                               atol=1e-5)


def test_fold_validates_its_arguments(rng):
    bn = eval_layer(rng, 3)
    weight = np.ones((3, 2))
    with pytest.raises(ValueError, match="eval"):
        fold(weight, None, BatchNorm(3))
    with pytest.raises(ValueError, match="track_running_stats"):
        fold(weight, None, BatchNorm(3, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="num_features=3"):
        fold(np.ones((4, 2)), None, bn)
    with pytest.raises(ValueError, match="shape"):
        fold(np.ones(3), None, bn)
    with pytest.raises(ValueError, match=r"bias.*\(3,\)"):
        fold(weight, np.ones(4), bn)
    with pytest.raises(TypeError, match="float"):
        fold(np.ones((3, 2), np.int64), None, bn)
    with pytest.raises(TypeError, match="float"):
        fold(weight, [1.0, 2.0, 3.0], bn)
    with pytest.raises(TypeError, match="BatchNorm"):
        fold(weight, None, object())


# ----------------------------------------------------------------------- threads


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond, so that unsynchronized code interleaves."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_concurrent_eval_calls_equal_serial_calls(rng, frequent_thread_switches):
    bn, _ = trained_layer(rng, channels=16)
    bn.eval()
    inputs = [[batch(rng, (1, 16, 8), n, np.float32) for n in (1, 3, 64)] for _ in range(8)]
    expected = [[bn(x) for x in row] for row in inputs]
    results = [None] * len(inputs)

    def work(index):
        results[index] = [[bn(x) for x in inputs[index]] for _ in range(20)]

    run_threads(work, len(inputs))
    for row, got_rounds in zip(expected, results):
        for got in got_rounds:
            for a, b in zip(got, row):
                np.testing.assert_array_equal(a, b)


def test_concurrent_training_calls_never_tear_the_running_statistics(rng, frequent_thread_switches):
    x = batch(rng, (1, 32), 4, np.float32, loc=3.0)
    threads, calls = 8, 500
    serial = BatchNorm(32, momentum=0.05)
    for _ in range(threads * calls):
        serial(x)
    shared = BatchNorm(32, momentum=0.05)
    run_threads(lambda index: [shared(x) for _ in range(calls)], threads)
    assert shared.num_batches_tracked == threads * calls
    # every update is the same map, so any serial order gives the same bits
    np.testing.assert_array_equal(shared.running_mean, serial.running_mean)
    np.testing.assert_array_equal(shared.running_var, serial.running_var)


def test_eval_calls_do_not_wait_for_training_calls(rng):
    """The eval path takes no lock: it runs while the training lock is held."""
    bn = BatchNorm(4).eval()
    x = batch(rng, (1, 4), 2, np.float32)
    done = threading.Event()
    with bn._lock:  # as a training call in progress holds it
        thread = threading.Thread(target=lambda: (bn(x), bn(x[0]), done.set()))
        thread.start()
        finished = done.wait(timeout=10)
    thread.join()
    assert finished


def test_training_calls_wait_for_each_other(rng):
    bn = BatchNorm(4)
    x = batch(rng, (1, 4), 2, np.float32)
    done = threading.Event()
    with bn._lock:
        thread = threading.Thread(target=lambda: (bn(x), done.set()))
        thread.start()
        assert not done.wait(timeout=0.2)
        assert bn.num_batches_tracked == 0
    thread.join()
    assert done.is_set() and bn.num_batches_tracked == 1


def test_layer_eval_is_the_functional_eval(rng):
    """The layer adds no arithmetic of its own in eval mode: same bits as batch_norm."""
    bn, _ = trained_layer(rng, channels=5)
    bn.eval()
    x = batch(rng, (1, 5), 9, np.float32)
    np.testing.assert_array_equal(
        bn(x), functional_batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     eps=bn.eps))
