"""
CORE evaluation throughput (examples/s) on CPU at d6 with a random-init model (accuracy is meaningless here;
the prompt lengths, vocab size and batching are what cost time).

    python bench/bench_core.py                                  # d6, 40 items per task, all available tasks
    python bench/bench_core.py --depth 6 --max-per-task 16 --threads 2        # the 2026-12-03 figures

Tokenizer: $PICOCHAT_HOME/tokenizer when it exists, else one trained here (vocab --vocab-size) on the first
--tok-chars characters of the shared pretraining shard. Bundle: --bundle-dir (default ../shared/data/core).
Both evaluators (core_eval's plain one and the fast one that shares each example's prefix through a KV cache
and scores only the span positions) run on every task in turn, alternated, so machine drift hits both alike;
the table gives each one's examples/s, the ratio, and how many items they disagreed on (must be 0).
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--max-per-task", type=int, default=40)
    # 8, not 32: the plain evaluator materialises (rows, T, V) fp32 logits, and 32 rows of 10-shot boolq at
    # vocab 32768 went past 24 GiB (OOM-killed, measured 2026-12-03)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--tok-chars", type=int, default=5_000_000)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--bundle-dir", default=str(REPO.parent / "shared" / "data" / "core"))
    p.add_argument("--tasks", default=None, help="comma list of task labels (default all)")
    p.add_argument("--evaluators", nargs="+", choices=["plain", "fast"], default=["plain", "fast"],
                   help="which evaluators to time (alternated per task)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from picochat.gpt import build_model, config_from_depth
    from picochat.core_eval import load_core_tasks
    from picochat.core_eval import prepare_task_data, evaluate_task, evaluate_task_fast
    evaluators = {"plain": evaluate_task, "fast": evaluate_task_fast}

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
    names = args.evaluators
    print(f"{'task':<34} {'type':<18} {'shots':>5} {'n':>5} " + " ".join(f"{n + ' ex/s':>11}" for n in names)
          + (f" {'ratio':>6} {'differ':>6}" if len(names) == 2 else ""))
    tot_n, tot_t, rows, differ = 0, {n: 0.0 for n in names}, {}, 0
    for t in tasks:
        data = prepare_task_data(t["data"], args.max_per_task)
        items, secs = {}, {}
        for n in names:
            t0 = time.perf_counter()
            items[n] = evaluators[n](model, tok, data, t, device=torch.device("cpu"), batch_size=args.batch_size,
                                     max_len=model.rotary_len, per_item=True)
            secs[n] = time.perf_counter() - t0
            tot_t[n] += secs[n]
        tot_n += len(data)
        d = sum(a != b for a, b in zip(items[names[0]], items[names[-1]]))
        differ += d
        rows[t["label"]] = {n: round(len(data) / secs[n], 3) for n in names}
        extra = f" {secs[names[0]] / secs[names[-1]]:>5.2f}x {d:>6}" if len(names) == 2 else ""
        print(f"{t['label']:<34} {t['task_type']:<18} {t['num_fewshot']:>5} {len(data):>5} "
              + " ".join(f"{len(data) / secs[n]:>11.2f}" for n in names) + extra)
    extra = f" {tot_t[names[0]] / tot_t[names[-1]]:>5.2f}x {differ:>6}" if len(names) == 2 else ""
    print(f"{'TOTAL':<34} {'':<18} {'':>5} {tot_n:>5} " + " ".join(f"{tot_n / tot_t[n]:>11.2f}" for n in names) + extra)
    print(json.dumps({"bench": "core_cpu", "depth": args.depth, "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "max_per_task": args.max_per_task, "examples": tot_n,
                      "seconds": {n: round(tot_t[n], 3) for n in names},
                      "examples_per_s": {n: round(tot_n / tot_t[n], 3) for n in names},
                      "items_differing": differ, "per_task_examples_per_s": rows}))


if __name__ == "__main__":
    main()
