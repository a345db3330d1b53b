"""Exact per-channel moments of Dask arrays: population statistics out of core.

:func:`moments` computes each chunk's moments with fastbn's kernels
(:func:`fastbn.moments`, float64 accumulation) where the chunk is, and merges them with
Chan's formula in a tree reduction (:func:`dask.array.reduction`), so no more than a few
chunks are in memory at once and the result is exact up to float64 rounding, however the
array is chunked. Chunks may cut the channel axis too: each chunk's moments then cover its
range of channels, and the reduction keeps the ranges apart.

Dask is optional: ``pip install "fastbn[dask]"``. This module imports without it and
raises ImportError saying so when it is used.
"""

import functools

import numpy as np

from fastbn._core import _normalize_axis
from fastbn.moments import Moments
from fastbn.moments import moments as _moments

__all__ = ["moments"]

#: A reduction's intermediate value: one record per channel of a chunk's channel range.
_RECORD = np.dtype([("count", np.float64), ("mean", np.float64), ("m2", np.float64)])


def _dask_array_module():
    try:
        import dask.array  # absolute import: the dask package, not this module
    except ImportError as error:
        raise ImportError(
            'fastbn.dask needs Dask: pip install "fastbn[dask]" (or "dask[array]")'
        ) from error
    return dask.array


def moments(array, *, axis=1, split_every=None):
    """Per-channel moments of a Dask array, exact and computed out of core.

    Parameters
    ----------
    array : dask.array.Array of float32 or float64, ndim >= 2
        The data, with the channel axis ``axis``, chunked in any way: along the channel
        axis too. Each chunk must fit in memory, the array need not.
    axis : int, keyword-only
        The channel axis (1 for NCHW, -1 for channels-last).
    split_every : int >= 2, optional, keyword-only
        How many partial results each step of the tree reduction merges (Dask's
        ``split_every``; Dask's default when None).

    Returns
    -------
    Moments
        count, mean and m2 per channel in float64, as :func:`fastbn.moments` gives for
        the computed array (up to float64 rounding). Computed now, with Dask's current
        scheduler (threads by default, or a ``dask.distributed`` client's cluster).

    Raises
    ------
    ImportError
        Dask is not installed.
    TypeError
        ``array`` is not a Dask array of float32 or float64, or axis is not an integer.
    numpy.exceptions.AxisError
        ``axis`` is out of range.
    ValueError
        ``array`` has fewer than 2 dimensions.
    """
    da = _dask_array_module()
    if not isinstance(array, da.Array):
        raise TypeError(f"array must be a dask.array.Array, got {type(array).__name__}")
    if array.dtype.newbyteorder("=") not in (np.float32, np.float64):
        raise TypeError(f"array must have dtype float32 or float64, got {array.dtype}")
    if array.ndim < 2:
        raise ValueError(
            f"array must have at least 2 dimensions (batch, channels, ...), got shape "
            f"{array.shape}"
        )
    channel_axis = _normalize_axis(axis, array.ndim)
    reduced_axes = tuple(i for i in range(array.ndim) if i != channel_axis)
    records = da.reduction(
        array,
        functools.partial(_chunk_records, channel_axis=channel_axis),
        _merge_records,
        combine=_merge_records,
        axis=reduced_axes,
        keepdims=False,
        dtype=_RECORD,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0,), _RECORD),
        name="fastbn-moments",
    ).compute()
    return Moments(records["count"], records["mean"], records["m2"])


def _chunk_records(chunk, channel_axis, axis, keepdims, computing_meta=False, **unused):
    """One chunk's moments, as records shaped as the chunk reduced with keepdims."""
    shape = [1] * chunk.ndim
    if computing_meta:  # Dask asking for the type of the result
        return np.empty([0] * chunk.ndim, _RECORD)
    part = _moments(chunk, axis=channel_axis)
    shape[channel_axis] = part.num_features
    return _as_records(part).reshape(shape)


def _merge_records(records, axis, keepdims, computing_meta=False, **unused):
    """Merge records concatenated along the reduced axes ``axis`` (Chan's formula)."""
    if computing_meta:
        return np.empty([0] * (records.ndim if keepdims else 1), _RECORD)
    (channel_axis,) = (i for i in range(records.ndim) if i not in axis)
    channels = records.shape[channel_axis]
    rows = np.moveaxis(records, channel_axis, -1).reshape(-1, channels)
    merged = _as_records(Moments.merge_all(
        Moments(row["count"], row["mean"], row["m2"]) for row in rows
    ))
    if not keepdims:
        return merged
    shape = [1] * records.ndim
    shape[channel_axis] = channels
    return merged.reshape(shape)


def _as_records(part):
    records = np.empty(part.num_features, _RECORD)
    records["count"], records["mean"], records["m2"] = part.count, part.mean, part.m2
    return records
