#!/usr/bin/env bash
# Scaling laws: depth x FLOPs-budget sweep (reference: nanochat runs/scaling_laws.sh, label jan26).
# Each run trains to exactly --target-flops (ratio -1: the horizon comes from the FLOPs budget; batch size
# and weight decay still follow the depth), evaluates val bpb on 100 x 524288 tokens and full CORE at the
# end, and is appended to $PICOCHAT_HOME/scaling_laws_results_<LABEL>/results.csv. Runs already in the CSV
# are skipped, so the script can be re-run after an interruption. Then plots + the frontier fit.
#
#   bash runs/scaling_laws.sh                                # 8 GPUs, budgets 1e18..1e19, d10..d20
#   NPROC=1 FLOPS_BUDGETS="1e17" DEPTHS="8 10" bash runs/scaling_laws.sh
#   SKIP_SETUP=1 LABEL=test bash runs/scaling_laws.sh        # data and tokenizer already there
# Tiny (CPU) sizes, e.g. for a smoke test:
#   SKIP_SETUP=1 NPROC=1 FLOPS_BUDGETS="4e8 8e8" DEPTHS="1 2" EVAL_TOKENS=1024 CORE_MAX_PER_TASK=4 \
#     EXTRA_ARGS="--device-type cpu --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --total-batch-size 512" \
#     DEVICE_BATCH=4 bash runs/scaling_laws.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-python}"

LABEL="${LABEL:-jan26}"
FLOPS_BUDGETS="${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19}"
DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
NPROC="${NPROC:-8}"
NUM_SHARDS="${NUM_SHARDS:-1000}"              # setup: shards to download
EVAL_TOKENS="${EVAL_TOKENS:-$((100 * 524288))}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:--1}"  # -1 = full CORE at the end of each run
DEVICE_BATCH="${DEVICE_BATCH:-}"              # empty = the reference rule: 32 (d<20), 16 (d>=20), 8 (d>=28)
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # more base-train flags for every run
WANDB_RUN="${WANDB_RUN:-dummy}"
RESULTS_DIR="${RESULTS_DIR:-$PICOCHAT_HOME/scaling_laws_results_$LABEL}"
RESULTS="$RESULTS_DIR/results.csv"
mkdir -p "$RESULTS_DIR"

picochat() { "$PYTHON" -m picochat "$@"; }
launch() {   # one process on 1 GPU/CPU, torchrun on several
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

for F in $FLOPS_BUDGETS; do
    for D in $DEPTHS; do
        if "$PYTHON" "$REPO/bench/scaling_plot.py" has "$RESULTS" --key "flops_budget=$F" --key "depth=$D"; then
            echo "[scaling_laws] d$D at $F FLOPs: already in $RESULTS, skipping"
            continue
        fi
        TAG="sl_${LABEL}_d${D}_f${F}"
        echo "[scaling_laws] d$D at $F FLOPs -> checkpoints/base/$TAG"
        t0=$(date +%s)
        # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
        launch base-train --depth="$D" --target-flops="$F" --target-param-data-ratio=-1 \
            --device-batch-size="$(device_batch "$D")" --eval-tokens="$EVAL_TOKENS" \
            --core-metric-every=-1 --core-metric-max-per-task="$CORE_MAX_PER_TASK" \
            --sample-every=0 --save-every=-1 --keep-last=1 --model-tag="$TAG" --run="$WANDB_RUN" $EXTRA_ARGS
        echo "[scaling_laws] d$D at $F FLOPs: finished in $(( $(date +%s) - t0 ))s (wall, incl. evals)"
        "$PYTHON" "$REPO/bench/scaling_plot.py" collect scaling "$RESULTS" --model-tag "$TAG" --flops-budget "$F"
    done
done

"$PYTHON" "$REPO/bench/scaling_plot.py" plot scaling "$RESULTS" --out-dir "$RESULTS_DIR"
echo "[scaling_laws] results: $RESULTS; plots in $RESULTS_DIR"
