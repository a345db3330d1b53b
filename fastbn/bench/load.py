"""Background load: how many cores other processes keep busy (from /proc/stat).

:class:`OtherLoad` measures it during a measurement, :func:`wait_for_idle` waits for it to
drop (``--wait-idle``); :data:`BUSY_CORES` is the load that makes a measurement suspect.
"""

import os
import time

#: Other processes using more cores than this during a measurement make its numbers suspect.
BUSY_CORES = 0.25

try:
    _TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):  # no sysconf: Windows
    _TICKS_PER_SECOND = 100


def _busy_seconds():
    """CPU seconds the whole machine has been busy since boot (all cores), or None.

    From /proc/stat: everything but idle and iowait, so time the hypervisor stole for other
    machines counts as busy too. None where there is no /proc/stat.
    """
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 8:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS_PER_SECOND


class OtherLoad:
    """Context manager: how many cores other processes kept busy while it was open.

    The machine's busy time minus this process's own CPU time, over the wall time: while a
    measurement runs, its own threads are not counted. ``cores`` stays None without
    /proc/stat, or when open for less than 0.2 s.

    Why it matters: every thread of an OpenMP team must run to pass a barrier, so with the
    cores oversubscribed a multi-threaded call can wait a scheduler time slice per parallel
    region; medians do not remove load that lasts a whole measurement.
    """

    cores = None

    def __enter__(self):
        self._start = (_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc_info):
        busy_start, own_start, wall_start = self._start
        busy, own, wall = _busy_seconds(), time.process_time(), time.perf_counter()
        # /proc/stat counts in ticks of 10 ms: shorter spans say too little.
        if busy is not None and busy_start is not None and wall - wall_start >= 0.2:
            others = (busy - busy_start) - (own - own_start)
            self.cores = max(others, 0.0) / (wall - wall_start)
        return False


def background_load(seconds):
    """Cores other processes keep busy, measured while this one sleeps ``seconds``; or None."""
    with OtherLoad() as load:
        time.sleep(seconds)
    return load.cores


def wait_for_idle(max_wait_s, probe_s=0.25):
    """Sleeps until other processes leave the cores idle or for ``max_wait_s``; returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        load = background_load(probe_s)
        if load is None or load < BUSY_CORES:
            break
    return time.perf_counter() - started
