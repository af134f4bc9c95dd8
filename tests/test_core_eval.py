"""CORE scoring on hand-built examples with a stub model whose preferences are known; bits per byte by hand."""
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import picochat.common as common
from picochat.core_eval import (render_prompts_mc, render_prompts_schema, render_prompts_lm, evaluate_task,
                                evaluate_core, prepare_task_data, fewshot_examples, centered, tokenize_example)
from picochat.loss_eval import evaluate_bpb
from picochat.common import compute_cleanup


class CharTok:
    """Token id = ord(char) (ASCII), BOS = 0."""
    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = [ord(c) for c in text]
        assert all(0 < i < 128 for i in ids)
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])


class Successor(nn.Module):
    """A bigram model that strongly prefers the next ASCII character: after 'b' comes 'c'.
    Every transition costs either L (to the successor) or H (anything else), with L < H."""
    def __init__(self):
        super().__init__()
        w = torch.zeros(128, 128)
        for c in range(1, 127):
            w[c, c + 1] = 5.0
        self.w = nn.Parameter(w)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        return self.w[idx]


def test_prompt_rendering_matches_reference_templates():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}]
    assert render_prompts_mc({"query": "Q", "choices": ["x", "y"]}, "\nAnswer: ", shots) == \
        ["Q1\nAnswer: b\n\nQ\nAnswer: x", "Q1\nAnswer: b\n\nQ\nAnswer: y"]
    shots = [{"context_options": ["A1", "A2"], "continuation": "c1", "gold": 0}]
    assert render_prompts_schema({"context_options": ["o1", "o2"], "continuation": "cc"}, " ", shots) == \
        ["A1 c1\n\no1 cc", "A1 c1\n\no2 cc"]
    shots = [{"context": "  ctx one ", "continuation": "r1"}]
    assert render_prompts_lm({"context": "ctx two  ", "continuation": "r2"}, "\nAnswer: ", shots) == \
        ["ctx one\nAnswer: r1\n\nctx two\nAnswer:", "ctx one\nAnswer: r1\n\nctx two\nAnswer: r2"]


def test_fewshot_sampling_uses_reference_seeds():
    data = prepare_task_data([{"i": i} for i in range(20)], max_per_task=10)
    expect = list(range(20)); random.Random(1337).shuffle(expect)
    assert [d["i"] for d in data] == expect[:10]
    shots = fewshot_examples(data, 3, 4)
    assert data[3] not in shots and len(shots) == 4
    # independent re-derivation: Random(1234 + idx).sample over the other indices
    others = [j for j in range(10) if j != 3]
    assert shots == [data[j] for j in random.Random(1237).sample(others, 4)]


def test_spans():
    tok = CharTok()
    # MC: span starts where the choices first differ
    t, s, e = tokenize_example(tok, ["abx", "abcdy"], "multiple_choice")
    assert (s, e) == ([3, 3], [4, 6])
    # schema: span is the shared suffix
    t, s, e = tokenize_example(tok, ["xbcd", "abcd"], "schema")
    assert (s, e) == ([2, 2], [5, 5])
    # LM: span is the continuation
    t, s, e = tokenize_example(tok, ["ab", "abcd"], "language_modeling")
    assert t == [[0, 97, 98, 99, 100]] and (s, e) == ([3], [5])


MC = [  # delimiter "" so that transitions are easy to count by hand
    {"query": "ab", "choices": ["c", "x"], "gold": 0},          # b->c cheap: picks 0, correct
    {"query": "ab", "choices": ["cx", "dz"], "gold": 1},        # 0 has one cheap transition of 2: picks 0, wrong
    {"query": "ab", "choices": ["x", "cdxyz"], "gold": 1},      # mean: (H+4L)/5 < H picks 1 (a sum would pick 0)
    {"query": "pq", "choices": ["s", "t", "r"], "gold": 2},     # q->r: picks 2, correct
]
SCHEMA = [
    {"context_options": ["ab", "xy"], "continuation": "cd", "gold": 0},  # span "cd": b->c L vs y->c H: 0, correct
    {"context_options": ["xb", "ab"], "continuation": "cd", "gold": 0},  # shared suffix "bcd": a->b wins: 1, wrong
    {"context_options": ["lm", "mn"], "continuation": "o", "gold": 1},   # n->o: 1, correct
]
LM = [
    {"context": "ab", "continuation": "cd"},   # greedy reproduces "cd": correct
    {"context": "ab", "continuation": "cx"},   # 'x' is not the argmax after 'c': wrong
    {"context": " lmn ", "continuation": "op"},  # context is trimmed: correct
    {"context": "uv", "continuation": "wxyz"},  # correct
    {"context": "ab", "continuation": "d"},    # wrong
]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_stub_model_accuracy_by_hand(batch_size):
    tok, model = CharTok(), Successor()
    meta = lambda tt: {"task_type": tt, "num_fewshot": 0, "continuation_delimiter": ""}
    assert evaluate_task(model, tok, MC, meta("multiple_choice"), batch_size=batch_size) == pytest.approx(3 / 4)
    assert evaluate_task(model, tok, SCHEMA, meta("schema"), batch_size=batch_size) == pytest.approx(2 / 3)
    assert evaluate_task(model, tok, LM, meta("language_modeling"), batch_size=batch_size) == pytest.approx(3 / 5)


def test_fewshot_prefix_does_not_change_bigram_answers():
    # with a bigram model the few-shot prefix cannot change the scores: the same hand-computed accuracy
    tok, model = CharTok(), Successor()
    m = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": ""}
    assert evaluate_task(model, tok, LM, m) == pytest.approx(3 / 5)


def test_rank_striding_covers_every_example(monkeypatch):
    tok, model = CharTok(), Successor()
    m = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}
    total = 0.0
    for r in range(2):  # no process group: each "rank" scores only its stride; the sums add up
        monkeypatch.setattr(common, "get_dist_info", lambda r=r: (True, r, r, 2))
        total += evaluate_task(model, tok, MC, m)
    assert total == pytest.approx(3 / 4)


def test_core_metric_is_mean_of_centered():
    tok, model = CharTok(), Successor()
    tasks = [
        {"label": "mc", "task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": "",
         "random_baseline": 25.0, "data": MC},
        {"label": "schema", "task_type": "schema", "num_fewshot": 0, "continuation_delimiter": "",
         "random_baseline": 50.0, "data": SCHEMA},
        {"label": "lm", "task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": "",
         "random_baseline": 0.0, "data": LM},
    ]
    out = evaluate_core(model, tok, tasks, log=None)
    c_mc = (0.75 - 0.25) / 0.75
    c_schema = (2 / 3 - 0.5) / 0.5
    c_lm = 0.6
    assert out["centered_results"] == pytest.approx({"mc": c_mc, "schema": c_schema, "lm": c_lm})
    assert out["core_metric"] == pytest.approx((c_mc + c_schema + c_lm) / 3)
    assert centered(0.5, 50) == 0.0


class Uniform(nn.Module):
    def __init__(self, V):
        super().__init__()
        self.V = V
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*y.shape, self.V)
        return F.cross_entropy(logits.view(-1, self.V), y.view(-1), ignore_index=-1, reduction=loss_reduction)


def test_bpb_by_hand():
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 1, 4], dtype=torch.int32)  # token 0 is a special
    y = torch.tensor([[1, 2, 0, -1], [3, 3, 7, 1]])
    batches = [(torch.zeros_like(y), y)] * 2
    bpb = evaluate_bpb(Uniform(8), batches, 2, token_bytes)
    # counted targets: 1,2,3,3,7,1 -> 6 tokens of ln 8 nats each, 1+2+3+3+4+1 = 14 bytes; twice
    assert bpb == pytest.approx((2 * 6 * math.log(8)) / (math.log(2) * 2 * 14))
    assert evaluate_bpb(Uniform(8), [(y, torch.full_like(y, -1))], 1, token_bytes) == float("inf")


def _dist_worker(rank, world, init_file, out_dir):
    import os
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok, model = CharTok(), Successor()
        m = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ""}
        acc = evaluate_task(model, tok, MC, m)
        token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 1, 4], dtype=torch.int32)
        # rank 0 sees the first row of the hand example, rank 1 the second
        y = torch.tensor([[1, 2, 0, -1], [3, 3, 7, 1]])[rank:rank + 1]
        bpb = evaluate_bpb(Uniform(8), [(y, y)], 1, token_bytes)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{acc!r} {bpb!r}")
    finally:
        compute_cleanup()  # barrier, then teardown


def test_two_ranks_all_reduce(tmp_path):
    """Examples strided over 2 gloo ranks and bpb sums all-reduced: every rank gets the full-data answer."""
    import torch.multiprocessing as mp
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        acc, bpb = map(float, (tmp_path / f"rank{r}.txt").read_text().split())
        assert acc == pytest.approx(3 / 4)
        assert bpb == pytest.approx(6 * math.log(8) / (math.log(2) * 14))

# -----------------------------------------------------------------------------
# The fast evaluator (shared prefix through a KV cache, logits at scored positions only) against the plain one

@pytest.mark.parametrize("window_pattern,share_min", [("L", None), ("SL", None), ("L", 1), ("SL", 10 ** 9)])
def test_fast_evaluator_same_items_as_plain_on_real_core_tasks(shared_data, tiny_tokenizer, window_pattern, share_min,
                                                               monkeypatch):
    """A few dozen items of every task type of the real CORE bundle, a tiny random GPT whose outputs vary:
    the fast evaluator gets every item right or wrong exactly as the plain one does, whether an example's
    opening is shared through the KV cache (share_min 1: every multi-row example) or its rows are packed
    with other examples' (10**9: none shared)."""
    from picochat import attention, core_eval
    if share_min is not None:
        monkeypatch.setattr(core_eval, "SHARE_MIN_TOKENS", share_min)
    from picochat.core_eval import load_core_tasks
    from picochat.core_eval import evaluate_task, evaluate_task_fast
    from picochat.gpt import GPTConfig, build_model
    attention.OVERRIDE = "sdpa"
    try:
        labels = ["hellaswag_zeroshot", "winograd", "lambada_openai", "copa", "bigbench_qa_wikidata"]
        tasks, missing, _ = load_core_tasks(shared_data / "core", labels)
        types = {t["task_type"] for t in tasks}
        assert types == {"multiple_choice", "schema", "language_modeling"}, (types, missing)
        torch.manual_seed(0)
        model = build_model(GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2,
                                      n_head=2, n_kv_head=1, n_embd=64, window_pattern=window_pattern), "cpu",
                            torch.float32)
        with torch.no_grad():  # make every path carry signal, so the answers depend on the whole prompt
            for block in model.transformer.h:
                block.attn.c_proj.weight.normal_(0, 0.2)
                block.mlp.c_proj.weight.normal_(0, 0.2)
            model.smear_lambda.fill_(0.5)
            model.lm_head.weight.normal_(0, 0.5)
        model.eval()
        checked = 0
        for t in tasks:
            data = prepare_task_data(t["data"], 24)
            plain = evaluate_task(model, tiny_tokenizer, data, t, batch_size=8, max_len=1024, per_item=True)
            fast = evaluate_task_fast(model, tiny_tokenizer, data, t, batch_size=8, max_len=1024, per_item=True)
            assert fast == plain, f"{t['label']}: items differ at {[i for i, (a, b) in enumerate(zip(fast, plain)) if a != b]}"
            checked += len(data)
        assert checked >= 100
    finally:
        attention.OVERRIDE = None
