"""The GPT: reference figures (sizing, windows, parameter table, FLOPs), init, causality, KV-cache decode,
losses, optimizer groups, and a tiny model that learns."""
import math

import pytest
import torch

from picochat import attention as A
from picochat import gpt as G
from picochat.gpt import GPT, GPTConfig, KVCache, build_model, config_from_depth

TINY = dict(sequence_len=64, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)

@pytest.fixture(autouse=True)
def sdpa_only(monkeypatch):
    monkeypatch.setattr(A, "OVERRIDE", "sdpa")

def tiny(dtype=torch.float64, seed=0, perturb=True, **kw):
    """A tiny model; `perturb` randomizes the params that init to zero/off (attn/mlp c_proj, smear lambda),
    otherwise attention and smear would be inert and the tests below could not fail."""
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**TINY, **kw}), "cpu", dtype)
    if perturb:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0, 0.1)
                block.mlp.c_proj.weight.normal_(0, 0.05)
            model.smear_lambda.fill_(0.7)
            model.smear_gate.weight.normal_(0, 0.5)
            model.lm_head.weight.normal_(0, 0.3)
    return model

# -----------------------------------------------------------------------------
# Sizing, windows, accounting (independent figures from the reference)

def test_config_from_depth():
    c = config_from_depth(12, 32768)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (768, 6, 6, 12)
    assert config_from_depth(5, 32768).n_embd == 384          # 320 rounded up to a multiple of 128
    c = config_from_depth(6, 32768, head_dim=64)
    assert (c.n_embd, c.n_head) == (384, 6)
    assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**c.to_dict(), "bogus": 1})

def test_window_pattern_reference_counts():
    def sizes(depth, T=2048):
        return G.window_sizes(config_from_depth(depth, 32768, max_seq_len=T))
    s12 = sizes(12)
    assert [i for i, w in enumerate(s12) if w == 2048] == [3, 7, 11] and s12.count(512) == 9
    assert sizes(20).count(2048) == 5 and sizes(20).count(512) == 15
    assert sizes(26).count(2048) == 7 and sizes(26)[25] == 2048
    assert G.short_window(512) == 128 and G.short_window(1024) == 256 and G.short_window(2048) == 512
    assert G.short_window(64) == 16  # tiny contexts keep a genuinely short window
    assert G.window_sizes(GPTConfig(**{**TINY, "window_pattern": "L"})) == [64] * 4

def test_value_embedding_layers():
    assert [i for i in range(24) if G.has_ve(i, 24)] == list(range(1, 24, 2))
    assert [i for i in range(5) if G.has_ve(i, 5)] == [0, 2, 4]

def test_state_dict_keys_match_reference():
    model = tiny(perturb=False, vocab_size=300)
    C, D, Hkv = 64, 16, 2
    V = 320  # padded to a multiple of 64
    expected = {"resid_lambdas": (4,), "x0_lambdas": (4,), "smear_lambda": (1,), "backout_lambda": (1,),
                "transformer.wte.weight": (V, C), "lm_head.weight": (V, C), "smear_gate.weight": (1, 24)}
    for i in range(4):
        p = f"transformer.h.{i}."
        expected.update({p + "attn.c_q.weight": (4 * D, C), p + "attn.c_k.weight": (Hkv * D, C),
                         p + "attn.c_v.weight": (Hkv * D, C), p + "attn.c_proj.weight": (C, 4 * D),
                         p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)})
    for i in (1, 3):
        expected[f"transformer.h.{i}.attn.ve_gate.weight"] = (Hkv, 12)
        expected[f"value_embeds.{i}.weight"] = (V, Hkv * D)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # rotary tables are non-persistent

# rows of the reference table (6.7): depth -> (wte, value_embeds, transformer_matrices, total, scaling)
PARAM_TABLE = {
    6: (12_582_912, 37_748_736, 10_616_940, 73_531_538, 23_199_852),
    12: (25_165_824, 150_994_944, 84_935_088, 286_261_730, 110_100_912),
    24: (50_331_648, 603_979_776, 679_478_976, 1_384_122_122, 729_810_624),
}

@pytest.mark.parametrize("depth", sorted(PARAM_TABLE))
def test_param_accounting_vs_reference_table(depth):
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, 32768))
    n = model.num_scaling_params()
    wte, ve, mats, total, scaling = PARAM_TABLE[depth]
    assert n["wte"] == n["lm_head"] == wte
    assert n["value_embeds"] == ve
    assert n["scalars"] == 2 * depth + 26
    assert n["transformer_matrices"] == mats
    assert n["total"] == total
    assert n["transformer_matrices"] + n["lm_head"] == scaling

@pytest.mark.parametrize("depth,flops", [(12, 7.597e8), (20, 2.886e9), (24, 4.775e9), (26, 5.991e9)])
def test_estimate_flops_vs_reference(depth, flops):
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, 32768))
    assert model.estimate_flops() == pytest.approx(flops, rel=5e-4)

def test_norm_and_relu_squared_match_textbook():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(G.norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    assert torch.autograd.gradcheck(G.norm, (x,))
    torch.testing.assert_close(G.relu_squared(x), torch.where(x > 0, x * x, torch.zeros_like(x)))
    assert torch.autograd.gradcheck(G.relu_squared, (x,))

def test_rotary_sign_convention():
    """The reference's convention: halves (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos), i.e. rotation by -theta."""
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    ang = torch.rand(1, 3, 1, 4, dtype=torch.float64) * 6
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)
    torch.testing.assert_close(G.apply_rotary_fast(x, *G.rotary_full(cos, sin)), expected)
    # as a complex rotation: (x1 + i x2) * exp(-i theta)
    z = torch.complex(x1, x2) * torch.exp(-1j * ang)
    torch.testing.assert_close(torch.cat([z.real, z.imag], -1), expected)

# -----------------------------------------------------------------------------
# Initialization

def test_every_param_and_buffer_initialised():
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), f"{name} left uninitialised"

def test_init_values_follow_reference():
    model = tiny(dtype=torch.float32, perturb=False, n_layer=5)
    C = 64
    s = math.sqrt(3 / C)
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    b = model.transformer.h[0]
    assert (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all()
    assert b.attn.c_q.weight.abs().max() <= s and b.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert 0 <= b.attn.ve_gate.weight.min() and b.attn.ve_gate.weight.max() <= 0.02
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    # rotary: theta 100k, position 3, frequency index 1 of D/2 = 8
    assert model.cos[0, 3, 0, 1].item() == pytest.approx(math.cos(3 * 100_000 ** (-2 / 16)), abs=1e-6)

def test_init_deterministic_per_seed():
    a, b, c = tiny(seed=1, perturb=False), tiny(seed=1, perturb=False), tiny(seed=2, perturb=False)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)

def test_embeddings_stored_in_compute_dtype():
    m = build_model(GPTConfig(**TINY), "cpu", torch.bfloat16)
    assert m.transformer.wte.weight.dtype == torch.bfloat16 and m.value_embeds["1"].weight.dtype == torch.bfloat16
    assert m.lm_head.weight.dtype == torch.float32 and m.transformer.h[0].attn.c_q.weight.dtype == torch.float32
    logits = m(torch.randint(0, 300, (1, 8)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    m16 = build_model(GPTConfig(**TINY), "cpu", torch.float16)
    assert m16.transformer.wte.weight.dtype == torch.float32  # fp16 keeps fp32 tables

# -----------------------------------------------------------------------------
# Forward properties

def test_causality():
    model = tiny()
    idx = torch.randint(0, 300, (2, 48))
    ref = model(idx)
    idx2 = idx.clone()
    idx2[:, 30:] = torch.randint(0, 300, (2, 18))
    out = model(idx2)
    torch.testing.assert_close(out[:, :30], ref[:, :30], rtol=1e-12, atol=1e-12)
    assert (out[:, 30:] - ref[:, 30:]).abs().max() > 1e-6

def test_logits_shape_and_softcap():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)
    logits = model(torch.randint(0, 300, (2, 16)))
    assert logits.shape == (2, 16, 300) and logits.dtype == torch.float64
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0

def test_gqa_shapes():
    model = tiny(n_head=4, n_kv_head=1)
    a = model.transformer.h[1].attn
    assert a.c_q.weight.shape == (64, 64) and a.c_k.weight.shape == (16, 64) and a.ve_gate.weight.shape == (1, 12)
    assert model.value_embeds["1"].weight.shape == (320, 16)
    assert torch.isfinite(model(torch.randint(0, 300, (2, 10)))).all()
    with pytest.raises(ValueError, match="multiple"):
        GPTConfig(**{**TINY, "n_kv_head": 3}).validate()

def reference_ce(logits, targets):
    """Textbook CE per position: logsumexp - target logit, 0 where ignored."""
    lp = logits - logits.logsumexp(-1, keepdim=True)
    t = targets.clamp(min=0)
    nll = -lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return nll * (targets != -1)

@pytest.mark.parametrize("fused", [True, False])
def test_loss_reductions_and_ignore_index(fused):
    model = tiny()
    model.fused_loss = fused
    model.fused_loss_chunk = 24  # several chunks, one partial
    idx = torch.randint(0, 300, (2, 40))
    tgt = torch.randint(0, 300, (2, 40))
    tgt[0, :7] = -1
    tgt[1, -3:] = -1
    with torch.no_grad():
        nll = reference_ce(model(idx), tgt)
    n_valid = (tgt != -1).sum()
    mean = model(idx, tgt)
    total = model(idx, tgt, loss_reduction="sum")
    torch.testing.assert_close(mean, nll.sum() / n_valid)
    torch.testing.assert_close(total, nll.sum())
    none = model(idx, tgt, loss_reduction="none")  # with grad: always the plain path
    assert none.shape == (80,)
    torch.testing.assert_close(none, nll.flatten())
    with torch.no_grad():  # evaluation: the fused path when enabled
        torch.testing.assert_close(model(idx, tgt, loss_reduction="none"), nll.flatten())
        torch.testing.assert_close(model(idx, tgt), nll.sum() / n_valid)
    with pytest.raises(ValueError, match="loss_reduction"):
        model.fused_loss = False
        model(idx, tgt, loss_reduction="avg")

def test_fused_loss_gradients_match_plain():
    model = tiny(vocab_size=300)
    idx = torch.randint(0, 300, (2, 40))
    tgt = torch.randint(0, 300, (2, 40))
    tgt[0, :5] = -1
    grads = {}
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad()
        (model(idx, tgt) * 1.7).backward()
        grads[fused] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

# -----------------------------------------------------------------------------
# KV cache

def make_cache(model, B, T_max):
    c = model.config
    return KVCache(B, c.n_kv_head, T_max, c.n_embd // c.n_head, c.n_layer, "cpu", model.compute_dtype)

def test_kvcache_decode_matches_full_forward():
    """Prefill 12, a chunk of 5, then single tokens up to 48: short windows (16) < context, GQA, smear on,
    several layers, batch 2. Every position's logits must equal the full forward's."""
    model = tiny()
    assert model.window_sizes[0] == 16
    B, T = 2, 48
    idx = torch.randint(0, 300, (B, T))
    full = model(idx)
    cache = make_cache(model, B, 64)
    outs, pos = [], 0
    for n in [12, 5] + [1] * (T - 17):
        outs.append(model(idx[:, pos:pos + n], kv_cache=cache))
        pos += n
    assert cache.get_pos() == T and (cache.cache_seqlens == T).all()
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)

def test_kvcache_prefill_copy_expands_rows_and_reset():
    model = tiny()
    prompt = torch.randint(0, 300, (1, 10))
    src = make_cache(model, 1, 32)
    model(prompt, kv_cache=src)
    dst = make_cache(model, 3, 32)
    dst.prefill(src)
    assert dst.get_pos() == 10 and dst.prev_embedding.shape == (3, 1, 64)
    nxt = torch.randint(0, 300, (3, 1))
    out = model(nxt, kv_cache=dst)
    full = model(torch.cat([prompt.expand(3, -1), nxt], 1))[:, -1:]
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    with pytest.raises(AssertionError):
        dst.prefill(src)
    dst.reset()
    assert dst.get_pos() == 0 and dst.prev_embedding is None and (dst.cache_seqlens == 0).all()

def test_generate_greedy_matches_argmax():
    model = tiny(dtype=torch.float32)
    toks = list(model.generate([1, 2, 3], max_tokens=5, temperature=0.0))
    ids = [1, 2, 3]
    for _ in range(5):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert toks == ids[3:]
    a = list(model.generate([1, 2], max_tokens=6, temperature=1.0, top_k=0, seed=3))
    b = list(model.generate([1, 2], max_tokens=6, temperature=1.0, top_k=0, seed=3))
    assert a == b and all(0 <= t < 300 for t in a)
    # top_k=1 leaves only the argmax, whatever the temperature
    assert list(model.generate([1, 2, 3], max_tokens=5, temperature=1.0, top_k=1)) == toks

# -----------------------------------------------------------------------------
# Optimizer groups and learning

def test_setup_optimizer_groups():
    pytest.importorskip("picochat.optim")
    model = tiny(dtype=torch.float32, perturb=False, n_embd=128, n_head=4, n_kv_head=4)
    opt = model.setup_optimizer()
    scale = (128 / 768) ** -0.5
    adamw = [g for g in opt.param_groups if g["kind"] == "adamw"]
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    got = [(round(g["lr"], 9), tuple(g["betas"]), g["eps"], g["weight_decay"], len(g["params"])) for g in adamw]
    assert got == [(round(0.004 * scale, 9), (0.8, 0.96), 1e-10, 0.01, 1), (round(0.2 * scale, 9), (0.8, 0.995), 1e-10, 0.001, 1),
                   (round(0.1 * scale, 9), (0.8, 0.995), 1e-10, 0.01, 2), (0.005, (0.8, 0.95), 1e-10, 0.05, 1),
                   (0.5, (0.96, 0.95), 1e-10, 0.0, 1), (0.2, (0.8, 0.95), 1e-10, 0.0, 3)]
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted(shapes) and (4, 12) in shapes
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.95 and g["ns_steps"] == 5 for g in muon)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())

def test_tiny_model_learns_repetitive_corpus():
    """The whole stack (model + MuonAdamW) learns: a repeated 16-token cycle is memorised to near-zero loss."""
    pytest.importorskip("picochat.optim")
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
                        "cpu", torch.float32)
    opt = model.setup_optimizer(unembedding_lr=0.02, embedding_lr=0.3, matrix_lr=0.03, scalar_lr=0.1)
    data = torch.randperm(64)[:16].repeat(40)  # distinct tokens: every next token is determined
    losses = []
    for step in range(300):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= 20 and max(losses[-5:]) < 0.05:
            break
    assert losses[0] > 3.5  # ~ln(64) at init
    assert max(losses[-5:]) < 0.05, f"loss still {losses[-1]:.3f} after {len(losses)} steps"

def test_fused_loss_bf16_against_fp64():
    """The fused loss in bf16 (its weight gradient a bf16 GEMM per block, blocks summed in fp32) against the
    textbook loss in fp64 on the same bf16-rounded inputs: several blocks, one partial, a padded vocab (the pad
    rows get no gradient), ignored targets. Tolerances are bf16's (~3 significant digits)."""
    from picochat import cpu_kernels
    gen = torch.Generator().manual_seed(0)
    N, C, V, V_pad = 70, 32, 300, 320
    x = torch.randn(N, C, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(V_pad, C, generator=gen) * 0.3).requires_grad_()
    tgt = torch.randint(0, V, (N,), generator=gen)
    tgt[:6] = -1
    (cpu_kernels.chunked_softcap_ce(x, w, tgt, V, 15.0, "mean", 24) * 1.3).backward()
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().bfloat16().double().requires_grad_()  # the kernel multiplies by the bf16-rounded weight
    logits = 15.0 * torch.tanh((x64 @ w64.t())[:, :V] / 15.0)
    (reference_ce(logits, tgt).sum() / (tgt != -1).sum() * 1.3).backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert w.grad[V:].abs().max() == 0
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad)):
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-2, err.item()
