#!/usr/bin/env bash
# The miniseries: one model per depth, each trained at the default tokens:params ratio, with val bpb and
# full CORE at the end (reference: nanochat runs/miniseries.sh). Shows that a change generalizes across
# depths. Results: $PICOCHAT_HOME/<series>_miniseries_results/results.csv; runs already in it are skipped.
#
#   bash runs/miniseries.sh                    # series name = today's date, e.g. jan11
#   bash runs/miniseries.sh fp8test            # or SERIES_NAME=fp8test
#   NPROC=1 DEPTHS="8 10" SKIP_SETUP=1 bash runs/miniseries.sh
# Tiny (CPU) sizes, e.g. for a smoke test:
#   SKIP_SETUP=1 NPROC=1 DEPTHS="1 2" CORE_MAX_PER_TASK=4 DEVICE_BATCH=4 \
#     EXTRA_ARGS="--device-type cpu --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --total-batch-size 512 \
#                 --num-iterations 4 --eval-tokens 1024" bash runs/miniseries.sh tiny
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-python}"

SERIES="${1:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}"
NPROC="${NPROC:-8}"
NUM_SHARDS="${NUM_SHARDS:-1000}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:--1}"
DEVICE_BATCH="${DEVICE_BATCH:-}"              # empty = the reference rule: 32 (d<20), 16 (d>=20), 8 (d>=28)
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # more base-train flags for every run (e.g. --fp8)
WANDB_RUN="${WANDB_RUN:-dummy}"
RESULTS_DIR="${RESULTS_DIR:-$PICOCHAT_HOME/${SERIES}_miniseries_results}"
RESULTS="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

picochat() { "$PYTHON" -m picochat "$@"; }
launch() {
    if [[ "$NPROC" -gt 1 ]]; then torchrun --standalone --nproc_per_node="$NPROC" -m picochat "$@"
    else "$PYTHON" -m picochat "$@"; fi
}
device_batch() {
    if [[ -n "$DEVICE_BATCH" ]]; then echo "$DEVICE_BATCH"
    elif [[ "$1" -ge 28 ]]; then echo 8
    elif [[ "$1" -ge 20 ]]; then echo 16
    else echo 32; fi
}

if [[ -z "${SKIP_SETUP:-}" ]]; then
    picochat data download -n "$NUM_SHARDS"
    picochat tok-train --max-chars=2000000000 --vocab-size=32768
fi

echo "[miniseries] series $SERIES, depths $DEPTHS -> $RESULTS"
for D in $DEPTHS; do
    if "$PYTHON" "$REPO/bench/scaling_plot.py" has "$RESULTS" --key "depth=$D"; then
        echo "[miniseries] d$D: already in $RESULTS, skipping"
        continue
    fi
    TAG="mini_${SERIES}_d${D}"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    launch base-train --depth="$D" --device-batch-size="$(device_batch "$D")" \
        --core-metric-every=-1 --core-metric-max-per-task="$CORE_MAX_PER_TASK" \
        --sample-every=0 --save-every=-1 --keep-last=1 --model-tag="$TAG" --run="${WANDB_RUN}" $EXTRA_ARGS
    echo "[miniseries] d$D: finished in $(( $(date +%s) - t0 ))s (wall, incl. evals)"
    "$PYTHON" "$REPO/bench/scaling_plot.py" collect miniseries "$RESULTS" --model-tag "$TAG"
done

"$PYTHON" "$REPO/bench/scaling_plot.py" plot miniseries "$RESULTS" --out-dir "$RESULTS_DIR"
echo "[miniseries] results: $RESULTS; plots in $RESULTS_DIR"
