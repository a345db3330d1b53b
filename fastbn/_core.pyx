"""The functional API: every argument is checked, then one C kernel runs without the GIL.

Nothing is written before every check has passed: not ``out``, not the running
statistics. Arrays reach the kernels aligned, in native byte order and filling one block
of memory, x in its own order of axes (C, Fortran, a transpose of either), which the
kernels see as (outer, channels, inner) in that order; x that is not is copied once, in
that order (NumPy's order="K"). Outputs are laid out as numpy.empty_like(x) would be.
"""

import numbers
import operator

import numpy as np

cimport numpy as cnp

from fastbn._kernels cimport *

cnp.import_array()

_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


# ----------------------------------------------------------------------------- checks

cdef inline tuple _shape(cnp.ndarray array):
    return (<object>array).shape


cdef inline cnp.ndarray _kernel_ready(cnp.ndarray array):
    """``array`` as a kernel reads it: C-contiguous, aligned, native byte order."""
    if cnp.PyArray_ISCARRAY_RO(array) and cnp.PyArray_ISNOTSWAPPED(array):
        return array
    return np.array(array, dtype=array.dtype.newbyteorder("="), order="C")  # a new, aligned copy


cdef tuple _memory_order(cnp.ndarray array):
    """The axes of ``array`` from the slowest-varying in memory to the fastest, where its
    elements fill one block of memory in that order, aligned and in native byte order (a
    Fortran-ordered array, a transpose of a C-contiguous one); else None. Axes of length 1
    come first (they take no room)."""
    if (not cnp.PyArray_ISALIGNED(array) or not cnp.PyArray_ISNOTSWAPPED(array)
            or cnp.PyArray_SIZE(array) == 0):
        return None
    shape, strides = _shape(array), (<object>array).strides
    order = sorted(range(len(shape)), key=lambda k: (shape[k] != 1, -strides[k]))
    cdef cnp.npy_intp expected = cnp.PyArray_ITEMSIZE(array)
    for k in reversed(order):
        if shape[k] != 1:
            if strides[k] != expected:
                return None
            expected *= shape[k]
    return tuple(order)


cdef bint _same_layout(cnp.ndarray a, cnp.ndarray b):
    """Whether a and b, of one shape and dtype, lay their elements out alike in memory."""
    if cnp.PyArray_SIZE(a) == 0:
        return True
    cdef int k
    for k in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, k) != 1 and cnp.PyArray_STRIDE(a, k) != cnp.PyArray_STRIDE(b, k):
            return False
    return True


cdef cnp.ndarray _like(cnp.ndarray x):
    """A new array laid out as x (C-contiguous, or x's own order of axes)."""
    if cnp.PyArray_IS_C_CONTIGUOUS(x):
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)
    return np.empty_like(x)  # order="K": x's order of axes, for an x filling one block


cdef cnp.ndarray _float_array(object value, str name):
    if not isinstance(value, cnp.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of float32 or float64, got {type(value).__name__}"
        )
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>value)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError(f"{name} must have dtype float32 or float64, got {value.dtype}")
    return <cnp.ndarray>value


cdef cnp.ndarray _channel_array(object value, str name, cnp.ndarray x, cnp.npy_intp channels):
    """A per-channel array: shape (channels,), x's dtype. Returned as passed (not copied)."""
    if not isinstance(value, cnp.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of shape ({channels},) and dtype "
            f"{x.dtype.name}, got {type(value).__name__}"
        )
    cdef cnp.ndarray array = <cnp.ndarray>value
    if cnp.PyArray_TYPE(array) != cnp.PyArray_TYPE(x):
        raise TypeError(f"{name} must have the input's dtype {x.dtype.name}, got {array.dtype}")
    if cnp.PyArray_NDIM(array) != 1 or cnp.PyArray_DIM(array, 0) != channels:
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel of x, "
            f"got shape {_shape(array)}"
        )
    return array


cdef int _channel_axis(object axis, int ndim) except -1:
    cdef Py_ssize_t index
    if type(axis) is int:  # the common case, without a call to operator.index
        index = axis
    elif isinstance(axis, bool):
        raise TypeError("axis must be an integer, got bool")
    else:
        try:
            index = operator.index(axis)
        except TypeError:
            raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= index < ndim:
        raise np.exceptions.AxisError(index, ndim, "axis")
    return index + ndim if index < 0 else index


def _normalize_axis(axis, ndim):
    """``axis`` of an ``ndim``-dimensional array as a non-negative index; the errors every
    function gives for a bad axis. For the Python modules that take an axis too."""
    return _channel_axis(axis, ndim)


cdef double _real(object value, str name) except? -1.0:
    if type(value) is float:
        return <double>value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return <double>value


cdef double _eps(object eps) except? -1.0:
    cdef double value = _real(eps, "eps")
    if not (0.0 <= value < float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


cdef double _momentum(object momentum) except? -1.0:
    cdef double value = _real(momentum, "momentum")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return value


cdef class _Batch:
    """An input checked and viewed as the kernels see it: (outer, channels, inner), the
    axes before and after the channel axis in x's memory order ((1, 1, M) for one
    channel)."""
    cdef cnp.ndarray x  # kernel-ready: the input itself where it fills one block of memory
    cdef fbn_shape shape
    cdef int axis
    cdef bint single_precision


cdef _Batch _batch(object x, object axis, bint one_example=False):
    """x as the kernels see it. one_example: x is one example of C values, (C,), seen as
    (1, C, 1) (the layer's call takes those; the functions take batches only)."""
    cdef cnp.ndarray array = _float_array(x, "x")
    cdef int ndim = cnp.PyArray_NDIM(array)
    if one_example:
        if ndim != 1:
            raise ValueError(f"one example must be a 1-D array, got shape {_shape(array)}")
        axis = 0
    elif ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (batch, channels, ...), got shape {_shape(array)}"
        )
    cdef _Batch batch = _Batch.__new__(_Batch)
    batch.axis = _channel_axis(axis, ndim)
    batch.single_precision = cnp.PyArray_TYPE(array) == cnp.NPY_FLOAT32
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(array)
    batch.shape.channels = dims[batch.axis]
    batch.shape.outer = 1
    batch.shape.inner = 1
    cdef int i
    if cnp.PyArray_ISCARRAY_RO(array) and cnp.PyArray_ISNOTSWAPPED(array):
        batch.x = array
    else:
        order = _memory_order(array)
        if order is None:  # a new, aligned, native copy in x's order of axes
            array = np.array(array, dtype=array.dtype.newbyteorder("="), order="K")
            order = _memory_order(array)
        batch.x = array if order is not None else _kernel_ready(array)  # (empty: C order)
        if order is not None:
            at = order.index(batch.axis)
            for i in order[:at]:
                batch.shape.outer *= dims[i]
            for i in order[at + 1:]:
                batch.shape.inner *= dims[i]
            return _one_run_for_one_channel(batch)
    for i in range(batch.axis):
        batch.shape.outer *= dims[i]
    for i in range(batch.axis + 1, ndim):
        batch.shape.inner *= dims[i]
    return _one_run_for_one_channel(batch)


cdef _Batch _one_run_for_one_channel(_Batch batch):
    """A single channel's values fill x's block of memory: the kernels see them as one run,
    (1, 1, M), their fastest walk, rather than as runs or rows. Float32, paired runs, one
    thread: (53167, 1, 76) training forward 0.20x the time, backward 0.68x; (4817, 1, 633)
    0.56x and 0.67x; (1173764, 1) backward 0.58x, training forward 1.08x; two threads
    0.27-0.96x and 0.56-0.94x; eval 0.75-1.03x."""
    if batch.shape.channels == 1:
        batch.shape.inner *= batch.shape.outer
        batch.shape.outer = 1
    return batch


cdef int _check_training_batch(_Batch batch) except -1:
    if batch.shape.outer * batch.shape.inner <= 1:
        raise ValueError(f"{_ONE_VALUE_PER_CHANNEL}, got input of shape {_shape(batch.x)}")
    return 0


cdef void _span(cnp.ndarray array, char **low, char **high) noexcept:
    """The bytes [low, high) that array's elements lie in (empty for an empty array)."""
    low[0] = high[0] = <char *>cnp.PyArray_DATA(array)
    if cnp.PyArray_SIZE(array) == 0:
        return
    cdef cnp.npy_intp extent
    cdef int k
    for k in range(cnp.PyArray_NDIM(array)):
        extent = (cnp.PyArray_DIM(array, k) - 1) * cnp.PyArray_STRIDE(array, k)
        if extent < 0:
            low[0] += extent
        else:
            high[0] += extent
    high[0] += cnp.PyArray_ITEMSIZE(array)


cdef bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether a and b may share memory: numpy.may_share_memory's test of their bounds,
    without its ~0.4 µs of call overhead, which small calls with ``out`` would pay."""
    cdef char *a_low
    cdef char *a_high
    cdef char *b_low
    cdef char *b_high
    _span(a, &a_low, &a_high)
    _span(b, &b_low, &b_high)
    return a_low < b_high and b_low < a_high


#: _copy over fewer values runs on the calling thread, as eval does (csrc/fastbn.h).
_COPY_PARALLEL_MIN_ELEMENTS = FBN_ONE_PASS_PARALLEL_MIN_ELEMENTS


def _copy(cnp.ndarray out not None, cnp.ndarray x not None):
    """out[...] = x with the kernels' threads: the benchmark's memory floor (fastbn/bench).
    Both C-contiguous and of one dtype and size, out writable and apart from x."""
    if (not cnp.PyArray_IS_C_CONTIGUOUS(out) or not cnp.PyArray_IS_C_CONTIGUOUS(x)
            or not cnp.PyArray_ISWRITEABLE(out) or cnp.PyArray_TYPE(out) != cnp.PyArray_TYPE(x)
            or cnp.PyArray_SIZE(out) != cnp.PyArray_SIZE(x) or _overlap(out, x)):
        raise ValueError("_copy takes two C-contiguous arrays of one dtype and size, apart, "
                         "the first writable")
    cdef void *dst = cnp.PyArray_DATA(out)
    cdef const void *src = cnp.PyArray_DATA(x)
    cdef int64_t elements = cnp.PyArray_SIZE(x)
    cdef int64_t itemsize = cnp.PyArray_ITEMSIZE(x)
    with nogil:
        fbn_copy(dst, src, elements, itemsize)


def _may_share_memory(cnp.ndarray a not None, cnp.ndarray b not None):
    """numpy.may_share_memory(a, b) for arrays, faster (for the layer's out= checks)."""
    return _overlap(a, b)


_C_LAYOUT = "out must be C-contiguous and aligned"


cdef str _layout_error(cnp.ndarray x, cnp.ndarray out):
    """Why ``out`` cannot take the output of a kernel reading x (kernel-ready), or None."""
    if cnp.PyArray_IS_C_CONTIGUOUS(x):
        return None if cnp.PyArray_ISCARRAY_RO(out) else _C_LAYOUT
    if not cnp.PyArray_ISALIGNED(out) or not _same_layout(out, x):
        return (f"out must be aligned and laid out in memory as x (strides "
                f"{(<object>x).strides}), got strides {(<object>out).strides}")
    return None


def _check_out_layout(cnp.ndarray x not None, cnp.ndarray out not None):
    """Raises the ValueError a kernel call on x would raise for out's memory layout (x and
    out of one shape and dtype), without copying x: for checks before a collective call."""
    if _memory_order(x) is None:  # not read in place (as _batch decides)
        x = np.empty_like(x)  # laid out as the copy the kernel would read (order="K")
    message = _layout_error(x, out)
    if message is not None:
        raise ValueError(message)


cdef cnp.ndarray _output(_Batch batch, object out):
    """A fresh output array laid out as x, or ``out`` once it is known to fit; x is copied
    if out overlaps it."""
    cdef cnp.ndarray x = batch.x
    if out is None:
        return _like(x)
    if not isinstance(out, cnp.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    cdef cnp.ndarray array = <cnp.ndarray>out
    if cnp.PyArray_TYPE(array) != cnp.PyArray_TYPE(x) or not cnp.PyArray_ISNOTSWAPPED(array):
        raise TypeError(f"out must have the input's dtype {x.dtype.name}, got {array.dtype}")
    if (cnp.PyArray_NDIM(array) != cnp.PyArray_NDIM(x) or
            not cnp.PyArray_CompareLists(cnp.PyArray_DIMS(array), cnp.PyArray_DIMS(x),
                                         cnp.PyArray_NDIM(x))):
        raise ValueError(f"out must have the input's shape {_shape(x)}, got {_shape(array)}")
    message = _layout_error(x, array)
    if message is not None:
        raise ValueError(message)
    if not cnp.PyArray_ISWRITEABLE(array):
        raise ValueError("out is read-only")
    if cnp.PyArray_DATA(array) != cnp.PyArray_DATA(x) and _overlap(array, x):
        batch.x = x.copy(order="K")  # out overlaps x without being x: read a copy
    return array


cdef inline const void *_data(cnp.ndarray array):
    return NULL if array is None else cnp.PyArray_DATA(array)


cdef inline cnp.ndarray _ready_or_none(cnp.ndarray array):
    return None if array is None else _kernel_ready(array)


cdef inline int _raise_on_failure(int status) except -1:
    if status == FBN_NO_MEMORY:
        raise MemoryError("fastbn: not enough memory for the kernel's scratch space")
    return 0


# ----------------------------------------------------------------------- kernel calls

cdef tuple _train_kernel(_Batch batch, cnp.ndarray y, cnp.ndarray weight, cnp.ndarray bias,
                         double eps, bint float64_statistics, bint statistics_as_x):
    """Runs the training forward kernel. Returns the batch statistics asked for: the mean
    and biased variance in float64 (float64_statistics), then the mean and invstd in x's
    dtype (statistics_as_x), both computed by the kernel's threads."""
    cdef cnp.npy_intp channels = batch.shape.channels
    cdef cnp.ndarray mean = None, var = None, batch_mean = None, invstd = None
    if float64_statistics:
        mean = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
        var = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
    if statistics_as_x:
        batch_mean = cnp.PyArray_EMPTY(1, &channels, cnp.PyArray_TYPE(y), 0)
        invstd = cnp.PyArray_EMPTY(1, &channels, cnp.PyArray_TYPE(y), 0)
    weight = _ready_or_none(weight)
    bias = _ready_or_none(bias)
    cdef const void *xp = _data(batch.x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef const void *wp = _data(weight)
    cdef const void *bp = _data(bias)
    cdef double *meanp = <double *>_data(mean)
    cdef double *varp = <double *>_data(var)
    cdef void *batch_meanp = <void *>_data(batch_mean)
    cdef void *invstdp = <void *>_data(invstd)
    cdef int status
    with nogil:
        if batch.single_precision:
            status = fbn_forward_train_f32(<const float *>xp, <float *>yp, batch.shape,
                                           <const float *>wp, <const float *>bp, eps, meanp, varp,
                                           <float *>batch_meanp, <float *>invstdp)
        else:
            status = fbn_forward_train_f64(<const double *>xp, <double *>yp, batch.shape,
                                           <const double *>wp, <const double *>bp, eps, meanp,
                                           varp, <double *>batch_meanp, <double *>invstdp)
    _raise_on_failure(status)
    return ((mean, var) if float64_statistics else ()) + (
        (batch_mean, invstd) if statistics_as_x else ())


cdef _eval_kernel(_Batch batch, cnp.ndarray y, cnp.ndarray running_mean,
                  cnp.ndarray running_var, cnp.ndarray weight, cnp.ndarray bias, double eps):
    running_mean = _kernel_ready(running_mean)
    running_var = _kernel_ready(running_var)
    weight = _ready_or_none(weight)
    bias = _ready_or_none(bias)
    cdef const void *xp = _data(batch.x)
    cdef void *yp = cnp.PyArray_DATA(y)
    cdef const void *mp = _data(running_mean)
    cdef const void *vp = _data(running_var)
    cdef const void *wp = _data(weight)
    cdef const void *bp = _data(bias)
    cdef int status
    with nogil:
        if batch.single_precision:
            status = fbn_forward_eval_f32(<const float *>xp, <float *>yp, batch.shape,
                                          <const float *>mp, <const float *>vp,
                                          <const float *>wp, <const float *>bp, eps)
        else:
            status = fbn_forward_eval_f64(<const double *>xp, <double *>yp, batch.shape,
                                          <const double *>mp, <const double *>vp,
                                          <const double *>wp, <const double *>bp, eps)
    _raise_on_failure(status)


# ---------------------------------------------------------------------- public API

def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input; the channel (feature) axis is ``axis``. Any memory order: C, Fortran or
        a transpose of either is read in place; other input is copied once, in the same
        order of axes.
    running_mean, running_var : numpy.ndarray of shape (C,) or None
        Running statistics, of x's dtype. Required when ``training`` is false. When
        ``training`` is true and they are given, they are updated in place:
        ``running = (1 - momentum) * running + momentum * batch_statistic``, with the
        unbiased batch variance for ``running_var`` (PyTorch's rule).
    weight, bias : numpy.ndarray of shape (C,) or None
        Affine parameters (gamma, beta), of x's dtype; None means 1 and 0.
    training : bool
        True: normalize with the batch statistics (accumulated in float64 with
        Chan's merge of per-block moments). False: with the running statistics.
    momentum : float in [0, 1]
        Weight of the new batch in the running statistics (PyTorch's convention;
        Keras's momentum is 1 minus this).
    eps : float >= 0
        Added to the variance before the square root.
    axis : int, keyword-only
        The channel axis: 1 for NC, NCL, NCHW, NCDHW; -1 for channels-last.
    out : numpy.ndarray, optional, keyword-only
        Where to write the result: writable, x's shape and dtype, laid out in memory as
        ``numpy.empty_like(x)`` (C-contiguous for C-contiguous x). ``out=x`` normalizes
        in place.

    Returns
    -------
    y : numpy.ndarray
        The normalized input, x's shape and dtype, laid out as ``numpy.empty_like(x)``
        (``out`` if given).

    Raises
    ------
    TypeError
        An argument is not an ndarray, or not of the float dtype it must have.
    ValueError
        A shape does not fit, ``axis``, ``eps`` or ``momentum`` is out of range, a
        running statistic to update is read-only, a training batch has one value per
        channel, or the running statistics are missing in eval mode.
    """
    if not training:
        _momentum(momentum)
        return _eval_forward(x, running_mean, running_var, weight, bias, eps, axis, out)
    cdef _Batch batch = _batch(x, axis)
    cdef cnp.npy_intp channels = batch.shape.channels
    cdef double eps_value = _eps(eps)
    cdef double momentum_value = _momentum(momentum)
    cdef cnp.ndarray weight_array = None if weight is None else _channel_array(weight, "weight", batch.x, channels)
    cdef cnp.ndarray bias_array = None if bias is None else _channel_array(bias, "bias", batch.x, channels)
    cdef cnp.ndarray mean_array = None if running_mean is None else _channel_array(running_mean, "running_mean", batch.x, channels)
    cdef cnp.ndarray var_array = None if running_var is None else _channel_array(running_var, "running_var", batch.x, channels)
    cdef cnp.ndarray y
    if (mean_array is None) != (var_array is None):
        raise ValueError("running_mean and running_var must be given together, or both None")
    for name, array in (("running_mean", mean_array), ("running_var", var_array)):
        if array is not None and not cnp.PyArray_ISWRITEABLE(array):
            raise ValueError(f"{name} is read-only, but training updates it in place")
    _check_training_batch(batch)
    y = _output(batch, out)
    if mean_array is None:
        _train_kernel(batch, y, weight_array, bias_array, eps_value, False, False)
        return y
    mean, var = _train_kernel(batch, y, weight_array, bias_array, eps_value, True, False)
    _update_running(mean_array, var_array, mean, var, momentum_value,
                    batch.shape.outer * batch.shape.inner)
    return y


cdef cnp.ndarray _eval_forward(object x, object running_mean, object running_var,
                               object weight, object bias, object eps, object axis,
                               object out, bint one_example=False):
    """batch_norm in eval mode (the layer's eval call comes here too, _core.pxd); with
    one_example, x (and out) of shape (C,)."""
    cdef _Batch batch = _batch(x, axis, one_example)
    cdef cnp.npy_intp channels = batch.shape.channels
    cdef double eps_value = _eps(eps)
    cdef cnp.ndarray weight_array = None if weight is None else _channel_array(weight, "weight", batch.x, channels)
    cdef cnp.ndarray bias_array = None if bias is None else _channel_array(bias, "bias", batch.x, channels)
    cdef cnp.ndarray mean_array = None if running_mean is None else _channel_array(running_mean, "running_mean", batch.x, channels)
    cdef cnp.ndarray var_array = None if running_var is None else _channel_array(running_var, "running_var", batch.x, channels)
    if mean_array is None or var_array is None:
        raise ValueError(
            "running_mean and running_var are required when training=False "
            "(eval mode normalizes with them)"
        )
    cdef cnp.ndarray y = _output(batch, out)
    _eval_kernel(batch, y, mean_array, var_array, weight_array, bias_array, eps_value)
    return y


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Training-mode batch normalization that also returns what the backward pass needs.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Input, channel axis ``axis``; more than one value per channel.
    weight, bias : numpy.ndarray of shape (C,) or None
        Affine parameters, of x's dtype; None means 1 and 0.
    eps : float >= 0
        Added to the variance before the square root.
    axis : int, keyword-only
        The channel axis (1 for NCHW, -1 for channels-last).
    out : numpy.ndarray, optional, keyword-only
        Writable, x's shape and dtype, laid out as ``numpy.empty_like(x)``; ``out=x``
        works in place.

    Returns
    -------
    y : numpy.ndarray
        ``weight * (x - mean) * invstd + bias``, x's shape and dtype.
    mean : numpy.ndarray of shape (C,)
        Batch mean per channel, x's dtype (accumulated in float64).
    invstd : numpy.ndarray of shape (C,)
        ``1 / sqrt(var + eps)`` with the biased batch variance, x's dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm`.
    """
    return _train_forward(x, weight, bias, eps, axis=axis, out=out, statistics_as_x=True)


cpdef int _check_statistics(cnp.ndarray mean, cnp.ndarray var, cnp.npy_intp channels) except -1:
    """The float64 batch statistics of `channels` channels that _mean_invstd and
    _update_running read as raw arrays: they come from fastbn's kernels or from a layer's
    _normalize_with_batch_statistics hook (SyncBatchNorm's), and anything else is refused
    rather than read past its end."""
    for name, array in (("mean", mean), ("var", var)):
        if (cnp.PyArray_TYPE(array) != cnp.NPY_FLOAT64 or cnp.PyArray_NDIM(array) != 1
                or not cnp.PyArray_ISCARRAY_RO(array) or not cnp.PyArray_ISNOTSWAPPED(array)):
            raise ValueError(f"{name} must be a C-contiguous 1-D float64 array in native "
                             f"byte order, got {array.dtype} of shape {_shape(array)}")
        if cnp.PyArray_DIM(array, 0) != channels:
            raise ValueError(f"{name} must have shape ({channels},), got {_shape(array)}")
    return 0


def _mean_invstd(cnp.ndarray mean not None, cnp.ndarray var not None, double eps, dtype):
    """(mean, invstd) in ``dtype`` (float32 or float64) from float64 batch statistics (the
    kernel's, C-contiguous), as batch_norm_train returns them: invstd = 1 / sqrt(var + eps)
    in float64, rounded once (for the layer, which keeps the float64 ones too)."""
    cdef cnp.npy_intp channels = cnp.PyArray_SIZE(mean)  # any rank: checked 1-D next
    _check_statistics(mean, var, channels)
    cdef int typenum = np.dtype(dtype).num
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    cdef cnp.ndarray batch_mean = cnp.PyArray_EMPTY(1, &channels, typenum, 0)
    cdef cnp.ndarray invstd = cnp.PyArray_EMPTY(1, &channels, typenum, 0)
    cdef const double *meanp = <const double *>cnp.PyArray_DATA(mean)
    cdef const double *varp = <const double *>cnp.PyArray_DATA(var)
    if typenum == cnp.NPY_FLOAT32:
        fbn_mean_invstd_f32(meanp, varp, eps, channels, <float *>cnp.PyArray_DATA(batch_mean),
                            <float *>cnp.PyArray_DATA(invstd))
    else:
        fbn_mean_invstd_f64(meanp, varp, eps, channels, <double *>cnp.PyArray_DATA(batch_mean),
                            <double *>cnp.PyArray_DATA(invstd))
    return batch_mean, invstd


cdef inline bint _plain_array(cnp.ndarray array, int typenum) noexcept:
    """A writable, aligned, C-contiguous array of typenum in native byte order."""
    return (cnp.PyArray_TYPE(array) == typenum and cnp.PyArray_ISCARRAY(array)
            and cnp.PyArray_ISNOTSWAPPED(array))


def _update_running(cnp.ndarray running_mean not None, cnp.ndarray running_var not None,
                    cnp.ndarray mean not None, cnp.ndarray var not None, double factor,
                    double count):
    """PyTorch's update of the running statistics, in place: running = (1 - factor) *
    running + factor * batch statistic, in float64, stored in the running arrays' dtype.
    ``mean`` and ``var`` are the batch's float64 mean and biased variance (C-contiguous,
    from the kernel) over ``count`` values per channel; the variance enters unbiased. A
    float32 value beyond float32's range becomes inf, as in PyTorch. The caller has checked
    the running arrays: writable, of shape (C,), float32 or float64, one dtype. A loop over
    the channels (~0.3 us for 512); running arrays that are strided, unaligned or in the
    other byte order (batch_norm takes any) are updated through plain copies of them."""
    _check_statistics(mean, var, cnp.PyArray_DIM(running_mean, 0))
    cdef double kept = 1.0 - factor, unbias = count / (count - 1)
    cdef cnp.npy_intp c, channels = cnp.PyArray_DIM(mean, 0)
    cdef const double *meanp = <const double *>cnp.PyArray_DATA(mean)
    cdef const double *varp = <const double *>cnp.PyArray_DATA(var)
    cdef float *mean32
    cdef float *var32
    cdef double *mean64
    cdef double *var64
    cdef int typenum = cnp.PyArray_TYPE(running_mean)
    if not (_plain_array(running_mean, typenum) and _plain_array(running_var, typenum)):
        native = running_mean.dtype.newbyteorder("=")
        plain_mean, plain_var = np.array(running_mean, native), np.array(running_var, native)
        _update_running(plain_mean, plain_var, mean, var, factor, count)
        running_mean[...] = plain_mean
        running_var[...] = plain_var
        return
    if typenum == cnp.NPY_FLOAT32:
        mean32 = <float *>cnp.PyArray_DATA(running_mean)
        var32 = <float *>cnp.PyArray_DATA(running_var)
        for c in range(channels):
            mean32[c] = <float>(mean32[c] * kept + meanp[c] * factor)
            var32[c] = <float>(var32[c] * kept + varp[c] * unbias * factor)
    else:
        mean64 = <double *>cnp.PyArray_DATA(running_mean)
        var64 = <double *>cnp.PyArray_DATA(running_var)
        for c in range(channels):
            mean64[c] = mean64[c] * kept + meanp[c] * factor
            var64[c] = var64[c] * kept + varp[c] * unbias * factor


def _train_forward(x, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
                   bint statistics_as_x=False):
    """:func:`batch_norm_train` with the batch statistics as computed: (y, mean, var), the
    biased variance, both float64, for the layer, which keeps them at full precision; or,
    with statistics_as_x, (y, mean, invstd) in x's dtype, as batch_norm_train returns."""
    cdef _Batch batch = _batch(x, axis)
    cdef cnp.npy_intp channels = batch.shape.channels
    cdef double eps_value = _eps(eps)
    cdef cnp.ndarray weight_array = None if weight is None else _channel_array(weight, "weight", batch.x, channels)
    cdef cnp.ndarray bias_array = None if bias is None else _channel_array(bias, "bias", batch.x, channels)
    _check_training_batch(batch)
    cdef cnp.ndarray y = _output(batch, out)
    return (y,) + _train_kernel(batch, y, weight_array, bias_array, eps_value,
                                not statistics_as_x, statistics_as_x)


def _moments(x, *, axis=1):
    """Per-channel (count, mean, m2) of x in float64, m2 the sum of squared deviations.

    The same blocked, Chan-merged kernel as the training forward pass; count may be 0.
    """
    cdef _Batch batch = _batch(x, axis)
    cdef cnp.npy_intp channels = batch.shape.channels
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray m2 = cnp.PyArray_EMPTY(1, &channels, cnp.NPY_FLOAT64, 0)
    cdef const void *xp = _data(batch.x)
    cdef double *meanp = <double *>cnp.PyArray_DATA(mean)
    cdef double *m2p = <double *>cnp.PyArray_DATA(m2)
    cdef int status
    with nogil:
        if batch.single_precision:
            status = fbn_moments_f32(<const float *>xp, batch.shape, meanp, m2p)
        else:
            status = fbn_moments_f64(<const double *>xp, batch.shape, meanp, m2p)
    _raise_on_failure(status)
    return batch.shape.outer * batch.shape.inner, mean, m2


def batch_norm_backward(grad_out, x, mean, invstd, weight=None, *, training=True, axis=1,
                        out=None):
    """Gradients of batch normalization with respect to x, weight and bias.

    Parameters
    ----------
    grad_out : numpy.ndarray
        Gradient of the loss with respect to the output; x's shape and dtype.
    x : numpy.ndarray of float32 or float64, ndim >= 2
        The forward pass's input.
    mean, invstd : numpy.ndarray of shape (C,)
        What :func:`batch_norm_train` returned (training), or the constants the forward
        pass used in eval mode: ``running_mean`` and ``1 / sqrt(running_var + eps)``.
        x's dtype.
    weight : numpy.ndarray of shape (C,) or None
        The forward pass's weight; None means 1.
    training : bool, keyword-only
        True: mean and invstd are batch statistics, functions of x, and their gradient
        is included. False: they are constants (eval mode).
    axis : int, keyword-only
        The channel axis.
    out : numpy.ndarray, optional, keyword-only
        Where to write grad_x: writable, x's shape and dtype, laid out as
        ``numpy.empty_like(x)``. ``out=grad_out``
        (or ``out=x``) works in place.

    Returns
    -------
    grad_x : numpy.ndarray
        x's shape and dtype, laid out as ``numpy.empty_like(x)`` (``out`` if given).
    grad_weight, grad_bias : numpy.ndarray of shape (C,)
        ``sum(grad_out * (x - mean) * invstd)`` and ``sum(grad_out)`` over all but the
        channel axis, accumulated in float64; returned even when weight is None.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm`; also when grad_out's shape or dtype differs from x's.
    """
    cdef _Batch batch = _batch(x, axis)
    cdef cnp.npy_intp channels = batch.shape.channels
    cdef cnp.ndarray grad_array = _float_array(grad_out, "grad_out")
    if cnp.PyArray_TYPE(grad_array) != cnp.PyArray_TYPE(batch.x):
        raise TypeError(
            f"grad_out must have the input's dtype {batch.x.dtype.name}, got {grad_array.dtype}"
        )
    if _shape(grad_array) != _shape(batch.x):
        raise ValueError(
            f"grad_out must have the input's shape {_shape(batch.x)}, got {_shape(grad_array)}"
        )
    cdef cnp.ndarray mean_array = _kernel_ready(_channel_array(mean, "mean", batch.x, channels))
    cdef cnp.ndarray invstd_array = _kernel_ready(_channel_array(invstd, "invstd", batch.x, channels))
    cdef cnp.ndarray weight_array = None if weight is None else _kernel_ready(_channel_array(weight, "weight", batch.x, channels))
    cdef bint training_mode = bool(training)
    if training_mode:
        _check_training_batch(batch)
    if not (cnp.PyArray_ISALIGNED(grad_array) and cnp.PyArray_ISNOTSWAPPED(grad_array)
            and _same_layout(grad_array, batch.x)):
        fitted = _like(batch.x)  # read by the kernel in x's layout
        np.copyto(fitted, grad_array)
        grad_array = fitted

    cdef cnp.ndarray grad_x = _output(batch, out)
    if (out is not None and cnp.PyArray_DATA(grad_x) != cnp.PyArray_DATA(grad_array)
            and _overlap(grad_x, grad_array)):
        grad_array = grad_array.copy(order="K")  # out overlaps grad_out: read a copy
    cdef cnp.ndarray x_array = batch.x
    cdef cnp.ndarray grad_weight = cnp.PyArray_EMPTY(1, &channels, cnp.PyArray_TYPE(x_array), 0)
    cdef cnp.ndarray grad_bias = cnp.PyArray_EMPTY(1, &channels, cnp.PyArray_TYPE(x_array), 0)
    cdef const void *dyp = _data(grad_array)
    cdef const void *xp = _data(x_array)
    cdef void *dxp = cnp.PyArray_DATA(grad_x)
    cdef const void *mp = _data(mean_array)
    cdef const void *sp = _data(invstd_array)
    cdef const void *wp = _data(weight_array)
    cdef void *gwp = cnp.PyArray_DATA(grad_weight)
    cdef void *gbp = cnp.PyArray_DATA(grad_bias)
    cdef int status
    with nogil:
        if batch.single_precision:
            status = fbn_backward_f32(<const float *>dyp, <const float *>xp, <float *>dxp,
                                      batch.shape, <const float *>mp, <const float *>sp,
                                      <const float *>wp, training_mode, <float *>gwp,
                                      <float *>gbp)
        else:
            status = fbn_backward_f64(<const double *>dyp, <const double *>xp, <double *>dxp,
                                      batch.shape, <const double *>mp, <const double *>sp,
                                      <const double *>wp, training_mode, <double *>gwp,
                                      <double *>gbp)
    _raise_on_failure(status)
    return grad_x, grad_weight, grad_bias


# --------------------------------------------------------------------------- threads

def get_num_threads():
    """Number of threads fastbn's kernels use for large inputs.

    The value given to :func:`set_num_threads`, otherwise OpenMP's default
    (``OMP_NUM_THREADS``, or the limit set by ``threadpoolctl``). 1 when fastbn was
    built without OpenMP, and in a child process forked after OpenMP was used.
    """
    return fbn_get_num_threads()


def set_num_threads(num_threads):
    """Set the number of threads for fastbn's kernels, for the whole process.

    Parameters
    ----------
    num_threads : int >= 1, or None
        None returns to OpenMP's default (``OMP_NUM_THREADS``, threadpoolctl).
    """
    if num_threads is None:
        fbn_set_num_threads(0)
        return
    if isinstance(num_threads, bool):
        raise TypeError("num_threads must be an integer or None, got bool")
    try:
        value = operator.index(num_threads)
    except TypeError:
        raise TypeError(
            f"num_threads must be an integer or None, got {type(num_threads).__name__}"
        ) from None
    if value < 1:
        raise ValueError(f"num_threads must be >= 1, got {value}")
    fbn_set_num_threads(min(value, 1 << 16))


def openmp_enabled():
    """True when the kernels were built with OpenMP (see setup.py's FASTBN_OPENMP)."""
    return bool(fbn_openmp_enabled())


def build_info():
    """What this build and CPU provide: ``{"openmp": bool, "simd": str, "flags": str}``."""
    return {
        "openmp": bool(fbn_openmp_enabled()),
        "simd": fbn_simd_level().decode(),
        "flags": fbn_build_flags().decode(),
    }


# ----------------------------------------------------------------------- test hooks

def _contiguous_runs(outer, channels, inner, channel, begin, end):
    """The (offset, length) runs the kernels visit for ``channel`` over positions
    [begin, end) of an (outer, channels, inner) array. For tests of the 64-bit index
    arithmetic on shapes too large to allocate."""
    cdef fbn_shape shape
    shape.outer, shape.channels, shape.inner = outer, channels, inner
    cdef fbn_tile tile
    tile.c0, tile.c1, tile.m0, tile.m1 = channel, channel + 1, begin, end
    cdef fbn_spans spans = fbn_spans_of(shape, tile)
    cdef int64_t at, n
    runs = []
    while fbn_next_span(shape, &spans, &at, &n):
        runs.append((at + channel * inner, n))  # as the tile loops address channel c
    return runs


def _split(n, nparts):
    """The [begin, end) slices of range(n) that the kernels give to nparts threads."""
    cdef int64_t begin, end
    slices = []
    for part in range(nparts):
        fbn_split(n, part, nparts, &begin, &end)
        slices.append((begin, end))
    return slices


#: Below these many values a kernel doing each pass runs on the calling thread: (alone,
#: shared), shared where another thread keeps a pool of OpenMP threads (csrc/fastbn.h).
_PARALLEL_MIN_ELEMENTS = {
    "eval": (FBN_ONE_PASS_PARALLEL_MIN_ELEMENTS, FBN_SHARED_ONE_PASS_PARALLEL_MIN_ELEMENTS),
    "training": (FBN_PARALLEL_MIN_ELEMENTS, FBN_SHARED_PARALLEL_MIN_ELEMENTS),
    "backward": (FBN_BACKWARD_PARALLEL_MIN_ELEMENTS, FBN_SHARED_PARALLEL_MIN_ELEMENTS),
}
_PASSES = {
    "eval": FBN_PASS_EVAL,
    "training": FBN_PASS_TRAINING_FORWARD,
    "backward": FBN_PASS_BACKWARD,
}


def _threads_for(elements, kernel_pass):
    """The threads a kernel doing ``kernel_pass`` (a key of _PARALLEL_MIN_ELEMENTS) over
    ``elements`` values would take if called from this thread now."""
    return fbn_threads_for(elements, _PASSES[kernel_pass])


#: How a pass written through the cache would run (csrc/common.h: fbn_pace).
_PACES = {
    "one core": FBN_ONE_CORE,
    "chunked rows": FBN_CHUNKED_ROWS,
    "L3 speed": FBN_L3_SPEED,
}


def _streams_output(output_bytes, kernel_pass, pace):
    """Whether ``kernel_pass`` (a key of _PASSES) writes its output of ``output_bytes`` with
    streaming stores at ``pace`` (a key of _PACES)."""
    return bool(fbn_stream_output(output_bytes, _PASSES[kernel_pass], _PACES[pace]))
