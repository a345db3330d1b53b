"""Types of fastbn/dask.py."""

from typing import Any, SupportsIndex

from fastbn.moments import Moments

__all__ = ["moments"]

# A dask.array.Array; Any, as Dask is optional.
def moments(
    array: Any, *, axis: SupportsIndex = 1, split_every: int | None = None
) -> Moments: ...
