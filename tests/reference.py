"""A plain float64 NumPy reference for batch normalization, written from the maths.

Independent of fastbn by construction: no import of it, no shared code. Every function
moves the channel axis first and flattens the rest, so each channel's M values are one
contiguous row of a (C, M) float64 array: NumPy then sums each row pairwise (error
O(log M) ulps), where a sum across rows would accumulate naively (O(M) ulps) and make the
reference less accurate than what it checks. Results are float64: per-channel arrays of
shape (C,), full arrays in x's shape. The formulas are those of /work/shared/DESIGN.md:

    mean = sum(x) / M,  var = sum((x - mean)**2) / M  (biased),  invstd = 1 / sqrt(var + eps)
    y = weight * (x - mean) * invstd + bias
    running_mean <- (1 - m) * running_mean + m * mean
    running_var  <- (1 - m) * running_var  + m * var * M / (M - 1)  (unbiased)
    backward, xhat = (x - mean) * invstd:
        grad_bias = sum(dy), grad_weight = sum(dy * xhat)
        training: grad_x = weight * invstd / M * (M * dy - grad_bias - xhat * grad_weight)
        eval:     grad_x = weight * invstd * dy
"""

import numpy as np

__all__ = [
    "as_channel_rows",
    "batch_moments",
    "forward_train",
    "forward_eval",
    "updated_running_stats",
    "backward_train",
    "backward_eval",
]


def as_channel_rows(array, axis):
    """``array`` in float64 as a C-contiguous (C, M): row c holds channel c's M values."""
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    return np.ascontiguousarray(moved.reshape(moved.shape[0], -1))


def _from_rows(rows, like, axis):
    """Inverse of :func:`as_channel_rows` for an array shaped like ``like``."""
    moved_shape = np.moveaxis(np.empty(like.shape, dtype=np.bool_), axis, 0).shape
    return np.moveaxis(rows.reshape(moved_shape), 0, axis)


def _per_channel(value, channels, default):
    """A per-channel argument as a (C, 1) float64 column, broadcasting along the rows."""
    if value is None:
        return np.full((channels, 1), default, dtype=np.float64)
    return np.asarray(value, dtype=np.float64).reshape(channels, 1)


def _column(per_channel):
    """A (C,) float64 array as a (C, 1) column."""
    return np.asarray(per_channel, dtype=np.float64).reshape(-1, 1)


def batch_moments(x, axis=1):
    """Per-channel batch mean and biased variance, two-pass in float64: (mean, var, M).

    The mean gets one step of refinement (the mean of the residuals, as in the corrected
    two-pass algorithm of Chan, Golub and LeVeque), which leaves it within about an ulp.
    """
    rows = as_channel_rows(x, axis)
    count = rows.shape[1]
    mean = rows.sum(axis=1) / count
    mean += (rows - _column(mean)).sum(axis=1) / count
    var = ((rows - _column(mean)) ** 2).sum(axis=1) / count
    return mean, var, count


def forward_train(x, weight=None, bias=None, eps=1e-5, axis=1):
    """Training forward: ``(y, mean, invstd)`` from the batch statistics."""
    rows = as_channel_rows(x, axis)
    channels = rows.shape[0]
    mean, var, _ = batch_moments(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    weight = _per_channel(weight, channels, 1.0)
    bias = _per_channel(bias, channels, 0.0)
    y = weight * (rows - _column(mean)) * _column(invstd) + bias
    return _from_rows(y, x, axis), mean, invstd


def forward_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, axis=1):
    """Eval forward: normalization with the running statistics."""
    rows = as_channel_rows(x, axis)
    channels = rows.shape[0]
    invstd = 1.0 / np.sqrt(_column(running_var) + eps)
    weight = _per_channel(weight, channels, 1.0)
    bias = _per_channel(bias, channels, 0.0)
    y = weight * (rows - _column(running_mean)) * invstd + bias
    return _from_rows(y, x, axis)


def updated_running_stats(x, running_mean, running_var, momentum=0.1, axis=1):
    """The running statistics after one training step (PyTorch's rule, unbiased var)."""
    mean, var, count = batch_moments(x, axis)
    unbiased_var = var * count / (count - 1)
    kept = 1.0 - momentum
    new_mean = kept * np.asarray(running_mean, dtype=np.float64) + momentum * mean
    new_var = kept * np.asarray(running_var, dtype=np.float64) + momentum * unbiased_var
    return new_mean, new_var


def _parameter_gradients(grad_out, x, mean, invstd, axis):
    """(dy, xhat) as (C, M) rows, and grad_weight = sum(dy * xhat), grad_bias = sum(dy)."""
    dy = as_channel_rows(grad_out, axis)
    xhat = (as_channel_rows(x, axis) - _column(mean)) * _column(invstd)
    return dy, xhat, (dy * xhat).sum(axis=1), dy.sum(axis=1)


def backward_train(grad_out, x, mean, invstd, weight=None, axis=1):
    """Training backward (mean and invstd are functions of x): (grad_x, grad_weight, grad_bias)."""
    dy, xhat, grad_weight, grad_bias = _parameter_gradients(grad_out, x, mean, invstd, axis)
    channels, count = dy.shape
    weight = _per_channel(weight, channels, 1.0)
    grad_x = (
        weight
        * _column(invstd)
        / count
        * (count * dy - _column(grad_bias) - xhat * _column(grad_weight))
    )
    return _from_rows(grad_x, x, axis), grad_weight, grad_bias


def backward_eval(grad_out, x, mean, invstd, weight=None, axis=1):
    """Eval backward (mean and invstd are constants): (grad_x, grad_weight, grad_bias)."""
    dy, _, grad_weight, grad_bias = _parameter_gradients(grad_out, x, mean, invstd, axis)
    weight = _per_channel(weight, dy.shape[0], 1.0)
    grad_x = weight * _column(invstd) * dy
    return _from_rows(grad_x, x, axis), grad_weight, grad_bias
