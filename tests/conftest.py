"""Shared fixtures and helpers for fastbn's tests.

- ``--run-slow`` runs the tests marked ``slow`` (skipped otherwise).
- Hypothesis profiles: "ci" (the default; a few hundred examples over the whole suite) and
  "thorough", chosen with the HYPOTHESIS_PROFILE environment variable.
- :class:`Case`: one input layout (dtype x shape x axis x memory order) with a readable id,
  and :func:`cases` to expand layouts into ``pytest.param`` lists.
- :func:`assert_close`: elementwise error bound ``factor * (eps * scale + tiny)``.
"""

import dataclasses
import os
import threading
import warnings

import numpy as np
import pytest
from hypothesis import settings

import fastbn

# ------------------------------------------------------------------------- options


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# When a Hypothesis test fails, its pytest plugin imports libcst to write the failing example
# as a patch. Old libcst releases warn on import (mypy_extensions.TypedDict), and with
# warnings as errors that turns the failure report into an INTERNALERROR that hides it.
# Import libcst up front, if it is installed, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import libcst  # noqa: F401
    except ImportError:
        pass

settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --------------------------------------------------------------------------- inputs

DTYPES = (np.float32, np.float64)

#: Memory orders of the input. "transposed" stores axis 0 fastest-varying, the others in C
#: order (NHWC memory seen as NCHW, say); "strided" takes every other element of the last
#: axis of a twice-as-wide array; "reversed" walks axis 0 backwards (negative stride).
ORDERS = ("C", "F", "transposed", "strided", "reversed")

#: The orders whose arrays fill one block of memory: the kernels read them in place.
DENSE_ORDERS = ("C", "F", "transposed")

#: (shape, axis) pairs small enough to run serially: odd sizes, C = 1, N = 2, one outer
#: row, large inner (several L1 chunks), large C (several column blocks), every rank 2-5,
#: the channel axis first, last and in the middle.
SMALL_LAYOUTS = (
    ((5, 3), 1),
    ((5, 3), 0),
    ((2, 7), 1),
    ((2, 1), 1),
    ((2, 1), -1),
    ((1, 3, 2), 1),
    ((3, 4, 5), 1),
    ((3, 4, 5), -1),
    ((3, 4, 5), 0),
    ((4, 1, 3, 3), 1),
    ((2, 3, 5, 7), 1),
    ((2, 3, 5, 7), 2),
    ((2, 3, 5, 7), -1),
    ((2, 3, 4, 5, 6), 1),
    ((2, 3, 4, 5, 6), 3),
    ((2, 3, 4, 5, 6), -1),
    ((2, 3, 4100), 1),
    ((2, 3, 4100), -1),
    ((3, 1100), 1),
    ((3, 1100), 0),
)

#: Layouts the kernels run on several threads (when there are several): from 16K values the
#: backward, from 32K eval, from 64K the training forward (csrc/fastbn.h), so the first three
#: only some of them; covering both loop families and both ways of splitting work: inner > 1 by
#: channel, inner > 1 by position (C < threads, and splits inside a run, one longer and one
#: shorter than the moments' chunks), inner == 1 ((N, C)
#: and channels-last) by channel, by position, and with more channels than one column block;
#: and short runs seen as rows of C * inner columns ("spread": inner 3 everywhere, inner 20
#: everywhere but in float64 eval, inner 25 and 49 in the reductions but not in eval (49 in
#: float64 in the training forward only, and (32, 64, 8, 8)'s 64 in neither); by
#: position, and, in the training forward of (160, 64, 7, 7), too large for the L2 caches, by
#: channel); narrow rows, walked as wide rows, with rows left over in a thread's part
#: ((16411, 6), (3001, 40), (4001, 17) whose wide rows end in part of a group, and (9000, 2,
#: 4) spread to rows of 8 columns); and eval of few rows of many columns split by columns
#: ((16, 4100), and (8, 1024, 8) spread); one or two outer indices of many channels,
#: whose grad_x pass goes a whole outer index at a time ((1, 512, 196), (2, 1024, 49)); and
#: one channel, seen as one run whatever the layout ((300, 1, 70), (70000, 1)).
LARGE_LAYOUTS = (
    ((4, 32, 14, 14), 1),
    ((64, 512), 1),
    ((8, 60, 9, 9), -1),
    ((32, 64, 8, 8), 1),
    ((600, 64, 3), 1),
    ((64, 128, 20), 1),
    ((32, 128, 25), 1),
    ((100, 40, 7, 7), 1),
    ((160, 64, 7, 7), 1),
    ((1, 512, 196), 1),
    ((2, 1024, 49), 1),
    ((2, 3, 40000), 1),
    ((3, 2, 30001), 1),
    ((65, 2, 4000), 1),
    ((4096, 256), 1),
    ((40000, 3), 1),
    ((16411, 6), 1),
    ((3001, 40), 1),
    ((4001, 17), 1),
    ((9000, 2, 4), 1),
    ((300, 600), 1),
    ((16, 4100), 1),
    ((8, 1024, 8), 1),
    ((8, 16, 16, 32), -1),
    ((32, 64, 8, 8), -1),
    ((300, 1, 70), 1),
    ((70000, 1), 1),
)


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: type
    shape: tuple
    axis: int
    order: str

    @property
    def id(self):
        shape = ",".join(map(str, self.shape))
        return f"{np.dtype(self.dtype).name}-({shape})-axis={self.axis}-{self.order}"

    @property
    def channels(self):
        return self.shape[self.axis]

    @property
    def count(self):
        """Values per channel, M."""
        return int(np.prod(self.shape)) // self.channels

    @property
    def eps(self):
        return float(np.finfo(self.dtype).eps)

    def array(self, rng, *, loc=None, scale=None):
        """Random input of this case: channel c is roughly N(loc[c], scale[c]**2).

        Channels get different locations and scales so that a channel mix-up shows.
        """
        channels = self.channels
        if loc is None:
            loc = rng.uniform(-3.0, 3.0, channels)
        if scale is None:
            scale = rng.uniform(0.5, 2.0, channels)
        shape = [1] * len(self.shape)
        shape[self.axis] = channels
        values = rng.standard_normal(self.shape) * np.reshape(scale, shape) + np.reshape(loc, shape)
        return in_order(values.astype(self.dtype), self.order)

    def per_channel(self, rng, low=-2.0, high=2.0):
        """A random per-channel array of this case's dtype."""
        return rng.uniform(low, high, self.channels).astype(self.dtype)


def in_order(array, order):
    """A copy of ``array`` (same values) laid out in memory order ``order`` (ORDERS)."""
    if order == "C":
        return np.ascontiguousarray(array)
    if order == "F":
        return np.asfortranarray(array)
    if order == "transposed":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(array, 0, -1)), -1, 0)
    if order == "strided":
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), dtype=array.dtype)
        view = wide[..., ::2]
        view[...] = array
        return view
    if order == "reversed":
        reversed_copy = np.ascontiguousarray(array[::-1])
        return reversed_copy[::-1]
    raise ValueError(f"unknown order {order!r}")


def assert_laid_out_for(array, case, what="output"):
    """``array`` has case's shape and an output's memory layout for case's input: that of
    numpy.empty_like(input), the input's own order of axes, without gaps (strides compared
    where the length is not 1)."""
    expected = np.empty_like(in_order(np.zeros(case.shape, case.dtype), case.order))
    assert array.shape == case.shape, f"{what}: shape {array.shape}"
    assert all(
        got == want
        for got, want, length in zip(array.strides, expected.strides, case.shape)
        if length != 1
    ), f"{what}: strides {array.strides}, expected {expected.strides} ({case.order} input)"


def cases(layouts, orders=ORDERS, dtypes=DTYPES, marks=()):
    """``pytest.param(Case)`` for every dtype x (shape, axis) x order, with readable ids."""
    params = []
    for dtype in dtypes:
        for shape, axis in layouts:
            for order in orders:
                case = Case(dtype, shape, axis, order)
                params.append(pytest.param(case, id=case.id, marks=marks))
    return params


#: Every small layout in every order, plus the large layouts in the orders read in place.
ALL_CASES = cases(SMALL_LAYOUTS) + cases(LARGE_LAYOUTS, orders=DENSE_ORDERS)


@pytest.fixture
def rng():
    """A seeded generator: every run sees the same data."""
    return np.random.default_rng(20261122)


# ----------------------------------------------------------------------- assertions


def assert_close(actual, expected, *, factor, scale=None, what=""):
    """Assert ``|actual - expected| <= factor * (eps * scale + tiny)`` elementwise, eps and
    tiny (the smallest subnormal) of ``actual.dtype``.

    ``expected`` is a float64 reference. ``scale`` (scalar or broadcastable array) is the
    magnitude the rounding errors are relative to; by default ``max(1, max|expected|)``,
    the size of the largest value. Below the normal range an operation's rounding error is
    absolute, up to half the smallest subnormal, however small the scale: hence tiny. The
    dtype of ``actual`` is checked too.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    eps = float(np.finfo(actual.dtype).eps)
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    tiny = float(np.finfo(actual.dtype).smallest_subnormal)
    bound = factor * (eps * np.asarray(scale, dtype=np.float64) + tiny)
    error = np.abs(actual.astype(np.float64) - expected)
    bad = ~(error <= bound)  # NaN counts as a failure
    if np.any(bad):
        worst = np.unravel_index(np.argmax(np.where(bad, error, -1.0)), error.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {error.size} values off by more than "
            f"{factor} * (eps * scale + tiny) of {actual.dtype}; "
            f"worst at index {tuple(map(int, worst))}: "
            f"got {actual[worst]!r}, expected {expected[worst]!r}, "
            f"error {error[worst]:.3g} > bound {np.broadcast_to(bound, error.shape)[worst]:.3g}"
        )


#: Whether the build fuses every multiply-add of the kernels: at -O3 the compiler fuses the
#: plain loops' as the AVX-512 loops do, so two code paths computing one value give the same
#: bits. CI's sanitizer build (-O1) leaves the plain loops' unfused: there they agree to
#: rounding only.
FUSED_MULTIPLY_ADD = "-O3" in fastbn.build_info()["flags"]


def assert_same_values(actual, expected, what=""):
    """Two code paths' elementwise results: bit for bit where FUSED_MULTIPLY_ADD, else
    within 4 ulps of the largest value (a product rounded once more, then cancelled)."""
    if FUSED_MULTIPLY_ADD:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        assert_close(actual, expected, factor=4, what=what)


def accumulation(dtype, count):
    """The typical relative error of a float64 sum of ``count`` terms, sqrt(M) * eps(float64)
    (recursive summation with random rounding errors), in units of eps(dtype)."""
    return np.sqrt(count) * np.finfo(np.float64).eps / np.finfo(dtype).eps


def snapshot(*arrays):
    """Copies of the given arrays (None kept), for checking later that nothing changed."""
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after, names):
    for name, old, new in zip(names, before, after, strict=True):
        if old is None:
            continue
        assert new.dtype == old.dtype and new.shape == old.shape, f"{name} changed dtype/shape"
        assert old.tobytes() == np.ascontiguousarray(new).tobytes(), f"{name} was modified"


@pytest.fixture
def restore_threads():
    """Puts fastbn's thread setting back as it was after the test."""
    before = fastbn.get_num_threads()
    yield
    fastbn.set_num_threads(None)
    if fastbn.get_num_threads() != before:
        fastbn.set_num_threads(before)


def grad_x_terms(dy, xhat, training):
    """Per element, the sum of |terms| of grad_x / (weight * invstd), for (C, M) channel rows:
    |dy| in eval; |dy| + mean|dy| + |xhat| * mean|dy * xhat| in training, where grad_x is
    weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)). The scale of its rounding."""
    terms = np.abs(dy)
    if training:
        terms = (
            terms
            + np.abs(dy).mean(axis=1, keepdims=True)
            + np.abs(xhat) * np.abs(dy * xhat).mean(axis=1, keepdims=True)
        )
    return terms


def run_threads(target, count):
    """Runs target(0), ..., target(count - 1) in as many threads, started together; raises
    the first exception any of them raised."""
    errors = []
    start = threading.Barrier(count)

    def guarded(index):
        try:
            start.wait()
            target(index)
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
