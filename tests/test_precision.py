"""Precision: bf16 and fp32 against fp64 references (forward, backward, optimizer step, a few training steps),
and the compute-dtype decision with the CPU detection mocked both ways.

Stated tolerances (relative L2 error against fp64, tiny model, perturbed so every path carries signal):
  fp32: loss 1e-5, every gradient 1e-4, optimizer update 1e-4
  bf16: loss 1e-2, every gradient 6e-2 (cosine >= 0.998), optimizer update 6e-2 (Polar Express runs in bf16)
The residual scalars are the exception in bf16 (relative error up to 0.35, signs right): each one's gradient
is a sum over every activation of the residual stream in which almost everything cancels (the final RMSNorm
removes the stream's overall scale), so bf16's per-element rounding is a large fraction of what is left.
"""
import argparse

import pytest
import torch

from picochat import attention as A
from picochat import common
from picochat.stages.base_train import lr_multiplier
from picochat.gpt import GPTConfig, build_model

TINY = dict(sequence_len=64, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
DTYPES = [(torch.float32, dict(loss=1e-5, grad=1e-4, scalar_grad=1e-4, update=1e-4)),
          (torch.bfloat16, dict(loss=1e-2, grad=6e-2, scalar_grad=0.35, update=6e-2))]
RESIDUAL_SCALARS = ("resid_lambdas", "x0_lambdas", "backout_lambda")

@pytest.fixture(autouse=True)
def sdpa_only(monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", "sdpa")

def rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()

def initial_weights(perturb: bool, seed=0):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**TINY), "cpu", torch.float32)
    if perturb:  # zero-initialised projections and the off smear would leave paths without signal
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0, 0.05)
                block.mlp.c_proj.weight.normal_(0, 0.05)
            model.smear_lambda.fill_(0.5)
            model.lm_head.weight.normal_(0, 0.05)
    return {n: p.detach().clone() for n, p in model.named_parameters()}

def model_with(weights, dtype):
    model = build_model(GPTConfig(**TINY), "cpu", dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    return model

def batch(seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY["vocab_size"], (B, TINY["sequence_len"]), generator=g)
    y = torch.randint(0, TINY["vocab_size"], (B, TINY["sequence_len"]), generator=g)
    return x, y

def loss_and_grads(model, x, y):
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
def test_forward_backward_against_fp64(dtype, tol):
    weights, (x, y) = initial_weights(perturb=True), batch()
    ref_loss, ref_grads = loss_and_grads(model_with(weights, torch.float64), x, y)
    model = model_with(weights, dtype)
    loss, grads = loss_and_grads(model, x, y)
    assert rel(ref_loss, loss) < tol["loss"]
    with torch.no_grad():  # the logits too (the loss above went through the fused CPU path)
        assert rel(model_with(weights, torch.float64)(x), model(x)) < tol["grad"]
    for name, g in ref_grads.items():
        if name in RESIDUAL_SCALARS:
            assert rel(g, grads[name]) < tol["scalar_grad"], f"{name}: rel error {rel(g, grads[name]):.2e}"
            assert torch.equal(g.sign(), grads[name].double().sign()), name
            continue
        assert rel(g, grads[name]) < tol["grad"], f"{name}: rel error {rel(g, grads[name]):.2e}"
        cos = torch.nn.functional.cosine_similarity(g.double().flatten(), grads[name].double().flatten(), dim=0)
        assert cos > 0.998, f"{name}: cosine {cos:.4f}"

@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp32", "bf16"])
def test_optimizer_step_against_fp64(dtype, tol):
    """Same gradients in, the same update out: AdamW math is fp32 for every dtype; Muon orthogonalises in bf16
    when the compute dtype is bf16 (as the reference), which the tolerance covers."""
    weights, (x, y) = initial_weights(perturb=True), batch()
    _, grads = loss_and_grads(model_with(weights, torch.float64), x, y)
    updates, stored = {}, {}
    for dt in (torch.float64, dtype):
        model = model_with(weights, dt)
        for n, p in model.named_parameters():
            p.grad = grads[n].to(p.dtype)
        model.setup_optimizer().step()
        updates[dt] = {n: p.detach().double() - weights[n].double() for n, p in model.named_parameters()}
        stored[dt] = {n: p.dtype for n, p in model.named_parameters()}
    for name, u in updates[torch.float64].items():
        got = updates[dtype][name]
        if stored[dtype][name] == torch.bfloat16:
            # a bf16 embedding table: the fp32 AdamW result is rounded into it, so compare the new values
            assert rel(weights[name].double() + u, weights[name].double() + got) < 2 ** -8, name
        else:
            assert rel(u, got) < tol["update"], f"{name}: rel error {rel(u, got):.2e}"

def test_residual_scalars_have_no_gradient_signal_at_init():
    """The root cause of 'bf16 learns wrongly' (dev/LOG.md): at init every block is the identity (zero output
    projections), so the residual stream is a multiple of x0 and the final RMSNorm removes the multiple: the loss
    does not depend on the residual scalars at all. Their fp64 gradient is zero to rounding; in fp32/bf16 it is
    rounding noise, which AdamW (eps 1e-10) would turn into a full-LR step unless the LR warms up."""
    weights, (x, y) = initial_weights(perturb=False), batch()
    _, grads = loss_and_grads(model_with(weights, torch.float64), x, y)
    signal = grads["lm_head.weight"].abs().max().item()
    for name in ("resid_lambdas", "x0_lambdas", "backout_lambda"):
        assert grads[name].abs().max().item() < 1e-12 * signal, name

def train(dtype, weights, steps, warmup):
    model = model_with(weights, dtype)
    opt = model.setup_optimizer()
    base_lrs = [g["lr"] for g in opt.param_groups]
    x, y = batch(seed=1)
    losses = []
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_multiplier(step, steps, warmup, 0.0, 0.0)
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses

def test_training_steps_track_fp64():
    """Ten steps of training (base-train's LR warmup) from weights where every path carries signal: fp32 and bf16
    follow the fp64 run. A bf16 op that computed wrongly, or an update rounded away, would fail this."""
    weights = initial_weights(perturb=True)
    ref = train(torch.float64, weights, steps=10, warmup=4)
    assert ref[-1] < ref[0] - 3  # it learns (the fixed batch is memorised)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        got = train(dtype, weights, steps=10, warmup=4)
        worst = max(abs(a - b) / a for a, b in zip(ref, got))
        assert worst < tol, f"{dtype}: losses {got} vs fp64 {ref} (worst rel {worst:.2e})"

# -----------------------------------------------------------------------------
# The compute-dtype decision

@pytest.fixture
def fresh_decision(monkeypatch):
    monkeypatch.delenv("PICOCHAT_DTYPE", raising=False)
    monkeypatch.setattr(common, "_DTYPE_DECISIONS", {})
    return monkeypatch

def test_cpu_without_bf16_instructions_computes_in_fp32(fresh_decision):
    fresh_decision.setattr(common, "cpu_bf16_instructions", lambda: "")
    fresh_decision.setattr(common, "probe_bf16_matmul_speedup", lambda: pytest.fail("no probe without the ISA"))
    dtype, why = common.compute_dtype_decision("cpu")
    assert dtype == torch.float32 and "no native bf16" in why

def test_cpu_with_bf16_instructions_computes_in_bf16(fresh_decision):
    fresh_decision.setattr(common, "cpu_bf16_instructions", lambda: "avx512_bf16")
    fresh_decision.setattr(common, "probe_bf16_matmul_speedup", lambda: 3.2)
    dtype, why = common.compute_dtype_decision("cpu")
    assert dtype == torch.bfloat16 and "avx512_bf16" in why and "3.2x" in why
    assert common.compute_dtype_for("cpu") == torch.bfloat16  # decided once, cached

def test_cpu_with_bf16_flag_but_slow_kernels_stays_fp32(fresh_decision):
    fresh_decision.setattr(common, "cpu_bf16_instructions", lambda: "arm_bf16")
    fresh_decision.setattr(common, "probe_bf16_matmul_speedup", lambda: 0.9)
    dtype, why = common.compute_dtype_decision("cpu")
    assert dtype == torch.float32 and "0.90x" in why

def test_dtype_override_and_bad_override(fresh_decision):
    fresh_decision.setattr(common, "cpu_bf16_instructions", lambda: "")
    fresh_decision.setenv("PICOCHAT_DTYPE", "bfloat16")
    assert common.compute_dtype_decision("cpu") == (torch.bfloat16, "PICOCHAT_DTYPE=bfloat16")
    fresh_decision.setenv("PICOCHAT_DTYPE", "bf8")
    with pytest.raises(ValueError, match="PICOCHAT_DTYPE"):
        common.compute_dtype_decision("cpu")

def test_real_detection_and_probe_run(fresh_decision):
    """On this machine, whatever it is: the detection answers, the probe measures a positive ratio."""
    assert common.cpu_bf16_instructions() in ("", "amx_bf16", "avx512_bf16", "arm_bf16")
    assert common.probe_bf16_matmul_speedup(n=64, seconds=0.01) > 0
    dtype, why = common.compute_dtype_decision("cpu")
    assert dtype in (torch.float32, torch.bfloat16) and why

def _load_bench(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, common.Path(__file__).parents[1] / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench

def test_bench_train_step_runs_both_dtypes_side_by_side(capsys):
    """bench/bench_train_step.py at toy size: one row per (depth, dtype), bf16 compared with fp32."""
    bench = _load_bench("bench_train_step")
    assert bench.main(["--depths", "1", "--seq-len", "32", "--batch-size", "2", "--vocab-size", "256",
                       "--steps", "1", "--dtypes", "float32", "bfloat16", "--warmup-steps", "2", "--peak-size", "128"]) == 0
    out = capsys.readouterr().out
    result = common.json.loads(out.strip().splitlines()[-1])
    rows = {r["dtype"]: r for r in result["results"]}
    assert set(rows) == {"float32", "bfloat16"} and rows["float32"]["speedup_vs_fp32"] == "1.00x"
    assert set(result["peak_flops"]) == {"float32", "bfloat16"}  # both peaks, each row's MFU against its own
    for r in rows.values():
        assert r["peak_flops"] == result["peak_flops"][r["dtype"]]
    assert all(r["tok_per_s"] > 0 and r["mfu"] > 0 and len(r["losses"]) == 2 for r in rows.values())
    assert rows["float32"]["losses"][0] == pytest.approx(rows["bfloat16"]["losses"][0], rel=1e-2)  # same init

def test_bf16_step_runs_every_matmul_in_bf16():
    """On a CPU with native bf16 a matmul left in fp32 runs 3-4x slower than the rest of a bf16 step, so a bf16
    training step (forward, backward through the fused loss, optimizer) must multiply only bf16 matrices, and the
    same count of matmul FLOPs as the fp32 step. The census itself must see an fp32 matmul when there is one."""
    prof = _load_bench("profile_train_step")
    args = argparse.Namespace(vocab_size=300, head_dim=16, seq_len=32, window_pattern="L", warmup_steps=2)
    x = torch.randint(0, 300, (2, 32))
    y = torch.randint(0, 300, (2, 32))
    bf16 = prof.census_of_step(1, torch.bfloat16, args, x, y)
    fp32 = prof.census_of_step(1, torch.float32, args, x, y)
    assert fp32.share("float32") == 1.0
    assert bf16.share("bfloat16") == 1.0, dict(bf16.matmul_flops)
    assert sum(bf16.flops_by_dtype().values()) == sum(fp32.flops_by_dtype().values()) > 0
    assert "bfloat16->float32" not in fp32.cast_bytes and "float32->bfloat16" not in fp32.cast_bytes
    with prof.DtypeCensus() as census:  # the census can fail: an fp32 product inside a bf16 computation
        torch.mm(torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(8, 2, dtype=torch.bfloat16))
        torch.ones(4, 8, dtype=torch.bfloat16).float() @ torch.ones(8, 2)
    assert census.share("bfloat16") == 0.5 and census.cast_bytes["bfloat16->float32"] == 4 * 8 * 4

def test_profile_bench_prints_census_and_profile(capsys):
    """bench/profile_train_step.py at toy size: the census and the profiler table for both dtypes."""
    prof = _load_bench("profile_train_step")
    assert prof.main(["--depth", "1", "--seq-len", "32", "--batch-size", "2", "--vocab-size", "256",
                      "--head-dim", "16", "--steps", "1", "--top", "5", "--warmup-steps", "2"]) == 0
    out = capsys.readouterr().out
    result = common.json.loads(out.strip().splitlines()[-1])
    assert set(result["census"]) == set(result["profile"]) == {"float32", "bfloat16"}
    assert result["census"]["bfloat16"]["matmul_flops"] == {"bfloat16": result["census"]["float32"]["matmul_flops"]["float32"]}
    assert any(op.startswith("aten::mm") for op in result["profile"]["bfloat16"])
    assert "self CPU time per step" in out and "dtype census" in out
