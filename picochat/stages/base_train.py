r"""
Pretrain a GPT on the pretraining shards. Every hyperparameter follows from --depth.

Examples:
    # CPU demo (minutes): a d4 model at sequence 512
    picochat base-train --depth 4 --max-seq-len 512 --device-batch-size 8 --total-batch-size 16384 \
        --num-iterations 200 --eval-every 50 --eval-tokens 65536 --core-metric-every 0 --sample-every 100
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
import argparse

import torch

from picochat import __version__
from picochat.common import (HelpFormatter, compute_init, compute_cleanup, print0, warn0, synchronize,
                             get_peak_flops, measure_cpu_matmul_peak, device_name, format_mfu, init_wandb,
                             max_memory_allocated, barrier, process_start_time, long_run_notice, positive_int)
from picochat import checkpoint as ckpt, fp8, report
from picochat.gpt import GPT, build_model, config_from_depth
from picochat.engine import sample_prompts
from picochat.core_eval import evaluate_core, load_core_tasks
from picochat.tokenizer import get_tokenizer, get_token_bytes
from picochat.dataloader import pretrain_batches
from picochat.loss_eval import evaluate_bpb
from picochat.run_record import RunRecord
from picochat.train_loop import (BUDGET_PROBE_STEPS, Horizon, add_nonfinite_flag, add_resume_flag,
                                 check_same_on_all_ranks, due, evaluating, fault_hook, gather_loader_states,
                                 loss_is_finite, nonfinite_stop, optimizer_step, rank_loader_state, resume_step,
                                 restore, set_schedule)

B_REF = 2 ** 19          # reference total batch size (tokens) at the d12 reference
REF_DEPTH = 12           # all hyperparameter transfer is relative to d12
BATCH_EXPONENT = 0.383   # Power Lines: B_opt ~ D^0.383


def build_parser():
    p = argparse.ArgumentParser(prog="picochat base-train", description="Pretrain a base model.", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    a("--device-type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42, help="seed of the weights' init and every RNG")
    a("--fp8", action="store_true", help="FP8 training (CUDA only; ignored with a warning elsewhere)")
    a("--fp8-recipe", default="tensorwise", choices=["tensorwise"],
      help="fp8 scaling recipe (tensorwise: one scale per tensor; the only one implemented)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on for CUDA, off elsewhere)")
    # model
    a("--depth", type=positive_int, default=20, help="transformer layers: the one dial every other size follows from")
    a("--aspect-ratio", type=positive_int, default=64,
      help="model width = depth x aspect ratio, rounded up to a multiple of --head-dim")
    a("--head-dim", type=positive_int, default=128, help="attention head width")
    a("--max-seq-len", type=positive_int, default=2048, help="tokens per training row (the model's context)")
    a("--window-pattern", default="SSSL",
      help='per-layer attention windows, repeated over the depth: S = short (a quarter of the context), L = long '
           '(all); the last layer is always L')
    # horizon (precedence: num-iterations > target-flops > target-param-data-ratio)
    a("--num-iterations", type=int, default=-1,
      help='optimizer steps (-1: from --target-flops or --target-param-data-ratio)')
    a("--max-time-s", type=float, default=-1.0,
      help="wall-clock budget of the whole command (start-up, evals and the final save included): the horizon is "
           f"set after the first {BUDGET_PROBE_STEPS} steps from their measured speed, refit once before the "
           f"warmdown, and shortened if the machine slows down later (overrides the other horizons)")
    a("--expect-steps", type=int, default=0,
      help="with --max-time-s: the steps the budget gives on a quiet machine of the kind you expect (a recipe "
           "states it); a horizon under half of it is announced as a slow or busy machine, at the start and in "
           "the report. 0 = no expectation")
    a("--target-flops", type=float, default=-1.0, help='training FLOPs budget that sets the horizon (-1: off)')
    a("--target-param-data-ratio", type=float, default=12.0,
      help='training tokens per scaling parameter that sets the horizon (-1: off)')
    # batch
    a("--device-batch-size", type=positive_int, default=32, help="rows per forward/backward pass")
    a("--total-batch-size", type=int, default=-1, help="tokens per optimizer step; -1 = auto from depth")
    # optimization
    a("--embedding-lr", type=float, default=0.3,
      help='AdamW LR of the token embedding at the d12 batch (scaled by sqrt(B/B_ref))')
    a("--unembedding-lr", type=float, default=0.008,
      help='AdamW LR of the lm_head at the d12 batch (scaled by sqrt(B/B_ref))')
    a("--weight-decay", type=float, default=0.28,
      help='Muon weight decay at d12 (rescaled with batch and data, cosine-decayed to 0)')
    a("--matrix-lr", type=float, default=0.02,
      help='Muon LR of the block matrices at the d12 batch (scaled by sqrt(B/B_ref))')
    a("--scalar-lr", type=float, default=0.5, help='AdamW LR of the per-layer scalars at the d12 batch')
    a("--warmup-steps", type=int, default=40, help='linear LR warmup steps')
    a("--warmdown-ratio", type=float, default=0.65,
      help='fraction of the run over which the LR decays linearly at the end')
    a("--final-lr-frac", type=float, default=0.05, help='LR at the end, as a fraction of the peak')
    # evaluation / output
    a("--eval-every", type=int, default=250,
      help="val bpb (also before step 0): every N steps and at the end; -1 = only at the end; 0 = never")
    a("--eval-tokens", type=int, default=80 * 524288, help='validation tokens per val-bpb evaluation')
    a("--core-metric-every", type=int, default=2000,
      help="CORE: every N steps and at the end; -1 = only at the end; 0 = never")
    a("--core-metric-max-per-task", type=int, default=500, help='CORE items per task during training (-1: all)')
    a("--sample-every", type=int, default=2000,
      help="greedy samples: every N steps and at the end; -1 = only at the end; 0 = never")
    a("--save-every", type=int, default=-1, help="checkpoints: every N steps; the final one is always saved")
    a("--keep-last", type=int, default=None, help="keep only the newest N checkpoints (default: keep all)")
    a("--model-tag", default=None, help="checkpoint directory name (default d<depth>)")
    a("--data-dir", default=None, help="directory of parquet shards (default $PICOCHAT_HOME/data/climbmix)")
    a("--split-docs", action="store_true",
      help="cut documents longer than a row into BOS-first row-sized pieces instead of cropping their tails "
           "(the reference crops). Use at short --max-seq-len (the CPU demo), where cropping would discard most "
           "of each document. Validation keeps the reference's packing, so val bpb stays comparable")
    add_resume_flag(p)
    add_nonfinite_flag(p)
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

def _json_float(x):
    return None if x is None or not math.isfinite(x) else x


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
    if args.warmup_steps < 1 and args.resume is None:
        # zero-initialised output projections make every block the identity at step 0, so the loss does not
        # depend on the residual scalars and their gradient is rounding noise; AdamW's first step at full LR
        # moves them by a whole LR unit in that noise's direction (in bf16 this flipped the residual stream's
        # sign and the loss rose above uniform: dev/LOG.md). A few warmup steps keep that step small.
        warn0("--warmup-steps 0 from scratch: the first AdamW step moves the residual scalars by a full LR in a "
              "random direction (their gradient is pure rounding noise at init). Use at least a few warmup steps.")

    tokenizer = get_tokenizer()
    check_same_on_all_ranks(tokenizer.fingerprint(), "tokenizer", device)
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
    horizon = Horizon(num_iterations, args.max_time_s, t_start, warmdown_ratio=args.warmdown_ratio,
                      eval_every=max(args.eval_every, 0))
    start_step = resume_step(args.resume, ckpt_dir, master)
    record = None
    if start_step is not None:
        record = RunRecord.from_meta(ckpt.read_meta(ckpt_dir, start_step), f"{ckpt_dir} step {start_step}")
        if args.max_time_s > 0 and record.num_iterations > 0:
            horizon.fixed(record.num_iterations)  # a budgeted run continues to the horizon it chose
        if not horizon.pending and start_step >= horizon.steps:
            print0(f"{ckpt_dir} already holds the final checkpoint (step {start_step} of {horizon.steps}): "
                   "nothing to do")
            compute_cleanup()
            return 0
        restore(ckpt_dir, start_step, model, optimizer, device, rt.world_size, rt.rank, master)
        horizon.probe_end = start_step + BUDGET_PROBE_STEPS
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
                    if horizon.pending else f"{horizon.steps:,} iterations (from {d['horizon']})"),
        ("tokens", f"{d['total_tokens']:,} (tokens:params {d['total_tokens'] / d['scaling_params']:.2f})"),
        ("total FLOPs", f"{d['total_flops']:.4e}"),
        ("peak FLOP/s", "unknown" if peak_flops is None else f"{peak_flops:.4e}" + (" (measured fp32 matmul)" if device_type == "cpu" else "")),
        ("compile / fp8", f"{use_compile} / {use_fp8}"),
        ("checkpoints", f"{ckpt_dir}" + (f" (resuming at step {start_step})" if start_step is not None else "")),
    ])

    # ---- data ----
    loader_state = rank_loader_state(record.loader, rt.rank, rt.world_size) if record else None
    train_loader = pretrain_batches(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                                    data_dir=args.data_dir, resume_state=loader_state, split_docs=args.split_docs)
    consumed_state = loader_state  # the state right after the last batch TRAINED on (what a resume needs)
    x, y, next_state = next(train_loader)  # prefetch
    eval_steps = max(1, args.eval_tokens // d["tokens_per_fwdbwd"])

    # ---- loop state ----
    loop = {"smooth_train_loss": 0.0, "min_val_bpb": None, "total_training_time": 0.0, "val_bpb": None,
            "skipped_steps": 0, **(record.loop if record else {})}
    step = start_step or 0
    core_result = None
    first_step_of_process = True
    peak_flops_world = peak_flops * rt.world_size if peak_flops else None
    mfu = None
    row = {}
    timed_steps_this_run, timed_time_this_run = 0, 0.0  # for the mean MFU of the report
    if horizon.pending and (args.core_metric_every != 0 or args.sample_every != 0):
        warn0("--max-time-s budgets training and val evals only; CORE and sampling time is not counted "
              "(set --core-metric-every 0 --sample-every 0 to stay inside the budget)")

    while True:
        last_step = step == horizon.steps
        row = {"step": step}
        # -- evaluation (not timed) --
        if due(step, args.eval_every, last_step, at_start=True):
            t_eval = time.time()
            val_loader = pretrain_batches(tokenizer, args.device_batch_size, args.max_seq_len, "val", device,
                                          data_dir=args.data_dir)
            with evaluating(orig_model, use_fp8):
                val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            del val_loader
            horizon.eval_cost = time.time() - t_eval
            loop["val_bpb"] = val_bpb
            loop["min_val_bpb"] = val_bpb if loop["min_val_bpb"] is None else min(loop["min_val_bpb"], val_bpb)
            row["val_bpb"] = val_bpb
            print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
            wandb_run.log({"step": step, "total_training_flops": d["flops_per_token"] * total_batch * step,
                           "total_training_time": loop["total_training_time"], "val/bpb": val_bpb})
        if due(step, args.core_metric_every, last_step):
            with evaluating(orig_model, use_fp8):
                result = run_core(orig_model, tokenizer, device, args.core_metric_max_per_task,
                                  args.device_batch_size)
            if result is not None:
                core_result = result
                row["core_metric"] = core_result["core_metric"]
                print0(f"step {step:05d} | CORE {core_result['core_metric']:.4f} "
                       f"(over {core_result['tasks_used']}/{core_result['tasks_total']} tasks)")
                wandb_run.log({"step": step, "core_metric": core_result["core_metric"],
                               "centered_results": core_result["centered_results"]})
        if master and due(step, args.sample_every, last_step):
            with evaluating(orig_model, use_fp8):
                for text in sample_prompts(orig_model, tokenizer):
                    print0(f"  sample: {text!r}")
        # -- checkpoint --
        if last_step or (step != start_step and due(step, args.save_every, False)):
            record = RunRecord(
                stage="base", model_tag=model_tag, compute_dtype=str(dtype).removeprefix("torch."),
                max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size, total_batch_size=total_batch,
                lrs={"embedding": args.embedding_lr, "unembedding": args.unembedding_lr, "matrix": args.matrix_lr,
                     "scalar": args.scalar_lr},
                num_iterations=-1 if horizon.pending else horizon.steps, user_config=vars(args),
                derived={k: v for k, v in d.items() if k != "params"},
                loop={k: _json_float(v) if isinstance(v, float) else v for k, v in loop.items()},
                loader=gather_loader_states(consumed_state))
            ckpt.save_checkpoint(ckpt_dir, step, orig_model, optimizer,
                                 {"model_config": config.to_dict(), "run": record.to_dict(),
                                  "rng_state": ckpt.get_rng_state()}, keep_last=args.keep_last)
        if last_step:
            break
        fault_hook(step)

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
        n_sched = horizon.schedule_steps
        lrm = lr_multiplier(step, n_sched, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(optimizer, lrm, momentum=muon_momentum(step, n_sched, args.warmdown_ratio),
                     muon_weight_decay=muon_weight_decay(step, n_sched, d["weight_decay"]))
        if args.skip_nonfinite and not loss_is_finite(loss_sum):  # checked before the step: one more sync
            loop["skipped_steps"] += 1
            warn0(f"step {step}: NaN/inf loss, optimizer step dropped (--skip-nonfinite; {loop['skipped_steps']} so far)")
        else:
            optimizer_step(optimizer, scaler)
        train_model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum).item()  # .item() syncs
        if not args.skip_nonfinite and not loss_is_finite(loss_sum):
            raise nonfinite_stop(step, ckpt_dir)  # the weights are spoiled, the checkpoints on disk are not
        synchronize(device_type)
        dt = time.time() - t0

        # -- --max-time-s: fix the horizon once the first steps have been timed (refit it once, shorten it if the
        # machine slows down) --
        was_pending = horizon.pending
        message = horizon.observe(step + 1, dt, time.time())
        if message:
            print0(message)
            if 0 < horizon.steps < 0.5 * args.expect_steps and "slow_machine" not in loop:
                loop["slow_machine"] = (f"SLOW OR BUSY MACHINE: the {args.max_time_s:g}s budget fits only "
                                        f"{horizon.steps:,} steps, {100 * horizon.steps / args.expect_steps:.1f}% of "
                                        f"the {args.expect_steps:,} a quiet machine gives (--expect-steps): expect a "
                                        "clearly weaker model. Stop other heavy programs, or raise --max-time-s")
                warn0(loop["slow_machine"])
            d.update(num_iterations=horizon.steps, horizon="--max-time-s" if was_pending else d["horizon"],
                     total_tokens=total_batch * horizon.steps,
                     total_flops=d["flops_per_token"] * total_batch * horizon.steps)

        # -- GC: freeze what exists after the first step, then collect rarely (avoids ~500 ms pauses) --
        if first_step_of_process:
            gc.collect(); gc.freeze(); gc.disable()
            first_step_of_process = False
        elif (step + 1) % 5000 == 0:
            gc.collect()

        # -- logging --
        loop["smooth_train_loss"] = 0.9 * loop["smooth_train_loss"] + 0.1 * train_loss
        debiased = loop["smooth_train_loss"] / (1 - 0.9 ** (step + 1))
        if step > 10:  # the first steps (compile, warm-up) are not counted, as the leaderboard does
            loop["total_training_time"] += dt
            timed_steps_this_run += 1
            timed_time_this_run += dt
        tok_per_sec = int(total_batch / dt)
        mfu = 100 * d["flops_per_token"] * total_batch / dt / peak_flops_world if peak_flops_world else None
        timed_steps = step - 10
        eta = (horizon.schedule_steps - step - 1) * loop["total_training_time"] / timed_steps if timed_steps > 0 else None
        pos = ""
        if isinstance(consumed_state, dict):
            pos = f" | epoch {consumed_state.get('epoch')} shard {consumed_state.get('file')} rg {consumed_state.get('row_group')}"
        lr_now = next(g["lr"] for g in optimizer.param_groups if g["kind"] == "muon") if any(
            g["kind"] == "muon" for g in optimizer.param_groups) else lrm
        # a --max-time-s run has no horizon until its first steps are timed: show '?' rather than the placeholder
        of = "?" if horizon.pending else f"{horizon.steps:05d} ({100 * step / horizon.steps:5.2f}%)"
        eta = None if horizon.pending else eta
        if timed_steps == 5 and eta is not None:
            notice = long_run_notice(device_type, horizon.steps - step - 1, loop["total_training_time"] / timed_steps,
                                     "pass --num-iterations or --max-time-s")
            if notice:
                warn0(notice)
        print0(f"step {step:05d}/{of} | loss {debiased:.6f} | "
               f"lrm {lrm:.2f} | dt {dt * 1000:.2f}ms | tok/sec {tok_per_sec:,} | mfu {format_mfu(mfu)}{pos} | "
               f"elapsed {(time.time() - t_start) / 60:.2f}m | "
               f"eta {'?' if eta is None else f'{eta / 60:.1f}m'}")
        row.update({"loss": train_loss, "smooth_loss": debiased, "lr": lr_now, "lrm": lrm, "dt": dt,
                    "tok_per_sec": tok_per_sec, "mfu": mfu, "time_s": loop["total_training_time"]})
        if master:
            ckpt.append_metrics(ckpt_dir, row)
        if step % 100 == 0:
            wandb_run.log({"step": step, "total_training_flops": d["flops_per_token"] * total_batch * step,
                           "total_training_time": loop["total_training_time"], "train/loss": debiased, "train/lrm": lrm,
                           "train/dt": dt, "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        step += 1

    # final row: the last evaluations only
    if master:
        ckpt.append_metrics(ckpt_dir, row)
    gc.enable()
    print0(f"peak memory: {max_memory_allocated(device_type) / 2**20:.1f} MiB")
    print0(f"total training time: {loop['total_training_time'] / 60:.2f}m")
    print0(f"minimum val bpb: {loop['min_val_bpb']:.6f}" if loop["min_val_bpb"] is not None
           else "minimum val bpb: (not evaluated)")
    mean_mfu = mfu
    if peak_flops_world and timed_steps_this_run:
        mean_mfu = 100 * d["flops_per_token"] * total_batch * timed_steps_this_run / timed_time_this_run / peak_flops_world
    if master:
        section = {
            "model_tag": model_tag, "config": config.to_dict(), "user_config": vars(args),
            "parameters": p, "scaling_params": d["scaling_params"], "flops_per_token": d["flops_per_token"],
            "total_batch_size": total_batch, "num_iterations": horizon.steps, "tokens": d["total_tokens"],
            "total_flops": d["total_flops"], "training_time_s": loop["total_training_time"], "mfu_percent": mean_mfu,
            "min_val_bpb": _json_float(loop["min_val_bpb"]), "final_val_bpb": _json_float(loop["val_bpb"]),
            "core_metric": core_result["core_metric"] if core_result else None,
            "device": device_name(device_type), "world_size": rt.world_size,
            "compute_dtype": str(dtype).removeprefix("torch."),
        }
        if args.max_time_s > 0 and start_step is None:  # how the budget went (a resumed run's clock restarted)
            wall = time.time() - t_start
            section["budget"] = {"max_time_s": args.max_time_s, "wall_time_s": round(wall, 1),
                                 "off_budget_percent": round(100 * (wall - args.max_time_s) / args.max_time_s, 1),
                                 "steps": horizon.steps, "expected_steps": args.expect_steps or None,
                                 "warning": loop.get("slow_machine")}
            if abs(wall - args.max_time_s) > 0.05 * args.max_time_s:
                section["budget"]["warning"] = ((loop.get("slow_machine") or "") + f" The run took {wall:.0f}s for "
                                                f"a {args.max_time_s:g}s budget ({section['budget']['off_budget_percent']:+.1f}%).").strip()
                warn0(section["budget"]["warning"])
        report.log_section("base-training", section)
    wandb_run.finish()
    compute_cleanup()
    return 0
