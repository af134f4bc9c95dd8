"""
Where a training step's time goes, per op and per compute dtype: the torch profiler's self time of every aten op in
one step of each dtype, side by side, and a dtype census of the same step.

The census is what makes a bf16 step slow on ANY machine, fast or not at bf16: it follows every aten call of one
step (forward, backward, optimizer) and reports
  - the matmul FLOPs (mm, addmm, bmm, baddbmm, attention) by the dtype they ran in: on a CPU with native bf16 a
    matmul left in fp32 runs 3-4x slower than its neighbours, so a bf16 step should run ~100% of them in bf16;
  - the bytes written by explicit casts between dtypes per step (copy_/to; a mixed-dtype op such as tanh of a
    bf16 tensor into an fp32 one converts inside and is not counted, though it costs more: see cpu_kernels).
The profiler table is this machine's timing: on a CPU without native bf16 (AVX2 only) every bf16 matmul is
emulated and ~20x slower, so read its matmul rows only on a bf16 CPU; the elementwise rows hold everywhere.

Examples:
    python bench/profile_train_step.py                                      # d4, batch 8, fp32 and bf16
    python bench/profile_train_step.py --depth 6 --batch-size 32 --top 30   # the issue's shape
    python bench/profile_train_step.py --dtypes bfloat16 --no-profile       # the census only (fast)
"""
import argparse
import collections
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from picochat.gpt import build_model, config_from_depth  # noqa: E402
from picochat.stages.base_train import lr_multiplier  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# ops whose cost is a matrix product: the ones a native-bf16 CPU speeds up 3-4x
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::linear",
              "aten::matmul", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _matmul_flops(name, args):
    """FLOPs of one matmul-class aten call, or 0 for any other op."""
    if name in ("aten.mm", "aten.bmm"):
        a, b = args[0], args[1]
        return 2 * a.numel() * b.shape[-1]
    if name in ("aten.addmm", "aten.addmm_", "aten.baddbmm", "aten.baddbmm_"):
        a, b = args[1], args[2]
        return 2 * a.numel() * b.shape[-1]
    if name.startswith("aten._scaled_dot_product"):
        q, k = args[0], args[1]  # (B, H, T, D): QK^T and PV, counted in full (the kernel skips masked blocks)
        forward = 4 * q.numel() * k.shape[-2]
        return 2 * forward if name.endswith("backward") else forward
    return 0


def _operand_dtype(name, args):
    """The dtype a matmul-class call multiplies in: its matrix operands' (q, k, v for attention, whose backward
    also takes the fp32 log-sum-exp), the wider of the two if they differ."""
    if name.startswith("aten._scaled_dot_product"):
        return args[1].dtype if name.endswith("backward") else args[0].dtype  # backward: (grad_out, q, k, v, ...)
    a, b = (args[0], args[1]) if name in ("aten.mm", "aten.bmm") else (args[1], args[2])
    return max(a.dtype, b.dtype, key=lambda d: torch.finfo(d).bits)


class DtypeCensus(TorchDispatchMode):
    """Counts, for every aten call made while active: matmul FLOPs by the dtype of the matrices multiplied,
    and the bytes written by casts from one dtype to another."""

    def __init__(self):
        super().__init__()
        self.matmul_flops = collections.Counter()  # (op, dtype) -> FLOPs
        self.cast_bytes = collections.Counter()    # "src->dst" -> bytes written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func._overloadpacket)
        floats = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.is_floating_point()]
        flops = _matmul_flops(name, args)
        if flops:
            self.matmul_flops[(name, str(_operand_dtype(name, args)).replace("torch.", ""))] += flops
        if name in ("aten._to_copy", "aten.copy_") and isinstance(out, torch.Tensor) and out.is_floating_point():
            src = [a for a in floats if a is not out]
            if src and src[-1].dtype != out.dtype:
                key = f"{str(src[-1].dtype).replace('torch.', '')}->{str(out.dtype).replace('torch.', '')}"
                self.cast_bytes[key] += out.numel() * out.element_size()
        return out

    def flops_by_dtype(self):
        by = collections.Counter()
        for (_, dt), f in self.matmul_flops.items():
            by[dt] += f
        return by

    def share(self, dtype_name):
        """Fraction of the matmul FLOPs that ran in `dtype_name`."""
        by = self.flops_by_dtype()
        total = sum(by.values())
        return by[dtype_name] / total if total else float("nan")


def build(depth, args, dtype):
    config = config_from_depth(depth, args.vocab_size, aspect_ratio=64, head_dim=args.head_dim,
                               max_seq_len=args.seq_len, window_pattern=args.window_pattern)
    torch.manual_seed(0)
    model = build_model(config, "cpu", dtype)
    optimizer = model.setup_optimizer()
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    return model, optimizer, base_lrs


def train_step(model, optimizer, base_lrs, x, y, it, warmup_steps):
    for g, lr in zip(optimizer.param_groups, base_lrs):
        g["lr"] = lr * lr_multiplier(it, 10 ** 6, warmup_steps, 0.0, 0.0)
    loss = model(x, y)
    loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return loss.item()


def census_of_step(depth, dtype, args, x, y):
    """The dtype census of one training step (after one warm-up step, so the optimizer state exists)."""
    model, optimizer, base_lrs = build(depth, args, dtype)
    train_step(model, optimizer, base_lrs, x, y, 0, args.warmup_steps)
    census = DtypeCensus()
    with census:
        train_step(model, optimizer, base_lrs, x, y, 1, args.warmup_steps)
    return census


def profile_step(depth, dtype, args, x, y):
    """Self CPU time (ms) per aten op over args.steps profiled steps, averaged per step."""
    model, optimizer, base_lrs = build(depth, args, dtype)
    train_step(model, optimizer, base_lrs, x, y, 0, args.warmup_steps)  # warm-up: allocations, optimizer state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for it in range(args.steps):
            train_step(model, optimizer, base_lrs, x, y, 1 + it, args.warmup_steps)
    return {e.key: e.self_cpu_time_total / 1000 / args.steps for e in prof.key_averages() if e.key.startswith("aten::")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="model depth")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"],
                   help="compute dtypes to profile (the first is the baseline of the ratio column)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--head-dim", type=int, default=64, help="attention head width")
    p.add_argument("--window-pattern", type=str, default="L", help="attention window pattern")
    p.add_argument("--warmup-steps", type=int, default=40, help="LR warmup steps, as base-train")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per dtype (after one warm-up step)")
    p.add_argument("--top", type=int, default=20, help="ops shown in the profiler table")
    p.add_argument("--no-profile", action="store_true", help="the dtype census only")
    args = p.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, depth {args.depth}, batch {args.batch_size}x{args.seq_len}, "
          f"vocab {args.vocab_size}, dtypes {args.dtypes}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen)

    result = dict(bench="profile_train_step", depth=args.depth, batch_size=args.batch_size, seq_len=args.seq_len,
                  vocab_size=args.vocab_size, census={}, profile={})
    print("\n## dtype census of one step (machine-independent)")
    print(f"{'compute':>9} | {'matmul GFLOP':>12} | matmul FLOPs by dtype | casts per step")
    for name in args.dtypes:
        census = census_of_step(args.depth, DTYPES[name], args, x, y)
        by = census.flops_by_dtype()
        total = sum(by.values())
        shares = ", ".join(f"{dt} {100 * f / total:.1f}%" for dt, f in by.most_common())
        casts = ", ".join(f"{k} {b / 1e6:.1f} MB" for k, b in census.cast_bytes.most_common()) or "none"
        print(f"{name:>9} | {total / 1e9:>12.2f} | {shares} | {casts}")
        result["census"][name] = dict(matmul_flops=dict(by), cast_bytes=dict(census.cast_bytes),
                                      matmul_by_op={f"{op} {dt}": f for (op, dt), f in census.matmul_flops.items()})
    if not args.no_profile:
        times = {name: profile_step(args.depth, DTYPES[name], args, x, y) for name in args.dtypes}
        base, last = args.dtypes[0], args.dtypes[-1]
        ops = sorted(set().union(*times.values()), key=lambda k: -times[last].get(k, 0.0))[:args.top]
        print(f"\n## self CPU time per step (ms), torch profiler, {args.steps} steps each; * = matmul-class op")
        print(f"{'op':<58} " + " ".join(f"{n:>10}" for n in args.dtypes) + (f" {last + '/' + base:>18}" if len(args.dtypes) > 1 else ""))
        for op in ops:
            row = " ".join(f"{times[n].get(op, 0.0):>10.1f}" for n in args.dtypes)
            ratio = ""
            if len(args.dtypes) > 1 and times[base].get(op):
                ratio = f" {times[last].get(op, 0.0) / times[base][op]:>17.2f}x"
            mark = "*" if op in MATMUL_OPS else " "
            print(f"{mark}{op[:57]:<57} {row}{ratio}")
        totals = " ".join(f"{sum(times[n].values()):>10.1f}" for n in args.dtypes)
        print(f"{' all aten ops':<58} {totals}")
        result["profile"] = {n: {op: round(ms, 3) for op, ms in t.items()} for n, t in times.items()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
