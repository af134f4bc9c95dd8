"""
CORE (DCLM): in-context evaluation of a base model on 22 tasks of three kinds.

  multiple_choice   {"query", "choices", "gold"}: one prompt per choice, the choice tokens are scored
  schema            {"context_options", "continuation", "gold"}: one prompt per context, the shared
                    continuation is scored
  language_modeling {"context", "continuation"}: correct iff greedy decoding reproduces the continuation

MC/schema pick the option with the lowest MEAN cross-entropy over its span. The per-task accuracy is
centered against the random baseline, (acc - b) / (1 - b), and CORE is the mean of the centered values.

Reproducing the reference exactly: items are shuffled with random.Random(1337) and truncated to
max_per_task; item i draws its few-shot examples with random.Random(1234 + i) from the OTHER items of that
(possibly truncated) list; prompts are rendered as below with a blank line after each few-shot example;
every prompt is encoded with BOS prepended; the batch is right-padded with BOS.

Examples are strided across ranks and the correctness vector is all-reduced.

Two evaluators give the same per-item results (tests compare them item by item):
  plain   any model returning (B, T, V) logits: each example's rows are right-padded and packed into forward
          passes of up to `batch_size` rows; CE over every position, then the span is read off.
  fast    a GPT (it has final_hidden/logits): the rows of a multiple-choice or schema example share their
          opening (few-shot examples, the query), so that prefix runs ONCE at batch 1 into a KV cache that is
          copied to every row, and only the differing suffixes run per row; the lm_head and the CE are
          computed at the scored positions only (the (B, T, V) logits never exist); language-modelling
          examples (one row each) are sorted by length before packing, so a batch pads little.
"""
import csv
import random
import shutil
import zipfile
import tempfile
from pathlib import Path

import yaml
import torch
import torch.nn.functional as F
import torch.distributed as dist
from filelock import FileLock

from picochat import common, fetch
from picochat.common import get_base_dir, warn0, logger
from picochat.gpt import KVCache
from picochat.tasks.common import read_jsonl

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

# -----------------------------------------------------------------------------
# The CORE bundle: core.yaml, eval_meta_data.csv and eval_data/ (fetched from a mirror or the public zip)

def _validate_zip(path):
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"corrupt member {bad}")


def _fetch_zip_bundle(dest: Path):
    zpath = get_base_dir() / "eval_bundle.zip"
    fetch.download("eval_bundle.zip", EVAL_BUNDLE_URL, zpath, validate=_validate_zip)
    tmp = Path(tempfile.mkdtemp(prefix="eval_bundle.", dir=get_base_dir()))
    try:
        with zipfile.ZipFile(zpath) as z:
            z.extractall(tmp)
        found = [p.parent for p in tmp.rglob("core.yaml")]
        if not found:
            raise FileNotFoundError(f"{zpath} has no core.yaml; delete it and retry, or use --bundle-dir")
        if not dest.exists():
            found[0].rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bundle_dir(local_dir=None) -> Path:
    """The directory holding core.yaml / eval_meta_data.csv / eval_data/ (fetching what is needed)."""
    if local_dir:
        d = Path(local_dir).expanduser()
        if not (d / "core.yaml").exists():
            raise FileNotFoundError(f"--bundle-dir {d} has no core.yaml (expected core.yaml, eval_meta_data.csv, "
                                    "eval_data/...)")
        return d
    dest = get_base_dir() / "eval_bundle"
    if fetch.get_mirror():
        for name in ("core.yaml", "eval_meta_data.csv"):
            fetch.download(f"core/{name}", None, dest / name, progress=False)
        return dest
    if not (dest / "core.yaml").exists():
        with FileLock(str(dest) + ".lock"):  # one rank downloads and unzips, the others wait
            if not (dest / "core.yaml").exists():
                _fetch_zip_bundle(dest)
    return dest


def load_core_tasks(local_dir=None, labels=None):
    """-> (tasks, missing labels, number of tasks asked for). Each task: label, task_type, num_fewshot,
    continuation_delimiter, random_baseline (percent), data (list of items)."""
    root = bundle_dir(local_dir)
    config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
    baselines = {}
    with open(root / "eval_meta_data.csv", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            baselines[r["Eval Task"]] = float(r["Random baseline"])
    entries = config["icl_tasks"]
    if labels:
        unknown = set(labels) - {e["label"] for e in entries}
        if unknown:
            raise ValueError(f"unknown CORE task(s) {sorted(unknown)}; core.yaml has {[e['label'] for e in entries]}")
        entries = [e for e in entries if e["label"] in labels]
    tasks, missing, cache = [], [], {}
    for e in entries:
        uri = e["dataset_uri"].removeprefix("local_data/")  # DCLM's yaml prefix; the bundle's are relative
        path = root / "eval_data" / uri
        if not path.exists() and fetch.get_mirror() and not local_dir:
            try:
                fetch.download(f"core/eval_data/{uri}", None, path, progress=False, retries=2)
            except Exception as err:
                logger.warning(f"CORE task {e['label']}: could not fetch {uri} ({err})")
        if not path.exists():
            missing.append(e["label"])
            continue
        if path not in cache:
            cache[path] = read_jsonl(path)
        if e["label"] not in baselines:
            raise ValueError(f"eval_meta_data.csv has no 'Random baseline' for task {e['label']!r}")
        shots = e.get("num_fewshot", [0])
        tasks.append({"label": e["label"], "task_type": e["icl_task_type"],
                      "num_fewshot": shots[0] if isinstance(shots, list) else int(shots),
                      "continuation_delimiter": e.get("continuation_delimiter", " "),
                      "random_baseline": baselines[e["label"]], "data": cache[path]})
    if missing:
        warn0(f"CORE over {len(tasks)}/{len(entries)} tasks: missing data for {', '.join(missing)}")
    return tasks, missing, len(entries)


# -----------------------------------------------------------------------------
# Prompt rendering (the reference's Jinja templates, written out in Python)

def render_prompts_mc(item, delim, fewshot):
    prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]

def render_prompts_schema(item, delim, fewshot):
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]

def render_prompts_lm(item, delim, fewshot):
    """[without continuation (right-stripped, so no trailing space hangs off the prefix), with continuation]."""
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delim}"
    return [without.rstrip(), without + item["continuation"]]

# -----------------------------------------------------------------------------
# Token spans

def common_prefix_length(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n

def common_suffix_length(seqs):
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        if any(s[-i] != seqs[0][-i] for s in seqs):
            return i - 1
    return n

def tokenize_example(tokenizer, prompts, task_type):
    """-> (token lists, start indices, end indices); the span [start, end) of each row is what is scored."""
    bos = tokenizer.get_bos_token_id()
    tokens = tokenizer.encode(prompts, prepend=bos)
    if task_type == "multiple_choice":
        # the choices differ only at the end: the scored span starts where they first differ
        start = common_prefix_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":
        # the contexts differ, the continuation is shared: score the common suffix
        k = common_suffix_length(tokens)
        return tokens, [len(t) - k for t in tokens], [len(t) for t in tokens]
    if task_type == "language_modeling":
        without, with_ = tokens
        start = len(without)
        if with_[:start] != without:
            # the reference asserts here; a tokenizer that merges across the boundary would crash a whole eval,
            # so score from the point where the two agree instead
            start = common_prefix_length([without, with_])
        return [with_], [start], [len(with_)]
    raise ValueError(f"unknown icl_task_type {task_type!r}; expected one of {TASK_TYPES}")

def crop(tokens, starts, ends, max_len):
    """Keep the last max_len tokens of each row (spans shift left accordingly)."""
    if max_len is None:
        return tokens, starts, ends
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        out_t.append(t[cut:]); out_s.append(max(1, s - cut)); out_e.append(e - cut)
    return out_t, out_s, out_e

# -----------------------------------------------------------------------------
# Forward and scoring

def _padded(rows, pad_id, device):
    """Token lists -> one (len(rows), longest) id tensor, right-padded with pad_id."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)

@torch.no_grad()
def forward_losses(model, rows, pad_id, device):
    """Right-pad rows with pad_id, one forward -> (per-position CE against the next token (last col NaN),
    argmax predictions, input ids)."""
    ids = _padded(rows, pad_id, device)
    T = ids.size(1)
    logits = model(ids).float()  # (B, T, V)
    targets = torch.roll(ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    losses = losses.view(len(rows), T)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1), ids

def score_rows(task_type, losses, preds, ids, starts, ends, gold):
    """Correctness of one example whose rows are (losses, preds, ids)[k]."""
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(preds[0, s - 1:e - 1], ids[0, s:e]))
    means = [losses[k, s - 1:e - 1].mean().item() for k, (s, e) in enumerate(zip(starts, ends))]
    means = [float("inf") if m != m else m for m in means]  # an empty span (choice = prefix of another) never wins
    pred = min(range(len(means)), key=lambda k: means[k])  # first index wins ties
    return pred == gold

# -----------------------------------------------------------------------------
# Task driver

def prepare_task_data(data, max_per_task=-1):
    """The reference's item order: shuffle with Random(1337), then keep the first max_per_task."""
    data = list(data)
    random.Random(1337).shuffle(data)
    if max_per_task is not None and max_per_task > 0:
        data = data[:max_per_task]
    return data

def fewshot_examples(data, idx, num_fewshot):
    if num_fewshot <= 0:
        return []
    rng = random.Random(1234 + idx)
    available = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(available, min(num_fewshot, len(available)))]

def build_example(idx, data, tokenizer, task_meta, max_len=None):
    item = data[idx]
    task_type, delim = task_meta["task_type"], task_meta.get("continuation_delimiter", " ")
    fewshot = fewshot_examples(data, idx, task_meta.get("num_fewshot", 0))
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}.get(task_type)
    if render is None:
        raise ValueError(f"unknown icl_task_type {task_type!r}; expected one of {TASK_TYPES}")
    tokens, starts, ends = tokenize_example(tokenizer, render(item, delim, fewshot), task_type)
    tokens, starts, ends = crop(tokens, starts, ends, max_len)
    return tokens, starts, ends, item.get("gold", 0)

def _model_device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")

def _gather_result(correct, world, per_item):
    """Each rank scored its stride of items: sum the 0/1 vectors, then the per-item list or the accuracy."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    if per_item:
        return correct.tolist()
    return correct.mean().item() if len(correct) else float("nan")

@torch.no_grad()
def evaluate_task(model, tokenizer, data, task_meta, device=None, batch_size=32, max_len=None, per_item=False):
    """Accuracy of `model` on `data` (already prepared with prepare_task_data). Every rank returns the same
    value. task_meta: {"task_type", "num_fewshot", "continuation_delimiter"}. per_item: return the 0/1
    correctness of every item instead."""
    device = device or _model_device(model)
    _, rank, _, world = common.get_dist_info()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    pad = tokenizer.get_bos_token_id()
    pending = []  # examples waiting for a forward pass: (idx, tokens, starts, ends, gold)

    def flush():
        rows = [t for (_, toks, _, _, _) in pending for t in toks]
        losses, preds, ids = forward_losses(model, rows, pad, device)
        r = 0
        for idx, toks, s, e, gold in pending:
            n = len(toks)
            ok = score_rows(task_meta["task_type"], losses[r:r + n], preds[r:r + n], ids[r:r + n], s, e, gold)
            correct[idx] = float(ok)
            r += n
        pending.clear()

    for idx in range(rank, len(data), world):
        toks, s, e, gold = build_example(idx, data, tokenizer, task_meta, max_len)
        if pending and sum(len(p[1]) for p in pending) + len(toks) > batch_size:
            flush()
        pending.append((idx, toks, s, e, gold))
    if pending:
        flush()
    return _gather_result(correct, world, per_item)

# -----------------------------------------------------------------------------
# The fast evaluator (GPT models)

@torch.no_grad()
def span_scores(model, rows, starts, ends, pad_id, device, prefix=0):
    """[(mean CE over the span, greedy argmax reproduces the span)] per row. The first `prefix` tokens, equal
    in every row and before every span, are run once at batch 1 and shared through a KV cache."""
    cache = None
    if prefix > 0:
        one = KVCache.for_model(model, 1, prefix, device)
        model.final_hidden(torch.tensor([rows[0][:prefix]], dtype=torch.long, device=device), kv_cache=one)
        cache = KVCache.for_model(model, len(rows), max(len(r) for r in rows), device)
        cache.prefill(one)
    hidden = model.final_hidden(_padded([r[prefix:] for r in rows], pad_id, device), kv_cache=cache)
    # position j predicts token j+1: the span [s, e) is predicted from positions s-1 .. e-2
    row_idx, pos_idx, targets, sizes = [], [], [], []
    for k, (r, s, e) in enumerate(zip(rows, starts, ends)):
        row_idx += [k] * (e - s)
        pos_idx += range(s - 1 - prefix, e - 1 - prefix)
        targets += r[s:e]
        sizes.append(e - s)
    logits = model.logits(hidden[torch.tensor(row_idx, dtype=torch.long), torch.tensor(pos_idx, dtype=torch.long)])
    targets = torch.tensor(targets, dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    hit = logits.argmax(dim=-1) == targets
    out = []
    for ce_k, hit_k in zip(ce.split(sizes), hit.split(sizes)):
        # an empty span (a choice that is a prefix of another) never wins
        out.append((ce_k.mean().item() if len(ce_k) else float("inf"), bool(hit_k.all())))
    return out

SHARE_MIN_TOKENS = 32  # a shared opening shorter than this saves less than a separate batch-1 pass costs

def _pick(task_type, scores, gold):
    if task_type == "language_modeling":
        return scores[0][1]
    means = [m for m, _ in scores]
    return min(range(len(means)), key=lambda k: means[k]) == gold  # first index wins ties

@torch.no_grad()
def evaluate_task_fast(model, tokenizer, data, task_meta, device=None, batch_size=32, max_len=None, per_item=False):
    """evaluate_task for GPT models, with the same per-item results (see the module docstring)."""
    device = device or _model_device(model)
    _, rank, _, world = common.get_dist_info()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    pad, task_type = tokenizer.get_bos_token_id(), task_meta["task_type"]
    shared, packed = [], []  # (idx, tokens, starts, ends, gold, prefix)
    for idx in range(rank, len(data), world):
        toks, starts, ends, gold = build_example(idx, data, tokenizer, task_meta, max_len)
        prefix = max(0, min(common_prefix_length(toks), min(starts) - 1)) if len(toks) > 1 else 0
        (shared if prefix >= SHARE_MIN_TOKENS else packed).append((idx, toks, starts, ends, gold, prefix))
    for idx, toks, starts, ends, gold, prefix in shared:
        correct[idx] = float(_pick(task_type, span_scores(model, toks, starts, ends, pad, device, prefix), gold))
    packed.sort(key=lambda ex: max(len(t) for t in ex[1]))  # similar lengths share a batch: little padding
    batch = []
    for i, ex in enumerate(packed):
        batch.append(ex)
        nxt = packed[i + 1] if i + 1 < len(packed) else None
        if nxt is None or sum(len(e[1]) for e in batch) + len(nxt[1]) > batch_size:
            scores = span_scores(model, [t for e in batch for t in e[1]], [s for e in batch for s in e[2]],
                                 [x for e in batch for x in e[3]], pad, device)
            for e in batch:
                correct[e[0]] = float(_pick(task_type, scores[:len(e[1])], e[4]))
                scores = scores[len(e[1]):]
            batch = []
    return _gather_result(correct, world, per_item)

def centered(acc, random_baseline_percent):
    b = 0.01 * random_baseline_percent
    return (acc - b) / (1.0 - b)

def evaluate_core(model, tokenizer, tasks, max_per_task=-1, device=None, batch_size=32, max_len=None,
                  log=print):
    """tasks: list of {"label", "task_type", "num_fewshot", "continuation_delimiter", "random_baseline", "data"}
    -> {"results": {label: acc}, "centered_results": {label: c}, "core_metric": mean centered}."""
    results, centered_results = {}, {}
    for t in tasks:
        data = prepare_task_data(t["data"], max_per_task)
        evaluate = evaluate_task_fast if hasattr(model, "final_hidden") else evaluate_task
        acc = evaluate(model, tokenizer, data, t, device=device, batch_size=batch_size, max_len=max_len)
        results[t["label"]] = acc
        centered_results[t["label"]] = centered(acc, t["random_baseline"])
        if log:
            log(f"{t['label']:<34} acc {acc:.4f}  centered {centered_results[t['label']]:+.4f}  (n={len(data)})")
    core = sum(centered_results.values()) / len(centered_results) if centered_results else float("nan")
    return {"results": results, "centered_results": centered_results, "core_metric": core}
