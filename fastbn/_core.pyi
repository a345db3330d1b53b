"""Types of the compiled functional API (fastbn/_core.pyx).

Every array argument must be a float32 or float64 ``numpy.ndarray``, and the per-channel
arrays must have x's dtype: the overloads say so, and give the results x's dtype. An
array whose dtype the type checker does not know (``NDArray[Any]``, ``NDArray[floating]``)
matches the last overload; the functions check the dtype at run time.
"""

from typing import Any, SupportsIndex, TypedDict, overload

import numpy as np
from numpy.typing import NDArray

_F32 = NDArray[np.float32]
_F64 = NDArray[np.float64]
_Float = NDArray[np.floating[Any]]
_Real = float | np.floating[Any]

class _BuildInfo(TypedDict):
    openmp: bool
    simd: str
    flags: str

@overload
def batch_norm(  # type: ignore[overload-overlap]
    x: _F32,
    running_mean: _F32 | None,
    running_var: _F32 | None,
    weight: _F32 | None = None,
    bias: _F32 | None = None,
    training: bool = False,
    momentum: _Real = 0.1,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _F32 | None = None,
) -> _F32: ...
@overload
def batch_norm(
    x: _F64,
    running_mean: _F64 | None,
    running_var: _F64 | None,
    weight: _F64 | None = None,
    bias: _F64 | None = None,
    training: bool = False,
    momentum: _Real = 0.1,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _F64 | None = None,
) -> _F64: ...
@overload
def batch_norm(
    x: _Float,
    running_mean: _Float | None,
    running_var: _Float | None,
    weight: _Float | None = None,
    bias: _Float | None = None,
    training: bool = False,
    momentum: _Real = 0.1,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _Float | None = None,
) -> _Float: ...
@overload
def batch_norm_train(  # type: ignore[overload-overlap]
    x: _F32,
    weight: _F32 | None = None,
    bias: _F32 | None = None,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _F32 | None = None,
) -> tuple[_F32, _F32, _F32]: ...
@overload
def batch_norm_train(
    x: _F64,
    weight: _F64 | None = None,
    bias: _F64 | None = None,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _F64 | None = None,
) -> tuple[_F64, _F64, _F64]: ...
@overload
def batch_norm_train(
    x: _Float,
    weight: _Float | None = None,
    bias: _Float | None = None,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _Float | None = None,
) -> tuple[_Float, _Float, _Float]: ...
@overload
def batch_norm_backward(  # type: ignore[overload-overlap]
    grad_out: _F32,
    x: _F32,
    mean: _F32,
    invstd: _F32,
    weight: _F32 | None = None,
    *,
    training: bool = True,
    axis: SupportsIndex = 1,
    out: _F32 | None = None,
) -> tuple[_F32, _F32, _F32]: ...
@overload
def batch_norm_backward(
    grad_out: _F64,
    x: _F64,
    mean: _F64,
    invstd: _F64,
    weight: _F64 | None = None,
    *,
    training: bool = True,
    axis: SupportsIndex = 1,
    out: _F64 | None = None,
) -> tuple[_F64, _F64, _F64]: ...
@overload
def batch_norm_backward(
    grad_out: _Float,
    x: _Float,
    mean: _Float,
    invstd: _Float,
    weight: _Float | None = None,
    *,
    training: bool = True,
    axis: SupportsIndex = 1,
    out: _Float | None = None,
) -> tuple[_Float, _Float, _Float]: ...
def get_num_threads() -> int: ...
def set_num_threads(num_threads: SupportsIndex | None) -> None: ...
def openmp_enabled() -> bool: ...
def build_info() -> _BuildInfo: ...

# Private, for fastbn.layer, fastbn.moments and the tests.
def _train_forward(
    x: _Float,
    weight: _Float | None = None,
    bias: _Float | None = None,
    eps: _Real = 1e-5,
    *,
    axis: SupportsIndex = 1,
    out: _Float | None = None,
    statistics_as_x: bool = False,
) -> tuple[_Float, _F64, _F64] | tuple[_Float, _Float, _Float]: ...
def _moments(x: _Float, *, axis: SupportsIndex = 1) -> tuple[int, _F64, _F64]: ...
def _may_share_memory(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool: ...
def _check_statistics(
    mean: np.ndarray[Any, Any], var: np.ndarray[Any, Any], channels: SupportsIndex
) -> int: ...
def _mean_invstd(mean: _F64, var: _F64, eps: float, dtype: Any) -> tuple[_Float, _Float]: ...
def _update_running(
    running_mean: np.ndarray[Any, Any],
    running_var: np.ndarray[Any, Any],
    mean: _F64,
    var: _F64,
    factor: float,
    count: float,
) -> None: ...
def _copy(out: np.ndarray[Any, Any], x: np.ndarray[Any, Any]) -> None: ...
def _check_out_layout(x: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None: ...

_COPY_PARALLEL_MIN_ELEMENTS: int
def _contiguous_runs(
    outer: int, channels: int, inner: int, channel: int, begin: int, end: int
) -> list[tuple[int, int]]: ...
def _split(n: int, nparts: int) -> list[tuple[int, int]]: ...

_PARALLEL_MIN_ELEMENTS: dict[str, tuple[int, int]]
def _threads_for(elements: int, kernel_pass: str) -> int: ...
