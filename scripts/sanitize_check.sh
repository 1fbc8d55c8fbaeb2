#!/usr/bin/env bash
# CI step: compile the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer (gcc) and run
# the native-op tests against that build. The sanitized extension goes into its own build folder
# (build/sanitize) and a temporary copy of the package, so the development build in python/twicediff
# and the installed one are left alone. Any report fails the step: ASan stops at its first error,
# UBSan is compiled with -fno-sanitize-recover and run with halt_on_error=1.
#
#   PYTHON=.venv/bin/python            interpreter whose torch to build against and run the tests with
#                                      (default: the set-up's .venv, else python3; it needs pytest)
#   SANITIZE=address,undefined         the -fsanitize= list
#   SANITIZE_TESTS="tests/ops/test_*.py tests/torch/engines/test_native_engine.py"   the tests to run (those of
#                                      the native ops: the parameter-space ops and the HVP engine)
#   JOBS=N                             parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
SANITIZE=${SANITIZE:-address,undefined}
BUILD=${BUILD_DIR:-build/sanitize}
# shellcheck disable=SC2206  # the default is a glob on purpose
tests=(${SANITIZE_TESTS:-tests/ops/test_*.py tests/torch/engines/test_native_engine.py})
for t in "${tests[@]}"; do
  [ -e "$t" ] || { echo "sanitize_check: no test file matches '$t' (expected the native-op tests" \
                        "tests/ops/test_*.py and tests/torch/engines/test_native_engine.py)" >&2; exit 1; }
done

echo "== [1/2] building the CPU kernels with -fsanitize=$SANITIZE in $BUILD"
mkdir -p "$BUILD"
cmake_bin=$("$PYTHON" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || echo cmake)
if ! "$cmake_bin" -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
     -DTWICEDIFF_ENABLE_CUDA=OFF -DTWICEDIFF_REQUIRE_CUDA=OFF -DTWICEDIFF_INPLACE=OFF "-DTWICEDIFF_SANITIZE=$SANITIZE" \
     -DPython_EXECUTABLE="$(command -v "$PYTHON")" -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" \
     >"$BUILD.configure.log" 2>&1; then
  cat "$BUILD.configure.log"; exit 1
fi
"$cmake_bin" --build "$BUILD" -j "${JOBS:-2}"

pkg=$(mktemp -d /tmp/twicediff-sanitize.XXXXXX)
trap 'rm -rf "$pkg"' EXIT
cp -r python/twicediff "$pkg/"
rm -rf "$pkg"/twicediff/_C.*.so "$pkg"/twicediff/_build_config.py
find "$pkg" -name __pycache__ -prune -exec rm -rf {} +
cp "$BUILD"/_C.*.so "$BUILD/_build_config.py" "$pkg/twicediff/"

runtimes=()
case ",$SANITIZE," in *,address,*) runtimes+=("$(gcc -print-file-name=libasan.so)") ;; esac
case ",$SANITIZE," in *,undefined,*) runtimes+=("$(gcc -print-file-name=libubsan.so)") ;; esac
for r in "${runtimes[@]}"; do
  [ -e "$r" ] || { echo "sanitize_check: the sanitizer runtime $r is missing (install gcc's libasan/libubsan)" >&2; exit 1; }
done
preload=$(IFS=:; echo "${runtimes[*]}")

echo "== [2/2] ${tests[*]} under LD_PRELOAD=$preload"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design. Only
# twicediff._C is instrumented; the runtimes are preloaded because python itself is not linked
# against them.
run_sanitized() {
  LD_PRELOAD="$preload" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
  PYTHONPATH="$pkg" PYTHONDONTWRITEBYTECODE=1 "$PYTHON" "$@"
}
run_sanitized -c 'import os, sys, twicediff
info = twicediff.build_info()
assert os.path.dirname(twicediff.__file__) == os.path.join(sys.argv[1], "twicediff"), twicediff.__file__
assert info["sanitize"] == sys.argv[2] and not info["cuda_kernels"], info
print("== the tests import", twicediff.__file__, "built with sanitize =", info["sanitize"])' "$pkg" "$SANITIZE"
# --capture=sys: a sanitizer writes its report to file descriptor 2 and then aborts, which would
# lose it inside pytest's fd-level capture.
if ! run_sanitized -m pytest -q -p no:cacheprovider --capture=sys "${tests[@]}" "$@"; then
  echo "== sanitize_check: FAILED (a sanitizer report above, if any, says where)" >&2
  exit 1
fi
echo "== sanitize_check: passed"
