"""Builds the C++ extension async_ckpt._native (csrc/) and, where nvcc is found, the optional
CUDA checksum module async_ckpt._cuda_crc (csrc/cuda/); all metadata is in pyproject.toml.

Only PyPI packages are needed (pybind11, setuptools): no system -dev packages, and zstd is
dlopen'ed at run time. Sources compile in parallel (ASYNC_CKPT_BUILD_JOBS, default: all
cores); set ASYNC_CKPT_DEBUG=1 for -O0 -g.

The CUDA module is a plain shared library with a C ABI (no Python, no torch), loaded by the
core with dlopen; the package works without it. ASYNC_CKPT_CUDA=0 skips it, =1 makes a
failed build an error (default "auto": build when nvcc is found, warn when it fails).
ASYNC_CKPT_CUDA_ARCHS lists the SM versions to compile for (default "80;90", plus PTX of the
newest so later GPUs can JIT it). nvcc is looked for in $CUDA_HOME/bin, then on PATH.
"""

import os
import shutil
import subprocess
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import Extension, setup
from setuptools.errors import CompileError

ParallelCompile("ASYNC_CKPT_BUILD_JOBS", default=0).install()

debug = os.environ.get("ASYNC_CKPT_DEBUG") == "1"
flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
flags += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"]

native = Pybind11Extension(
    "async_ckpt._native",
    sorted(glob("csrc/*.cc")) + ["csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=flags,
    extra_link_args=["-pthread"],
    libraries=["dl"],
    depends=sorted(glob("csrc/*.h")),
)

CUDA_MODULE = "async_ckpt._cuda_crc"


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


class BuildExt(build_ext):
    """pybind11's build_ext, plus nvcc for the optional CUDA module."""

    def build_extension(self, ext):
        if ext.name != CUDA_MODULE:
            return super().build_extension(ext)
        nvcc = find_nvcc()
        if nvcc is None:
            raise CompileError("nvcc not found (set CUDA_HOME); the CUDA checksum module is optional")
        archs = [a.strip() for a in os.environ.get("ASYNC_CKPT_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
               *gencode, "-o", out, *ext.sources]
        print(" ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CompileError(f"nvcc failed ({result.returncode}):\n{result.stdout}{result.stderr}")


cuda_mode = os.environ.get("ASYNC_CKPT_CUDA", "auto").lower()
ext_modules = [native]
if cuda_mode not in ("0", "off", "no") and (cuda_mode in ("1", "on", "yes") or find_nvcc()):
    # optional=True: setuptools warns and goes on when this one fails (auto mode).
    ext_modules.append(Extension(CUDA_MODULE, ["csrc/cuda/crc32c_device.cu"],
                                 depends=["csrc/crc32c_math.h", "csrc/cuda/crc32c_device.h"],
                                 optional=cuda_mode not in ("1", "on", "yes")))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
