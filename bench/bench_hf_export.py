"""
`generate` speed of the Hugging Face export, with and without the KV cache, in fp32 and bf16: a random picochat
model of --depth (tokenizer trained in-process on a few KB of text, so nothing is downloaded) is exported and
loaded with AutoModelForCausalLM(trust_remote_code=True); each variant decodes --new-tokens greedily after a
--prompt-len prompt, variants alternated over --repeats rounds. Prints tokens/s (median) and checks that the
cached and uncached outputs are the same tokens.

    python bench/bench_hf_export.py --depth 6 --prompt-len 64 --new-tokens 128
"""
import time
import argparse
import tempfile
import statistics

import torch
import transformers

from picochat.gpt import config_from_depth, build_model
from picochat.tokenizer import Tokenizer
from picochat.stages.export import export_hf

TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times. "
        "Ships sailed many miles and few returned; numbers like 12345 and 3.14159 appear too. ") * 40


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args(argv)
    tok = Tokenizer.train_from_iterator(iter([TEXT]), vocab_size=300)
    seq_len = max(256, args.prompt_len + args.new_tokens)
    cfg = config_from_depth(args.depth, tok.get_vocab_size(), max_seq_len=seq_len)
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), torch.float32).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with tempfile.TemporaryDirectory() as out:
        export_hf(model, tok, out)
        models = {d: transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                                       dtype=getattr(torch, d)).eval()
                  for d in args.dtypes.split(",")}
        times = {(d, c): [] for d in models for c in (True, False)}
        outputs = {}
        for _ in range(args.repeats):
            for (d, cache) in times:
                t0 = time.perf_counter()
                outputs[d, cache] = models[d].generate(prompt, use_cache=cache, **kw)
                times[d, cache].append(time.perf_counter() - t0)
    print(f"depth {args.depth} (width {cfg.n_embd}), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.repeats} rounds, torch threads {torch.get_num_threads()}")
    print(f"{'dtype':<10}{'cache':<7}{'tok/s (median)':>16}{'speed-up':>10}")
    for d in models:
        rate = {c: args.new_tokens / statistics.median(times[d, c]) for c in (True, False)}
        same = torch.equal(outputs[d, True], outputs[d, False])
        for c in (False, True):
            print(f"{d:<10}{'yes' if c else 'no':<7}{rate[c]:>16.1f}{rate[c] / rate[False]:>9.2f}x"
                  + ("" if c is False else ("  (same tokens)" if same else "  (tokens DIFFER)")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
