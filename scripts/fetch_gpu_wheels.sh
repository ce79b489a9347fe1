#!/usr/bin/env bash
# Fetches the wheels the GPU machine lacks for `make gpu-check`'s baselines into .whl/ (git-ignored), to carry
# there: liger-kernel (fused linear cross entropy) and cut-cross-entropy. Both are pure-Python wheels over
# torch and triton, which the GPU machine already has, so only their own small needs come along.
# The machine runs CPython 3.12 on manylinux x86-64; run this here, where pip can reach the index.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
CCE_VERSION="${CCE_VERSION:-25.1.1}"
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in "liger-kernel==$LIGER_VERSION" "cut-cross-entropy==$CCE_VERSION"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
# What they need beyond what the machine has (torch, triton, numpy, ...): list it, so a missing one shows up here.
for whl in "$DEST"/*.whl; do
  echo "$(basename "$whl") requires:"
  unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /' || true
done
du -sh "$DEST"
