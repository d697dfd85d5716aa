#!/usr/bin/env bash
# `make sanitize`: builds the C++ CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer
# into a tree of its own (build/sanitize/: a copy of the package, the tests and the docs, with the
# sanitized quantkernels/_C.abi3.so), so the normal in-place build is untouched, then runs the CPU
# kernel tests there at every ISA level (the tests' `isa` fixture) and the fuzz suite, with libasan
# preloaded into python. Any sanitizer report aborts the process (halt_on_error, no UBSan recover),
# so a finding is a failing run. Leak detection is off: CPython and torch hold memory until exit.
#   PY=python  SANITIZE_TESTS="tests/test_x.py ..."  SANITIZE_PYTEST_ARGS="-k ..."  bash tools/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/sanitize
TESTS=${SANITIZE_TESTS:-"tests/test_native_cpu.py tests/test_cpu_gemm.py tests/test_cpu_int8_vnni.py \
tests/test_cpu_llm_int8_isa.py tests/test_cpu_w4a8_llm_int8.py tests/test_cpu_w4a8_vnni.py \
tests/test_cpu_weight_only.py tests/test_fuzz.py"}
SAN="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"

CXX_BIN=$("$PY" -c "import sysconfig; print((sysconfig.get_config_var('CXX') or 'g++').split()[0])")
LIBASAN=$("$CXX_BIN" -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "sanitize: libasan.so not found for $CXX_BIN (install the compiler's libasan)"; exit 1; }
# python itself does not link libstdc++: preloaded after libasan, ASan's __cxa_throw interceptor
# finds the real one (otherwise the first C++ exception, e.g. in triton's import, aborts).
LIBSTDCXX=$("$CXX_BIN" -print-file-name=libstdc++.so.6)

# The sources and the package, copied so that build_ext --inplace writes the sanitized _C there.
# The C++ sources are copied only where they changed (a fresh mtime), so that ninja rebuilds
# exactly those objects; the Python package, tests and docs are copied afresh.
mkdir -p "$OUT"
rm -rf "$OUT/quantkernels" "$OUT/tests" "$OUT/docs"
cp -r quantkernels tests docs "$OUT/"
rm -f "$OUT"/quantkernels/_C*.so
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +
while IFS= read -r -d '' f; do
  mkdir -p "$OUT/$(dirname "$f")"
  cmp -s "$f" "$OUT/$f" || cp "$f" "$OUT/$f"
done < <(find csrc -type f -print0)
cp setup.py pyproject.toml README.md "$OUT/"
(cd "$OUT" && CFLAGS="$SAN" LDFLAGS="$SAN" MAX_JOBS=${MAX_JOBS:-1} "$PY" setup.py -q build_ext --inplace \
    --build-temp "$OUT/tmp" 2>&1 | grep -vE '^(copying|running|creating)' || true)
test -f "$OUT"/quantkernels/_C*.so || { echo "sanitize: the sanitized build failed"; exit 1; }
# (grep -c reads all of nm's output: grep -q would exit early and fail the pipe under pipefail)
[ "$(nm -D "$OUT"/quantkernels/_C*.so | grep -c __asan_report)" -gt 0 ] || { echo "sanitize: _C is not instrumented"; exit 1; }

# Run from the copy: its quantkernels (sanitized _C) is the one imported.
cd "$OUT"
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
# Reports go to files: pytest captures stderr, and a process the sanitizer stops loses it.
REPORTS=$OUT/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:allocator_may_return_null=1:log_path=$REPORTS/asan:${ASAN_OPTIONS_EXTRA:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:log_path=$REPORTS/ubsan"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
echo "sanitize: running $TESTS with the ASan + UBSan build (LD_PRELOAD=$LIBASAN)"
# shellcheck disable=SC2086
"$PY" -c "import quantkernels, quantkernels._native as n; assert n.AVAILABLE, n.REASON; \
print('sanitize: quantkernels from', quantkernels.__file__, 'ISA levels', n.cpu_isa_levels())"
rc=0
"$PY" -m pytest -q -p no:cacheprovider -x ${SANITIZE_PYTEST_ARGS:-} $TESTS || rc=$?
if compgen -G "$REPORTS/*" > /dev/null; then
  echo "sanitize: FINDINGS (pytest exit status $rc):"
  cat "$REPORTS"/*
  exit 1
fi
[ "$rc" -eq 0 ] || { echo "sanitize: pytest failed (exit status $rc), no sanitizer report"; exit "$rc"; }
echo "sanitize: clean (no ASan / UBSan report)"
