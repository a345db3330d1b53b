"""SyncBatchNorm against one BatchNorm on the concatenated batch, run on every rank.

Run by tests/test_distributed.py as ``mpiexec -n N python -m mpi4py tests/mpi_worker.py N``
(``-m mpi4py``: an uncaught error on one rank aborts them all instead of leaving the others
waiting), and imported by the same tests, which run the checks in-process with one thread
per rank and a stand-in communicator (no MPI needed).

Every rank generates the same global batches from a shared seed and takes its slice
(unequal sizes; rank 1 has no examples when there are 3 ranks or more), trains a
SyncBatchNorm for several steps (forward, backward, an SGD step on weight and bias), then
evaluates; a plain BatchNorm trained on the whole batches is the reference.
"""

import sys
import zlib

import numpy as np

import fastbn
from fastbn.distributed import SyncBatchNorm

#: (dtype, shape of a global batch, axis): NC, NCL, NCHW and channels-last, both dtypes.
CONFIGS = [
    (np.float64, (13, 5), 1),
    (np.float64, (11, 3, 7), 1),
    (np.float64, (9, 4, 3, 5), -1),
    (np.float32, (13, 5), 1),
    (np.float32, (10, 6, 4, 4), 1),
]


def tolerance(dtype):
    """Bound on |sync - reference| relative to the largest |reference| value (at least 1).

    float64: the two differ by float64 rounding alone (merging per-rank moments, the eval
    kernel instead of the fused one). float32: a few float32 roundings of each.
    """
    return 1e-12 if np.dtype(dtype) == np.float64 else 2e-6


def assert_matches(actual, expected, dtype, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    error = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    bound = tolerance(dtype) * scale
    assert error <= bound, f"{what}: off by {error:.3g} > {bound:.3g}"


def split_sizes(ranks, total):
    """Unequal example counts per rank that add up to total; rank 1 empty from 3 ranks on."""
    if ranks == 1:
        return [total]
    weights = np.arange(1, ranks + 1, dtype=float)
    if ranks >= 3:
        weights[1] = 0.0
    sizes = np.floor(total * weights / weights.sum()).astype(int)
    sizes[-1] += total - sizes.sum()
    return [int(n) for n in sizes]


def my_slice(array, comm):
    sizes = split_sizes(comm.Get_size(), array.shape[0])
    begin = sum(sizes[:comm.Get_rank()])
    return array[begin:begin + sizes[comm.Get_rank()]]


def assert_same_on_every_rank(comm, value, what):
    values = comm.allgather(np.asarray(value))
    for rank, other in enumerate(values):
        assert np.array_equal(other, values[0]), f"{what} differs between rank 0 and {rank}"


def check_training(comm, dtype, shape, axis, steps=4, momentum=0.1, affine=True):
    """Training steps then eval: SyncBatchNorm on this rank's slice against BatchNorm."""
    channels = shape[axis]
    # The same seed on every rank (str hashes differ between processes; crc32 does not).
    rng = np.random.default_rng(zlib.crc32(repr((np.dtype(dtype).name, shape, axis)).encode()))
    options = {"dtype": dtype, "axis": axis, "momentum": momentum, "affine": affine}
    reference = fastbn.BatchNorm(channels, **options)
    layer = SyncBatchNorm(channels, comm=comm, **options)
    if affine:
        initial = rng.uniform(0.5, 2.0, channels), rng.uniform(-1.0, 1.0, channels)
        for bn in (reference, layer):
            bn.weight[...], bn.bias[...] = initial
    name = f"{np.dtype(dtype).name} {shape} axis={axis} momentum={momentum} affine={affine}"
    for step in range(steps):
        loc = rng.uniform(-3.0, 3.0, channels) * (step + 1)
        x = (rng.standard_normal(shape) * 2.0 + loc.reshape([-1 if i == axis % len(shape)
                                                              else 1 for i in range(len(shape))]))
        x = x.astype(dtype)
        grad_out = rng.standard_normal(shape).astype(dtype)
        expected_y = reference(x)
        expected_grad_x = reference.backward(grad_out)
        y = layer(my_slice(x, comm))
        grad_x = layer.backward(my_slice(grad_out, comm))
        what = f"{name} step {step}"
        assert_matches(np.concatenate(comm.allgather(y)), expected_y, dtype, f"{what}: y")
        assert_matches(np.concatenate(comm.allgather(grad_x)), expected_grad_x, dtype,
                       f"{what}: grad_x")
        assert_matches(y, my_slice(expected_y, comm), dtype, f"{what}: this rank's y")
        if affine:
            for grad in ("grad_weight", "grad_bias"):
                assert_matches(getattr(layer, grad), getattr(reference, grad), dtype,
                               f"{what}: {grad}")
                assert_same_on_every_rank(comm, getattr(layer, grad), f"{what}: {grad}")
            for bn in (reference, layer):  # an SGD step, so later steps see new parameters
                bn.weight -= (0.1 * bn.grad_weight).astype(dtype)
                bn.bias -= (0.1 * bn.grad_bias).astype(dtype)
        else:
            assert layer.grad_weight is None and layer.grad_bias is None
        for statistic in ("running_mean", "running_var"):
            assert_matches(getattr(layer, statistic), getattr(reference, statistic), dtype,
                           f"{what}: {statistic}")
            assert_same_on_every_rank(comm, getattr(layer, statistic), f"{what}: {statistic}")
        assert int(layer.num_batches_tracked) == step + 1, f"{what}: num_batches_tracked"
    x = rng.standard_normal(shape).astype(dtype)
    reference.eval()
    layer.eval()
    assert_matches(layer(my_slice(x, comm)), my_slice(reference(x), comm), dtype,
                   f"{name}: eval y")


def check_too_few_values_raise_everywhere(comm):
    """One value per channel in the global batch: ValueError on every rank, state intact."""
    layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
    x = np.ones((1 if comm.Get_rank() == 0 else 0, 3))
    try:
        layer(x)
    except ValueError as error:
        assert "Expected more than 1 value per channel when training" in str(error), error
    else:
        raise AssertionError("a global batch of one example did not raise")
    assert int(layer.num_batches_tracked) == 0 and np.all(layer.running_mean == 0)
    layer(np.ones((2, 3)))  # the ranks are still in step


def check_an_error_on_one_rank_reaches_every_rank(comm):
    """A bad x on the last rank: ValueError there, RuntimeError naming it elsewhere."""
    last = comm.Get_size() - 1
    layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
    good = np.arange(12.0).reshape(4, 3)
    for bad_call in ("forward", "backward"):
        if bad_call == "backward":
            layer(good)
        try:
            if comm.Get_rank() == last:
                layer(good[:, :2]) if bad_call == "forward" else layer.backward(good[:2])
            else:
                layer(good) if bad_call == "forward" else layer.backward(good)
        except ValueError:
            assert comm.Get_rank() == last, "the ValueError was raised on the wrong rank"
        except RuntimeError as error:
            assert comm.Get_rank() != last and f"rank(s) {last}" in str(error), error
        else:
            raise AssertionError(f"a bad {bad_call} on rank {last} raised nothing")
    layer(good)  # still in step
    layer.backward(good)


def check_recalibrate(comm):
    """Each rank recalibrates on its own part (rank 1 none): statistics of all the data."""
    rng = np.random.default_rng(7)
    data = rng.normal(100.0, 3.0, (29, 4, 3))
    mine = my_slice(data, comm)
    layer = SyncBatchNorm(4, comm=comm, dtype=np.float64)
    layer.recalibrate([mine[:2], mine[2:]])
    expected = fastbn.BatchNorm(4, dtype=np.float64).recalibrate([data])
    for statistic in ("running_mean", "running_var"):
        assert_matches(getattr(layer, statistic), getattr(expected, statistic), np.float64,
                       f"recalibrate: {statistic}")
        assert_same_on_every_rank(comm, getattr(layer, statistic), f"recalibrate: {statistic}")


def run_all(comm):
    for dtype, shape, axis in CONFIGS:
        check_training(comm, dtype, shape, axis)
    check_training(comm, np.float64, (12, 3, 2), 1, momentum=None, affine=False)
    check_too_few_values_raise_everywhere(comm)
    check_an_error_on_one_rank_reaches_every_rank(comm)
    check_recalibrate(comm)


def main():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    expected_size = int(sys.argv[1])
    if comm.Get_size() != expected_size:  # e.g. an mpiexec of another MPI than mpi4py's
        raise SystemExit(f"mpi_worker: expected {expected_size} ranks, this rank sees "
                         f"{comm.Get_size()}")
    run_all(comm)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"mpi_worker: all checks passed on {comm.Get_size()} ranks", flush=True)


if __name__ == "__main__":
    main()
