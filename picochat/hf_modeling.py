"""
Self-contained Hugging Face `transformers` implementation of the picochat GPT.

`picochat export --format hf OUT` copies this file into OUT as `modeling_picochat.py`, so that
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` works with nothing of picochat
installed. It must therefore import only torch and transformers, and it must compute exactly what
picochat/gpt.py computes (tests/test_export.py compares their logits). It behaves like any HF causal LM:
  * any dtype (`dtype=torch.bfloat16` computes in bf16, logits in fp32);
  * `attention_mask` and position ids: a left-padded batch gives each row what it gives alone (pad keys are
    masked, positions restart at each row's first token, and the first token never smears a pad into itself);
  * a KV cache through transformers' Cache API (DynamicCache), so `generate` costs one token per step;
  * past `sequence_len` positions it refuses with a clear error instead of extrapolating silently.
Attention is plain SDPA with an explicit sliding-window mask.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# the output field (and generate's keyword) for the KV cache: `cache` since transformers 5, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"
    # the standard names tools read (hidden_size, num_hidden_layers, ...) are aliases of picochat's own
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6,
                 n_embd=768, window_pattern="SSSL", window_sizes=None, rope_theta=100000.0, **kwargs):
        self.rope_theta = rope_theta
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

    def forward(self, x, ve, cos, sin, mask, cache, layer_idx):
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
        if cache is not None:  # append this step's keys/values; attend over everything cached so far
            k, v = cache.update(k, v, layer_idx)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
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

    def forward(self, x, ve, cos, sin, mask, cache, layer_idx):
        x = x + self.attn(_norm(x), ve, cos, sin, mask, cache, layer_idx)
        return x + self.mlp(_norm(x))


class PicochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PicochatConfig
    base_model_prefix = "picochat"

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

    def _rotary(self, positions, dtype):
        """cos/sin (B, T, 1, D/2) at each token's own position (rows of a padded batch start at 0 separately)."""
        head_dim = self.config.n_embd // self.config.n_head
        theta = getattr(self.config, "rope_theta", 100000.0)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
        freqs = positions.float()[..., None] * inv_freq
        return freqs.cos().to(dtype)[:, :, None, :], freqs.sin().to(dtype)[:, :, None, :]

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, cache=None,
                past_key_values=None, use_cache=None, smear_context=False, **kwargs):
        """smear_context: input_ids[:, 0] is the token before the cached part's end, given only so the first new
        token can smear it in (prepare_inputs_for_generation sets it); its own output is dropped.
        `cache` is transformers 5's name for the KV cache, `past_key_values` transformers 4's."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        dtype = self.lm_head.weight.dtype  # the dtype the weights were loaded in is the compute dtype
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        ctx = 1 if smear_context and past > 0 else 0
        n_new = T - ctx
        total = past + n_new
        keep = (attention_mask.bool() if attention_mask is not None
                else torch.ones(B, total, dtype=torch.bool, device=input_ids.device))
        if position_ids is None:
            position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:total]
        else:
            position_ids = position_ids[:, -n_new:]
        if int(position_ids.max()) + 1 > self.config.sequence_len:
            raise ValueError(f"position {int(position_ids.max())} is past this model's context of "
                             f"{self.config.sequence_len} tokens (prompt + generated); keep prompt length + "
                             f"max_new_tokens <= {self.config.sequence_len}")
        emb = _norm(self.transformer["wte"](input_ids).to(dtype))
        x = emb[:, ctx:]
        prev_ok = torch.cat([torch.zeros_like(keep[:, :1]), keep[:, :-1]], dim=1)[:, past:total]
        prev = emb[:, :-1] if ctx else torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        # smear: mix the previous token's embedding into each position (never a pad's, never across the start)
        gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x[..., :24]))
        x = x + gate * prev * prev_ok[..., None].to(dtype)
        x0 = x
        cos, sin = self._rotary(position_ids, dtype)
        ids = input_ids[:, ctx:]
        # per-layer masks (B, 1, T_new, total): causal, inside the layer's window, no pad keys; a pad query sees
        # itself only (its output is never used, but a row with no key at all would be NaN)
        q_idx = torch.arange(past, total, device=ids.device)[:, None]
        k_idx = torch.arange(total, device=ids.device)[None, :]
        dist = q_idx - k_idx
        masks = {}
        x_backout = None
        for i, block in enumerate(self.transformer["h"]):
            w = self.windows[i]
            if w not in masks:
                m = (dist >= 0) & (dist <= w)
                masks[w] = ((m[None] & keep[:, None, :]) | (dist == 0)[None])[:, None]
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](ids).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[w], cache, i)
            if i == self.config.n_layer // 2:
                x_backout = x
        x = _norm(x - self.backout_lambda.to(dtype) * x_backout)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = 15 * torch.tanh(logits / 15)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        out[_CACHE_FIELD] = cache
        return out

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None, past_key_values=None,
                                      **kwargs):
        """With a cache, only the new tokens (plus the one before them, for smear) go through the model."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"input_ids": input_ids[:, past - 1:] if past else input_ids, "smear_context": past > 0,
                  "attention_mask": attention_mask, _CACHE_FIELD: cache}
        if cache is None and kwargs.get("use_cache", True):
            inputs[_CACHE_FIELD] = DynamicCache()
        return inputs
