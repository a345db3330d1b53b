"""fastbn.dask.moments and BatchNorm.recalibrate on Dask arrays.

Skipped without Dask, unless FASTBN_REQUIRE_DASK=1 (CI), which makes a missing install
fail instead. Results are compared with fastbn.moments on the computed array and with the
float64 definition.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn
import fastbn.dask

if os.environ.get("FASTBN_REQUIRE_DASK") == "1":
    import dask.array as da  # FASTBN_REQUIRE_DASK=1: a missing Dask fails the tests
else:
    da = pytest.importorskip("dask.array", reason='Dask not installed: pip install "fastbn[dask]"')

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "dask_moments.py")


def reference_moments(x, axis):
    """count, mean, m2 per channel in float64, straight from the definition."""
    rows = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0).reshape(x.shape[axis], -1)
    mean = rows.mean(axis=1)
    return rows.shape[1], mean, ((rows - mean[:, None]) ** 2).sum(axis=1)


def data(shape, axis, dtype, seed=0, offset=100.0):
    """Channels with different means and scales, offset so that cancellation would show."""
    rng = np.random.default_rng(seed)
    per_channel = [1] * len(shape)
    per_channel[axis] = shape[axis]
    loc = offset + rng.uniform(-10.0, 10.0, shape[axis]).reshape(per_channel)
    scale = rng.uniform(0.5, 3.0, shape[axis]).reshape(per_channel)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


# (shape, axis, chunks): one chunk; split along the batch axis (unevenly); split inside the
# other reduced axes; split along the channel axis (alone, and with everything else).
CHUNKINGS = [
    ((20, 3), 1, (20, 3)),
    ((50, 4), 1, (7, 4)),
    ((17, 6, 9), 1, (5, 6, 4)),
    ((17, 6, 9), 1, (17, 2, 9)),
    ((17, 6, 9), 1, (4, 4, 2)),
    ((9, 5, 6, 7), -1, (2, 3, 6, 3)),
    ((9, 5, 6, 7), 2, (4, 5, 4, 7)),
    ((6, 7, 4, 5), 1, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, chunks", CHUNKINGS,
                         ids=[f"{s}-axis={a}-chunks={c}" for s, a, c in CHUNKINGS])
def test_moments_of_a_chunked_array(dtype, shape, axis, chunks):
    x = data(shape, axis, dtype)
    array = da.from_array(x, chunks=chunks)
    result = fastbn.dask.moments(array, axis=axis)
    whole = fastbn.moments(x, axis=axis)
    count, mean, m2 = reference_moments(x, axis)
    np.testing.assert_array_equal(result.count, whole.count)
    np.testing.assert_array_equal(result.count, np.full(shape[axis], float(count)))
    # Both are float64 computations of the same numbers: they differ by float64 rounding.
    np.testing.assert_allclose(result.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(result.m2, whole.m2, rtol=1e-12)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(result.m2, m2, rtol=1e-12)


@pytest.mark.parametrize("split_every", [2, 3, None])
def test_deep_tree_reductions_give_the_same_moments(split_every):
    x = data((64, 3, 8), 1, np.float64, seed=1, offset=1e6)  # |mean|/std ~ 1e6
    result = fastbn.dask.moments(da.from_array(x, chunks=(3, 2, 3)), split_every=split_every)
    _, mean, m2 = reference_moments(x, 1)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(result.m2, m2, rtol=1e-9)  # m2 is ill-conditioned: 1e6**2 * eps


def test_empty_chunks_and_unknown_chunk_sizes():
    x = data((30, 4), 1, np.float64, seed=2)
    array = da.from_array(x, chunks=((0, 10, 0, 20), (4,)))
    _, mean, m2 = reference_moments(x, 1)
    for candidate in (array, array[array[:, 0] > -np.inf]):  # the second has NaN chunk sizes
        result = fastbn.dask.moments(candidate)
        np.testing.assert_array_equal(result.count, 30.0)
        np.testing.assert_allclose(result.mean, mean, rtol=1e-14)
        np.testing.assert_allclose(result.m2, m2, rtol=1e-12)


def test_a_lazily_generated_array_is_never_materialized_whole():
    """Data made chunk by chunk (as an out-of-core source would read it) gives the moments
    of the same data computed at once."""
    array = da.random.default_rng(3).normal(5.0, 2.0, size=(400, 3, 50), chunks=(25, 3, 50))
    result = fastbn.dask.moments(array)
    whole = fastbn.moments(array.compute())
    np.testing.assert_allclose(result.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(result.m2, whole.m2, rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(TypeError, match="dask.array.Array"):
        fastbn.dask.moments(np.zeros((3, 2)))
    with pytest.raises(TypeError, match="float32 or float64"):
        fastbn.dask.moments(da.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fastbn.dask.moments(da.zeros(3))
    with pytest.raises(np.exceptions.AxisError):
        fastbn.dask.moments(da.zeros((3, 2)), axis=2)
    with pytest.raises(TypeError, match="axis must be an integer"):
        fastbn.dask.moments(da.zeros((3, 2)), axis=True)


# ------------------------------------------------------------------ recalibrate


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, chunks", [((40, 5, 6), 1, (7, 2, 4)),
                                                 ((30, 4, 3, 5), -1, (8, 2, 3, 5))])
def test_recalibrate_with_a_dask_array_equals_its_blocks_and_the_whole(dtype, shape, axis,
                                                                       chunks):
    x = data(shape, axis, dtype, seed=4)
    array = da.from_array(x, chunks=chunks)
    channels = shape[axis]
    from_dask = fastbn.BatchNorm(channels, axis=axis, dtype=dtype).recalibrate(array)
    # Blocks that cut the channel axis are no batches; those along the other axes are.
    whole_channel_blocks = da.from_array(x, chunks=tuple(
        shape[axis] if i == axis % len(shape) else c for i, c in enumerate(chunks)))
    blocks = [block.compute() for block in whole_channel_blocks.blocks.ravel()]
    from_blocks = fastbn.BatchNorm(channels, axis=axis, dtype=dtype).recalibrate(blocks)
    from_whole = fastbn.BatchNorm(channels, axis=axis, dtype=dtype).recalibrate([x])
    rtol = 1e-6 if dtype == np.float32 else 1e-13  # float64 results stored in the dtype
    for other in (from_blocks, from_whole):
        np.testing.assert_allclose(from_dask.running_mean, other.running_mean, rtol=rtol)
        np.testing.assert_allclose(from_dask.running_var, other.running_var, rtol=rtol)
    _, mean, m2 = reference_moments(x, axis)
    count = x.size // channels
    np.testing.assert_allclose(from_dask.running_mean, mean, rtol=rtol)
    np.testing.assert_allclose(from_dask.running_var, m2 / (count - 1), rtol=rtol)
    assert int(from_dask.num_batches_tracked) == 0


def test_recalibrate_rejects_a_bad_dask_array_and_changes_nothing():
    bn = fastbn.BatchNorm(3)
    cases = [
        (da.zeros((4, 2), dtype=np.float32), ValueError, "num_features=3"),
        (da.zeros((4, 3), dtype=np.int32), TypeError, "float32 or float64"),
        (da.zeros(3, dtype=np.float32), ValueError, "whole data set"),
        (da.zeros((1, 3), dtype=np.float32), ValueError, "more than 1 value per channel"),
    ]
    for array, error, match in cases:
        with pytest.raises(error, match=match):
            bn.recalibrate(array)
        np.testing.assert_array_equal(bn.running_mean, 0.0)
        np.testing.assert_array_equal(bn.running_var, 1.0)


def test_example_script_runs(tmp_path):
    result = subprocess.run([sys.executable, EXAMPLE, "--gigabytes", "0.005",
                             "--directory", str(tmp_path)], check=False, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fastbn.dask.moments" in result.stdout and "channel 2" in result.stdout
