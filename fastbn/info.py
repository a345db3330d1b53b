"""What this fastbn is and how it runs here: versions, OpenMP and threads, SIMD, build flags.

Run ``python -m fastbn info`` (``--json`` for a machine-readable copy), and paste its
output into a bug report. The thread count is the one the kernels use for large inputs:
:func:`fastbn.set_num_threads`'s value if one was given, else OpenMP's default
(``OMP_NUM_THREADS``, or the number of cores).
"""

import json
import os
import platform
import sys

import numpy as np

import fastbn


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count()


def _threadpoolctl_status():
    try:
        import threadpoolctl  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return "not installed"
    controlled = any(
        entry["internal_api"] == "fastbn" for entry in threadpoolctl.threadpool_info()
    )
    version = getattr(threadpoolctl, "__version__", "?")
    return f"{version}, {'controls' if controlled else 'does not see'} fastbn's threads"


def collect():
    """The facts :func:`run` prints, as a dict of JSON-ready values."""
    build = fastbn.build_info()
    return {
        "fastbn": fastbn.__version__,
        "numpy": np.__version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
                  f"{sys.platform} {platform.machine()})",
        "openmp": build["openmp"],
        "threads": fastbn.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cores": _usable_cores(),
        "threadpoolctl": _threadpoolctl_status(),
        "simd": build["simd"],
        "build_flags": build["flags"],
        "location": os.path.dirname(os.path.abspath(fastbn.__file__)),
    }


def format_text(info):
    openmp = "on" if info["openmp"] else "off (serial kernels)"
    threads = str(info["threads"])
    if info["openmp"]:
        omp_env = info["OMP_NUM_THREADS"]
        source = f"OMP_NUM_THREADS={omp_env}" if omp_env is not None else "unset OMP_NUM_THREADS"
        threads += f" ({info['cores']} usable cores, {source})"
    rows = [
        ("fastbn", info["fastbn"]),
        ("numpy", info["numpy"]),
        ("python", info["python"]),
        ("openmp", openmp),
        ("threads", threads),
        ("threadpoolctl", info["threadpoolctl"]),
        ("simd", info["simd"]),
        ("build flags", info["build_flags"]),
        ("location", info["location"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def run(args):
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
