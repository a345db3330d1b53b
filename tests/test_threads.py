"""Threads: results do not depend on the thread count; the thread setting API.

Inputs of 16K values and more (by kernel: csrc/fastbn.h) run on several threads, split by
channel or by position depending on the layout (conftest.LARGE_LAYOUTS). Results with 2 and 3 threads are compared with the
single-thread result. Only the order of float64 additions may differ between them, so
elementwise outputs must agree to THREAD_FACTOR ulps of the largest value, and per-channel
statistics and sums to THREAD_FACTOR times the rounding of their sums (conftest.accumulation
for means and variances, the sum of |terms| for grad_weight and grad_bias).

Every test restores the thread setting (conftest.restore_threads).
"""

import multiprocessing
import queue as queues
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import fastbn
from fastbn import _core
from conftest import LARGE_LAYOUTS, accumulation, assert_close, cases, grad_x_terms

pytestmark = pytest.mark.usefixtures("restore_threads")

THREAD_FACTOR = 4
THREAD_COUNTS = (2, 3)


def _run_all(case, x, weight, bias, grad_out, running_mean, running_var, statistics=None):
    """Every function on the same input; returns the results by name. The backward passes
    get ``statistics`` (mean, invstd) if given, else those this run's forward pass returned."""
    axis = case.axis
    results = {}
    results["y"], results["mean"], results["invstd"] = fastbn.batch_norm_train(
        x, weight, bias, axis=axis
    )
    mean_copy, var_copy = running_mean.copy(), running_var.copy()
    results["training y"] = fastbn.batch_norm(
        x, mean_copy, var_copy, weight, bias, training=True, momentum=0.5, axis=axis
    )
    results["running_mean"], results["running_var"] = mean_copy, var_copy
    results["eval y"] = fastbn.batch_norm(x, running_mean, running_var, weight, bias, axis=axis)
    mean, invstd = statistics or (results["mean"], results["invstd"])
    for training in (True, False):
        grads = fastbn.batch_norm_backward(
            grad_out, x, mean, invstd, weight, training=training, axis=axis
        )
        for name, value in zip(("grad_x", "grad_weight", "grad_bias"), grads, strict=True):
            results[f"{name} training={training}"] = value
    moments = fastbn.moments(x, axis=axis)
    results["moments mean"], results["moments m2"] = moments.mean, moments.m2
    return results


def _channel_rows(array, axis):
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _from_channel_rows(rows, like, axis):
    return np.moveaxis(rows.reshape(np.moveaxis(like, axis, 0).shape), 0, axis)


def _scales(case, x, weight, grad_out, single):
    """What the rounding of each result is relative to (None: its largest value, at least 1).

    Statistics carry the rounding of float64 sums (conftest.accumulation). y = weight *
    (x - mean) * invstd + bias carries, besides its own rounding, the statistics' error
    times weight * invstd. The gradients carry the rounding of their sums (as in
    test_functional): sum(|dy|) and sum(|dy * xhat|), and in grad_x the same divided by M.
    The moments stay in float64, so their sums' rounding is float64's: the mean's relative
    to mean|x|, m2's relative to m2 times 1 + |mean| / std, the variance's condition number.
    """
    rows, dy = _channel_rows(x, case.axis), _channel_rows(grad_out, case.axis)
    mean = single["mean"].astype(np.float64)
    invstd = single["invstd"].astype(np.float64)
    xhat = (rows - mean[:, None]) * invstd[:, None]
    statistic = 1 + accumulation(case.dtype, case.count)
    magnitude = np.abs(rows).mean(axis=1)
    slope = np.abs(weight.astype(np.float64)) * invstd
    scales = {
        "mean": magnitude * statistic,
        "invstd": invstd * statistic,
        "running_mean": magnitude * statistic + np.abs(single["running_mean"]),
        "running_var": np.abs(single["running_var"].astype(np.float64)) * statistic,
    }
    for name in ("y", "training y"):
        scales[name] = max(1.0, float(np.max(np.abs(single[name])))) + float(
            np.max((slope * magnitude + np.abs(weight) * np.abs(xhat).max(axis=1)) * statistic)
        )
    for training in (True, False):
        terms = grad_x_terms(dy, xhat, training)
        scales[f"grad_x training={training}"] = _from_channel_rows(
            slope[:, None] * terms, x, case.axis
        )
        scales[f"grad_weight training={training}"] = np.abs(dy * xhat).sum(axis=1)
        scales[f"grad_bias training={training}"] = np.abs(dy).sum(axis=1)
    float64_sum = 1 + accumulation(np.float64, case.count)
    m2 = single["moments m2"]
    scales["moments mean"] = magnitude * float64_sum
    scales["moments m2"] = (
        m2 + np.sqrt(m2 * case.count) * np.abs(single["moments mean"])
    ) * float64_sum
    return scales


def _check_thread_counts(case, rng, thread_counts):
    x = case.array(rng)
    weight, bias = case.per_channel(rng), case.per_channel(rng)
    grad_out = rng.standard_normal(case.shape).astype(case.dtype)
    running_mean = case.per_channel(rng)
    running_var = rng.uniform(0.5, 2.0, case.channels).astype(case.dtype)
    inputs = (x, weight, bias, grad_out, running_mean, running_var)

    fastbn.set_num_threads(1)
    single = _run_all(case, *inputs)
    scales = _scales(case, x, weight, grad_out, single)
    for threads in thread_counts:
        fastbn.set_num_threads(threads)
        if fastbn.openmp_enabled():  # with threads, not one thread twice
            assert _eventually(lambda: max(
                _core._threads_for(x.size, name) for name in _core._PARALLEL_MIN_ELEMENTS
            ) > 1), "no kernel takes threads: another Python thread calls?"
        several = _run_all(case, *inputs, statistics=(single["mean"], single["invstd"]))
        for name, value in several.items():
            assert_close(
                value,
                single[name],
                factor=THREAD_FACTOR,
                scale=scales.get(name),
                what=f"{name} with {threads} threads vs 1, {case.id}",
            )


@pytest.mark.parametrize("case", cases(LARGE_LAYOUTS, orders=("C",)))
def test_results_do_not_depend_on_the_thread_count(case, rng):
    _check_thread_counts(case, rng, THREAD_COUNTS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    cases((((64, 64, 32, 32), 1), ((65536, 64), 1), ((4, 3, 500000), 1)), orders=("C",)),
)
def test_results_do_not_depend_on_the_thread_count_large(case, rng):
    _check_thread_counts(case, rng, (2, 3, 4, 5, 8))


# --------------------------------------------------------------------- the setting


def test_set_and_get_round_trip():
    fastbn.set_num_threads(None)
    default = fastbn.get_num_threads()
    assert isinstance(default, int) and default >= 1
    for threads in (1, 2, 3, 7, np.int64(2)):
        fastbn.set_num_threads(threads)
        expected = int(threads) if fastbn.openmp_enabled() else 1
        assert fastbn.get_num_threads() == expected
    fastbn.set_num_threads(None)
    assert fastbn.get_num_threads() == default


def test_openmp_enabled_is_a_bool():
    assert isinstance(fastbn.openmp_enabled(), bool)
    if not fastbn.openmp_enabled():
        fastbn.set_num_threads(4)
        assert fastbn.get_num_threads() == 1


@pytest.mark.parametrize(
    ("value", "exception", "match"),
    [
        (0, ValueError, r"^num_threads must be >= 1, got 0"),
        (-1, ValueError, r"^num_threads must be >= 1, got -1"),
        (np.int32(-3), ValueError, r"^num_threads must be >= 1"),
        ("a", TypeError, r"^num_threads must be an integer or None, got str"),
        ("2", TypeError, r"^num_threads must be an integer or None, got str"),
        (1.5, TypeError, r"^num_threads must be an integer or None, got float"),
        (2.0, TypeError, r"^num_threads must be an integer or None, got float"),
        (True, TypeError, r"^num_threads must be an integer or None, got bool"),
        ([2], TypeError, r"^num_threads must be an integer or None, got list"),
    ],
    ids=repr,
)
def test_bad_thread_counts_are_rejected_and_change_nothing(value, exception, match):
    fastbn.set_num_threads(3)
    with pytest.raises(exception, match=match):
        fastbn.set_num_threads(value)
    expected = 3 if fastbn.openmp_enabled() else 1
    assert fastbn.get_num_threads() == expected


def test_threadpoolctl_limits_the_default():
    """Without an explicit setting, fastbn follows OpenMP's limit, which threadpoolctl sets."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not fastbn.openmp_enabled():
        pytest.skip("built without OpenMP")
    fastbn.set_num_threads(None)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1


# ------------------------------------------------- the threads of other Python threads


def _in_new_thread(function):
    """function() called in a new Python thread, which then ends; returns its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def _eventually(condition, seconds=5.0):
    """Whether condition() holds within ``seconds``: a Python thread's join() returns before
    the C library has run its thread-exit destructors."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.fixture
def two_threads():
    if not fastbn.openmp_enabled():
        pytest.skip("built without OpenMP")
    fastbn.set_num_threads(2)


@pytest.mark.usefixtures("two_threads")
def test_a_second_python_thread_takes_threads_only_for_large_jobs():
    """While more than one thread calls kernels large enough for threads, each takes threads
    only from the shared thresholds on: libgomp keeps a pool of threads for every thread
    that starts a parallel region, and with more pooled threads than cores they sleep
    between regions, where waking them costs more than a small job saves."""
    fastbn.batch_norm_train(np.ones((4, 64, 32, 32), np.float32))  # a call with threads
    assert _eventually(lambda: _core._threads_for(1 << 16, "training") == 2)
    thresholds = _core._PARALLEL_MIN_ELEMENTS
    for kernel_pass, (alone, _) in thresholds.items():
        assert _core._threads_for(alone - 1, kernel_pass) == 1
        assert _core._threads_for(alone, kernel_pass) == 2
    in_other_thread = _in_new_thread(lambda: {
        kernel_pass: [_core._threads_for(n, kernel_pass) for n in (alone, shared - 1, shared)]
        for kernel_pass, (alone, shared) in thresholds.items()
    })
    assert in_other_thread == {kernel_pass: [1, 1, 2] for kernel_pass in thresholds}


@pytest.mark.usefixtures("two_threads")
def test_small_jobs_get_threads_back_when_the_other_caller_is_gone():
    """While a second thread that called a large job lives, this thread's small jobs run
    on the calling thread; once it ends, they get threads again. Results are the same
    either way."""
    alone, shared = _core._PARALLEL_MIN_ELEMENTS["training"]
    x = np.random.default_rng(0).standard_normal((shared // 1024, 1024)).astype(np.float32)
    small = x[: alone // 1024]
    fastbn.batch_norm_train(small)
    assert _eventually(lambda: _core._threads_for(small.size, "training") == 2)
    ran, release = threading.Event(), threading.Event()

    def large_job_then_wait():
        fastbn.batch_norm_train(x)
        ran.set()
        release.wait()

    other = threading.Thread(target=large_job_then_wait)
    other.start()
    try:
        assert ran.wait(timeout=60)
        assert _core._threads_for(small.size, "training") == 1
        while_shared = fastbn.batch_norm_train(small)
    finally:
        release.set()
        other.join()
    assert _eventually(lambda: _core._threads_for(small.size, "training") == 2)
    for got, want in zip(while_shared, fastbn.batch_norm_train(small), strict=True):
        assert_close(got, want, factor=THREAD_FACTOR, what="serial while shared vs threaded")


@pytest.mark.usefixtures("two_threads")
def test_a_call_while_another_calls_threads_run_takes_one_thread():
    """Concurrent callers keep the cores busy already: while a kernel's threads run, a call
    from another thread takes its calling thread alone instead of a team of its own."""
    _, shared = _core._PARALLEL_MIN_ELEMENTS["backward"]
    x = np.random.default_rng(0).standard_normal((shared // 256, 256)).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x)
    assert _eventually(lambda: _core._threads_for(shared, "backward") == 2)
    done = threading.Event()

    def backward_for_a_while():
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            fastbn.batch_norm_backward(x, x, mean, invstd)
        done.set()

    other = threading.Thread(target=backward_for_a_while)
    other.start()
    seen = set()
    while not done.is_set() and 1 not in seen:
        seen.add(_core._threads_for(shared, "backward"))
    other.join()
    assert 1 in seen, "no call saw the other thread's team running"


_FORK_WITH_A_SECOND_CALLER = """
import os, threading
import fastbn
from fastbn import _core

fastbn.set_num_threads(2)
alone = _core._PARALLEL_MIN_ELEMENTS["training"][0]
counted, release = threading.Event(), threading.Event()

def second_caller():
    _core._threads_for(alone, "training")  # counted as a caller, no parallel region
    counted.set()
    release.wait()

thread = threading.Thread(target=second_caller)
thread.start()
counted.wait()
parent = _core._threads_for(alone, "training")
pid = os.fork()
if pid == 0:
    os._exit(10 + _core._threads_for(alone, "training"))
_, status = os.waitpid(pid, 0)
release.set()
thread.join()
print(parent, os.waitstatus_to_exitcode(status) - 10)
"""


@pytest.mark.usefixtures("two_threads")
def test_a_forked_child_counts_only_its_own_thread_as_a_caller():
    """A child forked while another thread counted as a caller has the forking thread alone:
    before any parallel region (after one, a forked child runs serially anyway), its calls
    take threads as a single caller's do."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    result = subprocess.run(
        [sys.executable, "-c", _FORK_WITH_A_SECOND_CALLER],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.split() == ["1", "2"]  # the parent's threads, the child's


def _every_function(x, grad_out):
    """The outputs of every function and of the layer (training and eval) on x."""
    _, mean, invstd = results = fastbn.batch_norm_train(x)
    running_mean, running_var = np.zeros(x.shape[1]), np.ones(x.shape[1])
    results += (fastbn.batch_norm(x, running_mean, running_var, training=True),)
    results += (running_mean, running_var, fastbn.batch_norm(x, running_mean, running_var))
    for training in (True, False):
        results += fastbn.batch_norm_backward(grad_out, x, mean, invstd, training=training)
    moments = fastbn.moments(x)
    bn = fastbn.BatchNorm(x.shape[1], dtype=x.dtype)
    results += (moments.mean, moments.m2, bn(x), bn.backward(grad_out), bn.eval()(x))
    return results


def _child(queue, x, grad_out):
    y, mean, invstd = fastbn.batch_norm_train(x)
    queue.put((fastbn.get_num_threads(), y, mean, invstd, _every_function(x, grad_out)))


def test_forked_child_runs_serially_instead_of_hanging():
    """GNU libgomp's thread pool does not survive fork(): a child forked after the parent
    ran a parallel region must not enter one (it would hang). It runs serially and reports
    one thread, and computes the same result."""
    if not fastbn.openmp_enabled():
        pytest.skip("built without OpenMP")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = np.random.default_rng(0).standard_normal((64, 64, 8, 8))
    grad_out = np.random.default_rng(1).standard_normal(x.shape)
    fastbn.set_num_threads(1)
    serial = _every_function(x, grad_out)
    fastbn.set_num_threads(2)
    expected = fastbn.batch_norm_train(x)  # a parallel region in the parent

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with warnings.catch_warnings():
        # Python >= 3.12 warns that fork() in a multi-threaded process may deadlock: the
        # very situation this test checks fastbn handles.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
        child = context.Process(target=_child, args=(queue, x, grad_out))
        child.start()
    try:
        threads, *result, every_result = queue.get(timeout=60)
    except queues.Empty:
        pytest.fail("the forked child did not finish batch_norm_train within 60 s (hung?)")
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
    assert threads == 1
    assert child.exitcode == 0
    for got, want in zip(result, expected, strict=True):
        assert_close(got, want, factor=THREAD_FACTOR, what="forked child vs parent")
    # every function and the layer, serially in the child: the parent's serial bits
    for index, (got, want) in enumerate(zip(every_result, serial, strict=True)):
        np.testing.assert_array_equal(got, want, err_msg=f"output {index} of _every_function")
