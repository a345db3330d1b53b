"""``python -m fastbn info``: versions, OpenMP and threads, SIMD level, build flags."""

import json
import os
import subprocess
import sys

import numpy as np

import fastbn


def run_cli(*args, cwd, env=None):
    # Outside the source tree: `python -m` puts the working directory first on sys.path.
    return subprocess.run(
        [sys.executable, "-m", "fastbn", *args], check=False,
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
    )


def fields(text):
    """The "name  value" lines of the text output as a dict."""
    rows = (line.split("  ", 1) for line in text.splitlines())
    return {name.strip(): value.strip() for name, value in rows}


def test_info_prints_versions_threads_simd_and_flags(tmp_path):
    result = run_cli("info", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = fields(result.stdout)
    build = fastbn.build_info()
    assert info["fastbn"] == fastbn.__version__
    assert info["numpy"] == np.__version__
    assert info["openmp"] == ("on" if build["openmp"] else "off (serial kernels)")
    assert info["threads"].split()[0] == str(fastbn.get_num_threads())
    assert info["simd"] == build["simd"]
    assert info["build flags"] == build["flags"]
    assert os.path.samefile(info["location"], os.path.dirname(fastbn.__file__))


def test_info_json_follows_omp_num_threads(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_cli("info", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["fastbn"] == fastbn.__version__
    assert info["numpy"] == np.__version__
    assert info["openmp"] is fastbn.openmp_enabled()
    assert info["threads"] == 1
    assert info["OMP_NUM_THREADS"] == "1"
    assert info["simd"] == fastbn.build_info()["simd"]
    assert info["build_flags"] == fastbn.build_info()["flags"]


def test_info_is_listed_in_the_help(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout and "bench" in result.stdout and "demo" in result.stdout
