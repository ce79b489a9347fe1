"""`make gpu-check` without a GPU: it says so, runs the CPU-side checks and exits with their status, writing no
results. (The GPU steps themselves run only on a GPU machine: scripts/gpu_check.sh.)"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(selection):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, UE_GPU_CHECK_CPU_TESTS=selection)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_gpu_check_without_a_gpu():
    before = set((ROOT / "bench" / "results").glob("*"))
    proc = _gpu_check("tests/test_kernel_resources.py::test_default_arch_list_has_ptx")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu-check: no CUDA GPU here" in proc.stdout
    assert "1 passed" in proc.stdout and "CPU-side checks passed" in proc.stdout
    assert set((ROOT / "bench" / "results").glob("*")) == before  # nothing written without a GPU
