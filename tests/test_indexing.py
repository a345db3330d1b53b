"""64-bit indexing: arrays of more than 2**31 elements are addressed exactly.

The unit tests check the index arithmetic the kernels use on shapes far too large to
allocate; the slow test (``python -m pytest --run-slow tests/test_indexing.py``, about
9 GB of memory) normalizes a real array of more than 2**31 float32 values.
"""

import numpy as np
import pytest

import fastbn
from fastbn import _core

BIG = 2**31 + 7  # one past int32 on its own; products pass 2**32


def expected_runs(outer, channels, inner, channel, begin, end):
    """Reference: where channel ``channel``'s values at positions [begin, end) live."""
    runs = []
    m = begin
    while m < end:
        o, i = divmod(m, inner)
        length = min(inner - i, end - m)
        runs.append(((o * channels + channel) * inner + i, length))
        m += length
    return runs


@pytest.mark.parametrize(
    "outer, channels, inner, channel, begin, end",
    [
        (3, 5, BIG, 4, 0, 3 * BIG),  # long runs: each is longer than int32
        (3, 5, BIG, 2, BIG - 3, 2 * BIG + 11),  # a slice that starts and ends mid-run
        (BIG, 3, 1, 2, BIG - 5, BIG),  # channels-last: one value per outer index
        (7, 2**20, 2**12 + 1, 2**20 - 1, 5 * (2**12 + 1) + 3, 7 * (2**12 + 1)),
    ],
)
def test_contiguous_runs_are_exact_beyond_int32(outer, channels, inner, channel, begin, end):
    assert _core._contiguous_runs(outer, channels, inner, channel, begin, end) == expected_runs(
        outer, channels, inner, channel, begin, end
    )


@pytest.mark.parametrize("n", [2**31 + 1, 3 * 2**32 + 5, 2**62 + 3])
@pytest.mark.parametrize("nparts", [1, 2, 3, 7])
def test_thread_slices_cover_huge_ranges_exactly(n, nparts):
    slices = _core._split(n, nparts)
    assert slices[0][0] == 0 and slices[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [end - begin for begin, end in slices]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_normalizes_more_than_2_to_the_31_values():
    """Two channels of 2**30 + 3 values each, normalized in place."""
    inner = 2**30 + 3
    x = np.empty((1, 2, inner), dtype=np.float32)
    x[0, 0] = 1.0
    x[0, 0, ::2] = -1.0  # channel 0: +-1, mean ~0, std ~1
    x[0, 1] = 5.0
    x[0, 1, -1] = 7.0  # channel 1: all 5 but one 7 at the very end
    y, mean, invstd = fastbn.batch_norm_train(x, out=x)
    assert y is x
    half = (inner + 1) // 2  # the -1 values
    expected_mean0 = ((inner - half) - half) / inner
    assert mean[0] == pytest.approx(expected_mean0, abs=1e-7)
    assert mean[1] == pytest.approx(5.0 + 2.0 / inner, rel=1e-7)
    # The last element, past index 2**31, was read and written with the right statistics.
    var1 = (2.0**2) * (inner - 1) / inner**2
    assert x[0, 1, -1] == pytest.approx((7.0 - (5.0 + 2.0 / inner)) / np.sqrt(var1 + 1e-5), rel=1e-4)
