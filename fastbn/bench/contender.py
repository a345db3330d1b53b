"""The contenders: for one case and operation, the callables that are timed against each other.

fastbn (the functional API, or the eval-mode ``BatchNorm`` layer for a single example),
torch (``torch.ops.aten``, when it can be imported: :func:`import_torch`), the plain NumPy
twins (:func:`numpy_train`, :func:`numpy_backward`, :func:`numpy_eval`) and the copy floor
(``numpy.copyto``, and fastbn's own copy split over its threads). :class:`Inputs` holds the
arrays they share.
"""

from dataclasses import dataclass

import numpy as np

import fastbn
from fastbn._core import _COPY_PARALLEL_MIN_ELEMENTS
from fastbn._core import _copy as split_copy

from .cases import OPS

EPS = 1e-5


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


def fastbn_layer(case, inputs):
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


def fastbn_call(case, op, inputs, layer=None, out=None):
    """fastbn's callable for one case and operation; ``layer`` is timed for eval if given.

    ``out``: an array of x's shape and dtype that every call writes its result (y or
    grad_x) into, as ``out=``; without it each call returns a new array.
    """
    x, axis = inputs.x, case.axis
    weight, bias = inputs.weight, inputs.bias
    if op == "train":
        return lambda: fastbn.batch_norm_train(x, weight, bias, EPS, axis=axis, out=out)
    if op == "backward":
        grad_out, mean, invstd = inputs.grad_out, inputs.mean, inputs.invstd
        return lambda: fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight, training=True, axis=axis, out=out
        )
    if op == "eval":
        if layer is not None:
            return lambda: layer(x, out=out)
        running_mean, running_var = inputs.running_mean, inputs.running_var
        return lambda: fastbn.batch_norm(
            x, running_mean, running_var, weight, bias, False, 0.1, EPS, axis=axis, out=out
        )
    raise ValueError(f"unknown operation {op!r}: expected one of {', '.join(OPS)}")


def contenders(case, op, inputs, threads, torch=None, layer=None):
    """The callables to time for one case and operation, by contender name.

    Names: ``fastbn`` (``layer`` for eval if given), ``fastbn out=`` (the same into an
    existing array), ``torch`` (when ``torch`` is given), ``torch F`` (single-example eval:
    ``torch.nn.functional.batch_norm``), ``numpy``, ``copyto`` and ``split-copy`` (when
    ``threads`` > 1 and x is large enough for the kernels to split their work: a copy split
    over fastbn's threads as they would be).
    ``fastbn``, ``torch`` and ``numpy`` return a new array each call, which the OS first
    fills with zeros when it is large; ``fastbn out=`` and the copies write into an
    existing one. Torch calls must run under ``torch.no_grad()``.
    """
    x, axis = inputs.x, case.axis
    weight, bias = inputs.weight, inputs.bias
    running_mean, running_var = inputs.running_mean, inputs.running_var
    grad_out, mean, invstd = inputs.grad_out, inputs.mean, inputs.invstd
    calls = {"fastbn": fastbn_call(case, op, inputs, layer),
             "fastbn out=": fastbn_call(case, op, inputs, layer, out=np.empty_like(x))}
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
    if threads > 1 and x.size >= _COPY_PARALLEL_MIN_ELEMENTS:  # where it is split at all
        calls["split-copy"] = lambda: split_copy(target, x)
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


def import_torch():
    """``(torch, None)``, or ``(None, why not)`` when torch cannot be imported."""
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install: run without it
        return None, f"not importable ({type(error).__name__}: {error})"
    return torch, None
