#!/usr/bin/env bash
# The prepared GPU check of the Bi-WKV4 kernels (bench/gpu_check.py): copy bandwidth, an ideal
# 12 B/element Triton kernel on the kernels' grid, and the kernels at the 4K frame, at B=16/T=4096
# and at T=256 (C = 640), each with one float64 check; one markdown table. Fixed configs, no
# pytest, no model code; at most 5 minutes (timeout 300 s). Then, as its own step (at most
# 3 minutes, after the kernels' table is out), CPU <-> GPU .hpcm files:
# bench/gpu_portability.py, HPCM-Base and Phase 3 at full widths, 256².
#   bash bench/gpu_check.sh            # the table also goes to ${OUT:-/tmp/hpcm_gpu_check}/gpu_check.md
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HPCM_BIWKV4_AUTOTUNE=0
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/hpcm_gpu_check}
mkdir -p "$OUT"
timeout 300 "$PY" bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.md"
rc=${PIPESTATUS[0]}
echo
timeout 180 "$PY" bench/gpu_portability.py 2>&1 | tee -a "$OUT/gpu_check.md"
rc2=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && exit "$rc"
exit "$rc2"
