"""
Chat tasks (SFT data and chat benchmarks) and the mixture spec used by chat-sft.

Mixture spec: comma-separated `name[@limit][:repeats]`, e.g. the default
    "smoltalk,mmlu:3,gsm8k:4,identity:2,simplespelling,spellingbee"
`@limit` keeps the first `limit` examples (after the task's own shuffle), `:k` lists the task k times
(oversampling). A name ending in .jsonl is a CustomJSON file.
Names: smoltalk, mmlu, gsm8k, arc-easy, arc-challenge, humaneval, identity, spellingbee, simplespelling,
arithmetic (synthetic tool-use arithmetic; not in the reference's mixture, used by the CPU demo).
"""
import random
import logging
from dataclasses import dataclass

from picochat.common import get_base_dir
from picochat.tasks.common import Task, TaskMixture, TaskSequence, render_mc
from picochat.tasks.arc import ARC
from picochat.tasks.mmlu import MMLU
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.spellingbee import SpellingBee, SimpleSpelling
from picochat.tasks.arithmetic import Arithmetic
from picochat.tasks.customjson import CustomJSON

log = logging.getLogger("picochat.tasks")

__all__ = ["Task", "TaskMixture", "TaskSequence", "render_mc", "ARC", "MMLU", "GSM8K", "HumanEval", "SmolTalk",
           "SpellingBee", "SimpleSpelling", "Arithmetic", "CustomJSON", "build_mixture", "parse_mixture", "make_task",
           "EVAL_TASKS", "BASELINES", "DEFAULT_SFT_MIXTURE", "DEFAULT_VAL_MIXTURE"]

DEFAULT_SFT_MIXTURE = "smoltalk,mmlu:3,gsm8k:4,identity:2,simplespelling,spellingbee"
DEFAULT_VAL_MIXTURE = "smoltalk,mmlu@5200,gsm8k@420"


def identity_path():
    """Where `picochat gen-identity` writes the identity conversations the `identity` task reads."""
    return get_base_dir() / "identity_conversations.jsonl"


def identity_task(**kw):
    # reading a task never generates data behind the user's back: the stage that writes it is named instead
    path = identity_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `picochat gen-identity` first (it writes synthetic "
                                "'who are you' conversations from picochat/data/identity_knowledge.md), or drop "
                                "'identity' from the mixture")
    return CustomJSON(path, **kw)


def make_task(name: str, split: str, **kw) -> Task:
    """One task by its mixture name, for split 'train' (SFT) or 'test' (validation)."""
    key = name.lower()
    train = split == "train"
    if key.endswith(".jsonl"):
        return CustomJSON(name, **kw)
    if key == "smoltalk":
        return SmolTalk(split="train" if train else "test", **kw)
    if key == "mmlu":
        return MMLU(subset="all", split="auxiliary_train" if train else "test", **kw)
    if key == "gsm8k":
        return GSM8K(subset="main", split="train" if train else "test", **kw)
    if key in ("arc-easy", "arc_easy"):
        return ARC("ARC-Easy", "train" if train else "test", **kw)
    if key in ("arc-challenge", "arc_challenge"):
        return ARC("ARC-Challenge", "train" if train else "test", **kw)
    if key == "humaneval":
        if train:
            raise ValueError("HumanEval has only a test split; training on it would contaminate chat-eval. "
                             "Remove it from the training mixture.")
        return HumanEval(**kw)
    if key == "identity":
        return identity_task(**kw)
    if key == "spellingbee":
        return SpellingBee(size=kw.pop("size", 80_000 if train else 256), split=split, **kw)
    if key == "simplespelling":
        return SimpleSpelling(size=kw.pop("size", 200_000 if train else 256), split=split, **kw)
    if key == "arithmetic":
        return Arithmetic(size=kw.pop("size", 50_000 if train else 256), split=split, **kw)
    raise ValueError(f"unknown task {name!r} in the mixture; known: smoltalk, mmlu, gsm8k, arc-easy, "
                     "arc-challenge, humaneval, identity, spellingbee, simplespelling, arithmetic, or a path ending in "
                     ".jsonl")


# Rows each source has in the reference's datasets. Without explicit shares, a mixture keeps the proportions these
# give (times each item's epochs): the reference's default mixture, whatever the local sources hold.
PLANNED_ROWS = {"smoltalk": 460_000, "mmlu": 99_842, "gsm8k": 7_473, "identity": 1_000, "simplespelling": 200_000,
                "spellingbee": 80_000, "arc-easy": 2_251, "arc_easy": 2_251, "arc-challenge": 1_119,
                "arc_challenge": 1_119}


@dataclass
class MixItem:
    name: str
    limit: int | None = None   # name@N: only the task's first N rows
    share: float | None = None  # name=F: F of the mixture's rows (normalized over the items)
    epochs: int = 1            # name:K: the task's rows may repeat up to K times to fill its share


def parse_mixture(spec: str) -> list:
    """'gsm8k@420=0.1:2,b' -> [MixItem('gsm8k', 420, 0.1, 2), MixItem('b')]. Either every item has a share or none."""
    out = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        item, epochs, share, limit = raw, 1, None, None
        if ":" in item and item.rsplit(":", 1)[1].isdigit():
            item, r = item.rsplit(":", 1)
            epochs = int(r)
        if "=" in item:
            item, f = item.rsplit("=", 1)
            try:
                share = float(f)
            except ValueError:
                share = -1.0
            if not share > 0:
                raise ValueError(f"bad share {f!r} in mixture item {raw!r}: use name=F with F > 0 (a fraction of rows)")
        if "@" in item:
            item, lim = item.rsplit("@", 1)
            if not lim.isdigit():
                raise ValueError(f"bad limit {lim!r} in mixture item {raw!r}: use name@N")
            limit = int(lim)
        if epochs < 1:
            raise ValueError(f"mixture item {raw!r}: epochs must be >= 1")
        out.append(MixItem(item, limit, share, epochs))
    if not out:
        raise ValueError(f"empty mixture spec {spec!r}")
    if len({m.share is None for m in out}) > 1:
        raise ValueError(f"mixture {spec!r}: give every item a share (name=F) or none (the reference's proportions)")
    return out


def mixture_counts(items, available) -> list:
    """Rows each item gets so that the mixture keeps its shares. Shares: the spec's, else planned rows x epochs.
    The mixture is as large as the scarcest source allows (available x epochs / share): a source smaller than
    planned makes every task shrink with it, instead of the others taking over its share."""
    if items[0].share is not None:
        weights = [m.share for m in items]
    else:
        weights = [(m.limit or PLANNED_ROWS.get(m.name.lower(), n)) * m.epochs for m, n in zip(items, available)]
    total = sum(weights)
    shares = [w / total for w in weights]
    size = min(n * m.epochs / s for m, n, s in zip(items, available, shares) if s > 0)
    return [min(round(s * size), n * m.epochs) for m, n, s in zip(items, available, shares)]


def build_mixture(spec: str, split: str = "train") -> TaskMixture:
    """The train mixture keeps the spec's proportions (mixture_counts); a validation mixture takes every row of
    each item (times its epochs), as validation sets must not depend on what else is in the spec."""
    items, tasks = parse_mixture(spec), []
    for m in items:
        kw = {}
        if m.limit is not None:
            if m.name.lower() in ("spellingbee", "simplespelling", "arithmetic"):   # synthetic: N examples
                kw["size"] = m.limit
            else:
                kw["stop"] = m.limit
        tasks.append(make_task(m.name, split, **kw))
    available = [len(t) for t in tasks]
    counts = mixture_counts(items, available) if split == "train" else [n * m.epochs for m, n in zip(items, available)]
    mixture = TaskMixture(tasks, counts=counts)
    mixture.composition = [{"task": m.name, "available": n, "rows": c} for m, n, c in zip(items, available, counts)]
    for row in mixture.composition:
        log.info(f"mixture[{split}]: {row['task']}: {row['rows']:,} rows of {row['available']:,}")
    return mixture


def composition(mixture: TaskMixture, tokenizer, sample: int = 200, seed: int = 0) -> list:
    """Per task of a build_mixture() result: rows, % of rows, tokens (mean rendered length of up to `sample` of its
    conversations x rows, so an estimate for large tasks) and % of tokens."""
    rows = []
    for ti, (task, info) in enumerate(zip(mixture.tasks, mixture.composition)):
        n = len(task)
        picks = random.Random(seed + ti).sample(range(n), min(sample, n)) if n else []
        mean = sum(len(tokenizer.render_conversation(task[i])[0]) for i in picks) / max(len(picks), 1)
        rows.append({**info, "tokens": round(mean * info["rows"])})
    total_rows, total_tokens = max(sum(r["rows"] for r in rows), 1), max(sum(r["tokens"] for r in rows), 1)
    for r in rows:
        r["rows_pct"], r["tokens_pct"] = 100 * r["rows"] / total_rows, 100 * r["tokens"] / total_tokens
    return rows


def composition_text(rows) -> str:
    lines = [f"{'task':<18}{'rows':>9}{'of':>9}{'rows %':>8}{'tokens':>12}{'tokens %':>9}"]
    lines += [f"{r['task'][:18]:<18}{r['rows']:>9,}{r['available']:>9,}{r['rows_pct']:>7.1f}%{r['tokens']:>12,}"
              f"{r['tokens_pct']:>8.1f}%" for r in rows]
    return "\n".join(lines)


# chat-eval task names -> constructors (the reference's splits; SpellingBee from the March version)
EVAL_TASKS = {
    "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
    "ARC-Challenge": lambda: ARC("ARC-Challenge", "test"),
    "MMLU": lambda: MMLU("all", "test"),
    "GSM8K": lambda: GSM8K("main", "test"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=256, split="test"),
}
# ChatCORE baselines: chance level of each benchmark
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
