#!/usr/bin/env bash
# CI step: build a twicediff wheel for one CUDA architecture, install it into a fresh venv that
# holds only torch (the one the wheel was built against) and numpy/tqdm, and run
# scripts/wheel_smoke_test.py from outside the source tree (build record, pack, grad, mvp on CPU).
#
#   PYTHON=.venv/bin/python      interpreter whose torch the wheel is built against (default: the
#                                set-up's .venv, else python3)
#   TWICEDIFF_CUDA_ARCHS=90-real architectures to compile (default 90-real: one is enough here)
#   WHEEL_CUDA=auto|on|off       as in scripts/build_wheels.sh (TWICEDIFF_REQUIRE_CUDA=1 means on)
#   SMOKE_VENV=/path             reuse this venv (made when missing) instead of a temporary one
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
export TWICEDIFF_CUDA_ARCHS=${TWICEDIFF_CUDA_ARCHS:-90-real}
if [ "${TWICEDIFF_REQUIRE_CUDA:-0}" = 1 ] || [ "${TWICEDIFF_REQUIRE_CUDA:-}" = ON ]; then
  export WHEEL_CUDA=${WHEEL_CUDA:-on}
fi
tmp=$(mktemp -d /tmp/twicediff-wheel-smoke.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

echo "== [1/3] building the wheel"
OUTDIR="$tmp/wheelhouse" bash scripts/build_wheels.sh | tee "$tmp/build.out"
wheel=$(tail -n 1 "$tmp/build.out")
[ -f "$wheel" ] || { echo "no wheel was built" >&2; exit 1; }
version=$(basename "$wheel" | cut -d- -f2)
case "$version" in
  *+pt*cu*) expect_cuda=1 ;;
  *+pt*cpu) expect_cuda=0 ;;
  *) echo "wheel $wheel: expected a local version tag +pt<torch>cu<cuda> or +pt<torch>cpu" >&2; exit 1 ;;
esac

echo "== [2/3] a fresh venv with only the same torch (and numpy, tqdm)"
read -r torch_version base_python < <("$PYTHON" -c \
  'import sys, torch; print(torch.__version__, getattr(sys, "_base_executable", sys.executable))')
venv=${SMOKE_VENV:-$tmp/venv}
if [ ! -x "$venv/bin/python" ]; then
  "$base_python" -m venv "$venv"
  # (this machine's pip configuration names index folders that may be absent: drop those warnings)
  "$venv/bin/python" -m pip install -q "torch==${torch_version%%+*}" numpy tqdm 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi
got=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
if [ "$got" != "$torch_version" ]; then
  echo "the fresh venv got torch $got, the wheel was built against $torch_version" >&2
  exit 1
fi
# --no-index: the wheel's requirements (torch of its series, numpy, tqdm) must be met already.
"$venv/bin/python" -m pip uninstall -q -y twicediff 2>/dev/null || true
"$venv/bin/python" -m pip install -q --no-index --no-cache-dir "$wheel"

echo "== [3/3] smoke test of the installed wheel, from $tmp"
cp scripts/wheel_smoke_test.py "$tmp/"
(cd "$tmp" && env -u PYTHONPATH "$venv/bin/python" wheel_smoke_test.py \
   --expect-cuda-kernels "$expect_cuda" --expect-version "$version")
