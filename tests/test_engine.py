"""Engine: KV-cached generation vs a naive full-recompute loop, sampling controls, tool forcing,
the calculator, the context policy and UTF-8 safe streaming."""
import math
from types import SimpleNamespace

import pytest
import torch

from picochat.engine import (DECODE_COPY_MAX_ROWS, Engine, TextStreamer, use_calculator, sample_next_token,
                             resolve_decode_dtype)
from picochat.gpt import GPTConfig, build_model


def _randomize(model, seed=0):
    """A random model with EVERYTHING active: init_weights zeroes c_proj and smear_lambda, which would make
    blocks identities and smear a no-op; here every tensor gets a random value instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 1.0 if "wte" in name or "value_embeds" in name else 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=g) * std)
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.3)
    return model


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=3, n_head=2,
                    n_kv_head=1, n_embd=64, window_pattern="SSL")
    model = _randomize(build_model(cfg, torch.device("cpu"), torch.float32))
    model.eval()
    return model


def _naive_greedy(model, tokens, n):
    """Textbook generation: recompute the whole sequence every step, take the argmax."""
    ids = list(tokens)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model.forward(torch.tensor([ids]))[0, -1]
            nxt = int(torch.argmax(logits))
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_matches_naive_recompute(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    # windows really slide: the short window is smaller than prompt + 64 generated tokens
    assert min(tiny_model.window_sizes) < 64
    assert tiny_model.smear_lambda.item() != 0
    prompt = tok.encode("The quick brown fox", prepend="<|bos|>")
    naive = _naive_greedy(tiny_model, prompt, 64)
    engine = Engine(tiny_model, tok)
    stops = {engine.assistant_end, engine.bos, engine.python_start}
    assert not stops & set(naive), "random model emitted a stop/tool token; pick another seed for this test"
    columns = [col for col, _ in engine.generate(prompt, num_samples=3, max_tokens=64, temperature=0.0)]
    assert len(columns) == 64
    for row in range(3):  # every cloned row of the decode cache reproduces the naive output
        assert [c[row] for c in columns] == naive


def test_kv_cache_dtype_follows_model(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer)
    kv = engine._kv_cache(2, 10)
    assert kv.k_cache.dtype == tiny_model.compute_dtype
    assert kv.k_cache.shape == (3, 2, 10, 1, 32)


def test_bf16_decode_copy(tiny_model, tiny_tokenizer):
    """decode_dtype=bf16: the prompt is prefilled by the fp32 model, the cache is cast into a bf16 one and a
    bf16-weight copy decodes. The first token comes from the fp32 prefill (identical); later logits follow the
    fp32 model's within bf16 rounding; the fp32 model itself is left untouched."""
    prompt = tiny_tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    engine = Engine(tiny_model, tiny_tokenizer, decode_dtype=torch.bfloat16)
    twin = engine.decode_model
    assert twin is not tiny_model and twin.compute_dtype == torch.bfloat16
    assert {p.dtype for p in twin.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}
    assert engine._kv_cache(1, 8, twin).k_cache.dtype == torch.bfloat16
    columns = [c[0] for c, _ in engine.generate(prompt, max_tokens=12, temperature=0.0)]
    assert len(columns) == 12 and columns[0] == _naive_greedy(tiny_model, prompt, 1)[0]
    ids = torch.tensor([prompt + columns])
    with torch.no_grad():
        ref, got = tiny_model(ids)[0, len(prompt):], twin(ids)[0, len(prompt):].float()
    assert ((ref - got).norm() / ref.norm()).item() < 5e-2
    assert Engine(tiny_model, tiny_tokenizer, decode_dtype=torch.float32).decode_model is tiny_model
    # which weights decode: the copy by default; the fp32 model itself with exact=True, and for a batch beyond
    # DECODE_COPY_MAX_ROWS (emulated bf16 is slower there). Asked of the engine directly: this tiny model's greedy
    # tokens happen to agree in bf16 and fp32, so the tokens alone could not tell.
    used = []
    real = engine._last_logits
    engine._last_logits = lambda ids, kv, model=None: used.append(model) or real(ids, kv, model)
    def decoders(**kw):
        used.clear()
        out = [c for c, _ in engine.generate(prompt, max_tokens=4, temperature=0.0, **kw)]
        return out, {id(m) for m in used[1:]}   # used[0] is the prefill (the master model's)
    _, by_default = decoders()
    exact, by_exact = decoders(exact=True)
    _, by_wide = decoders(num_samples=DECODE_COPY_MAX_ROWS + 1)
    _, by_narrow = decoders(num_samples=DECODE_COPY_MAX_ROWS)
    assert by_default == by_narrow == {id(twin)} and by_exact == by_wide == {id(tiny_model)}
    assert [c[0] for c in exact] == _naive_greedy(tiny_model, prompt, 4)


def test_decode_dtype_choice(tiny_model):
    assert resolve_decode_dtype("auto", tiny_model)[0] == torch.bfloat16   # fp32 weights on CPU: halve the bytes
    assert resolve_decode_dtype("bfloat16", tiny_model)[0] == torch.bfloat16
    dtype, note = resolve_decode_dtype("model", tiny_model)
    assert dtype is None and "own weights" in note
    bf16_compute = SimpleNamespace(compute_dtype=torch.bfloat16, parameters=tiny_model.parameters)
    assert resolve_decode_dtype("auto", bf16_compute)[0] is None   # a bf16-native CPU (or CUDA) computes in bf16
    with pytest.raises(ValueError, match="decode-dtype"):
        resolve_decode_dtype("float8", tiny_model)

def test_first_token_sampled_per_row(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("hello", prepend="<|bos|>")
    first = next(engine.generate(prompt, num_samples=16, max_tokens=1, temperature=1.0))[0]
    assert len(first) == 16
    assert len(set(first)) > 1, "all 16 rows got the same first token: it was broadcast, not sampled per row"


def test_seed_determinism_and_temperature_zero(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("It was the best", prepend="<|bos|>")
    kw = dict(num_samples=4, max_tokens=8, temperature=1.0)
    a, _ = engine.generate_batch(prompt, seed=1, **kw)
    b, _ = engine.generate_batch(prompt, seed=1, **kw)
    c, _ = engine.generate_batch(prompt, seed=2, **kw)
    assert a == b
    assert a != c
    g1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=8, temperature=0.0, seed=1)
    g2, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=8, temperature=0.0, seed=99)
    assert g1 == g2 and g1[0] == g1[1]


def test_max_tokens_and_num_samples(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("abc", prepend="<|bos|>")
    cols = list(engine.generate(prompt, num_samples=5, max_tokens=7, temperature=1.0))
    assert 1 <= len(cols) <= 7 and all(len(c) == 5 and len(m) == 5 for c, m in cols)
    results, masks = engine.generate_batch(prompt, num_samples=5, max_tokens=7, temperature=1.0)
    assert len(results) == 5
    for r, m in zip(results, masks):
        assert r[:len(prompt)] == prompt and len(r) == len(m) and len(r) <= len(prompt) + 7
        assert m[:len(prompt)] == [0] * len(prompt)


def test_top_k_and_top_p(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer.encode("The quick", prepend="<|bos|>")
    greedy, _ = engine.generate_batch(prompt, max_tokens=6, temperature=0.0)
    k1, _ = engine.generate_batch(prompt, max_tokens=6, temperature=1.0, top_k=1, seed=3)
    p0, _ = engine.generate_batch(prompt, max_tokens=6, temperature=1.0, top_p=1e-9, seed=3)
    assert k1 == greedy and p0 == greedy  # keeping one candidate is greedy decoding
    k0, _ = engine.generate_batch(prompt, max_tokens=6, temperature=1.0, top_k=0, seed=3)  # 0 = off, no crash
    kn, _ = engine.generate_batch(prompt, max_tokens=6, temperature=1.0, top_k=None, seed=3)
    assert k0 == kn


def test_sample_next_token_distribution():
    # probs 0.5, 0.3, 0.2: top_p 0.6 keeps {0, 1} (mass 0.8 >= 0.6), renormalized to 5/8, 3/8
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, -1)
    rng = torch.Generator().manual_seed(0)
    s = sample_next_token(logits, rng, temperature=1.0, top_p=0.6)
    counts = torch.bincount(s, minlength=3).tolist()
    assert counts[2] == 0 and abs(counts[0] / 4000 - 5 / 8) < 0.03
    s = sample_next_token(logits, rng, temperature=1.0, top_k=2)
    assert torch.bincount(s, minlength=3)[2] == 0
    s = sample_next_token(logits, rng, temperature=1.0)
    assert abs(torch.bincount(s, minlength=3)[2].item() / 4000 - 0.2) < 0.03
    assert (sample_next_token(logits, rng, temperature=0.0) == 0).all()


# -----------------------------------------------------------------------------
# Tool use with a scripted model

class ScriptedModel(torch.nn.Module):
    """Follows the KVCache/forward contract; forward call j makes script[j] the argmax (then assistant_end)."""
    def __init__(self, script, vocab_size, end_token):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                                      n_embd=4)
        self.compute_dtype = torch.float32
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.end = list(script), end_token
        self.calls = 0

    def get_device(self):
        return self.dummy.device

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        nxt = self.script[self.calls] if self.calls < len(self.script) else self.end
        self.calls += 1
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, nxt] = 10.0
        return logits


def test_tool_forcing_with_scripted_model(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = lambda s: tok.encode_special(s)
    expr = tok.encode("2+3")
    forced = [sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")]
    filler = tok.encode("x")[0]
    head = [sp("<|python_start|>")] + expr + [sp("<|python_end|>")]
    script = head + [filler] * len(forced) + [filler, sp("<|assistant_end|>")]
    model = ScriptedModel(script, tok.get_vocab_size(), sp("<|assistant_end|>"))
    engine = Engine(model, tok)
    prompt = [tok.get_bos_token_id(), sp("<|assistant_start|>")]
    results, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    gen, gmask = results[0][len(prompt):], masks[0][len(prompt):]
    assert gen == head + forced + [filler]
    assert gmask == [1] * len(head) + [0] * len(forced) + [1]


def test_tool_sandbox_fallback(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    head = [sp("<|python_start|>")] + tok.encode("'abc'.upper()") + [sp("<|python_end|>")]
    expected = [sp("<|output_start|>")] + tok.encode("ABC") + [sp("<|output_end|>")]
    script = head + [0] * len(expected) + [sp("<|assistant_end|>")]
    prompt = [tok.get_bos_token_id()]
    off = Engine(ScriptedModel(script, tok.get_vocab_size(), sp("<|assistant_end|>")), tok)
    gen = off.generate_batch(prompt, max_tokens=40, temperature=0.0)[0][0][1:]
    assert sp("<|output_start|>") not in gen  # calculator declines, sandbox off: nothing forced
    on = Engine(ScriptedModel(script, tok.get_vocab_size(), sp("<|assistant_end|>")), tok, sandbox=True)
    gen, m = on.generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert gen[0][1 + len(head):1 + len(head) + len(expected)] == expected
    assert m[0][1 + len(head):1 + len(head) + len(expected)] == [0] * len(expected)


@pytest.mark.parametrize("expr,value", [
    ("2+3", 5), ("1,000 * 3", 3000), ("10/4", 2.5), ("(7 - 2) * 3", 15),
    ("'strawberry'.count('r')", 3), ('"banana".count("a")', 3),
])
def test_calculator_accepts(expr, value):
    assert use_calculator(expr) == value


@pytest.mark.parametrize("expr", [
    "2**100", "9**9**9", "__import__('os').system('id')", "open('x').read()", "'abc'.upper()",
    "[1, 2][0]", "1/0", "exec('x').count('a')", "'a'.count('a') + eval('1')", "getattr(1, 'real')",
    "().__class__.count(1)", "'x'.count('x'); 1", "import os",
])
def test_calculator_rejects(expr):
    assert use_calculator(expr) is None


# -----------------------------------------------------------------------------
# Context policy

@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b "},
     {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}, {"role": "user", "content": "c"}],
])
def test_chat_prompt_is_the_tokenizers_format(tiny_model, tiny_tokenizer, messages):
    # a conversation that fits is rendered exactly as the tokenizer renders it (one chat format), plus the
    # assistant's opening marker
    ids, _ = tiny_tokenizer.render_conversation({"messages": messages})
    assert Engine(tiny_model, tiny_tokenizer).chat_prompt(messages, 8) == ids + [tiny_tokenizer.encode_special(
        "<|assistant_start|>")]

def test_long_conversation_never_crashes(tiny_model, tiny_tokenizer):
    engine = Engine(tiny_model, tiny_tokenizer)
    T = tiny_model.config.sequence_len
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "FIRST question about foxes"}]
    for i in range(40):
        messages.append({"role": "assistant", "content": f"answer number {i} about the lazy dog and wisdom"})
        messages.append({"role": "user", "content": f"follow up {i} on the ships"})
    messages[-1]["content"] = "LATEST question 1842"
    prompt = engine.chat_prompt(messages, max_new_tokens=32)
    full = engine.chat_prompt(messages[:2], max_new_tokens=32)
    assert len(prompt) + 32 <= T
    text = tiny_tokenizer.decode(prompt)
    assert prompt[0] == engine.bos and prompt[-1] == engine.assistant_start
    assert prompt[:len(full) - 1] == full[:-1]  # the (system-merged) first user turn is kept whole
    assert "Be brief.\n\nFIRST question about foxes" in text and text.endswith("LATEST question 1842<|user_end|><|assistant_start|>")
    results, _ = engine.generate_batch(prompt, max_tokens=500, temperature=1.0)
    assert len(results[0]) <= T
    # a raw token prompt far longer than the context: kept BOS + newest tokens, max_tokens capped
    raw = [engine.bos] + tiny_tokenizer.encode("the quick brown fox " * 200)
    cols = list(engine.generate(raw, max_tokens=None, temperature=1.0, seed=0))
    kept, cap = engine.fit_prompt(raw, None)
    assert kept[0] == engine.bos and kept[1:] == raw[-(len(kept) - 1):] and len(kept) + cap == T
    assert 1 <= len(cols) <= cap
    short = raw[:100]  # fits: kept whole when max_tokens is None ("as many as fit")
    assert engine.fit_prompt(short, None) == (short, T - 100)
    assert engine.fit_prompt(short, 10) == (short, 10)
    # a single enormous first message is left-truncated to its newest tokens
    huge = engine.chat_prompt([{"role": "user", "content": "word " * 500 + "THE END"}], max_new_tokens=1000)
    assert len(huge) <= T - T // 2 and tiny_tokenizer.decode(huge).endswith("THE END<|user_end|><|assistant_start|>")


# -----------------------------------------------------------------------------
# Streaming

def test_text_streamer_multibyte(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "a€b𝄞c"  # 3- and 4-byte characters absent from the training corpus: split over byte tokens
    ids = tok.encode(text)
    assert any(len(tok.decode_single_token_bytes(i).decode("utf-8", "ignore")) == 0 for i in ids), \
        "precondition: some token must hold an incomplete UTF-8 fragment"
    s = TextStreamer(tok)
    pieces = [s.add(i) for i in ids] + [s.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum("€" in p for p in pieces) == 1 and sum("𝄞" in p for p in pieces) == 1  # emitted once, whole
    # a stream cut inside a character flushes one replacement character at the end
    s = TextStreamer(tok)
    euro = tok.encode("€")
    out = "".join(s.add(i) for i in euro[:-1])
    assert out == "" and s.finish() == "\ufffd"


# -----------------------------------------------------------------------------
# Benchmark smoke test (numbers are not asserted: the machine is shared)

def test_infer_bench_random_init_json(picochat_home, capsys):
    import json
    from picochat.stages.infer_bench import main
    assert main(["--random-init", "--depth", "1", "--max-seq-len", "64", "--window-pattern", "L", "--vocab-size", "256",
                 "--device-type", "cpu", "--prompt-tokens", "16", "--decode-tokens", "4", "--batch-sizes", "1,2"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["prompt_tokens"] == 16 and [r["batch_size"] for r in doc["sweep"]] == [1, 2]
    assert all(r["decode_steps"] == 4 and r["tpot_sec"] > 0 and r["mbu_percent"] is None for r in doc["sweep"])
    cfg = doc["model_config"]
    D = cfg["n_embd"] // cfg["n_head"]
    # fp32 on CPU: decode (and its cache) runs on a bf16 copy by default (--decode-dtype auto)
    assert doc["compute_dtype"] == "float32" and doc["decode_dtype"] == "bfloat16"
    assert doc["kv_bytes_per_token"] == cfg["n_layer"] * 2 * cfg["n_kv_head"] * D * 2
    assert doc["weight_bytes"] == 2 * sum(n for n in doc["param_dtypes"].values())
    assert doc["peak_flops_per_sec"] > 0 and doc["prefill"]["mfu_percent"] > 0


def test_stops_on_bos_and_assistant_end(tiny_tokenizer):
    tok = tiny_tokenizer
    x = tok.encode("x")[0]
    for stop in (tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")):
        engine = Engine(ScriptedModel([x, x, stop, x, x], tok.get_vocab_size(), x), tok)
        cols = list(engine.generate([tok.get_bos_token_id()], max_tokens=20, temperature=0.0))
        assert [c[0][0] for c in cols] == [x, x, stop]  # the terminal token is yielded, then generation ends
