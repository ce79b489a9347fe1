"""Static checks of the CUDA kernels, no GPU needed: what the compiler made of each kernel in the built extension
(cuobjdump reads its cubins), and that every kernel in csrc declares __launch_bounds__.

A register spill or a per-thread array indexed at run time puts data in local memory (a stack frame, STL/LDL in
SASS), many times slower than registers. The kernels are written to need none; a kernel that must is listed in
LOCAL_MEMORY_EXCEPTIONS with the reason, and the test names any other."""
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine import _library

ROOT = Path(__file__).resolve().parents[1]

# kernel base name -> why it may use local memory (none today: risk_rows_kernel's 528-byte stack frame, from the
# per-thread coefficient and weight arrays of its thread-0 step, was moved to shared memory)
LOCAL_MEMORY_EXCEPTIONS: dict = {}

# Every kernel family the extension must contain (a build that silently dropped one would pass vacuously).
EXPECTED_KERNELS = {"row_pass_kernel", "sum_sq_diff_kernel", "scaled_diff_kernel", "risk_rows_kernel",
                    "masked_adamw_kernel", "masked_sgd_kernel", "histogram_kernel", "count_ties_kernel",
                    "write_mask_kernel"}


def find_cuobjdump():
    """$UE_CUOBJDUMP, else cuobjdump on PATH or in $CUDA_HOME/bin, else the copy the triton wheel ships."""
    candidates = [os.environ.get("UE_CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def kernel_base_name(mangled: str) -> str:
    """The kernel's own name from its mangled symbol: the last <length><identifier> of the (nested) name, before
    the template arguments. '_ZN14unlearn_engine44_GLOBAL__N__..._cu_9e137ef915row_pass_kernelIfEEv...' ->
    'row_pass_kernel'; '_Z3fooPf' -> 'foo'."""
    pos, name = (3 if mangled.startswith("_ZN") else 2), mangled
    while pos < len(mangled) and mangled[pos].isdigit():
        digits = re.match(r"\d+", mangled[pos:]).group(0)
        start = pos + len(digits)
        name = mangled[start:start + int(digits)]
        pos = start + int(digits)
    return name


def parse_resource_usage(text: str) -> list:
    """cuobjdump -res-usage output -> [{arch, kernel, mangled, REG, STACK, SHARED, LOCAL}] (one per kernel and arch)."""
    rows, arch, function = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function and line.startswith("REG:"):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(dict(arch=arch, mangled=function, kernel=kernel_base_name(function),
                             **{k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}))
            function = None
    return rows


def sass_local_memory_kernels(text: str) -> set:
    """Kernels whose SASS (cuobjdump -sass) holds local loads or stores: STL / LDL are spills or stack arrays."""
    found, function = set(), None
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            function = match.group(1)
        elif function and re.search(r"\b(STL|LDL)(\.\w+)*\b", line):
            found.add(function)
    return found


@pytest.fixture(scope="module")
def extension():
    if not ue.build_info()["cuda"]:
        pytest.skip("the extension was built without CUDA kernels (UE_BUILD_CUDA=0 or no nvcc): nothing to read")
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (PATH, $CUDA_HOME/bin, or the triton wheel's backends/nvidia/bin)")
    return tool, _library._C.__file__


def test_parsers_on_a_known_listing():
    """The parsers themselves, on text in cuobjdump's format: a spill must be seen, or the checks prove nothing."""
    listing = """
arch = sm_90
 Function _ZN14unlearn_engine56_GLOBAL__N__11947177_18_risk_projection_cu_4ea784e0_899016risk_rows_kernelIfLi64EEEvPKT_:
  REG:94 STACK:528 SHARED:2340 LOCAL:0 CONSTANT[0]:424 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN14unlearn_engine44_GLOBAL__N__47484c5a_11_row_pass_cu_9e137ef915row_pass_kernelIfEEvPT_:
  REG:32 STACK:0 SHARED:1420 LOCAL:0 CONSTANT[0]:432 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = parse_resource_usage(listing)
    assert [(r["arch"], r["kernel"], r["REG"], r["STACK"]) for r in rows] == [
        ("sm_90", "risk_rows_kernel", 94, 528), ("sm_90", "row_pass_kernel", 32, 0)]
    sass = """
        Function : _Z3fooPf
        /*0040*/                   STL [R1], R2 ;
        Function : _Z3barPf
        /*0040*/                   STG.E [R2.64], R5 ;
"""
    assert sass_local_memory_kernels(sass) == {"_Z3fooPf"} and kernel_base_name("_Z3fooPf") == "foo"


def test_no_spills_or_local_memory(extension):
    """Every kernel, every architecture: no stack frame, no local memory, no STL/LDL in its SASS."""
    tool, so = extension
    usage = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True, timeout=120).stdout
    rows = parse_resource_usage(usage)
    assert {r["kernel"] for r in rows} >= EXPECTED_KERNELS, sorted({r["kernel"] for r in rows})
    assert {"sm_80", "sm_90"} & {r["arch"] for r in rows} or rows, "no machine code for any architecture"
    offenders = [f"{r['arch']} {r['kernel']} ({r['mangled'][:90]}...): STACK={r['STACK']} LOCAL={r['LOCAL']}"
                 for r in rows if (r["STACK"] or r["LOCAL"]) and r["kernel"] not in LOCAL_MEMORY_EXCEPTIONS]
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True, timeout=300).stdout
    spilling = {kernel_base_name(m) for m in sass_local_memory_kernels(sass)} - set(LOCAL_MEMORY_EXCEPTIONS)
    assert not offenders and not spilling, "local memory (spills or run-time-indexed arrays):\n" + "\n".join(
        offenders + sorted(f"SASS STL/LDL in {k}" for k in spilling))
    # the figures a reviewer asks for, printed with -s: registers and shared memory per kernel and arch
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["REG"])):
        print(f"{r['arch']:6} {r['kernel']:22} REG {r['REG']:3} STACK {r['STACK']} SHARED {r['SHARED']:5} "
              f"LOCAL {r['LOCAL']}")


def test_ptx_embedded_for_newer_gpus(extension):
    """The default arch list (no GPU at build time, as in CI) ends with 9.0+PTX: the extension carries compute_90
    PTX, which the driver compiles for GPUs newer than the machine code (sm_100, sm_120)."""
    tool, so = extension
    arch_list = ue.build_info()["cuda_arch_list"]
    if arch_list != "8.0;9.0+PTX":
        pytest.skip(f"built for TORCH_CUDA_ARCH_LIST={arch_list!r}, not the default list")
    listing = subprocess.run([tool, "-lptx", so], capture_output=True, text=True, timeout=120)
    assert "sm_90" in listing.stdout or "compute_90" in listing.stdout, listing.stdout + listing.stderr


def test_default_arch_list_has_ptx():
    with open(ROOT / "setup.py") as f:
        assert 'DEFAULT_ARCH_LIST = "8.0;9.0+PTX"' in f.read()


def _kernel_declarations():
    """Each __global__ declaration in csrc, from the keyword to the opening parenthesis of its parameters (not the
    simulator's own self-test kernels in csrc/common/sim/, which are broken on purpose and never built by nvcc)."""
    found = []
    for path in sorted(ROOT.glob("csrc/**/*")):
        if path.suffix not in (".cu", ".cuh", ".h", ".hpp", ".cpp") or "sim" in path.relative_to(ROOT / "csrc").parts:
            continue
        text = re.sub(r"//[^\n]*", "", path.read_text())  # comments may mention __global__
        for match in re.finditer(r"__global__\b(.*?)\(", text, re.DOTALL):
            head = match.group(0)
            if "__launch_bounds__" in head:  # __launch_bounds__(...) opens a parenthesis before the name
                end = text.index("(", text.index(")", match.end()) + 1)
                head = text[match.start():end]
            found.append((path.relative_to(ROOT), head))
    return found


def test_every_kernel_has_launch_bounds():
    """CONTRIBUTING: every CUDA kernel gets __launch_bounds__ (the compiler then budgets registers for the block
    size it is launched with, and a launch with more threads fails loudly)."""
    declarations = _kernel_declarations()
    assert len(declarations) >= 9, declarations  # the scan found the kernels
    missing = [f"{path}: {' '.join(head.split())}" for path, head in declarations if "__launch_bounds__" not in head]
    assert not missing, "kernels without __launch_bounds__:\n" + "\n".join(missing)


def test_cuda_build_is_expected_here():
    """Guard against the resource checks skipping silently in CI: with UE_BUILD_CUDA=1 the extension has kernels."""
    if os.environ.get("UE_BUILD_CUDA") == "1":
        assert ue.build_info()["cuda"] and torch.version.cuda
