"""
Pretrain a GPT on the pretraining shards. Every hyperparameter follows from --depth.

Examples:
    # CPU demo (minutes): a d4 model at sequence 512
    picochat base-train --depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 16384 \
        --num-iterations 200 --eval-every 50 --eval-tokens 65536 --core-metric-every -1 --sample-every 100
    # the speedrun on one 8xH100 node
    torchrun --standalone --nproc_per_node=8 -m picochat base-train --depth 24 --target-param-data-ratio 8 \
        --device-batch-size 16 --fp8 --run speedrun
    # continue the last complete checkpoint of that run after a crash
    torchrun --standalone --nproc_per_node=8 -m picochat base-train --depth 24 ... --resume auto

Outputs (under $PICOCHAT_HOME/checkpoints/base/<model-tag>/): model/meta/optim checkpoints and metrics.jsonl,
one JSON row per training step: step, loss (this step's mean train loss), smooth_loss, lr, lrm, dt,
tok_per_sec, mfu, time_s (training time so far), plus val_bpb / core_metric on the steps they were measured.
A row with "step": s describes the model after s optimizer steps (loss is measured before update s+1);
the final row (step = num_iterations) has only the final evaluations.

Fault injection (tests of exact resume / atomic saves): PICOCHAT_FAULT_SIGKILL=<s> SIGKILLs the process just
before training step s; PICOCHAT_FAULT_SIGKILL_SAVE=<s> SIGKILLs it inside the step-s save, after the tensors
and before the meta.
"""
import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import gc
import math
import time
import signal
import argparse
import contextlib

import torch
import torch.distributed as dist

from picochat import __version__
from picochat.common import (compute_init, compute_cleanup, print0, warn0, synchronize,
                             get_peak_flops, measure_cpu_matmul_peak, device_name, format_mfu, init_wandb,
                             max_memory_allocated, barrier, process_start_time, long_run_notice, positive_int)
from picochat import checkpoint as ckpt, fp8, report
from picochat.gpt import GPT, build_model, config_from_depth
from picochat.engine import sample_prompts
from picochat.core_eval import evaluate_core, load_core_tasks
from picochat.tokenizer import get_tokenizer, get_token_bytes
from picochat.dataloader import pretrain_batches, gather_state
from picochat.loss_eval import evaluate_bpb

B_REF = 2 ** 19          # reference total batch size (tokens) at the d12 reference
BUDGET_PROBE_STEPS = 10  # --max-time-s: steps timed before the horizon is fixed
REF_DEPTH = 12           # all hyperparameter transfer is relative to d12
BATCH_EXPONENT = 0.383   # Power Lines: B_opt ~ D^0.383


def build_parser():
    p = argparse.ArgumentParser(prog="picochat base-train", description="Pretrain a base model.")
    a = p.add_argument
    a("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    a("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42)
    a("--fp8", action="store_true", help="FP8 training (CUDA only; ignored with a warning elsewhere)")
    a("--fp8-recipe", default="tensorwise", choices=["tensorwise"],
      help="fp8 scaling recipe (tensorwise: one scale per tensor; the only one implemented)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on for CUDA, off elsewhere)")
    # model
    a("--depth", type=positive_int, default=20, help="transformer layers: the one dial every other size follows from")
    a("--aspect-ratio", type=positive_int, default=64, help="model width = depth x aspect ratio, rounded up to a multiple of --head-dim")
    a("--head-dim", type=positive_int, default=128, help="attention head width")
    a("--max-seq-len", type=positive_int, default=2048, help="tokens per training row (the model's context)")
    a("--window-pattern", default="SSSL")
    # horizon (precedence: num-iterations > target-flops > target-param-data-ratio)
    a("--num-iterations", type=int, default=-1)
    a("--max-time-s", type=float, default=-1.0,
      help="wall-clock budget of the whole command (start-up, evals and the final save included): the horizon is "
           f"set after the first {BUDGET_PROBE_STEPS} steps from their measured speed and refit once before the "
           f"warmdown (overrides the other horizons)")
    a("--target-flops", type=float, default=-1.0)
    a("--target-param-data-ratio", type=float, default=12.0)
    # batch
    a("--device-batch-size", type=positive_int, default=32, help="rows per forward/backward pass")
    a("--total-batch-size", type=int, default=-1, help="tokens per optimizer step; -1 = auto from depth")
    # optimization
    a("--embedding-lr", type=float, default=0.3)
    a("--unembedding-lr", type=float, default=0.008)
    a("--weight-decay", type=float, default=0.28)
    a("--matrix-lr", type=float, default=0.02)
    a("--scalar-lr", type=float, default=0.5)
    a("--warmup-steps", type=int, default=40)
    a("--warmdown-ratio", type=float, default=0.65)
    a("--final-lr-frac", type=float, default=0.05)
    # evaluation / output
    a("--eval-every", type=int, default=250)
    a("--eval-tokens", type=int, default=80 * 524288)
    a("--core-metric-every", type=int, default=2000)
    a("--core-metric-max-per-task", type=int, default=500)
    a("--sample-every", type=int, default=2000)
    a("--save-every", type=int, default=-1, help="-1 = only at the end")
    a("--keep-last", type=int, default=None, help="keep only the newest N checkpoints")
    a("--model-tag", default=None, help="checkpoint directory name (default d<depth>)")
    a("--data-dir", default=None, help="directory of parquet shards (default $PICOCHAT_HOME/data/climbmix)")
    a("--split-docs", action="store_true",
      help="cut documents longer than a row into BOS-first row-sized pieces instead of cropping their tails "
           "(the reference crops). Use at short --max-seq-len (the CPU demo), where cropping would discard most "
           "of each document. Validation keeps the reference's packing, so val bpb stays comparable")
    a("--resume", default=None, help="'auto' (last complete checkpoint of this run, else start fresh) or a step")
    a("--resume-from-step", type=int, default=-1)
    return p

# -----------------------------------------------------------------------------
# Derivations from depth, and schedules

def derive(args, model, world_size):
    """Everything that follows from the depth. Returns a dict (printed as a table, saved in the meta)."""
    params = model.num_scaling_params()
    # the Kaplan-style count gave the cleanest scaling laws: matrices + unembedding, no embedding tables
    n_scaling = params["transformer_matrices"] + params["lm_head"]
    # the d12 reference with the same width/head/sequence flags, built on meta (no memory)
    with torch.device("meta"):
        ref = GPT(config_from_depth(REF_DEPTH, model.config.vocab_size, args.aspect_ratio, args.head_dim,
                                    args.max_seq_len, args.window_pattern))
    ref_params = ref.num_scaling_params()
    n_ref = ref_params["transformer_matrices"] + ref_params["lm_head"]
    ratio = args.target_param_data_ratio
    target_tokens = int(ratio * n_scaling)
    # D / D_ref = (ratio*N) / (ratio*N_ref): the ratio cancels, so the batch and WD depend on N/N_ref only
    # (and still do when the horizon comes from --num-iterations or --target-flops, as in the reference)
    data_scale = n_scaling / n_ref
    if args.total_batch_size > 0:
        total_batch = args.total_batch_size
    else:
        # B_opt ~ D^0.383 (Power Lines), rounded to a power of two
        total_batch = 2 ** round(math.log2(B_REF * data_scale ** BATCH_EXPONENT))
    # LR ~ sqrt(B): the usual square-root rule for Adam-like optimizers
    batch_lr_scale = math.sqrt(total_batch / B_REF)
    # keep T_epoch = B / (lr * wd * D) constant: wd ~ sqrt(B/B_ref) * D_ref / D
    weight_decay = args.weight_decay * batch_lr_scale / data_scale
    flops_per_token = model.estimate_flops()
    if args.num_iterations > 0:
        num_iterations, horizon = args.num_iterations, "--num-iterations"
    elif args.target_flops > 0:
        num_iterations, horizon = round(args.target_flops / (flops_per_token * total_batch)), "--target-flops"
    elif ratio > 0:
        num_iterations, horizon = target_tokens // total_batch, "--target-param-data-ratio"
    else:
        raise ValueError("no training horizon: give --num-iterations, --target-flops or a positive "
                         "--target-param-data-ratio")
    if num_iterations < 1:
        raise ValueError(f"the horizon gives {num_iterations} iterations (total batch {total_batch:,} tokens); "
                         "raise --target-param-data-ratio/--target-flops or set --num-iterations")
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    if total_batch % tokens_per_fwdbwd:
        raise ValueError(
            f"total batch size {total_batch:,} tokens is not divisible by device_batch_size x max_seq_len x "
            f"world_size = {args.device_batch_size} x {args.max_seq_len} x {world_size} = {tokens_per_fwdbwd:,}. "
            f"Set --total-batch-size to a multiple of {tokens_per_fwdbwd:,}, or lower --device-batch-size "
            f"(or --max-seq-len) so that it divides {total_batch:,}.")
    grad_accum = total_batch // tokens_per_fwdbwd
    return dict(params=params, scaling_params=n_scaling, ref_scaling_params=n_ref, target_tokens=target_tokens,
                total_batch_size=total_batch, batch_lr_scale=batch_lr_scale, weight_decay=weight_decay,
                flops_per_token=flops_per_token, num_iterations=num_iterations, horizon=horizon,
                grad_accum_steps=grad_accum, tokens_per_fwdbwd=tokens_per_fwdbwd,
                total_tokens=total_batch * num_iterations,
                total_flops=flops_per_token * total_batch * num_iterations)


def lr_multiplier(it, n, warmup, warmdown_ratio, final_frac):
    """Linear warmup, constant, then linear warmdown to final_frac over the last warmdown_ratio of training."""
    warmdown = round(warmdown_ratio * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - warmdown:
        return 1.0
    p = (n - it) / warmdown
    return p + (1 - p) * final_frac


def muon_momentum(it, n, warmdown_ratio):
    """0.85 -> 0.97 over the first 400 steps; 0.97 -> 0.90 over the warmdown; 0.97 in between."""
    warmdown = round(warmdown_ratio * n)
    if it < 400:
        frac = it / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if warmdown > 0 and it >= n - warmdown:
        frac = (it - (n - warmdown)) / warmdown
        return (1 - frac) * 0.97 + frac * 0.90
    return 0.97


def muon_weight_decay(it, n, wd):
    """Cosine decay of the Muon weight decay to 0 at the end of training."""
    return wd * 0.5 * (1 + math.cos(math.pi * it / n))

# -----------------------------------------------------------------------------
# Helpers

def _fp8_eval_context(model, active):
    """FP8 layers are swapped for plain Linear shells during evaluation (avoids a VRAM spike)."""
    if not active:
        return contextlib.nullcontext()
    return fp8.disable_fp8(model)


def _json_float(x):
    return None if x is None or not math.isfinite(x) else x


def _fault_hook(step, phase):
    """Fault injection for the exact-resume test: PICOCHAT_FAULT_SIGKILL=<step> kills this process with SIGKILL
    just before training step <step>. (Mid-save kills: see checkpoint.save_checkpoint.)"""
    spec = os.environ.get("PICOCHAT_FAULT_SIGKILL")
    if spec and phase == "step" and spec == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def horizon_for_budget(budget_s, elapsed_s, step, step_s, eval_s, eval_every):
    """Iterations that fit the wall-clock budget: the steps done so far plus as many more as the time left
    allows, counting the periodic val evals (and the final one) at their measured cost. 2% is kept in reserve
    for the final save and noise."""
    left = 0.98 * budget_s - elapsed_s - eval_s  # the final evaluation always runs
    per_step = step_s + (eval_s / eval_every if eval_every > 0 else 0.0)
    return step + max(1, int(left / per_step))


def budget_refine_step(probe_end, n, warmdown_ratio):
    """--max-time-s re-measures the step time once, later and over a longer window: the first steps run slower
    (allocator warm-up, the loader filling its buffer on the same cores: ~20% on 2 CPU cores) and would leave
    that much of the budget unused. The refit must land before the warmdown starts, where the LR multiplier does
    not depend on the horizon yet, so the schedule already followed stays the schedule of the final horizon.
    Returns the step to refit at, or None when the run is too short for one."""
    at = probe_end + max(2 * BUDGET_PROBE_STEPS, n // 10)
    return at if at < (1 - warmdown_ratio) * n else None


def _agree(n: int) -> int:
    """Every rank must use the same horizon (their clocks differ): the smallest one."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([n], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    return n


def print_table(rows):
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print0(f"  {k:<{width}}  {v}")


_core_tasks = None  # the bundle is parsed once per process, not at every CORE evaluation

def run_core(model, tokenizer, device, max_per_task, batch_size):
    global _core_tasks
    if _core_tasks is None:
        try:
            _core_tasks = load_core_tasks()
        except (OSError, RuntimeError, ValueError) as e:  # no bundle (offline, no mirror): training goes on
            warn0(f"CORE evaluation disabled: the CORE bundle is unavailable ({e})")
            _core_tasks = False
    if _core_tasks is False:
        return None
    tasks, missing, total = _core_tasks
    out = evaluate_core(model, tokenizer, tasks, max_per_task=max_per_task, device=device,
                        batch_size=batch_size, max_len=getattr(model, "rotary_len", None), log=None)
    out["tasks_used"], out["tasks_total"], out["missing"] = len(tasks), total, missing
    return out

# -----------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)

    rt = compute_init(args.device_type, seed=args.seed)
    device, device_type, dtype, master = rt.device, rt.device_type, rt.dtype, rt.master
    t_start = process_start_time()  # a --max-time-s budget counts start-up too: that is what a user waits for
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    use_fp8 = False
    if args.fp8:
        use_fp8 = fp8.resolve_fp8(True, device)  # CUDA SM90+ only; warns and returns False elsewhere
    wandb_run = init_wandb("picochat", args.run, vars(args), master)
    if args.warmup_steps < 1 and args.resume is None and args.resume_from_step < 0:
        # zero-initialised output projections make every block the identity at step 0, so the loss does not
        # depend on the residual scalars and their gradient is rounding noise; AdamW's first step at full LR
        # moves them by a whole LR unit in that noise's direction (in bf16 this flipped the residual stream's
        # sign and the loss rose above uniform: dev/LOG.md). A few warmup steps keep that step small.
        warn0("--warmup-steps 0 from scratch: the first AdamW step moves the residual scalars by a full LR in a "
              "random direction (their gradient is pure rounding noise at init). Use at least a few warmup steps.")

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    vocab_size = tokenizer.get_vocab_size()
    config = config_from_depth(args.depth, vocab_size, args.aspect_ratio, args.head_dim, args.max_seq_len,
                               args.window_pattern)
    model = build_model(config, device, dtype)
    d = derive(args, model, rt.world_size)
    num_iterations, grad_accum, total_batch = d["num_iterations"], d["grad_accum_steps"], d["total_batch_size"]
    s = d["batch_lr_scale"]
    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr * s, embedding_lr=args.embedding_lr * s,
                                      matrix_lr=args.matrix_lr * s, weight_decay=d["weight_decay"],
                                      scalar_lr=args.scalar_lr * s)

    # ---- resume ----
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = ckpt.checkpoint_dir("base", model_tag)
    resume_step = None
    if args.resume is not None and args.resume != "auto":
        try:
            resume_step = int(args.resume)
        except ValueError:
            raise ValueError(f"--resume must be 'auto' or a step number, got {args.resume!r}") from None
    elif args.resume_from_step >= 0:
        resume_step = args.resume_from_step
    elif args.resume == "auto":
        resume_step = ckpt.find_last_step(ckpt_dir)
        print0(f"--resume auto: {'resuming from step ' + str(resume_step) if resume_step is not None else 'no complete checkpoint in ' + str(ckpt_dir) + ', starting fresh'}")
    meta = None
    budget_pending = args.max_time_s > 0  # the horizon is fixed after the first steps (below)
    if resume_step is not None:
        resumed_meta = ckpt.read_meta(ckpt_dir, resume_step)
        if args.max_time_s > 0 and not resumed_meta.get("budget_pending", False):
            num_iterations = resumed_meta["num_iterations"]  # a budgeted run continues to the horizon it chose
            budget_pending = False
    if resume_step is not None and not budget_pending and resume_step >= num_iterations:
        print0(f"{ckpt_dir} already holds the final checkpoint (step {resume_step} of {num_iterations}): nothing to do")
        compute_cleanup()
        return 0
    if resume_step is not None:
        state, meta = ckpt.load_state(ckpt_dir, resume_step, device)
        ckpt.check_resume_compat(meta, config.to_dict(), rt.world_size)
        model.load_state_dict(state, strict=True)
        del state
        optimizer.load_shard_state_dict(ckpt.load_optimizer_state(ckpt_dir, resume_step, rt.rank))
        ckpt.set_rng_state(meta["rng_state"])
        if master:
            ckpt.truncate_metrics(ckpt_dir, resume_step)  # the resumed run rewrites rows from resume_step on
    else:
        # a fresh run must not mix with an older run's checkpoints: a later --resume auto would pick up the
        # stale, higher-step ones
        existing = [st for st in ckpt.list_steps(ckpt_dir) if ckpt.is_complete(ckpt_dir, st)]
        if existing:
            raise ValueError(f"{ckpt_dir} already holds checkpoints of an earlier run (steps {existing}). "
                             "Pass --resume auto to continue it, choose another --model-tag, or delete that "
                             "directory to start over.")
        if master:
            ckpt.truncate_metrics(ckpt_dir, 0)
    barrier()

    orig_model = model  # uncompiled: for saving, CORE and sampling
    if use_fp8:
        fp8.convert_to_float8_training(model)
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    scaler = None
    if dtype == torch.float16:
        scaler = torch.amp.GradScaler(device_type)

    # ---- MFU peak ----
    if device_type == "cpu":
        # the honest "peak" of this CPU: a matmul in the dtype the run actually computes in
        peak_flops = measure_cpu_matmul_peak(dtype=dtype)
    elif device_type == "cuda":
        peak_flops = get_peak_flops(device_name(device_type))
    else:
        peak_flops = None

    # ---- the derived table ----
    p = d["params"]
    print0(f"picochat {__version__} base-train: {model_tag}, {device_type} ({device_name(device_type)}), "
           f"{rt.world_size} process(es), compute dtype {str(dtype).removeprefix('torch.')} ({rt.dtype_reason})")
    print_table([
        ("model", f"depth {config.n_layer}, width {config.n_embd}, heads {config.n_head} x {config.n_embd // config.n_head}, "
                  f"seq {config.sequence_len}, windows {config.window_pattern}, vocab {vocab_size:,}"),
        ("parameters", ", ".join(f"{k} {v:,}" for k, v in p.items())),
        ("scaling params N", f"{d['scaling_params']:,} (d{REF_DEPTH} reference: {d['ref_scaling_params']:,})"),
        ("FLOPs / token", f"{d['flops_per_token']:.4e}"),
        ("total batch B", f"{total_batch:,} tokens" + (" (auto: 2^round(log2(B_ref (N/N_ref)^0.383)))"
                                                      if args.total_batch_size <= 0 else " (--total-batch-size)")),
        ("grad accumulation", f"{grad_accum} = {total_batch:,} / ({args.device_batch_size} x {args.max_seq_len} x {rt.world_size})"),
        ("LR batch scale", f"sqrt(B/B_ref) = {s:.4f}"),
        ("learning rates", f"matrix {args.matrix_lr * s:.5g}, embedding {args.embedding_lr * s:.5g}, "
                           f"unembedding {args.unembedding_lr * s:.5g}, scalar {args.scalar_lr * s:.5g}"),
        ("Muon weight decay", f"{d['weight_decay']:.5g} = {args.weight_decay} x sqrt(B/B_ref) x N_ref/N"),
        ("horizon", f"set by --max-time-s {args.max_time_s:g} after the first {BUDGET_PROBE_STEPS} steps"
                    if budget_pending else f"{num_iterations:,} iterations (from {d['horizon']})"),
        ("tokens", f"{d['total_tokens']:,} (tokens:params {d['total_tokens'] / d['scaling_params']:.2f})"),
        ("total FLOPs", f"{d['total_flops']:.4e}"),
        ("peak FLOP/s", "unknown" if peak_flops is None else f"{peak_flops:.4e}" + (" (measured fp32 matmul)" if device_type == "cpu" else "")),
        ("compile / fp8", f"{use_compile} / {use_fp8}"),
        ("checkpoints", f"{ckpt_dir}" + (f" (resuming at step {resume_step})" if resume_step is not None else "")),
    ])

    # ---- data ----
    loader_state = meta["dataloader_state"] if meta else None
    train_loader = pretrain_batches(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                                    data_dir=args.data_dir, resume_state=loader_state, split_docs=args.split_docs)
    consumed_state = loader_state  # the state right after the last batch TRAINED on (what a resume needs)
    x, y, next_state = next(train_loader)  # prefetch
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * rt.world_size))

    # ---- loop state ----
    loop = meta["loop_state"] if meta else {}
    step = resume_step or 0
    smooth_loss = loop.get("smooth_train_loss", 0.0)
    min_val_bpb = loop.get("min_val_bpb") or float("inf")
    total_training_time = loop.get("total_training_time", 0.0)
    val_bpb = meta.get("val_bpb") if meta else None
    core_result = None
    first_step_of_process = True
    peak_flops_world = peak_flops * rt.world_size if peak_flops else None
    mfu = None
    row = {}
    timed_steps_this_run, timed_time_this_run = 0, 0.0  # for the mean MFU of the report
    probe_dts, eval_cost = [], 0.0  # --max-time-s: measured step and val-eval times
    probe_end = step + BUDGET_PROBE_STEPS
    refine_at = None  # set when the horizon is first fixed (only in the process that fixed it)
    if budget_pending:
        num_iterations = 10 ** 9  # provisional: warmup / constant LR until the horizon is fixed at probe_end
        if args.core_metric_every > 0 or args.sample_every > 0:
            warn0("--max-time-s budgets training and val evals only; CORE and sampling time is not counted "
                  "(set --core-metric-every -1 --sample-every -1 to stay inside the budget)")

    while True:
        last_step = step == num_iterations
        row = {"step": step}
        # -- evaluation (not timed) --
        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            train_model.eval()
            t_eval = time.time()
            val_loader = pretrain_batches(tokenizer, args.device_batch_size, args.max_seq_len, "val", device,
                                          data_dir=args.data_dir)
            with _fp8_eval_context(orig_model, use_fp8):
                val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            del val_loader
            eval_cost = time.time() - t_eval
            train_model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            row["val_bpb"] = val_bpb
            print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
            wandb_run.log({"step": step, "total_training_flops": d["flops_per_token"] * total_batch * step,
                           "total_training_time": total_training_time, "val/bpb": val_bpb})
        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            orig_model.eval()
            with _fp8_eval_context(orig_model, use_fp8):
                result = run_core(orig_model, tokenizer, device, args.core_metric_max_per_task,
                                  args.device_batch_size)
            if result is not None:
                core_result = result
                row["core_metric"] = core_result["core_metric"]
                print0(f"step {step:05d} | CORE {core_result['core_metric']:.4f} "
                       f"(over {core_result['tasks_used']}/{core_result['tasks_total']} tasks)")
                wandb_run.log({"step": step, "core_metric": core_result["core_metric"],
                               "centered_results": core_result["centered_results"]})
            orig_model.train()
        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            orig_model.eval()
            with _fp8_eval_context(orig_model, use_fp8):
                for text in sample_prompts(orig_model, tokenizer):
                    print0(f"  sample: {text!r}")
            orig_model.train()
        # -- checkpoint --
        if last_step or (step > 0 and step != resume_step and args.save_every > 0 and step % args.save_every == 0):
            meta_out = {
                "model_config": config.to_dict(),
                "user_config": vars(args),
                "device_batch_size": args.device_batch_size, "max_seq_len": args.max_seq_len,
                "total_batch_size": total_batch, "num_iterations": num_iterations, "budget_pending": budget_pending,
                "compute_dtype": str(dtype).removeprefix("torch."),
                "derived": {k: v for k, v in d.items() if k != "params"},
                # every rank's loader state (a state restored from a checkpoint is already in gathered form)
                "dataloader_state": (consumed_state if consumed_state is None or "ranks" in consumed_state
                                     else gather_state(consumed_state)),
                "loop_state": {"smooth_train_loss": smooth_loss, "min_val_bpb": _json_float(min_val_bpb),
                               "total_training_time": total_training_time},
                "rng_state": ckpt.get_rng_state(),
                "val_bpb": _json_float(val_bpb),
            }
            ckpt.save_checkpoint(ckpt_dir, step, orig_model, optimizer, meta_out, keep_last=args.keep_last)
        if last_step:
            break
        _fault_hook(step, "step")

        # -- one optimizer step --
        synchronize(device_type)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            loss = train_model(x, y)
            loss_sum += loss.detach()
            loss = loss / grad_accum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            consumed_state = next_state
            x, y, next_state = next(train_loader)  # prefetch the next batch while the GPU works
        lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step, num_iterations, args.warmdown_ratio)
        muon_wd = muon_weight_decay(step, num_iterations, d["weight_decay"])
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = muon_wd
        if scaler is not None:
            scaler.unscale_(optimizer)
            if rt.ddp:  # every rank must agree on skipping the step
                found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
                for v in found.values():
                    dist.all_reduce(v, op=dist.ReduceOp.MAX)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        train_model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum).item()  # .item() syncs
        synchronize(device_type)
        dt = time.time() - t0

        # -- --max-time-s: fix the horizon once the first steps have been timed --
        probe_dts.append(dt)
        fit = budget_pending and step + 1 >= probe_end
        refit = refine_at is not None and step + 1 == refine_at
        if fit or refit:
            window = probe_dts[1:] if fit else probe_dts[BUDGET_PROBE_STEPS:]  # without the warm-up step
            step_s = sorted(window)[len(window) // 2]  # median
            n = horizon_for_budget(args.max_time_s, time.time() - t_start, step + 1, step_s, eval_cost,
                                   args.eval_every)
            if refit:  # keep the schedule followed so far: the refit point must stay before the warmdown
                n = max(n, math.ceil(refine_at / (1 - args.warmdown_ratio)) + 1)
            num_iterations = _agree(n)
            refine_at = budget_refine_step(step + 1, num_iterations, args.warmdown_ratio) if fit else None
            budget_pending = False
            d.update(num_iterations=num_iterations, horizon="--max-time-s", total_tokens=total_batch * num_iterations,
                     total_flops=d["flops_per_token"] * total_batch * num_iterations)
            print0(f"--max-time-s {args.max_time_s:.0f}: {step_s * 1000:.1f} ms/step, val eval {eval_cost:.1f}s, "
                   f"{time.time() - t_start:.1f}s spent -> horizon {num_iterations:,} iterations"
                   + (" (refit)" if refit else f" (refit at step {refine_at})" if refine_at else ""))

        # -- GC: freeze what exists after the first step, then collect rarely (avoids ~500 ms pauses) --
        if first_step_of_process:
            gc.collect(); gc.freeze(); gc.disable()
            first_step_of_process = False
        elif (step + 1) % 5000 == 0:
            gc.collect()

        # -- logging --
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        if step > 10:  # the first steps (compile, warm-up) are not counted, as the leaderboard does
            total_training_time += dt
            timed_steps_this_run += 1
            timed_time_this_run += dt
        tok_per_sec = int(total_batch / dt)
        mfu = 100 * d["flops_per_token"] * total_batch / dt / peak_flops_world if peak_flops_world else None
        timed_steps = step - 10
        eta = (num_iterations - step - 1) * total_training_time / timed_steps if timed_steps > 0 else None
        pos = ""
        if isinstance(consumed_state, dict):
            pos = f" | epoch {consumed_state.get('epoch')} shard {consumed_state.get('file')} rg {consumed_state.get('row_group')}"
        lr_now = next(g["lr"] for g in optimizer.param_groups if g["kind"] == "muon") if any(
            g["kind"] == "muon" for g in optimizer.param_groups) else lrm
        # a --max-time-s run has no horizon until its first steps are timed: show '?' rather than the placeholder
        horizon = "?" if budget_pending else f"{num_iterations:05d} ({100 * step / num_iterations:5.2f}%)"
        eta = None if budget_pending else eta
        if timed_steps == 5 and eta is not None:
            notice = long_run_notice(device_type, num_iterations - step - 1, total_training_time / timed_steps,
                                     "pass --num-iterations or --max-time-s")
            if notice:
                warn0(notice)
        print0(f"step {step:05d}/{horizon} | loss {debiased:.6f} | "
               f"lrm {lrm:.2f} | dt {dt * 1000:.2f}ms | tok/sec {tok_per_sec:,} | mfu {format_mfu(mfu)}{pos} | "
               f"elapsed {(time.time() - t_start) / 60:.2f}m | "
               f"eta {'?' if eta is None else f'{eta / 60:.1f}m'}")
        row.update({"loss": train_loss, "smooth_loss": debiased, "lr": lr_now, "lrm": lrm, "dt": dt,
                    "tok_per_sec": tok_per_sec, "mfu": mfu, "time_s": total_training_time})
        if master:
            ckpt.append_metrics(ckpt_dir, row)
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": d["flops_per_token"] * total_batch * step,
                           "total_training_time": total_training_time, "train/loss": debiased, "train/lrm": lrm,
                           "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        step += 1

    # final row: the last evaluations only
    if master:
        ckpt.append_metrics(ckpt_dir, row)
    gc.enable()
    print0(f"peak memory: {max_memory_allocated(device_type) / 2**20:.1f} MiB")
    print0(f"total training time: {total_training_time / 60:.2f}m")
    print0(f"minimum val bpb: {min_val_bpb:.6f}" if math.isfinite(min_val_bpb) else "minimum val bpb: (not evaluated)")
    mean_mfu = mfu
    if peak_flops_world and timed_steps_this_run:
        mean_mfu = 100 * d["flops_per_token"] * total_batch * timed_steps_this_run / timed_time_this_run / peak_flops_world
    if master:
        section = {
            "model_tag": model_tag, "config": config.to_dict(), "user_config": vars(args),
            "parameters": p, "scaling_params": d["scaling_params"], "flops_per_token": d["flops_per_token"],
            "total_batch_size": total_batch, "num_iterations": num_iterations, "tokens": d["total_tokens"],
            "total_flops": d["total_flops"], "training_time_s": total_training_time, "mfu_percent": mean_mfu,
            "min_val_bpb": _json_float(min_val_bpb), "final_val_bpb": _json_float(val_bpb),
            "core_metric": core_result["core_metric"] if core_result else None,
            "device": device_name(device_type), "world_size": rt.world_size,
            "compute_dtype": str(dtype).removeprefix("torch."),
        }
        report.log_section("base-training", section)
    wandb_run.finish()
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
