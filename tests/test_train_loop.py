"""train_loop: the rules every training stage shares (cadence, --resume, the stale-checkpoint rule), the fp16
GradScaler step on CPU, and the wall-clock horizon."""
import argparse

import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.optim import MuonAdamW
from picochat.train_loop import Horizon, due, optimizer_step, resume_arg, resume_step, BUDGET_PROBE_STEPS


def test_cadence_flags_mean_the_same_everywhere():
    steps = range(0, 11)
    assert [s for s in steps if due(s, 4, s == 10)] == [4, 8, 10]                    # every 4 and at the end
    assert [s for s in steps if due(s, 4, s == 10, at_start=True)] == [0, 4, 8, 10]  # evals also before training
    assert [s for s in steps if due(s, -1, s == 10, at_start=True)] == [10]           # only at the end
    assert [s for s in steps if due(s, 0, s == 10, at_start=True)] == []              # never


def test_resume_flag_values():
    assert resume_arg("auto") == "auto" and resume_arg("12") == 12
    for bad in ("banana", "-3", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            resume_arg(bad)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))


def test_resume_step_and_the_stale_checkpoint_rule(tmp_path):
    d = tmp_path / "run"
    assert resume_step(None, d) is None and resume_step("auto", d) is None   # nothing there: fresh
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 3"):
        resume_step(3, d)
    m = _Tiny()
    opt = MuonAdamW([dict(kind="adamw", params=[m.w], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)])
    for step in (2, 4):
        ckpt.save_checkpoint(d, step, m, opt, {"model_config": {"n_layer": 1}})
    assert resume_step("auto", d) == 4 and resume_step(2, d) == 2
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run"):
        resume_step(None, d)  # a fresh run never mixes with another run's checkpoints


def test_fp16_grad_scaler_step_on_cpu():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 8)
    # a finite step: the gradient is unscaled before the update (same result as the plain step)
    q = torch.nn.Parameter(p.detach().clone())
    ref = MuonAdamW([dict(kind="adamw", params=[q], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)])
    scaler.scale((p * x).sum()).backward()
    (q * x).sum().backward()
    assert optimizer_step(opt, scaler) and optimizer_step(ref)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
    # an inf gradient: the step is skipped, the weights are untouched, the scale backs off
    before, scale = p.detach().clone(), scaler.get_scale()
    opt.zero_grad(set_to_none=True)
    scaler.scale((p * torch.full_like(x, float("inf"))).sum()).backward()
    assert not optimizer_step(opt, scaler)
    assert torch.equal(p.detach(), before) and scaler.get_scale() == scale * scaler.get_backoff_factor()
    # and training goes on afterwards
    opt.zero_grad(set_to_none=True)
    scaler.scale((p * x).sum()).backward()
    assert optimizer_step(opt, scaler) and not torch.equal(p.detach(), before)


def test_horizon_fixed_or_by_budget():
    fixed = Horizon(100)
    assert not fixed.pending and fixed.steps == fixed.schedule_steps == 100
    assert fixed.observe(1, 0.5, now=1.0) is None and fixed.steps == 100
    budget = Horizon(100, budget_s=60.0, t_start=0.0, warmdown_ratio=0.5, eval_every=0)
    assert budget.pending and budget.schedule_steps == 10 ** 9  # warmup/constant LR until it is known
    message = None
    for s in range(1, BUDGET_PROBE_STEPS + 1):
        message = budget.observe(s, 0.1, now=5.0 + s * 0.1)
    assert not budget.pending and message and "horizon" in message
    # 60 s budget, 6 s spent, 0.1 s/step: about (0.98 * 60 - 6) / 0.1 more steps
    assert abs(budget.steps - (BUDGET_PROBE_STEPS + int((0.98 * 60 - 6.0) / 0.1))) <= 1
    resumed = Horizon(100, budget_s=60.0)
    resumed.fixed(321)  # a resumed budgeted run keeps the horizon it chose
    assert not resumed.pending and resumed.steps == 321


def _simulate_budget_run(budget_s, step_time):
    """Steps timed by step_time(step) against a Horizon with a wall-clock budget: (seconds used, LR multipliers)."""
    from picochat.stages.base_train import lr_multiplier
    h = Horizon(-1, budget_s=budget_s, t_start=0.0, warmdown_ratio=0.65, eval_every=0)
    now, step, lrms = 1.0, 0, []   # 1 s of start-up
    while h.pending or step < h.steps:
        lrms.append(lr_multiplier(step, h.schedule_steps, 10, 0.65, 0.05))
        dt = step_time(step)
        now += dt
        step += 1
        h.observe(step, dt, now)
    return now, lrms


def test_budget_holds_when_the_machine_slows_down_mid_run():
    """A busy neighbour makes every step 60% slower after the refit: re-checks shorten the horizon, so the run still
    ends within its budget, and the LR never goes up after the warmup. Without the re-checks this run overshot."""
    budget = 300.0
    used, lrms = _simulate_budget_run(budget, lambda s: 0.1 if s < 400 else 0.16)
    assert 0.93 * budget <= used <= budget, used
    after_warmup = lrms[10:]
    assert all(b <= a + 1e-12 for a, b in zip(after_warmup, after_warmup[1:]))
    steady, _ = _simulate_budget_run(budget, lambda s: 0.1)
    assert 0.95 * budget <= steady <= budget
    # a machine that gets FASTER is never made to run longer than the horizon it chose: it ends a bit early
    faster, lrms = _simulate_budget_run(budget, lambda s: 0.1 if s < 400 else 0.08)
    assert faster <= budget and all(b <= a + 1e-12 for a, b in zip(lrms[10:], lrms[11:]))


def test_run_record_round_trip_and_clear_errors():
    from picochat.run_record import RunRecord
    run = RunRecord(stage="base", model_tag="d2", compute_dtype="float32", max_seq_len=64, device_batch_size=2,
                    total_batch_size=256, lrs={"matrix": 0.02}, num_iterations=8)
    assert RunRecord.from_meta({"run": run.to_dict()}) == run
    with pytest.raises(ValueError, match="no run record"):
        RunRecord.from_meta({"model_config": {}})
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        RunRecord.from_meta({"run": {**run.to_dict(), "extra": 1}})
