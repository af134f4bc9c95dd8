"""
Batch-1 prefill and decode, picochat's Engine against nanochat's, side by side in one process.

Both models get the SAME weights (picochat's state-dict keys are nanochat's), the same prompt and greedy
decoding. Each engine runs as its users get it by default: nanochat in fp32 (its CPU default), picochat with its
default --decode-dtype auto (a bf16-weight copy for decode on an fp32 CPU, prefill in fp32), so the tokens may
differ; with --decode-dtype model both decode in fp32 and must produce the same tokens (checked and reported). Each round times picochat then
nanochat (alternated, so a machine whose speed drifts slows both alike); medians over the rounds are reported.
  prefill tok/s = prompt tokens / time to the first sampled token (prefill + one sampling step)
  decode  tok/s = (new tokens - 1) / time for the tokens after the first
nanochat's code stays outside this repository: pass the path of a nanochat checkout (HEAD). Without one the
script says so and exits 0.

    python bench/bench_decode_vs_nanochat.py --nanochat /tmp/nanochat                 # d6, 256 + 128 tokens
    python bench/bench_decode_vs_nanochat.py --nanochat /tmp/nanochat --depth 4 --rounds 7
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from picochat.common import device_name  # noqa: E402
from picochat.engine import DECODE_DTYPES, Engine, resolve_decode_dtype  # noqa: E402
from picochat.gpt import build_model, config_from_depth  # noqa: E402
from picochat.stages.infer_bench import _BenchTokenizer  # noqa: E402

class _NeverStopTokenizer(_BenchTokenizer):
    """Special tokens outside the vocab: neither engine stops early or calls a tool."""
    def __init__(self, vocab_size):
        super().__init__(vocab_size)
        self.ids = {s: -100 - i for i, s in enumerate(self.SPECIALS)}

def timed_generate(engine, prompt, new_tokens):
    """(seconds to the first token, seconds for the rest, the tokens)."""
    t0 = time.perf_counter()
    gen = engine.generate(prompt, num_samples=1, max_tokens=new_tokens, temperature=0.0, seed=0)
    tokens, t_first = [], None
    for column, _ in gen:
        tokens.append(column[0])
        if t_first is None:
            t_first = time.perf_counter()
    return t_first - t0, time.perf_counter() - t_first, tokens

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat", default="", help="path of a nanochat checkout (HEAD); empty = skip")
    p.add_argument("--depth", type=int, default=6, help="model depth (width etc. by the reference rule)")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--max-seq-len", type=int, default=2048, help="model context")
    p.add_argument("--window-pattern", default="SSSL", help="attention window pattern (the reference default)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length")
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens per generation")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per engine (after one warm-up each)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES,
                   help="picochat's decode weights, as `picochat chat --decode-dtype`: auto (its default: a bf16 copy "
                        "on an fp32 CPU; the tokens may then differ from nanochat's) or model (fp32: same tokens)")
    args = p.parse_args(argv)
    if not args.nanochat or not os.path.isdir(os.path.join(args.nanochat, "nanochat")):
        print(f"no nanochat checkout at {args.nanochat!r} (pass --nanochat PATH): nothing to compare")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")  # both engines compute in fp32 on this CPU
    sys.path.insert(0, os.path.abspath(args.nanochat))
    from nanochat.engine import Engine as NanoEngine  # noqa: E402 (optional, outside the repo)
    from nanochat.gpt import GPT as NanoGPT, GPTConfig as NanoConfig  # noqa: E402

    cfg = config_from_depth(args.depth, args.vocab_size, max_seq_len=args.max_seq_len, window_pattern=args.window_pattern)
    torch.manual_seed(0)
    pico = build_model(cfg, "cpu", torch.float32)
    with torch.no_grad():  # non-zero output projections, so attention and MLP do real work in both
        for block in pico.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    with torch.device("meta"):
        # only the fields nanochat's config has (picochat's adds e.g. short_window, which defaults to nanochat's rule)
        known = {f.name for f in dataclasses.fields(NanoConfig)}
        nano = NanoGPT(NanoConfig(**{k: v for k, v in cfg.to_dict().items() if k in known}))
    nano.to_empty(device="cpu")
    nano.init_weights()
    nano.load_state_dict(pico.state_dict(), strict=True)
    pico.eval()
    nano.eval()
    tok = _NeverStopTokenizer(args.vocab_size)
    decode_dtype, decode_note = resolve_decode_dtype(args.decode_dtype, pico)
    print(f"picochat {decode_note}")
    engines = {"picochat": Engine(pico, tok, decode_dtype=decode_dtype), "nanochat": NanoEngine(nano, tok)}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,), generator=g).tolist()

    times = {n: {"prefill": [], "decode": []} for n in engines}
    outputs = {}
    for r in range(args.rounds + 1):
        for name, engine in engines.items():
            first, rest, tokens = timed_generate(engine, prompt, args.decode_tokens)
            outputs[name] = tokens
            if r > 0:  # round 0 warms up allocators and kernels
                times[name]["prefill"].append(args.prompt_tokens / first)
                times[name]["decode"].append((len(tokens) - 1) / rest)
        print(f"round {r}: " + ", ".join(f"{n} prefill {times[n]['prefill'][-1]:.0f} tok/s decode "
                                          f"{times[n]['decode'][-1]:.1f} tok/s" for n in engines if r > 0), flush=True)
    med = {n: {k: statistics.median(v) for k, v in times[n].items()} for n in engines}
    same = outputs["picochat"] == outputs["nanochat"]
    print(f"d{args.depth}, {args.prompt_tokens}-token prompt, {args.decode_tokens} new tokens, batch 1, fp32 "
          f"(picochat decodes in {str(decode_dtype or torch.float32).removeprefix('torch.')}), "
          f"{torch.get_num_threads()} threads, {device_name('cpu')}; same greedy tokens: {same}")
    print(f"{'engine':<10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for n in engines:
        print(f"{n:<10} {med[n]['prefill']:>14.1f} {med[n]['decode']:>13.2f}")
    ratio = {k: med["picochat"][k] / med["nanochat"][k] for k in ("prefill", "decode")}
    print(f"{'ratio':<10} {ratio['prefill']:>13.2f}x {ratio['decode']:>12.2f}x")
    print(json.dumps(dict(bench="decode_vs_nanochat", depth=args.depth, prompt_tokens=args.prompt_tokens,
                          decode_tokens=args.decode_tokens, rounds=args.rounds, threads=torch.get_num_threads(),
                          decode_dtype=str(decode_dtype or torch.float32).removeprefix("torch."),
                          same_tokens=same, medians=med, ratio=ratio)))
    return 0 if same or decode_dtype is not None else 1  # bf16 decode weights need not match token for token

if __name__ == "__main__":
    sys.exit(main())
