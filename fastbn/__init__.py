"""fastbn: fast, numerically exact CPU batch normalization for NumPy.

The functional API mirrors ``torch.nn.functional.batch_norm``; :class:`BatchNorm` is the
stateful layer. Kernels are C with OpenMP and run without the GIL.
"""

from importlib.util import find_spec as _find_spec

from fastbn._core import (
    batch_norm,
    batch_norm_backward,
    batch_norm_train,
    build_info,
    get_num_threads,
    openmp_enabled,
    set_num_threads,
)
from fastbn.layer import BatchNorm, fold
from fastbn.moments import Moments, moments

__version__ = "0.1.0"

if _find_spec("threadpoolctl") is not None:  # optional: see fastbn._threadpoolctl
    from fastbn import _threadpoolctl

    _threadpoolctl.register()

__all__ = [
    "BatchNorm",
    "Moments",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_train",
    "build_info",
    "fold",
    "get_num_threads",
    "moments",
    "openmp_enabled",
    "set_num_threads",
]
