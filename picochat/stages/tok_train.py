"""
Train the BPE tokenizer on the train split of the pretraining shards; save it to get_base_dir()/tokenizer.

    picochat tok-train                                   # 2e9 chars, docs capped at 10k chars, vocab 32768
    picochat tok-train --max-chars 100000000 --data-dir /work/shared/data/pretrain
    picochat tok-train --max-chars 1e7 --vocab-size 4096 --output-dir /tmp/tok

Documents are capped at --doc-cap characters (long documents would otherwise dominate the pair
counts); reading stops once the cumulative count exceeds --max-chars (the crossing document is kept).
"""
import sys
import time
import queue
import argparse
import threading
from pathlib import Path

from picochat.common import HelpFormatter, get_base_dir, print0, is_master
from picochat.dataset import iter_row_groups  # train = every shard but the last
from picochat.tokenizer import Tokenizer, SPECIAL_TOKENS
from picochat import report


def prefetch(iterable, depth: int = 2):
    """Run `iterable` (parquet row-group reads) in a background thread, `depth` items ahead, so reading
    the next row group overlaps rustbpe's GIL-free splitting and counting of the current batch.
    Exceptions are re-raised here; abandoning the generator stops the thread."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()
    DONE = object()

    def worker():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put((DONE, None))
        except BaseException as e:  # handed to the consumer
            q.put((DONE, e))

    thread = threading.Thread(target=worker, name="tok-train-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if item is DONE:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()


def text_iterator(row_groups, max_chars: int, doc_cap: int, stats: dict):
    """Cap each document, stop after max_chars (the crossing document included). Fills `stats`."""
    nchars = ndocs = 0
    for texts in row_groups:
        for text in texts:
            if text is None:
                continue
            if len(text) > doc_cap:
                text = text[:doc_cap]
            nchars += len(text)
            ndocs += 1
            stats["chars"], stats["docs"] = nchars, ndocs
            yield text
            if nchars > max_chars:
                if hasattr(row_groups, "close"):  # stop a prefetching reader now, not at garbage collection
                    row_groups.close()
                return


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="picochat tok-train", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--max-chars", type=float, default=2e9, help="stop after this many characters (default 2e9)")
    p.add_argument("--doc-cap", type=int, default=10_000, help="truncate each document to this many characters")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocab size INCLUDING the 9 special tokens")
    p.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards with a `text` column "
                   "(default: the downloaded dataset under $PICOCHAT_HOME/data)")
    p.add_argument("--output-dir", type=str, default=None, help="where to save (default $PICOCHAT_HOME/tokenizer)")
    p.add_argument("--buffer-size", type=int, default=1024, help="documents per parallel rustbpe ingest batch")
    args = p.parse_args(argv)
    args.max_chars = int(args.max_chars)  # accept 2e9 on the command line, log an int
    if args.max_chars <= 0 or args.doc_cap <= 0:
        p.error("--max-chars and --doc-cap must be positive")
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        p.error(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    return args


def main(argv=None):
    args = parse_args(argv)
    max_chars = args.max_chars
    out_dir = Path(args.output_dir) if args.output_dir else get_base_dir() / "tokenizer"
    print0(f"tok-train: max_chars={max_chars:,} doc_cap={args.doc_cap:,} vocab_size={args.vocab_size:,} "
           f"data_dir={args.data_dir or '(default)'}")

    stats = {"chars": 0, "docs": 0}
    row_groups = prefetch(iter_row_groups("train", data_dir=args.data_dir))
    texts = text_iterator(row_groups, max_chars, args.doc_cap, stats)
    t0 = time.perf_counter()
    try:
        tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size, buffer_size=args.buffer_size)
    except (FileNotFoundError, ValueError) as e:  # no shards, or a corrupt one: say what to do, without a traceback
        print(f"picochat tok-train: error: {e}", file=sys.stderr)
        return 2
    train_time = time.perf_counter() - t0
    if stats["docs"] == 0:
        raise RuntimeError("the train split yielded no text: check --data-dir")
    print0(f"trained on {stats['chars']:,} chars from {stats['docs']:,} docs in {train_time:.2f}s "
           f"({stats['chars'] / train_time / 1e6:.1f}M chars/s); vocab {tokenizer.get_vocab_size():,}")

    # sanity: a mixed string must round-trip before we publish the tokenizer
    probe = "Hello world! 12345 ünïcödé 你好 🙂 <|bos|>\n\tdef f(x): return x**2"
    if tokenizer.decode(tokenizer.encode(probe)) != probe:
        raise RuntimeError("the trained tokenizer failed its round-trip check; not saving it")

    t1 = time.perf_counter()
    if is_master():
        tokenizer.save(out_dir)
    save_time = time.perf_counter() - t1
    print0(f"saved to {out_dir} ({save_time:.2f}s)")

    tb = tokenizer.token_bytes()
    nz = tb[tb > 0].float()
    tb_stats = {"token_bytes_min": int(nz.min()), "token_bytes_max": int(nz.max()),
                "token_bytes_mean": round(float(nz.mean()), 4), "token_bytes_std": round(float(nz.std()), 4)}
    print0("token_bytes (non-special): " + ", ".join(f"{k[12:]}={v}" for k, v in tb_stats.items()))
    if is_master():
        report.log_section("tokenizer-training", {
            "args": vars(args),
            "train_time_s": round(train_time, 3),
            "chars": stats["chars"],
            "docs": stats["docs"],
            "vocab_size_requested": args.vocab_size,
            "vocab_size": tokenizer.get_vocab_size(),
            "num_special_tokens": len(SPECIAL_TOKENS),
            **tb_stats,
            "output_dir": str(out_dir),
        })
    return 0
