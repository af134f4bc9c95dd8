"""
Full training step (forward, backward, optimizer step) in tokens/s and MFU, fp32 and bf16 side by side.

Both dtypes run in the same process and their steps alternate (fp32, bf16, fp32, ...), so a machine whose speed
drifts slows both alike and the bf16/fp32 ratio stays honest. MFU = estimate_flops() (6 x matmul weights +
attention) x tokens / time, against the peak OF THE DTYPE USED: on CPU a matmul peak measured in this run in
that dtype (before and after; the highest reading counts, so load lowers MFU instead of inflating it; the fp32
and bf16 peaks are both measured and printed, whichever dtypes are timed), on CUDA
the bf16 table. Model: vocab 32768, sequence 512, device batch 32, head_dim 64, window pattern L.
Eager (no torch.compile) unless --compile.

The learning rates follow base-train's warmup (--warmup-steps, 40 as base-train): at init the zero output
projections make the loss independent of the residual scalars, their gradient is rounding noise, and AdamW's
first steps at full LR would move them by whole LR units in a random direction (dev/LOG.md: 'bf16 learns
wrongly'). --warmup-steps 1 reproduces that.

Default dtypes: fp32, plus bf16 where this CPU (or GPU) computes bf16 natively (common.cpu_bf16_instructions);
without those instructions bf16 is emulated and ~20x slower: ask for it with --dtypes float32 bfloat16.

Examples:
    python bench/bench_train_step.py                                  # d4 and d6, 3 timed steps per dtype
    python bench/bench_train_step.py --depths 4 --steps 5 --dtypes float32 bfloat16
    python bench/bench_train_step.py --depths 6 --no-optim            # fwd+bwd only
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from picochat.stages.base_train import lr_multiplier  # noqa: E402
from picochat.common import (measure_cpu_matmul_peak, device_name, autodetect_device_type, cpu_bf16_instructions,  # noqa: E402
                             synchronize, get_peak_flops)
from picochat.gpt import build_model, config_from_depth  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

def build(depth, args, device_type, dtype):
    config = config_from_depth(depth, args.vocab_size, aspect_ratio=64, head_dim=args.head_dim,
                               max_seq_len=args.seq_len, window_pattern=args.window_pattern)
    torch.manual_seed(0)  # the same init for every dtype
    model = build_model(config, device_type, dtype)
    optimizer = None if args.no_optim else model.setup_optimizer()
    base_lrs = [g["lr"] for g in optimizer.param_groups] if optimizer else []
    fwd = torch.compile(model, dynamic=False) if args.compile else model
    return dict(model=model, fwd=fwd, optimizer=optimizer, base_lrs=base_lrs, config=config, times=[], losses=[])

def step(run, x, y, it, args, device_type):
    if run["optimizer"] is not None:
        for g, lr in zip(run["optimizer"].param_groups, run["base_lrs"]):
            g["lr"] = lr * lr_multiplier(it, 10 ** 6, args.warmup_steps, 0.0, 0.0)
    t0 = time.perf_counter()
    loss = run["fwd"](x, y)
    loss.backward()
    if run["optimizer"] is not None:
        run["optimizer"].step()
    run["model"].zero_grad(set_to_none=True)
    synchronize(device_type)
    run["times"].append(time.perf_counter() - t0)
    run["losses"].append(loss.item())

def peak_for(dtype, device_type, size=1024):
    if device_type == "cpu":
        return measure_cpu_matmul_peak(n=size, dtype=dtype)
    return get_peak_flops(device_name(device_type)) or float("nan")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths to time")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="compute dtypes (default: float32, plus bfloat16 where it is native)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width")
    p.add_argument("--window-pattern", type=str, default="L", help="attention window pattern")
    p.add_argument("--steps", type=int, default=3, help="timed steps per dtype after the first (warm-up) step")
    p.add_argument("--warmup-steps", type=int, default=40, help="LR warmup steps, as base-train")
    p.add_argument("--device-type", type=str, default="cpu", help="cpu|cuda|mps (empty = autodetect)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default on CPU)")
    p.add_argument("--no-optim", action="store_true", help="time forward+backward only")
    p.add_argument("--peak-size", type=int, default=1024, help="matrix size of the CPU matmul peak measurement")
    args = p.parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    native_bf16 = device_type == "cuda" or (device_type == "cpu" and bool(cpu_bf16_instructions()))
    names = args.dtypes or (["float32", "bfloat16"] if native_bf16 else ["float32"])
    isa = cpu_bf16_instructions() if device_type == "cpu" else ""
    print(f"device {device_name(device_type)} ({device_type}), threads {torch.get_num_threads()}, "
          f"native bf16: {isa or ('yes' if native_bf16 else 'no')}, dtypes {names}")
    # both matmul peaks, whichever dtypes are timed: their ratio is what bf16 could gain on this machine
    peak_names = sorted(set(names) | ({"float32", "bfloat16"} if device_type == "cpu" else set()))
    peaks = {n: peak_for(DTYPES[n], device_type, args.peak_size) for n in peak_names}

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device_type)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device_type)
    rows = []
    for depth in args.depths:
        runs = {n: build(depth, args, device_type, DTYPES[n]) for n in names}
        for it in range(args.steps + 1):  # alternate the dtypes step by step
            for n in names:
                step(runs[n], x, y, it, args, device_type)
                print(f"  d{depth} {n:8s} step {it}: {runs[n]['times'][-1]:.2f}s loss {runs[n]['losses'][-1]:.3f}",
                      flush=True)
        for n in names:
            r = runs[n]
            dt = min(r["times"][1:])
            rows.append(dict(depth=depth, dtype=n, n_embd=r["config"].n_embd,
                             params=sum(q.numel() for q in r["model"].parameters()),
                             flops_per_token=r["model"].estimate_flops(), first_step_s=round(r["times"][0], 2),
                             step_s=round(dt, 3), tok_per_s=round(args.batch_size * args.seq_len / dt, 1),
                             losses=[round(v, 4) for v in r["losses"]]))
        del runs
    if device_type == "cpu":  # a reading depressed by load must not inflate MFU: keep the highest
        peaks = {n: max(peaks[n], peak_for(DTYPES[n], device_type, args.peak_size)) for n in peak_names}
    for r in rows:
        r["peak_flops"] = peaks[r["dtype"]]
        r["mfu"] = round(100 * r["flops_per_token"] * r["tok_per_s"] / peaks[r["dtype"]], 2)
    print("matmul peaks (MFU uses the row's dtype): " + ", ".join(f"{n} {peaks[n] / 1e9:.1f} GFLOP/s" for n in peak_names)
          + (f"; bf16/fp32 {peaks['bfloat16'] / peaks['float32']:.2f}x" if {"float32", "bfloat16"} <= set(peaks) else ""))
    print(f"{'depth':>5} {'dtype':>9} {'width':>5} {'params':>12} {'flops/tok':>10} {'first s':>8} {'step s':>7} "
          f"{'tok/s':>9} {'MFU %':>6} {'vs fp32':>7}")
    fp32 = {r["depth"]: r["tok_per_s"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        ratio = f"{r['tok_per_s'] / fp32[r['depth']]:.2f}x" if r["depth"] in fp32 else "-"
        r["speedup_vs_fp32"] = ratio
        print(f"{r['depth']:>5} {r['dtype']:>9} {r['n_embd']:>5} {r['params']:>12,} {r['flops_per_token']:>10.3e} "
              f"{r['first_step_s']:>8.2f} {r['step_s']:>7.3f} {r['tok_per_s']:>9.1f} {r['mfu']:>6.2f} {ratio:>7}")
    print(json.dumps(dict(bench="train_step", device=device_name(device_type), bf16_isa=isa, seq_len=args.seq_len,
                          batch_size=args.batch_size, head_dim=args.head_dim, window_pattern=args.window_pattern,
                          warmup_steps=args.warmup_steps, compile=args.compile, peak_flops=peaks, results=rows)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
