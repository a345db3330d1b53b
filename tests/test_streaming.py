"""Large outputs: written with streaming stores on CPUs with AVX-512 or AVX2 from 8 MiB, or where the
pass's arrays come to 18 MiB (grad_x of a backward on one core from 6 MiB: x, grad_out and
grad_x); where the pass runs at the speed of L3 (several threads, no rows walked in chunks
of columns), only where its arrays also come to 24 MiB or more: y of the forward passes
from 12 MiB (x and y), grad_x of the training backward pass from 8 MiB.

The streaming loop has its own code for the unaligned start and the end of every run, so
it is checked here on runs whose length and offset are odd, in place and not, against the
float64 reference, and against the loops that write through the cache, bit for bit. On a
CPU with neither AVX-512 nor AVX2 these inputs take the ordinary loops.
"""

import numpy as np
import pytest

import fastbn
from fastbn import _core

from reference import backward_train, forward_eval, forward_train

#: (2, 3, L) with L odd: every run of a channel starts at another offset from a cache line.
SHAPE = (2, 3, 700_001)
#: Runs of 49 values: most vectors of y hold the end of one run and the start of the next;
#: the backward sees them as rows of 64 * 49 columns (common.h: fbn_spread).
SHORT_RUNS = (1200, 64, 7, 7)
#: Runs of 81 values, which the training forward takes in tiles of a few whole channels; the
#: backward spreads them over columns in float32 (324 bytes), not in float64.
CHANNEL_TILES = (640, 64, 9, 9)
#: Channels-last, (N, C): whole rows stream as one block, with C below, at and past a vector.
ROWS_SHAPES = [(1_100_003, 3), (100_003, 37), (50_001, 64)]


def test_outputs_stream_from_8_mib_or_18_mib_of_arrays_and_at_l3_speed_from_24_mib():
    def streams(output_bytes, arrays, l3_speed):
        return _core._streams_output(output_bytes, arrays, l3_speed)

    MiB = 2**20
    if not streams(8 * MiB, 2, False):
        pytest.skip("this CPU has neither AVX-512 nor AVX2: nothing streams")
    assert not streams(8 * MiB - 64, 2, False), "y under 8 MiB stays in the cache"
    assert not streams(6 * MiB - 64, 3, False), "on one core grad_x under 6 MiB stays there"
    assert streams(6 * MiB, 3, False), "on one core grad_x streams from 6 MiB"
    assert not streams(8 * MiB - 64, 3, True), "at L3's speed grad_x under 8 MiB stays there"
    assert not streams(12 * MiB - 64, 2, True), "at L3's speed y under 12 MiB stays there"
    assert streams(12 * MiB, 2, True)
    assert streams(8 * MiB, 3, True) and streams(8 * MiB, 3, False)
    for shape in [SHAPE, SHORT_RUNS, CHANNEL_TILES] + ROWS_SHAPES:
        output_bytes = int(np.prod(shape)) * 4  # the float32 cases: float64 streams too
        assert streams(output_bytes, 2, True), f"{shape}: the forward pass's y"
        assert streams(output_bytes, 3, True), f"{shape}: the backward pass's grad_x"


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
@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=str)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_eval_forward_matches_the_reference(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(dtype)
    running_mean = rng.standard_normal(3).astype(dtype)
    running_var = rng.uniform(0.5, 2, 3).astype(dtype)
    y = fastbn.batch_norm(x, running_mean, running_var)
    expected = forward_eval(x, running_mean, running_var)
    tolerance = 8 * np.finfo(dtype).eps * np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [SHAPE, SHORT_RUNS] + ROWS_SHAPES, ids=str)
def test_streamed_eval_is_bit_for_bit_what_the_cache_path_writes(dtype, shape):
    """Eval's constants are per channel, so the output of a slice of x is the same slice of
    the output: slices of under a MiB are written through the cache."""
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
@pytest.mark.parametrize("shape", [SHAPE, SHORT_RUNS, CHANNEL_TILES] + ROWS_SHAPES, ids=str)
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
