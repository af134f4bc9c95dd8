"""
Full training step (forward, backward, optimizer step) in tokens/s and MFU, on CPU by default.

MFU = estimate_flops() (reference 6.8: 6 * matmul weights + attention) * tokens / time, against this
machine's fp32 matmul peak measured in the same run (common.measure_cpu_matmul_peak), measured before and after
each model; the HIGHEST reading is used, so a busy machine lowers the MFU instead of inflating it. Run it on a
quiet machine: other processes on the 2 cores distort every number here. Model: vocab 32768,
sequence 512, device batch 32, head_dim 64, window pattern L (the reference CPU recipe's --head-dim=64
--window-pattern=L; SDPA has no native sliding window). Eager (no torch.compile) unless --compile.

Examples:
    python bench/bench_train_step.py                       # d4 and d6, 3 timed steps each
    python bench/bench_train_step.py --depths 6 --steps 5
    python bench/bench_train_step.py --depths 6 --no-optim  # fwd+bwd only
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from picochat.common import measure_cpu_matmul_peak, device_name, autodetect_device_type, compute_dtype_for, synchronize, get_peak_flops  # noqa: E402
from picochat.gpt import build_model, config_from_depth  # noqa: E402

def bench_depth(depth, args, device_type, dtype, peak):
    config = config_from_depth(depth, args.vocab_size, aspect_ratio=64, head_dim=args.head_dim,
                               max_seq_len=args.seq_len, window_pattern=args.window_pattern)
    torch.manual_seed(0)
    model = build_model(config, device_type, dtype)
    if args.compile:
        model = torch.compile(model, dynamic=False)
    optimizer = None
    if not args.no_optim:
        try:
            optimizer = (model._orig_mod if args.compile else model).setup_optimizer()
        except ImportError as e:
            print(f"  (optimizer unavailable: {e}; timing forward+backward only)")
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device_type)
    y = torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device_type)
    flops_per_token = (model._orig_mod if args.compile else model).estimate_flops()

    def step():
        loss = model(x, y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize(device_type)
        return loss.item()

    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        print(f"  d{depth} step {i}: {times[-1]:.2f}s loss {loss:.3f}", flush=True)
    first, dt = times[0], min(times[1:])
    tok_s = B * T / dt
    mfu = 100 * flops_per_token * tok_s / peak
    return dict(depth=depth, n_embd=config.n_embd, n_head=config.n_head, params=sum(p.numel() for p in model.parameters()),
                flops_per_token=flops_per_token, first_step_s=round(first, 2), step_s=round(dt, 3),
                tok_per_s=round(tok_s, 1), mfu=round(mfu, 2), optimizer=optimizer is not None)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window-pattern", type=str, default="L")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (warm-up) step")
    p.add_argument("--device-type", type=str, default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default on CPU)")
    p.add_argument("--no-optim", action="store_true", help="time forward+backward only")
    args = p.parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    dtype = compute_dtype_for(device_type)
    if device_type == "cpu":
        peak = measure_cpu_matmul_peak()
        peak_src = "measured fp32 matmul"
    else:
        peak = get_peak_flops(device_name(device_type)) or measure_cpu_matmul_peak()
        peak_src = "table"
    print(f"device {device_name(device_type)} ({device_type}), threads {torch.get_num_threads()}, dtype {dtype}, "
          f"peak {peak / 1e9:.1f} GFLOP/s ({peak_src})")
    rows = []
    for d in args.depths:
        r = bench_depth(d, args, device_type, dtype, peak)
        if device_type == "cpu":
            peak = max(peak, measure_cpu_matmul_peak())  # a reading depressed by load must not inflate MFU
        rows.append(r)
    for r in rows:  # all rows against the final (highest) peak
        r["mfu"] = round(100 * r["flops_per_token"] * r["tok_per_s"] / peak, 2)
    print(f"peak used for MFU: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'depth':>5} {'width':>5} {'params':>12} {'flops/tok':>10} {'first s':>8} {'step s':>7} {'tok/s':>9} {'MFU %':>6}")
    for r in rows:
        print(f"{r['depth']:>5} {r['n_embd']:>5} {r['params']:>12,} {r['flops_per_token']:>10.3e} {r['first_step_s']:>8.2f} "
              f"{r['step_s']:>7.3f} {r['tok_per_s']:>9.1f} {r['mfu']:>6.2f}")
    print(json.dumps(dict(bench="train_step", device=device_name(device_type), peak_flops=peak, seq_len=args.seq_len,
                          batch_size=args.batch_size, head_dim=args.head_dim, window_pattern=args.window_pattern,
                          compile=args.compile, results=rows)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
