"""Mergeable per-channel moments: the statistics of data that comes in parts.

Batches of a data set, chunks of an out-of-core array, the shards of a global batch on
several processes: each part's (count, mean, m2) is computed by the same kernels as the
forward pass, and parts are merged exactly with Chan, Golub and LeVeque's formula::

    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,
    m2 = m2a + m2b + d * d * na * nb / n

The merge is exact in exact arithmetic, so the result does not depend on how the data
was cut or in what order (tree) the parts are merged, up to float64 rounding.
"""

import numpy as np

from fastbn._core import _moments

__all__ = ["Moments", "moments"]


class Moments:
    """Per-channel count, mean and m2 (sum of squared deviations from the mean), float64.

    Parameters
    ----------
    count, mean, m2 : array_like of shape (C,)
        Converted to float64 arrays. A channel with count 0 must have mean and m2 0.

    Attributes
    ----------
    count, mean, m2 : numpy.ndarray of shape (C,), float64
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        count, mean, m2 = (_real_array(count, "count"), _real_array(mean, "mean"),
                           _real_array(m2, "m2"))
        if not (count.ndim == 1 and count.shape == mean.shape == m2.shape):
            raise ValueError(
                "count, mean and m2 must be 1-D arrays of one shape (C,), got shapes "
                f"{count.shape}, {mean.shape}, {m2.shape}"
            )
        if not (count >= 0).all():  # false for a NaN count too
            raise ValueError("count must be >= 0 and not NaN")
        self.count, self.mean, self.m2 = count, mean, m2

    @classmethod
    def _of(cls, count, mean, m2):
        """Moments of float64 arrays known to be valid (fastbn's own results), kept as they
        are: the checks and copies of ``__init__`` took 9 of the 11 us of moments() on
        (2, 512)."""
        moments = object.__new__(cls)
        moments.count, moments.mean, moments.m2 = count, mean, m2
        return moments

    @classmethod
    def empty(cls, channels):
        """Moments of no data for ``channels`` channels: the identity of :meth:`merge`."""
        zeros = np.zeros(channels)
        return cls(zeros, zeros, zeros)

    @property
    def num_features(self):
        return self.count.shape[0]

    @property
    def var(self):
        """Biased variance ``m2 / count`` (NaN where count is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.m2 / self.count

    @property
    def unbiased_var(self):
        """Unbiased variance ``m2 / (count - 1)`` (NaN where count < 2)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 1, self.m2 / (self.count - 1), np.nan)

    def merge(self, other):
        """The moments of both parts' data together (Chan's formula); a new object."""
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments, got {type(other).__name__}")
        if other.num_features != self.num_features:
            raise ValueError(
                f"cannot merge moments of {self.num_features} and {other.num_features} channels"
            )
        count = self.count + other.count
        delta = other.mean - self.mean
        # share of the other part in the merged data; 0 where both parts are empty
        share = np.divide(other.count, count, out=np.zeros_like(count), where=count > 0)
        mean = self.mean + delta * share
        m2 = self.m2 + other.m2 + delta * delta * self.count * share
        return Moments._of(count, mean, m2)

    __add__ = merge

    @classmethod
    def merge_all(cls, parts):
        """Merge an iterable of Moments (at least one) into one, pairwise as a tree."""
        try:
            iterator = iter(parts)
        except TypeError:
            raise TypeError(
                f"parts must be an iterable of Moments, got {type(parts).__name__}") from None
        level = list(iterator)
        if not level:
            raise ValueError("merge_all needs at least one Moments in parts")
        for index, part in enumerate(level):
            if not isinstance(part, Moments):
                raise TypeError(
                    f"can only merge Moments, got {type(part).__name__} as parts[{index}]")
        while len(level) > 1:
            merged = [a.merge(b) for a, b in zip(level[::2], level[1::2])]
            if len(level) % 2:
                merged.append(level[-1])
            level = merged
        return level[0]

    def to_array(self):
        """One flat float64 array ``[count, mean, m2]`` of length 3*C, for collectives."""
        return np.concatenate([self.count, self.mean, self.m2])

    @classmethod
    def from_array(cls, flat):
        """Inverse of :meth:`to_array`."""
        flat = np.asarray(flat, dtype=np.float64)
        if flat.ndim != 1 or flat.shape[0] % 3:
            raise ValueError(f"expected a flat array of length 3*C, got shape {flat.shape}")
        return cls(*np.split(flat, 3))

    def __eq__(self, other):
        if not isinstance(other, Moments):
            return NotImplemented
        return all(np.array_equal(a, b) for a, b in zip(
            (self.count, self.mean, self.m2), (other.count, other.mean, other.m2)))

    __hash__ = None

    def __repr__(self):
        return (f"Moments(num_features={self.num_features}, count={self.count!r}, "
                f"mean={self.mean!r}, m2={self.m2!r})")


def _real_array(value, name):
    """``value`` as a new float64 array of at least one dimension, if it holds real numbers.

    Only integer and float data is taken: NumPy would turn None into NaN, parse strings
    and raise for complex numbers in messages that do not say which argument is wrong.
    """
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:  # e.g. a ragged list
        raise ValueError(f"{name} must be array_like of real numbers: {error}") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers (an integer or float dtype), "
                        f"got dtype {array.dtype}")
    return np.array(array, dtype=np.float64, ndmin=1)


def moments(x, *, axis=1):
    """Per-channel moments of x, exact and mergeable.

    Parameters
    ----------
    x : numpy.ndarray of float32 or float64, ndim >= 2
        Data with the channel axis ``axis``; may be empty along the other axes.
    axis : int, keyword-only
        The channel axis (1 for NCHW, -1 for channels-last).

    Returns
    -------
    Moments
        count, mean and m2 per channel in float64, computed by the same blocked,
        float64-accumulating kernel as the forward pass.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.batch_norm` for x and axis.
    """
    count, mean, m2 = _moments(x, axis=axis)
    return Moments._of(np.full(mean.shape, float(count)), mean, m2)
