"""The stateful batch-normalization layer, and folding it into the layer before it.

:class:`BatchNorm` keeps its parameters and running statistics as plain NumPy arrays and
computes with the functional API of :mod:`fastbn._core`, which validates every call and
runs the C kernels without the GIL. The layer adds what a network needs around them:
train/eval modes, PyTorch's running-statistics rules, the context of the last forward call
for :meth:`BatchNorm.backward`, persistence, and a lock that serializes training calls.
Its call, ``bn(x)``, is :class:`fastbn._layer_call.LayerCall`'s: eval with the running
statistics goes from there straight to the kernel, and everything else comes back here.
"""

import importlib
import json
import math
import numbers
import operator
import sys
import threading
from collections import namedtuple
from collections.abc import Mapping

import numpy as np

from fastbn._core import batch_norm as _batch_norm
from fastbn._core import batch_norm_backward as _batch_norm_backward
from fastbn._core import (
    _check_statistics,
    _may_share_memory,
    _mean_invstd,
    _train_forward,
    _update_running,
)
from fastbn._layer_call import OVERWRITTEN as _OVERWRITTEN
from fastbn._layer_call import LayerCall
from fastbn.moments import Moments, moments

__all__ = ["BatchNorm", "fold"]

#: What :meth:`BatchNorm.load_state_dict` returns, as PyTorch's ``load_state_dict`` does.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

#: The attributes held in LayerCall's slots, but _context: what pickling must carry over.
_CALL_STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "eps", "axis", "training",
                     "debias")
_PARAMETER_NAMES = ("weight", "bias")
_STATISTIC_NAMES = ("running_mean", "running_var")
_SAVE_FORMAT = 1
_CONFIG_KEY = "__config__"


class _Context(namedtuple("_Context", ["x", "mean", "invstd", "training", "synchronized"],
                          defaults=(False,))):
    """What backward needs from a forward call: x and the statistics it was normalized with.

    ``training`` is true when mean and invstd are the batch's own statistics (functions of
    x, so their gradient counts), false when they were constants (eval mode).
    ``synchronized`` is true when they are the statistics of a global batch spread over
    several processes (SyncBatchNorm), whose backward pass reduces across them too.
    An eval forward with the plain running statistics, the hot path, stores x alone
    instead: backward derives the constants from the running statistics then.
    """


# ---------------------------------------------------------------------- arguments


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive integer, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {number}")
    return number


def _real(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def _layer_dtype(dtype):
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}") from None
    if resolved not in (np.float32, np.float64):
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {resolved}")
    return resolved


# --------------------------------------------------------------------------- layer


class BatchNorm(LayerCall):
    """Batch normalization layer over NumPy arrays, compatible with torch.nn.BatchNorm1d/2d/3d.

    Parameters
    ----------
    num_features : int
        C, the number of channels (features) of the input, found on axis ``axis``.
    eps : float >= 0, keyword-only
        Added to the variance before the square root.
    momentum : float in [0, 1] or None, keyword-only
        Weight of each new batch in the running statistics (PyTorch's convention: Keras's
        momentum 0.99 is 0.01 here). None: cumulative average, the factor of the t-th
        training batch being 1/t.
    affine : bool, keyword-only
        Whether the layer has a learnable per-channel scale ``weight`` and shift ``bias``.
    track_running_stats : bool, keyword-only
        Whether the layer keeps running statistics for eval mode. Without them it
        normalizes with the batch's statistics in both modes, as PyTorch does.
    axis : int, keyword-only
        The channel axis of the input: 1 for (N, C), (N, C, L), NCHW and NCDHW, -1 for
        channels-last input such as NHWC.
    dtype : numpy.float32 or numpy.float64, keyword-only
        The dtype of the parameters and statistics; the input must have it too (in any
        byte order).
    debias : bool, keyword-only
        Eval mode corrects the running statistics for their initial values, as Adam
        corrects its moments: ``(running - (1-m)**t * initial) / (1 - (1-m)**t)`` with
        t = num_batches_tracked, initial 0 for the mean and 1 for the variance. Early in
        training the estimate is then not pulled towards 0 and 1. The stored buffers are
        PyTorch's either way. No effect with momentum=None (the cumulative average has no
        such bias), nor right after :meth:`recalibrate`, whose statistics are exact.

    Attributes
    ----------
    weight, bias : numpy.ndarray of shape (C,), or None
        Ones and zeros to start; None when ``affine`` is false.
    running_mean, running_var : numpy.ndarray of shape (C,), or None
        Zeros and ones to start; None when ``track_running_stats`` is false.
    num_batches_tracked : numpy.ndarray of shape () and dtype int64, or None
        Training batches seen; None when ``track_running_stats`` is false.
    training : bool
        True (training mode) at construction; see :meth:`train` and :meth:`eval`.
    grad_weight, grad_bias : numpy.ndarray of shape (C,), or None
        Set by :meth:`backward` (None before, and with ``affine`` false).

    These arrays may be read and changed in place at any time; the next call uses what
    they hold (nothing is cached). Replace them only with arrays of the same shape and
    dtype.

    Notes
    -----
    Thread safety: eval calls on one layer from many threads are safe and run in parallel
    (the kernels release the GIL; the eval path takes no lock). Training calls, backward,
    :meth:`recalibrate`, the reset and load methods are serialized by a lock, so running
    statistics are never torn. :meth:`backward` uses the context of the most recent forward
    call of any thread.

    Forward keeps a reference to x, not a copy, for :meth:`backward`: change x in place
    before backward and the gradient is wrong.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, debias=False):
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = _real(eps, "eps")
        if not 0.0 <= self.eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if momentum is None:
            self.momentum = None
        else:
            self.momentum = _real(momentum, "momentum")
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.affine = _flag(affine, "affine")
        self.track_running_stats = _flag(track_running_stats, "track_running_stats")
        if isinstance(axis, (bool, np.bool_)):
            raise TypeError("axis must be an integer, got bool")
        try:
            self.axis = operator.index(axis)
        except TypeError:
            raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
        self.dtype = _layer_dtype(dtype)
        self.debias = _flag(debias, "debias")
        if self.debias and not self.track_running_stats:
            raise ValueError("debias=True corrects running statistics: it needs "
                             "track_running_stats=True")

        channels = self.num_features
        self.weight = np.ones(channels, self.dtype) if self.affine else None
        self.bias = np.zeros(channels, self.dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(channels, self.dtype)
            self.running_var = np.ones(channels, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._lock = threading.Lock()
        self._context = None
        # True from recalibrate() to the next training update: the running statistics are
        # exact population statistics, which debias must leave alone.
        self._statistics_exact = False

    # ------------------------------------------------------------------ modes

    def train(self, mode=True):
        """Set training mode (``mode=True``) or eval mode (False); returns the layer."""
        self.training = _flag(mode, "mode")
        return self

    def eval(self):
        """Set eval mode; returns the layer. Same as ``train(False)``."""
        return self.train(False)

    # ---------------------------------------------------------------- forward

    def forward(self, x, out=None):
        """Normalize x; ``bn(x)`` is the same call.

        Parameters
        ----------
        x : numpy.ndarray of the layer's dtype
            A batch with the channel axis at ``axis`` (ndim >= 2), or one example as a 1-D
            array of length num_features (then the result is 1-D too).
        out : numpy.ndarray, optional
            Where to write the result: x's shape and dtype, laid out in memory as
            ``numpy.empty_like(x)`` (C-contiguous for C-contiguous x). ``out=x`` works
            in place, but then :meth:`backward` cannot be called for this forward.

        Returns
        -------
        y : numpy.ndarray
            x's shape and dtype (``out`` when given).

        In training mode the batch statistics normalize x, and the running statistics and
        num_batches_tracked are updated as PyTorch updates them. In eval mode the running
        statistics normalize x (batch statistics without ``track_running_stats``).

        Raises
        ------
        TypeError
            x is not a float32/float64 array of the layer's dtype.
        ValueError
            x does not have num_features channels on ``axis``, or a training batch has one
            value per channel ("Expected more than 1 value per channel when training").
            Nothing is changed then.
        """
        # bn(x) is the call of LayerCall (fastbn/_layer_call.pyx): eval with the plain
        # running statistics goes straight to the kernel there; everything else comes to
        # _forward.
        return self(x, out)

    def _forward(self, x, out):
        batch_x, batch_out, one_example = self._as_batch(x, out)
        if self.training or self.running_mean is None:
            y = self._forward_batch_statistics(x, batch_x, batch_out)
        else:
            y = self._forward_running_statistics(x, batch_x, batch_out)
        if one_example:
            return y[0] if out is None else out
        return y

    def _forward_batch_statistics(self, x, batch_x, batch_out):
        with self._lock:
            update = self.training and self.running_mean is not None
            if update:
                self._check_statistics_writable()
            y, mean, var, count, synchronized = self._normalize_with_batch_statistics(
                batch_x, batch_out)
            # C loops read them (the running update, the backward's mean and invstd), and a
            # hook (SyncBatchNorm's) may return anything: checked before any state moves
            _check_statistics(mean, var, self.num_features)
            if update:
                self._update_running_statistics(count, mean, var)
            if batch_out is not None and _may_share_memory(batch_out, batch_x):
                self._context = _OVERWRITTEN
            else:
                self._context = _Context(x, *_mean_invstd(mean, var, self.eps, self.dtype),
                                         True, synchronized)
            return y

    def _normalize_with_batch_statistics(self, batch_x, batch_out):
        """Normalize a batch with batch statistics, under the lock.

        Returns (y, mean, var, count, synchronized): the float64 mean and biased variance
        y was normalized with, the number of values per channel they are over, and whether
        they are a global batch's (see :meth:`_synchronized_backward`). A hook:
        SyncBatchNorm returns the statistics of the batch of all its processes.
        """
        y, mean, var = _train_forward(batch_x, self.weight, self.bias, self.eps,
                                      axis=self.axis, out=batch_out)
        return y, mean, var, batch_x.size // self.num_features, False

    def _update_running_statistics(self, count, mean, var):
        """PyTorch's update from a batch's float64 mean and biased variance over count
        values per channel, computed in float64 and stored in the layer's dtype."""
        tracked = int(self.num_batches_tracked) + 1
        factor = 1.0 / tracked if self.momentum is None else self.momentum
        # The one write that may fail (a user's integer array too small for the count) first;
        # the update of the running statistics cannot, the arrays having been checked.
        self.num_batches_tracked[...] = tracked
        _update_running(self.running_mean, self.running_var, mean, var, factor, count)
        self._statistics_exact = False

    def _forward_running_statistics(self, x, batch_x, batch_out):
        mean, var, corrected = self._eval_statistics()
        y = _batch_norm(batch_x, mean, var, self.weight, self.bias, False, 0.1, self.eps,
                        axis=self.axis, out=batch_out)
        if batch_out is not None and _may_share_memory(batch_out, batch_x):
            self._context = _OVERWRITTEN
        elif corrected:
            self._context = _Context(x, mean, self._invstd(var), False)
        else:
            self._context = x
        return y

    def _eval_statistics(self):
        """(mean, var, corrected): the statistics eval mode normalizes with, layer dtype."""
        mean, var = self.running_mean, self.running_var
        if not self.debias or self.momentum is None or self._statistics_exact:
            return mean, var, False
        decay = (1.0 - self.momentum) ** int(self.num_batches_tracked)
        if decay == 1.0 or decay == 0.0:  # nothing tracked yet (or momentum 0), or no bias
            return mean, var, False
        corrected_mean = mean.astype(np.float64) / (1.0 - decay)
        corrected_var = np.maximum((var.astype(np.float64) - decay) / (1.0 - decay), 0.0)
        return corrected_mean.astype(self.dtype), corrected_var.astype(self.dtype), True

    def _invstd(self, var):
        return _invstd(var, self.eps).astype(self.dtype)

    # ------------------------------------------------------------ validation

    def _as_batch(self, x, out):
        """(x, out, one_example) as the functional API takes them, after clear checks."""
        self._check_input(x, "x")
        if x.ndim != 1:
            self._check_batch_shape(x)
            return x, out, False
        if self.axis not in (1, -1):
            raise ValueError(
                f"a 1-D x is one example of {self.num_features} features, which needs the "
                f"channel axis 1 or -1, but this layer has axis={self.axis}; give x its "
                f"batch axis, e.g. x[None]"
            )
        if x.shape[0] != self.num_features:
            raise ValueError(
                f"x has {x.shape[0]} features, but this layer has num_features="
                f"{self.num_features} (a 1-D x is one example)"
            )
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
            if out.shape != x.shape:
                raise ValueError(f"out must have x's shape {x.shape}, got {out.shape}")
            out = out[np.newaxis]  # a view, so the result lands in the caller's array
        return x[np.newaxis], out, True

    def _check_input(self, x, name):
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} must be a numpy.ndarray of dtype {self.dtype}, got {type(x).__name__}"
            )
        if x.dtype.num != self.dtype.num:  # in any byte order: the functions take them all
            if not _is_float(x.dtype):
                raise TypeError(f"{name} must have a float dtype ({self.dtype}), got {x.dtype}")
            raise TypeError(
                f"{name} has dtype {x.dtype}, but this layer's parameters and statistics are "
                f"{self.dtype}: pass {name}.astype(numpy.{self.dtype}), or create the layer "
                f"with dtype=numpy.{x.dtype.name}"
            )
        if x.ndim == 0:
            raise ValueError(f"{name} must be an array of shape (batch, channels, ...), got a scalar")

    def _check_batch_shape(self, x):
        ndim = x.ndim
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"x of shape {x.shape} has no channel axis {self.axis} (this layer's axis)"
            )
        if x.shape[self.axis] != self.num_features:
            raise ValueError(
                f"x has {x.shape[self.axis]} features on axis {self.axis}, but this layer has "
                f"num_features={self.num_features} (x's shape is {x.shape})"
            )

    def _check_statistics_writable(self, writer="training"):
        """Raise ValueError unless the running statistics can be written in place by
        ``writer`` (named in the message): each a writable array of the right shape and
        dtype."""
        self._check_channel_arrays_writable(_STATISTIC_NAMES, writer)
        tracked = self.num_batches_tracked
        if (not isinstance(tracked, np.ndarray) or tracked.shape != () or tracked.dtype.kind != "i"
                or not tracked.flags.writeable):
            raise ValueError("num_batches_tracked must be a writable int64 array of shape (), "
                             f"as {writer} updates it in place")

    def _check_channel_arrays_writable(self, names, writer):
        for name in names:
            array = getattr(self, name)
            if (not isinstance(array, np.ndarray) or array.shape != (self.num_features,)
                    or array.dtype != self.dtype or not array.flags.writeable):
                raise ValueError(
                    f"{name} must be a writable array of shape ({self.num_features},) and "
                    f"dtype {self.dtype}, as {writer} updates it in place"
                )

    # --------------------------------------------------------------- backward

    def backward(self, grad_out, out=None):
        """Gradient of the most recent forward call with respect to its input.

        Parameters
        ----------
        grad_out : numpy.ndarray
            Gradient of the loss with respect to that call's output: its shape and dtype.
        out : numpy.ndarray, optional
            Where to write grad_x: that call's shape and dtype, laid out as that call's
            output. ``out=grad_out`` works in place; out may not share memory with that
            call's x, which backward reads (and a later backward call would read again).

        Returns
        -------
        grad_x : numpy.ndarray
            Gradient with respect to that call's x (``out`` when given).

        Sets ``grad_weight`` and ``grad_bias`` (replacing, not adding to, earlier values;
        None with affine=False). After a training forward (or any forward without running
        statistics) the batch statistics are functions of x and their gradient counts; after
        an eval forward the statistics are constants.

        Raises
        ------
        RuntimeError
            No forward call yet, or the forward call wrote over its input (out=x).
        TypeError, ValueError
            grad_out's or out's dtype or shape is not that of the forward call's output, or
            out is not a writable array laid out as x, apart from x. Nothing is changed
            then.
        """
        with self._lock:
            context = self._context
            if context is None:
                raise RuntimeError(
                    "backward() needs a forward call first: it takes the gradient of the most "
                    "recent bn(x)"
                )
            if context is _OVERWRITTEN:
                raise RuntimeError(
                    "backward() cannot run: the last forward call wrote its output over its "
                    "input (out=x), so x is gone; call forward without out=x to backpropagate"
                )
            if type(context) is _Context:
                x, mean, invstd, training, synchronized = context
            else:  # eval forward with the plain running statistics
                x, mean, training, synchronized = context, self.running_mean, False, False
                invstd = self._invstd(self.running_var)
            _check_like_output(grad_out, "grad_out", x)
            if grad_out.dtype.num != x.dtype.num:  # either may be byte-swapped
                raise TypeError(
                    f"grad_out must have the last forward call's dtype {x.dtype.name}, "
                    f"got {grad_out.dtype}"
                )
            if out is not None:  # the kernel call checks its dtype and layout
                _check_like_output(out, "out", x)
                if _may_share_memory(out, x):
                    raise ValueError(
                        "out must not share memory with the last forward call's input x: "
                        "backward reads x, and a later backward call would read it again"
                    )
            one_example = x.ndim == 1
            if one_example:  # a view: the kernel writes into the caller's out
                x, grad_out = x[np.newaxis], grad_out[np.newaxis]
                batch_out = None if out is None else out[np.newaxis]
            else:
                batch_out = out
            if synchronized:
                grad_x, grad_weight, grad_bias = self._synchronized_backward(
                    grad_out, x, mean, invstd, batch_out)
            else:
                grad_x, grad_weight, grad_bias = _batch_norm_backward(
                    grad_out, x, mean, invstd, self.weight, training=training, axis=self.axis,
                    out=batch_out
                )
            self.grad_weight = grad_weight if self.affine else None
            self.grad_bias = grad_bias if self.affine else None
        if out is not None:
            return out
        return grad_x[0] if one_example else grad_x

    def _synchronized_backward(self, grad_out, x, mean, invstd, out):
        """(grad_x, grad_weight, grad_bias) after a forward with a global batch's statistics,
        under the lock, grad_x written into out if given. A hook for SyncBatchNorm, the only
        layer whose :meth:`_normalize_with_batch_statistics` returns such statistics."""
        raise NotImplementedError(f"{type(self).__name__} has no synchronized backward pass")

    # ------------------------------------------------------------ statistics

    def recalibrate(self, batches):
        """Set the running statistics to the exact statistics of a data set.

        Parameters
        ----------
        batches : iterable of numpy.ndarray, or a Dask array
            The data, streamed in batches (e.g. a generator over the training set), each
            shaped as :meth:`forward` takes it, float32 or float64. Batches may have any
            size, one example included, as long as there are two values per channel in all.
            A Dask array (``dask.array.Array``, shaped as :meth:`forward` takes a batch) is
            the whole data set: its chunks are reduced by :func:`fastbn.dask.moments`, out
            of core.

        Returns
        -------
        self

        Per-batch moments come from the kernels (accumulated in float64) and are merged
        with Chan's formula in float64, so the result does not depend on how the data is
        cut into batches. running_mean becomes the population mean and running_var the
        unbiased population variance; weight, bias and num_batches_tracked are left alone.
        Until the next training step, debias leaves these exact statistics alone.
        On any error nothing is changed.
        """
        self._set_population_statistics(self._data_moments(batches))
        return self

    def _data_moments(self, batches):
        """The Moments of all the data :meth:`recalibrate` is given, after checks."""
        if self.running_mean is None:
            raise ValueError("recalibrate() sets running statistics, but this layer has none "
                             "(track_running_stats=False)")
        if _is_dask_array(batches):
            return self._dask_moments(batches)
        if isinstance(batches, np.ndarray):
            raise TypeError("batches must be an iterable of arrays (a list, a generator); "
                            "to recalibrate on one array x, pass [x]")
        try:
            batches = iter(batches)
        except TypeError:
            raise TypeError("batches must be an iterable of arrays (a list, a generator) or "
                            f"a Dask array, got {type(batches).__name__}") from None
        total = Moments.empty(self.num_features)
        for index, batch in enumerate(batches):  # a stream: one batch in memory at a time
            total = total.merge(self._moments(batch, f"batch {index}"))
        return total

    def _set_population_statistics(self, total):
        count = int(total.count[0])
        if count < 2:
            raise ValueError(
                f"recalibrate() needs more than 1 value per channel in all, got {count}"
            )
        with self._lock:
            self._check_statistics_writable("recalibrate()")
            self.running_mean[...] = total.mean
            self.running_var[...] = total.unbiased_var
            self._statistics_exact = True

    def _dask_moments(self, array):
        if not _is_float(array.dtype):
            raise TypeError(f"the Dask array must have dtype float32 or float64, got {array.dtype}")
        if array.ndim < 2:
            raise ValueError(f"a Dask array is the whole data set, of shape (N, channels, ...), "
                             f"got shape {array.shape}")
        try:
            self._check_batch_shape(array)
        except ValueError as error:
            raise ValueError(f"the Dask array: {error}") from None
        # Dask is optional: fastbn.dask is loaded on use, and dynamically, so that neither
        # importing nor type-checking this module involves it.
        return importlib.import_module("fastbn.dask").moments(array, axis=self.axis)

    def _moments(self, batch, name):
        """The Moments of one batch, after checks that name the batch."""
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(batch).__name__}")
        if not _is_float(batch.dtype):
            raise TypeError(f"{name} must have dtype float32 or float64, got {batch.dtype}")
        if batch.ndim == 0:
            raise ValueError(f"{name} must be an array of shape (batch, channels, ...)")
        if batch.ndim == 1:
            if batch.shape[0] != self.num_features:
                raise ValueError(f"{name} has {batch.shape[0]} features, but this layer has "
                                 f"num_features={self.num_features} (a 1-D batch is one example)")
            batch = batch[np.newaxis]
        else:
            try:
                self._check_batch_shape(batch)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        return moments(batch, axis=self.axis)

    def reset_running_stats(self):
        """Running statistics back to mean 0, variance 1, num_batches_tracked 0 (in place).

        Raises ValueError, and changes nothing, if one of them is not a writable array of
        its shape and dtype (one the user replaced or made read-only).
        """
        with self._lock:
            self._reset(parameters=False, writer="reset_running_stats()")

    def reset_parameters(self):
        """Running statistics reset, weight back to ones and bias to zeros (in place).

        Raises ValueError, and changes nothing, if one of these arrays is not a writable
        array of its shape and dtype (one the user replaced or made read-only).
        """
        with self._lock:
            self._reset(parameters=True, writer="reset_parameters()")

    def _reset(self, parameters, writer):
        """Reset the running statistics, and weight and bias too if ``parameters``, under
        the lock: every array is checked before the first is written."""
        statistics = self.running_mean is not None
        parameters = parameters and self.weight is not None
        if statistics:
            self._check_statistics_writable(writer)
        if parameters:
            self._check_channel_arrays_writable(_PARAMETER_NAMES, writer)
        if statistics:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)
        if parameters:
            self.weight.fill(1)
            self.bias.fill(0)
        self._statistics_exact = False

    # ------------------------------------------------------------ persistence

    def _state_names(self):
        names = []
        if self.weight is not None:
            names += _PARAMETER_NAMES
        if self.running_mean is not None:
            names += _STATISTIC_NAMES + ("num_batches_tracked",)
        return names

    def state_dict(self):
        """The state under PyTorch's names, as a dict of copies.

        Keys, in PyTorch's order: weight and bias (with affine), running_mean, running_var
        and num_batches_tracked (with track_running_stats); num_batches_tracked is a 0-d
        int64 array, as ``tensor.numpy()`` gives. ``{k: torch.from_numpy(v) ...}`` loads
        into a torch.nn.BatchNorm*d, and ``{k: v.numpy() ...}`` of its state dict loads
        here.
        """
        with self._lock:
            return {name: np.array(getattr(self, name)) for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy a state dict (from :meth:`state_dict` or PyTorch's) into the layer, in place.

        Parameters
        ----------
        state_dict : mapping of str to array-like
            NumPy arrays, or anything ``numpy.asarray`` takes (CPU torch tensors).
        strict : bool
            True: the keys must be exactly :meth:`state_dict`'s. False: missing keys keep
            their values and unexpected keys are ignored.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, as PyTorch returns.

        Every value is checked first: shape (C,) and a float dtype (cast to the layer's)
        for weight, bias, running_mean and running_var; a non-negative integer of shape ()
        for num_batches_tracked. If any check fails, ValueError or TypeError is raised and
        nothing is changed.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = self._state_names()
        missing = [name for name in expected if name not in state_dict]
        unexpected = [name for name in state_dict if name not in expected]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict does not match this layer ({self!r}): missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        staged = {name: self._checked_state_value(name, state_dict[name])
                  for name in expected if name in state_dict}
        with self._lock:
            for name in staged:
                target = getattr(self, name)
                if not isinstance(target, np.ndarray) or not target.flags.writeable:
                    raise ValueError(f"the layer's {name} is not a writable array")
            for name, value in staged.items():
                getattr(self, name)[...] = value
            self._statistics_exact = False
        return IncompatibleKeys(missing, unexpected)

    def _checked_state_value(self, name, value):
        try:
            array = np.asarray(value)
        except Exception as error:  # e.g. a torch tensor that requires grad
            raise TypeError(f"state_dict[{name!r}] is not an array: {error}") from None
        if name == "num_batches_tracked":
            if array.dtype.kind not in "iu" or array.shape != ():
                raise TypeError(f"state_dict['num_batches_tracked'] must be an integer of shape "
                                f"(), got dtype {array.dtype} and shape {array.shape}")
            if array < 0:
                raise ValueError(f"state_dict['num_batches_tracked'] must be >= 0, got {array}")
            return array.astype(np.int64)
        if array.dtype.kind != "f":
            raise TypeError(f"state_dict[{name!r}] must have a float dtype, got {array.dtype}")
        if array.shape != (self.num_features,):
            raise ValueError(f"state_dict[{name!r}] must have shape ({self.num_features},), "
                             f"got {array.shape}")
        return array.astype(self.dtype)

    def _config(self):
        return {
            "format": _SAVE_FORMAT,
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "axis": self.axis,
            "dtype": self.dtype.name,
            "debias": self.debias,
            "training": self.training,
            "statistics_exact": self._statistics_exact,
        }

    def save(self, path):
        """Save configuration, mode and state to a .npz file (``numpy.savez``'s ``path``).

        :meth:`load` restores it. The arrays are stored under :meth:`state_dict`'s keys,
        the configuration as JSON under ``__config__``; the file loads without pickle.
        """
        with self._lock:  # a consistent snapshot; the file is written outside the lock
            arrays = {name: np.array(getattr(self, name)) for name in self._state_names()}
            arrays[_CONFIG_KEY] = np.array(json.dumps(self._config()))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path):
        """A layer from a file written by :meth:`save`, in the mode it was saved in."""
        with np.load(path, allow_pickle=False) as data:
            if _CONFIG_KEY not in data.files:
                raise ValueError(f"{path} was not written by BatchNorm.save (no {_CONFIG_KEY})")
            config = json.loads(data[_CONFIG_KEY].item())
            arrays = {name: data[name] for name in data.files if name != _CONFIG_KEY}
        if config.get("format") != _SAVE_FORMAT:
            raise ValueError(f"{path}: unknown BatchNorm file format {config.get('format')!r}")
        layer = cls(config["num_features"], eps=config["eps"], momentum=config["momentum"],
                    affine=config["affine"], track_running_stats=config["track_running_stats"],
                    axis=config["axis"], dtype=np.dtype(config["dtype"]),
                    debias=config["debias"])
        layer.load_state_dict(arrays, strict=True)
        layer.training = config["training"]
        layer._statistics_exact = config["statistics_exact"]
        return layer

    def __getstate__(self):
        # The lock cannot be pickled, and the last forward's context (a reference to its
        # input) is not state: backward needs a new forward after unpickling. LayerCall's
        # attributes live in C slots, not in __dict__.
        state = self.__dict__.copy()
        del state["_lock"]
        state.update((name, getattr(self, name)) for name in _CALL_STATE_NAMES)
        return state

    def __setstate__(self, state):
        state = dict(state)
        for name in _CALL_STATE_NAMES:
            setattr(self, name, state.pop(name))
        self.__dict__.update(state)
        self._context = None
        self._lock = threading.Lock()

    def __repr__(self):
        text = (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}")
        if self.dtype != np.float32:
            text += f", dtype={self.dtype.name}"
        if self.debias:
            text += ", debias=True"
        return text + ")"


_FLOAT_TYPE_NUMBERS = (np.dtype(np.float32).num, np.dtype(np.float64).num)


def _invstd(var, eps):
    """1 / sqrt(var + eps) in float64, quietly inf or NaN where the kernels give inf or NaN
    (eps=0 with a zero variance; a negative running variance set by hand)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(var.astype(np.float64) + eps)


def _is_float(dtype):
    """Whether dtype is float32 or float64, in any byte order (as the functions take them)."""
    return dtype.num in _FLOAT_TYPE_NUMBERS


def _check_like_output(array, name, x):
    """backward's checks that ``array`` is an array shaped as the forward call's output."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.shape != x.shape:
        raise ValueError(
            f"{name} must have the shape of the last forward call's output {x.shape}, "
            f"got {array.shape}"
        )


def _is_dask_array(value):
    # Told without importing dask, which is optional: a Dask array's type comes from dask,
    # so dask.array is loaded already when value is one.
    if not type(value).__module__.startswith("dask"):
        return False
    dask_array = sys.modules.get("dask.array")
    return dask_array is not None and isinstance(value, dask_array.Array)


# ---------------------------------------------------------------------------- fold


def fold(weight, bias, bn):
    """Fold an eval-mode BatchNorm into the linear or convolution layer before it.

    Parameters
    ----------
    weight : numpy.ndarray of a float dtype
        The layer's weight: (out, in) for a linear layer, (out, in, *kernel) for a
        convolution (PyTorch's layouts). out must be bn.num_features.
    bias : numpy.ndarray of shape (out,), or None
        The layer's bias; None means none (zeros).
    bn : BatchNorm
        In eval mode, with running statistics: the statistics it normalizes with in eval
        mode (debiased, with debias=True) are the ones folded.

    Returns
    -------
    weight, bias : numpy.ndarray
        New arrays (the inputs are not changed), computed in float64 and returned in the
        input's dtype (bias in weight's dtype when bias is None): the layer with these
        alone computes ``bn(layer(x))``, with
        ``scale = bn.weight / sqrt(var + eps)``, ``weight * scale`` per output channel and
        ``(bias - mean) * scale + bn.bias``.
    """
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a fastbn.BatchNorm, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(
            "bn is in training mode, where it normalizes with each batch's own statistics, "
            "which no fixed layer reproduces; call bn.eval() first"
        )
    if bn.running_mean is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): it "
                         "normalizes with batch statistics in eval mode too, so it cannot fold")
    if not isinstance(weight, np.ndarray) or weight.dtype.kind != "f":
        raise TypeError("weight must be a numpy.ndarray of a float dtype, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.ndim < 2:
        raise ValueError(f"weight must have shape (out, in) or (out, in, *kernel), "
                         f"got {weight.shape}")
    if weight.shape[0] != bn.num_features:
        raise ValueError(f"weight has {weight.shape[0]} output channels (shape {weight.shape}), "
                         f"but bn has num_features={bn.num_features}")
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype.kind != "f":
            raise TypeError("bias must be None or a numpy.ndarray of a float dtype, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
    with bn._lock:
        mean, var, _ = bn._eval_statistics()
        mean = mean.astype(np.float64)
        scale = _invstd(var, bn.eps)
        shift = np.zeros(bn.num_features) if bn.bias is None else bn.bias.astype(np.float64)
        if bn.weight is not None:
            scale *= bn.weight
    layer_bias = 0.0 if bias is None else bias.astype(np.float64)
    folded_weight = weight.astype(np.float64) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    folded_bias = (layer_bias - mean) * scale + shift
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return folded_weight.astype(weight.dtype), folded_bias.astype(bias_dtype)
