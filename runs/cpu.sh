#!/usr/bin/env bash
# The CPU demo: the whole pipeline on a laptop or a small CPU box, in about 27 minutes on 2 cores.
#   data -> tokenizer -> pretraining -> base eval (bpb + a CORE subset) -> SFT -> chat eval -> report
#
#   PICOCHAT_MIRROR=../shared/data bash runs/cpu.sh     # offline, from a local mirror (or an http(s) URL)
#   bash runs/cpu.sh                                    # downloads ClimbMix shards and the eval data
#   DEPTH=4 BASE_TIME_S=1800 bash runs/cpu.sh           # any size knob below is an environment variable
#
# Re-running it continues where it stopped: finished stages are skipped (tokenizer present, final
# checkpoint present, eval result file present) and an interrupted base-train / chat-sft resumes from its
# last complete checkpoint (--resume auto). FORCE_TOK=1 retrains the tokenizer (use a fresh PICOCHAT_HOME:
# old checkpoints do not fit a new tokenizer). Artifacts go to $PICOCHAT_HOME (default ~/.cache/picochat).
#
# Why these settings: on 2 CPU cores every FLOP counts, so the GPU recipe (vocab 32768, d20+, seq 2048,
# 0.5M-token batches, 40 warmup steps) would spend the whole budget on a handful of steps. A small vocab
# (the embedding/unembedding dominate a tiny model's FLOPs), a shallow model, short sequences, full-length
# attention (window pattern L: SDPA on CPU has no native sliding window, masks would cost more) and small batches give many more
# optimizer steps, which is what a tiny budget needs.
# The defaults below come from measured sweeps (bench/cpu_sweep.py on this 2-core box; dev/BENCH.md):
# - depth: at 6-minute budgets d2 1.716 < d3 1.802 < d4 1.957 val bpb; at the demo's 20 minutes d2 still
#   beats d3 (1.614 vs 1.618, and 1.508 vs 1.526 over whole documents, with d3 given 13% more time).
# - batch: 4096-token batches beat 2048 (1.802 vs 1.870 at d3): half the rows per matmul costs more than
#   the extra steps give.
# - LR_MULT=2: twice base-train's LRs gave -0.03 bpb at d2 (1.695 vs 1.722; 1.601 vs 1.631 over whole
#   documents) and -0.02 at d3 (6-minute budgets); 4x gave another -0.01 at 6 minutes, untested at 20.
# - SPLIT_DOCS=1: scored over whole documents (base-eval --split-docs), splitting beats cropping at d2
#   (1.631 vs 1.668); the default val bpb crops like the reference, sees only each document's first row
#   (the very text a cropping run trains on) and so favours cropping (1.722 vs 1.702). A cropping run
#   would also repeat those openings ~15 times in 20 minutes.
# Wall clock on 2 cores, measured (dev/BENCH.md): ~27 min in all. data + tokenizer 30 s, base-train 20 min
# (BASE_TIME_S includes start-up and val evals; the horizon is fit to it), base-eval 0.8 min, SFT 600 steps
# 5 min, chat-eval 0.7 min. Base val bpb 1.62-1.63 (the step count varies with the box), ChatCORE 0.08.
# A re-run with different knobs in the same PICOCHAT_HOME keeps the old report sections: use a fresh
# PICOCHAT_HOME (or `picochat report reset`) for a new run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"   # one intra-op thread per core
export PYTHONUNBUFFERED=1
if [[ -n "${PICOCHAT_MIRROR:-}" && -d "$PICOCHAT_MIRROR" ]]; then   # a relative mirror dir -> absolute
    export PICOCHAT_MIRROR="$(cd "$PICOCHAT_MIRROR" && pwd)"
fi
PYTHON="${PYTHON:-python}"
WANDB_RUN="${WANDB_RUN:-dummy}"

# --- size knobs (environment variables; defaults from the sweep above) ------------------------
NUM_SHARDS="${NUM_SHARDS:-4}"                # train shards to download (+ the validation shard)
VOCAB_SIZE="${VOCAB_SIZE:-4096}"             # tokenizer vocab, including the 9 special tokens
MAX_CHARS="${MAX_CHARS:-50000000}"           # characters the tokenizer trains on
FORCE_TOK="${FORCE_TOK:-0}"                  # 1 = retrain the tokenizer even if one exists
DEPTH="${DEPTH:-2}"                          # transformer layers; width = DEPTH*ASPECT_RATIO
ASPECT_RATIO="${ASPECT_RATIO:-64}"
HEAD_DIM="${HEAD_DIM:-64}"
SEQ_LEN="${SEQ_LEN:-256}"
WINDOW_PATTERN="${WINDOW_PATTERN:-L}"
DEVICE_BATCH="${DEVICE_BATCH:-16}"           # rows per forward/backward
TOTAL_BATCH="${TOTAL_BATCH:-4096}"          # tokens per optimizer step (multiple of DEVICE_BATCH*SEQ_LEN)
BASE_TIME_S="${BASE_TIME_S:-1200}"           # pretraining wall-clock budget (start-up and val evals included)
BASE_ITERS="${BASE_ITERS:-}"                 # or a fixed number of optimizer steps (overrides BASE_TIME_S)
# steps a quiet 2-core box gives in BASE_TIME_S at the default sizes (~2.5/s measured at d2, dev/BENCH.md): far
# fewer is announced as a slow or busy machine. Other sizes: set it, or 0 for no expectation.
if [[ "${DEPTH:-2}" == 2 && "${TOTAL_BATCH:-4096}" == 4096 && "${SEQ_LEN:-256}" == 256 ]]; then
    BASE_EXPECT_STEPS="${BASE_EXPECT_STEPS:-$((BASE_TIME_S * 5 / 2))}"
else
    BASE_EXPECT_STEPS="${BASE_EXPECT_STEPS:-0}"
fi
SPLIT_DOCS="${SPLIT_DOCS:-1}"                # 1 = cut long documents into row-sized pieces instead of cropping
WARMUP_STEPS="${WARMUP_STEPS:-10}"
LR_MULT="${LR_MULT:-2}"                      # multiplies base-train's default LRs (before its batch scaling)
BASE_EVAL_EVERY="${BASE_EVAL_EVERY:-250}"    # val bpb interval during pretraining (~12 points: a curve, not 3 dots)
BASE_EVAL_TOKENS="${BASE_EVAL_TOKENS:-65536}"
SAMPLE_EVERY="${SAMPLE_EVERY:-0}"            # base-eval prints samples at the end anyway
SAVE_EVERY="${SAVE_EVERY:-500}"              # intermediate checkpoints, so an interrupted run resumes
KEEP_LAST="${KEEP_LAST:-2}"
EVAL_BATCH="${EVAL_BATCH:-$DEVICE_BATCH}"    # base-eval batch (bpb rows, CORE examples)
SPLIT_TOKENS="${SPLIT_TOKENS:-131072}"       # tokens per split for base-eval bpb
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-16}" # CORE subset: items per task (partial CORE, says so)
CORE_TASKS="${CORE_TASKS:-}"                 # comma list of CORE labels (empty = all in core.yaml)
IDENTITY_NUM="${IDENTITY_NUM:-1000}"         # synthetic identity conversations for SFT
SFT_ITERS="${SFT_ITERS:-600}"                # ~1 epoch of the demo mixture below (300 steps: half; dev/BENCH.md)
# shares of the SFT rows (chat-sft --mixture): the reference's proportions (identity 0.2%: ~15 identity
# conversations in this run, spelling 26%) would teach neither who the model is nor chat. This mix gives identity
# 15% (each of the 1000 identity conversations seen ~2x) and 11% synthetic `arithmetic` (the reply opens with a
# python tool call). SpellingBee is left out: a d2 model never learns it here (0% in every demo run), yet its long,
# regular letter-counting transcripts leaked into 1-5 of 30 everyday replies ("How many days are in a week?"),
# 4% of them or 10%; without it, 0 of 30 from two different base models (bench/chat_check.py, dev/BENCH.md).
# Add it back with SFT_MIXTURE=...,spellingbee=0.04 on a bigger model.
SFT_MIXTURE="${SFT_MIXTURE:-smoltalk=0.54,mmlu=0.08:3,gsm8k=0.08:4,identity=0.15:12,arithmetic=0.11,simplespelling=0.04}"
SFT_VAL_MIXTURE="${SFT_VAL_MIXTURE:-}"
SFT_EVAL_EVERY="${SFT_EVAL_EVERY:-60}"      # ~11 SFT val points
SFT_EVAL_TOKENS="${SFT_EVAL_TOKENS:-32768}"
CHAT_EVAL_TASKS="${CHAT_EVAL_TASKS:-}"       # '|'-separated (empty = all chat tasks)
CHAT_EVAL_MAX="${CHAT_EVAL_MAX:-50}"         # problems per task
CHAT_EVAL_MAX_TOKENS="${CHAT_EVAL_MAX_TOKENS:-64}"   # new tokens per generative answer

# -----------------------------------------------------------------------------------------------
picochat() { "$PYTHON" -m picochat "$@"; }
T_START=$(date +%s)
now() { date +%s.%N; }
run_stage() {   # run_stage NAME command...   (prints the stage's elapsed time)
    local name="$1"; shift
    echo "[cpu.sh] $name: starting: $*"
    local t0; t0=$(now)
    "$@"
    echo "[cpu.sh] $name: done in $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')s"
}
skip_stage() { echo "[cpu.sh] $1: skipped ($2)"; }
step6() { printf "%06d" "$1"; }
# the final step of a FINISHED run in checkpoint directory $1 (its last complete checkpoint reached the run's
# horizon, which a --max-time-s run fixes only after its first steps), else nothing
finished_step() {
    "$PYTHON" - "$1" <<'PY'
import sys
from picochat import checkpoint as c
d = sys.argv[1]
s = c.find_last_step(d)
n = c.read_meta(d, s).get("run", {}).get("num_iterations", -1) if s is not None else -1
if s is not None and 0 < n <= s:
    print(s)
PY
}
lr() { awk -v a="$1" -v m="$LR_MULT" 'BEGIN{printf "%g", a*m}'; }
# SFT inherits the base run's RAW LRs (its sqrt(B/2^19) batch scaling is not re-applied); at 2^19 tokens
# raw = effective, but at a CPU batch the raw LRs would be ~10x the ones base-train actually used, so SFT
# gets the effective base LRs explicitly.
sft_lr() { awk -v a="$1" -v m="$LR_MULT" -v b="$TOTAL_BATCH" 'BEGIN{printf "%g", a*m*sqrt(b/524288)}'; }

TAG="d$DEPTH"
BASE_CKPT="$PICOCHAT_HOME/checkpoints/base/$TAG"
SFT_CKPT="$PICOCHAT_HOME/checkpoints/sft/$TAG"
echo "[cpu.sh] PICOCHAT_HOME=$PICOCHAT_HOME PICOCHAT_MIRROR=${PICOCHAT_MIRROR:-(none: public URLs)} threads=$OMP_NUM_THREADS"
BASE_HORIZON="${BASE_TIME_S}s"; [[ -n "$BASE_ITERS" ]] && BASE_HORIZON="$BASE_ITERS steps"
echo "[cpu.sh] $TAG vocab=$VOCAB_SIZE seq=$SEQ_LEN batch=$DEVICE_BATCH/$TOTAL_BATCH base=$BASE_HORIZON" \
     "split_docs=$SPLIT_DOCS sft_iters=$SFT_ITERS"

# a new run starts a new report card; a re-run keeps the sections of the stages it skips
if [[ ! -f "$PICOCHAT_HOME/report/environment.json" ]]; then
    run_stage report-reset picochat report reset
fi

# --- data ---------------------------------------------------------------------------------------
# (the download itself skips shards that are already present and valid)
run_stage data picochat data download -n "$NUM_SHARDS"

# --- tokenizer ----------------------------------------------------------------------------------
if [[ -f "$PICOCHAT_HOME/tokenizer/tokenizer.json" && "$FORCE_TOK" != 1 ]]; then
    have_vocab=$("$PYTHON" -c "from picochat.tokenizer import get_tokenizer; print(get_tokenizer().get_vocab_size())")
    if [[ "$have_vocab" != "$VOCAB_SIZE" ]]; then
        echo "[cpu.sh] error: $PICOCHAT_HOME/tokenizer has vocab $have_vocab but VOCAB_SIZE=$VOCAB_SIZE." >&2
        echo "[cpu.sh] Use VOCAB_SIZE=$have_vocab, or FORCE_TOK=1 with a fresh PICOCHAT_HOME." >&2
        exit 1
    fi
    skip_stage tok-train "tokenizer exists, vocab $have_vocab; FORCE_TOK=1 retrains"
else
    run_stage tok-train picochat tok-train --max-chars "$MAX_CHARS" --vocab-size "$VOCAB_SIZE"
    rm -f "$PICOCHAT_HOME/report/tokenizer-evaluation.json"   # a new tokenizer needs a new evaluation
fi
if [[ -f "$PICOCHAT_HOME/report/tokenizer-evaluation.json" ]]; then
    skip_stage tok-eval "report/tokenizer-evaluation.json exists"
else
    run_stage tok-eval picochat tok-eval
fi

# --- pretraining --------------------------------------------------------------------------------
BASE_STEP=$(finished_step "$BASE_CKPT")
if [[ -n "$BASE_STEP" ]]; then
    skip_stage base-train "final checkpoint $BASE_CKPT step $BASE_STEP exists"
else
    if [[ -n "$BASE_ITERS" ]]; then horizon=(--num-iterations "$BASE_ITERS")
    else horizon=(--max-time-s "$BASE_TIME_S" --expect-steps "$BASE_EXPECT_STEPS"); fi
    split=(); [[ "$SPLIT_DOCS" == 1 ]] && split=(--split-docs)
    run_stage base-train picochat base-train --run "$WANDB_RUN" --device-type cpu \
        --depth "$DEPTH" --aspect-ratio "$ASPECT_RATIO" --head-dim "$HEAD_DIM" --max-seq-len "$SEQ_LEN" \
        --window-pattern "$WINDOW_PATTERN" --device-batch-size "$DEVICE_BATCH" --total-batch-size "$TOTAL_BATCH" \
        "${horizon[@]}" "${split[@]}" --warmup-steps "$WARMUP_STEPS" \
        --embedding-lr "$(lr 0.3)" --unembedding-lr "$(lr 0.008)" --matrix-lr "$(lr 0.02)" --scalar-lr "$(lr 0.5)" \
        --eval-every "$BASE_EVAL_EVERY" --eval-tokens "$BASE_EVAL_TOKENS" --core-metric-every 0 \
        --sample-every "$SAMPLE_EVERY" --save-every "$SAVE_EVERY" --keep-last "$KEEP_LAST" \
        --model-tag "$TAG" --resume auto
    BASE_STEP=$(finished_step "$BASE_CKPT")
    [[ -n "$BASE_STEP" ]] || { echo "[cpu.sh] error: base-train exited without a final checkpoint in $BASE_CKPT" >&2; exit 1; }
fi
if [[ -f "$PICOCHAT_HOME/base_eval/${TAG}_$(step6 "$BASE_STEP").csv" ]]; then
    skip_stage base-eval "base_eval/${TAG}_$(step6 "$BASE_STEP").csv exists"
else
    run_stage base-eval picochat base-eval --device-type cpu --model-tag "$TAG" --eval core,bpb,sample \
        --device-batch-size "$EVAL_BATCH" --split-tokens "$SPLIT_TOKENS" --max-per-task "$CORE_MAX_PER_TASK" \
        ${CORE_TASKS:+--tasks "$CORE_TASKS"}
fi

# --- chat ---------------------------------------------------------------------------------------
if [[ -f "$PICOCHAT_HOME/identity_conversations.jsonl" ]]; then
    skip_stage gen-identity "identity_conversations.jsonl exists"
else
    run_stage gen-identity picochat gen-identity --num "$IDENTITY_NUM"
fi
if [[ "$SFT_ITERS" -gt 0 && -f "$SFT_CKPT/meta_$(step6 "$SFT_ITERS").json" ]]; then
    skip_stage chat-sft "final checkpoint $SFT_CKPT step $SFT_ITERS exists"
else
    run_stage chat-sft picochat chat-sft --run "$WANDB_RUN" --device-type cpu --model-tag "$TAG" \
        --num-iterations "$SFT_ITERS" --max-seq-len "$SEQ_LEN" --device-batch-size "$DEVICE_BATCH" \
        --total-batch-size "$TOTAL_BATCH" --eval-every "$SFT_EVAL_EVERY" --eval-tokens "$SFT_EVAL_TOKENS" \
        --chatcore-every 0 --save-every "$SAVE_EVERY" --keep-last "$KEEP_LAST" \
        --embedding-lr "$(sft_lr 0.3)" --unembedding-lr "$(sft_lr 0.008)" --matrix-lr "$(sft_lr 0.02)" \
        ${SFT_MIXTURE:+--mixture "$SFT_MIXTURE"} ${SFT_VAL_MIXTURE:+--val-mixture "$SFT_VAL_MIXTURE"} \
        --resume auto
fi
SFT_STEP="$SFT_ITERS"
if [[ "$SFT_STEP" -le 0 ]]; then   # one epoch: the step is whatever the last checkpoint says
    SFT_STEP=$("$PYTHON" -c "from picochat import checkpoint as c; print(c.find_last_step('$SFT_CKPT'))")
fi
if [[ -f "$PICOCHAT_HOME/chat_eval/sft_${TAG}_${SFT_STEP}.json" ]]; then
    skip_stage chat-eval "chat_eval/sft_${TAG}_${SFT_STEP}.json exists"
else
    run_stage chat-eval picochat chat-eval -i sft --device-type cpu -g "$TAG" -x "$CHAT_EVAL_MAX" \
        -m "$CHAT_EVAL_MAX_TOKENS" -b "$EVAL_BATCH" ${CHAT_EVAL_TASKS:+-a "$CHAT_EVAL_TASKS"}
fi

# --- report -------------------------------------------------------------------------------------
run_stage report picochat report
T_END=$(date +%s)
echo "[cpu.sh] all stages finished in $(( (T_END - T_START) / 60 ))m$(( (T_END - T_START) % 60 ))s"
echo "[cpu.sh] report card: $PICOCHAT_HOME/report/report.md (copied to ./report.md)"
echo "Talk to it:   PICOCHAT_HOME=$PICOCHAT_HOME picochat chat -i sft --device-type cpu"
echo "  one-shot:   PICOCHAT_HOME=$PICOCHAT_HOME picochat chat -i sft -p \"Why is the sky blue?\""
echo "  web UI:     PICOCHAT_HOME=$PICOCHAT_HOME picochat serve   (then open http://127.0.0.1:8000)"
