#!/usr/bin/env bash
# Sets up ./.venv for twicediff on a fresh machine: the pinned torch, the build tools, the test
# tools, and twicediff itself compiled against that torch (CPU kernels always; CUDA kernels when
# nvcc and a CUDA build of torch are present). Safe to run again: it only rebuilds what changed.
#
#   PYTHON=python3.12            interpreter to make the venv with (default: python3)
#   TORCH_SPEC="torch==2.14.1"   torch to install (the supported versions are in the README)
#   TWICEDIFF_CUDA_ARCHS=...     architectures to compile (default here: the local GPU's, else 9.0;
#                                scripts/build_wheels.sh builds the full list for distribution)
#   TWICEDIFF_REQUIRE_CUDA=1     fail unless the CUDA kernels are built (CI sets it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
echo "== installing $TORCH_SPEC, build and test tools"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "$TORCH_SPEC" numpy tqdm scipy matplotlib \
  "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.30" ninja pytest hypothesis

if [ -z "${TWICEDIFF_CUDA_ARCHS:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .' || true)
  export TWICEDIFF_CUDA_ARCHS="${cap:-90}-real"
fi
echo "== building twicediff (CUDA archs: $TWICEDIFF_CUDA_ARCHS; require CUDA: ${TWICEDIFF_REQUIRE_CUDA:-0})"
# -v shows the compiler lines (nvcc for csrc/cuda/*.cu); the full log is kept in build/.
mkdir -p build
if ! "$VPY" -m pip install -v --no-build-isolation --no-deps . >build/setup-install.log 2>&1; then
  tail -n 80 build/setup-install.log
  echo "== building twicediff failed; the whole log is build/setup-install.log" >&2
  exit 1
fi
grep -E "(\[[0-9]+/[0-9]+\]|-- twicediff)" build/setup-install.log || true
"$VPY" -c "import twicediff, json; print('== twicediff build_info:', json.dumps(twicediff.build_info()))"
