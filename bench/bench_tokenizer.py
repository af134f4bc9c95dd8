"""
Tokenizer benchmark: `picochat tok-train` wall time on 100M characters at vocab 32768 (a fresh process,
reading the shards included) and batch-encoding throughput (MB/s of UTF-8) over the validation shard.
Targets (issue 2): training < 15 s wall, encoding >= 12 MB/s on the 2-core dev box.

    python bench/bench_tokenizer.py --data-dir /work/shared/data/pretrain
    python bench/bench_tokenizer.py --data-dir /work/shared/data/pretrain --max-chars 1e8 --threads 2

The shared data's train split holds ~109M chars in ~20 KB documents, so the default --doc-cap of
tok-train (10,000) would stop at ~50M chars; this bench uses --doc-cap 1e6 so it really sees 100M.
Prints a human table, then one JSON line.
"""
import os
import sys
import json
import time
import argparse
import resource
import tempfile
import subprocess
from pathlib import Path


def time_read(data_dir, max_chars, doc_cap):
    """Reading + capping alone (no BPE): how much of tok-train is I/O and parquet decoding."""
    from picochat.dataset import iter_row_groups
    from picochat.stages.tok_train import text_iterator
    stats = {"chars": 0, "docs": 0}
    t0 = time.perf_counter()
    for _ in text_iterator(iter_row_groups("train", data_dir=data_dir), max_chars, doc_cap, stats):
        pass
    return time.perf_counter() - t0, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="directory of parquet shards (train = all but the last)")
    p.add_argument("--max-chars", type=float, default=1e8)
    p.add_argument("--doc-cap", type=int, default=1_000_000)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="tiktoken batch-encode threads")
    p.add_argument("--batch-docs", type=int, default=128, help="documents per encode() call")
    p.add_argument("--repeats", type=int, default=3, help="encoding passes (best is reported)")
    args = p.parse_args(argv)
    max_chars = int(args.max_chars)

    read_s, read_stats = time_read(args.data_dir, max_chars, args.doc_cap)

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PICOCHAT_HOME=tmp)
        out_dir = Path(tmp) / "tokenizer"
        cmd = [sys.executable, "-m", "picochat", "tok-train", "--max-chars", str(max_chars),
               "--doc-cap", str(args.doc_cap), "--vocab-size", str(args.vocab_size),
               "--data-dir", args.data_dir, "--output-dir", str(out_dir)]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        train_wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds (user+sys) of tok-train: on a busy shared box this is steadier than wall time
        train_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            raise SystemExit(f"tok-train failed (exit {r.returncode})")
        section = json.loads((Path(tmp) / "report" / "tokenizer-training.json").read_text())["data"]

        from picochat.tokenizer import Tokenizer
        from picochat.dataset import iter_row_groups
        tok = Tokenizer.from_directory(out_dir)
        docs = [t for texts in iter_row_groups("val", data_dir=args.data_dir) for t in texts if t]
        nbytes = sum(len(t.encode("utf-8")) for t in docs)
        batches = [docs[i:i + args.batch_docs] for i in range(0, len(docs), args.batch_docs)]
        best, best_cpu, ntok = float("inf"), float("inf"), 0
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            ntok = sum(len(ids) for b in batches for ids in tok.encode(b, num_threads=args.threads))
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        t0 = time.perf_counter()
        for d in docs[:200]:
            tok.encode(d)
        single_s = time.perf_counter() - t0
        single_mb = sum(len(d.encode("utf-8")) for d in docs[:200]) / 1e6

    result = {
        "bench": "tokenizer",
        "train_wall_s": round(train_wall, 2),
        "train_cpu_s": round(train_cpu, 2),
        "train_inprocess_s": section["train_time_s"],
        "train_chars": section["chars"],
        "train_read_only_s": round(read_s, 2),
        "vocab_size": section["vocab_size"],
        "encode_mb_per_s": round(nbytes / 1e6 / best, 2),
        "encode_mb_per_cpu_s": round(nbytes / 1e6 / best_cpu, 2),
        "encode_single_thread_mb_per_s": round(single_mb / single_s, 2),
        "encode_val_mb": round(nbytes / 1e6, 2),
        "encode_tokens": ntok,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }
    rows = [
        ("tok-train wall (fresh process, reads included)", f"{train_wall:.2f} s", "< 15 s"),
        ("  CPU seconds (user+sys, all threads)", f"{train_cpu:.2f} s", ""),
        ("  of which BPE training in process", f"{section['train_time_s']:.2f} s", ""),
        ("  reading+capping the shards alone", f"{read_s:.2f} s", ""),
        ("  chars / docs", f"{section['chars']:,} / {section['docs']:,}", ""),
        ("batch encode, val shard", f"{result['encode_mb_per_s']:.2f} MB/s", ">= 12 MB/s"),
        ("  MB per CPU-second", f"{result['encode_mb_per_cpu_s']:.2f} MB/cpu-s", ""),
        ("single-thread encode", f"{result['encode_single_thread_mb_per_s']:.2f} MB/s", ""),
        ("val bytes / tokens", f"{nbytes:,} / {ntok:,} ({nbytes / max(1, ntok):.3f} B/tok)", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'metric'.ljust(w)}  {'value':<34}target")
    for name, value, target in rows:
        print(f"{name.ljust(w)}  {value:<34}{target}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
