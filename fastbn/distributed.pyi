"""Types of fastbn/distributed.py."""

from collections.abc import Iterable
from typing import Any, Protocol, SupportsIndex

import numpy as np
from numpy.typing import DTypeLike, NDArray
from typing_extensions import Self

from fastbn.layer import BatchNorm

__all__ = ["SyncBatchNorm"]

_Float = NDArray[np.floating[Any]]
_Real = float | np.floating[Any]
_Flag = bool | np.bool_

class _Communicator(Protocol):
    """What SyncBatchNorm uses of an mpi4py communicator (``mpi4py.MPI.Comm``)."""

    def Get_size(self) -> int: ...
    def Allgather(self, sendbuf: Any, recvbuf: Any, /) -> Any: ...

class SyncBatchNorm(BatchNorm):
    comm: _Communicator | None
    def __init__(
        self,
        num_features: SupportsIndex,
        *,
        comm: _Communicator | None = None,
        eps: _Real = 1e-5,
        momentum: _Real | None = 0.1,
        affine: _Flag = True,
        track_running_stats: _Flag = True,
        axis: SupportsIndex = 1,
        dtype: DTypeLike = ...,
        debias: _Flag = False,
    ) -> None: ...
    def backward(self, grad_out: _Float, out: _Float | None = None) -> _Float: ...
    def recalibrate(self, batches: Iterable[_Float] | Any) -> Self: ...
    def __getstate__(self) -> dict[str, Any]: ...
