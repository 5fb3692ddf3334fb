#!/usr/bin/env bash
# Issue 6 at the CPU protocol's budget, one fold (held-out sketch): every norm x per-domain batch 2, 4, 8, 16 x
# DeepAll/BNE, each trained on 10848 images (= the protocol's 2 epochs of the fold's 5446 source train images,
# steps = 10848 // (3 b)) at 128 px and evaluated on all 3929 sketch images.
# Two workers of one torch thread each (on 2 cores they train more images/s in all than one 2-thread process),
# the norms split so both take about as long; the default batch first, then b = 2, 8, 4, so an interrupted
# run has whole columns. Every (norm, b, method) result is cached (data/bench-cache/norms/): rerunning this
# script resumes. The last call only gathers the cached cells into reports/norms/metrics.{json,md}.
#   nohup bash bench/experiments/norms/norms_grid.sh > logs/norms_grid.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
SCRIPT=bench/experiments/norms/norms_pacs.py
COMMON=(--target sketch --images 10848 --resolution 128 --threads 1)
mkdir -p logs
worker() {  # $1: log name, rest: norms
  local name=$1; shift
  for bs in 16 2 8 4; do
    "$PY" "$SCRIPT" "${COMMON[@]}" --norms "$@" --batches "$bs" --out "data/bench-cache/norms-$name.json"
  done
}
worker a cbn bn bgn > logs/norms_grid_a.log 2>&1 &
pa=$!
worker b mbn iebn proxynorm > logs/norms_grid_b.log 2>&1 &
pb=$!
wait $pa $pb
"$PY" "$SCRIPT" "${COMMON[@]}" --batches 2 4 8 16
