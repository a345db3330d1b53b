"""threadpoolctl controls fastbn's threads (fastbn/_threadpoolctl.py).

threadpool_info() lists fastbn; inside threadpool_limits(n) fastbn's kernels use n threads,
even after fastbn.set_num_threads(); on exit the setting is what it was: a count given to
set_num_threads, or following OpenMP's default. Skipped without threadpoolctl (a test
extra, not a dependency); without it fastbn imports and runs as before.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import fastbn

threadpoolctl = pytest.importorskip("threadpoolctl")

pytestmark = pytest.mark.usefixtures("restore_threads")

needs_openmp = pytest.mark.skipif(not fastbn.openmp_enabled(), reason="built without OpenMP")
# A Windows DLL exports only what it declares, and the extension declares only its module
# init function: threadpoolctl cannot call fbn_get/set_num_threads there, so it limits
# fastbn only through OpenMP's default (tests/test_threads.py).
needs_controller = pytest.mark.skipif(
    sys.platform == "win32", reason="fastbn's controller needs exported C symbols (not on Windows)"
)


def fastbn_entry():
    entries = [e for e in threadpoolctl.threadpool_info() if e["internal_api"] == "fastbn"]
    assert len(entries) == 1, entries
    return entries[0]


def limit_openmp_runtimes_only(num_threads):
    """A limit on the OpenMP runtimes alone (by file path), not on fastbn's own setting."""
    runtimes = [e["filepath"] for e in threadpoolctl.threadpool_info()
                if e["internal_api"] == "openmp"]
    assert runtimes, "no OpenMP runtime found by threadpoolctl"
    return threadpoolctl.threadpool_limits(limits={path: num_threads for path in runtimes})


def run_python(code, cwd):
    # Outside the source tree: `python -c` puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False,
                            capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_controller
def test_threadpool_info_lists_fastbn():
    entry = fastbn_entry()
    assert entry["user_api"] == "openmp"
    assert entry["prefix"] == "_core"
    assert entry["version"] == fastbn.__version__
    assert os.path.realpath(entry["filepath"]) == os.path.realpath(fastbn._core.__file__)
    assert entry["num_threads"] == fastbn.get_num_threads()


@needs_controller
@needs_openmp
@pytest.mark.parametrize("explicit", [None, 1, 2, 3], ids=lambda n: f"set_num_threads({n})")
def test_limits_override_the_setting_and_restore_it(explicit):
    fastbn.set_num_threads(explicit)
    before = fastbn.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1):
        assert fastbn.get_num_threads() == 1
        assert fastbn_entry()["num_threads"] == 1
        with threadpoolctl.threadpool_limits(limits=2):
            assert fastbn.get_num_threads() == 2
        assert fastbn.get_num_threads() == 1
    assert fastbn.get_num_threads() == before


@needs_controller
@needs_openmp
def test_limits_by_user_api():
    fastbn.set_num_threads(3)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert fastbn.get_num_threads() == 3
    assert fastbn.get_num_threads() == 3


@needs_controller
@needs_openmp
def test_default_setting_comes_back_as_following_openmp():
    """A limit ends with fastbn following OpenMP again, not pinned to the count it had."""
    fastbn.set_num_threads(None)
    with threadpoolctl.threadpool_limits(limits=1):
        pass
    with limit_openmp_runtimes_only(1):
        assert fastbn.get_num_threads() == 1


@needs_controller
@needs_openmp
def test_explicit_setting_comes_back_as_explicit():
    fastbn.set_num_threads(3)
    with threadpoolctl.threadpool_limits(limits=1):
        pass
    with limit_openmp_runtimes_only(1):
        assert fastbn.get_num_threads() == 3


@needs_controller
@needs_openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_kernels_run_on_one_thread_under_the_limit(tmp_path):
    """Counted, not assumed: a parallel kernel starts OpenMP's worker thread, and under
    threadpool_limits(1) none is started although set_num_threads(2) was called. In a new
    process, where OpenMP has started no thread yet."""
    output = run_python(
        """
        import os
        import numpy as np
        import fastbn
        from threadpoolctl import threadpool_limits

        def threads():
            return len(os.listdir("/proc/self/task"))

        x = np.ones((64, 64, 16, 16), np.float32)  # 1M values: several threads' worth
        fastbn.set_num_threads(2)
        start = threads()
        with threadpool_limits(limits=1):
            fastbn.batch_norm_train(x)
            fastbn.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32))
            inside = threads()
        fastbn.batch_norm_train(x)
        print(start, inside, threads(), fastbn.get_num_threads())
        """,
        cwd=tmp_path,
    )
    start, inside, after, setting = map(int, output.split())
    assert inside == start, "a kernel started threads under threadpool_limits(1)"
    assert after > start, "the check is blind: the parallel kernel started no thread"
    assert setting == 2


def test_fastbn_works_without_threadpoolctl(tmp_path):
    output = run_python(
        """
        import sys
        sys.modules["threadpoolctl"] = None  # as if not installed
        import numpy as np
        import fastbn
        assert "fastbn._threadpoolctl" not in sys.modules
        y, mean, invstd = fastbn.batch_norm_train(np.ones((4, 3)))
        print(fastbn.get_num_threads() >= 1)
        """,
        cwd=tmp_path,
    )
    assert output.strip() == "True"
