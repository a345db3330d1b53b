"""Batch normalization over a batch spread across processes, with MPI (mpi4py).

:class:`SyncBatchNorm` is a :class:`fastbn.BatchNorm` for data-parallel training: each
process (MPI rank) holds a part of the global batch, and training normalizes with the
statistics of the whole global batch, so every rank computes what one BatchNorm would
compute on the concatenated batch. The communication is small and exact:

- training forward: one ``Allgather`` of each rank's (count, mean, m2) per channel
  (:meth:`fastbn.Moments.to_array`, 3*C + 1 doubles), merged with Chan's formula in rank
  order, so every rank gets bit-identical statistics whatever its batch size;
- backward: one ``Allgather`` of each rank's float64 ``sum(dy)`` and ``sum(dy * xhat)``
  (2*C + 2 doubles), summed in rank order: an all-reduce with the same bits on every rank;
- eval: no communication (the running statistics are identical on every rank).

mpi4py is optional: ``pip install "fastbn[mpi]"``. This module imports without it; only
``SyncBatchNorm(comm=None)``, which means ``MPI.COMM_WORLD``, imports mpi4py.
"""

import numpy as np

from fastbn._core import _check_out_layout
from fastbn._core import batch_norm as _batch_norm
from fastbn._core import batch_norm_backward as _batch_norm_backward
from fastbn.layer import BatchNorm
from fastbn.moments import Moments, moments

__all__ = ["SyncBatchNorm"]

# A row of an Allgather starts with this rank's status: 1 when it has its part of the data,
# 0 when it failed before the collective call and only takes part so that no rank waits.
_OK, _FAILED = 1.0, 0.0


def _world():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            'SyncBatchNorm(comm=None) communicates over MPI.COMM_WORLD, which needs mpi4py: '
            'pip install "fastbn[mpi]" (and an MPI library, e.g. pip install mpich)'
        ) from error
    return MPI.COMM_WORLD


def _checked_comm(comm):
    if not all(callable(getattr(comm, name, None)) for name in ("Allgather", "Get_size")):
        raise TypeError(
            "comm must be an mpi4py communicator such as mpi4py.MPI.COMM_WORLD (with "
            f"Allgather and Get_size), got {type(comm).__name__}"
        )
    return comm


class SyncBatchNorm(BatchNorm):
    """A BatchNorm whose training statistics are those of the batch of all MPI ranks.

    Parameters
    ----------
    num_features : int
        C, the number of channels; the same on every rank.
    comm : mpi4py.MPI.Comm or None, keyword-only
        The communicator whose ranks share the global batch; None means
        ``mpi4py.MPI.COMM_WORLD``. Any object with mpi4py's buffer ``Allgather(sendbuf,
        recvbuf)`` and ``Get_size()`` works.
    **options
        :class:`fastbn.BatchNorm`'s keyword options: eps, momentum, affine,
        track_running_stats, axis, dtype, debias. The same on every rank.

    Notes
    -----
    Training calls are collective: every rank of ``comm`` calls forward, backward and
    :meth:`recalibrate` in the same order, in training mode, each with its own part of the
    global batch. The parts may have different sizes, and a rank may have no examples (an
    x of shape (0, C, ...)); it still takes part. Then, within float64 rounding, and
    identically on every rank:

    - forward returns each rank's rows of what one BatchNorm would return for the
      concatenated batch, and updates the running statistics (with the global unbiased
      variance) and num_batches_tracked (once per step) as that BatchNorm would;
    - :meth:`backward` returns each rank's rows of that BatchNorm's grad_x, and sets
      ``grad_weight`` and ``grad_bias`` to the gradient of the global batch's loss: sums
      over all ranks, the same on every rank. (PyTorch's SyncBatchNorm leaves per-rank
      sums, which DistributedDataParallel then all-reduces; here nothing more is needed.
      Average them over the ranks yourself if your loss is a mean of per-rank losses.)

    A global batch with one value per channel raises ValueError ("Expected more than 1
    value per channel when training") on every rank. An error on one rank before its
    collective call (a bad x or out) is raised there, and a RuntimeError naming that rank
    on the others, instead of leaving them waiting.

    Eval mode is plain BatchNorm, with no communication: the running statistics normalize
    (batch statistics of the rank's own batch when track_running_stats is false, as
    PyTorch does). :meth:`state_dict` is a BatchNorm's, so a trained layer's state loads
    into a :class:`fastbn.BatchNorm` for inference. Pickling drops the communicator: an
    unpickled layer uses ``MPI.COMM_WORLD`` until ``comm`` is set.

    Training calls should come from one thread per rank.
    """

    def __init__(self, num_features, *, comm=None, **options):
        super().__init__(num_features, **options)
        self.comm = _world() if comm is None else _checked_comm(comm)
        # True from the start of a collective training call until its Allgather: if the
        # call fails before it, this rank still takes part (as failed), so none waits.
        self._collective_pending = False

    # ----------------------------------------------------------- collectives

    def _allgather(self, row, what):
        """Every rank's ``row`` in rank order (one Allgather), without the status column.

        Raises RuntimeError on every rank if some rank reported a failure.
        """
        self._collective_pending = False
        rows = self._exchange(row, _OK)
        failed = np.flatnonzero(rows[:, 0] != _OK)
        if failed.size:
            raise RuntimeError(
                f"SyncBatchNorm {what} failed on rank(s) {', '.join(map(str, failed))} "
                f"(see the error raised there)"
            )
        return rows[:, 1:]

    def _exchange(self, row, status):
        comm = self.comm if self.comm is not None else _world()
        send = np.empty(row.size + 1)
        send[0], send[1:] = status, row
        rows = np.empty((comm.Get_size(), send.size))
        comm.Allgather(send, rows)
        return rows

    def _take_part_as_failed(self, length):
        """After a local error, the collective call the other ranks are waiting in."""
        if self._collective_pending:
            self._collective_pending = False
            self._exchange(np.zeros(length), _FAILED)

    # ----------------------------------------------------------------- forward

    def _forward(self, x, out):
        if not self.training:  # eval: plain BatchNorm, no communication
            return super()._forward(x, out)
        self._collective_pending = True
        try:
            return super()._forward(x, out)
        except BaseException:
            self._take_part_as_failed(3 * self.num_features)
            raise

    def _normalize_with_batch_statistics(self, batch_x, batch_out):
        if not self.training:  # eval without running statistics: this rank's batch alone
            return super()._normalize_with_batch_statistics(batch_x, batch_out)
        _check_out(batch_x, batch_out)  # now, rather than on this rank alone after the Allgather
        local = moments(batch_x, axis=self.axis)
        rows = self._allgather(local.to_array(), "training forward")
        total = Moments.merge_all(Moments.from_array(row) for row in rows)  # rank order
        count = int(total.count[0])
        if count < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count} in the "
                f"global batch of {len(rows)} ranks (input of shape {batch_x.shape} here)"
            )
        mean, var = total.mean, total.var
        y = self._normalize(batch_x, batch_out, mean, var)
        return y, mean, var, count, True

    def _normalize(self, x, out, mean, var):
        """y = weight * (x - mean) / sqrt(var + eps) + bias by the eval kernel.

        The float64 mean is split into mean_hi (x's dtype) and mean_lo, and the kernel
        subtracts mean_hi while mean_lo * scale moves into the shift: float32 output is
        then as accurate as the fused training kernel's, which splits the mean the same way.
        """
        dtype = self.dtype
        mean_hi = mean.astype(dtype)
        mean_lo = mean - mean_hi  # 0 for float64
        with np.errstate(divide="ignore", invalid="ignore"):  # eps=0, a constant channel
            scale = 1.0 / np.sqrt(var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight
            bias = np.zeros(self.num_features) if self.bias is None else self.bias.astype(float)
            shift = np.where(mean_lo != 0.0, bias - scale * mean_lo, bias)
        return _batch_norm(x, mean_hi, var.astype(dtype), self.weight, shift.astype(dtype),
                           False, 0.1, self.eps, axis=self.axis, out=out)

    # ---------------------------------------------------------------- backward

    def backward(self, grad_out, out=None):
        """Gradient of the most recent forward call, as :meth:`fastbn.BatchNorm.backward`.

        After a training forward it is collective: grad_x is this rank's part of the
        global batch's gradient, and grad_weight and grad_bias are sums over all ranks.
        """
        self._collective_pending = bool(getattr(self._context, "synchronized", False))
        try:
            return super().backward(grad_out, out)
        except BaseException:
            self._take_part_as_failed(2 * self.num_features + 1)
            raise


    def _synchronized_backward(self, grad_out, x, mean, invstd, out):
        """grad_x = weight*invstd/M * (M*dy - sum_dy - xhat*sum_dy_xhat), global M and sums.

        The kernel, with the statistics as constants, gives this rank's float64-accumulated
        sums and ``dy * weight * invstd``; the rest of grad_x is affine in x per channel,
        ``(x - mean) * k_x + k_0``, which the eval kernel computes in one pass, into out
        (grad_out has been read by then, so out may be grad_out).
        """
        _check_out(x, out)  # now, rather than on this rank alone after the Allgather
        scaled_dy, sum_dy_xhat, sum_dy = _batch_norm_backward(
            grad_out, x, mean, invstd, self.weight, training=False, axis=self.axis)
        local_count = x.size // self.num_features
        row = np.concatenate([[local_count], sum_dy, sum_dy_xhat]).astype(np.float64)
        rows = self._allgather(row, "backward")
        totals = rows.sum(axis=0)  # in rank order: the same bits on every rank
        count = totals[0]
        sum_dy, sum_dy_xhat = totals[1:].reshape(2, self.num_features)
        invstd64 = invstd.astype(np.float64)
        scale = invstd64 if self.weight is None else self.weight * invstd64
        with np.errstate(invalid="ignore"):  # eps=0, a constant channel: inf * 0
            k_x = -scale * invstd64 * sum_dy_xhat / count
            k_0 = -scale * sum_dy / count
        dtype = self.dtype
        grad_x = _batch_norm(x, mean, np.ones(self.num_features, dtype), k_x.astype(dtype),
                             k_0.astype(dtype), False, 0.1, 0.0, axis=self.axis, out=out)
        grad_x += scaled_dy
        return grad_x, sum_dy_xhat.astype(dtype), sum_dy.astype(dtype)

    # -------------------------------------------------------------- statistics

    def recalibrate(self, batches):
        """Set the running statistics to the exact statistics of a data set spread over ranks.

        Collective: every rank passes its part of the data set (an iterable of arrays or
        a Dask array, as :meth:`fastbn.BatchNorm.recalibrate` takes; a part may be empty),
        and every rank gets the population statistics of all the parts, identical on every
        rank. Returns self.
        """
        self._collective_pending = True
        try:
            local = self._data_moments(batches)
        except BaseException:
            self._take_part_as_failed(3 * self.num_features)
            raise
        rows = self._allgather(local.to_array(), "recalibrate")
        self._set_population_statistics(
            Moments.merge_all(Moments.from_array(row) for row in rows))
        return self

    def __getstate__(self):
        state = super().__getstate__()
        state["comm"] = None  # communicators do not pickle; see the class notes
        state["_collective_pending"] = False
        return state


def _check_out(x, out):
    """What the kernel call would raise for ``out``, raised before the collective call."""
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    # As the kernel call: the same float type as x, in any byte order of x's; out native.
    if out.dtype.num != x.dtype.num or not out.dtype.isnative:
        raise TypeError(f"out must have the input's dtype {x.dtype.name}, got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"out must have the input's shape {x.shape}, got {out.shape}")
    _check_out_layout(x, out)
    if not out.flags.writeable:
        raise ValueError("out is read-only")
