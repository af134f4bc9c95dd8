"""
The GPT: a decoder-only transformer with the reference's modern details (nanochat HEAD):
RoPE (theta 100k), QK-norm (x1.2), parameter-free RMSNorm, untied embeddings, ReLU^2 MLP, fp32 logits with a
softcap of 15, SSSL sliding windows, value embeddings (ResFormer) on alternating layers, per-layer residual/x0
scalars, smear (previous-token mixing) and backout. No biases anywhere.

Precision is explicit: master weights are fp32, activations run in ONE compute dtype (`compute_dtype`), each
Linear casts its weight to the activation dtype, embedding tables are stored in the compute dtype (fp32 when
it is fp16), logits are upcast to fp32 before the softcap. No autocast.

The state-dict keys are exactly nanochat's, so its checkpoints can be imported.

CPU fast path (eager, no compile; picochat/cpu_kernels.py): hand-written backward for RMSNorm and ReLU^2, and
lm_head + softcap + CE fused in row blocks (GPT.fused_loss) so the (B*T, V) logits never materialise. Same math
as the plain path (tests compare them); CUDA keeps the plain ops for torch.compile to fuse.

Example:
    python -c "import torch; from picochat.gpt import *; m = build_model(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), 'cpu', torch.float32); print(m.num_scaling_params())"
"""
import copy
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat import cpu_kernels
from picochat.attention import attention, attention_with_kvcache, prepare as prepare_attention
from picochat.optim import MuonAdamW

ROPE_THETA = 100_000
QK_SCALE = 1.2
SOFTCAP = 15.0
VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24
VOCAB_MULTIPLE = 64

# -----------------------------------------------------------------------------
# Config

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    short_window: int = 0  # the S window in keys; 0 = short_window(sequence_len). Imported models carry their own

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)

    def validate(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head} (GQA)")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim {self.n_embd // self.n_head} must be even for RoPE")
        if self.n_embd < SMEAR_CHANNELS:
            raise ValueError(f"n_embd {self.n_embd} < {SMEAR_CHANNELS}: the smear gate reads {SMEAR_CHANNELS} channels")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} must be a non-empty string of S and L")

def config_from_depth(depth, vocab_size, aspect_ratio=64, head_dim=128, max_seq_len=2048,
                      window_pattern="SSSL") -> GPTConfig:
    """The reference sizing rule: width = depth*aspect_ratio rounded UP to a multiple of head_dim."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern)

def padded_vocab_size(vocab_size: int) -> int:
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

def short_window(sequence_len: int) -> int:
    """The S window: ceil(T/4) rounded up to a multiple of 128 (512 at T=2048, 128 at T=512), as the reference.
    For tiny contexts (T <= 128) that rounding would make S as long as the whole context, so there we keep
    ceil(T/4) unrounded: toy models and tests still exercise real sliding windows."""
    quarter = -(-sequence_len // 4)
    rounded = -(-quarter // 128) * 128
    return rounded if rounded < sequence_len else quarter

def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer left window (number of previous keys visible). Pattern tiled, last layer forced to L."""
    pattern = config.window_pattern.upper()
    L, S = config.sequence_len, config.short_window or short_window(config.sequence_len)
    sizes = [L if pattern[i % len(pattern)] == "L" else S for i in range(config.n_layer)]
    sizes[-1] = L
    return sizes

def has_ve(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2

# -----------------------------------------------------------------------------
# Building blocks

def eager_cpu(x) -> bool:
    """Whether the hand-written CPU kernels apply: on CPU in eager mode. Compiled code (any device) keeps the plain
    ops for inductor to fuse, so a CPU compile runs exactly the graph a CUDA compile does."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()

def norm(x):
    """Parameter-free RMSNorm over the last dim (default eps)."""
    return cpu_kernels.rms_norm(x) if eager_cpu(x) else F.rms_norm(x, (x.size(-1),))

class Linear(nn.Linear):
    """Bias-free Linear with an fp32 master weight cast to the activation dtype (explicit precision)."""
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))

def apply_rotary_emb(x, cos, sin):
    """x (B,T,H,D), cos/sin (1,T,1,D/2). The reference's sign convention (rotation by -theta, kept for
    checkpoint compatibility): with halves (x1, x2): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

def rotary_full(cos, sin):
    """Full-width tables for apply_rotary_fast: (cos, cos) and (sin, -sin), each (1,T,1,D)."""
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)

def apply_rotary_fast(x, cos2, sin2):
    """Same result as apply_rotary_emb in 3 full-width passes: y = x*(cos,cos) + swap_halves(x)*(sin,-sin).
    The half swap is a flip over a (2, D/2) view, whose backward is another flip (slicing x instead makes
    autograd zero-fill and scatter a full-size gradient for each half: measurably slower on CPU)."""
    B, T, H, D = x.shape
    swapped = x.view(B, T, H, 2, D // 2).flip(3).view(B, T, H, D)
    return torch.addcmul(x * cos2, swapped, sin2)

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C, D = config.n_embd, self.head_dim
        self.c_q = Linear(C, self.n_head * D)
        self.c_k = Linear(C, self.n_kv_head * D)
        self.c_v = Linear(C, self.n_kv_head * D)
        self.c_proj = Linear(self.n_head * D, C)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window, kv_cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            # ResFormer value residual, gated per KV head in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        cos2, sin2 = cos_sin
        q, k = apply_rotary_fast(q, cos2, sin2), apply_rotary_fast(k, cos2, sin2)
        q, k = norm(q), norm(k)
        # QK-norm then x1.2 on both q and k: folded into the softmax scale (1.2^2/sqrt(D)), which is the same
        # logits without two extra elementwise passes (the cache therefore holds the un-scaled normed k)
        scale = QK_SCALE ** 2 / math.sqrt(D)
        if kv_cache is None:
            y = attention(q, k, v, window, scale=scale)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = attention_with_kvcache(q, k_cache, v_cache, k, v, kv_cache.cache_seqlens, window,
                                       pos=kv_cache.get_pos(), scale=scale)
        return self.c_proj(y.reshape(B, T, H * D))

def relu_squared(x):
    return cpu_kernels.relu_squared(x) if eager_cpu(x) else F.relu(x).square()

class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))

class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window, kv_cache)
        return x + self.mlp(norm(x))

# -----------------------------------------------------------------------------
# KV cache (used by the engine; lives here because the model's forward reads and writes it)

class KVCache:
    """k/v caches (n_layers, B, T_max, Hkv, D) in the compute dtype (FA3's layout), the per-row lengths
    cache_seqlens int32 (B,) (all rows share one position), and prev_embedding (B,1,C) for smear."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.batch_size, self.seq_len, self.num_layers = batch_size, seq_len, num_layers
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None
        self._pos = 0  # host mirror of cache_seqlens[0]: no device sync per layer

    @classmethod
    def for_model(cls, model, batch_size, seq_len, device=None):
        """A cache shaped for `model` (its KV heads, head width, layers) in its compute dtype."""
        cfg = model.config
        dtype = getattr(model, "compute_dtype", None) or next(model.parameters()).dtype
        head_dim = getattr(cfg, "head_dim", None) or cfg.n_embd // cfg.n_head
        device = device or next(model.parameters()).device
        return cls(batch_size, cfg.n_kv_head, seq_len, head_dim, cfg.n_layer, device, dtype)

    def get_pos(self) -> int:
        return self._pos

    def get_layer_cache(self, i):
        return self.k_cache[i], self.v_cache[i]

    def advance(self, n: int):
        self._pos += n
        self.cache_seqlens += n

    def reset(self):
        self._pos = 0
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def prefill(self, other: "KVCache"):
        """Copy another cache's contents (e.g. a batch-1 prompt prefill) into this empty one, expanding rows."""
        assert self.get_pos() == 0, "prefill() needs an empty destination cache"
        pos = other.get_pos()
        if pos > self.seq_len:
            raise ValueError(f"source cache holds {pos} tokens, destination has room for {self.seq_len}")
        if other.k_cache.shape[0] != self.k_cache.shape[0] or other.k_cache.shape[3:] != self.k_cache.shape[3:]:
            raise ValueError(f"incompatible caches: {tuple(other.k_cache.shape)} vs {tuple(self.k_cache.shape)}")
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        self._pos = pos
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()

# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype=torch.float32):
        """Cheap: meant to run under torch.device('meta'); every value is set by init_weights()."""
        super().__init__()
        config.validate()
        self.config = config
        self.compute_dtype = compute_dtype
        # embedding tables live in the compute dtype (fp16 has too little range: keep those fp32)
        self.embed_dtype = torch.float32 if compute_dtype == torch.float16 else compute_dtype
        # the fused lm_head + CE of cpu_kernels: None = on CPU only; True / False force it (tests compare both)
        self.fused_loss = None
        self.fused_loss_chunk = 1024  # rows per block: bigger blocks, fewer read-modify-writes of the weight grad
        C, Hkv = config.n_embd, config.n_kv_head
        D = C // config.n_head
        V = padded_vocab_size(config.vocab_size)
        self.padded_vocab = V
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C, dtype=self.embed_dtype),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(C, V)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.empty(1))
        self.backout_lambda = nn.Parameter(torch.empty(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, Hkv * D, dtype=self.embed_dtype)
                                           for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        # RoPE tables for 10x the context (the KV cache may run past sequence_len); recomputed in init_weights
        self.rotary_len = 10 * config.sequence_len
        self.register_buffer("cos", torch.empty(1, self.rotary_len, 1, D // 2, dtype=compute_dtype), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_len, 1, D // 2, dtype=compute_dtype), persistent=False)

    def _rotary(self, device):
        D = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)[None, :, None, :]
        return freqs.cos().to(self.compute_dtype), freqs.sin().to(self.compute_dtype)

    @torch.no_grad()
    def init_weights(self):
        """Set EVERY parameter and buffer: values from __init__ on meta are fake, so a parameter set only there
        would be uninitialised memory."""
        C, n = self.config.n_embd, self.config.n_layer
        s = math.sqrt(3) / math.sqrt(C)  # U(-s, s) has std 1/sqrt(C)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates start just above 1.5
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        frac = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        self.smear_lambda.fill_(0.0)      # smear off at init
        self.backout_lambda.fill_(0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.cos, self.sin = self._rotary(self.transformer.wte.weight.device)
        prepare_attention(self.transformer.wte.weight.device.type)  # load FA3 now, never inside a compile trace

    def inference_copy(self, dtype):
        """A copy that stores every weight in `dtype` and computes in it, for inference only. Batch-1 decode is
        bound by reading the weights, so bf16 weights halve its time where bf16 GEMV is fast (measured 1.3-1.7x
        on an AVX2-only CPU, dev/LOG.md); the master model keeps its fp32 weights for everything else."""
        twin = copy.deepcopy(self).to(dtype)
        twin.compute_dtype = twin.embed_dtype = dtype
        return twin.eval()

    def get_device(self):
        return self.transformer.wte.weight.device

    # -- forward ---------------------------------------------------------------

    def _smear(self, x, kv_cache):
        """x_t += smear_lambda * sigmoid(w . x_t[:24]) * x_{t-1} (pre-smear neighbour); x_0 unchanged unless a
        cache holds the previous token's embedding (decode, or chunked prefill)."""
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        prev = kv_cache.prev_embedding if kv_cache is not None else None
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:].detach().clone()
        if prev is None:
            if x.size(1) == 1:
                return x
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        return x + gate * torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)

    def final_hidden(self, idx, kv_cache=None):
        """The transformer body: token ids (B, T) -> the final normed hidden states (B, T, C) that the lm_head
        reads. Evaluators that score only a few positions take these and call logits() on just those."""
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.rotary_len:
            raise ValueError(f"sequence position {T0 + T} exceeds the rotary table ({self.rotary_len} = 10 x sequence_len)")
        cos_sin = rotary_full(self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T])
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if i == backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.advance(T)
        return norm(x - self.backout_lambda.to(x.dtype) * x_backout)

    def logits(self, x):
        """Final hidden states (..., C) -> softcapped logits (..., vocab_size) in fp32 (or wider)."""
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # slice off the vocab padding
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # >= fp32 before the softcap
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        x = self.final_hidden(idx, kv_cache)
        V = self.config.vocab_size
        if targets is not None and self._use_fused(x, loss_reduction):
            return cpu_kernels.chunked_softcap_ce(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                                  V, SOFTCAP, loss_reduction, self.fused_loss_chunk)
        logits = self.logits(x)
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be mean, sum or none, got {loss_reduction!r}")
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)

    def _use_fused(self, x, reduction) -> bool:
        if reduction not in ("mean", "sum", "none") or (reduction == "none" and torch.is_grad_enabled()):
            return False  # bad values get the plain path's error; per-token losses with grad (RL) too
        if self.fused_loss is None:
            return eager_cpu(x)
        return self.fused_loss

    # -- optimizer -------------------------------------------------------------

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """MuonAdamW with the reference's groups: AdamW for the embeddings, lm_head and scalars (each with its
        own LR and betas), Muon for every matrix inside the blocks, one group per shape."""
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=list(params), lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
        groups = [
            adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
            adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
            adamw([ve.weight for ve in self.value_embeds.values()], embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        matrix_params = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrix_params}):
            groups.append(dict(kind="muon", params=[p for p in matrix_params if tuple(p.shape) == shape],
                               lr=matrix_lr, momentum=0.95, beta2=0.9, ns_steps=5, weight_decay=weight_decay))
        groups = [g for g in groups if g["params"]]
        covered = sum(len(g["params"]) for g in groups)
        assert covered == len(list(self.parameters())), "every parameter must be in exactly one optimizer group"
        return MuonAdamW(groups, compute_dtype=self.compute_dtype)  # bf16 compute -> Polar Express in bf16

    # -- accounting --------------------------------------------------------------

    def num_scaling_params(self) -> dict:
        """Parameter counts by group. Scaling params for the horizon = transformer_matrices + lm_head."""
        count = lambda ps: sum(p.numel() for p in ps)
        d = dict(
            wte=self.transformer.wte.weight.numel(),
            value_embeds=count(self.value_embeds.parameters()),
            lm_head=self.lm_head.weight.numel(),
            transformer_matrices=count(self.transformer.h.parameters()),
            scalars=count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda,
                           self.backout_lambda]),
        )
        d["total"] = sum(d.values())
        assert d["total"] == count(self.parameters()), "parameter accounting misses a parameter"
        return d

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 * (weights in every Linear) + sum over layers of
        12 * H * D * min(window, T). Embedding lookups and softmax are not counted."""
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        H, D, T = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn = sum(12 * H * D * min(w, T) for w in self.window_sizes)
        return 6 * n_matmul + attn

    # -- sampling ----------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 sampling that recomputes the whole sequence each step (the engine's reference)."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k:  # None or 0 = disabled
                vals, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < vals[:, [-1]], float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()

def build_model(config: GPTConfig, device, compute_dtype=torch.float32) -> GPT:
    """meta -> to_empty -> init_weights: no memory is touched twice and nothing is left uninitialised."""
    with torch.device("meta"):
        model = GPT(config, compute_dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model
