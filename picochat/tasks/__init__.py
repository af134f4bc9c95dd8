"""
Chat tasks (SFT data and chat benchmarks) and the mixture spec used by chat-sft.

Mixture spec: comma-separated `name[@limit][:repeats]`, e.g. the default
    "smoltalk,mmlu:3,gsm8k:4,identity:2,simplespelling,spellingbee"
`@limit` keeps the first `limit` examples (after the task's own shuffle), `:k` lists the task k times
(oversampling). A name ending in .jsonl is a CustomJSON file.
Names: smoltalk, mmlu, gsm8k, arc-easy, arc-challenge, humaneval, identity, spellingbee, simplespelling.
"""
import logging

from picochat.common import get_base_dir
from picochat.tasks.common import Task, TaskMixture, TaskSequence, render_mc
from picochat.tasks.arc import ARC
from picochat.tasks.mmlu import MMLU
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.spellingbee import SpellingBee, SimpleSpelling
from picochat.tasks.customjson import CustomJSON

log = logging.getLogger("picochat.tasks")

__all__ = ["Task", "TaskMixture", "TaskSequence", "render_mc", "ARC", "MMLU", "GSM8K", "HumanEval", "SmolTalk",
           "SpellingBee", "SimpleSpelling", "CustomJSON", "build_mixture", "parse_mixture", "make_task",
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
    raise ValueError(f"unknown task {name!r} in the mixture; known: smoltalk, mmlu, gsm8k, arc-easy, "
                     "arc-challenge, humaneval, identity, spellingbee, simplespelling, or a path ending in .jsonl")


def parse_mixture(spec: str) -> list:
    """'a@10:2,b' -> [('a', 10, 2), ('b', None, 1)]"""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        repeats = 1
        if ":" in item and item.rsplit(":", 1)[1].isdigit():
            item, r = item.rsplit(":", 1)
            repeats = int(r)
        limit = None
        if "@" in item:
            item, lim = item.rsplit("@", 1)
            if not lim.isdigit():
                raise ValueError(f"bad limit {lim!r} in mixture item {item!r}: use name@N")
            limit = int(lim)
        if repeats < 1:
            raise ValueError(f"mixture item {item!r}: repeats must be >= 1")
        out.append((item, limit, repeats))
    if not out:
        raise ValueError(f"empty mixture spec {spec!r}")
    return out


def build_mixture(spec: str, split: str = "train") -> TaskMixture:
    tasks = []
    for name, limit, repeats in parse_mixture(spec):
        kw = {}
        if limit is not None:
            if name.lower() in ("spellingbee", "simplespelling"):
                kw["size"] = limit
            else:
                kw["stop"] = limit
        task = make_task(name, split, **kw)
        log.info(f"mixture[{split}]: {name} x{repeats}: {len(task):,} examples")
        tasks.extend([task] * repeats)
    return TaskMixture(tasks)


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
