"""
Byte-level BPE tokenizer in the GPT-4 style: trained with `rustbpe` (compiled, parallel),
encoded at run time with `tiktoken` (compiled, multithreaded batch encoder).

Layout of the vocabulary (vocab 32768):
    ids 0..255       the 256 raw bytes
    ids 256..32758   merges in training order
    ids 32759..32767 the 9 special tokens, in SPECIAL_TOKENS order

On disk (no pickles): tokenizer/tokenizer.json (pattern, base64 token bytes in rank order,
special tokens with their ids, format version) and tokenizer/token_bytes.safetensors
(int32 raw byte length of every token, 0 for specials; used for bits-per-byte).

    python -c "from picochat.tokenizer import get_tokenizer; t = get_tokenizer(); print(t.encode('hello world'))"
"""
import json
import base64
import hashlib
from pathlib import Path

import torch
import tiktoken
from safetensors.torch import load_file, save_file

from picochat.common import get_base_dir, atomic_path, atomic_write_text, logger

SPECIAL_TOKENS = [
    "<|bos|>",              # document delimiter, prepended to every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",   # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",   # the tool's output, supplied at inference time
]

# GPT-4 pattern, but numbers split into groups of 1-2 digits (not 1-3): better bpb at small vocab.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

FORMAT_NAME = "picochat-bpe"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.safetensors"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class TokenizerFileError(ValueError):
    """A tokenizer directory is missing, corrupt, or of an unknown format."""


def _build_encoding(pattern: str, ranks: list, name: str = "picochat"):
    mergeable = {b: i for i, b in enumerate(ranks)}
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable, special_tokens=specials)


class Tokenizer:
    """Wraps a tiktoken Encoding; `ranks[i]` is the byte string of ordinary token i."""

    def __init__(self, ranks: list, pattern: str = SPLIT_PATTERN):
        self.ranks = list(ranks)
        self.pattern = pattern
        self.enc = _build_encoding(pattern, self.ranks)
        self.special_ids = {s: len(self.ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.bos_token_id = self.special_ids["<|bos|>"]

    # -------------------------------------------------------------------------
    # training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, buffer_size: int = 1024) -> "Tokenizer":
        """Train on an iterator of strings. vocab_size counts the 9 specials, so rustbpe is asked
        for vocab_size - 9 ordinary tokens. When the corpus has fewer distinct pairs than that,
        rustbpe stops early: we warn and the tokenizer's vocab is the smaller, actual size."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size!r} is too small: it must be an int >= {MIN_VOCAB} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        requested = vocab_size - len(SPECIAL_TOKENS)
        import rustbpe  # heavy, compiled, and needed only to train: a GPU box that loads a tokenizer may lack it
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(texts, requested, buffer_size=buffer_size, pattern=SPLIT_PATTERN)
        pairs = sorted(trainer.get_mergeable_ranks(), key=lambda p: p[1])
        ranks = [bytes(b) for b, _ in pairs]
        if [r for _, r in pairs] != list(range(len(pairs))) or ranks[:256] != [bytes([i]) for i in range(256)]:
            raise RuntimeError("rustbpe returned non-contiguous ranks or a vocab that does not start "
                               "with the 256 single bytes; this rustbpe version is not supported")
        if len(ranks) < requested:
            logger.warning(f"the training text allowed only {len(ranks) - 256} merges (asked for "
                           f"{requested - 256}): the vocab is {len(ranks) + len(SPECIAL_TOKENS)}, "
                           f"not {vocab_size}. Train on more text for the full vocab.")
        return cls(ranks, SPLIT_PATTERN)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "vocab_size": self.get_vocab_size(),
            "mergeable_ranks": [base64.b64encode(b).decode("ascii") for b in self.ranks],
            "special_tokens": dict(self.special_ids),
        }

    def save(self, path):
        """Write tokenizer.json and token_bytes.safetensors into directory `path`, each atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / TOKENIZER_FILE, json.dumps(self.to_dict(), ensure_ascii=True) + "\n")
        with atomic_path(path / TOKEN_BYTES_FILE) as tmp:
            save_file({"token_bytes": self.token_bytes()}, str(tmp),
                      metadata={"format": FORMAT_NAME, "sha256": self.fingerprint()})

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Tokenizer":
        def bad(msg):
            return TokenizerFileError(f"{source}: {msg}. Re-create it with `picochat tok-train`.")
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise bad(f"not a picochat tokenizer file (format={d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("version") != FORMAT_VERSION:
            raise bad(f"unsupported version {d.get('version')!r} (this picochat reads version {FORMAT_VERSION})")
        pattern, enc_ranks, specials = d.get("pattern"), d.get("mergeable_ranks"), d.get("special_tokens")
        if not isinstance(pattern, str) or not pattern:
            raise bad("missing split 'pattern'")
        if not isinstance(enc_ranks, list) or len(enc_ranks) < 256:
            raise bad("'mergeable_ranks' must be a list of at least 256 base64 strings")
        try:
            ranks = [base64.b64decode(s, validate=True) for s in enc_ranks]
        except Exception as e:
            raise bad(f"'mergeable_ranks' holds invalid base64 ({e})") from None
        if ranks[:256] != [bytes([i]) for i in range(256)]:
            raise bad("the first 256 ranks must be the single bytes 0..255 (byte-level BPE)")
        if len(set(ranks)) != len(ranks) or any(len(b) == 0 for b in ranks):
            raise bad("'mergeable_ranks' holds duplicate or empty tokens")
        expected = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        if specials != expected:
            raise bad(f"'special_tokens' must be {expected}, got {specials}")
        if d.get("vocab_size") != len(ranks) + len(SPECIAL_TOKENS):
            raise bad(f"'vocab_size' {d.get('vocab_size')} != {len(ranks)} ranks + {len(SPECIAL_TOKENS)} specials")
        try:
            return cls(ranks, pattern)
        except Exception as e:  # tiktoken rejects e.g. a bad regex or a merge it cannot build
            raise bad(f"tiktoken could not build an encoding from it ({e})") from None

    @classmethod
    def from_directory(cls, path) -> "Tokenizer":
        file = Path(path) / TOKENIZER_FILE
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer at {file}: run `picochat tok-train` first "
                                    f"(or set PICOCHAT_HOME to the run that has one)")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerFileError(f"{file}: not valid JSON ({e}). Re-create it with `picochat tok-train`.") from None
        return cls.from_dict(d, source=str(file))

    def fingerprint(self) -> str:
        """sha256 over pattern + ranks: identifies the vocabulary (saved next to token_bytes)."""
        h = hashlib.sha256(self.pattern.encode("utf-8"))
        for b in self.ranks:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        return h.hexdigest()

    # -------------------------------------------------------------------------
    # basic API

    def get_vocab_size(self) -> int:
        return len(self.ranks) + len(SPECIAL_TOKENS)

    def get_special_tokens(self) -> list:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, text: str) -> int:
        try:
            return self.special_ids[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token; they are {SPECIAL_TOKENS}") from None

    def _special_or_id(self, tok) -> int:
        if isinstance(tok, str):
            return self.encode_special(tok)
        if isinstance(tok, int) and 0 <= tok < self.get_vocab_size():
            return tok
        raise ValueError(f"prepend/append must be a special-token string or a token id, got {tok!r}")

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]] (tiktoken's multithreaded batch encoder).
        Ordinary text never yields special tokens: "<|bos|>" in the text is encoded as plain bytes."""
        pre = None if prepend is None else self._special_or_id(prepend)
        post = None if append is None else self._special_or_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if isinstance(text, (list, tuple)):
            rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            for row in rows:
                if pre is not None:
                    row.insert(0, pre)
                if post is not None:
                    row.append(post)
            return rows
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        """Invalid UTF-8 (e.g. a token cut mid-character) decodes to U+FFFD."""
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab,): RAW byte length of each token, 0 for specials. Not len(decode(...).encode()):
        tokens that are partial UTF-8 sequences would be counted as 3-byte U+FFFD."""
        lengths = [len(b) for b in self.ranks] + [0] * len(SPECIAL_TOKENS)
        return torch.tensor(lengths, dtype=torch.int32)

    # -------------------------------------------------------------------------
    # chat rendering

    # --- the chat format: the one place conversations become tokens (SFT, RL, evals, the engine; the HF export's
    # chat template is tested against it on every shape) ----------------------------------------------------

    def render_turns(self, messages) -> list:
        """Messages -> one (ids, mask) per turn, no <|bos|>; mask 1 where the model is trained (assistant output).
        user:      <|user_start|> text <|user_end|>                      all 0
        assistant: <|assistant_start|> (0) content (1) <|assistant_end|> (1); content is a string or a list of
                   parts: text (1), python = a tool call <|python_start|> code <|python_end|> (1, the model
                   must learn to emit it), python_output <|output_start|> result <|output_end|> (0, supplied by
                   the interpreter at inference time).
        Shapes: see chat_turns (system merging, alternation). A conversation may end on either role."""
        sp = self.special_ids
        turns = []
        for role, content in chat_turns(messages):
            if role == "user":
                ids = [sp["<|user_start|>"]] + self.encode(content) + [sp["<|user_end|>"]]
                turns.append((ids, [0] * len(ids)))
                continue
            ids, mask = [sp["<|assistant_start|>"]], [0]
            for kind, text in content:
                if kind == "text":
                    piece, m = self.encode(text), 1
                elif kind == "python":
                    piece, m = [sp["<|python_start|>"]] + self.encode(text) + [sp["<|python_end|>"]], 1
                else:
                    piece, m = [sp["<|output_start|>"]] + self.encode(text) + [sp["<|output_end|>"]], 0
                ids += piece
                mask += [m] * len(piece)
            turns.append((ids + [sp["<|assistant_end|>"]], mask + [1]))
        return turns

    def render_conversation(self, conversation: dict, max_tokens: int = 2048):
        """Conversation -> (ids, mask): <|bos|> then every turn (render_turns), cut at max_tokens."""
        ids, mask = [self.bos_token_id], [0]
        for turn_ids, turn_mask in self.render_turns(_conversation_messages(conversation)):
            ids += turn_ids
            mask += turn_mask
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list:
        """Prompt for the assistant's reply (RL, eval): drop the final assistant message, render the rest
        (untruncated: the caller owns the context budget) and append <|assistant_start|>."""
        messages = _conversation_messages(conversation)
        if messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is the assistant's")
        if len(messages) == 1:
            raise ValueError("render_for_completion: nothing is left after removing the assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=1 << 62)
        return ids + [self.special_ids["<|assistant_start|>"]]


def chat_turns(messages) -> list:
    """Validate and normalise messages into alternating turns [(role, content)]: user content a string, assistant
    content a list of (kind, text) parts with kind text | python | python_output.
    * a system message may come first only. Its text goes into the first user turn ("system\n\nuser"); when no
      user message follows it (a lone system message, or system then assistant), it IS the first user turn;
    * then roles alternate user, assistant, user, ... starting with the user; the last may be either;
    * user content: a string or a list of {"type": "text", "text": str} parts (joined);
    * assistant content: a string or a list of {"type": "text" | "python" | "python_output", "text": str} parts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("the conversation has no messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be a dict with 'role' and 'content'")
    turns, system = [], None
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            if not isinstance(content, str):
                raise ValueError("message 0: system content must be a string")
            system = content
            if len(messages) == 1 or messages[1].get("role") != "user":
                turns.append(("user", system))  # nothing to merge into: the system text is the first user turn
                system = None
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r} but {expected!r} was expected: after an optional "
                             f"system message, roles must alternate user, assistant, user, ...")
        if role == "user":
            text = _user_text(content, i)
            if system is not None:
                text, system = system + "\n\n" + text, None
            turns.append(("user", text))
        else:
            turns.append(("assistant", _assistant_parts(content, i)))
    return turns


def _user_text(content, i) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"message {i}: user content must be a string or a list of {{'type': 'text', 'text': str}} parts")


def _assistant_parts(content, i) -> list:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind, text = (part.get("type"), part.get("text")) if isinstance(part, dict) else (None, None)
        if not isinstance(text, str):
            raise ValueError(f"message {i} part {j}: expected {{'type': ..., 'text': str}}, got {part!r}")
        if kind not in ("text", "python", "python_output"):
            raise ValueError(f"message {i} part {j}: unknown part type {kind!r} (expected text, python or "
                             "python_output)")
        parts.append((kind, text))
    return parts


def _conversation_messages(conversation) -> list:
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("a conversation must be a dict {'messages': [{'role': ..., 'content': ...}, ...]}")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("the conversation has no messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("every message must be a dict with 'role' and 'content'")
    return messages


# -----------------------------------------------------------------------------
# the run's tokenizer under get_base_dir()/tokenizer

def tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"

def get_tokenizer() -> Tokenizer:
    return Tokenizer.from_directory(tokenizer_dir())

def get_token_bytes(device="cpu") -> torch.Tensor:
    """int32 (vocab,) raw byte length per token (0 for specials), for bits-per-byte."""
    file = tokenizer_dir() / TOKEN_BYTES_FILE
    if not file.exists():
        raise FileNotFoundError(f"no {TOKEN_BYTES_FILE} at {file}: run `picochat tok-train` first")
    try:
        t = load_file(str(file))["token_bytes"]
    except Exception as e:
        raise TokenizerFileError(f"{file}: unreadable ({e}). Re-create it with `picochat tok-train`.") from None
    if t.dtype != torch.int32 or t.ndim != 1:
        raise TokenizerFileError(f"{file}: expected a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    json_file = tokenizer_dir() / TOKENIZER_FILE
    if json_file.exists():
        # cheap consistency check: the vocab size must match tokenizer.json (catches a stale file)
        vocab = json.loads(json_file.read_text(encoding="utf-8")).get("vocab_size")
        if vocab is not None and vocab != t.numel():
            raise TokenizerFileError(f"{file} has {t.numel()} entries but tokenizer.json has vocab {vocab}: "
                                     f"the files are from different runs; re-run `picochat tok-train`")
    return t.to(device)
