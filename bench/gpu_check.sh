#!/usr/bin/env bash
# One prepared GPU check of the Bi-WKV4 kernels (for a lent GPU box: torch + triton present,
# no pip installs). In one call of at most ~8 minutes (220 + 110 + 120 s of limits): the kernel tests on the GPU (compiled
# kernels, fixed configs), the benchmark (all shapes, autotuned configs, bytes/launches/GB/s
# and % of the measured copy bandwidth), the autotuner, and one markdown summary table to
# commit to bench/RESULTS.md.
#   bash bench/gpu_check.sh            # logs go to ${OUT:-/tmp/hpcm_gpu_check}
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/hpcm_gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)

echo "== pytest (GPU) =="
# one (fixed) config per kernel inside pytest: few cold compiles; the AOT report test is
# CPU-side and already run by CI, so it is skipped here
HPCM_BIWKV4_AUTOTUNE=0 timeout 220 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_biwkv4_kernels.py > "$OUT/pytest.txt" 2>&1
RC_TEST=$?
tail -n 15 "$OUT/pytest.txt"

echo "== benchmark =="
# fixed configs (compiled by pytest above, so no cold compiles here); the autotuner below
# times the other configs
HPCM_BIWKV4_AUTOTUNE=0 timeout 110 "$PY" bench/bench_biwkv4.py --C 640,960 --rep 25 \
    > "$OUT/bench.md" 2>&1
RC_BENCH=$?
cat "$OUT/bench.md"

echo "== autotune =="
# every config of every kernel is compiled here (cold): the 4K frame only
timeout 120 "$PY" -m kernels_triton.autotune --B 1 --T 34560 --C 640 \
    --chunks 512,2048 --rep 10 --json "$OUT/biwkv4_autotune.json" > "$OUT/autotune.md" 2>&1
RC_TUNE=$?
cat "$OUT/autotune.md"

ELAPSED=$(( $(date +%s) - T0 ))
SUMMARY=$(grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -n 1)
"$PY" - "$RC_TEST" "$RC_BENCH" "$RC_TUNE" "$ELAPSED" "$SUMMARY" <<'PYEOF'
import datetime, sys
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"unavailable ({e})"
rc_test, rc_bench, rc_tune, elapsed, summary = sys.argv[1:6]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU"
st = lambda rc: "ok" if rc == "0" else ("TIMEOUT" if rc == "124" else f"FAILED (rc {rc})")
print()
print("| item | value |")
print("|---|---|")
print(f"| date | {datetime.datetime.now().isoformat(timespec='seconds')} |")
print(f"| GPU | {gpu} |")
print(f"| torch / triton | {torch.__version__} / {tv} |")
print(f"| pytest tests/test_biwkv4_kernels.py | {st(rc_test)}: {summary} |")
print(f"| bench/bench_biwkv4.py | {st(rc_bench)} |")
print(f"| python -m kernels_triton.autotune | {st(rc_tune)} |")
print(f"| wall time | {elapsed} s |")
PYEOF
[ "$RC_TEST" = 0 ] && [ "$RC_BENCH" = 0 ] && [ "$RC_TUNE" = 0 ]
RC_ALL=$?; echo "== training benchmark =="; timeout 300 "$PY" bench/bench_train.py --device cuda > "$OUT/bench_train.md" 2>&1; cat "$OUT/bench_train.md"; exit $RC_ALL
