"""Build fastbn's extensions: the C kernels in csrc/ plus the Cython bindings (_core), and
the layer's call (_layer_call).

Build switches (environment variables):

FASTBN_OPENMP=0
    Build without OpenMP (serial kernels). By default OpenMP is used when a
    test program compiles, links and runs with it; otherwise the build warns
    and falls back to serial kernels.
FASTBN_SANITIZE=address,undefined
    Build with the given GCC/Clang sanitizers (for CI's memory-safety run).
    Python itself is not instrumented, so preload the runtime and leave leak checking
    to the tests (CPython keeps memory until exit):
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python -m pytest
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int threads = 0;
        #pragma omp parallel reduction(+:threads)
        threads += 1;
        printf("%d", threads == omp_get_max_threads());
        return threads == omp_get_max_threads() ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler_type):
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang needs Homebrew's libomp (cibuildwheel installs it).
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _probe_openmp(compiler, compile_args, link_args):
    """Compile, link and run a small OpenMP program; True if all three work."""
    tmp = tempfile.mkdtemp()
    try:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        objects = compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
        exe = os.path.join(tmp, "probe")
        if compiler.compiler_type != "msvc":
            # distutils links extensions with $LDFLAGS but executables without: pass them
            # here too, or a libomp found through LDFLAGS=-L<prefix>/lib (macOS, Homebrew)
            # fails the probe and the build silently falls back to serial kernels.
            link_args = link_args + shlex.split(os.environ.get("LDFLAGS", ""))
        compiler.link_executable(objects, exe, extra_postargs=link_args)
        result = subprocess.run([exe], capture_output=True, timeout=60)
        return result.returncode == 0
    except Exception:  # any failure means "no usable OpenMP"
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Adds OpenMP (when it works) and optimisation flags per compiler."""

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            # Export the thread-count functions so threadpoolctl's controller
            # (fastbn/_threadpoolctl.py) finds them in the .pyd as it does in the .so.
            compile_args = ["/O2", "/fp:precise"]
            link_args = ["/EXPORT:fbn_get_num_threads", "/EXPORT:fbn_set_num_threads"]
        else:
            # -O3 without -march=native: the wheel runs on any x86-64; the hot loops
            # pick AVX2/AVX-512 clones at run time (csrc/common.h, FBN_DISPATCH).
            # -fopenmp-simd honours `#pragma omp simd` even in serial builds. A call to an
            # undeclared function is an error, not a symbol missing when Python imports.
            compile_args = ["-O3", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno",
                            "-Werror=implicit-function-declaration"]
            link_args = []

        sanitize = os.environ.get("FASTBN_SANITIZE", "").strip()
        if sanitize and ctype != "msvc":
            self.force = True  # objects left in build/ by a normal build must not be reused
            # Any report aborts the process, so a test run cannot pass over one.
            flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all",
                     "-fno-omit-frame-pointer", "-g"]
            compile_args = [a for a in compile_args if a != "-O3"] + ["-O1"] + flags
            link_args = link_args + flags

        use_openmp = os.environ.get("FASTBN_OPENMP", "1") != "0"
        if use_openmp:
            omp_compile, omp_link = _openmp_flags(ctype)
            if _probe_openmp(self.compiler, omp_compile, omp_link):
                compile_args += omp_compile
                link_args += omp_link
            else:
                use_openmp = False
                warnings.warn(
                    "fastbn: the compiler cannot build and run an OpenMP program; "
                    "building serial kernels (set FASTBN_OPENMP=0 to silence this)."
                )

        build_flags = f"compile: {' '.join(compile_args)}; link: {' '.join(link_args) or '-'}"
        for ext in self.extensions:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
            ext.define_macros.append(("FBN_BUILD_FLAGS", '"%s"' % build_flags.replace('"', "")))
        super().build_extensions()


extensions = [
    Extension(
        "fastbn._core",
        sources=["fastbn/_core.pyx"] + sorted(glob("csrc/*.c")),
        include_dirs=["csrc", numpy.get_include()],
        depends=glob("csrc/*.h") + glob("csrc/kernels/*.inc"),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
    ),
    # The layer's call: calls into _core through _core.pxd, links no kernels of its own.
    Extension(
        "fastbn._layer_call",
        sources=["fastbn/_layer_call.pyx"],
        include_dirs=[numpy.get_include()],
        depends=["fastbn/_core.pxd"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
