"""
Compression of our tokenizer (bytes per token) on built-in samples and on the pretraining shards,
compared with GPT-2 and GPT-4 (cl100k_base) when tiktoken has them cached locally (no downloads).

    picochat tok-eval
    picochat tok-eval --data-dir /work/shared/data/pretrain
    TIKTOKEN_CACHE_DIR=/path/to/cache picochat tok-eval     # where cached gpt2/cl100k files live

Relative difference = (baseline_tokens - ours_tokens) / baseline_tokens: positive means we use fewer tokens.
"""
import os
import hashlib
import argparse
import tempfile

import tiktoken

from picochat.common import HelpFormatter, print0, is_master
from picochat import report
from picochat.dataset import iter_row_groups
from picochat.tokenizer import Tokenizer, get_tokenizer

NEWS = """(Washington, D.C., July 9, 2025) - Yesterday, Mexico's National Service of Agro-Alimentary Health, Safety, \
and Quality (SENASICA) reported a new case of New World Screwworm (NWS) in Ixhuatlan de Madero, Veracruz, about \
160 miles from the U.S.-Mexico border. The U.S. Department of Agriculture said it would keep ports closed to \
cattle imports while officials assessed the risk, adding that sterile-fly dispersal would expand by 20% this month."""

KOREAN = """정직한 사실 위에, 공정한 시선을 더하다. 우리는 매일 아침 새로운 소식을 전하며, 독자 여러분이 \
세상을 더 깊이 이해할 수 있도록 돕습니다. 서울의 날씨는 맑고 기온은 섭씨 23도입니다."""

CODE = '''class BasicTokenizer:
    """Minimal byte-level BPE: train, encode, decode."""

    def __init__(self):
        self.merges = {}  # (int, int) -> int
        self.vocab = {i: bytes([i]) for i in range(256)}

    def train(self, text, vocab_size, verbose=False):
        ids = list(text.encode("utf-8"))
        for i in range(vocab_size - 256):
            stats = get_stats(ids)
            pair = max(stats, key=stats.get)
            idx = 256 + i
            ids = merge(ids, pair, idx)
            self.merges[pair] = idx
            self.vocab[idx] = self.vocab[pair[0]] + self.vocab[pair[1]]
            if verbose:
                print(f"merge {i+1}/{vocab_size - 256}: {pair} -> {idx} had {stats[pair]} occurrences")
'''

LATEX = r"""\begin{theorem}
For every integer $n \ge 1$, $\sum_{k=1}^{n} k^3 = \left( \frac{n(n+1)}{2} \right)^2$.
\end{theorem}
\begin{proof}
By induction on $n$. For $n = 1$ both sides equal $1$. Assume the identity holds for $n$. Then
\[ \sum_{k=1}^{n+1} k^3 = \frac{n^2(n+1)^2}{4} + (n+1)^3 = \frac{(n+1)^2 (n^2 + 4n + 4)}{4}
   = \left( \frac{(n+1)(n+2)}{2} \right)^2, \]
which is the claim for $n+1$.
\end{proof}"""

SCIENCE = """Photosynthesis is a photochemical energy transduction process in which light-harvesting pigment-protein \
complexes within the thylakoid membranes of oxygenic phototrophs absorb photons and initiate charge separation at \
the reaction centres of photosystems II and I. The resulting electron transport chain, coupled to proton \
translocation, drives ATP synthase, while NADPH formed by ferredoxin-NADP+ reductase supplies the reducing power \
for CO2 fixation by RuBisCO in the Calvin-Benson-Bassham cycle (roughly 3 ATP and 2 NADPH per CO2)."""

SAMPLES = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": LATEX, "science": SCIENCE}

# the files tiktoken fetches for these encodings; we only load them if they are already cached
_BASELINE_FILES = {
    "gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
}
_BASELINE_LABELS = {"gpt2": "GPT-2", "cl100k_base": "GPT-4"}


def _tiktoken_cache_dir() -> str:
    # mirrors tiktoken.load.read_file_cached's choice of directory
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")

def load_baseline(name: str):
    """The tiktoken encoding if every file it needs is in tiktoken's cache; else (None, reason).
    We check first because tiktoken would otherwise try (and, offline, hang or fail) to download."""
    cache = _tiktoken_cache_dir()
    missing = [url for url in _BASELINE_FILES[name]
               if not os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))]
    if missing:
        return None, f"not cached in {cache} (offline; tiktoken would need to download it)"
    try:
        return tiktoken.get_encoding(name), None
    except Exception as e:
        return None, f"tiktoken could not load it: {type(e).__name__}: {e}"


def first_row_group_text(split: str, data_dir=None):
    """The first row group of a split joined with newlines, or None when unavailable."""
    try:
        for texts in iter_row_groups(split, data_dir=data_dir):
            return "\n".join(t for t in texts if t)
    except Exception as e:  # tok-eval still reports the built-in samples
        print0(f"({split} split unavailable: {e})")
    return None


def evaluate(tokenizers: dict, texts: dict) -> list:
    """One row per (text, tokenizer): bytes, tokens, ratio; asserts every encoding round-trips."""
    rows = []
    for tname, tok in tokenizers.items():
        for name, text in texts.items():
            ids = tok.encode_ordinary(text) if hasattr(tok, "encode_ordinary") else tok.encode(text)
            if tok.decode(ids) != text:
                raise RuntimeError(f"{tname} failed to round-trip the {name!r} text")
            nbytes = len(text.encode("utf-8"))
            rows.append({"tokenizer": tname, "text": name, "bytes": nbytes, "tokens": len(ids),
                         "ratio": round(nbytes / max(1, len(ids)), 4)})
    return rows


def comparison_table(rows: list, baseline: str, ours: str = "ours") -> list:
    by = {(r["tokenizer"], r["text"]): r for r in rows}
    out = []
    for (tname, text), r in by.items():
        if tname != ours or (baseline, text) not in by:
            continue
        b = by[(baseline, text)]
        out.append({"text": text, "bytes": r["bytes"], f"{baseline}_tokens": b["tokens"],
                    f"{baseline}_ratio": b["ratio"], "ours_tokens": r["tokens"], "ours_ratio": r["ratio"],
                    "rel_diff_pct": round(100.0 * (b["tokens"] - r["tokens"]) / max(1, b["tokens"]), 2)})
    return out


def print_table(rows: list, title: str):
    if not rows:
        return
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print0(f"\n{title}")
    print0("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print0("  ".join("-" * w for w in widths))
    for r in rows:
        print0("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="picochat tok-eval", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--data-dir", type=str, default=None, help="directory of parquet shards (default: downloaded data)")
    p.add_argument("--tokenizer-dir", type=str, default=None, help="default $PICOCHAT_HOME/tokenizer")
    args = p.parse_args(argv)

    ours = Tokenizer.from_directory(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer()
    tokenizers = {"ours": ours}
    unavailable = {}
    for name in ("gpt2", "cl100k_base"):
        enc, why = load_baseline(name)
        if enc is None:
            unavailable[_BASELINE_LABELS[name]] = why
            print0(f"{_BASELINE_LABELS[name]} ({name}) unavailable: {why}; continuing without it")
        else:
            tokenizers[name] = enc

    texts = dict(SAMPLES)
    for split, label in (("train", "shard-train"), ("val", "shard-val")):
        text = first_row_group_text(split, args.data_dir)
        if text:
            texts[label] = text

    rows = evaluate(tokenizers, texts)
    print_table([{k: v for k, v in r.items() if k != "tokenizer"} for r in rows if r["tokenizer"] == "ours"],
                f"ours (vocab {ours.get_vocab_size():,}): bytes per token")
    comparisons = {}
    for name in tokenizers:
        if name == "ours":
            continue
        table = comparison_table(rows, name)
        comparisons[_BASELINE_LABELS[name]] = table
        print_table(table, f"ours vs {_BASELINE_LABELS[name]} ({name}); rel_diff > 0 means ours is better")

    if is_master():
        report.log_section("tokenizer-evaluation", {
            "vocab_size": ours.get_vocab_size(),
            "ours": [{k: v for k, v in r.items() if k != "tokenizer"} for r in rows if r["tokenizer"] == "ours"],
            **{f"vs {k}": v for k, v in comparisons.items()},
            "unavailable_baselines": unavailable,
        })
    return 0
