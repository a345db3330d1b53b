"""Concurrency: kernels release the GIL; many Python threads calling every function, with
the process-wide thread count changing under them, get the serial results; shared layers
with inputs large enough for threaded kernels. (Thread counts and fork: test_threads.py;
shared layers with small inputs, eval and training: test_layer.py.)"""

import threading
import time

import numpy as np
import pytest

import fastbn
from conftest import Case, assert_close, run_threads
from test_threads import THREAD_FACTOR, _run_all, _scales


def test_kernels_release_the_gil():
    """Two Python threads running single-threaded kernels overlap in time.

    With the GIL held for a whole kernel, one thread could not even read the clock while
    the other's kernel runs, so no two calls could overlap however long they ran. Both
    threads call for half a second (a fixed number of calls could all run while the host
    kept the other thread off its core).
    """
    fastbn.set_num_threads(1)
    try:
        x = np.random.default_rng(0).standard_normal((16, 64, 32, 32)).astype(np.float32)
        spans = {0: [], 1: []}
        start = threading.Barrier(2)

        def work(name):
            start.wait()
            deadline = time.perf_counter() + 0.5
            while time.perf_counter() < deadline:
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


#: Small (serial kernels), >= 64K values (threaded: by channel, by position, inner == 1;
#: from a second Python thread, serial: test_threads) and 4M (threaded from any thread, but
#: while another call's threads run).
MIXED_CASES = (
    Case(np.float32, (5, 3), 1, "C"),
    Case(np.float64, (32, 64, 8, 8), 1, "C"),
    Case(np.float32, (40000, 3), 1, "C"),
    Case(np.float64, (3, 2, 30001), 1, "C"),
    Case(np.float32, (8, 16, 16, 32), -1, "C"),
    Case(np.float32, (64, 64, 32, 32), 1, "C"),
)


@pytest.mark.usefixtures("restore_threads")
def test_concurrent_calls_with_changing_thread_counts_match_serial_calls(rng):
    """Six Python threads run every function (test_threads._run_all: training and eval
    forward, running statistics, both backward passes, moments) on different inputs, each
    setting the process-wide thread count to 1-4 before its round, so the count changes
    while other threads' kernels run. Every result is the serial one, within the tolerance
    of a different thread count (test_threads)."""
    inputs, serial, scales = [], [], []
    fastbn.set_num_threads(1)
    for case in MIXED_CASES:
        x = case.array(rng)
        weight, bias = case.per_channel(rng), case.per_channel(rng)
        grad_out = rng.standard_normal(case.shape).astype(case.dtype)
        running_mean = case.per_channel(rng)
        running_var = rng.uniform(0.5, 2.0, case.channels).astype(case.dtype)
        inputs.append((x, weight, bias, grad_out, running_mean, running_var))
        serial.append(_run_all(case, *inputs[-1]))
        scales.append(_scales(case, x, weight, grad_out, serial[-1]))

    workers, rounds = 6, 4
    results = [[] for _ in range(workers)]

    def work(worker):
        for round_ in range(rounds):
            index = (worker + round_) % len(MIXED_CASES)
            threads = 1 + (worker + round_) % 4
            fastbn.set_num_threads(threads)
            statistics = (serial[index]["mean"], serial[index]["invstd"])
            result = _run_all(MIXED_CASES[index], *inputs[index], statistics=statistics)
            results[worker].append((index, threads, result))

    run_threads(work, workers)

    for worker_results in results:
        assert len(worker_results) == rounds
        for index, threads, result in worker_results:
            case = MIXED_CASES[index]
            for name, value in result.items():
                assert_close(
                    value,
                    serial[index][name],
                    factor=THREAD_FACTOR,
                    scale=scales[index].get(name),
                    what=f"{name}, {case.id}, concurrent, set_num_threads({threads}) before",
                )


def test_shared_layer_serves_large_eval_calls_from_many_threads(rng):
    """Eval calls on one layer from several threads at once, on batches large enough for
    threaded kernels on a thread alone and on single examples: each result is the serial
    one, bit for bit."""
    bn = fastbn.BatchNorm(64)
    for _ in range(3):
        bn((rng.standard_normal((16, 64, 8, 8)) * 2 + 1).astype(np.float32))
    bn.weight[...] = rng.uniform(0.5, 2.0, 64)
    bn.eval()
    inputs = [rng.standard_normal((32, 64, 8, 8)).astype(np.float32) for _ in range(4)]
    examples = [rng.standard_normal(64).astype(np.float32) for _ in range(4)]
    expected = [bn(x) for x in inputs]
    expected_examples = [bn(example) for example in examples]
    results = [None] * 4

    def work(index):
        results[index] = [(bn(inputs[index]), bn(examples[index])) for _ in range(5)]

    run_threads(work, 4)
    for index, rounds in enumerate(results):
        for y, y_example in rounds:
            np.testing.assert_array_equal(y, expected[index])
            np.testing.assert_array_equal(y_example, expected_examples[index])


def test_shared_layer_training_on_large_batches_is_serialized(rng):
    """Training calls on one layer from several threads, each a threaded kernel that runs
    without the GIL: every update is counted and none is torn. All calls get the same
    batch, so any serial order gives the same bits."""
    x = (rng.standard_normal((32, 64, 8, 8)) * 3 + 2).astype(np.float32)
    workers, calls = 4, 8
    serial = fastbn.BatchNorm(64, momentum=0.05)
    for _ in range(workers * calls):
        serial(x)
    shared = fastbn.BatchNorm(64, momentum=0.05)
    run_threads(lambda index: [shared(x) for _ in range(calls)], workers)
    assert shared.num_batches_tracked == workers * calls
    np.testing.assert_array_equal(shared.running_mean, serial.running_mean)
    np.testing.assert_array_equal(shared.running_var, serial.running_var)
