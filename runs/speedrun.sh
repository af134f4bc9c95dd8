#!/usr/bin/env bash
# The "time to GPT-2" speedrun: one 8×H100 node, base CORE > 0.256525.
# Configuration of the current record (nanochat #6, 1.65 h of training): d24, tokens:params
# ratio 8, device batch 16 (d24 does not fit 32 in 80 GB), fp8 tensorwise.
# Cost: ~2 h of wall clock for the whole script at ~$24/h for the node, i.e. about $50.
#   bash runs/speedrun.sh                 (optionally WANDB_RUN=name to log to wandb)
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"
WANDB_RUN="${WANDB_RUN:-dummy}"
NPROC="${NPROC:-8}"

# --- setup ---------------------------------------------------------------------
pip install -e ".[gpu]"
picochat report reset

# --- data: 8 shards (~2B chars) are enough for the tokenizer; the ~150 shards (~7B tokens) that
# d24 at ratio 8 needs download in the background while the tokenizer trains. ----------------
picochat data download -n 8
picochat data download -n 170 &
DATA_PID=$!

# --- tokenizer -----------------------------------------------------------------
picochat tok-train --max-chars=2000000000 --vocab-size=32768
picochat tok-eval

# --- pretraining ----------------------------------------------------------------
wait "$DATA_PID"
torchrun --standalone --nproc_per_node="$NPROC" -m picochat base-train \
    --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 \
    --sample-every=0 --save-every=1000 --core-metric-every=-1 --core-metric-max-per-task=-1 \
    --resume auto --run="$WANDB_RUN"
torchrun --standalone --nproc_per_node="$NPROC" -m picochat base-eval --device-batch-size=16

# --- chat ------------------------------------------------------------------------
picochat gen-identity
torchrun --standalone --nproc_per_node="$NPROC" -m picochat chat-sft --run="$WANDB_RUN" --resume auto
torchrun --standalone --nproc_per_node="$NPROC" -m picochat chat-eval -i sft

# RL on GSM8K is optional (about +3 points of GSM8K for ~1 h):
# torchrun --standalone --nproc_per_node="$NPROC" -m picochat chat-rl --run="$WANDB_RUN"
# torchrun --standalone --nproc_per_node="$NPROC" -m picochat chat-eval -i rl -a GSM8K

picochat report
echo "Talk to it:  picochat chat     or serve it:  picochat serve   (http://127.0.0.1:8000)"
