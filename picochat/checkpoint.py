"""
Checkpoints: atomic save, discovery of the last COMPLETE checkpoint, rotation, loading.

Layout (every stage: base, sft, rl):

    $PICOCHAT_HOME/checkpoints/<stage>/<model_tag>/
        model_<step:06d>.safetensors         uncompiled model state dict (rank 0)
        optim_<step:06d>_rank<r>.safetensors  optimizer.shard_state_dict() of rank r (every rank)
        meta_<step:06d>.json                  self-describing meta, written LAST (rank 0, after a barrier)
        metrics.jsonl                         one JSON row per logged step (written by the training loop)

Integrity: the meta records the SHA-256 of every tensor file ("sha256": {file name: hex}). Loading verifies the
model file, resuming verifies every file; a mismatch (bit rot, a same-size overwrite, a bad copy) is a
CorruptCheckpoint naming the file, and "the last checkpoint" skips corrupt ones with a warning (never "nothing to
do" because of a corrupt final checkpoint). Stray *.tmp files from killed saves are removed when a training
stage starts.

Why meta last: every file is written to a temp name and renamed, so no file is ever half-written; and the
meta is only published once every rank has renamed its files, so "meta exists" means "checkpoint complete".
find_last_step() additionally checks that the model and every rank's optimizer file exist and parse, so a
checkpoint that lost a file afterwards is not picked either.

Examples:
    python -c "from picochat.checkpoint import *; print(find_last_step(checkpoint_dir('base', 'd12')))"
"""
import os
import re
import json
import errno
import shutil
import signal
import base64
import random
import hashlib
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file, load_file

from picochat import __version__, gpt
from picochat.tokenizer import Tokenizer, get_tokenizer
from picochat.common import (get_base_dir, atomic_path, atomic_write_json, get_dist_info, barrier,
                             compute_dtype_for, logger, file_sha256, all_gather_json)

STAGES = ("base", "sft", "rl")
_META_RE = re.compile(r"^meta_(\d+)\.json$")
_MODEL_RE = re.compile(r"^model_(\d+)\.safetensors$")

# -----------------------------------------------------------------------------
# Paths

def stage_dir(stage: str) -> Path:
    """$PICOCHAT_HOME/checkpoints/<stage>: one directory per model tag below it."""
    if stage not in STAGES:
        raise ValueError(f"unknown checkpoint stage {stage!r}; expected one of {STAGES}")
    return get_base_dir() / "checkpoints" / stage

def checkpoint_dir(stage: str, model_tag: str) -> Path:
    return stage_dir(stage) / model_tag

def model_path(ckpt_dir, step) -> Path:
    return Path(ckpt_dir) / f"model_{step:06d}.safetensors"

def meta_path(ckpt_dir, step) -> Path:
    return Path(ckpt_dir) / f"meta_{step:06d}.json"

def optim_path(ckpt_dir, step, rank) -> Path:
    return Path(ckpt_dir) / f"optim_{step:06d}_rank{rank}.safetensors"

def metrics_path(ckpt_dir) -> Path:
    return Path(ckpt_dir) / "metrics.jsonl"

def find_largest_model(stage_dir) -> str:
    """The model tag whose newest complete checkpoint has the most layers (ties: the most recently modified tag
    directory). The depth is read from the checkpoint's meta, not guessed from the tag's name."""
    stage_dir = Path(stage_dir)
    tags = [p for p in stage_dir.iterdir() if p.is_dir()] if stage_dir.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"no checkpoints under {stage_dir}; train a model first "
                                f"({PRODUCER.get(stage_dir.name, 'a training stage')})")
    # a crashed run without any complete checkpoint should not shadow a usable one
    complete = [(p, step) for p in tags if (step := find_last_step(p)) is not None]
    if not complete:
        return max(tags, key=lambda p: p.stat().st_mtime).name
    def depth(tag_step):
        return read_meta(*tag_step).get("model_config", {}).get("n_layer", 0)
    return max(complete, key=lambda ts: (depth(ts), ts[0].stat().st_mtime))[0].name

SOURCES_BY_PREFERENCE = ("rl", "sft", "base")
PRODUCER = {"base": "picochat base-train", "sft": "picochat chat-sft", "rl": "picochat chat-rl"}

def find_tag(source: str, model_tag=None) -> str:
    """The model tag to load from checkpoints/<source> (default: the largest), with an error naming the stage
    that makes them."""
    if model_tag and not (stage_dir(source) / model_tag).is_dir():
        raise FileNotFoundError(f"no {source} checkpoints for tag {model_tag!r} in {stage_dir(source)}; "
                                f"run `{PRODUCER[source]}` first or pick another --model-tag")
    return model_tag or find_largest_model(stage_dir(source))

def latest_source(model_tag=None) -> str:
    """The most finished stage with a complete checkpoint (rl > sft > base): what chat/serve/export load by default."""
    for source in SOURCES_BY_PREFERENCE:
        try:
            tag = model_tag or find_largest_model(stage_dir(source))
        except FileNotFoundError:
            continue
        if find_last_step(stage_dir(source) / tag) is not None:
            return source
    raise FileNotFoundError(f"no complete checkpoint under {get_base_dir() / 'checkpoints'} (looked in "
                            f"{', '.join(SOURCES_BY_PREFERENCE)}); train one first (picochat base-train / chat-sft), "
                            f"or set PICOCHAT_HOME to where your checkpoints are")

# -----------------------------------------------------------------------------
# Validation (used by find_last_step): cheap, never loads tensor data.

class CorruptCheckpoint(ValueError):
    """A checkpoint file whose bytes do not match the SHA-256 its meta recorded."""

def _valid_safetensors(path: Path) -> bool:
    """True if `path` has a parseable safetensors header and exactly the bytes the header promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return False
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False

def read_meta(ckpt_dir, step) -> dict:
    path = meta_path(ckpt_dir, step)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint meta {path} not found (steps available: {list_steps(ckpt_dir)})")
    return json.loads(path.read_text(encoding="utf-8"))

def is_complete(ckpt_dir, step) -> bool:
    """Meta parses and names this step, model file valid, and every rank's optimizer file valid."""
    try:
        meta = read_meta(ckpt_dir, step)
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("step") != step:
        return False
    if not _valid_safetensors(model_path(ckpt_dir, step)):
        return False
    if meta.get("has_optimizer", False):
        world = int(meta.get("world_size", 1))
        if not all(_valid_safetensors(optim_path(ckpt_dir, step, r)) for r in range(world)):
            return False
    return True

def list_steps(ckpt_dir) -> list[int]:
    """Steps with a meta file (complete or not), sorted as integers."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _META_RE.match(p.name)))

def find_last_step(ckpt_dir) -> int | None:
    """The largest step (as an integer, not a string) whose checkpoint is complete; None if none is."""
    for step in reversed(list_steps(ckpt_dir)):
        if is_complete(ckpt_dir, step):
            return step
    return None

def corrupt_files(ckpt_dir, step, optimizer=True) -> list[str]:
    """Files of a complete checkpoint whose SHA-256 differs from the meta's record (the model's, and with
    `optimizer` every rank's optimizer shard). Checkpoints from before hashes were recorded verify as clean."""
    recorded = read_meta(ckpt_dir, step).get("sha256") or {}
    names = [model_path(ckpt_dir, step).name]
    if optimizer:
        names += [n for n in recorded if n.startswith(f"optim_{step:06d}_")]
    return [n for n in names if n in recorded and file_sha256(Path(ckpt_dir) / n) != recorded[n]]

def verify_checkpoint(ckpt_dir, step, optimizer=True):
    """Raise CorruptCheckpoint naming the damaged files and the checkpoints still good."""
    bad = corrupt_files(ckpt_dir, step, optimizer)
    if bad:
        good = [s for s in list_steps(ckpt_dir) if s != step and is_complete(ckpt_dir, s)]
        raise CorruptCheckpoint(f"checkpoint step {step} in {ckpt_dir} is corrupt: {', '.join(bad)} does not match the "
                                f"SHA-256 in its meta (a damaged disk or copy). Use another step (complete: {good}), "
                                f"or restore the file from a backup.")

def find_last_good_step(ckpt_dir, optimizer=False) -> int | None:
    """The newest complete checkpoint whose files verify; each corrupt newer one is skipped with a loud warning."""
    for step in reversed(list_steps(ckpt_dir)):
        if not is_complete(ckpt_dir, step):
            continue
        bad = corrupt_files(ckpt_dir, step, optimizer)
        if not bad:
            return step
        logger.warning(f"CORRUPT checkpoint skipped: step {step} in {ckpt_dir} ({', '.join(bad)} does not match the "
                       f"SHA-256 in its meta); falling back to an earlier one")
    return None

def remove_stray_temp_files(ckpt_dir):
    """Temp files of saves that were killed midway (atomic_path names them <file>.<random>.tmp)."""
    d = Path(ckpt_dir)
    for p in list(d.glob("*.tmp")) + list(d.glob("tokenizer/*.tmp")):
        logger.info(f"removing {p}, left by an interrupted save")
        _remove(p)

# -----------------------------------------------------------------------------
# Saving

def tokenizer_reference(tokenizer_dir=None) -> dict:
    """Which tokenizer a model was trained with: its path and the sha256 of tokenizer.json."""
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else get_base_dir() / "tokenizer"
    path = tokenizer_dir / "tokenizer.json"
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    return {"path": str(tokenizer_dir), "sha256": digest}

def _cpu_state(state: dict) -> dict:
    """Detached, contiguous CPU copies without `_orig_mod.` prefixes (safetensors refuses shared storage)."""
    out = {}
    for k, v in state.items():
        # removeprefix, not lstrip: lstrip strips a SET of characters and would eat the start of real names
        k = k.removeprefix("_orig_mod.")
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out

class DiskFull(RuntimeError):
    """No room to write a checkpoint; the earlier ones are intact (every file is written to a temp name first)."""
    exit_code = 4  # `picochat` prints the message as one line and exits with this

def _save_tensors(path: Path, tensors: dict):
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise DiskFull(f"no space left to write {path} ({e.strerror}); the half-written file was removed and the "
                       f"earlier checkpoints in {path.parent} are intact. Free some space (or lower --save-every / "
                       f"--keep-last), then rerun with --resume auto") from e

def save_checkpoint(ckpt_dir, step: int, model, optimizer, meta: dict, keep_last: int | None = None):
    """Every rank calls this. Rank 0 writes the model; each rank writes its optimizer shard; after a barrier
    rank 0 writes the meta (which marks completeness) and rotates old checkpoints (keep_last)."""
    _, rank, _, world_size = get_dist_info()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # any rank may get here first
    digests = {}
    if rank == 0:
        orig = getattr(model, "_orig_mod", model)  # never save the compiled wrapper
        path = model_path(ckpt_dir, step)
        _save_tensors(path, _cpu_state(orig.state_dict()))
        digests[path.name] = file_sha256(path)
    if optimizer is not None:
        path = optim_path(ckpt_dir, step, rank)
        _save_tensors(path, _cpu_state(optimizer.shard_state_dict()))
        digests[path.name] = file_sha256(path)  # each rank hashes its own file; rank 0 records them all
    digests = {k: v for rank_digests in all_gather_json(digests) for k, v in rank_digests.items()}
    if os.environ.get("PICOCHAT_FAULT_SIGKILL_SAVE") == str(step):
        # fault injection for the atomicity test: die after the tensors, before the meta that completes them
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        meta = dict(meta)
        meta["step"] = step
        meta["world_size"] = world_size
        meta["has_optimizer"] = optimizer is not None
        meta["sha256"] = digests
        meta.setdefault("picochat_version", __version__)
        meta.setdefault("tokenizer", tokenizer_reference())
        _copy_tokenizer_into(ckpt_dir)
        atomic_write_json(meta_path(ckpt_dir, step), meta)
        if keep_last is not None and keep_last > 0:
            rotate_checkpoints(ckpt_dir, keep_last)
    barrier()

def _copy_tokenizer_into(ckpt_dir: Path):
    """A checkpoint directory carries its own tokenizer (tokenizer/), so it stays usable when the global one
    under $PICOCHAT_HOME/tokenizer is retrained or the directory is moved to another machine."""
    src, dst = get_base_dir() / "tokenizer", ckpt_dir / "tokenizer"
    if (dst / "tokenizer.json").exists() or not (src / "tokenizer.json").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("token_bytes.safetensors", "tokenizer.json"):  # tokenizer.json last: it marks the copy complete
        if (src / name).exists():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)

def checkpoint_tokenizer(ckpt_dir):
    """The tokenizer a checkpoint was trained with: its own copy if it has one, else the global one."""
    own = Path(ckpt_dir) / "tokenizer"
    return Tokenizer.from_directory(own) if (own / "tokenizer.json").exists() else get_tokenizer()

def _remove(path: Path):
    try:
        path.unlink()
    except FileNotFoundError:
        pass

def delete_checkpoint(ckpt_dir, step: int):
    """Meta first, so a crash midway leaves an incomplete (ignored) checkpoint, never a bogus complete one."""
    ckpt_dir = Path(ckpt_dir)
    _remove(meta_path(ckpt_dir, step))
    _remove(model_path(ckpt_dir, step))
    for p in ckpt_dir.glob(f"optim_{step:06d}_rank*.safetensors"):
        _remove(p)

def rotate_checkpoints(ckpt_dir, keep_last: int):
    """Keep the newest `keep_last` complete checkpoints; delete older ones (complete or not)."""
    complete = [s for s in list_steps(ckpt_dir) if is_complete(ckpt_dir, s)]
    keep = set(complete[-keep_last:])
    if not keep:
        return
    oldest_kept = min(keep)
    steps = set(list_steps(ckpt_dir))
    # model files without a meta (a crashed save) older than what we keep are garbage too
    steps |= {int(m.group(1)) for p in Path(ckpt_dir).iterdir() if (m := _MODEL_RE.match(p.name))}
    for s in sorted(steps):
        if s < oldest_kept:
            delete_checkpoint(ckpt_dir, s)

# -----------------------------------------------------------------------------
# Resume compatibility

def check_resume_compat(meta: dict, model_config: dict, world_size: int):
    """Raise a clear error when the checkpoint cannot be resumed by this run."""
    saved = meta.get("model_config", {})
    diffs = [f"{k}: checkpoint={saved.get(k)!r} vs now={model_config.get(k)!r}"
             for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)]
    if diffs:
        raise ValueError("cannot resume: the model config differs from the checkpoint's ("
                         + "; ".join(diffs) + "). Use the same --depth/--aspect-ratio/--head-dim/--max-seq-len/"
                         "--window-pattern and tokenizer as the saved run, or start a new --model-tag.")
    saved_ws = int(meta.get("world_size", 1))
    if saved_ws != world_size:
        raise ValueError(f"cannot resume: the checkpoint was written with world size {saved_ws} but this run has "
                         f"world size {world_size}; the optimizer state is sharded per rank. Relaunch with "
                         f"--nproc_per_node={saved_ws} (or equivalent), or start a new --model-tag.")

# -----------------------------------------------------------------------------
# RNG state as JSON (no pickles): torch CPU/CUDA as base64 bytes, python random and numpy as lists.

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())

def get_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state

def set_rng_state(state: dict):
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])

# -----------------------------------------------------------------------------
# Loading

def load_state(ckpt_dir, step, device, verify=True) -> tuple[dict, dict]:
    """(model state dict on CPU, meta). bf16/fp16 tensors are upcast to fp32 when the target is CPU/MPS
    (slow or unsupported there); `_orig_mod.` prefixes are stripped. The model file's SHA-256 is checked against
    the meta (CorruptCheckpoint) unless the caller has verified the checkpoint already."""
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step, verify = find_last_good_step(ckpt_dir), False
        if step is None:
            raise FileNotFoundError(f"no complete, uncorrupted checkpoint in {ckpt_dir}")
    if not is_complete(ckpt_dir, step):
        raise FileNotFoundError(f"checkpoint step {step} in {ckpt_dir} is missing or incomplete "
                                f"(complete steps: {[s for s in list_steps(ckpt_dir) if is_complete(ckpt_dir, s)]})")
    if verify:
        verify_checkpoint(ckpt_dir, step, optimizer=False)
    meta = read_meta(ckpt_dir, step)
    state = load_file(str(model_path(ckpt_dir, step)), device="cpu")
    device_type = torch.device(device).type
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if device_type in ("cpu", "mps"):
        state = {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v) for k, v in state.items()}
    return state, meta

def load_optimizer_state(ckpt_dir, step, rank) -> dict:
    path = optim_path(ckpt_dir, step, rank)
    if not path.exists():
        raise FileNotFoundError(f"optimizer shard {path} not found; resuming needs the same world size "
                                "the checkpoint was written with")
    return load_file(str(path), device="cpu")

def load_model_from_dir(ckpt_dir, step, device, phase="eval", verify=True):
    """(model, tokenizer, meta). The model is built for `device` in its compute dtype and loaded strictly."""
    assert phase in ("eval", "train"), f"phase must be 'eval' or 'train', got {phase!r}"
    device = torch.device(device)
    state, meta = load_state(ckpt_dir, step, device, verify=verify)
    config = gpt.GPTConfig.from_dict(meta["model_config"])
    tokenizer = checkpoint_tokenizer(ckpt_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab size {tokenizer.get_vocab_size()} != checkpoint vocab size "
                         f"{config.vocab_size}; the checkpoint in {ckpt_dir} was trained with another tokenizer "
                         f"({meta.get('tokenizer')})")
    ref = meta.get("tokenizer") or {}
    if ref.get("sha256") and not (Path(ckpt_dir) / "tokenizer").exists() and ref["sha256"] != tokenizer_reference()["sha256"]:
        logger.warning(f"tokenizer.json differs from the one this checkpoint was trained with ({ref})")
    model = gpt.build_model(config, device, compute_dtype_for(device.type))
    check_state_shapes(model, state, ckpt_dir)
    # copy (not assign): values are cast into the parameters' own dtypes for this device
    model.load_state_dict(state, strict=True)
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta

def check_state_shapes(model, state: dict, where):
    """A clear error, instead of load_state_dict's wall of text, when the weights do not fit the model the meta
    describes (an edited meta, files mixed from two runs)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"{k}: weights {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    problems += [f"{k}: missing from the weights" for k in expected if k not in got]
    problems += [f"{k}: not in the model" for k in got if k not in expected]
    if problems:
        raise ValueError(f"the weights in {where} do not match the model its meta describes ({len(problems)} "
                         f"problem(s): {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}); the meta and "
                         f"the weights come from different runs: restore the matching files or use another step")

def load_model(source, device, phase="eval", model_tag=None, step=None):
    """Load from checkpoints/<source>/<tag>; tag defaults to the largest model, step to the last complete.
    -> (model, tokenizer, meta); meta["source"], meta["model_tag"] and meta["step"] say what was resolved, so no
    caller resolves it again."""
    if source not in STAGES:
        raise ValueError(f"unknown source {source!r}; expected one of {STAGES}")
    model_tag = find_tag(source, model_tag)
    ckpt_dir = checkpoint_dir(source, model_tag)
    verify = step is not None  # an explicit step must verify; the default is the newest one that does
    if step is None:
        step = find_last_good_step(ckpt_dir)
        if step is None:
            raise FileNotFoundError(f"no complete, uncorrupted checkpoint in {ckpt_dir}")
    model, tokenizer, meta = load_model_from_dir(ckpt_dir, step, device, phase, verify=verify)
    return model, tokenizer, {**meta, "source": source, "model_tag": model_tag, "step": step}

# -----------------------------------------------------------------------------
# metrics.jsonl: append-only; on resume rows at or beyond the resume step are dropped.

def append_metrics(ckpt_dir, row: dict):
    path = metrics_path(ckpt_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()

def read_metrics(ckpt_dir) -> list[dict]:
    path = metrics_path(ckpt_dir)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line from a killed process
            pass
    return rows

def truncate_metrics(ckpt_dir, step: int):
    """Keep only rows with step < `step` (the rows a resumed run would otherwise write twice)."""
    path = metrics_path(ckpt_dir)
    if not path.exists():
        return
    rows = [r for r in read_metrics(ckpt_dir) if r.get("step", -1) < step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
