"""
CORE evaluation throughput (examples/s) on CPU at d6 with a random-init model (accuracy is meaningless here;
the prompt lengths, vocab size and batching are what cost time).

    python bench/bench_core.py                                  # d6, 40 items per task, all available tasks
    python bench/bench_core.py --depth 6 --max-per-task 100 --batch-size 32 --threads 2

Tokenizer: $PICOCHAT_HOME/tokenizer when it exists, else one trained here (vocab --vocab-size) on the first
--tok-chars characters of the shared pretraining shard. Bundle: --bundle-dir (default ../shared/data/core).
Prints a per-task table and a final JSON line.
"""
import sys
import json
import time
import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def get_tokenizer(vocab_size, tok_chars, shared):
    from picochat.common import get_base_dir
    from picochat.tokenizer import Tokenizer
    tdir = get_base_dir() / "tokenizer"
    if (tdir / "tokenizer.json").exists():
        return Tokenizer.from_directory(tdir), f"{tdir}"
    import pyarrow.parquet as pq
    texts, n = [], 0
    for t in pq.read_table(shared / "pretrain" / "shard_00000.parquet").column("text").to_pylist():
        texts.append(t)
        n += len(t)
        if n >= tok_chars:
            break
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=vocab_size)
    return tok, f"trained here on {n:,} chars in {time.time() - t0:.1f}s"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--max-per-task", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--tok-chars", type=int, default=5_000_000)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--bundle-dir", default=str(REPO.parent / "shared" / "data" / "core"))
    p.add_argument("--tasks", default=None, help="comma list of task labels (default all)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from picochat.gpt import build_model, config_from_depth
    from picochat.base_eval import load_core_tasks
    from picochat.core_eval import prepare_task_data, evaluate_task

    tok, tok_source = get_tokenizer(args.vocab_size, args.tok_chars, Path(args.bundle_dir).parent)
    labels = args.tasks.split(",") if args.tasks else None
    tasks, missing, total = load_core_tasks(args.bundle_dir, labels)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, tok.get_vocab_size(), max_seq_len=args.max_seq_len)
    model = build_model(config, "cpu", torch.float32)
    model.eval()
    print(f"d{args.depth} ({sum(p.numel() for p in model.parameters()):,} params), vocab {tok.get_vocab_size():,} "
          f"({tok_source}), {torch.get_num_threads()} threads, batch {args.batch_size} rows, "
          f"{args.max_per_task} items/task, {len(tasks)}/{total} tasks" + (f" (missing {missing})" if missing else ""))
    print(f"{'task':<34} {'type':<18} {'shots':>5} {'n':>5} {'sec':>8} {'ex/s':>8}")
    tot_n, tot_t, rows = 0, 0.0, {}
    for t in tasks:
        data = prepare_task_data(t["data"], args.max_per_task)
        t0 = time.perf_counter()
        evaluate_task(model, tok, data, t, device=torch.device("cpu"), batch_size=args.batch_size,
                      max_len=model.rotary_len)
        dt = time.perf_counter() - t0
        tot_n += len(data); tot_t += dt
        rows[t["label"]] = len(data) / dt
        print(f"{t['label']:<34} {t['task_type']:<18} {t['num_fewshot']:>5} {len(data):>5} {dt:>8.2f} {len(data) / dt:>8.2f}")
    print(f"{'TOTAL':<34} {'':<18} {'':>5} {tot_n:>5} {tot_t:>8.2f} {tot_n / tot_t:>8.2f}")
    print(json.dumps({"bench": "core_cpu", "depth": args.depth, "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "max_per_task": args.max_per_task, "examples": tot_n,
                      "seconds": round(tot_t, 3), "examples_per_s": round(tot_n / tot_t, 3),
                      "per_task_examples_per_s": {k: round(v, 3) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
