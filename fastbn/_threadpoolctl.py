"""fastbn's thread setting under threadpoolctl's control.

threadpoolctl finds the thread pools of the shared libraries loaded in the process and
limits them (``threadpool_limits(1)``). OpenMP's own controller already limits the OpenMP
runtime fastbn links to, but that changes only OpenMP's default: a count given to
:func:`fastbn.set_num_threads` would still win. So fastbn registers a controller for its
extension module that sets fastbn's own count, through the ``fbn_get_num_threads`` and
``fbn_set_num_threads`` functions the extension exports (csrc/runtime.c).

The controller's user_api is "openmp" (fastbn's threads are OpenMP threads, and
``threadpool_limits(n, user_api="openmp")`` must cover them); its internal_api is "fastbn".

Imported by fastbn/__init__.py only when threadpoolctl is installed; it is no run-time
dependency of fastbn. On Windows the extension exports no C symbols, so threadpoolctl finds
no fastbn there and limits it only through OpenMP's default (vcomp).
"""

import ctypes

import threadpoolctl  # type: ignore[import-untyped, unused-ignore]

import fastbn

#: Symbols that tell fastbn's extension from another library whose file name starts with
#: "_core": threadpoolctl skips a library that has none of them.
_GET, _SET = "fbn_get_num_threads", "fbn_set_num_threads"


class OpenMPDefaultThreads(int):
    """A thread count fastbn takes from OpenMP's default: no set_num_threads in force.

    threadpoolctl remembers what :meth:`FastbnController.get_num_threads` returned and
    hands it back to :meth:`FastbnController.set_num_threads` when a limit ends. A plain int
    would then pin fastbn to that count for good; this one puts fastbn back to following
    OpenMP (``OMP_NUM_THREADS``, ``omp_set_num_threads``), as it was.
    """

    __slots__ = ()


class FastbnController(threadpoolctl.LibController):
    """threadpoolctl's controller of fastbn's thread count (fastbn.get/set_num_threads)."""

    user_api = "openmp"
    internal_api = "fastbn"
    filename_prefixes = ("_core",)
    check_symbols = (_GET, _SET)

    def get_version(self):
        return fastbn.__version__

    def _function(self, name, argtypes, restype):
        function = getattr(self.dynlib, name)
        function.argtypes, function.restype = argtypes, restype
        return function

    def get_num_threads(self):
        threads = self._function(_GET, [], ctypes.c_int)()
        return OpenMPDefaultThreads(threads) if self._follows_openmp(threads) else threads

    def set_num_threads(self, num_threads):
        # fbn_set_num_threads(0) returns to OpenMP's default.
        value = 0 if isinstance(num_threads, OpenMPDefaultThreads) else int(num_threads)
        self._function(_SET, [ctypes.c_int], None)(value)

    def _follows_openmp(self, threads):
        """Whether fastbn's count ``threads`` is OpenMP's default rather than a count given to
        set_num_threads. The C API does not say, so look: fastbn follows OpenMP if and only
        if its count moves with omp_set_num_threads. That setting is per thread in OpenMP,
        so changing it for a moment on this thread affects no other thread."""
        try:
            # The extension's handle also finds the symbols of the OpenMP runtime it links.
            omp_get = self._function("omp_get_max_threads", [], ctypes.c_int)
            omp_set = self._function("omp_set_num_threads", [ctypes.c_int], None)
        except AttributeError:  # a build without OpenMP
            return not fastbn.openmp_enabled()
        default = omp_get()
        if threads != default:
            return False
        omp_set(default + 1)
        try:
            return self._function(_GET, [], ctypes.c_int)() == default + 1
        finally:
            omp_set(default)


def register():
    """Register :class:`FastbnController` with threadpoolctl (3.0 or later; once)."""
    if hasattr(threadpoolctl, "register") and FastbnController not in getattr(
        threadpoolctl, "_ALL_CONTROLLERS", ()
    ):
        threadpoolctl.register(FastbnController)
