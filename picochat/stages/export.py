"""
Export a picochat checkpoint to a Hugging Face `transformers` directory.

    picochat export --format hf OUT_DIR                 # latest checkpoint (rl > sft > base)
    picochat export --format hf OUT_DIR -i sft -g d12 -s 1500

Then, anywhere with transformers installed (no picochat needed):

    model = AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(OUT_DIR)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)

OUT_DIR holds model.safetensors (its metadata names the picochat version and the source checkpoint),
config.json (picochat's names and the standard ones: hidden_size, num_hidden_layers, ...), modeling_picochat.py
(our self-contained modeling code: any dtype, attention_mask, KV cache), generation_config.json and the
tokenizer (tokenizer.json in the HF `tokenizers` format, tokenizer_config.json with the chat template, and
tokenization_picochat.py). The HF tokenizer reproduces ours token for token: the tiktoken ranks become BPE
merges, the split regex becomes a Split pre-tokenizer. Loaded with trust_remote_code=True it also treats text
that spells a special token ("<|assistant_end|>" typed by a user) as plain text, as ours does; the plain
PreTrainedTokenizerFast (trust_remote_code=False) does too when asked:
apply_chat_template(..., sanitize_control_tokens=True).
"""
import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from picochat import PACKAGE_DIR, __version__
from picochat.common import HelpFormatter, atomic_path, atomic_write_json, print0
from picochat.checkpoint import latest_source, load_model
from picochat.gpt import ROPE_THETA
from picochat.tokenizer import SPLIT_PATTERN

# picochat's chat format as a Jinja chat template, for transformers' apply_chat_template. It must render every
# conversation shape exactly as Tokenizer.render_turns does (tests/test_export.py compares them shape by shape):
# a leading system message is merged into the next user turn with "\n\n", or is the first user turn when no user
# message follows it; user content is a string or text parts; assistant content a string or text / python /
# python_output parts.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'user' -%}"
    "{{- '<|user_start|>' + m['content'] + '<|user_end|>' -}}"
    "{%- else -%}{%- set ns.system = m['content'] + '\n\n' -%}{%- endif -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system -}}{%- set ns.system = '' -%}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for p in m['content'] -%}{{- p['text'] -}}{%- endfor -%}{%- endif -%}"
    "{{- '<|user_end|>' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|assistant_start|>' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'python' -%}{{- '<|python_start|>' + p['text'] + '<|python_end|>' -}}"
    "{%- elif p['type'] == 'python_output' -%}{{- '<|output_start|>' + p['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- p['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters,
    which is how byte-level BPE vocabularies are written in HF tokenizer.json files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_split(ranks: dict, token: bytes, max_rank: int) -> list:
    """Run BPE on `token` using only merges of rank < max_rank; for a trained vocabulary this
    leaves exactly the two parts whose merge created the token."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_i, best_rank = i, r
        if best_i is None:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def hf_tokenizer_json(tokenizer) -> dict:
    """Our tokenizer as an HF `tokenizers` tokenizer.json document (byte-level BPE)."""
    specials = tokenizer.get_special_tokens()
    special_ids = {name: tokenizer.encode_special(name) for name in specials}
    n_ordinary = tokenizer.get_vocab_size() - len(specials)
    ranks = {tokenizer.decode_single_token_bytes(i): i for i in range(n_ordinary)}
    b2u = bytes_to_unicode()
    as_str = lambda b: "".join(b2u[x] for x in b)
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[as_str(token)] = rank
        if len(token) > 1:
            parts = _bpe_split(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {rank} ({token!r}) is not the merge of two earlier tokens; "
                                 "the vocabulary is not a BPE vocabulary and cannot be exported")
            merges.append([as_str(parts[0]), as_str(parts[1])])
    pattern = getattr(tokenizer, "pattern", SPLIT_PATTERN)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in special_ids.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


TOKENIZER_CODE = '''"""picochat's tokenizer for transformers: text that spells a special token is plain text (only the chat
template makes special tokens), exactly as picochat's own tokenizer encodes it."""
from transformers import PreTrainedTokenizerFast


class PicochatTokenizerFast(PreTrainedTokenizerFast):
    # No __init__ of its own, so transformers loads tokenizer.json as it is. Outside a chat template, text that
    # spells a special token is encoded as ordinary text (as picochat does); inside apply_chat_template the
    # template's own special tokens count, and the same text inside a message is sanitized back to plain text.
    _rendering_template = False

    @property
    def split_special_tokens(self):
        return not self._rendering_template

    @split_special_tokens.setter
    def split_special_tokens(self, value):
        pass  # fixed by the class (see above)

    def apply_chat_template(self, conversation, *args, tokenize=True, **kwargs):
        if tokenize:
            kwargs.setdefault("sanitize_control_tokens", True)
        self._rendering_template = True
        try:
            return super().apply_chat_template(conversation, *args, tokenize=tokenize, **kwargs)
        finally:
            self._rendering_template = False
'''


def export_hf(model, tokenizer, out_dir, meta=None):
    """Write `model` + `tokenizer` as a transformers directory. Returns the path. Every file is written to a temp
    name and renamed, with the usual permissions (0644 under the default umask)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    bos = tokenizer.get_bos_token_id()
    eos = tokenizer.encode_special("<|assistant_end|>")
    window_sizes = [int(w) for w in model.window_sizes]
    meta = meta or {}
    source = {"picochat_version": __version__, "picochat_format": "hf-export-1", "source_stage": meta.get("source"),
              "source_model_tag": meta.get("model_tag"), "source_step": meta.get("step")}
    config = {
        "architectures": ["PicochatForCausalLM"], "model_type": "picochat",
        "auto_map": {"AutoConfig": "modeling_picochat.PicochatConfig",
                     "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM"},
        "sequence_len": cfg.sequence_len, "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.n_embd,
        "window_pattern": cfg.window_pattern, "window_sizes": window_sizes,
        # the standard names, for tools that read config.json without our code (vLLM, llama.cpp converters, ...)
        "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "max_position_embeddings": cfg.sequence_len,
        "intermediate_size": 4 * cfg.n_embd, "head_dim": cfg.n_embd // cfg.n_head, "rope_theta": ROPE_THETA,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos, "torch_dtype": "float32",
        "tie_word_embeddings": False, "use_cache": True, "picochat": source,
    }
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos, "use_cache": True})
    with atomic_path(out / "modeling_picochat.py") as tmp:
        shutil.copyfile(PACKAGE_DIR / "hf_modeling.py", tmp)
    with atomic_path(out / "tokenization_picochat.py") as tmp:
        tmp.write_text(TOKENIZER_CODE, encoding="utf-8")
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in source.items()}})
    atomic_write_json(out / "tokenizer.json", hf_tokenizer_json(tokenizer))
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>", "add_bos_token": False, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": [None, "tokenization_picochat.PicochatTokenizerFast"]},
        "model_max_length": cfg.sequence_len, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    })
    atomic_write_json(out / "special_tokens_map.json", {
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>",
        "additional_special_tokens": tokenizer.get_special_tokens()})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="picochat export", description="export a checkpoint to another format", formatter_class=HelpFormatter)
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--format", choices=["hf"], default="hf", help="hf = Hugging Face transformers directory")
    parser.add_argument("-i", "--source", choices=["base", "sft", "rl"], default=None,
                        help="default: latest of rl > sft > base")
    parser.add_argument("-g", "--model-tag", default=None,
                        help='model tag, e.g. d12 (default: the deepest model of that stage)')
    parser.add_argument("-s", "--step", type=int, default=None, help='checkpoint step (default: the last complete one)')
    args = parser.parse_args(argv)
    source = args.source or latest_source(args.model_tag)
    model, tokenizer, meta = load_model(source, torch.device("cpu"), phase="eval", model_tag=args.model_tag, step=args.step)
    out = export_hf(model, tokenizer, args.out_dir, meta)
    print0(f"Exported {source} checkpoint (step {meta.get('step')}) to {out}")
    print0(f"Load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
