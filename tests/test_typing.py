"""Typing: fastbn ships stubs and py.typed, the stubs match the run-time API, and a typed
example (tests/typing/usage.py) passes ``mypy --strict``.

mypy is not a test dependency: the mypy tests skip without it. They check the fastbn this
suite imports. Installed in site-packages (``pip install .``), mypy finds it as a user's
mypy would, through py.typed; an editable install's import hook is invisible to mypy, so
the source tree is put on MYPYPATH then. Either way fastbn's own modules are followed
silently, as mypy treats installed packages: only the example's errors count.
"""

import importlib.util
import os
import re
import runpy
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastbn

TYPING_DIR = Path(__file__).parent / "typing"
USAGE = TYPING_DIR / "usage.py"
ALLOWLIST = TYPING_DIR / "stubtest-allowlist.txt"
PACKAGE_DIR = Path(fastbn.__file__).resolve().parent



def _stubbed_modules():
    """The modules typed by a .pyi stub beside them (fastbn._core, fastbn.layer, ...)."""
    modules = []
    for stub in sorted(PACKAGE_DIR.rglob("*.pyi")):
        parts = stub.relative_to(PACKAGE_DIR).with_suffix("").parts
        modules.append(".".join(("fastbn",) + parts[: -1 if parts[-1] == "__init__" else None]))
    return modules


#: Modules typed by a stub; the others are typed inline (or are not public API).
STUBBED_MODULES = _stubbed_modules()

needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed"
)


def _in_site_packages(directory):
    paths = site.getsitepackages() + [site.getusersitepackages()]
    paths += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return directory in {Path(p).resolve() for p in paths}


def _mypy_environment():
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    if not _in_site_packages(PACKAGE_DIR.parent):
        env["MYPYPATH"] = str(PACKAGE_DIR.parent)
    return env


@pytest.fixture(scope="module")
def mypy_workdir(tmp_path_factory):
    """A working directory with a mypy config (fastbn followed silently) and a shared cache."""
    workdir = tmp_path_factory.mktemp("mypy")
    (workdir / "mypy.ini").write_text("[mypy]\n\n[mypy-fastbn,fastbn.*]\nfollow_imports = silent\n")
    return workdir


def run_mypy(workdir, *args):
    return _run(workdir, "mypy", "--cache-dir", str(workdir / ".mypy_cache"), *args)


def _run(workdir, module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False, capture_output=True, text=True, timeout=300, cwd=workdir,
        env=_mypy_environment(),
    )


def test_stubs_and_marker_are_installed():
    assert (PACKAGE_DIR / "py.typed").is_file()
    for module in ("fastbn._core", "fastbn.layer", "fastbn.moments"):
        assert module in STUBBED_MODULES, f"{module} has no stub"


@pytest.mark.usefixtures("restore_threads")
def test_usage_example_runs():
    # The example's asserted types must be the run-time types too.
    namespace = runpy.run_path(str(USAGE), run_name="fastbn_typing_usage")
    assert namespace["main"]() == 0


@needs_mypy
def test_usage_example_passes_mypy_strict(mypy_workdir):
    result = run_mypy(mypy_workdir, "--strict", "--config-file", "mypy.ini", str(USAGE))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_mypy
def test_mypy_rejects_a_wrong_type(mypy_workdir):
    """The example's assert_type checks have teeth: a float64 result is not float32."""
    wrong = mypy_workdir / "wrong.py"
    wrong.write_text(
        "import numpy as np\n"
        "from numpy.typing import NDArray\n"
        "from typing_extensions import assert_type\n"
        "import fastbn\n"
        "x = np.ones((4, 3))\n"
        "y, mean, invstd = fastbn.batch_norm_train(x)\n"
        "assert_type(y, NDArray[np.float32])\n"
        "fastbn.batch_norm(x, None, None, axis='channels')\n"
    )
    result = run_mypy(mypy_workdir, "--strict", "--config-file", "mypy.ini", str(wrong))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "wrong.py:7: error" in result.stdout and "[assert-type]" in result.stdout
    assert "wrong.py:8: error" in result.stdout and "[call-overload]" in result.stdout


@needs_mypy
def test_every_public_name_is_typed(mypy_workdir):
    """Each name of fastbn.__all__ has a signature without untyped (Any) parameters."""
    probe = mypy_workdir / "public_names.py"
    probe.write_text(
        "import fastbn\n" + "".join(f"reveal_type(fastbn.{name})\n" for name in fastbn.__all__)
    )
    result = run_mypy(mypy_workdir, "--config-file", "mypy.ini", str(probe))
    revealed = re.findall(r"Revealed type is \"(.*)\"", result.stdout)
    assert len(revealed) == len(fastbn.__all__), result.stdout + result.stderr
    for name, signature in zip(fastbn.__all__, revealed, strict=True):
        # An unannotated function shows as "def (x: Any, ...) -> Any".
        assert not re.search(r"\w: Any\b|-> Any\b", signature), f"{name}: {signature}"


@needs_mypy
def test_stubs_match_the_runtime(mypy_workdir):
    """mypy's stubtest: every public name of the stubbed modules is in their stubs, with the
    run-time signature. A public function or method added to one of these modules without
    its stub fails here."""
    result = _run(mypy_workdir, "mypy.stubtest", "--allowlist", str(ALLOWLIST), *STUBBED_MODULES)
    assert result.returncode == 0, result.stdout + result.stderr
