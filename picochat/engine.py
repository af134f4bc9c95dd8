"""
Inference engine: KV-cached batched sampling with tool use, one code path for the terminal chat,
the server, chat evals and RL.

    from picochat.engine import Engine
    engine = Engine(model, tokenizer)                 # Engine(..., sandbox=True) enables the code tool
    prompt = engine.chat_prompt([{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=256)
    for column, masks in engine.generate(prompt, num_samples=4, max_tokens=256, temperature=0.8, top_k=50):
        ...                                            # column: one token per sample; mask 0 = forced
    results, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=256)


How generation works:
  * the prompt is prefilled ONCE at batch 1 into a KV cache (in the model's compute dtype), which is
    then cloned into a num_samples-row decode cache (KVCache.prefill); the first token is sampled
    independently per row (sampling one token and broadcasting it would make all rows identical);
  * sampling: temperature 0 = argmax; top_k None/0 = off; top_p None/1 = off; a seeded torch.Generator
    on the model's device makes output a pure function of (prompt, settings, seed);
  * a row completes on <|assistant_end|> or <|bos|>; generation ends when every row has completed or
    max_tokens columns were yielded. Completed rows keep being fed (and yielded) until then.
  * tool use: tokens between <|python_start|> and <|python_end|> are decoded and evaluated by
    use_calculator (arithmetic; string .count), or, when the Engine was built with sandbox=True and
    the calculator declines, by sandbox.execute_code (printing the expression's value). A non-None
    result is forced into that row as <|output_start|> result <|output_end|> with mask 0.

Context policy (the engine enforces it, so no caller can crash it with a long conversation):
  * T = model.config.sequence_len. A prompt plus its generation never exceeds T positions.
  * Room reserved for the reply: R = min(max_new_tokens, T // 2). max_new_tokens None means "as many
    as fit": a prompt shorter than T is kept whole, a longer one is cut so that R = T // 4
    (chat_prompt with max_new_tokens None also reserves T // 4).
  * chat_prompt(messages, max_new_tokens): renders [bos] + turns + <|assistant_start|>. If that is longer
    than T - R, it drops the OLDEST turns after the first user turn, two at a time (an assistant reply
    and the next user message, so roles keep alternating), never the latest message. If still too long,
    it left-truncates the first turn's text (keeping its newest tokens), then the latest turn's text.
    So the kept prompt always starts with the first user turn and ends with the latest message.
  * generate(tokens, ...) applies the same budget to raw token prompts: longer than T - R -> keep the
    first token if it is <|bos|> and the LAST T - R (- 1) tokens; then max_tokens is capped at
    T - len(prompt). generate_batch returns the ORIGINAL prompt + the completion, so
    result[len(tokens):] is always the completion.
"""
import ast
import codecs
import threading
from collections import deque

import torch

from picochat.common import logger
from picochat.gpt import KVCache
from picochat.sandbox import execute_code

# -----------------------------------------------------------------------------
# The calculator tool (reference semantics: commas removed; pure arithmetic without **; or a string
# .count() call made of letters/digits/quotes/parens/dots/underscores/spaces with no dangerous names).

_ARITH_CHARS = set("0123456789*+-/.() ")
_COUNT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
              "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")

def eval_with_timeout(expr: str, max_time: float = 3.0):
    """eval() with no builtins, in a daemon thread so it works from any thread (the server runs the
    engine in worker threads, where SIGALRM is unavailable). Any error or a timeout -> None."""
    result = {}
    def run():
        try:
            value = eval(expr, {"__builtins__": {}}, {})
            result["value"] = value
            str(value)  # e.g. ints beyond the str() digit limit fail here, not in the caller
        except BaseException:  # noqa: BLE001 - anything the expression does is its own problem
            result.clear()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(max_time)
    if t.is_alive():
        return None
    return result.get("value")

def use_calculator(expr: str):
    """Evaluate a tool expression safely; None when it is not allowed or fails."""
    expr = expr.replace(",", "")
    if all(c in _ARITH_CHARS for c in expr):
        if "**" in expr:  # 9**9**9 would hang
            return None
        return eval_with_timeout(expr)
    if not all(c in _COUNT_CHARS for c in expr):
        return None
    lowered = expr.lower()
    if any(p in lowered for p in _DANGEROUS):
        return None
    if ".count(" not in expr:
        return None
    return eval_with_timeout(expr)

def _sandbox_program(expr: str) -> str:
    """An expression prints its value; statements run as they are (their stdout is the result)."""
    try:
        ast.parse(expr, mode="eval")
        return f"print(eval({expr!r}))"
    except SyntaxError:
        return expr

# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> (B,) token ids, each row sampled independently with `rng`.
    temperature 0 = argmax; top_k None/0 = off; top_p None or >= 1 = off (the top token is always kept)."""
    assert temperature >= 0.0, "temperature must be non-negative"
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature
    use_top_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)          # sorted, descending
    elif use_top_p:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        vals, idx = logits, None
    probs = torch.softmax(vals, dim=-1)
    if use_top_p:
        # nucleus: keep the smallest prefix whose mass reaches top_p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[..., 0] = False
        probs = probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(probs, num_samples=1, generator=rng)  # multinomial renormalizes
    return (choice if idx is None else idx.gather(-1, choice)).squeeze(-1)

# -----------------------------------------------------------------------------

class _RowState:
    def __init__(self):
        self.forced = deque()     # tokens to force (tool output), each yielded with mask 0
        self.in_python = False
        self.python_tokens = []
        self.completed = False

DECODE_DTYPES = ("auto", "model", "bfloat16")   # the --decode-dtype choices of the interactive stages
# Rows up to which a decode copy is used. It is made for CPUs without native bf16, where a bf16 matmul is emulated:
# d6 decode measured (infer-bench, AVX2 Zen 3) bf16 vs fp32 tok/s 77 vs 49 at 1 row, 150 vs 113 at 4, 181 vs 204
# at 8 and 166 vs 321 at 16 rows: reading the weights dominates only while the batch is small.
DECODE_COPY_MAX_ROWS = 4


def resolve_decode_dtype(choice: str, model):
    """--decode-dtype -> (dtype for Engine(decode_dtype=...) or None, one line saying what and why).
    auto: a bf16-weight copy where the model computes in fp32 on CPU (a CPU without native bf16 matrix
    instructions). Batch-1 decode there is bound by reading every weight once per token (147 MB per token at d6
    with a 32768 vocab), and bf16 weights halve those bytes: measured 1.6x tokens/s at d6 on an AVX2-only CPU
    (dev/BENCH.md), with prefill still done by the fp32 model. On CUDA, MPS and bf16-native CPUs the model
    already computes in bf16 or fp16, so there is nothing to gain. model: decode with the model's own weights
    (bit-identical to the fp32 path; the evaluation stages always do)."""
    compute = getattr(model, "compute_dtype", torch.float32)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if choice == "model" or (choice == "auto" and not (on_cpu and compute == torch.float32)):
        return None, f"decode: the model's own weights ({str(compute).removeprefix('torch.')})"
    if choice not in DECODE_DTYPES:
        raise ValueError(f"--decode-dtype {choice!r} is not one of {', '.join(DECODE_DTYPES)}")
    return torch.bfloat16, ("decode: a bf16-weight copy of the model (batch-1 decode on this CPU is bound by reading "
                            "the weights; bf16 halves them; --decode-dtype model decodes in fp32)")


class Engine:
    def __init__(self, model, tokenizer, sandbox: bool | str = False, sandbox_timeout: float = 5.0, decode_dtype=None):
        """sandbox: False = the python tool only calculates; True = it also runs code in picochat.sandbox's default
        mode; "kernel" or "unsafe" = in that mode.
        decode_dtype: e.g. torch.bfloat16 to decode with a bf16-weight copy of the model (the prompt is still
        prefilled by `model`); faster where decode is bound by reading the weights, and not bit-identical to
        decoding with `model` (generate(exact=True) decodes with `model` anyway). None = decode with `model`.
        resolve_decode_dtype() turns the stages' --decode-dtype into this."""
        self.model = model
        self.decode_model = model
        if decode_dtype is not None and decode_dtype != getattr(model, "compute_dtype", decode_dtype):
            self.decode_model = model.inference_copy(decode_dtype)
        self.tokenizer = tokenizer
        self.sandbox = sandbox
        self.sandbox_timeout = sandbox_timeout
        enc = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.user_start, self.user_end = enc("<|user_start|>"), enc("<|user_end|>")
        self.assistant_start, self.assistant_end = enc("<|assistant_start|>"), enc("<|assistant_end|>")
        self.python_start, self.python_end = enc("<|python_start|>"), enc("<|python_end|>")
        self.output_start, self.output_end = enc("<|output_start|>"), enc("<|output_end|>")

    # --- context policy -------------------------------------------------------------------------------

    @property
    def sequence_len(self) -> int:
        return int(self.model.config.sequence_len)

    def _reserve(self, max_new_tokens) -> int:
        T = self.sequence_len
        return max(1, T // 4) if max_new_tokens is None else max(1, min(int(max_new_tokens), T // 2))

    def prompt_limit(self, max_new_tokens) -> int:
        """The longest prompt (in tokens) that chat_prompt keeps whole when max_new_tokens are asked for."""
        return self.sequence_len - self._reserve(max_new_tokens)

    def fit_prompt(self, tokens, max_tokens):
        """(prompt, max_tokens) that fit the model's context; see the module docstring."""
        T = self.sequence_len
        tokens = list(tokens)
        if max_tokens is None and len(tokens) < T:
            budget = T - 1  # "as many as fit": a prompt that fits is kept whole
        else:
            budget = T - self._reserve(max_tokens)
        if len(tokens) > budget:
            keep_bos = tokens[0] == self.bos
            tail = tokens[len(tokens) - (budget - int(keep_bos)):]
            logger.debug(f"prompt of {len(tokens)} tokens left-truncated to {budget} (sequence_len {T})")
            tokens = ([self.bos] if keep_bos else []) + tail
        room = T - len(tokens)
        max_tokens = room if max_tokens is None else max(0, min(int(max_tokens), room))
        return tokens, max_tokens

    def chat_prompt(self, messages, max_new_tokens=None):
        """[bos] + turns + <|assistant_start|>, kept within the context budget (module docstring). The turns are
        the tokenizer's (Tokenizer.render_turns: the one chat format); the engine only drops or cuts them."""
        turns = [ids for ids, _ in self.tokenizer.render_turns(messages)]
        budget = self.sequence_len - self._reserve(max_new_tokens) - 2  # bos and the trailing assistant_start
        first, middle, last = turns[0], turns[1:-1], (turns[-1:] if len(turns) > 1 else [])
        total = lambda: len(first) + sum(map(len, middle)) + sum(map(len, last))
        while middle and total() > budget:
            del middle[:2]
        if total() > budget:  # left-truncate the first turn's text (keep its markers)
            excess = total() - budget
            text = first[1:-1]
            first = [first[0]] + text[min(excess, len(text)):] + [first[-1]]
        if total() > budget and last:  # then the latest turn's text
            excess = total() - budget
            lt = last[0]
            text = lt[1:-1]
            last = [[lt[0]] + text[min(excess, len(text)):] + [lt[-1]]]
        ids = [self.bos] + first
        for t in middle + last:
            ids += t
        return ids + [self.assistant_start]

    # --- generation -----------------------------------------------------------------------------------

    def _kv_cache(self, batch_size, seq_len, model=None):
        return KVCache.for_model(model or self.model, batch_size, seq_len, device=self._device())

    def _device(self):
        if hasattr(self.model, "get_device"):
            return self.model.get_device()
        return next(self.model.parameters()).device

    def _last_logits(self, ids, kv_cache, model=None):
        """Logits (B, V) of the last position only. A prefill of P tokens would otherwise run the lm_head (the
        largest matrix of a small model) over all P positions and throw P-1 of them away."""
        model = model or self.model
        if hasattr(model, "final_hidden"):
            return model.logits(model.final_hidden(ids, kv_cache=kv_cache)[:, -1, :])
        return model.forward(ids, kv_cache=kv_cache)[:, -1, :]

    def run_tool(self, expr: str):
        """Calculator first; the sandbox (when enabled) for anything else. None = nothing to force."""
        result = use_calculator(expr)
        if result is None and self.sandbox and expr.strip():
            mode = self.sandbox if isinstance(self.sandbox, str) else None
            r = execute_code(_sandbox_program(expr), timeout=self.sandbox_timeout, mode=mode)
            result = r.stdout.rstrip("\n") if r.success else (r.error or "error")
            result = result[:1000]
        return result

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                 exact=False):
        """Yields (token_column, token_masks): one token per sample per step; mask 0 = forced tool output.
        exact: decode with the model's own weights even when the engine has a decode copy (e.g. when the caller
        reports the model's logprobs of the tokens chosen). The copy also sits out batches of more than
        DECODE_COPY_MAX_ROWS samples, where it is slower."""
        try:
            tokens = [int(t) for t in tokens]
        except (TypeError, ValueError):
            raise ValueError("generate expects a list of int token ids") from None
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (at least <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        tokens, max_tokens = self.fit_prompt(tokens, max_tokens)
        if max_tokens <= 0:
            return
        device = self._device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1) prefill once at batch 1
        kv_prefill = self._kv_cache(1, len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self._last_logits(ids, kv_prefill)
        logits = logits.expand(num_samples, -1)  # every row samples its own first token below
        # 2) clone into the decode cache
        decoder = self.model if exact or num_samples > DECODE_COPY_MAX_ROWS else self.decode_model
        kv = self._kv_cache(num_samples, len(tokens) + max_tokens, decoder)
        kv.prefill(kv_prefill)  # (cast to the decode model's dtype when it differs)
        del kv_prefill

        rows = [_RowState() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p).tolist()
            column, masks = [], []
            for i, row in enumerate(rows):
                forced = len(row.forced) > 0
                tok = row.forced.popleft() if forced else sampled[i]
                column.append(tok)
                masks.append(0 if forced else 1)
                if tok == self.assistant_end or tok == self.bos:
                    row.completed = True
                if tok == self.python_start:
                    row.in_python, row.python_tokens = True, []
                elif tok == self.python_end and row.in_python:
                    row.in_python = False
                    result = self.run_tool(self.tokenizer.decode(row.python_tokens))
                    if result is not None:
                        row.forced.append(self.output_start)
                        row.forced.extend(self.tokenizer.encode(str(result)))
                        row.forced.append(self.output_end)
                elif row.in_python:
                    row.python_tokens.append(tok)
            yield column, masks
            if step + 1 == max_tokens or all(r.completed for r in rows):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self._last_logits(ids, kv, decoder)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(results, masks): the ORIGINAL prompt + completion per sample, terminal tokens not appended;
        prompt positions have mask 0."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if tok == self.assistant_end or tok == self.bos:
                    done[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(m)
            if all(done):
                break
        return results, masks

# -----------------------------------------------------------------------------

class TextStreamer:
    """Incremental detokenization that never splits a UTF-8 character: bytes of a character spread
    over several tokens are held back until it is complete and then emitted once, whole."""
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        if hasattr(self.tokenizer, "decode_single_token_bytes"):
            return self.tokenizer.decode_single_token_bytes(token_id)
        return self.tokenizer.decode_bytes([token_id])

    def add(self, token_id: int) -> str:
        return self.decoder.decode(self._bytes(int(token_id)), final=False)

    def finish(self) -> str:
        """Flush: an incomplete trailing character becomes U+FFFD. The streamer can then be reused."""
        out = self.decoder.decode(b"", final=True)
        self.decoder.reset()
        return out

# -----------------------------------------------------------------------------
# Greedy completions of fixed prompts: the quick "does it know anything yet" look of base-train and base-eval

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def sample_prompts(model, tokenizer, max_tokens=16, prompts=SAMPLE_PROMPTS):
    """Greedy completions of the sample prompts (each prompt + its completion, decoded). A completion the token
    budget cut off ends at its last whole word, then "…", so no sample ends mid-word."""
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=bos)
        results, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0)
        text = tokenizer.decode(results[0])
        if len(results[0]) - len(ids) >= max_tokens:  # cut by the budget, not ended by the model
            cut = text.rstrip().rfind(" ")
            text = (text[:cut] if cut > len(prompt) else text.rstrip()) + " \u2026"
        out.append(text)
    return out
