"""The C allocator's part in the timings: new arrays and the pages under them.

Every contender but the copy returns new arrays. With glibc's default settings a large
block is mapped from the OS when allocated and unmapped when freed (or trimmed off the
heap), and the OS zeroes each page on first touch: tens of microseconds per megabyte, more
than the computation itself on the large cases. Whether a call pays it depends on
glibc's adaptive thresholds, that is on every allocation the process made before: the same
call measured 0.23 ms or 1.05 ms on (256, 1024) depending on which other contenders ran
in the same rounds. :func:`keep_freed_memory` takes that lottery out of the comparison.
"""

import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory():
    """Ask the C allocator to keep freed memory for reuse, for the rest of the process.

    Large blocks then come from the heap (no mapping per block) and the heap is never
    trimmed, so a new array reuses pages already touched. Returns what was done, for the
    report, or None where the C library is not glibc (nothing is changed then).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        return None
    return "glibc's malloc kept freed memory (mallopt: no mmap, no trim)"
