"""Concurrency and processes: the GIL is released, and forked children do not hang."""

import multiprocessing
import sys
import threading
import time

import numpy as np
import pytest

import fastbn


@pytest.fixture
def two_threads():
    previous = fastbn.get_num_threads()
    fastbn.set_num_threads(2)
    yield
    fastbn.set_num_threads(previous)


def test_kernels_release_the_gil():
    """Two Python threads running single-threaded kernels overlap in time.

    With the GIL held for a whole kernel, one thread could not even read the clock while
    the other's kernel runs, so no two calls could overlap.
    """
    fastbn.set_num_threads(1)
    try:
        x = np.random.default_rng(0).standard_normal((16, 64, 32, 32)).astype(np.float32)
        spans = {0: [], 1: []}
        start = threading.Barrier(2)

        def work(name):
            start.wait()
            for _ in range(8):
                begin = time.perf_counter()
                fastbn.batch_norm_train(x)
                spans[name].append((begin, time.perf_counter()))

        threads = [threading.Thread(target=work, args=(name,)) for name in spans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        fastbn.set_num_threads(None)
    overlaps = sum(
        1 for a0, a1 in spans[0] for b0, b1 in spans[1] if a0 < b1 and b0 < a1
    )
    assert overlaps > 0, "no two kernel calls overlapped: the GIL is held while kernels run"


def _child_normalizes(x, queue):
    y, mean, invstd = fastbn.batch_norm_train(x)
    queue.put((fastbn.get_num_threads(), float(np.abs(y.mean(axis=(0, 2, 3))).max())))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_runs_after_the_parent_used_openmp(two_threads):
    """GNU libgomp's thread pool does not survive fork(): a child that enters a parallel
    region hangs. fastbn notices the fork and runs the child's kernels serially."""
    x = np.random.default_rng(1).standard_normal((64, 64, 32, 32)).astype(np.float32)
    fastbn.batch_norm_train(x)  # the parent's OpenMP pool is now up
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_normalizes, args=(x, queue))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung in a fastbn kernel")
    assert child.exitcode == 0
    threads_in_child, worst_mean = queue.get(timeout=10)
    assert threads_in_child == 1
    assert worst_mean < 1e-5
    # The parent keeps its threads.
    assert fastbn.get_num_threads() == 2
    fastbn.batch_norm_train(x)
