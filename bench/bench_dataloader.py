"""
Dataloader benchmark: packing throughput, crop fraction (utilisation), state size and resume cost of the
best-fit loader on real shards.

    python bench/bench_dataloader.py                                   # ../shared/data/pretrain, T=2048
    python bench/bench_dataloader.py --data-dir ~/.cache/picochat/data/climbmix --B 32 --T 2048 --steps 50

Uses the run's tokenizer ($PICOCHAT_HOME/tokenizer) when present, else trains a throwaway one
(--vocab-size, on --train-chars of the train split) so the script runs anywhere.
Prints a human table and a final JSON line.
"""
import sys
import json
import time
import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picochat import dataset  # noqa: E402
from picochat.dataloader import DistributedBestFitLoader  # noqa: E402
from picochat.tokenizer import Tokenizer, get_tokenizer  # noqa: E402


def load_tokenizer(data_dir, vocab_size, train_chars):
    try:
        return get_tokenizer(), "run tokenizer"
    except Exception:
        pass

    def texts():
        n = 0
        for group in dataset.iter_row_groups("train", data_dir):
            for t in group:
                yield t[:10000]
                n += min(len(t), 10000)
                if n >= train_chars:
                    return
    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(texts(), vocab_size)
    return tok, f"throwaway vocab {tok.get_vocab_size()} ({time.perf_counter() - t0:.1f}s to train)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "pretrain"))
    p.add_argument("--split", default="train")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--buffer-size", type=int, default=1000)
    p.add_argument("--tokenizer-threads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--train-chars", type=int, default=20_000_000)
    args = p.parse_args(argv)

    tok, tok_desc = load_tokenizer(args.data_dir, args.vocab_size, args.train_chars)
    kw = dict(tokenizer=tok, B=args.B, T=args.T, split=args.split, data_dir=args.data_dir,
              buffer_size=args.buffer_size, tokenizer_threads=args.tokenizer_threads)

    loader = DistributedBestFitLoader(**kw)
    it = iter(loader)
    t0 = time.perf_counter()
    x, y, state = next(it)  # includes filling the initial buffer
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.steps):
        x, y, state = next(it)
    dt = time.perf_counter() - t1
    it.close()
    stats = loader.stats
    tokens_per_s = args.steps * args.B * args.T / dt
    state_bytes = len(json.dumps(state))

    t2 = time.perf_counter()  # resume: rebuild the buffer from references and produce one batch
    it2 = iter(DistributedBestFitLoader(**kw, resume_state=json.loads(json.dumps(state))))
    next(it2)
    t_resume = time.perf_counter() - t2
    it2.close()

    rows = [("data", args.data_dir), ("tokenizer", tok_desc), ("B x T", f"{args.B} x {args.T}"),
            ("buffer docs", args.buffer_size), ("first batch (fill buffer)", f"{t_first:.2f} s"),
            ("steady throughput", f"{tokens_per_s:,.0f} tokens/s ({args.steps / dt:.2f} batches/s)"),
            ("utilisation", f"{stats['utilisation']:.1%}"), ("crop fraction", f"{stats['crop_fraction']:.1%}"),
            ("docs placed whole / cropped", f"{stats['docs']} / {stats['crops']}"),
            ("state JSON size", f"{state_bytes:,} bytes"), ("resume to first batch", f"{t_resume:.2f} s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"bench": "dataloader", "B": args.B, "T": args.T, "buffer_size": args.buffer_size,
                      "tokens_per_s": round(tokens_per_s), "first_batch_s": round(t_first, 3),
                      "utilisation": stats["utilisation"], "crop_fraction": round(stats["crop_fraction"], 4),
                      "state_bytes": state_bytes, "resume_s": round(t_resume, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
