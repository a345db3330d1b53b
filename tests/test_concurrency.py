"""Concurrency: kernels release the GIL. (Thread counts and fork: test_threads.py;
shared layers: test_layer.py.)"""

import threading
import time

import numpy as np
import fastbn


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
