"""Attention backends against a textbook masked softmax in fp64 (windows, GQA, KV-cache prefill/decode)."""
import math

import pytest
import torch

from picochat import attention as A

def naive(q, k, v, window, scale=None):
    """Queries are the last Tq of Tk positions; query at absolute position p sees keys p-window .. p."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    scale = 1 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    out = torch.empty_like(q)
    for i in range(Tq):
        p = Tk - Tq + i
        lo = max(0, p - window)
        s = torch.einsum("bhd,bkhd->bhk", q[:, i], k[:, lo:p + 1]) * scale
        out[:, i] = torch.einsum("bhk,bkhd->bhd", s.softmax(-1), v[:, lo:p + 1])
    return out

@pytest.fixture(autouse=True)
def sdpa_only(monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", "sdpa")

def qkv(B=2, T=40, H=4, Hkv=2, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g, dtype=dtype), torch.randn(B, T, Hkv, D, generator=g, dtype=dtype),
            torch.randn(B, T, Hkv, D, generator=g, dtype=dtype))

@pytest.mark.parametrize("window", [0, 1, 7, 16, 39, 40, 10_000])
def test_training_path_matches_naive_fp64(window):
    q, k, v = qkv()
    y = A.attention(q, k, v, window)
    assert y.shape == q.shape
    torch.testing.assert_close(y, naive(q, k, v, window), rtol=1e-10, atol=1e-10)

def test_scale_argument():
    q, k, v = qkv(H=2, Hkv=2)
    torch.testing.assert_close(A.attention(q, k, v, 5, scale=0.37), naive(q, k, v, 5, scale=0.37), rtol=1e-10, atol=1e-10)

def test_window_changes_result():
    """Guard against a window silently ignored: a short window must differ from full causal."""
    q, k, v = qkv()
    assert (A.attention(q, k, v, 4) - A.attention(q, k, v, 10_000)).abs().max() > 1e-3

@pytest.mark.parametrize("window", [3, 8, 20, 10_000])
def test_kvcache_prefill_then_decode_matches_naive(window):
    """Prefill 10 tokens, a chunk of 7 onto the cache, then single-token decode up to 33 keys:
    window 8 < 33 keys catches a decode path that ignores the window."""
    B, T, H, Hkv, D = 2, 33, 4, 2, 16
    q, k, v = qkv(B, T, H, Hkv, D, seed=1)
    ref = naive(q, k, v, window)
    k_cache = torch.zeros(B, 48, Hkv, D, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    seqlens = torch.zeros(B, dtype=torch.int32)
    outs, pos = [], 0
    for n in [10, 7] + [1] * (T - 17):
        y = A.attention_with_kvcache(q[:, pos:pos + n], k_cache, v_cache, k[:, pos:pos + n], v[:, pos:pos + n],
                                     seqlens, window)
        outs.append(y)
        pos += n
        seqlens += n
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k_cache[:, :T], k)  # written in place
    assert (k_cache[:, T:] == 0).all()

def test_kvcache_overflow_is_a_clear_error():
    q, k, v = qkv(B=1, T=4)
    kc = torch.zeros(1, 3, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="overflow"):
        A.attention_with_kvcache(q, kc, kc.clone(), k, v, torch.zeros(1, dtype=torch.int32), 100)

def test_backward_matches_naive():
    q, k, v = (t.requires_grad_() for t in qkv(T=24))
    A.attention(q, k, v, 5).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive(q2, k2, v2, 5).square().sum().backward()
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

def test_window_mask_warning_once(monkeypatch):
    calls = []
    monkeypatch.setattr(A.logger, "warning", lambda msg, *a: calls.append(msg))
    monkeypatch.setattr(A, "_WARNED_MASKS", False)
    q, k, v = qkv(T=16)
    A.attention(q, k, v, 100)  # full window: no mask, no warning
    assert calls == []
    A.attention(q, k, v, 3)
    A.attention(q, k, v, 3)
    assert len(calls) == 1 and "window" in calls[0]

def test_override_knob(monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", None)
    monkeypatch.setenv("PICOCHAT_ATTN", "sdpa")
    assert A.backend_name(torch.bfloat16, "cuda") == "sdpa"
    monkeypatch.setenv("PICOCHAT_ATTN", "bogus")
    with pytest.raises(ValueError, match="PICOCHAT_ATTN"):
        A.use_fa3()
    monkeypatch.delenv("PICOCHAT_ATTN")
    assert A.backend_name(torch.float32, "cpu") == "sdpa"  # CPU: SDPA unless flex is asked for
    monkeypatch.setattr(A, "_load_fa3", lambda: None)
    assert A.backend_name(torch.bfloat16, "cuda") == "flex"  # CUDA without FA3: block-sparse windows
    monkeypatch.setenv("PICOCHAT_ATTN", "flex")
    assert A.backend_name(torch.float32, "cpu") == "flex"
    monkeypatch.delenv("PICOCHAT_ATTN")
    if not torch.cuda.is_available():
        monkeypatch.setattr(A, "OVERRIDE", "fa3")
        with pytest.raises(RuntimeError, match="FA3 cannot run"):
            A.use_fa3(torch.bfloat16, "cuda")

# -----------------------------------------------------------------------------
# FlexAttention (block-sparse sliding window): on CPU forward only, through the eager reference implementation
# for the numerics (each compiled shape costs seconds on CPU) and once through the compiled kernel

@pytest.fixture
def flex_eager(monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", "flex")
    monkeypatch.setattr(A, "_FLEX_COMPILED", A._flex_api()[0])   # eager reference implementation
    calls = []
    real = A._flex
    monkeypatch.setattr(A, "_flex", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    return calls

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

@pytest.mark.parametrize("window", [0, 1, 7, 16, 38])
def test_flex_matches_naive(flex_eager, window):
    q, k, v = (t.float() for t in qkv())   # 40 tokens, GQA 4:2
    with torch.no_grad():
        y = A.attention(q, k, v, window)
    assert len(flex_eager) == 1   # the window cuts: FlexAttention took it
    torch.testing.assert_close(y, naive(q, k, v, window), rtol=1e-5, atol=1e-5)

def test_flex_not_used_where_sdpa_is_exact(flex_eager):
    q, k, v = (t.float() for t in qkv())
    A.attention(q, k, v, 39)   # the window covers every key: plain causal SDPA
    A.attention_with_kvcache(q[:, :1], torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16), k[:, :1], v[:, :1],
                             torch.zeros(2, dtype=torch.int32), 3)   # single-token decode
    assert flex_eager == []

@pytest.mark.parametrize("window", [3, 8])   # both cut the 10-token prefill and the 7-token chunk
def test_flex_kvcache_prefill_then_decode_matches_naive(flex_eager, window):
    B, T, H, Hkv, D = 2, 33, 4, 2, 16
    q, k, v = (t.float() for t in qkv(B, T, H, Hkv, D, seed=1))
    kc, vc, sl = torch.zeros(B, 48, Hkv, D), torch.zeros(B, 48, Hkv, D), torch.zeros(B, dtype=torch.int32)
    outs, pos = [], 0
    with torch.no_grad():
        for n in [10, 7] + [1] * (T - 17):   # prefill, a chunk onto the cache (query offset 10), then decode
            outs.append(A.attention_with_kvcache(q[:, pos:pos + n], kc, vc, k[:, pos:pos + n], v[:, pos:pos + n],
                                                 sl, window))
            pos += n
            sl += n
    assert len(flex_eager) == 2
    torch.testing.assert_close(torch.cat(outs, 1), naive(q, k, v, window), rtol=1e-5, atol=1e-5)

def test_flex_on_cpu_refuses_a_backward(monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", "flex")
    q, k, v = (t.float().requires_grad_() for t in qkv(T=24))
    with pytest.raises(RuntimeError, match="forward-only"):
        A.attention(q, k, v, 5)

def test_flex_compiled_kernel_matches_naive(monkeypatch):
    """The real (compiled) kernel once, at a length that is not a multiple of its 128-token blocks."""
    monkeypatch.setattr(A, "OVERRIDE", "flex")
    q, k, v = (t.float() for t in qkv(B=1, T=200, H=2, Hkv=2, D=16, seed=3))
    with torch.no_grad():
        y = A.attention(q, k, v, 50)
    torch.testing.assert_close(y, naive(q, k, v, 50), rtol=1e-4, atol=1e-4)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU-only here")

@cuda
@pytest.mark.parametrize("window", [16, 100])
def test_flex_cuda_forward_backward_matches_naive(monkeypatch, window):
    monkeypatch.setattr(A, "OVERRIDE", "flex")
    q, k, v = (t.to("cuda", torch.float32).requires_grad_() for t in qkv(2, 256, 4, 2, 64))
    A.attention(q, k, v, window).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().double().clone().requires_grad_() for t in (q, k, v))
    ref = naive(q2, k2, v2, window)
    ref.square().sum().backward()
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-3)

# -----------------------------------------------------------------------------
# FA3 vs SDPA (CUDA + FA3 only)

def _fa3_available():
    return torch.cuda.is_available() and A._load_fa3() is not None

fa3 = pytest.mark.skipif(not _fa3_available(), reason="needs a CUDA GPU with the FA3 hub kernel "
                         "(kernels package, SM80/SM90); CPU-only here")

def _both(fn, monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", "fa3")
    a = fn()
    monkeypatch.setattr(A, "OVERRIDE", "sdpa")
    b = fn()
    return a, b

@fa3
@pytest.mark.parametrize("B,T,H,Hkv,D,window", [(2, 64, 4, 4, 32, 10_000), (2, 128, 4, 4, 32, 32),
                                                 (2, 128, 8, 2, 64, 32), (4, 256, 12, 12, 64, 256)])
def test_fa3_matches_sdpa(monkeypatch, B, T, H, Hkv, D, window):
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(B, T, H, Hkv, D))
    a, b = _both(lambda: A.attention(q, k, v, window), monkeypatch)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)

@fa3
def test_fa3_kvcache_decode_with_window_matches_sdpa(monkeypatch):
    B, T, H, Hkv, D = 2, 33, 4, 2, 64
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(B, T, H, Hkv, D))

    def run():
        kc = torch.zeros(B, 64, Hkv, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        sl = torch.zeros(B, dtype=torch.int32, device="cuda")
        ys = [A.attention_with_kvcache(q[:, :16], kc, vc, k[:, :16], v[:, :16], sl, 8)]
        sl += 16
        for t in range(16, T):
            ys.append(A.attention_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1], sl, 8))
            sl += 1
        return torch.cat(ys, 1)
    a, b = _both(run, monkeypatch)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)

@fa3
def test_fa3_backward_matches_sdpa(monkeypatch):
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(2, 128, 4, 4, 64))

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        A.attention(qq, kk, vv, 32).float().square().sum().backward()
        return torch.cat([t.grad.flatten() for t in (qq, kk, vv)])
    a, b = _both(run, monkeypatch)
    torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
