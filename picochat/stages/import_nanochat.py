r"""
Convert a nanochat checkpoint into a picochat one, so `picochat chat`, `serve`, `base-eval` and
`chat-eval` can use it.

    picochat import-nanochat ~/.cache/nanochat/base_checkpoints/d24 --allow-pickle
    picochat import-nanochat CKPT_DIR --step 5568 --tokenizer-dir ~/.cache/nanochat/tokenizer \
        --stage sft --model-tag d24-nanochat --allow-pickle

Reads model_NNNNNN.pt (loaded with torch.load(weights_only=True)), meta_NNNNNN.json and nanochat's
tokenizer/tokenizer.pkl. That tokenizer is a pickled tiktoken Encoding: a pickle can run code when
loaded, so it is read only with --allow-pickle, and even then through a restricted unpickler that
accepts nothing but the Encoding's plain data (name, pattern, ranks, special tokens). It is then
written in picochat's JSON format; nothing picochat writes is a pickle.

The model must be of the current nanochat architecture (smear, backout, value embeddings with
12-channel gates, per-layer lambdas): parameter names and shapes are checked and any difference
is reported by name.
"""
import argparse
import io
import json
import pickle
import re
from pathlib import Path

import torch

from picochat.common import HelpFormatter, get_base_dir, print0
from picochat.checkpoint import checkpoint_dir, save_checkpoint
from picochat.run_record import RunRecord
from picochat.gpt import GPT, GPTConfig, build_model
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

MODEL_RE = re.compile(r"^model_(\d+)\.pt$")


class _EncodingData:
    """Stand-in for tiktoken.core.Encoding inside the restricted unpickler: it only keeps the state."""
    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingData
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the tokenizer pickle: "
                                     "only a tiktoken Encoding is expected there")


def read_nanochat_tokenizer(pkl_path: Path):
    """tokenizer.pkl -> picochat Tokenizer, without executing anything the pickle might contain."""
    obj = _RestrictedUnpickler(io.BytesIO(pkl_path.read_bytes())).load()
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= state.keys():
        raise ValueError(f"{pkl_path} does not hold a tiktoken Encoding (got {type(obj).__name__})")
    ranks_by_id = sorted(state["mergeable_ranks"].items(), key=lambda kv: kv[1])
    if [r for _, r in ranks_by_id] != list(range(len(ranks_by_id))):
        raise ValueError(f"{pkl_path}: mergeable ranks are not contiguous 0..N-1")
    ranks = [b for b, _ in ranks_by_id]
    expected = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    if state["special_tokens"] != expected:
        raise ValueError(f"{pkl_path}: special tokens {state['special_tokens']} differ from the nanochat/picochat "
                         f"set {expected}; this tokenizer cannot be used with picochat's chat format")
    return Tokenizer(ranks, state["pat_str"])


def find_tokenizer_pickle(ckpt_dir: Path, tokenizer_dir):
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [ckpt_dir / "tokenizer", ckpt_dir.parent.parent / "tokenizer"]
    for d in candidates:
        if (d / "tokenizer.pkl").exists():
            return d / "tokenizer.pkl"
    raise FileNotFoundError(f"nanochat tokenizer.pkl not found in {[str(c) for c in candidates]}; "
                            "pass --tokenizer-dir (nanochat keeps it in $NANOCHAT_BASE_DIR/tokenizer)")


def convert_state_dict(state: dict, config) -> dict:
    """Check nanochat's state dict against picochat's GPT for `config`; returns it with clean keys."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    with torch.device("meta"):
        ours = GPT(config).state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs expected {tuple(ours[k].shape)}"
              for k in sorted(set(ours) & set(state)) if tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or shapes:
        lines = ["the nanochat checkpoint does not match the current architecture:"]
        if missing:
            lines.append(f"  missing parameters ({len(missing)}): {missing[:12]}"
                         + (" — checkpoints from before smear/backout (nanochat < a825e63) lack these" if any("smear" in k or "backout" in k for k in missing) else ""))
        if unexpected:
            lines.append(f"  unexpected parameters ({len(unexpected)}): {unexpected[:12]}")
        if shapes:
            lines.append(f"  shape mismatches: {shapes[:6]}")
        raise ValueError("\n".join(lines))
    return state


def nanochat_short_window(sequence_len: int) -> int:
    """nanochat's S window: a quarter of the context rounded UP to a multiple of 128 (FA3's tile), with no
    exception for short contexts, so at T <= 128 it covers the whole context (picochat keeps T/4 there). An imported
    model must attend exactly as it was trained."""
    return -(-sequence_len // 4 // 128) * 128


def import_checkpoint(ckpt_dir, step=None, tokenizer_dir=None, allow_pickle=False, stage="base", model_tag=None):
    """Convert; returns the picochat checkpoint directory."""
    ckpt_dir = Path(ckpt_dir).expanduser()
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir} is not a directory")
    steps = sorted(int(m.group(1)) for f in ckpt_dir.iterdir() if (m := MODEL_RE.match(f.name)))
    if not steps:
        raise FileNotFoundError(f"no model_<step>.pt in {ckpt_dir}: not a nanochat checkpoint directory")
    step = steps[-1] if step is None else step
    model_file, meta_file = ckpt_dir / f"model_{step:06d}.pt", ckpt_dir / f"meta_{step:06d}.json"
    for f in (model_file, meta_file):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found (steps present: {steps})")
    meta = json.loads(meta_file.read_text())
    cfg = dict(meta.get("model_config") or {})
    needed = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"}
    if not needed <= cfg.keys():
        raise ValueError(f"{meta_file}: model_config lacks {sorted(needed - cfg.keys())}")
    cfg.setdefault("window_pattern", "L")  # nanochat checkpoints from before sliding windows
    config = GPTConfig.from_dict({k: cfg[k] for k in needed | {"window_pattern"}})
    config.short_window = nanochat_short_window(config.sequence_len)

    pkl = find_tokenizer_pickle(ckpt_dir, tokenizer_dir)
    if not allow_pickle:
        raise PermissionError(f"the nanochat tokenizer {pkl} is a pickle, and loading a pickle from an untrusted "
                              "source can run arbitrary code. picochat reads it with a restricted unpickler that "
                              "only accepts a tiktoken Encoding's data; pass --allow-pickle if you trust the file")
    print0(f"WARNING: reading the pickled tokenizer {pkl} (restricted unpickler: tiktoken Encoding data only)")
    tokenizer = read_nanochat_tokenizer(pkl)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {config.vocab_size}")

    state = torch.load(model_file, map_location="cpu", weights_only=True)
    state = convert_state_dict(state, config)
    model = build_model(config, torch.device("cpu"), torch.float32)
    model.load_state_dict(state, strict=True)

    model_tag = model_tag or f"d{config.n_layer}"
    out_dir = checkpoint_dir(stage, model_tag)
    tokenizer.save(out_dir / "tokenizer")  # the checkpoint carries its own tokenizer
    tok_home = get_base_dir() / "tokenizer"
    if not (tok_home / "tokenizer.json").exists():
        tokenizer.save(tok_home)
    user_config = meta.get("user_config", {})
    def given(key, fallback):  # nanochat's flag value, or its default when the meta does not say (-1 = auto)
        value = user_config.get(key)
        return fallback if value in (None, -1) else value
    run = RunRecord(stage=stage, model_tag=model_tag, compute_dtype="float32", max_seq_len=config.sequence_len,
                    device_batch_size=given("device_batch_size", 32), total_batch_size=given("total_batch_size", 524288),
                    lrs={"embedding": given("embedding_lr", 0.3), "unembedding": given("unembedding_lr", 0.004),
                         "matrix": given("matrix_lr", 0.02), "scalar": given("scalar_lr", 0.5)},
                    num_iterations=step, parent={"source": "nanochat", "model_tag": str(ckpt_dir), "step": step},
                    user_config=user_config, loop={"val_bpb": meta.get("val_bpb")})
    save_checkpoint(out_dir, step, model, None, {"model_config": config.to_dict(), "run": run.to_dict()})
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="picochat import-nanochat", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("ckpt_dir", help="nanochat checkpoint directory (holds model_NNNNNN.pt, meta_NNNNNN.json)")
    parser.add_argument("--step", type=int, default=None, help="default: the last step present")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="directory of nanochat's tokenizer.pkl (default: CKPT_DIR/tokenizer, then the "
                             "tokenizer/ two levels above CKPT_DIR)")
    parser.add_argument("--allow-pickle", action="store_true", help="read the pickled tokenizer (restricted unpickler)")
    parser.add_argument("--stage", choices=["base", "sft", "rl"], default="base",
                        help="which picochat stage it becomes")
    parser.add_argument("--model-tag", default=None, help="default d<depth>")
    args = parser.parse_args(argv)
    out = import_checkpoint(args.ckpt_dir, args.step, args.tokenizer_dir, args.allow_pickle, args.stage, args.model_tag)
    print0(f"Imported into {out}; try: picochat chat -i {args.stage} -g {out.name}")
    return 0
