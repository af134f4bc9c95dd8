"""
Sliding-window attention without FA3: PyTorch SDPA with a dense boolean mask (what picochat does today) against
FlexAttention with a block-sparse mask (compiled), at one layer of a d6 model (width 384, head dim 128, 3 heads)
at seq 2048 with the S window (512). Timed alternately; forward only when FlexAttention has no backward on the
device (CPU in torch 2.13), which the output says.

    python bench/bench_flex_attention.py                      # CPU, batch 4
    python bench/bench_flex_attention.py --device cuda --batch 16
"""
import time
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention, create_block_mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    dev, T, W = torch.device(args.device), args.seq, args.window
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(args.batch, args.heads, T, args.head_dim, device=dev, dtype=dtype) for _ in range(3))
    pos = torch.arange(T, device=dev)
    dense = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - W)
    block = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (ki >= qi - W), None, None, T, T, device=dev)
    backward = True
    try:  # asked of the eager function on a tiny input: a failed compile would leave the compiled one eager
        tiny = [torch.randn(1, 1, 128, 16, device=dev, requires_grad=True) for _ in range(3)]
        flex_attention(*tiny).sum().backward()
    except NotImplementedError as e:
        backward = False
        print(f"FlexAttention backward unavailable on {dev.type}: {e}")
    flex = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        out = flex(q, k, v, block_mask=block)
    print(f"max |flex - sdpa| = {(out.float() - ref.float()).abs().max().item():.2e}")

    def timed(fn):
        ins = [t.clone().requires_grad_(backward) for t in (q, k, v)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            y = fn(*ins)
        if backward:
            y.sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense)
    fx = lambda a, b, c: flex(a, b, c, block_mask=block)
    times = {"sdpa+mask": [], "flex": []}
    for _ in range(args.repeats):  # alternated, so machine drift hits both alike
        times["sdpa+mask"].append(timed(sdpa))
        times["flex"].append(timed(fx))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    what = "forward+backward" if backward else "forward only"
    print(f"{dev.type}, B={args.batch} H={args.heads} T={T} D={args.head_dim} window={W}, {what}, median of "
          f"{args.repeats}: sdpa+mask {med['sdpa+mask'] * 1e3:.1f} ms, flex {med['flex'] * 1e3:.1f} ms, "
          f"speedup {med['sdpa+mask'] / med['flex']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
