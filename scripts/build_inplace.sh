#!/usr/bin/env bash
# Development build: compiles twicediff._C into python/twicediff/ so that PYTHONPATH=python imports
# the working tree. Usage: scripts/build_inplace.sh [extra cmake -D options]
#   PYTHON=...                 interpreter whose torch to build against (default: python3)
#   TWICEDIFF_CUDA_ARCHS=90    compile one architecture only (faster)
#   TWICEDIFF_NO_CUDA=1        skip the CUDA kernels (fastest; CPU work only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/inplace}
mkdir -p "$BUILD"
extra=()
[ "${TWICEDIFF_NO_CUDA:-0}" = 1 ] && extra+=(-DTWICEDIFF_ENABLE_CUDA=OFF)
cmake_bin=$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || echo cmake)
"$cmake_bin" -S . -B "$BUILD" -G Ninja -DTWICEDIFF_INPLACE=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" "${extra[@]}" "$@" >"$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
grep -E "^-- twicediff" "$BUILD.configure.log" || true
"$cmake_bin" --build "$BUILD" -j "${JOBS:-2}"
