"""Types of fastbn/layer.py (tests/test_typing.py checks them against the module).

The layer's arrays are typed ``NDArray[np.floating[Any]]``: their dtype is the layer's
``dtype``, float32 or float64, chosen at run time.
"""

import os
from collections.abc import Iterable, Mapping
from typing import IO, Any, NamedTuple, Protocol, SupportsIndex, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from typing_extensions import Self

__all__ = ["BatchNorm", "fold"]

_Float = NDArray[np.floating[Any]]
_Real = float | np.floating[Any]
_Flag = bool | np.bool_
_File = str | os.PathLike[str] | IO[bytes]
_WeightT = TypeVar("_WeightT", bound=np.floating[Any])
_BiasT = TypeVar("_BiasT", bound=np.floating[Any])

class _DaskArray(Protocol):
    """A dask.array.Array, typed structurally: Dask is optional (fastbn/dask.pyi)."""
    @property
    def dtype(self) -> Any: ...
    @property
    def chunks(self) -> Any: ...
    def __dask_graph__(self) -> Any: ...

class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]

class BatchNorm:
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    axis: int
    dtype: np.dtype[np.float32] | np.dtype[np.float64]
    debias: bool
    weight: _Float | None
    bias: _Float | None
    running_mean: _Float | None
    running_var: _Float | None
    num_batches_tracked: NDArray[np.int64] | None
    training: bool
    grad_weight: _Float | None
    grad_bias: _Float | None
    def __init__(
        self,
        num_features: SupportsIndex,
        *,
        eps: _Real = 1e-5,
        momentum: _Real | None = 0.1,
        affine: _Flag = True,
        track_running_stats: _Flag = True,
        axis: SupportsIndex = 1,
        dtype: DTypeLike = ...,
        debias: _Flag = False,
    ) -> None: ...
    def train(self, mode: _Flag = True) -> Self: ...
    def eval(self) -> Self: ...
    def forward(self, x: _Float, out: _Float | None = None) -> _Float: ...
    def __call__(self, x: _Float, out: _Float | None = None) -> _Float: ...
    def backward(self, grad_out: _Float, out: _Float | None = None) -> _Float: ...
    def recalibrate(self, batches: Iterable[_Float] | _DaskArray) -> Self: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def state_dict(self) -> dict[str, NDArray[Any]]: ...
    def load_state_dict(
        self, state_dict: Mapping[str, ArrayLike], strict: bool = True
    ) -> IncompatibleKeys: ...
    def save(self, path: _File) -> None: ...
    @classmethod
    def load(cls, path: _File) -> Self: ...
    def __getstate__(self) -> dict[str, Any]: ...
    def __setstate__(self, state: dict[str, Any]) -> None: ...

@overload
def fold(
    weight: NDArray[_WeightT], bias: None, bn: BatchNorm
) -> tuple[NDArray[_WeightT], NDArray[_WeightT]]: ...
@overload
def fold(
    weight: NDArray[_WeightT], bias: NDArray[_BiasT], bn: BatchNorm
) -> tuple[NDArray[_WeightT], NDArray[_BiasT]]: ...
