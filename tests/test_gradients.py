"""batch_norm_backward against central finite differences of the forward pass, in float64.

The loss is ``L = sum(y * R)`` for a fixed random R, so dL/dy = R is the ``grad_out`` given
to the backward pass. Each partial derivative of L with respect to x, weight and bias is
``(L(v + h) - L(v - h)) / (2h)``. Its error is the truncation, h**2 * |d3L/dv3| / 6, plus
the rounding of L, about eps * S / h, where S = sum|y * R| is the size of L's terms:

- weight and bias: L is linear in them (no truncation error); h = eps**(1/3) * max(1, |v|),
  error O(eps**(2/3) * S).
- x: L depends on x through (x - mean) / sigma, sigma = sqrt(var + eps) of x's channel, so
  each derivative with respect to x brings a factor 1/sigma. With h = eps**(1/3) * sigma
  both errors are O(eps**(2/3) * (1 + S) / sigma).

eps**(2/3) is about 4e-11; FD_FACTOR states how many of those are allowed.

Training mode differentiates batch_norm_train (mean and invstd depend on x); eval mode
differentiates batch_norm(training=False), where the running statistics are constants.
This checks the backward pass against the forward pass it belongs to, independently of the
reference implementation.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastbn

EPS_64 = float(np.finfo(np.float64).eps)
STEP = EPS_64 ** (1 / 3)
FD_FACTOR = 100
BN_EPS = 1e-5

LAYOUTS = [
    ((4, 3), 1),
    ((6, 2), 0),
    ((3, 2, 5), 1),
    ((2, 3, 4), -1),
    ((3, 4, 2, 2), 2),
    ((2, 3, 2, 2, 2), 1),
    ((2, 1, 3), 1),
    ((2, 2), 1),
]


def _numerical_gradient(loss, value, steps):
    """Central differences of ``loss()`` with respect to every element of ``value`` (changed
    in place and restored), with step ``steps`` (broadcast to value's shape)."""
    gradient = np.empty(value.shape)
    flat = value.reshape(-1)  # a view: value is C-contiguous
    flat_steps = np.broadcast_to(steps, value.shape).reshape(-1)
    for i in range(flat.size):
        original, step = flat[i], flat_steps[i]
        flat[i] = original + step
        above = loss()
        flat[i] = original - step
        below = loss()
        flat[i] = original
        gradient.flat[i] = (above - below) / (2 * step)
    return gradient


def _assert_matches_finite_differences(analytic, numerical, scale, what):
    """|analytic - numerical| <= FD_FACTOR * eps**(2/3) * scale, elementwise."""
    bound = FD_FACTOR * EPS_64 ** (2 / 3) * np.broadcast_to(scale, analytic.shape)
    error = np.abs(analytic - numerical)
    assert np.all(error <= bound), (
        f"{what}: max |analytic - finite difference| / bound = {np.max(error / bound):.3g}\n"
        f"analytic:\n{analytic}\nfinite differences:\n{numerical}"
    )


def _problem(shape, axis, seed, with_weight=True):
    """x, weight (ones without weight), bias and R; weights of both signs."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = rng.standard_normal(shape) * 1.5 + 0.5
    weight = rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)
    if not with_weight:
        weight = np.ones(channels)
    bias = rng.uniform(-1.0, 1.0, channels)
    grad_out = rng.standard_normal(shape)  # R
    return x, weight, bias, grad_out


def _check_all(loss, x, weight, bias, sigma, grads, y, grad_out, axis, label):
    """Compares (grad_x, grad_weight, grad_bias) with finite differences of ``loss()``, which
    reads x, weight and bias when called. sigma: per-channel sqrt(var + eps) the forward
    pass divides by."""
    grad_x, grad_weight, grad_bias = grads
    loss_terms = float(np.sum(np.abs(y * grad_out)))
    channel_shape = [1] * x.ndim
    channel_shape[axis] = x.shape[axis]
    sigma = np.reshape(sigma, channel_shape)
    _assert_matches_finite_differences(
        grad_x,
        _numerical_gradient(loss, x, STEP * sigma),
        (1 + loss_terms) / sigma,
        f"grad_x {label}",
    )
    for name, value, grad in (("grad_weight", weight, grad_weight), ("grad_bias", bias, grad_bias)):
        steps = STEP * np.maximum(1.0, np.abs(value))
        _assert_matches_finite_differences(
            grad, _numerical_gradient(loss, value, steps), 1 + loss_terms, f"{name} {label}"
        )


def _check_training_gradients(shape, axis, seed, with_weight=True):
    x, weight, bias, grad_out = _problem(shape, axis, seed, with_weight)
    # Without weight, the forward and backward passes get None; then d/dweight is taken at
    # weight = 1 through the explicit array of ones, which gives the same loss.
    arguments = {"weight": weight if with_weight else None}

    def loss():
        y, _, _ = fastbn.batch_norm_train(x, arguments["weight"], bias, eps=BN_EPS, axis=axis)
        return float(np.sum(y * grad_out))

    y, mean, invstd = fastbn.batch_norm_train(x, arguments["weight"], bias, eps=BN_EPS, axis=axis)
    grads = fastbn.batch_norm_backward(
        grad_out, x, mean, invstd, arguments["weight"], training=True, axis=axis
    )
    arguments["weight"] = weight
    _check_all(
        loss,
        x,
        weight,
        bias,
        1 / invstd,
        grads,
        y,
        grad_out,
        axis,
        f"training shape={shape} axis={axis} weight={with_weight}",
    )


def _layout_id(layout):
    return f"{layout[0]}-axis={layout[1]}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_training_backward_matches_finite_differences(layout, with_weight):
    shape, axis = layout
    _check_training_gradients(shape, axis, seed=7, with_weight=with_weight)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_eval_backward_matches_finite_differences(layout, with_weight):
    shape, axis = layout
    x, weight, bias, grad_out = _problem(shape, axis, seed=11, with_weight=with_weight)
    rng = np.random.default_rng(3)
    running_mean = rng.uniform(-1.0, 1.0, shape[axis])
    running_var = rng.uniform(0.5, 2.0, shape[axis])
    arguments = {"weight": weight if with_weight else None}

    def loss():
        y = fastbn.batch_norm(
            x,
            running_mean,
            running_var,
            arguments["weight"],
            bias,
            training=False,
            eps=BN_EPS,
            axis=axis,
        )
        return float(np.sum(y * grad_out))

    invstd = 1.0 / np.sqrt(running_var + BN_EPS)
    grads = fastbn.batch_norm_backward(
        grad_out, x, running_mean, invstd, arguments["weight"], training=False, axis=axis
    )
    y = fastbn.batch_norm(
        x, running_mean, running_var, arguments["weight"], bias, eps=BN_EPS, axis=axis
    )
    arguments["weight"] = weight
    _check_all(
        loss,
        x,
        weight,
        bias,
        1 / invstd,
        grads,
        y,
        grad_out,
        axis,
        f"eval shape={shape} axis={axis} weight={with_weight}",
    )


def test_training_gradient_sums_to_zero_per_channel_and_eval_gradient_does_not():
    """The training gradient includes the statistics' dependence on x: adding a constant to a
    channel leaves y unchanged, so grad_x sums to zero over each channel. The eval gradient,
    with constant statistics, does not."""
    x, weight, bias, grad_out = _problem((5, 3, 4), 1, seed=5)
    _, mean, invstd = fastbn.batch_norm_train(x, weight, bias)
    grad_training, _, _ = fastbn.batch_norm_backward(
        grad_out, x, mean, invstd, weight, training=True
    )
    grad_eval, _, _ = fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight, training=False)
    channel_sums = grad_training.sum(axis=(0, 2))
    scale = np.abs(grad_training).sum(axis=(0, 2))
    assert np.all(np.abs(channel_sums) <= 16 * EPS_64 * scale)
    assert np.all(np.abs(grad_eval.sum(axis=(0, 2))) > 1e-3)


@st.composite
def _layouts(draw):
    ndim = draw(st.integers(2, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:  # training needs two values per channel
        shape[(axis + 1) % ndim] = 2
    return tuple(shape), axis


@given(layout=_layouts(), seed=st.integers(0, 2**32 - 1))
def test_random_layouts_match_finite_differences(layout, seed):
    """Training gradients of any small layout."""
    shape, axis = layout
    _check_training_gradients(shape, axis, seed)
