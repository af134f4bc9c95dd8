"""
Optimizer step time: MuonAdamW.step() on the real GPT parameter groups (GPT.setup_optimizer) with random grads.
Prints a table (ms per step, the AdamW and Muon shares, parameter count) and a final JSON line.

    python bench/bench_optim.py                        # d4 and d6 on CPU, vocab 32768
    python bench/bench_optim.py --depths 12 20 --device-type cuda --steps 20    # on a GPU (fused updates compiled)

The first step is timed separately: on CUDA it includes torch.compile of the fused updates; on CPU it should
be as fast as the others (no compile there).
"""
import argparse
import json
import time

import torch

from picochat.common import autodetect_device_type, compute_dtype_for, synchronize
from picochat.gpt import build_model, config_from_depth

def bench_depth(depth, device_type, steps, vocab_size, kinds=("adamw", "muon")):
    device = torch.device(device_type)
    dtype = compute_dtype_for(device_type)
    model = build_model(config_from_depth(depth, vocab_size), device, dtype)
    opt = model.setup_optimizer()
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * 1e-3
    groups = opt.param_groups
    results = {}
    t0 = time.perf_counter()
    opt.step()
    synchronize(device_type)
    results["first_step_s"] = time.perf_counter() - t0
    def timed(selected):
        opt.param_groups = selected
        try:
            synchronize(device_type)
            t = time.perf_counter()
            for _ in range(steps):
                opt.step()
            synchronize(device_type)
            return (time.perf_counter() - t) / steps * 1e3
        finally:
            opt.param_groups = groups
    results["step_ms"] = timed(groups)
    for kind in kinds:
        results[f"{kind}_ms"] = timed([g for g in groups if g["kind"] == kind])
    results["params"] = sum(p.numel() for p in model.parameters())
    results["muon_params"] = sum(p.numel() for g in groups if g["kind"] == "muon" for p in g["params"])
    return results

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--device-type", default="", help="cpu|cuda|mps (default: autodetect)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--vocab-size", type=int, default=32768)
    args = parser.parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    rows = []
    print(f"{'depth':>5} {'params':>12} {'muon params':>12} {'first step s':>13} {'step ms':>9} {'adamw ms':>9} {'muon ms':>9}")
    for depth in args.depths:
        r = bench_depth(depth, device_type, args.steps, args.vocab_size)
        r["depth"] = depth
        rows.append(r)
        print(f"{depth:>5} {r['params']:>12,} {r['muon_params']:>12,} {r['first_step_s']:>13.2f} {r['step_ms']:>9.1f} "
              f"{r['adamw_ms']:>9.1f} {r['muon_ms']:>9.1f}")
    print(json.dumps({"bench": "optim", "device_type": device_type, "threads": torch.get_num_threads(), "results": rows}))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
