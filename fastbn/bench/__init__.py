"""Benchmarks: fastbn against PyTorch, plain NumPy and a copy of the same array.

Run ``python -m fastbn bench`` (``--help`` for the options). For every case (shape, dtype,
layout) and operation (training forward, training backward, eval forward) the contenders are:

fastbn
    ``batch_norm_train``, ``batch_norm_backward`` and ``batch_norm(training=False)``; for a
    single example (one value per channel) the eval-mode ``BatchNorm`` layer when there is one.
torch
    ``torch.ops.aten.native_batch_norm`` and ``native_batch_norm_backward`` under
    ``torch.no_grad()``, on tensors that share the NumPy arrays' memory (channels-last input
    becomes a ``channels_last`` tensor), with as many threads as fastbn. Only when torch can be
    imported; it is never a requirement.
numpy
    A plain NumPy implementation (:func:`numpy_train`, :func:`numpy_backward`,
    :func:`numpy_eval`), computed in the input's dtype.
copy
    The floor for a memory-bound operation: one read of x and one write of an array of the
    same size. The faster of ``numpy.copyto`` and a copy split over fastbn's threads in C,
    as its kernels split their work (``fastbn._core._copy``).

The machine may be shared and noisy, so the contenders are interleaved: every round calls
each of them in turn (a few calls each, in a rotating order), and the table reports each
contender's median per-call time over all rounds. The number of rounds adapts to a time
budget for the whole run (``--budget``).

Importing this package does not import torch; :func:`run` imports it only when asked to.

One module per job, in the order a run uses them:

``cases``
    What to measure: :class:`Case` (shape, dtype, layout), the default and ``--quick``
    cases, parsing ``--shapes``.
``contender``
    What is timed: the callables for fastbn, torch, the NumPy twins and the copy floor, on
    :class:`Inputs` made once per case.
``timing``
    How they are timed: warm-up, a plan per contender, interleaved rounds, medians.
``load``
    Other processes' load on the cores during a measurement, and waiting for idle cores.
``runner``
    :func:`run`: every case, operation and thread count measured into a ``Report``.
``report``
    The results (``Report``, ``Result``, ``ScalingResult``) as text or Markdown tables.
``cli``
    ``python -m fastbn bench``: the options, :func:`run_from_args` and :func:`main`.

This package re-exports the names the CLI, the tests and the pytest-benchmark suite use.
"""

from .cases import DEFAULT_CASES, OP_TITLES, OPS, QUICK_CASES, Case, parse_case, select_cases
from .cli import add_arguments, main, run_from_args
from .contender import (
    EPS,
    Inputs,
    contenders,
    import_torch,
    numpy_backward,
    numpy_eval,
    numpy_train,
)
from .runner import run

__all__ = [
    "DEFAULT_CASES",
    "EPS",
    "OPS",
    "OP_TITLES",
    "QUICK_CASES",
    "Case",
    "Inputs",
    "add_arguments",
    "contenders",
    "import_torch",
    "main",
    "numpy_backward",
    "numpy_eval",
    "numpy_train",
    "parse_case",
    "run",
    "run_from_args",
    "select_cases",
]
