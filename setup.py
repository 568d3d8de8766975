"""Builds the C++ extension async_ckpt._native (csrc/); all metadata is in pyproject.toml.

Only PyPI packages are needed (pybind11, setuptools): no system -dev packages, and zstd is
dlopen'ed at run time. Sources compile in parallel (ASYNC_CKPT_BUILD_JOBS, default: all
cores); set ASYNC_CKPT_DEBUG=1 for -O0 -g.
"""

import os
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("ASYNC_CKPT_BUILD_JOBS", default=0).install()

debug = os.environ.get("ASYNC_CKPT_DEBUG") == "1"
flags = ["-O0", "-g"] if debug else ["-O3", "-g0"]
flags += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"]

ext = Pybind11Extension(
    "async_ckpt._native",
    sorted(glob("csrc/*.cc")) + ["csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=flags,
    extra_link_args=["-pthread"],
    libraries=["dl"],
    depends=sorted(glob("csrc/*.h")),
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
