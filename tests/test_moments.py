"""fastbn.moments and Moments: exact, mergeable per-channel statistics."""

import numpy as np
import pytest

import fastbn
from fastbn import Moments


def reference_moments(x, axis):
    """count, mean, m2 per channel in float64, straight from the definition."""
    values = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, x.shape[axis])
    mean = values.mean(axis=0) if len(values) else np.zeros(values.shape[1])
    return len(values), mean, ((values - mean) ** 2).sum(axis=0)


def assert_moments_close(moments, count, mean, m2, rtol=1e-12):
    np.testing.assert_array_equal(moments.count, np.full(mean.shape, float(count)))
    np.testing.assert_allclose(moments.mean, mean, rtol=rtol, atol=1e-300)
    np.testing.assert_allclose(moments.m2, m2, rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((50, 7), 1), ((4, 3, 33), 1), ((5, 6, 7, 8), -1),
                                         ((3, 9, 11), 2)])
def test_moments_match_the_definition(dtype, shape, axis):
    x = (np.random.default_rng(0).standard_normal(shape) * 3 + 100).astype(dtype)
    assert_moments_close(fastbn.moments(x, axis=axis), *reference_moments(x, axis), rtol=1e-11)


def test_variance_properties():
    x = np.random.default_rng(1).standard_normal((40, 5))
    moments = fastbn.moments(x)
    np.testing.assert_allclose(moments.var, x.var(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.unbiased_var, x.var(axis=0, ddof=1), rtol=1e-13)


@pytest.mark.parametrize("cuts", [[10], [1, 2, 60], [0, 0, 37], [33, 33]])
def test_merging_parts_equals_the_whole(cuts):
    """Parts of any size, empty ones included, merge to the moments of the whole."""
    x = np.random.default_rng(2).standard_normal((70, 4)) * 1e3 + 1e6
    parts = [fastbn.moments(part) for part in np.split(x, cuts)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged + part
    assert_moments_close(merged, *reference_moments(x, 1), rtol=1e-9)
    assert_moments_close(Moments.merge_all(parts), *reference_moments(x, 1), rtol=1e-9)


def test_merge_is_associative():
    rng = np.random.default_rng(3)
    a, b, c = (fastbn.moments(rng.standard_normal((n, 3)) + n) for n in (5, 17, 2))
    left, right = (a + b) + c, a + (b + c)
    np.testing.assert_allclose(left.mean, right.mean, rtol=1e-14)
    np.testing.assert_allclose(left.m2, right.m2, rtol=1e-13)
    np.testing.assert_array_equal(left.count, right.count)


def test_empty_moments_are_the_identity_of_merge():
    x = np.random.default_rng(4).standard_normal((9, 3))
    moments = fastbn.moments(x)
    assert Moments.empty(3) + moments == moments
    assert moments + Moments.empty(3) == moments
    both_empty = Moments.empty(3) + fastbn.moments(np.empty((0, 3)))
    np.testing.assert_array_equal(both_empty.to_array(), np.zeros(9))


def test_flat_array_round_trip_for_collectives():
    moments = fastbn.moments(np.random.default_rng(5).standard_normal((6, 4)))
    flat = moments.to_array()
    assert flat.dtype == np.float64 and flat.shape == (12,)
    assert Moments.from_array(flat) == moments


def test_merging_different_channel_counts_is_refused():
    with pytest.raises(ValueError, match="3 and 4 channels"):
        Moments.empty(3).merge(Moments.empty(4))
    with pytest.raises(TypeError, match="can only merge Moments"):
        Moments.empty(3).merge(np.zeros(9))
    with pytest.raises(ValueError, match="at least one"):
        Moments.merge_all([])
    with pytest.raises(ValueError, match="length 3\\*C"):
        Moments.from_array(np.zeros(7))


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x must"):
        fastbn.moments([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x must have dtype"):
        fastbn.moments(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="axis"):
        fastbn.moments(np.zeros((3, 2)), axis=2)
