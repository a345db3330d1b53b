"""Large outputs: written with streaming stores on CPUs with AVX-512 or AVX2. On one core,
y of the forward passes from 8 MiB and grad_x of the training backward from 6 MiB; on
several threads, over rows walked in chunks of columns, y from 10 MiB; at the speed of L3
(several threads, no chunked rows), eval's y from 18 MiB, the training forward's from
12 MiB and grad_x from 8 MiB.

The streaming loop has its own code for the unaligned start and the end of every run, so
it is checked here on runs whose length and offset are odd, in place and not, against the
float64 reference, and against the loops that write through the cache, bit for bit. Eval
runs on one thread, where every case here streams, and on all. On a CPU with neither
AVX-512 nor AVX2 these inputs take the ordinary loops.
"""

import numpy as np
import pytest

import fastbn
from fastbn import _core

from reference import backward_train, forward_eval, forward_train

#: (3, 3, L) with L odd: every run of a channel starts at another offset from a cache line,
#: and two threads split the positions inside a run (where a streamed run is cut).
SHAPE = (3, 3, 466_667)
#: Runs of 49 values: most vectors of y hold the end of one run and the start of the next;
#: the backward sees them as rows of 64 * 49 columns (common.h: fbn_spread).
SHORT_RUNS = (1200, 64, 7, 7)
#: Runs of 81 values, which the training forward takes in tiles of a few whole channels; the
#: backward spreads them over columns in float32 (324 bytes), not in float64.
CHANNEL_TILES = (640, 64, 9, 9)
#: Channels-last, (N, C): whole rows stream as one block, with C below, at and past a vector.
ROWS_SHAPES = [(1_100_003, 3), (100_003, 37), (50_001, 64)]
#: Rows wider than a chunk (4 KiB, walked a chunk of columns at a time through the cache),
#: 5600 bytes apart: streamed whole from 10 MiB on several threads.
WIDE_ROWS = (2_001, 1_400)


def test_outputs_stream_from_a_size_for_each_pass_and_pace():
    def streams(output_bytes, kernel_pass, pace):
        return _core._streams_output(output_bytes, kernel_pass, pace)

    MiB = 2**20
    if not streams(8 * MiB, "eval", "one core"):
        pytest.skip("this CPU has neither AVX-512 nor AVX2: nothing streams")
    smallest = {
        "one core": {"eval": 8 * MiB, "training": 8 * MiB, "backward": 6 * MiB},
        "chunked rows": {"eval": 10 * MiB, "training": 10 * MiB},
        "L3 speed": {"eval": 18 * MiB, "training": 12 * MiB, "backward": 8 * MiB},
    }
    for pace, sizes in smallest.items():
        for kernel_pass, output_bytes in sizes.items():
            assert streams(output_bytes, kernel_pass, pace), f"{kernel_pass}, {pace}"
            assert not streams(output_bytes - 64, kernel_pass, pace), f"{kernel_pass}, {pace}"
    assert streams(int(np.prod(WIDE_ROWS)) * 4, "training", "chunked rows")
    for shape in [SHAPE, SHORT_RUNS, CHANNEL_TILES] + ROWS_SHAPES:
        output_bytes = int(np.prod(shape)) * 4  # the float32 cases: float64 streams too
        assert streams(output_bytes, "eval", "one core"), f"{shape}: eval's y on one core"
        assert streams(output_bytes, "training", "L3 speed"), f"{shape}: training forward's y"
        assert streams(output_bytes, "backward", "L3 speed"), f"{shape}: grad_x"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("shape", [SHAPE, SHORT_RUNS, CHANNEL_TILES], ids=str)
def test_streamed_training_forward_matches_the_reference(dtype, in_place, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 7).astype(dtype)
    weight = rng.uniform(0.5, 2, shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    expected = forward_train(x, weight, bias)[0]
    out = x if in_place else None
    y, _, _ = fastbn.batch_norm_train(x, weight, bias, out=out)
    tolerance = 8 * np.finfo(dtype).eps * np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", ROWS_SHAPES + [WIDE_ROWS], ids=str)
def test_streamed_channels_last_forward_matches_the_reference(dtype, shape):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 2 - 5).astype(dtype)
    channels = shape[1]
    weight = rng.uniform(0.5, 2, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    for got, expected in (
        (fastbn.batch_norm_train(x, weight, bias)[0], forward_train(x, weight, bias)[0]),
        (fastbn.batch_norm(x, running_mean, running_var, weight, bias),
         forward_eval(x, running_mean, running_var, weight, bias)),
    ):
        tolerance = 8 * np.finfo(dtype).eps * np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-threads"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_eval_forward_matches_the_reference(dtype, threads, restore_threads):
    fastbn.set_num_threads(threads)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(dtype)
    running_mean = rng.standard_normal(3).astype(dtype)
    running_var = rng.uniform(0.5, 2, 3).astype(dtype)
    y = fastbn.batch_norm(x, running_mean, running_var)
    expected = forward_eval(x, running_mean, running_var)
    tolerance = 8 * np.finfo(dtype).eps * np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-threads"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [SHAPE, SHORT_RUNS] + ROWS_SHAPES + [WIDE_ROWS], ids=str)
def test_streamed_eval_is_bit_for_bit_what_the_cache_path_writes(dtype, shape, threads,
                                                                  restore_threads):
    """Eval's constants are per channel, so the output of a slice of x is the same slice of
    the output: slices of under a MiB are written through the cache."""
    fastbn.set_num_threads(threads)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3 - 2).astype(dtype)
    channels = shape[1]
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    weight = rng.uniform(0.5, 2, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias)
    axis = x.ndim - 1 if x.ndim > 2 else 0  # along the runs, or across the rows
    step = max(1, 2**20 // (x.nbytes // x.shape[axis]))
    for start in range(0, x.shape[axis], step):
        piece = (slice(None),) * axis + (slice(start, start + step),)
        cached = fastbn.batch_norm(np.ascontiguousarray(x[piece]), running_mean, running_var,
                                   weight, bias)
        np.testing.assert_array_equal(y[piece], cached, err_msg=f"from {start}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [SHAPE, SHORT_RUNS, CHANNEL_TILES] + ROWS_SHAPES + [WIDE_ROWS],
                         ids=str)
def test_streamed_training_backward_matches_the_reference(dtype, shape):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    grad_out = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 2, shape[1]).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_train(x, weight)
    grad_x, _, _ = fastbn.batch_norm_backward(grad_out, x, mean, invstd, weight)
    expected = backward_train(grad_out, x, mean, invstd, weight)[0]
    tolerance = 16 * np.finfo(dtype).eps * np.abs(expected).max()
    np.testing.assert_allclose(grad_x, expected, rtol=0, atol=tolerance)
