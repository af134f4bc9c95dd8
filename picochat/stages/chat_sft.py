r"""
Supervised finetuning: turn a base checkpoint into a chat model.

* Loads checkpoints/base/<tag>; sequence length, device batch size and total batch size are inherited from
  its meta, and the embedding / unembedding / matrix LRs from its user_config (the raw CLI values: the
  base run's batch-size LR scaling is not re-applied), unless given here. --load-optimizer 1 also loads the
  base optimizer shard (momenta / Adam moments); then every LR is multiplied by --init-lr-frac.
* Data: a TaskMixture from --mixture (default: SmolTalk, MMLU x3, GSM8K x4, identity x2, SimpleSpelling,
  SpellingBee), rendered with the tokenizer's chat template and packed best-fit into rows of T+1 tokens:
  whole conversations only (a conversation longer than the row is truncated to it and counted), the rest
  of a row is BOS padding with no loss. Loss only on supervised (assistant) tokens.
* NaN guard (a mean over zero supervised tokens is 0/0): the loss is a SUM over supervised tokens divided by
  the count over the whole optimizer step (all micro-batches, all ranks). A micro-batch with zero supervised
  tokens adds exactly nothing; a step with zero supervised tokens anywhere is skipped. Both are counted in
  the log.
* Schedules by progress p (= conversations consumed / epoch size, or step / --num-iterations):
  LR constant until 1 - warmdown, then linear to --final-lr-frac; Muon momentum 0.85 -> 0.95 over 300 steps.
* val bpb (--eval-every), ChatCORE (--chatcore-every), checkpoints in checkpoints/sft/<tag> with the
  loader state, so --resume auto continues exactly where the last checkpoint left off.

Examples:
    picochat chat-sft
    picochat chat-sft --mixture "smoltalk,mmlu:3,gsm8k:4" --num-iterations 500 --eval-every 100
    picochat chat-sft --device-type cpu --device-batch-size 2 --max-seq-len 256 --total-batch-size 1024 \
        --num-iterations 20 --mixture "gsm8k@200,identity" --chatcore-every 0
    torchrun --nproc_per_node=8 -m picochat chat-sft --resume auto
"""
import gc
import math
import time
import argparse

import torch
import torch.distributed as dist

from picochat import checkpoint, report, sandbox
from picochat.common import (HelpFormatter, all_reduce, compute_init, fill_sized_defaults, compute_cleanup, print0, init_wandb, logger,
                             synchronize, max_memory_allocated, long_run_notice)
from picochat.engine import Engine
from picochat.loss_eval import evaluate_bpb
from picochat.tasks import (build_mixture, composition, composition_text, DEFAULT_SFT_MIXTURE, DEFAULT_VAL_MIXTURE,
                            HumanEval)
from picochat.task_eval import ALL_TASKS, evaluate_tasks, chatcore
from picochat.run_record import RunRecord
from picochat.train_loop import (add_nonfinite_flag, add_resume_flag, due, evaluating, fault_hook,
                                 gather_loader_states, nonfinite_stop, optimizer_step, rank_loader_state,
                                 resume_step, restore, set_schedule)

# -----------------------------------------------------------------------------
# Best-fit packing loader with exact resume

class SFTLoader:
    """Rows of T+1 tokens packed from whole conversations; yields (inputs, targets) int64 (B, T).

    Rank r reads conversations r, r+W, r+2W, ... (wrapping around, counting epochs) into a buffer;
    each row takes the longest buffered conversation that still fits, until none fits, then BOS padding.
    state() is JSON: the read cursor, epoch, consumed count and the buffered indices (re-rendered on
    resume: rendering is deterministic), so a resumed loader yields exactly the batches that follow."""

    def __init__(self, dataset, tokenizer, B, T, device, rank=0, world=1, buffer_size=100, state=None):
        assert len(dataset) > 0, "the SFT dataset is empty"
        self.dataset, self.tokenizer = dataset, tokenizer
        self.B, self.T, self.device = B, T, device
        self.rank, self.world, self.buffer_size = rank, world, buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch, self.consumed = rank % len(dataset), 1, 0
        self.truncated, self.empty_rows = 0, 0
        self.buffer = []   # (dataset index, ids, mask)
        if state is not None:
            self.cursor, self.epoch, self.consumed = state["cursor"], state["epoch"], state["consumed"]
            self.buffer = [self._render(i) for i in state["buffer"]]
            self.truncated = state.get("truncated", 0)   # after re-rendering, which would count them again

    def _render(self, idx):
        ids, mask = self.tokenizer.render_conversation(self.dataset[idx], max_tokens=1 << 62)
        if len(ids) > self.T + 1:   # cannot fit any row whole: keep its first T+1 tokens
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
            self.truncated += 1
        return idx, ids, mask

    def _refill(self):
        n = len(self.dataset)
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._render(self.cursor))
            self.cursor += self.world
            if self.cursor >= n:
                self.cursor %= n
                self.epoch += 1

    def state(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed,
                "truncated": self.truncated, "buffer": [i for i, _, _ in self.buffer]}

    def next_batch(self):
        cap = self.T + 1
        rows, masks = [], []
        for _ in range(self.B):
            row, rmask = [], []
            while True:
                self._refill()
                room = cap - len(row)
                best = -1
                for j, (_, ids, _) in enumerate(self.buffer):
                    if len(ids) <= room and (best < 0 or len(ids) > len(self.buffer[best][1])):
                        best = j
                if best < 0:
                    break
                _, ids, mask = self.buffer.pop(best)
                row += ids
                rmask += mask
                self.consumed += self.world
            pad = cap - len(row)
            row += [self.bos] * pad
            rmask += [0] * pad
            rows.append(row)
            masks.append(rmask)
        t = torch.tensor(rows, dtype=torch.long)
        m = torch.tensor(masks, dtype=torch.long)
        inputs = t[:, :-1]
        targets = torch.where(m[:, 1:] == 1, t[:, 1:], torch.full_like(t[:, 1:], -1))
        self.empty_rows += int(((targets >= 0).sum(dim=1) == 0).sum())
        pin = self.device.type == "cuda"   # pinned memory only with CUDA (elsewhere it only costs)
        if pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=pin), targets.to(self.device, non_blocking=pin)

    def __iter__(self):
        while True:
            x, y = self.next_batch()
            yield x, y

# -----------------------------------------------------------------------------
# One optimizer step's worth of gradients, NaN-safe

def accumulate_gradients(model, micro_batches, world_size=1, scaler=None):
    """Backward of sum(CE over supervised tokens) / (supervised tokens in the whole step, all ranks).
    The optimizer averages grads over ranks, so the local loss is scaled by world_size.
    -> (mean loss per supervised token (float, all-reduced), total supervised tokens, empty micro-batches).
    With zero supervised tokens nothing is backpropagated and the caller must skip the optimizer step."""
    device = micro_batches[0][1].device
    counts = torch.stack([(y >= 0).sum() for _, y in micro_batches]).to(torch.long)
    total = all_reduce(counts.sum().clone())
    n_total = int(total.item())
    empty = int((counts == 0).sum().item())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    if n_total == 0:
        return 0.0, 0, empty
    for (x, y), n in zip(micro_batches, counts.tolist()):
        if n == 0:
            continue   # contributes nothing; an absent grad counts as zero in the optimizer's collectives
        loss = model(x, y, loss_reduction="sum")
        scaled = loss * (world_size / n_total)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().double()
    loss_sum = all_reduce(loss_sum)
    return float(loss_sum.item()) / n_total, n_total, empty

# -----------------------------------------------------------------------------
# Schedules

def lr_multiplier(progress, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0):
    if warmup_ratio > 0 and progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = min(1.0, (progress - (1.0 - warmdown_ratio)) / max(warmdown_ratio, 1e-8))
    return (1.0 - decay) * 1.0 + decay * final_lr_frac

def muon_momentum(step):
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95

# -----------------------------------------------------------------------------

# (CUDA, CPU/MPS) defaults: the GPU recipe's evaluation sizes take hours on a CPU (40 x 524,288 val tokens alone
# is ~20M tokens of forward passes), so CPU and MPS evaluate on small fixed subsets instead
SIZED = dict(eval_tokens=(40 * 524288, 65536), chatcore_max_cat=(-1, 100), chatcore_max_sample=(24, 8),
             chatcore_max_new_tokens=(512, 128))

def parse_args(argv):
    p = argparse.ArgumentParser(prog="picochat chat-sft", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--model-tag", type=str, default=None, help="base (and output) tag, default: largest base model")
    p.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: last)")
    p.add_argument("--load-optimizer", type=int, default=1, help="1 = start from the base optimizer state")
    p.add_argument("--mixture", type=str, default=None,
                   help="training mixture: name[@first-N-rows][=share][:max-epochs],... where shares are fractions of "
                        "the mixture's rows (all items or none; none = the reference's proportions: its full dataset "
                        "sizes x epochs). A source smaller than its share needs shrinks the whole mixture, never "
                        "the others' shares. Default: " + DEFAULT_SFT_MIXTURE)
    p.add_argument("--mmlu-epochs", type=int, default=3, help="MMLU repeats in the default mixture")
    p.add_argument("--gsm8k-epochs", type=int, default=4, help="GSM8K repeats in the default mixture")
    p.add_argument("--val-mixture", type=str, default=None,
                   help="validation mixture spec (default: smoltalk,mmlu@5200,gsm8k@420)")
    p.add_argument("--num-iterations", type=int, default=-1, help="-1 = one epoch of the mixture")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens per row (default: the base run's)")
    p.add_argument("--device-batch-size", type=int, default=None,
                   help="rows per forward/backward pass (default: the base run's)")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step (default: the base run's)")
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="AdamW LR of the embedding (default: the base run's)")
    p.add_argument("--unembedding-lr", type=float, default=None,
                   help="AdamW LR of the lm_head (default: the base run's)")
    p.add_argument("--matrix-lr", type=float, default=None, help="Muon LR (default: the base run's)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help='every LR is multiplied by this')
    p.add_argument("--warmup-ratio", type=float, default=0.0, help='fraction of the run with a linear LR warmup')
    p.add_argument("--warmdown-ratio", type=float, default=0.5,
                   help='fraction of the run over which the LR decays linearly to --final-lr-frac')
    p.add_argument("--final-lr-frac", type=float, default=0.0, help='LR at the end, as a fraction of the start')
    p.add_argument("--eval-every", type=int, default=200,
                   help="val bpb (also before step 0): every N steps and at the end; -1 = only at the end; 0 = never")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"val tokens per eval (default: {SIZED['eval_tokens'][0]:,} on CUDA, {SIZED['eval_tokens'][1]:,} on CPU/MPS)")
    p.add_argument("--chatcore-every", type=int, default=200,
                   help="ChatCORE: every N steps and at the end; -1 = only at the end; 0 = never")
    p.add_argument("--chatcore-max-cat", type=int, default=None,
                   help="categorical problems per task, -1 = all (default: all on CUDA, "
                        f"{SIZED['chatcore_max_cat'][1]} on CPU/MPS)")
    p.add_argument("--chatcore-max-sample", type=int, default=None,
                   help=f"generative problems per task (default: {SIZED['chatcore_max_sample'][0]} on CUDA, "
                        f"{SIZED['chatcore_max_sample'][1]} on CPU/MPS)")
    p.add_argument("--chatcore-max-new-tokens", type=int, default=None,
                   help=f"tokens per generative answer (default: {SIZED['chatcore_max_new_tokens'][0]} on CUDA, "
                        f"{SIZED['chatcore_max_new_tokens'][1]} on CPU/MPS)")
    p.add_argument("--save-every", type=int, default=-1,
                   help="checkpoints: every N steps; the final one is always saved")
    p.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints (default: keep all)")
    add_resume_flag(p)
    add_nonfinite_flag(p)
    p.add_argument("--log-every", type=int, default=1, help='print and log the loss every N steps')
    p.add_argument("--compile", type=int, default=1, help="torch.compile the training model (CUDA only)")
    sandbox.add_unsafe_flag(p)
    args = p.parse_args(argv)
    # ChatCORE runs HumanEval's model-written programs: say (or refuse) how, before any expensive work
    args.sandbox_mode = sandbox.mode_for_cli(p, args.unsafe_sandbox, log=print0) if args.chatcore_every else None
    return args

def main(argv=None):
    args = parse_args(argv)
    rt = compute_init(args.device_type)
    device, master = rt.device, rt.master
    for line in fill_sized_defaults(args, rt.device_type, SIZED):
        print0(line)
    wandb_run = init_wandb("picochat-sft", args.run, vars(args), master)

    # --- model and inherited hyperparameters
    model, tokenizer, base_meta = checkpoint.load_model("base", device, phase="train", model_tag=args.model_tag,
                                                        step=args.model_step)
    tag, base_step = base_meta["model_tag"], base_meta["step"]
    # the base run's sequence length, batch sizes and (raw, unscaled) LRs, unless given here
    base_run = RunRecord.from_meta(base_meta, f"base checkpoint {tag} step {base_step}")
    T = args.max_seq_len or base_run.max_seq_len
    B = args.device_batch_size or base_run.device_batch_size
    total_batch = args.total_batch_size or base_run.total_batch_size
    emb_lr = args.embedding_lr if args.embedding_lr is not None else base_run.lrs["embedding"]
    unemb_lr = args.unembedding_lr if args.unembedding_lr is not None else base_run.lrs["unembedding"]
    mat_lr = args.matrix_lr if args.matrix_lr is not None else base_run.lrs["matrix"]
    if T > model.config.sequence_len:
        raise ValueError(f"--max-seq-len {T} exceeds the model's sequence_len {model.config.sequence_len}")
    world_tokens = B * T * rt.world_size
    if total_batch % world_tokens:
        raise ValueError(f"total batch {total_batch} tokens is not a multiple of device_batch_size*max_seq_len*"
                         f"world_size = {B}*{T}*{rt.world_size} = {world_tokens}; pass --total-batch-size or "
                         f"--device-batch-size so that it divides")
    grad_accum = total_batch // world_tokens
    print0(f"SFT from base {tag} step {base_step}: T={T} B={B} total_batch={total_batch} grad_accum={grad_accum} "
           f"lr(emb={emb_lr}, unemb={unemb_lr}, matrix={mat_lr}) x {args.init_lr_frac}")

    optimizer = model.setup_optimizer(unembedding_lr=unemb_lr, embedding_lr=emb_lr, matrix_lr=mat_lr, weight_decay=0.0)
    if args.load_optimizer and base_step is not None:
        try:
            optimizer.load_shard_state_dict(checkpoint.load_optimizer_state(
                checkpoint.checkpoint_dir("base", tag), base_step, rt.rank))
            print0("loaded the base optimizer state")
        except (FileNotFoundError, ValueError) as e:
            logger.warning(f"could not load the base optimizer state ({e}); starting the optimizer fresh")
    for group in optimizer.param_groups:   # fresh LRs (the state load keeps ours), times init_lr_frac
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    # --- data
    mixture = args.mixture or (DEFAULT_SFT_MIXTURE.replace("mmlu:3", f"mmlu:{args.mmlu_epochs}")
                                                  .replace("gsm8k:4", f"gsm8k:{args.gsm8k_epochs}"))
    train_ds = build_mixture(mixture, "train")
    val_ds = build_mixture(args.val_mixture or DEFAULT_VAL_MIXTURE, "test")
    # what the model will actually see, per task: a source smaller than planned shrinks every share with it
    mix_rows = composition(train_ds, tokenizer) if master else []
    print0(f"train mixture ({mixture}): {len(train_ds):,} conversations, shares of rows kept as specified; "
           f"tokens estimated from a sample\n{composition_text(mix_rows)}\nval mixture: {len(val_ds):,}")

    # --- resume
    out_dir = checkpoint.checkpoint_dir("sft", tag)
    loop = {"min_val_bpb": None, "val_bpb": None, "chatcore": {}, "smooth_loss": 0.0, "ema_steps": 0,
            "train_time": 0.0, "skipped_steps": 0, "empty_micro_batches": 0}
    start_step = resume_step(args.resume, out_dir, master)
    loader_state = None
    if start_step is not None:
        run = RunRecord.from_meta(restore(out_dir, start_step, model, optimizer, device, rt.world_size, rt.rank, master),
                                  f"{out_dir} step {start_step}")
        loader_state = rank_loader_state(run.loader, rt.rank, rt.world_size)
        loop.update(run.loop)
    step = start_step or 0

    loader = SFTLoader(train_ds, tokenizer, B, T, device, rt.rank, rt.world_size, state=loader_state)
    # rows have a fixed (B, T) shape, so one compiled graph serves every step; the uncompiled `model` is kept
    # for ChatCORE (KV-cache decoding) and saving
    train_model = torch.compile(model, dynamic=False) if (args.compile and rt.device_type == "cuda") else model
    scaler = torch.amp.GradScaler(rt.device_type) if rt.dtype == torch.float16 else None
    token_bytes = None
    if args.eval_every != 0:
        token_bytes = tokenizer.token_bytes().to(device)  # the checkpoint's own tokenizer
    eval_steps = max(1, args.eval_tokens // (B * T * rt.world_size))
    num_iterations = args.num_iterations

    def progress_of(step_):
        if num_iterations > 0:
            return min(step_ / num_iterations, 1.0)
        return min(loader.consumed / len(train_ds), 1.0)

    def is_last(step_):
        last = (num_iterations > 0 and step_ >= num_iterations) or \
               (num_iterations <= 0 and loader.consumed >= len(train_ds))
        return bool(all_reduce(torch.tensor(int(last), device=device), dist.ReduceOp.MAX).item())

    eval_task_cache = {"HumanEval": HumanEval(sandbox_mode=args.sandbox_mode)} if args.sandbox_mode else {}
    last_step = is_last(step)
    while True:
        # --- evaluation (orig model, eval mode)
        if due(step, args.eval_every, last_step, at_start=True):
            with evaluating(model):
                val_loader = SFTLoader(val_ds, tokenizer, B, T, device, rt.rank, rt.world_size)
                val_bpb = loop["val_bpb"] = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            loop["min_val_bpb"] = val_bpb if loop["min_val_bpb"] is None else min(loop["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
            if master:
                checkpoint.append_metrics(out_dir, {"step": step, "val_bpb": val_bpb})
        if due(step, args.chatcore_every, last_step):
            with evaluating(model):
                chatcore_results = loop["chatcore"] = evaluate_tasks(
                    model, tokenizer, Engine(model, tokenizer), ALL_TASKS, batch_size=B, tasks=eval_task_cache,
                    max_new_tokens=args.chatcore_max_new_tokens, temperature=0.0,
                    max_cat=None if args.chatcore_max_cat < 0 else args.chatcore_max_cat,
                    max_gen=args.chatcore_max_sample)
            core = chatcore(chatcore_results)
            cat = sum((chatcore_results[t] - 0.25) / 0.75 for t in ("ARC-Easy", "ARC-Challenge", "MMLU")) / 3
            print0(f"step {step:05d} | ChatCORE {core:.4f} | ChatCORE_cat {cat:.4f}")
            row = {"step": step, "chatcore_metric": core, "chatcore_cat": cat,
                   **{f"chatcore/{k}": v for k, v in chatcore_results.items()}}
            wandb_run.log(row)
            if master:
                checkpoint.append_metrics(out_dir, row)
        # --- checkpoint
        if last_step or (step != start_step and due(step, args.save_every, False)):
            run = RunRecord(stage="sft", model_tag=tag, compute_dtype=str(rt.dtype).removeprefix("torch."),
                            max_seq_len=T, device_batch_size=B, total_batch_size=total_batch,
                            lrs={"embedding": emb_lr, "unembedding": unemb_lr, "matrix": mat_lr},
                            num_iterations=num_iterations, parent={"source": "base", "model_tag": tag, "step": base_step},
                            user_config=vars(args), loop=loop, loader=gather_loader_states(loader.state()))
            checkpoint.save_checkpoint(out_dir, step, model, optimizer,
                                       {"model_config": model.config.to_dict(), "run": run.to_dict(),
                                        "rng_state": checkpoint.get_rng_state()}, keep_last=args.keep_last)
            print0(f"saved checkpoint {out_dir} step {step}")
        if last_step:
            break
        fault_hook(step)

        # --- one optimizer step
        synchronize(rt.device_type)
        t0 = time.time()
        micro = [loader.next_batch() for _ in range(grad_accum)]
        train_loss, n_tokens, empty = accumulate_gradients(train_model, micro, rt.world_size, scaler)
        loop["empty_micro_batches"] += empty
        progress = progress_of(step)
        lrm = lr_multiplier(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_schedule(optimizer, lrm, momentum=muon_momentum(step))
        if n_tokens > 0 and not math.isfinite(train_loss):  # all-reduced: every rank sees the same value
            if not args.skip_nonfinite:
                raise nonfinite_stop(step, out_dir)  # nothing of this step was applied or saved
            loop["skipped_steps"] += 1
            logger.warning(f"step {step}: NaN/inf loss, optimizer step dropped (--skip-nonfinite)")
        elif n_tokens > 0:
            optimizer_step(optimizer, scaler)
        else:
            loop["skipped_steps"] += 1
            logger.warning(f"step {step}: no supervised tokens in the whole batch; optimizer step skipped")
        model.zero_grad(set_to_none=True)
        synchronize(rt.device_type)
        dt = time.time() - t0
        step += 1
        if step > 10:
            loop["train_time"] += dt
        if step == 5 and master:  # say early when one epoch (the default horizon) will take hours
            steps_total = num_iterations if num_iterations > 0 else step / max(progress_of(step), 1e-9)
            notice = long_run_notice(rt.device_type, steps_total - step, dt, "pass --num-iterations")
            if notice:
                logger.warning(notice)
        if n_tokens > 0:
            loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * train_loss   # EMA, debiased below
            loop["ema_steps"] += 1
        debiased = loop["smooth_loss"] / max(1e-12, 1 - 0.9 ** loop["ema_steps"])
        if step % max(1, args.log_every) == 0:
            print0(f"step {step:05d} ({100 * progress_of(step):.1f}%) | loss {train_loss:.4f} (ema {debiased:.4f}) | "
                   f"lrm {lrm:.3f} | sup tokens {n_tokens} | empty micro {loop['empty_micro_batches']} | "
                   f"skipped {loop['skipped_steps']} | epoch {loader.epoch} | dt {dt * 1000:.0f}ms | "
                   f"tok/s {total_batch / max(dt, 1e-9):,.0f}")
            # "step" as in every stage's metrics: the updates done before this one (the loss is measured before it),
            # so a resume from checkpoint s rewrites exactly the rows with step >= s
            row = {"step": step - 1, "train_loss": train_loss, "lrm": lrm, "supervised_tokens": n_tokens,
                   "empty_micro_batches": loop["empty_micro_batches"], "skipped_steps": loop["skipped_steps"],
                   "truncated_conversations": loader.truncated, "dt": dt, "progress": progress_of(step)}
            wandb_run.log(row)
            if master:
                checkpoint.append_metrics(out_dir, row)
        if step == 1:
            # the cyclic GC would pause the loop at random steps, and nothing in the loop builds cycles
            gc.collect(); gc.freeze(); gc.disable()
        last_step = is_last(step)

    gc.enable()
    gc.unfreeze()
    print0(f"peak memory {max_memory_allocated(rt.device_type) / 1024**2:.1f} MiB | min val bpb "
           f"{loop['min_val_bpb']} | training time {loop['train_time']:.1f}s")
    if master:
        report.log_section("chat-sft", {"config": vars(args), "model_tag": tag, "base_model_tag": tag, "base_step": base_step,
                                        "iterations": step, "world_size": rt.world_size, "max_seq_len": T,
                                        "device_batch_size": B, "total_batch_size": total_batch,
                                        "min_val_bpb": loop["min_val_bpb"], "final_val_bpb": loop["val_bpb"],
                                        "skipped_steps": loop["skipped_steps"],
                                        "empty_micro_batches": loop["empty_micro_batches"],
                                        "truncated_conversations": loader.truncated,
                                        "chatcore": loop["chatcore"], "training_time_s": loop["train_time"],
                                        "mixture": mixture, "mixture_composition": mix_rows})
    wandb_run.finish()
    compute_cleanup()
    return 0
