"""The extension reports how it was built, and CUDA kernels are there whenever they can be built."""
import os
import shutil
import subprocess
import sys

import torch

import unlearn_engine as ue


def test_build_info_fields():
    info = ue.build_info()
    assert set(info) >= {"version", "cuda", "cuda_version", "cuda_arch_list", "openmp"}
    assert info["version"] == ue.__version__
    assert info["openmp"] is True


def test_cuda_kernels_built_when_possible():
    """With a CUDA torch and nvcc, the build must include the CUDA kernels (unless UE_BUILD_CUDA=0 was asked)."""
    can_build = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if os.environ.get("UE_BUILD_CUDA") == "0" or not can_build:
        assert os.environ.get("UE_BUILD_CUDA") != "1", "CI asked for CUDA but this machine cannot build it"
        return
    info = ue.build_info()
    assert info["cuda"] is True, "torch has CUDA and nvcc exists, but unlearn_engine._C was built without CUDA"
    assert info["cuda_version"].startswith(torch.version.cuda.split(".")[0])
    for op in ("fused_logprob", "fused_linear_objective", "rmu_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unlearn_engine::{op}", "CUDA"), op


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "unlearn_engine.api.cli", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert '"cuda"' in out and "fused_logprob" in out
