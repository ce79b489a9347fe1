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
    for op in ("fused_logprob", "fused_linear_objective", "fused_group_objective", "rmu_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unlearn_engine::{op}", "CUDA"), op


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "unlearn_engine.api.cli", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert '"cuda"' in out and "fused_logprob" in out


def _run_setup_with_fake_torch(tmp_path, version):
    """setup.py under a stand-in torch package that only has __version__: the version gate runs first."""
    fake = tmp_path / f"fake-{version}"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=str(fake), PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)


def test_setup_refuses_torch_older_than_2_8(tmp_path):
    """A too-old torch gets one clear sentence at build time (not pages of C++ overload errors)."""
    for version in ("2.7.1+cu126", "2.4.0", "1.13.1"):
        proc = _run_setup_with_fake_torch(tmp_path, version)
        assert proc.returncode != 0, version
        assert "unlearn_engine needs torch>=2.8" in proc.stderr and version in proc.stderr, proc.stderr
    for version in ("2.8.0", "2.10.0+cu130", "2.9.0a0+git1234", "3.0.0"):  # 2.10 > 2.8: numbers, not strings
        proc = _run_setup_with_fake_torch(tmp_path, version)
        assert "needs torch>=" not in proc.stderr, (version, proc.stderr)
        assert "torch.utils" in proc.stderr  # it went past the gate (and stopped at the stand-in's missing parts)


def test_torch_minimum_is_stated_where_it_is_enforced():
    """pyproject's torch>= pin, setup.py's gate and the C++ #error name the same minimum."""
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert "torch>=2.8" in deps
    with open(os.path.join(root, "setup.py")) as f:
        assert "TORCH_MIN = (2, 8)" in f.read()
    with open(os.path.join(root, "csrc", "unlearning_loss", "fused_logprob.cpp")) as f:
        assert "TORCH_VERSION_MINOR < 8" in f.read()
