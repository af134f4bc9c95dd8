"""
Inference benchmark through the Engine: prefill throughput, TTFT, TPOT and decode tokens/s over a batch-size
sweep, with MFU and MBU against the device's peaks. Works on CUDA and CPU.

    picochat infer-bench                                   # latest base checkpoint, device defaults
    picochat infer-bench -i sft -g d12 --batch-sizes 1,8,32,128
    picochat infer-bench --random-init --depth 4           # no checkpoint needed (random weights)
    picochat infer-bench --random-init --depth 6 --device-type cpu --prompt-tokens 256 --decode-tokens 32

Defaults: CUDA --prompt-tokens 2048 --decode-tokens 256 --batch-sizes 1,8,32,128 (the reference's);
CPU 256 / 32 / 1,4,16. The prompt is clamped so prompt + decode <= sequence_len.
Peaks: CUDA uses the dense bf16 FLOP/s and HBM bandwidth tables in common.py (null when the GPU is
unknown); CPU MFU is against a measured fp32 matmul peak and MBU is null (no trustworthy bandwidth peak).
Stop tokens and the tool state machine are disabled here, so every run decodes exactly the same
number of tokens. The last stdout line is one JSON document.
"""
import os
import json
import time
import argparse
import statistics
from collections import Counter

import torch
import torch.nn as nn

from picochat.common import (HelpFormatter, compute_init, synchronize, device_name, get_peak_flops, get_peak_bandwidth,
                             measure_cpu_matmul_peak, print0)
from picochat.gpt import config_from_depth, build_model
from picochat.tokenizer import get_tokenizer
from picochat.checkpoint import load_model
from picochat.engine import DECODE_COPY_MAX_ROWS, DECODE_DTYPES, Engine, resolve_decode_dtype

PARAGRAPH = ("The history of science is the study of the development of science and scientific knowledge, "
             "including both the natural and social sciences. Science is a body of empirical, theoretical, "
             "and practical knowledge about the natural world, produced by scientists who emphasize the "
             "observation, explanation, and prediction of real-world phenomena. ")

class _BenchTokenizer:
    """Just enough tokenizer for the Engine when benchmarking random weights without a trained tokenizer:
    the 9 special tokens take the last ids of the vocab."""
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    def __init__(self, vocab_size):
        self.ids = {s: vocab_size - len(self.SPECIALS) + i for i, s in enumerate(self.SPECIALS)}
    def encode_special(self, s):
        return self.ids[s]
    def get_bos_token_id(self):
        return self.ids["<|bos|>"]
    def decode(self, ids):
        return ""
    def encode(self, text, *a, **k):
        return []

# -----------------------------------------------------------------------------
# Analytical model (FLOPs and bytes per token)

def static_card(model, prompt_tokens, decode_tokens):
    cfg = model.config
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    itemsize = torch.empty(0, dtype=model.compute_dtype).element_size()
    windows = list(model.window_sizes)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    dtypes = Counter()
    for p in params:
        dtypes[str(p.dtype).removeprefix("torch.")] += p.numel()
    kv_per_token = cfg.n_layer * 2 * Hkv * D * itemsize
    ctx_mid = prompt_tokens + decode_tokens // 2
    kv_read = sum(2 * Hkv * D * itemsize * min(ctx_mid, w) for w in windows)
    decode_flops = 2 * n_matmul + sum(4 * H * D * min(ctx_mid, w) for w in windows)
    def prefill_flops(n):
        attn = 0
        for w in windows:
            w = min(w, n)
            attn += 4 * H * D * (w * (w + 1) // 2 + (n - w) * w)
        # the engine's prefill runs the lm_head on the last position only (the only logits it samples from)
        head = model.lm_head.weight.numel() if hasattr(model, "final_hidden") else 0
        return 2 * (n_matmul - head) * n + 2 * head + attn
    return dict(num_params=sum(p.numel() for p in params), param_dtypes=dict(dtypes), weight_bytes=weight_bytes,
                kv_bytes_per_token=kv_per_token, kv_read_bytes_per_step=kv_read, context_mid=ctx_mid,
                decode_flops_per_token=decode_flops, prefill_flops=prefill_flops(prompt_tokens), n_matmul=n_matmul)

def device_memory_bytes(device_type):
    if device_type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None

# -----------------------------------------------------------------------------

def timed_run(engine, prompt, batch_size, decode_tokens, temperature, device_type):
    """(ttft, [step times]) for one engine.generate call: TTFT = until the first column (prefill, cache
    clone, first sample); each later step = one decode forward + sample (the .tolist() syncs the device)."""
    synchronize(device_type)
    t0 = time.perf_counter()
    last, ttft, steps = t0, None, []
    for _ in engine.generate(prompt, num_samples=batch_size, max_tokens=decode_tokens, temperature=temperature, seed=0):
        now = time.perf_counter()
        if ttft is None:
            ttft = now - t0
        else:
            steps.append(now - last)
        last = now
    return ttft, steps

def load(args, rt):
    if args.random_init:
        try:
            tokenizer = get_tokenizer()
            vocab = tokenizer.get_vocab_size()
        except Exception:  # no trained tokenizer: benchmark with a stand-in (random prompt ids)
            tokenizer, vocab = None, args.vocab_size
        cfg = config_from_depth(args.depth, vocab, max_seq_len=args.max_seq_len, window_pattern=args.window_pattern)
        model = build_model(cfg, rt.device, rt.dtype)
        if tokenizer is None:
            tokenizer = _BenchTokenizer(vocab)
        return model, tokenizer, {"source": "random-init", "step": None}
    model, tokenizer, meta = load_model(args.source, rt.device, phase="eval", model_tag=args.model_tag, step=args.step)
    return model, tokenizer, {"source": args.source, "step": meta.get("step")}

def main(argv=None):
    parser = argparse.ArgumentParser(prog="picochat infer-bench", description="Inference benchmark (prefill, TTFT, TPOT, MBU/MFU)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-i", "--source", default="base", choices=["base", "sft", "rl"], help='checkpoint stage')
    parser.add_argument("-g", "--model-tag", default=None,
                        help='model tag, e.g. d12 (default: the deepest model of that stage)')
    parser.add_argument("-s", "--step", type=int, default=None, help='checkpoint step (default: the last complete one)')
    parser.add_argument("--random-init", action="store_true", help="benchmark random weights (no checkpoint)")
    parser.add_argument("--depth", type=int, default=4, help="model depth for --random-init")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="sequence_len for --random-init")
    parser.add_argument("--window-pattern", default="SSSL", help="window pattern for --random-init")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab for --random-init without a tokenizer")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: 2048 on CUDA, 256 on CPU")
    parser.add_argument("--decode-tokens", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--batch-sizes", default=None, help="comma list; default 1,8,32,128 on CUDA, 1,4,16 on CPU")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help='sampling temperature (0: greedy)')
    parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"],
                        help='cuda|cpu|mps (default: autodetect) (empty: autodetect)')
    parser.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES,
                        help="weights decode runs with: auto = a bf16 copy where the model computes in fp32 on CPU "
                             "(what `picochat chat` and `serve` do), model = the model's own")
    args = parser.parse_args(argv)

    rt = compute_init(args.device_type)
    cuda = rt.device_type == "cuda"
    prompt_tokens = args.prompt_tokens or (2048 if cuda else 256)
    decode_tokens = args.decode_tokens or (256 if cuda else 32)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8,32,128" if cuda else "1,4,16")).split(",") if b.strip()]
    if decode_tokens < 2 or not batch_sizes or min(batch_sizes) < 1:
        parser.error("--decode-tokens must be >= 2 and --batch-sizes positive integers")

    model, tokenizer, info = load(args, rt)
    model.eval()
    T = model.config.sequence_len
    prompt_tokens = max(1, min(prompt_tokens, T - decode_tokens))
    decode_dtype, decode_note = resolve_decode_dtype(args.decode_dtype, model)
    engine = Engine(model, tokenizer, decode_dtype=decode_dtype)
    print0(decode_note)
    engine.assistant_end = engine.bos = engine.python_start = -1  # never stop early, never call tools
    if isinstance(tokenizer, _BenchTokenizer):
        g = torch.Generator().manual_seed(0)
        prompt = [tokenizer.get_bos_token_id()] + torch.randint(0, model.config.vocab_size - 9, (prompt_tokens - 1,),
                                                                generator=g).tolist()
    else:
        text = PARAGRAPH
        while len(tokenizer.encode(text)) < prompt_tokens:
            text += PARAGRAPH
        prompt = tokenizer.encode(text, prepend="<|bos|>")[:prompt_tokens]

    name = device_name(rt.device_type)
    card = static_card(engine.decode_model, prompt_tokens, decode_tokens)   # the weights decode reads
    if cuda:
        peak_flops, peak_bw = get_peak_flops(name), get_peak_bandwidth(name)
    else:
        peak_flops, peak_bw = measure_cpu_matmul_peak(dtype=rt.dtype), None
    mem = device_memory_bytes(rt.device_type)
    ceiling = peak_bw / (card["weight_bytes"] + card["kv_read_bytes_per_step"]) if peak_bw else None
    max_rows = int((mem - card["weight_bytes"]) // (card["kv_bytes_per_token"] * T)) if mem else None
    pct = lambda num, peak: 100.0 * num / peak if peak else None

    print0(f"device: {name} ({rt.device_type}, {str(rt.dtype).removeprefix('torch.')})  model: {info['source']} "
           f"step {info['step']}  depth {model.config.n_layer}  params {card['num_params']:,}")
    print0(f"weights {card['weight_bytes'] / 1e6:.1f} MB  kv/token {card['kv_bytes_per_token'] / 1e3:.1f} kB  "
           f"kv read/step {card['kv_read_bytes_per_step'] / 1e6:.2f} MB  peak FLOP/s "
           f"{peak_flops if peak_flops is None else f'{peak_flops:.3g}'}  peak B/s {peak_bw}")

    # prefill: batch 1, 2 decode tokens; one warmup, one timed run; TTFT = prefill time
    timed_run(engine, prompt, 1, 2, args.temperature, rt.device_type)
    prefill_time, _ = timed_run(engine, prompt, 1, 2, args.temperature, rt.device_type)
    prefill = dict(tok_per_sec=prompt_tokens / prefill_time, time_sec=prefill_time,
                   mfu_percent=pct(card["prefill_flops"] / prefill_time, peak_flops))
    print0(f"prefill {prompt_tokens} tokens: {prefill_time * 1e3:.1f} ms  {prefill['tok_per_sec']:.0f} tok/s  "
           f"MFU {'n/a' if prefill['mfu_percent'] is None else format(prefill['mfu_percent'], '.2f') + '%'}")

    sweep = []
    fmt = lambda v, f: "n/a" if v is None else f.format(v)
    print0(f"{'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'MBU %':>7} {'MFU %':>7} {'peak MB':>9} {'steps':>6}")
    for b in batch_sizes:
        try:
            timed_run(engine, prompt, b, 8, args.temperature, rt.device_type)  # warmup
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            ttft, steps = timed_run(engine, prompt, b, decode_tokens, args.temperature, rt.device_type)
        except torch.OutOfMemoryError:
            print0(f"{b:>6} out of memory; stopping the sweep")
            if cuda:
                torch.cuda.empty_cache()
            break
        tpot = statistics.median(steps)
        row = dict(batch_size=b, ttft_sec=ttft, tpot_sec=tpot, tok_per_sec=b * len(steps) / sum(steps),
                   mbu_percent=pct((card["weight_bytes"] + b * card["kv_read_bytes_per_step"]) / tpot, peak_bw),
                   mfu_percent=pct(b * card["decode_flops_per_token"] / tpot, peak_flops),
                   peak_vram_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                   decode_steps=len(steps) + 1)
        sweep.append(row)
        flag = "" if row["decode_steps"] == decode_tokens else " (stopped early)"
        print0(f"{b:>6} {ttft * 1e3:>9.1f} {tpot * 1e3:>9.2f} {row['tok_per_sec']:>10.1f} "
               f"{fmt(row['mbu_percent'], '{:.2f}'):>7} {fmt(row['mfu_percent'], '{:.2f}'):>7} "
               f"{fmt(row['peak_vram_bytes'] and row['peak_vram_bytes'] / 1e6, '{:.0f}'):>9} {row['decode_steps']:>6}{flag}")

    result = dict(
        source=info["source"], step=info["step"], model_config=model.config.to_dict(), gpu=name if cuda else None,
        device=name, device_type=rt.device_type, compute_dtype=str(rt.dtype).removeprefix("torch."),
        decode_dtype=str(engine.decode_model.compute_dtype).removeprefix("torch."),   # for batches up to:
        decode_copy_max_rows=DECODE_COPY_MAX_ROWS if engine.decode_model is not model else None,
        peak_bandwidth_bytes_per_sec=peak_bw, total_vram_bytes=mem if cuda else None, total_memory_bytes=mem,
        num_params=card["num_params"], param_dtypes=card["param_dtypes"], weight_bytes=card["weight_bytes"],
        kv_bytes_per_token=card["kv_bytes_per_token"], kv_read_bytes_per_step=card["kv_read_bytes_per_step"],
        context_mid=card["context_mid"], peak_flops_per_sec=peak_flops,
        peak_flops_kind="dense bf16 table" if cuda else "measured fp32 matmul",
        decode_flops_per_token=card["decode_flops_per_token"], ceiling_bs1_tok_per_sec=ceiling,
        max_full_context_rows=max_rows, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        temperature=args.temperature, prefill=prefill, sweep=sweep)
    print0(json.dumps(result))
    return 0
