"""fp8: tensorwise scaling math, round-trip error bounds, the layer filter, conversion/restore, and the
Float8Linear matmul against an fp32 emulation of the same quantization (torch._scaled_mm has a CPU kernel in
recent torch; where it does not, those tests skip)."""
import pytest
import torch
import torch.nn as nn

from picochat import fp8 as F8
from picochat.gpt import GPTConfig, build_model, Linear

def test_fp8_constants():
    assert F8.E4M3_MAX == 448.0 and F8.E5M2_MAX == 57344.0

def test_tensorwise_scale():
    x = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    assert F8.tensorwise_scale(x, 448.0).item() == pytest.approx(224.0)
    s = F8.tensorwise_scale(torch.zeros(3, 3), 448.0)  # amax clamped at 1e-12: finite, no div by zero
    assert s.dtype == torch.float32 and torch.isfinite(s) and s.item() == pytest.approx(448e12, rel=1e-6)

@pytest.mark.parametrize("dtype,mant_bits,min_sub_exp", [(F8.E4M3, 3, -9), (F8.E5M2, 2, -16)])
def test_quantize_round_trip_error_bound(dtype, mant_bits, min_sub_exp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 256)  # a wide dynamic range
    q, inv = F8.quantize(x, dtype)
    assert q.dtype == dtype
    fmax = torch.finfo(dtype).max
    assert q.float().abs().max().item() == fmax  # the amax element lands exactly on the format's max
    err = (F8.dequantize(q, inv) - x).abs()
    # round-to-nearest: half an ulp relative (2^-(m+1)) for normals, half the subnormal step absolute
    bound = torch.maximum(x.abs() * 2.0 ** -(mant_bits + 1), inv * 2.0 ** (min_sub_exp - 1)) * (1 + 1e-6)
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0  # it really quantized

def test_fp8_eligible_filter():
    assert F8.fp8_eligible(nn.Linear(128, 512))
    assert F8.fp8_eligible(Linear(384, 384))
    assert not F8.fp8_eligible(nn.Linear(12, 6))      # VE gate
    assert not F8.fp8_eligible(nn.Linear(24, 1))      # smear gate
    assert not F8.fp8_eligible(nn.Linear(64, 128))    # min dim < 128
    assert not F8.fp8_eligible(nn.Linear(136, 200))   # 200 % 16 != 0

def test_resolve_fp8_cpu_ignored_with_warning(monkeypatch):
    msgs = []
    monkeypatch.setattr(F8, "warn0", msgs.append)
    assert F8.resolve_fp8(False, "cpu") is False and msgs == []
    assert F8.resolve_fp8(True, "cpu") is False
    assert len(msgs) == 1 and "ignored" in msgs[0]

def tiny_model():
    torch.manual_seed(0)
    m = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=128),
                    "cpu", torch.float32)
    with torch.no_grad():
        for b in m.transformer.h:
            b.attn.c_proj.weight.normal_(0, 0.05)
    return m

def test_convert_and_disable_share_weights():
    m = tiny_model()
    idx = torch.randint(0, 300, (2, 16))
    ref = m(idx)
    w_q = m.transformer.h[0].attn.c_q.weight
    n = F8.convert_to_float8_training(m)
    # per layer q,k,v,o,fc,proj (6 x 2 layers) + lm_head (320 x 128); VE gates and smear gate stay
    assert n == 13
    a = m.transformer.h[0].attn
    assert isinstance(a.c_q, F8.Float8Linear) and a.c_q.weight is w_q
    assert not isinstance(a.ve_gate, F8.Float8Linear) and not isinstance(m.smear_gate, F8.Float8Linear)
    assert isinstance(m.lm_head, F8.Float8Linear)
    with F8.disable_fp8(m):
        assert not any(isinstance(x, F8.Float8Linear) for x in m.modules())
        assert m.transformer.h[0].attn.c_q.weight is w_q
        torch.testing.assert_close(m(idx), ref)  # plain Linear again: identical outputs
    assert isinstance(m.transformer.h[0].attn.c_q, F8.Float8Linear)
    assert F8.convert_to_float8_training(m) == 0  # idempotent

def _scaled_mm_works():
    try:
        a = torch.ones(16, 16).to(F8.E4M3)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.float32)
        return True
    except Exception:
        return False

needs_scaled_mm = pytest.mark.skipif(not _scaled_mm_works(), reason="torch._scaled_mm has no kernel on this device")

@needs_scaled_mm
def test_float8_linear_matches_fp32_emulation():
    """Forward and both gradients equal an fp32 emulation (quantize -> dequantize -> matmul) of the same recipe."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 128, generator=g, requires_grad=True)
    lin = nn.Linear(128, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 128, generator=g) * 0.05)
    f = F8.Float8Linear.from_linear(lin)
    y = f(x)
    go = torch.randn(y.shape, generator=g)
    y.backward(go)
    # emulation
    x2 = x.detach().reshape(-1, 128)
    xq = F8.dequantize(*F8.quantize(x2, F8.E4M3))
    wq = F8.dequantize(*F8.quantize(lin.weight.detach(), F8.E4M3))
    goq = F8.dequantize(*F8.quantize(go.reshape(-1, 256), F8.E5M2))
    torch.testing.assert_close(y.detach().reshape(-1, 256), xq @ wq.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.reshape(-1, 128), goq @ wq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lin.weight.grad, goq.t() @ xq, rtol=1e-4, atol=1e-4)
    # and close to the exact fp32 matmul (fp8 error level)
    exact = x2 @ lin.weight.detach().t()
    assert (y.detach().reshape(-1, 256) - exact).norm() / exact.norm() < 0.1

@pytest.mark.skipif(not F8.fp8_supported("cuda"), reason="fp8 training needs a CUDA GPU with SM90+; CPU-only here")
def test_fp8_training_step_close_to_bf16_on_cuda():
    torch.manual_seed(0)
    m = build_model(GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256),
                    "cuda", torch.bfloat16)
    idx = torch.randint(0, 512, (4, 128), device="cuda")
    ref = m(idx, idx)
    ref.backward()
    g_ref = m.transformer.h[0].mlp.c_proj.weight.grad.clone()
    m.zero_grad()
    F8.convert_to_float8_training(m)
    loss = m(idx, idx)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())
    g = m.transformer.h[0].mlp.c_proj.weight.grad
    assert (g - g_ref).norm() / g_ref.norm() < 0.2
