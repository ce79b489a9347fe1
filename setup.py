"""Builds unlearn_engine._C: CPU kernels always, CUDA kernels when a CUDA torch and nvcc exist.

UE_BUILD_CUDA=0 skips CUDA (fast local iteration), =1 requires it (CI), unset means "when possible".
"""
import glob
import os
import re
import shutil
import subprocess
import tomllib

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")  # kernels include the shared headers as "common/..."
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    VERSION = tomllib.load(_f)["project"]["version"]


def find_cuda_home():
    """Toolkit root: $CUDA_HOME, else ask nvcc (the nvcc on PATH may be a wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                         capture_output=True, text=True).stderr
    match = re.search(r"^#\$ TOP=(\S+)", out, re.MULTILINE)
    return os.path.realpath(match.group(1)) if match else None


def want_cuda():
    mode = os.environ.get("UE_BUILD_CUDA", "auto")
    if mode == "0":
        return None
    cuda_home = find_cuda_home() if torch.version.cuda else None
    if cuda_home is None and mode == "1":
        raise RuntimeError("UE_BUILD_CUDA=1 but no CUDA build of torch or no nvcc/CUDA_HOME was found")
    return cuda_home


def nvidia_wheel_includes():
    # torch's CUDA wheels ship the cuBLAS/cuSPARSE/... headers that ATen's CUDA headers include.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx = ["-O3", "-fopenmp", f'-DUE_VERSION="{VERSION}"']
    cuda_home = want_cuda()
    if cuda_home is None:
        return CppExtension("unlearn_engine._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_ext
    cpp_ext.CUDA_HOME = cuda_home  # read at import time; keep it in step with what we resolved
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    defines = ["-DWITH_CUDA", f'-DUE_CUDA_ARCH_LIST="{arch}"']
    nvcc = ["-O3", "-lineinfo"] + defines
    return CUDAExtension("unlearn_engine._C", sources + cuda_sources,
                         # the toolkit's own headers first; the wheel's fill in what it lacks (cuBLAS, ...)
                         include_dirs=[CSRC, os.path.join(cuda_home, "include")] + nvidia_wheel_includes(),
                         extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(
    # Metadata, dependencies, packages and the console script are in pyproject.toml; this file adds the extension.
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
