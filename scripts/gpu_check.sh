#!/usr/bin/env bash
# make gpu-check: one command that proves the CUDA path on a fresh GPU machine (target: < 9 minutes on one H100).
#
#   1. builds unlearn_engine._C for the GPU present (TORCH_CUDA_ARCH_LIST = its compute capability)
#   2. runs the CUDA tests (every test parametrised for cuda, plus the static kernel checks)
#   3. runs compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over tests/test_kernel_sanitize.py,
#      a small case for every kernel and variant
#   4. runs the GPU benchmarks (bench/, against eager PyTorch and, where installed, torch.compile, liger-kernel and
#      cut-cross-entropy; carry their wheels with scripts/fetch_gpu_wheels.sh)
#   5. writes bench/results/<date>-<gpu>-gpu-check.json: build info, each step's status and time, and the
#      sanitizer summary (errors per tool); the benchmarks write their own <date>-<gpu>-<family>.json beside it
#
# Without a GPU it says so, runs the CPU-side checks (ruff, the static kernel checks) and exits with their status
# (0 when they pass). Environment: PYTHON (default python3), UE_GPU_CHECK_CPU_TESTS (the CPU-side pytest selection),
# UE_SANITIZER_TIMEOUT (seconds per sanitizer tool, default 150).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

has_gpu() {  # cheap answers first: no torch import when no driver tool exists or CUDA_VISIBLE_DEVICES is empty
  if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || ! command -v nvidia-smi >/dev/null 2>&1; then return 1; fi
  "$PYTHON" - <<'PY' 2>/dev/null
import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)
PY
}

if ! has_gpu; then
  echo "gpu-check: no CUDA GPU here (torch.cuda.is_available() is false): running the CPU-side checks only"
  status=0
  if command -v ruff >/dev/null 2>&1; then ruff check . || status=1
  elif [ -x "$(dirname "$PYTHON")/ruff" ]; then "$(dirname "$PYTHON")/ruff" check . || status=1; fi
  # shellcheck disable=SC2086
  "$PYTHON" -m pytest ${UE_GPU_CHECK_CPU_TESTS:-tests/test_build.py tests/test_kernel_resources.py} -q \
    -p no:cacheprovider || status=1
  echo "gpu-check: CPU-side checks $([ $status -eq 0 ] && echo passed || echo FAILED); the GPU steps need a GPU"
  exit $status
fi

STAMP="$(date -u +%Y-%m-%d)"
GPU_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')"
TAG="$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | grep -oE 'h200|h100|a100|l40|b200|gb200' | head -1)"
TAG="${TAG:-gpu}"
CAP="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
LOGS="$(mktemp -d)"
STEPS="$LOGS/steps.tsv"
: > "$STEPS"
echo "gpu-check: $GPU_NAME (sm ${CAP/./}), logs in $LOGS"

step() {  # step NAME COMMAND...: run, time, record "name<TAB>rc<TAB>seconds<TAB>log"
  local name="$1"; shift
  local log="$LOGS/$name.log" t0=$SECONDS
  echo "== $name: $*"
  "$@" > >(tee "$log") 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" >> "$STEPS"
  return $rc
}

# Wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh): installed beside, never into, the machine's Python.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ue-site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/ue-site"
fi
# The editable install maps python_api/ to unlearn_engine.api; an in-place build needs the same link.
[ -e unlearn_engine/api ] || ln -s ../python_api unlearn_engine/api

step build env UE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$CAP" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PYTHON" setup.py -q build_ext --inplace --build-temp build/gpu-check
build_rc=$?
if [ $build_rc -eq 0 ]; then
  step cuda-tests "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or kernel_" \
    tests/test_unlearning_loss.py tests/test_unlearning_loss_rmu.py tests/test_group_objective.py \
    tests/test_capturable.py tests/test_risk_projection.py \
    tests/test_weight_masking.py tests/test_registration.py tests/test_build.py tests/test_kernel_resources.py \
    tests/test_kernel_sanitize.py
  for tool in memcheck racecheck synccheck initcheck; do
    # no caching allocator: memcheck then sees each tensor's own bounds
    step "sanitizer-$tool" timeout "${UE_SANITIZER_TIMEOUT:-150}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
      "$PYTHON" -m pytest tests/test_kernel_sanitize.py -q -x -p no:cacheprovider
  done
  step bench "$PYTHON" -m pytest bench -q -s -p no:cacheprovider --benchmark-columns=min,mean,rounds
fi

mkdir -p bench/results
OUT_JSON="bench/results/$STAMP-$TAG-gpu-check.json"
"$PYTHON" - "$STEPS" "$OUT_JSON" "$GPU_NAME" <<'PY'
import json, re, sys
import torch
steps_path, out_path, gpu = sys.argv[1:4]
steps = []
for line in open(steps_path):
    name, rc, seconds, log = line.rstrip("\n").split("\t")
    text = open(log, errors="replace").read()
    row = dict(step=name, rc=int(rc), seconds=int(seconds), status="pass" if rc == "0" else "FAIL")
    if name.startswith("sanitizer-"):
        errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
        row.update(tool=name.split("-", 1)[1], errors=sum(errors) if errors else None,
                   timed_out=rc == "124", summary_lines=re.findall(r"=+ ERROR SUMMARY: .*", text)[-3:])
    if name in ("cuda-tests", "bench"):
        tail = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
        row["pytest"] = tail[-1] if tail else None
    steps.append(row)
try:
    import unlearn_engine as ue
    build = ue.build_info()
except Exception as err:  # the build failed
    build = dict(error=str(err))
summary = dict(gpu=gpu, capability="%d.%d" % torch.cuda.get_device_capability(), torch=torch.__version__,
               build=build, steps=steps, sanitizer={s["tool"]: s["errors"] for s in steps if "tool" in s},
               passed=all(s["rc"] == 0 for s in steps) and bool(steps))
with open(out_path, "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(dict(sanitizer=summary["sanitizer"], passed=summary["passed"])))
print("written:", out_path)
PY
echo "gpu-check: steps (name, rc, seconds):"; cut -f1-3 "$STEPS"
! cut -f2 "$STEPS" | grep -qv '^0$'
