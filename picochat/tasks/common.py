"""
The Task abstraction shared by every chat dataset, plus where task data comes from.

A Task is a lazy, sliceable view over a list of conversations:
    task = GSM8K(split="train", start=0, stop=100, step=2)   # len(task) == 50
    conv = task[3]                                            # == task.get_example(0 + 3*2)
TaskMixture shuffles (task, index) pairs once with Random(42): passing a task twice oversamples it.
TaskSequence concatenates in order (curricula).

Sources (resolved once per file, cached under get_base_dir()/task_data):
  * PICOCHAT_MIRROR (URL or directory laid out like ../shared/data: gsm8k/, mmlu/, arc/, humaneval/,
    words/, sft/), fetched through picochat.fetch so one rank downloads and the others wait;
  * otherwise the public Hugging Face datasets, as parquet listed by the HF parquet API.
"""
import gzip
import json
import math
import random
import logging
from pathlib import Path

import numpy as np
import requests
import pyarrow.parquet as pq
from filelock import FileLock

from picochat import fetch
from picochat.common import get_base_dir, atomic_write_json

log = logging.getLogger("picochat.tasks")

# -----------------------------------------------------------------------------
# Task views

class Task:
    """Lazy view over a dataset: len = ceil((stop - start) / step), task[i] = get_example(start + i*step)."""

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"start must be >= 0, got {start}"
        assert stop is None or stop >= start, f"stop ({stop}) must be >= start ({start})"
        assert step >= 1, f"step must be >= 1, got {step}"
        self.start, self.stop, self.step = start, stop, step

    eval_type = None  # 'generative' or 'categorical' (tasks used only for training need not say)

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, response: str):
        raise NotImplementedError

    def reward(self, conversation: dict, response: str) -> float:
        """RL reward: 1.0 for a correct response, else 0.0."""
        return float(self.evaluate(conversation, response))

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError(f"Task indices must be int, got {type(i).__name__}")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for task of length {n}")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class RowsTask(Task):
    """A Task over a list of dataset rows, visited in a fixed shuffled order (seed 42, as the reference)."""

    def set_rows(self, rows):
        self.rows = rows
        self.order = shuffled_indices(len(rows), 42)

    def num_examples(self):
        return len(self.rows)

    def row(self, index):
        return self.rows[self.order[index]]


class TaskMixture(Task):
    """All examples of all tasks, shuffled once with a fixed seed so every rank and every run agrees.
    A task listed k times appears k times. counts[i]: take that many rows of task i instead of all of them: whole
    passes over the task, then a seeded sample of its rows for the remainder."""

    def __init__(self, tasks, seed=42, counts=None, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        counts = [len(t) for t in self.tasks] if counts is None else counts
        self.index_map = []
        for ti, (t, c) in enumerate(zip(self.tasks, counts)):
            n = len(t)
            if n == 0:
                continue
            passes, rest = divmod(int(c), n)
            self.index_map += [(ti, li) for _ in range(passes) for li in range(n)]
            self.index_map += [(ti, li) for li in sorted(random.Random(seed + ti).sample(range(n), rest))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        ti, li = self.index_map[index]
        return self.tasks[ti][li]


class TaskSequence(Task):
    """Tasks concatenated in order, no shuffling."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for t, n in zip(self.tasks, self.lengths):
            if index < n:
                return t[index]
            index -= n
        raise IndexError(index)


class SyntheticTask(Task):
    """`size` generated examples, example i from its own seed: train uses i, test TEST_SEED_OFFSET + i
    (Random(k) and Random(-k) are the same stream, so a sign flip would not separate the splits)."""
    TEST_SEED_OFFSET = 10_000_000
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"{type(self).__name__} split must be train|test, got {split!r}"
        self.size, self.split = size, split

    def num_examples(self):
        return self.size

    def rng(self, index) -> random.Random:
        return random.Random(index if self.split == "train" else self.TEST_SEED_OFFSET + index)


def render_mc(question: str, letters, choices) -> str:
    """Multiple-choice user text. The letter comes AFTER its choice with no space after '=', so it
    tokenizes exactly like the bare letter the assistant answers with."""
    text = f"Multiple Choice question: {question}\n"
    text += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    text += "\nRespond only with the letter of the correct answer."
    return text


def shuffled_indices(n: int, seed: int = 42) -> list:
    """Same permutation as Hugging Face `datasets.Dataset.shuffle(seed)` (numpy default_rng permutation)."""
    return np.random.default_rng(seed).permutation(n).tolist()


def validate_messages(messages, where: str):
    """Check a chat: optional leading system message, then strictly user/assistant alternating,
    at least one exchange, non-empty string contents. Raises ValueError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    body = messages[1:] if messages[0].get("role") == "system" else messages
    if len(body) < 2:
        raise ValueError(f"{where}: need at least one user message and one assistant reply")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected:
            got = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"{where}: message {i} should have role {expected!r}, got {got!r} "
                             "(roles must alternate user/assistant, starting with user)")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"{where}: message {i} ({expected}) must have non-empty string content")

# -----------------------------------------------------------------------------
# Sources

HF_API = "https://huggingface.co/api/datasets/{repo}/parquet/{subset}/{split}"
# fallback listing: the datasets-server API ({"parquet_files": [{"config", "split", "url"}, ...]})
HF_SERVER_API = "https://datasets-server.huggingface.co/parquet?dataset={repo}"

def task_data_dir() -> Path:
    return get_base_dir() / "task_data"

def _mirror():
    return fetch.get_mirror()

def have_mirror() -> bool:
    return _mirror() is not None

def mirror_file(relpath: str, validate=None) -> Path:
    """Fetch `relpath` from PICOCHAT_MIRROR into the cache (one rank downloads, the others wait)."""
    dest = task_data_dir() / "mirror" / relpath
    return fetch.download(relpath, None, dest, validate=validate)

def mirror_has(relpath: str) -> bool:
    """Whether the mirror provides `relpath` (directories are checked on disk, URLs by a HEAD request)."""
    m = _mirror()
    if m is None:
        return False
    if "://" not in m:
        return (Path(m) / relpath).exists()
    if (task_data_dir() / "mirror" / relpath).exists():
        return True
    try:
        r = requests.head(m.rstrip("/") + "/" + relpath, timeout=10, allow_redirects=True)
        return r.status_code == 200
    except requests.RequestException:
        return False

def read_jsonl(path: Path) -> list:
    with open(path, "rb") as f:   # sniff gzip by magic bytes: temp files being validated have no .gz suffix
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return rows

def _validate_jsonl(path: Path):
    read_jsonl(path)

def _validate_parquet(path: Path):
    pq.ParquetFile(path)

def load_hub_rows(repo: str, subset: str, split: str) -> list:
    """All rows of one HF dataset split as dicts, downloaded once as parquet and cached.
    manifest.json is written last: its presence marks a complete download."""
    d = task_data_dir() / repo.replace("/", "--") / subset / split
    manifest = d / "manifest.json"
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d) + ".lock"):
        if not manifest.exists():
            api = HF_API.format(repo=repo, subset=subset, split=split)
            listing = d / "listing.json"
            try:
                fetch.download(f"hf/{repo}/{subset}/{split}/listing.json", api, listing, progress=False)
                urls = json.loads(listing.read_text())
            except (fetch.DownloadError, ValueError) as e:
                log.warning(f"HF parquet listing {api} failed ({e}); trying the datasets-server API")
                listing.unlink(missing_ok=True)
                api = HF_SERVER_API.format(repo=repo)
                fetch.download(f"hf/{repo}/server_listing.json", api, listing, progress=False)
                files = json.loads(listing.read_text()).get("parquet_files", [])
                urls = [f["url"] for f in files if f.get("config") == subset and f.get("split") == split]
            if not isinstance(urls, list) or not urls:
                raise RuntimeError(f"HF parquet API {api} returned no files for {repo}/{subset}/{split}; "
                                   "check the dataset name or set PICOCHAT_MIRROR to a local copy")
            files = []
            for i, url in enumerate(urls):
                dest = d / f"{i:05d}.parquet"
                fetch.download(f"hf/{repo}/{subset}/{split}/{i:05d}.parquet", url, dest, validate=_validate_parquet)
                files.append(dest.name)
            atomic_write_json(manifest, {"repo": repo, "subset": subset, "split": split, "files": files})
    files = json.loads(manifest.read_text())["files"]
    rows = []
    for name in files:
        rows.extend(pq.read_table(d / name).to_pylist())
    return rows

def load_rows(mirror_relpath, hub=None) -> list:
    """Rows from the mirror when one is set, else from the HF hub (repo, subset, split)."""
    if have_mirror():
        return read_jsonl(mirror_file(mirror_relpath, validate=_validate_jsonl))
    if hub is None:
        raise RuntimeError(f"{mirror_relpath} has no public default source; set PICOCHAT_MIRROR")
    return load_hub_rows(*hub)

def loud_fallback(message: str):
    """A source the default recipe wants is missing: say so where nobody can miss it."""
    bar = "!" * 78
    log.warning(f"\n{bar}\nDATA SUBSTITUTION: {message}\n{bar}")
