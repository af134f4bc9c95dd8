"""
Self-contained Hugging Face `transformers` implementation of the picochat GPT.

`picochat export --format hf OUT` copies this file into OUT as `modeling_picochat.py`, so that
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` works with nothing of picochat
installed. It must therefore import only torch and transformers, and it must compute exactly what
picochat/gpt.py computes (tests/test_export.py compares their logits). It favours clarity over
speed: attention is plain SDPA with an explicit sliding-window mask and generation recomputes
the whole sequence each step (no KV cache).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6,
                 n_embd=768, window_pattern="SSSL", window_sizes=None, **kwargs):
        self.sequence_len = sequence_len
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern
        self.window_sizes = window_sizes  # per-layer left windows as picochat computed them
        super().__init__(**kwargs)


def _norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _padded_vocab(vocab_size):
    return ((vocab_size + 63) // 64) * 64


def _has_ve(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2


def _window_sizes(config):
    """Left window per layer: the pattern tiled over layers, the last layer always long (L)."""
    if config.window_sizes:
        return list(config.window_sizes)
    long_w = config.sequence_len
    short_w = min(long_w, -(-math.ceil(long_w / 4) // 128) * 128)
    pattern = config.window_pattern.upper()
    sizes = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(config.n_layer)]
    sizes[-1] = long_w
    return sizes


def _rotate(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class _Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        c = config.n_embd
        self.c_q = nn.Linear(c, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(c, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(c, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, c, bias=False)
        self.ve_gate = nn.Linear(12, self.n_kv_head, bias=False) if _has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k = _norm(q) * 1.2, _norm(k) * 1.2
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        i = torch.arange(T, device=x.device)
        dist = i[:, None] - i[None, :]
        mask = (dist >= 0) & (dist <= window)  # each query sees itself plus `window` previous keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class _MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class _Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = _Attention(config, layer_idx)
        self.mlp = _MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(_norm(x), ve, cos, sin, window)
        return x + self.mlp(_norm(x))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    base_model_prefix = "picochat"
    _supports_cache_class = False

    def __init__(self, config):
        super().__init__(config)
        V, C, L = _padded_vocab(config.vocab_size), config.n_embd, config.n_layer
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, C),
            "h": nn.ModuleList([_Block(config, i) for i in range(L)]),
        })
        self.lm_head = nn.Linear(C, V, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if _has_ve(i, L)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(24, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.windows = _window_sizes(config)
        self.post_init()

    def _init_weights(self, module):
        pass  # weights always come from the exported checkpoint

    def get_input_embeddings(self):
        return self.transformer["wte"]

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary(self, T, device, dtype):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (100000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        B, T = input_ids.shape
        x = _norm(self.transformer["wte"](input_ids).float())
        if T > 1:  # smear: mix the previous token's embedding into each position
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        cos, sin = self._rotary(T, x.device, x.dtype)
        x_backout = None
        for i, block in enumerate(self.transformer["h"]):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i])
            if i == self.config.n_layer // 2:
                x_backout = x
        x = _norm(x - self.backout_lambda * x_backout)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = 15 * torch.tanh(logits / 15)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}  # no KV cache: recompute the (short) sequence every step
