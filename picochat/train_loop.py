"""
The pieces every training stage (base-train, chat-sft, chat-rl) shares, as plain functions: what --resume means,
the stale-checkpoint rule, restoring a checkpoint for exact resume, one loader-state format, evaluation and
checkpoint cadence, the schedule written into the optimizer, the optimizer step (fp16 GradScaler included), and
fault injection for the kill-and-resume tests. Each stage keeps its own loop body (what a step computes differs:
packed pretraining rows, masked conversations, sampled rollouts); these are the parts that must not differ.

Cadence flags (--eval-every, --save-every, --core-metric-every, --sample-every, --chatcore-every) mean the same
in every stage: N > 0 = every N steps and at the end of training; -1 = only at the end; 0 = never.
"""
import os
import math
import signal
import argparse
import contextlib

import torch
import torch.distributed as dist

from picochat import checkpoint as ckpt, fp8
from picochat.common import all_gather_json, all_reduce, dist_active, print0

# -----------------------------------------------------------------------------
# --resume

def resume_arg(value: str):
    """argparse type of --resume: 'auto' or a step number."""
    if value == "auto":
        return value
    try:
        step = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a step number, got {value!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a step number >= 0, got {step}")
    return step


def add_resume_flag(parser):
    parser.add_argument("--resume", type=resume_arg, default=None,
                        help="'auto' = continue from the last complete checkpoint of this run (start fresh if there "
                             "is none), or a step number (that checkpoint must exist); default: start fresh")


def resume_step(resume, ckpt_dir, master=True):
    """The step to resume from (None = start fresh, with empty metrics), with the rule every stage shares: a fresh
    run refuses to write into a directory that already holds another run's complete checkpoints (a later
    --resume auto would pick those stale, higher-step ones up)."""
    if master:
        ckpt.remove_stray_temp_files(ckpt_dir)
    if resume == "auto":  # the newest checkpoint whose every file verifies; corrupt newer ones are skipped loudly
        step = ckpt.find_last_good_step(ckpt_dir, optimizer=True)
        print0("--resume auto: " + (f"resuming from step {step}" if step is not None else
                                     f"no complete checkpoint in {ckpt_dir}, starting fresh"))
        if step is not None:
            return step
    existing = [s for s in ckpt.list_steps(ckpt_dir) if ckpt.is_complete(ckpt_dir, s)]
    if resume not in (None, "auto"):
        if resume not in existing:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint at step {resume} in {ckpt_dir} "
                                    f"(complete steps: {existing})")
        ckpt.verify_checkpoint(ckpt_dir, resume, optimizer=True)
        return resume
    if existing:
        raise ValueError(f"{ckpt_dir} already holds checkpoints of an earlier run (steps {existing}). Pass "
                         "--resume auto to continue it, choose another --model-tag, or delete that directory to "
                         "start over.")
    if master:
        ckpt.truncate_metrics(ckpt_dir, 0)
    return None


def restore(ckpt_dir, step, model, optimizer, device, world_size, rank, master):
    """Load everything exact resume needs from the step-`step` checkpoint: weights, this rank's optimizer
    shard, the RNG states; drop the metrics rows the resumed run will write again. -> the meta."""
    state, meta = ckpt.load_state(ckpt_dir, step, device, verify=False)  # resume_step verified every file
    ckpt.check_resume_compat(meta, model.config.to_dict(), world_size)
    ckpt.check_state_shapes(model, state, ckpt_dir)
    model.load_state_dict(state, strict=True)
    del state
    optimizer.load_shard_state_dict(ckpt.load_optimizer_state(ckpt_dir, step, rank))
    ckpt.set_rng_state(meta["rng_state"])
    if master:
        ckpt.truncate_metrics(ckpt_dir, step)
    return meta


# -----------------------------------------------------------------------------
# Loader state: one format in every checkpoint, {"world_size": W, "ranks": [rank 0's state, rank 1's, ...]}

def gather_loader_states(state):
    """Every rank's loader state (any JSON value), in the checkpoint format. Collective: all ranks call it.
    The states travel as JSON bytes in tensors, not pickled objects."""
    ranks = all_gather_json(state)
    return {"world_size": len(ranks), "ranks": ranks}


def rank_loader_state(saved, rank, world_size):
    """This rank's loader state from a checkpoint (None when the checkpoint has none)."""
    if saved is None:
        return None
    if saved.get("world_size") != world_size or len(saved.get("ranks", ())) != world_size:
        raise ValueError(f"the checkpoint's loader state is for {saved.get('world_size')} ranks, this run has "
                         f"{world_size}: exact resume needs the same world size (the optimizer shards do too)")
    return saved["ranks"][rank]

def check_same_on_all_ranks(digest: str, what: str, device):
    """Fail on every rank when the ranks disagree on a hex digest (say the tokenizer's: nodes that each trained or
    downloaded their own would otherwise train one model on different token ids)."""
    value = int(digest[:15], 16)
    t = all_reduce(torch.tensor([value, -value], dtype=torch.int64, device=device), dist.ReduceOp.MAX)
    if int(t[0]) != value or -int(t[1]) != value:
        raise ValueError(f"the ranks have different {what}s (this one: {digest[:12]}): give every node the same "
                         f"{what} (a shared PICOCHAT_HOME, or copy node 0's)")

# -----------------------------------------------------------------------------
# Cadence, evaluation, schedule, step

@contextlib.contextmanager
def evaluating(model, fp8_active=False):
    """Eval mode for the duration, and with fp8 training plain Linear shells instead of the Float8 layers (no VRAM
    spike); training mode again afterwards."""
    model.eval()
    try:
        with fp8.disable_fp8(model) if fp8_active else contextlib.nullcontext():
            yield
    finally:
        model.train()


def due(step, every, last, at_start=False):
    """Whether a periodic action runs at `step`: every N > 0 steps (step 0 only with at_start) and at the end;
    -1 = only at the end; 0 = never."""
    if every == 0:
        return False
    if last:
        return True
    return every > 0 and step % every == 0 and (step > 0 or at_start)


def set_schedule(optimizer, lrm, momentum=None, muon_weight_decay=None):
    """Write this step's LR multiplier (and Muon momentum / weight decay when given) into the param groups."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            if momentum is not None:
                group["momentum"] = momentum
            if muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay


def optimizer_step(optimizer, scaler=None):
    """One optimizer step. With an fp16 GradScaler the gradients are unscaled first and the step is skipped on
    EVERY rank when any rank saw an inf/NaN gradient (each rank only sees its own gradients before the
    optimizer's collectives, so they must agree), and the scale backs off. -> whether the step was taken."""
    if scaler is None:
        optimizer.step()
        return True
    scaler.unscale_(optimizer)
    finite = [torch.isfinite(p.grad).all() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    bad = (~torch.stack(finite).all()).float() if finite else torch.zeros(())
    if all_reduce(bad, dist.ReduceOp.MAX).item() > 0:
        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
        return False
    scaler.step(optimizer)
    scaler.update()
    return True

class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss and stopped before saving anything from it."""
    exit_code = 3  # `picochat` prints the message as one line and exits with this (2 is for usage mistakes)


def add_nonfinite_flag(parser):
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="drop an optimizer step whose loss is NaN/inf and go on (default: stop the run)")


def loss_is_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one rank's NaN must stop or skip them all). Syncs."""
    return bool(all_reduce(torch.isfinite(loss.detach()).float(), dist.ReduceOp.MIN).item())


def nonfinite_stop(step, ckpt_dir) -> NonFiniteLoss:
    return NonFiniteLoss(f"step {step}: the training loss is NaN or inf, so the run stopped without saving it; the "
                         f"checkpoints in {ckpt_dir} are the last good ones. Lower the learning rates (or raise the "
                         "warmup) and continue with --resume auto, or pass --skip-nonfinite to drop such steps")

# -----------------------------------------------------------------------------
# Fault injection (the kill-and-resume tests)

def fault_hook(step):
    """PICOCHAT_FAULT_SIGKILL=<step> SIGKILLs this process just before training step <step>. (Mid-save kills:
    checkpoint.save_checkpoint.)"""
    if os.environ.get("PICOCHAT_FAULT_SIGKILL") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)

# -----------------------------------------------------------------------------
# The horizon: a fixed number of steps, or one set by a wall-clock budget

BUDGET_PROBE_STEPS = 10  # --max-time-s: steps timed before the horizon is fixed


def horizon_for_budget(budget_s, elapsed_s, step, step_s, eval_s, eval_every):
    """Iterations that fit the wall-clock budget: the steps done so far plus as many more as the time left
    allows, counting the periodic val evals (and the final one) at their measured cost. 2% is kept in reserve
    for the final save and noise."""
    left = 0.98 * budget_s - elapsed_s - eval_s  # the final evaluation always runs
    per_step = step_s + (eval_s / eval_every if eval_every > 0 else 0.0)
    return step + max(1, int(left / per_step))


def budget_refine_step(probe_end, n, warmdown_ratio):
    """A budgeted horizon is re-measured once, later and over a longer window: the first steps run slower
    (allocator warm-up, the loader filling its buffer on the same cores: ~20% on 2 CPU cores) and would leave
    that much of the budget unused. The refit must land before the warmdown starts, where the LR multiplier does
    not depend on the horizon yet, so the schedule already followed stays the schedule of the final horizon.
    Returns the step to refit at, or None when the run is too short for one."""
    at = probe_end + max(2 * BUDGET_PROBE_STEPS, n // 10)
    return at if at < (1 - warmdown_ratio) * n else None


def _agree_min(n: int) -> int:
    """Every rank must use the same horizon (their clocks differ): the smallest one."""
    if dist_active():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        n = int(all_reduce(torch.tensor([n], dtype=torch.int64, device=device), dist.ReduceOp.MIN).item())
    return n


BUDGET_RECHECK = 0.05   # --max-time-s: after the refit, the horizon is re-checked every 5% of the run


class Horizon:
    """How many optimizer steps the run takes. Either known from the start (`steps`), or, with a wall-clock
    budget (`budget_s` > 0, counted from `t_start`), fixed after the first BUDGET_PROBE_STEPS steps from their
    measured speed and refit once before the warmdown. Until it is fixed, `steps` is None and `schedule_steps`
    is a placeholder so large that the schedule stays in its warmup/constant phase.
    After the refit the horizon is re-checked every BUDGET_RECHECK of the run against the speed of the recent
    steps, because a machine can slow down mid-run (a busy neighbour on a shared box made the CPU demo's steps
    265 -> 400-650 ms after the refit, and its 1200 s run took 1844 s). A re-check may only SHORTEN the run:
    the warmdown's LR multiplier at a given step falls as the horizon shrinks, so the LR stays non-increasing; a
    faster machine just ends a little under budget."""

    def __init__(self, steps, budget_s=-1.0, t_start=0.0, start_step=0, warmdown_ratio=0.0, eval_every=0):
        self.steps = None if budget_s > 0 else steps
        self.budget_s, self.t_start = budget_s, t_start
        self.warmdown_ratio, self.eval_every = warmdown_ratio, eval_every
        self.probe_end = start_step + BUDGET_PROBE_STEPS
        self.refine_at = None
        self.recheck_at = None
        self.step_times, self.eval_cost = [], 0.0

    @property
    def pending(self) -> bool:
        return self.steps is None

    @property
    def schedule_steps(self) -> int:
        return 10 ** 9 if self.steps is None else self.steps

    def fixed(self, steps):
        """A resumed budgeted run continues to the horizon it had already chosen."""
        self.steps = steps

    def observe(self, steps_done, dt, now):
        """Record one step's time (steps_done = steps completed so far). Returns a message when the horizon was
        just fixed or refit, else None."""
        self.step_times.append(dt)
        fit = self.pending and steps_done >= self.probe_end
        refit = self.refine_at is not None and steps_done == self.refine_at
        if not (fit or refit):
            return self._recheck(steps_done, now)
        window = self.step_times[1:] if fit else self.step_times[BUDGET_PROBE_STEPS:]  # without the warm-up step
        step_s = sorted(window)[len(window) // 2]  # median
        n = horizon_for_budget(self.budget_s, now - self.t_start, steps_done, step_s, self.eval_cost, self.eval_every)
        if refit:  # keep the schedule followed so far: the refit point must stay before the warmdown
            n = max(n, math.ceil(self.refine_at / (1 - self.warmdown_ratio)) + 1)
        self.steps = _agree_min(int(n))
        self.refine_at = budget_refine_step(steps_done, self.steps, self.warmdown_ratio) if fit else None
        self._schedule_recheck(steps_done if self.refine_at is None else self.refine_at)
        return (f"--max-time-s {self.budget_s:.0f}: {step_s * 1000:.1f} ms/step, val eval {self.eval_cost:.1f}s, "
                f"{now - self.t_start:.1f}s spent -> horizon {self.steps:,} iterations"
                + (" (refit)" if refit else f" (refit at step {self.refine_at})" if self.refine_at else ""))

    @property
    def _recheck_every(self) -> int:
        """Steps between re-checks, also the window of recent steps each one times."""
        return max(BUDGET_PROBE_STEPS, round(BUDGET_RECHECK * self.steps))

    def _schedule_recheck(self, after):
        every = self._recheck_every
        self.recheck_at = after + every if after + every < self.steps else None

    def _recheck(self, steps_done, now):
        if self.recheck_at is None or steps_done < self.recheck_at:
            return None
        recent = self.step_times[-self._recheck_every:]
        step_s = sorted(recent)[len(recent) // 2]
        n = horizon_for_budget(self.budget_s, now - self.t_start, steps_done, step_s, self.eval_cost, self.eval_every)
        old = self.steps
        self.steps = _agree_min(min(old, int(n)))
        self._schedule_recheck(steps_done)
        if self.steps >= old:
            return None
        return (f"--max-time-s {self.budget_s:.0f}: the machine slowed to {step_s * 1000:.1f} ms/step, "
                f"{now - self.t_start:.1f}s spent -> horizon shortened from {old:,} to {self.steps:,} iterations")
