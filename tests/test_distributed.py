"""fastbn.distributed.SyncBatchNorm: one BatchNorm over the batch of all ranks.

Two ways to run ranks:
- in-process, one thread per rank with :class:`ThreadComm`, a stand-in for an mpi4py
  communicator (the buffer ``Allgather`` SyncBatchNorm uses, and ``allgather`` for the
  checks): no MPI needed, so the logic is always tested;
- real MPI: tests/mpi_worker.py under ``mpiexec -n 2`` and ``-n 3``, and the example
  script. Skipped without mpi4py or mpiexec, unless FASTBN_REQUIRE_MPI=1 (CI), which
  makes a missing install fail instead.

The checks themselves live in tests/mpi_worker.py, shared by both ways.
"""

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn
import mpi_worker
from fastbn.distributed import SyncBatchNorm

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "sync_batchnorm.py")


# ----------------------------------------------------------- in-process ranks


class ThreadComm:
    """Rank ``rank`` of an in-process world whose ranks are threads (see :func:`run_ranks`)."""

    def __init__(self, world, rank):
        self.world, self.rank = world, rank
        self.calls = 0

    def Get_size(self):
        return self.world.size

    def Get_rank(self):
        return self.rank

    def Allgather(self, sendbuf, recvbuf):
        self.calls += 1
        rows = self.allgather(np.array(sendbuf, dtype=np.float64).ravel())
        recvbuf.reshape(self.world.size, -1)[...] = np.stack(rows)

    def allgather(self, value):
        world = self.world
        world.slots[self.rank] = value
        world.barrier.wait()  # everyone has written
        values = list(world.slots)
        world.barrier.wait()  # everyone has read
        return values


class ThreadWorld:
    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        # A rank that does not take part shows as BrokenBarrierError, not as a hang.
        self.barrier = threading.Barrier(size, timeout=20)


def run_ranks(size, function):
    """function(comm) on ``size`` threads, one per rank; returns the results in rank order.

    An exception on any rank is re-raised (the first rank's first).
    """
    world = ThreadWorld(size)
    results, errors = [None] * size, [None] * size

    def rank_main(comm):
        try:
            results[comm.rank] = function(comm)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            errors[comm.rank] = error

    threads = [threading.Thread(target=rank_main, args=(ThreadComm(world, rank),))
               for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a rank did not finish"
    for error in errors:
        if error is not None:
            raise error
    return results


class NoCommunication:
    """A communicator that fails if used: for what must not communicate."""

    def Get_size(self):
        return 2

    def Allgather(self, sendbuf, recvbuf):
        raise AssertionError("SyncBatchNorm communicated")


RANKS = [1, 2, 3, 4]


# ----------------------------------------------------- against one BatchNorm


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("dtype, shape, axis", mpi_worker.CONFIGS,
                         ids=[f"{np.dtype(d).name}-{s}-axis={a}" for d, s, a in mpi_worker.CONFIGS])
def test_training_matches_one_batchnorm_on_the_concatenated_batch(ranks, dtype, shape, axis):
    """y, grad_x, grad_weight, grad_bias, running statistics and num_batches_tracked over
    several steps, then eval; ranks of unequal sizes, one empty from 3 ranks on."""
    run_ranks(ranks, lambda comm: mpi_worker.check_training(comm, dtype, shape, axis))


@pytest.mark.parametrize("ranks", [2, 3])
def test_cumulative_average_and_no_affine_parameters(ranks):
    run_ranks(ranks, lambda comm: mpi_worker.check_training(
        comm, np.float64, (12, 3, 2), 1, momentum=None, affine=False))


def test_float32_with_a_large_offset_is_as_accurate_as_batchnorm():
    """|mean|/std = 1e4 in float32: y is within float32 rounding of the float64 answer, as
    BatchNorm's fused kernel is (SyncBatchNorm splits the mean the same way)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((40, 3)) + 1e4).astype(np.float32)
    parts = np.split(x, [11, 11])  # rank 1 empty
    ys = run_ranks(3, lambda comm: SyncBatchNorm(3, comm=comm)(parts[comm.rank]))
    exact = (x - x.astype(np.float64).mean(0)) / np.sqrt(x.astype(np.float64).var(0) + 1e-5)
    error = np.max(np.abs(np.concatenate(ys) - exact))
    assert error < 8 * np.finfo(np.float32).eps, error
    assert np.max(np.abs(fastbn.BatchNorm(3)(x) - exact)) < 8 * np.finfo(np.float32).eps


def test_one_example_per_rank_as_1d_arrays_and_out():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5))
    reference = fastbn.BatchNorm(5, dtype=np.float64)
    expected = reference(x)

    def rank_main(comm):
        layer = SyncBatchNorm(5, comm=comm, dtype=np.float64)
        out = np.empty(5)
        assert layer(x[comm.rank], out=out) is out
        return out, layer.running_var

    (y0, var0), (y1, var1) = run_ranks(2, rank_main)
    np.testing.assert_allclose(np.stack([y0, y1]), expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(var0, var1)
    np.testing.assert_allclose(var0, reference.running_var, rtol=1e-13)


def test_communication_is_one_allgather_per_training_call():
    def rank_main(comm):
        layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
        x = np.ones((2, 3)) * np.arange(2)[:, None]
        layer(x)
        layer.backward(x)
        layer.recalibrate([x])
        return comm.calls

    assert run_ranks(2, rank_main) == [3, 3]


# ------------------------------------------------------------------ eval mode


def test_eval_mode_communicates_nothing_and_is_batchnorm():
    rng = np.random.default_rng(3)
    layer = SyncBatchNorm(4, comm=NoCommunication(), dtype=np.float64).eval()
    plain = fastbn.BatchNorm(4, dtype=np.float64).eval()
    for bn in (layer, plain):
        bn.running_mean[...] = [1.0, -2.0, 0.5, 3.0]
        bn.running_var[...] = [4.0, 0.25, 1.0, 9.0]
    x, grad = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    np.testing.assert_array_equal(layer(x), plain(x))
    np.testing.assert_array_equal(layer.backward(grad), plain.backward(grad))
    np.testing.assert_array_equal(layer(x[0]), plain(x[0]))  # one example


def test_eval_without_running_statistics_uses_the_local_batch_as_pytorch():
    rng = np.random.default_rng(4)
    x, grad = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    layer = SyncBatchNorm(4, comm=NoCommunication(), dtype=np.float64,
                          track_running_stats=False).eval()
    plain = fastbn.BatchNorm(4, dtype=np.float64, track_running_stats=False).eval()
    np.testing.assert_array_equal(layer(x), plain(x))
    np.testing.assert_array_equal(layer.backward(grad), plain.backward(grad))


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize("ranks", [1, 3])
def test_one_value_per_channel_in_the_global_batch_raises_on_every_rank(ranks):
    run_ranks(ranks, mpi_worker.check_too_few_values_raise_everywhere)


@pytest.mark.parametrize("ranks", [2, 3])
def test_an_error_on_one_rank_is_raised_on_every_rank_without_a_hang(ranks):
    run_ranks(ranks, mpi_worker.check_an_error_on_one_rank_reaches_every_rank)


def test_a_bad_out_on_one_rank_is_found_before_communicating():
    def rank_main(comm):
        layer = SyncBatchNorm(2, comm=comm, dtype=np.float64)
        x = np.arange(8.0).reshape(4, 2)
        out = np.empty((4, 2), np.float32) if comm.rank == 1 else None
        try:
            layer(x, out=out)
        except (TypeError, RuntimeError) as error:
            return type(error).__name__, int(layer.num_batches_tracked)
        return None, int(layer.num_batches_tracked)

    assert run_ranks(2, rank_main) == [("RuntimeError", 0), ("TypeError", 0)]


def test_backward_out_gets_what_a_new_array_gets_also_in_place():
    rng = np.random.default_rng(5)
    x, grad = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))

    def rank_main(comm):
        layer = SyncBatchNorm(3, comm=comm, dtype=np.float64)
        mine = slice(3 * comm.rank, 3 * comm.rank + 3)
        layer(x[mine])
        expected = layer.backward(grad[mine])
        out = np.full((3, 3), np.nan)
        in_place = grad[mine].copy()
        return (expected, layer.backward(grad[mine], out=out) is out, out,
                layer.backward(in_place, out=in_place) is in_place, in_place)

    for expected, returned_out, out, returned_in_place, in_place in run_ranks(2, rank_main):
        assert returned_out and returned_in_place
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(in_place, expected)


def test_a_bad_backward_out_on_one_rank_is_found_before_communicating():
    def rank_main(comm):
        layer = SyncBatchNorm(2, comm=comm, dtype=np.float64)
        x = np.arange(8.0).reshape(4, 2)
        layer(x)
        out = np.empty((4, 2), np.float32) if comm.rank == 1 else None
        try:
            layer.backward(np.ones_like(x), out=out)
        except (TypeError, RuntimeError) as error:
            return type(error).__name__
        return None

    assert run_ranks(2, rank_main) == ["RuntimeError", "TypeError"]


def test_comm_must_be_a_communicator():
    with pytest.raises(TypeError, match="mpi4py communicator"):
        SyncBatchNorm(3, comm="world")


# ---------------------------------------------------------- recalibrate, state


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_recalibrate_uses_the_data_of_every_rank(ranks):
    run_ranks(ranks, mpi_worker.check_recalibrate)


def test_state_dict_is_batchnorms_and_pickling_drops_the_communicator():
    layer = SyncBatchNorm(3, comm=NoCommunication(), momentum=None, dtype=np.float64)
    layer.running_mean[...] = [1.0, 2.0, 3.0]
    plain = fastbn.BatchNorm(3, dtype=np.float64)
    plain.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(plain.running_mean, layer.running_mean)
    copy = pickle.loads(pickle.dumps(layer))
    assert type(copy) is SyncBatchNorm and copy.comm is None
    np.testing.assert_array_equal(copy.running_mean, layer.running_mean)
    assert repr(copy).startswith("SyncBatchNorm(3, eps=1e-05, momentum=None")


def test_modules_import_without_mpi4py_and_dask(tmp_path):
    """fastbn.distributed and fastbn.dask import without their optional dependencies, and
    say how to install them when they are needed."""
    script = """
import sys
sys.modules["mpi4py"] = None  # makes "import mpi4py" raise ImportError
sys.modules["dask"] = sys.modules["dask.array"] = None
import numpy as np
import fastbn.dask, fastbn.distributed
for call, extra in ((lambda: fastbn.distributed.SyncBatchNorm(3), "fastbn[mpi]"),
                    (lambda: fastbn.dask.moments(np.zeros((2, 3))), "fastbn[dask]")):
    try:
        call()
    except ImportError as error:
        assert extra in str(error), error
    else:
        raise AssertionError("no ImportError")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ------------------------------------------------------------------ real MPI


def mpiexec_or_skip():
    """mpiexec of the MPI that mpi4py uses; skip (or fail with FASTBN_REQUIRE_MPI=1)."""
    # mpich's wheel installs mpiexec beside this Python; prefer it to another MPI's on PATH.
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    missing = [name for name, found in (("mpi4py", importlib.util.find_spec("mpi4py")),
                                        ("mpiexec", mpiexec)) if found is None]
    if missing:
        reason = (f"{' and '.join(missing)} not found: pip install \"fastbn[mpi]\" mpich")
        if os.environ.get("FASTBN_REQUIRE_MPI") == "1":
            pytest.fail(f"{reason} (FASTBN_REQUIRE_MPI=1 requires the MPI tests to run)")
        pytest.skip(reason)
    return mpiexec


def run_mpi(ranks, arguments, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # ranks share the cores: no oversubscription
    command = [mpiexec_or_skip(), "-n", str(ranks), sys.executable, "-m", "mpi4py", *arguments]
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_under_mpiexec(ranks, tmp_path):
    worker = os.path.join(HERE, "mpi_worker.py")
    stdout = run_mpi(ranks, [worker, str(ranks)], tmp_path)
    assert f"all checks passed on {ranks} ranks" in stdout


def test_example_runs_under_mpiexec(tmp_path):
    stdout = run_mpi(2, [EXAMPLE], tmp_path)
    assert "2 ranks, held-out accuracy" in stdout
    assert "batch-norm state identical on every rank: True" in stdout
