"""Shared set-up for the pytest-benchmark suite (not part of the default test run).

Run it with ``python -m pytest benchmarks/ --benchmark-only``; add
``--benchmark-columns=median,iqr,min,rounds --benchmark-sort=name`` for medians side by side.
"""

import contextlib

import pytest

import fastbn
from fastbn import bench


@pytest.fixture(scope="session")
def torch_or_none():
    """torch with fastbn's thread count, or None when it cannot be imported."""
    torch, _ = bench.import_torch()
    if torch is not None:
        torch.set_num_threads(fastbn.get_num_threads())
    return torch


@pytest.fixture(scope="session")
def inputs_for():
    """Inputs for a case, made once and kept for the session's later tests of that case."""
    made = {}

    def inputs(case):
        if case not in made:
            made.clear()  # one case's arrays alive at a time; tests are grouped by case
            made[case] = bench.Inputs.make(case)
        return made[case]

    return inputs


@pytest.fixture
def no_grad(torch_or_none):
    return torch_or_none.no_grad() if torch_or_none is not None else contextlib.nullcontext()
