#!/usr/bin/env bash
# Builds a twicediff wheel for one torch and a list of CUDA architectures, tagged with what it was
# built against: twicediff-0.1.0+pt2141cu130-cp311-cp311-linux_x86_64.whl (CUDA kernels compiled
# in) or ...+pt2141cpu-... (CPU kernels only). See docs/building.md, "Wheels for CUDA targets".
#
#   PYTHON=python3               interpreter whose torch the wheel is built against (default python3;
#                                it needs scikit-build-core, pybind11, cmake and ninja besides torch)
#   TORCH_SPEC="torch==2.11.0"   instead: make build/wheel-venvs/<spec> with that torch and the build
#                                tools (needs the package index) and build against it
#   TWICEDIFF_CUDA_ARCHS="..."   CUDA architectures, CMake syntax ("80-real;90-real;120"); default
#                                the CMakeLists.txt list: 7.5 through 12.0, PTX for 12.0
#   WHEEL_CUDA=auto|on|off       auto (default): CUDA kernels when nvcc and a CUDA build of torch are
#                                there, and then their failure to compile is an error; on: required;
#                                off: a CPU-only wheel
#   OUTDIR=wheelhouse            where the tagged wheel goes (its path is printed last)
#   BUILD_DIR=...                CMake build folder (default pyproject's build/{wheel_tag}, shared with
#                                scripts/setup.sh so that a wheel after a set-up recompiles nothing)
#   JOBS=N                       parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUTDIR:-wheelhouse}
WHEEL_CUDA=${WHEEL_CUDA:-auto}
mkdir -p build

PY=${PYTHON:-python3}
if [ -n "${TORCH_SPEC:-}" ]; then
  venv="build/wheel-venvs/$(echo "$TORCH_SPEC" | tr -c 'A-Za-z0-9.=\n' '_')"
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv with $TORCH_SPEC and the build tools"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "$TORCH_SPEC" numpy "scikit-build-core>=0.10" \
      "pybind11>=2.12" "cmake>=3.30" ninja
  fi
  PY="$venv/bin/python"
fi

read -r torch_version torch_cuda < <("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')
nvcc_found=0
if command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then nvcc_found=1; fi
case "$WHEEL_CUDA" in
  auto) if [ "$nvcc_found" = 1 ] && [ "$torch_cuda" != None ]; then cuda=ON; else cuda=OFF; fi ;;
  on) cuda=ON ;;
  off) cuda=OFF ;;
  *) echo "WHEEL_CUDA: expected auto, on or off, got '$WHEEL_CUDA'" >&2; exit 2 ;;
esac
settings=(-C cmake.define.TWICEDIFF_ENABLE_CUDA=$cuda -C cmake.define.TWICEDIFF_SANITIZE=
          -C "cmake.define.TWICEDIFF_REQUIRE_CUDA=$cuda")
[ -n "${BUILD_DIR:-}" ] && settings+=(-C "build-dir=$BUILD_DIR")
[ -n "${JOBS:-}" ] && export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
echo "== building a twicediff wheel against torch $torch_version (CUDA $torch_cuda) with $("$PY" --version)"
echo "== CUDA kernels: $cuda; archs: ${TWICEDIFF_CUDA_ARCHS:-CMakeLists.txt default}"

dist=$(mktemp -d build/wheel-dist.XXXXXX)
trap 'rm -rf "$dist"' EXIT
log=build/build-wheel.log
if ! "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$dist" "${settings[@]}" . >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "== building the wheel failed; the whole log is $log" >&2
  exit 1
fi
grep -E "(\[[0-9]+/[0-9]+\]|-- twicediff)" "$log" || true
raw=("$dist"/twicediff-*.whl)
wheel=$("$PY" scripts/tag_wheel.py "${raw[0]}" "$OUTDIR")
echo "== build record in the wheel:"
"$PY" -c 'import sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).read("twicediff/_build_config.py").decode())' "$wheel" \
  | grep -v '^#'
echo "$wheel"
