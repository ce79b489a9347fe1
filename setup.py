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

# The fused loss accumulates bf16/fp16 GEMMs into fp32 with at::addmm_out(..., out_dtype), an overload torch added
# in 2.8 (pyproject.toml's torch>=2.8). Say so here, before a compiler prints a page of overload errors.
TORCH_MIN = (2, 8)


def torch_version_tuple(version: str) -> tuple:
    """(major, minor) of a torch version string: '2.10.0+cu130' -> (2, 10), '2.8.0a0+git1234' -> (2, 8)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


if torch_version_tuple(torch.__version__) < TORCH_MIN:
    raise SystemExit(f"unlearn_engine needs torch>={TORCH_MIN[0]}.{TORCH_MIN[1]} (at::addmm_out with out_dtype, "
                     f"used by csrc/unlearning_loss/fused_logprob.cpp); this environment has torch "
                     f"{torch.__version__}. Install a newer torch first, then build again.")

from setuptools import setup  # noqa: E402  (after the torch check: cpp_extension needs a supported torch)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")  # kernels include the shared headers as "common/..."
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    VERSION = tomllib.load(_f)["project"]["version"]


DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # when building without a GPU to ask (CI); with one, cpp_extension targets it


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


SIM_DIR = os.path.join("csrc", "common", "sim")  # the simulator build's own sources and stand-in headers


def cpp_sources():
    """The C++ sources of the real extension: every .cpp under csrc except the simulator's."""
    return sorted(p for p in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                  if not p.startswith(SIM_DIR + os.sep))


def extension():
    sources = cpp_sources()
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
        # A100 and H100 machine code, plus compute_90 PTX that the driver compiles for newer GPUs (sm_100, sm_120)
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    defines = ["-DWITH_CUDA", f'-DUE_CUDA_ARCH_LIST="{arch}"']
    nvcc = ["-O3", "-lineinfo"] + defines
    return CUDAExtension("unlearn_engine._C", sources + cuda_sources,
                         # the toolkit's own headers first; the wheel's fill in what it lacks (cuBLAS, ...)
                         include_dirs=[CSRC, os.path.join(cuda_home, "include")] + nvidia_wheel_includes(),
                         extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


def _blank_comments_and_strings(text):
    """The source with its comments and string/char literals blanked (same length, newlines kept)."""
    pattern = r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'"
    return re.sub(pattern, lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.DOTALL)


def _parenthesised(code, start):
    """The text between code[start] == '(' and its matching ')', and the index after that ')'."""
    depth = 0
    for i in range(start, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            return code[start + 1:i], i + 1
    raise ValueError("unbalanced parentheses")


def launch_bounds_in(path):
    """[(namespaces, kernel, bound expression or None, line)] of each `__global__ void [__launch_bounds__(EXPR[, ...])]
    NAME(` in a kernel source, namespaces being those that enclose it (anonymous ones as "")."""
    code = _blank_comments_and_strings(open(path).read())
    found, scopes = [], []  # scopes: a namespace's name, or None for any other brace
    for m in re.finditer(r"\bnamespace\s*([\w:]*)\s*\{|[{}]|\b__global__\b", code):
        token = m.group(0)
        if token.startswith("namespace"):
            scopes.append(m.group(1))
        elif token == "{":
            scopes.append(None)
        elif token == "}":
            scopes.pop()
        else:
            line = code.count("\n", 0, m.start()) + 1
            head = re.compile(r"__global__\s+void\s+(__launch_bounds__\s*\()?").match(code, m.start())
            if head is None:
                raise SystemExit(f"{path}:{line}: declare a kernel `__global__ void [__launch_bounds__(...)] NAME(`")
            bound, end = None, head.end()
            if head.group(1):
                args, end = _parenthesised(code, head.end() - 1)
                depth, cut = 0, len(args)  # the first argument (minBlocksPerMultiprocessor may follow a comma)
                for i, c in enumerate(args):
                    depth += {"(": 1, "<": 1, "[": 1, ")": -1, ">": -1, "]": -1}.get(c, 0)
                    if c == "," and depth == 0:
                        cut = i
                        break
                bound = " ".join(args[:cut].split())
            name = re.compile(r"\s*(\w+)\s*\(").match(code, end)
            if name is None:
                raise SystemExit(f"{path}:{line}: no kernel name after __global__ void [__launch_bounds__(...)]")
            found.append(([s for s in scopes if s is not None], name.group(1), bound, line))
    return found


def sim_units(out_dir):
    """One generated .cpp per kernel source (every .cu under csrc, and the simulator's own .cpp files with its
    self-test kernels) that includes it, so the C++ compiler (not nvcc) builds it, and registers each kernel's
    __launch_bounds__ for the simulator's launch check (ue_sim::register_launch_bounds; the bound's expression is
    evaluated in the kernel's namespace, so it may name the source's constants but not the kernel's template
    parameters)."""
    os.makedirs(out_dir, exist_ok=True)
    units = []
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) + \
        sorted(glob.glob(os.path.join(SIM_DIR, "*.cpp")))
    for source in sources:
        rel = os.path.relpath(source, "csrc")
        unit = os.path.join(out_dir, rel.replace(os.sep, "__") + ".cpp")
        text = f"// generated by setup.py: {source} compiled as C++ against csrc/common/sim/cuda_sim.h\n" \
               f'#include "{rel}"\n'
        for namespaces, kernel, bound, line in launch_bounds_in(source):
            if bound is None:
                continue  # launching it fails: no bound registered
            opens = "".join(f"namespace {n} {{ " for n in namespaces)
            text += (f"{opens}[[maybe_unused]] const bool ue_sim_bound_{kernel}_{line} = "
                     f'::ue_sim::register_launch_bounds("{kernel}", ({bound}), "{rel}", {line});'
                     f'{" }" * len(namespaces)}\n')
        if not os.path.exists(unit) or open(unit).read() != text:  # unchanged: ninja keeps the object
            with open(unit, "w") as f:
                f.write(text)
        units.append(os.path.relpath(unit, ROOT))
    return units


def sim_extension():
    """unlearn_engine._C_sim: every .cu kernel compiled as C++ against the simulated CUDA execution model
    (csrc/common/sim/cuda_sim.h), with the host drivers, as the operators torch.ops.unlearn_engine_sim.* on CPU
    tensors. CPU only, no nvcc; it loads beside _C (tests run the CUDA kernels on it: device "sim").
    UE_SIM_SANITIZE=1 builds it with ASan + UBSan (make sanitize-sim)."""
    sanitize = os.environ.get("UE_SIM_SANITIZE") == "1"
    sources = cpp_sources() + sim_units(os.path.join(ROOT, "build", "ue_sim_units"))
    cxx = ["-O1" if sanitize else "-O2", "-fopenmp", f'-DUE_VERSION="{VERSION}"', "-DUE_SIM", "-DWITH_CUDA",
           # its own operator namespace (and C++ namespace), so it registers beside _C
           "-Dunlearn_engine=unlearn_engine_sim", "-include", "common/sim/cuda_sim.h", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if sanitize:
        flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx += flags
        link += flags
    # the stand-ins for ATen's CUDA context, the CUDA guard and cub come before torch's headers
    return CppExtension("unlearn_engine._C_sim", sources, include_dirs=[os.path.join(ROOT, SIM_DIR, "include"), CSRC],
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


class BuildOrReuseExtension(BuildExtension):
    """UE_PREBUILT_EXTENSION=/path/to/_C...so packages that already-built extension instead of compiling the same
    sources again (tests/test_wheel.py builds a wheel of the checkout it just built); unset, BuildExtension."""

    def build_extension(self, ext):
        prebuilt = os.environ.get("UE_PREBUILT_EXTENSION")
        if not prebuilt:
            return super().build_extension(ext)
        if ext.name != "unlearn_engine._C":
            return None  # the simulator build is a test tool: not in a packaged prebuilt wheel
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(prebuilt, target)


setup(
    # Metadata, dependencies, packages and the console script are in pyproject.toml; this file adds the extension.
    # UE_SIM_ONLY=1: the simulator build alone (make sanitize-sim builds its ASan + UBSan variant aside)
    ext_modules=[sim_extension()] if os.environ.get("UE_SIM_ONLY") == "1" else [extension(), sim_extension()],
    cmdclass={"build_ext": BuildOrReuseExtension},
)
