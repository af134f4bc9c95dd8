"""
Attention backends: Flash Attention 3 on Hopper (and Ampere/Ada where the hub kernel loads), PyTorch SDPA
everywhere else. Two entry points, both taking the (B, T, H, D) layout the model uses:

    attention(q, k, v, window, scale=None)                       # training / full forward, causal
    attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, window, pos=None, scale=None)
                                                                # inference: writes k, v into the cache in place

`window` is the number of PREVIOUS keys a query may see (the query itself is always seen), i.e. FA3's
window_size=(window, 0). window >= the number of keys means plain causal attention.

Backend choice: FA3 when it is loadable (CUDA; a locally installed `flash_attn_interface`, else the `kernels` hub
kernel, which downloads) and the tensors are bf16 (FA3 is bf16/fp16 only; picochat uses it for bf16).
Without FA3, a sliding window that actually cuts (window < keys - 1, more than one query) goes to FlexAttention
with a block-sparse mask on CUDA: SDPA has no native window, so it would need a dense (T, T) mask, O(T^2) memory
and work for a window of T/4. On CPU FlexAttention has no backward (torch 2.13) and each new shape costs a
compile of several seconds, so CPU takes it only when asked (PICOCHAT_ATTN=flex, forward only: evaluation and
prefill of long fixed-length rows, where it measured 1.65-2.27x SDPA's speed at seq 2048). Everything else
(full causal, single-token decode, fp32/fp16 on CPU) is SDPA, which is exact there.
Override with env PICOCHAT_ATTN=sdpa|flex|fa3 or `attention.OVERRIDE = "sdpa" | "flex" | "fa3" | None` (tests).

Example:
    python -c "from picochat import attention; print(attention.backend_name())"
"""
import os

import torch
import torch.nn.functional as F

from picochat.common import logger

OVERRIDE = None  # None = auto; "sdpa", "flex" or "fa3" forces a backend (tests, debugging)

# -----------------------------------------------------------------------------
# FA3 loading (lazy, cached). Nothing is compiled at install time: the HF kernel hub ships prebuilt binaries.

_FA3_ERROR = None    # why FA3 is unavailable, for the message
_FA3_LOADED = False  # plain globals, not lru_cache: torch.compile traces the (cached) lookups cleanly
_FA3 = None

def _load_fa3():
    """The FA3 interface module or None (reason kept in _FA3_ERROR). Loaded once; call prepare() before
    torch.compile so the download/load never happens inside a trace."""
    global _FA3, _FA3_LOADED
    if not _FA3_LOADED:
        _FA3 = _load_fa3_uncached()
        _FA3_LOADED = True
    return _FA3

def prepare(device_type: str):
    """Resolve the backend eagerly (GPT.init_weights calls this), so nothing is loaded inside a compiled trace."""
    if use_flex(device_type):
        _flex_api()
    if device_type == "cuda" and _requested() not in ("sdpa", "flex") and _load_fa3() is None:
        how = ("FlexAttention for sliding windows (block-sparse masks), SDPA for full causal" if use_flex("cuda")
               else "PyTorch SDPA (sliding windows need dense masks: prefer --window-pattern L)")
        logger.warning(f"Flash Attention 3 unavailable ({_FA3_ERROR}); using {how}.")

def _load_fa3_uncached():
    global _FA3_ERROR
    if not torch.cuda.is_available():
        _FA3_ERROR = "no CUDA device"
        return None
    major, _ = torch.cuda.get_device_capability()
    if major == 9:
        repo = "varunneal/flash-attention-3"      # Hopper build
    elif major == 8:
        repo = "kernels-community/flash-attn3"    # Ampere/Ada build, where it loads
    else:
        _FA3_ERROR = f"compute capability {major}.x has no FA3 build (Hopper/Ampere only)"
        return None
    try:  # a locally built/installed FA3 (flash-attention's hopper/ package) needs no download
        import flash_attn_interface  # optional: present only where FA3 was installed
        return flash_attn_interface
    except ImportError:
        pass
    try:
        from kernels import get_kernel  # optional (the [gpu] extra): FA3 from the kernel hub
    except ImportError:
        _FA3_ERROR = "neither a local FA3 (flash_attn_interface) nor the `kernels` package is installed (pip install -e '.[gpu]')"
        return None
    try:
        mod = get_kernel(repo)
    except Exception as e:  # network, ABI, missing build for this torch
        _FA3_ERROR = f"get_kernel({repo!r}) failed: {type(e).__name__}: {e}"
        return None
    return getattr(mod, "flash_attn_interface", mod)

def _requested() -> str:
    req = OVERRIDE or os.environ.get("PICOCHAT_ATTN", "") or "auto"
    if req not in ("auto", "sdpa", "flex", "fa3"):
        raise ValueError(f"PICOCHAT_ATTN={req!r} is not one of auto, sdpa, flex, fa3")
    return req

def use_fa3(dtype: torch.dtype = torch.bfloat16, device_type: str = "cuda") -> bool:
    """Whether a call with tensors of this dtype/device goes to FA3."""
    req = _requested()
    if req in ("sdpa", "flex"):
        return False
    ok = device_type == "cuda" and dtype == torch.bfloat16 and _load_fa3() is not None
    if req == "fa3" and not ok:
        why = _FA3_ERROR if _load_fa3() is None else f"FA3 needs bf16 CUDA tensors, got {dtype} on {device_type}"
        raise RuntimeError(f"PICOCHAT_ATTN=fa3 was requested but FA3 cannot run: {why}. "
                           "Unset PICOCHAT_ATTN (or set it to sdpa) to use PyTorch SDPA.")
    return ok

def backend_name(dtype: torch.dtype = torch.bfloat16, device_type: str = None) -> str:
    """The backend of a sliding-window training call (full-causal calls without FA3 are always SDPA)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if use_fa3(dtype, device_type):
        return "fa3"
    return "flex" if use_flex(device_type) else "sdpa"

def use_flex(device_type: str) -> bool:
    """Whether a windowed call (that FA3 does not take) goes to FlexAttention: on CUDA by default, on CPU when
    PICOCHAT_ATTN=flex (see the module docstring for why)."""
    req = _requested()
    return req == "flex" or (req == "auto" and device_type == "cuda")

_WARNED_MASKS = False

@torch.compiler.disable
def _warn_window_masks():
    global _WARNED_MASKS
    _WARNED_MASKS = True
    logger.warning("!" * 80 + "\nSDPA has no native sliding window: building explicit attention masks for the short-window "
                   "layers. This is slower; use --window-pattern L when FA3 is unavailable (CPU, MPS, fp16/fp32).\n"
                   + "!" * 80)

# -----------------------------------------------------------------------------
# SDPA paths

def _window_mask(Tq: int, Tk: int, window: int, device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = may attend. Query i sits at absolute position (Tk - Tq + i);
    it sees keys j with pos - window <= j <= pos."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(1)
    k_pos = torch.arange(Tk, device=device).unsqueeze(0)
    return (k_pos <= q_pos) & (k_pos >= q_pos - window)

def _sdpa(q, k, v, window: int, scale=None):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D); the queries are the LAST Tq positions of the Tk keys."""
    Tq, Tk = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    first_query_pos = Tk - Tq
    if window >= Tk - 1:
        # every query sees its whole causal prefix: no explicit mask needed
        if Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale, enable_gqa=gqa)
        else:
            mask = _window_mask(Tq, Tk, Tk, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    elif Tq == 1:
        # single-token decode: keep only the last window+1 keys (the window must hold in decode exactly as in training)
        k, v = k[:, :, -(window + 1):], v[:, :, -(window + 1):]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale, enable_gqa=gqa)
    else:
        if not _WARNED_MASKS:
            _warn_window_masks()
        # keys before (first query - window) are invisible to every query: drop them
        start = max(0, first_query_pos - window)
        k, v = k[:, :, start:], v[:, :, start:]
        mask = _window_mask(Tq, Tk - start, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)

# -----------------------------------------------------------------------------
# FlexAttention path (block-sparse sliding window)

_FLEX = None            # (flex_attention, create_block_mask): imported on first use (~0.25 s, most runs never need it)
_FLEX_COMPILED = None
_BLOCK_MASKS = {}   # (Tq, Tk, window, device) -> BlockMask, for eager callers (compiled graphs build their own)

def _flex_api():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention, create_block_mask  # lazy: ~0.25 s per process
        _FLEX = (flex_attention, create_block_mask)
    return _FLEX

def _window_block_mask(Tq: int, Tk: int, window: int, device):
    """The block-sparse form of _window_mask: query i sits at absolute position (Tk - Tq + i)."""
    offset = Tk - Tq
    create_block_mask = _flex_api()[1]

    def sliding_causal(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & (kv_idx >= q_pos - window)
    if torch.compiler.is_compiling():
        return create_block_mask(sliding_causal, None, None, Tq, Tk, device=device)
    key = (Tq, Tk, window, str(device))
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) > 64:   # varying prompt lengths: keep the cache bounded
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = create_block_mask(sliding_causal, None, None, Tq, Tk, device=device)
    return _BLOCK_MASKS[key]

def _flex(q, k, v, window: int, scale=None):
    """q (B,Tq,H,D), k/v (B,Tk,Hkv,D); the queries are the LAST Tq positions of the Tk keys."""
    global _FLEX_COMPILED
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("PICOCHAT_ATTN=flex on CPU is forward-only: FlexAttention has no CPU backward in this "
                           "torch. Unset PICOCHAT_ATTN for training on CPU (SDPA).")
    Tq, Tk = q.size(1), k.size(1)
    flex_attention = _flex_api()[0]
    mask = _window_block_mask(Tq, Tk, window, q.device)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if torch.compiler.is_compiling():   # inside a compiled model the call is fused into its graph
        fn = flex_attention
    else:   # eager flex_attention is a slow reference implementation; the compiled one is the kernel
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention)   # automatic dynamic shapes after a first recompile
        fn = _FLEX_COMPILED
    y = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)

def _windowed(q, k, v, window: int, scale=None):
    """Non-FA3 attention of the last Tq queries over Tk keys: FlexAttention where the window cuts and it is
    enabled, else SDPA."""
    Tq, Tk = q.size(1), k.size(1)
    if Tq > 1 and window < Tk - 1 and use_flex(q.device.type):
        return _flex(q, k, v, window, scale)
    return _sdpa(q, k, v, window, scale)

# -----------------------------------------------------------------------------
# Public API

def attention(q, k, v, window: int, scale: float = None):
    """Causal self-attention with a sliding window. q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D).
    scale: softmax scale (default 1/sqrt(D))."""
    if use_fa3(q.dtype, q.device.type):
        fa3 = _load_fa3()
        y = fa3.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    return _windowed(q, k, v, window, scale)

def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, window: int, pos: int = None,
                           scale: float = None):
    """Attention for inference. k_cache/v_cache (B, T_max, Hkv, D) are one layer's cache; the new k, v
    (B,T,Hkv,D) are written at position cache_seqlens (int32 (B,), all rows equal) IN PLACE, then q
    (B,T,H,D) attends causally (with the window) over everything cached so far. Works for prefill (T>1,
    also chunked onto an existing cache) and single-token decode. The caller advances cache_seqlens.
    `pos` (= cache_seqlens[0]) may be passed as a Python int to avoid a device sync per layer."""
    if use_fa3(q.dtype, q.device.type):
        fa3 = _load_fa3()
        y = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                        softmax_scale=scale, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    T = q.size(1)
    if pos is None:
        pos = int(cache_seqlens[0].item())
    if pos + T > k_cache.size(1):
        raise ValueError(f"KV cache overflow: position {pos} + {T} new tokens > cache length {k_cache.size(1)}")
    k_cache[:, pos:pos + T] = k
    v_cache[:, pos:pos + T] = v
    return _windowed(q, k_cache[:, :pos + T], v_cache[:, :pos + T], window, scale)
