"""Smoke tests of ``python -m fastbn bench`` and of the NumPy twins it times fastbn against."""

import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn import bench
from fastbn._core import _copy as copy


def run_cli(*args, cwd):
    # Outside the source tree: `python -m` puts the working directory first on sys.path.
    return subprocess.run(
        [sys.executable, "-m", "fastbn", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def test_quick_bench_prints_a_table(tmp_path):
    result = run_cli("bench", "--quick", "--no-torch", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"fastbn {fastbn.__version__}")
    assert "numpy" in lines[0] and "torch not run" in lines[0]
    header = next(line for line in lines if line.startswith("case"))
    for column in ("fastbn µs", "out= µs", "numpy µs", "copy µs", "out=/copy", "numpy/fastbn"):
        assert column in header
    assert "torch µs" not in header
    rows = [line.split() for line in lines if line.startswith(("1x512", "64x256", "4x"))]
    for case in bench.QUICK_CASES:
        for op in case.ops:
            title = bench.OP_TITLES[op]
            assert any(row[0] == case.name and title in " ".join(row) for row in rows), (case, op)
    assert "Median time per call" in result.stdout


def test_quick_bench_markdown(capsys):
    assert bench.main(["--quick", "--no-torch", "--quiet", "--markdown",
                       "--shapes", "64x256,4x14x14x32-nhwc", "--ops", "eval", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("**fastbn") and lines[0].endswith("**")
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| case |") and table[1].startswith("| --- |")
    assert any("| 64x256 | NC | float32 | eval forward" in line for line in table)
    assert any("| 4x14x14x32-nhwc | NHWC | float32 | eval forward" in line for line in table)
    assert not any("train forward" in line for line in table)


@pytest.mark.skipif(not fastbn.openmp_enabled(), reason="a build without OpenMP has 1 thread")
def test_thread_scaling_table_has_the_copy_beside_fastbn(capsys):
    assert bench.main(["--quick", "--no-torch", "--quiet", "--markdown", "--threads", "2",
                       "--shapes", "64x256", "--ops", "eval", "--repeat", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("Thread scaling:") + 2:]
    assert table[0].split(" | ")[-2:] == ["speedup 1→2", "copy speedup 1→2 |"]
    row = table[2].strip("| ").split(" | ")
    assert row[:4] == ["64x256", "NC", "float32", "eval forward"]
    assert all(cell.endswith("×") and float(cell[:-1]) > 0 for cell in row[-2:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
def test_the_split_copy_copies(dtype, size):
    """The copy floor, split over fastbn's threads from 64K values on."""
    x = np.random.default_rng(0).standard_normal(size).astype(dtype)
    out = np.full_like(x, np.nan)
    copy(out, x)
    np.testing.assert_array_equal(out, x)


def test_the_copy_floor_is_split_where_the_kernels_split_their_work():
    """Below the kernels' parallel threshold the floor is numpy.copyto alone: a copy with less
    call overhead than any kernel call would measure the call, not the memory."""
    for shape, split in [((1, 512), False), ((256, 1024), True)]:
        case = bench.Case(shape)
        names = bench.contenders(case, "eval", bench.Inputs.make(case), threads=2)
        assert ("split-copy" in names) == split, shape
        assert "split-copy" not in bench.contenders(case, "eval", bench.Inputs.make(case), 1)


def test_the_split_copy_refuses_what_it_cannot_copy():
    x = np.zeros(10, np.float32)
    for out, source in [(np.zeros(9, np.float32), x), (np.zeros(10, np.float64), x),
                        (np.zeros(20, np.float32)[::2], x), (x, x)]:
        with pytest.raises(ValueError, match="_copy takes"):
            copy(out, source)
    read_only = np.zeros(10, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="_copy takes"):
        copy(read_only, x)


def test_bench_leaves_thread_count_alone():
    before = fastbn.get_num_threads()
    bench.run([bench.Case((32, 8))], ops=("eval",), threads=[1], use_torch=False, rounds=1,
              quick=True)
    assert fastbn.get_num_threads() == before


def test_importing_bench_does_not_import_torch(tmp_path):
    code = "import sys, fastbn.bench; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("spec", ["x64", "32", "32x0", "32x64-nchw", "a x b"])
def test_bad_shape_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="bad"):
        bench.parse_case(spec)


def test_bad_shape_on_the_command_line(tmp_path):
    result = run_cli("bench", "--shapes", "32x64,32x", "--no-torch", cwd=tmp_path)
    assert result.returncode != 0
    assert "bad shape '32x'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--threads", "0", "thread count must be >= 1, got 0"),
    ("--threads", "2,x", "invalid thread count 'x'"),
    ("--repeat", "0", "round count must be >= 1, got 0"),
    ("--budget", "0", "budget must be > 0, got 0"),
    ("--budget", "nan", "budget must be > 0, got nan"),
    ("--wait-idle", "-1", "wait must be >= 0, got -1"),
])
def test_bad_numbers_are_refused_before_anything_runs(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--no-torch", "--quiet", option, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}: {message}" in error and "Traceback" not in error


def test_case_names_parse_back():
    assert bench.parse_case("32x64") == bench.Case((32, 64))
    for case in bench.DEFAULT_CASES + bench.QUICK_CASES:
        assert bench.parse_case(case.name) == case
    assert bench.select_cases(["nhwc"]) == [bench.Case((32, 56, 56, 64), channels_last=True)]
    forced = bench.select_cases(["256x1024", "256x1024-f64"], ["float64"])
    assert forced == [bench.Case((256, 1024), "float64")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", [bench.Case((16, 6)), bench.Case((3, 4, 5, 6)),
                                  bench.Case((3, 5, 6, 4), channels_last=True)],
                         ids=lambda case: case.name)
def test_numpy_twins_compute_what_fastbn_does(case, dtype):
    case = bench.Case(case.shape, dtype, case.channels_last)
    inputs = bench.Inputs.make(case)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    got = fastbn.batch_norm_train(inputs.x, inputs.weight, inputs.bias, bench.EPS, axis=case.axis)
    want = bench.numpy_train(inputs.x, inputs.weight, inputs.bias, bench.EPS, case.axis)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **tolerance)
    got = fastbn.batch_norm_backward(inputs.grad_out, inputs.x, inputs.mean, inputs.invstd,
                                     inputs.weight, axis=case.axis)
    want = bench.numpy_backward(inputs.grad_out, inputs.x, inputs.mean, inputs.invstd,
                                inputs.weight, case.axis)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **tolerance)
    got = fastbn.batch_norm(inputs.x, inputs.running_mean, inputs.running_var, inputs.weight,
                            inputs.bias, axis=case.axis)
    want = bench.numpy_eval(inputs.x, inputs.running_mean, inputs.running_var, inputs.weight,
                            inputs.bias, bench.EPS, case.axis)
    np.testing.assert_allclose(got, want, **tolerance)
