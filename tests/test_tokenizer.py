"""Tokenizer: training, encoding round trips, specials, save/load, token_bytes, chat rendering, tok-train."""
import json
from collections import Counter

import pytest
import regex
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from picochat.tokenizer import (Tokenizer, TokenizerFileError, SPECIAL_TOKENS, SPLIT_PATTERN,
                                get_tokenizer, get_token_bytes)

SAMPLES = ["", "hello world", "  leading and trailing  ", "line1\nline2\r\n\ttab", "12345678 3.14159",
           "Héllo wörld! 你好，世界 안녕하세요 🙂👍🏽", "def f(x):\n    return x ** 2\n", "<|bos|><|user_start|>",
           "don't I'll we've they're", "\x00\x01 control \u200b zero-width"]
HYP = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)  # surrogates are not UTF-8


def naive_encode(tok: Tokenizer, text: str) -> list:
    """Textbook BPE encode, independent of tiktoken: split with the pattern, then within each chunk
    repeatedly merge the adjacent pair whose concatenation has the lowest rank."""
    rank = {b: i for i, b in enumerate(tok.ranks)}
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get(parts[i] + parts[i + 1], float("inf")))
            if parts[best] + parts[best + 1] not in rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        out += [rank[p] for p in parts]
    return out

# -----------------------------------------------------------------------------
# training

def test_tiny_vocab_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    n = len(tok.ranks)
    assert 256 < n <= 512 - len(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == n + len(SPECIAL_TOKENS)
    assert tok.ranks[:256] == [bytes([i]) for i in range(256)]
    # specials at the END, in reference order, distinct
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(n, n + len(SPECIAL_TOKENS)))
    assert tok.get_bos_token_id() == n
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    # every merged token is the concatenation of two earlier tokens (a valid BPE merge list)
    earlier = set(tok.ranks[:256])
    for b in tok.ranks[256:]:
        assert any(b[:k] in earlier and b[k:] in earlier for k in range(1, len(b))), b
        earlier.add(b)


def test_first_merge_is_most_frequent_pair():
    corpus = ["abab abab cdcd", "ababab xyz", "hello hello"] * 3
    tok = Tokenizer.train_from_iterator(iter(corpus), vocab_size=256 + 9 + 3)
    counts = Counter()
    for text in corpus:
        for chunk in regex.findall(SPLIT_PATTERN, text):
            b = chunk.encode()
            counts.update(b[i:i + 2] for i in range(len(b) - 1))
    assert counts[tok.ranks[256]] == max(counts.values())


def test_small_corpus_stops_early_and_reports_actual_vocab():
    tok = Tokenizer.train_from_iterator(iter(["ab ab ab"]), vocab_size=1000)
    assert tok.get_vocab_size() < 1000
    assert tok.get_vocab_size() == len(tok.ranks) + 9
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="at least|>= 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), vocab_size=100)

# -----------------------------------------------------------------------------
# encoding

@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_matches_textbook_bpe(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert ids == naive_encode(tiny_tokenizer, text)


@HYP
@given(text=TEXT)
def test_property_unicode_round_trip(tiny_tokenizer, text):
    tok = tiny_tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(i < len(tok.ranks) for i in ids)       # ordinary text never yields specials
    # byte level: the token byte strings concatenate to the UTF-8 bytes, wherever we cut the id list
    # (tokens may end mid-character; only the whole concatenation has to be valid UTF-8)
    assert b"".join(tok.decode_single_token_bytes(i) for i in ids) == text.encode("utf-8")
    k = len(ids) // 2
    assert tok.decode_bytes(ids[:k]) + tok.decode_bytes(ids[k:]) == text.encode("utf-8")


@HYP
@given(data=st.binary(max_size=200))
def test_property_arbitrary_bytes(tiny_tokenizer, data):
    """encode() takes text, so 'bytes round-trip' means: (1) every byte string is representable
    (ids 0..255 are the raw bytes) and decode_bytes returns it exactly, decode() replacing invalid
    UTF-8 like Python does; (2) bytes carried as latin-1 text survive encode -> decode_bytes."""
    tok = tiny_tokenizer
    assert tok.decode_bytes(list(data)) == data
    assert tok.decode(list(data)) == data.decode("utf-8", errors="replace")
    ids = tok.encode(data.decode("latin-1"))
    assert tok.decode_bytes(ids).decode("utf-8").encode("latin-1") == data


def test_special_literals_are_not_collapsed(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "".join(SPECIAL_TOKENS) + " <|bos|> <|endoftext|>"
    ids = tok.encode(text)
    specials = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert len(ids) > len(SPECIAL_TOKENS)
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|nope|>")


def test_prepend_append(tiny_tokenizer):
    tok = tiny_tokenizer
    base = tok.encode("hi there")
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode("hi there", prepend="<|bos|>", append="<|assistant_end|>") == [bos] + base + [end]
    assert tok.encode("hi there", prepend=bos, append=end) == [bos] + base + [end]
    rows = tok.encode(["a", "b c"], prepend="<|bos|>")
    assert rows == [[bos] + tok.encode("a"), [bos] + tok.encode("b c")]
    with pytest.raises(ValueError):
        tok.encode("x", prepend="<|bogus|>")
    with pytest.raises(ValueError):
        tok.encode("x", append=10 ** 9)


def test_batch_equals_single(tiny_tokenizer):
    texts = SAMPLES * 5
    assert tiny_tokenizer.encode(texts, num_threads=2) == [tiny_tokenizer.encode(t) for t in texts]
    with pytest.raises(TypeError):
        tiny_tokenizer.encode(b"bytes")

# -----------------------------------------------------------------------------
# save / load / token_bytes

def test_save_load_round_trip_no_pickle(tiny_tokenizer, tmp_path):
    d = tmp_path / "tok"
    tiny_tokenizer.save(d)
    assert sorted(p.name for p in d.iterdir()) == ["token_bytes.safetensors", "tokenizer.json"]
    for p in d.iterdir():
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{p} looks like a pickle"
    meta = json.loads((d / "tokenizer.json").read_text())
    assert meta["pattern"] == SPLIT_PATTERN and meta["version"] == 1
    assert meta["special_tokens"]["<|bos|>"] == tiny_tokenizer.get_bos_token_id()
    loaded = Tokenizer.from_directory(d)
    assert loaded.ranks == tiny_tokenizer.ranks
    assert loaded.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert loaded.encode(SAMPLES) == tiny_tokenizer.encode(SAMPLES)
    from safetensors.torch import load_file
    tb = load_file(str(d / "token_bytes.safetensors"))["token_bytes"]
    assert torch.equal(tb, tiny_tokenizer.token_bytes())


def test_load_errors_are_clear(tiny_tokenizer, tmp_path, picochat_home):
    with pytest.raises(FileNotFoundError, match="picochat tok-train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="picochat tok-train"):
        get_token_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="not valid JSON"):
        Tokenizer.from_directory(d)
    good = tiny_tokenizer.to_dict()
    for mutate, msg in [(lambda x: x.update(version=99), "unsupported version"),
                        (lambda x: x.update(format="other"), "not a picochat tokenizer"),
                        (lambda x: x["special_tokens"].update({"<|bos|>": 0}), "special_tokens"),
                        (lambda x: x["mergeable_ranks"].__setitem__(300, "!!!"), "base64"),
                        (lambda x: x["mergeable_ranks"].__setitem__(5, x["mergeable_ranks"][6]), "single bytes"),
                        (lambda x: x.update(vocab_size=7), "vocab_size")]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        (d / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(TokenizerFileError, match=msg):
            Tokenizer.from_directory(d)


def test_token_bytes_are_raw_lengths_incl_partial_utf8():
    # 3-byte CJK characters: early merges are pairs of bytes inside a character, i.e. partial UTF-8
    tok = Tokenizer.train_from_iterator(iter(["你好世界 你好 世界"] * 20), vocab_size=256 + 9 + 12)
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tok.get_vocab_size(),)
    assert tb[-len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)
    partial = []
    for i in range(len(tok.ranks)):
        raw = tok.decode_single_token_bytes(i)
        assert tb[i] == len(raw) and len(raw) >= 1
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            if len(raw) >= 2:
                partial.append(i)
    assert partial, "expected a multi-byte token that is a partial UTF-8 sequence"
    i = partial[0]
    # a str round trip would count U+FFFD replacements, not the raw bytes
    assert len(tok.id_to_token(i).encode("utf-8")) != tb[i]


def test_get_tokenizer_from_home(tiny_tokenizer, picochat_home):
    tiny_tokenizer.save(picochat_home / "tokenizer")
    assert get_tokenizer().ranks == tiny_tokenizer.ranks
    assert torch.equal(get_token_bytes(), tiny_tokenizer.token_bytes())

# -----------------------------------------------------------------------------
# chat rendering (expected layouts built by hand from encode() pieces)

def S(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_render_conversation_golden(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "user", "content": "What is 6*7?"},
                         {"role": "assistant", "content": "It is 42."},
                         {"role": "user", "content": "Thanks"},
                         {"role": "assistant", "content": "You're welcome"}]}
    ids, mask = tok.render_conversation(conv)
    exp_ids, exp_mask = [], []
    for piece, m in [([S(tok, "bos")], 0),
                     ([S(tok, "user_start")] + tok.encode("What is 6*7?") + [S(tok, "user_end")], 0),
                     ([S(tok, "assistant_start")], 0), (tok.encode("It is 42."), 1), ([S(tok, "assistant_end")], 1),
                     ([S(tok, "user_start")] + tok.encode("Thanks") + [S(tok, "user_end")], 0),
                     ([S(tok, "assistant_start")], 0), (tok.encode("You're welcome"), 1),
                     ([S(tok, "assistant_end")], 1)]:
        exp_ids += piece
        exp_mask += [m] * len(piece)
    assert ids == exp_ids and mask == exp_mask
    assert tok.decode(ids).startswith("<|bos|><|user_start|>What is 6*7?<|user_end|><|assistant_start|>")


def test_render_system_merge(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    original = json.loads(json.dumps(conv))
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]}
    assert tok.render_conversation(conv) == tok.render_conversation(merged)
    assert conv == original  # rendering works on a deep copy
    # no user message after the system one: the system text is the first user turn
    lone = tok.render_conversation({"messages": [{"role": "system", "content": "x"}]})
    assert lone == tok.render_conversation({"messages": [{"role": "user", "content": "x"}]})
    sys_asst = {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert tok.render_conversation(sys_asst) == tok.render_conversation(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    # user content as text parts is the joined text
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert tok.render_conversation(parts) == tok.render_conversation({"messages": [{"role": "user", "content": "ab"}]})


def test_render_tool_parts_masks(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                           {"type": "python", "text": "2+2"},
                                                           {"type": "python_output", "text": "4"},
                                                           {"type": "text", "text": "It is 4."}]}]}
    ids, mask = tok.render_conversation(conv)
    prefix = [S(tok, "bos"), S(tok, "user_start")] + tok.encode("2+2?") + [S(tok, "user_end"), S(tok, "assistant_start")]
    pieces = [(tok.encode("Let me compute. "), 1),
              ([S(tok, "python_start")] + tok.encode("2+2") + [S(tok, "python_end")], 1),
              ([S(tok, "output_start")] + tok.encode("4") + [S(tok, "output_end")], 0),
              (tok.encode("It is 4."), 1), ([S(tok, "assistant_end")], 1)]
    assert ids == prefix + [i for p, _ in pieces for i in p]
    assert mask == [0] * len(prefix) + [m for p, m in pieces for _ in p]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "assistant", "content": "x"}], "role 'assistant' but 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}], "alternate"),
    ([{"role": "user", "content": ["not", "a", "string"]}], "user content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "system message may only come first"),
    ([{"role": "tool", "content": "x"}], "role 'tool' but 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "unknown part type"),
    ([], "no messages"),
])
def test_render_errors(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.render_conversation({"messages": messages})


def test_render_truncation(tiny_tokenizer):
    conv = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok " * 50}]}
    ids, mask = tiny_tokenizer.render_conversation(conv)
    ids7, mask7 = tiny_tokenizer.render_conversation(conv, max_tokens=7)
    assert len(ids) > 7 and ids7 == ids[:7] and mask7 == mask[:7]


def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}]}
    ids = tok.render_for_completion(conv)
    expected = ([S(tok, "bos"), S(tok, "user_start")] + tok.encode("S\n\nQ") +
                [S(tok, "user_end"), S(tok, "assistant_start")])
    assert ids == expected
    assert len(conv["messages"]) == 3
    with pytest.raises(ValueError, match="last message"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "Q"}]})

# -----------------------------------------------------------------------------
# tok-train end to end on tiny parquet shards

def _write_shards(d, shards):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(shards):
        pq.write_table(pa.table({"text": docs}), d / f"shard_{i:05d}.parquet", row_group_size=3)


def test_text_iterator_cap_and_stop():
    from picochat.stages.tok_train import text_iterator
    stats = {}
    out = list(text_iterator(iter([["aaaaa", "bbbbbbbbbb"], ["cc", "dd"]]), max_chars=7, doc_cap=8, stats=stats))
    assert out == ["aaaaa", "bbbbbbbb"]           # capped to 8; the doc crossing 7 chars is included, then stop
    assert stats == {"chars": 13, "docs": 2}


def test_prefetch_order_errors_and_early_stop():
    import threading
    from picochat.stages.tok_train import prefetch
    assert list(prefetch(iter(range(50)))) == list(range(50))
    def bad():
        yield 1
        raise FileNotFoundError("gone")
    with pytest.raises(FileNotFoundError, match="gone"):
        list(prefetch(bad()))
    before = threading.active_count()
    gen = prefetch(iter(range(10 ** 6)))
    assert next(gen) == 0
    gen.close()  # consumer stops early (max_chars reached): the reader thread must exit
    for _ in range(100):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() <= before


def test_tok_train_end_to_end(picochat_home, tmp_path):
    from picochat.stages import tok_train
    data = tmp_path / "shards"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda"]
    train = [[" ".join(words[(i + j) % 8] for j in range(40)) + f" {i}" for i in range(k * 7, k * 7 + 7)] for k in range(2)]
    val = [["VALONLY " * 50] * 20]   # frequent enough that training on it would merge it (checked)
    _write_shards(data, train + val)
    rc = tok_train.main(["--data-dir", str(data), "--vocab-size", "300", "--max-chars", "1e6", "--doc-cap", "200"])
    assert rc == 0
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 300
    assert torch.equal(get_token_bytes(), tok.token_bytes())
    section = json.loads((picochat_home / "report" / "tokenizer-training.json").read_text())["data"]
    total = sum(min(len(t), 200) for shard in train for t in shard)
    assert section["chars"] == total and section["docs"] == 14     # train split only, capped docs
    assert section["vocab_size"] == 300 and section["token_bytes_min"] >= 1
    # the val shard (last file) is never read for training: its unique word was not merged
    assert not [b for b in tok.ranks[256:] if b"VAL" in b or b"ONLY" in b]
    assert tok.decode(tok.encode("alpha beta 12")) == "alpha beta 12"


def test_tok_train_without_data_is_a_clear_error(picochat_home, tmp_path, capsys):
    from picochat.stages import tok_train
    assert tok_train.main(["--data-dir", str(tmp_path / "nope"), "--vocab-size", "300"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (picochat_home / "tokenizer").exists()


def test_tok_eval_runs_offline(picochat_home, tiny_tokenizer, tmp_path, capsys):
    from picochat.stages import tok_eval
    tiny_tokenizer.save(picochat_home / "tokenizer")
    data = tmp_path / "shards"
    _write_shards(data, [["some train text here"] * 4, ["some val text"] * 2])
    assert tok_eval.main(["--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "korean" in out and "shard-val" in out
    section = json.loads((picochat_home / "report" / "tokenizer-evaluation.json").read_text())["data"]
    rows = {r["text"]: r for r in section["ours"]}
    assert rows["shard-train"]["bytes"] == len("\n".join(["some train text here"] * 3).encode())
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["bytes"] / max(1, r["tokens"]), abs=1e-3)


def test_tok_eval_comparison_math_and_offline_baselines(tiny_tokenizer, tmp_path, monkeypatch):
    from picochat.stages import tok_eval
    bytes_only = Tokenizer([bytes([i]) for i in range(256)])    # a stand-in baseline: 1 token per byte
    texts = {"a": "hello hello hello", "b": "The quick brown fox."}
    rows = tok_eval.evaluate({"ours": tiny_tokenizer, "gpt2": bytes_only}, texts)
    table = {r["text"]: r for r in tok_eval.comparison_table(rows, "gpt2")}
    for name, text in texts.items():
        n_ours, n_base = len(tiny_tokenizer.encode(text)), len(text.encode())
        assert table[name]["gpt2_tokens"] == n_base and table[name]["ours_tokens"] == n_ours
        assert table[name]["rel_diff_pct"] == pytest.approx(100 * (n_base - n_ours) / n_base, abs=0.01)
        assert table[name]["rel_diff_pct"] > 0
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    enc, why = tok_eval.load_baseline("cl100k_base")
    assert enc is None and "not cached" in why
