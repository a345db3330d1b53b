"""fastbn against a plain NumPy implementation, a copy of the array and PyTorch.

One benchmark group per case and operation, so pytest-benchmark's table shows the contenders
side by side. PyTorch's benchmarks are skipped when it cannot be imported. The contenders are
the ones ``python -m fastbn bench`` times (see fastbn/bench/); that command interleaves them,
which makes its ratios steadier on a noisy machine than these back-to-back runs.
"""

import pytest

import fastbn
from fastbn import bench

CASES = [
    bench.Case((256, 1024)),
    bench.Case((4096, 256)),
    bench.Case((131072, 8)),  # narrow rows
    bench.Case((16, 16384)),  # wide rows
    bench.Case((32, 64, 56, 56)),
]
CONTENDERS = ["fastbn", "fastbn out=", "numpy", "copyto", "split-copy", "torch"]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("op", bench.OPS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_batch_norm(benchmark, case, op, contender, inputs_for, torch_or_none, no_grad):
    if contender == "torch" and torch_or_none is None:
        pytest.skip("torch is not importable")
    threads = fastbn.get_num_threads()
    if contender == "split-copy" and threads < 2:
        pytest.skip("one thread: the split copy is copyto")
    calls = bench.contenders(case, op, inputs_for(case), threads, torch_or_none)
    benchmark.group = f"{case.name} {case.dtype} {bench.OP_TITLES[op]}"
    with no_grad:
        benchmark(calls[contender])
