#!/usr/bin/env bash
# Build async_ckpt._native once under AddressSanitizer + UndefinedBehaviorSanitizer into
# build/asan/ (the normal in-tree build is untouched), then run the native and fuzz tests
# against it. Python itself is not instrumented, so libasan is LD_PRELOADed; leak checking
# is off (CPython keeps its arenas), everything else aborts on the first report.
#
#   tools/asan_build.sh                  # build + run the native, fuzz, gate and device-crc tests
#   tools/asan_build.sh tests/test_x.py  # build + run other tests against the ASan build
#   ASAN_SKIP_BUILD=1 tools/asan_build.sh ...   # reuse build/asan
#
# How it works: build/asan/pkg/async_ckpt/ holds symlinks to the package's .py files plus the
# ASan-built _native*.so; pytest runs from build/asan with PYTHONPATH=build/asan/pkg, so
# `import async_ckpt` resolves there (the script checks that it did).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START="$PWD"
OUT="$REPO/build/asan"
PY="${PYTHON:-python}"
CC_BIN="${CC:-gcc}"
LIBASAN="$("$CC_BIN" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
  echo "asan_build: $CC_BIN has no libasan.so ($LIBASAN); install the compiler's sanitizer runtime" >&2
  exit 2
fi
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"

if [[ "${ASAN_SKIP_BUILD:-0}" != "1" ]]; then
  rm -rf "$OUT/lib" "$OUT/tmp" "$OUT/pkg"
  mkdir -p "$OUT/lib" "$OUT/tmp"
  (cd "$REPO" && CC="$CC_BIN" CXX="${CXX:-g++}" CFLAGS="$SAN" CXXFLAGS="$SAN" LDFLAGS="$SAN" \
     ASYNC_CKPT_DEBUG=1 ASYNC_CKPT_CUDA=0 "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" \
     > "$OUT/build.log" 2>&1) || { tail -50 "$OUT/build.log" >&2; exit 2; }
  mkdir -p "$OUT/pkg/async_ckpt"
  for f in "$REPO"/async_ckpt/*.py "$REPO"/async_ckpt/*.pyi "$REPO"/async_ckpt/py.typed; do
    ln -s "$f" "$OUT/pkg/async_ckpt/$(basename "$f")"
  done
  for d in "$REPO"/async_ckpt/*/; do      # subpackages (format, storage, pipeline, tools, ...)
    [ -f "$d/__init__.py" ] && ln -s "${d%/}" "$OUT/pkg/async_ckpt/$(basename "$d")"
  done
  cp "$OUT"/lib/async_ckpt/_native*.so "$OUT/pkg/async_ckpt/"
  # The CUDA module (not instrumented; nvcc ignores the sanitizer flags) from the normal build.
  cp "$REPO"/async_ckpt/_cuda_crc*.so "$OUT/pkg/async_ckpt/" 2>/dev/null || true
fi

# libstdc++ must be loaded when ASan initialises, or its __cxa_throw interceptor finds no
# real function ("CHECK failed: real___cxa_throw != 0") at the first C++ exception.
LIBSTDCXX="$("${CXX:-g++}" -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:detect_odr_violation=0:allocator_may_return_null=1:symbolize=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$OUT/pkg${PYTHONPATH:+:$PYTHONPATH}"
export ASYNC_CKPT_IO_THREADS=2

cd "$OUT"
"$PY" - <<'PYCHECK'
import async_ckpt._native as n, os
assert "/build/asan/pkg/" in n.__file__, f"not the ASan build: {n.__file__}"
maps = open("/proc/self/maps").read()
assert "libasan" in maps, "libasan is not loaded"
print("asan_build: using", n.__file__)
PYCHECK

if [[ $# -eq 0 ]]; then
  # test_pools_work_in_a_forked_child forks while native pools run: under ASan that deadlocks
  # in the sanitizer's allocator (google/sanitizers issue 774), not in our code.
  set -- "$REPO/tests/test_native.py" "$REPO/tests/test_native_io.py" "$REPO/tests/test_fuzz.py" \
         "$REPO/tests/test_gate.py" "$REPO/tests/test_device_crc.py" "$REPO/tests/test_device_copy.py" \
         "$REPO/tests/test_early_stage.py" \
         -k "not test_pools_work_in_a_forked_child"
fi
args=()
for a in "$@"; do      # test paths relative to where the script was started
  if [[ "$a" != -* && "$a" != /* && -e "$START/${a%%::*}" ]]; then a="$START/$a"; fi
  args+=("$a")
done
set -- "${args[@]}"
exec "$PY" -m pytest -p no:cacheprovider -q "$@"
