"""fastbn: fast, numerically exact CPU batch normalization for NumPy.

The functional API mirrors ``torch.nn.functional.batch_norm``; :class:`BatchNorm` is the
stateful layer. Kernels are C with OpenMP and run without the GIL.
"""

from importlib.util import find_spec as _find_spec
from pkgutil import extend_path as _extend_path

# Run from a checkout (`python -m fastbn demo` after `pip install .`), Python finds this
# source tree first, and it holds no compiled extension: look for the package's other
# directories on sys.path too, so that fastbn._core comes from the installed copy.
__path__ = _extend_path(__path__, __name__)

from fastbn._core import (  # noqa: E402
    batch_norm,
    batch_norm_backward,
    batch_norm_train,
    build_info,
    get_num_threads,
    openmp_enabled,
    set_num_threads,
)
from fastbn.layer import BatchNorm, fold  # noqa: E402
from fastbn.moments import Moments, moments  # noqa: E402

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
