"""lm-evaluation-harness against `picochat serve` (its local-completions model: /v1/completions with echo and
logprobs, tokenized with the HF export's tokenizer), offline, on custom tasks over local jsonl files: a
multiple-choice and a language-modelling task. Item by item, lm-eval's verdicts must equal picochat's own CORE
evaluator's on the same items in the same prompt format."""
import json
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency (pip install -e '.[dev]')")

from picochat import core_eval
from picochat.engine import Engine
from picochat.stages.export import export_hf
from picochat.stages.serve import create_app
from picochat.server_thread import ServerThread
from test_serve import build_tiny_model

WORDS = ("the quick brown fox jumps over a lazy dog it was the best of times and the worst of times ships sailed "
         "many miles and few returned cat sat on mat river runs to sea sun rises in east").split()

MC_TASK = """task: pico_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""
# (a loglikelihood task gets no target_delimiter from lm-eval: the space goes into the target, as lambada's does)
LM_TASK = """task: pico_lm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + continuation}}}}"
metric_list:
  - metric: acc
"""


def make_items(model, tok, rng):
    """Multiple choice: choices of one equal token length (CORE ranks by mean loss over the choice, lm-eval's acc by
    the sum: equal lengths make them the same ranking). Language modelling: half the continuations are the model's
    own greedy text (so 'correct' happens), half are random words."""
    by_len = {}
    for w in set(WORDS):
        by_len.setdefault(len(tok.encode(" " + w)), []).append(w)
    pool = max(by_len.values(), key=len)
    mc = []
    for _ in range(16):
        query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        mc.append({"query": query.capitalize(), "choices": rng.sample(pool, 4), "gold": rng.randrange(4)})
    lm, bos = [], tok.get_bos_token_id()
    while len(lm) < 16:
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        if len(lm) % 2 == 0:  # the model's greedy words, when they read back as the same tokens after " "
            ids = tok.encode(context)
            with torch.no_grad():
                out = list(model.generate([bos] + ids, max_tokens=3, temperature=0.0))
            text = tok.decode(out)
            if not (text.startswith(" ") and text[1:2].strip() and tok.encode(context + text) == ids + out):
                continue
            continuation = text[1:]
        else:
            continuation = " ".join(rng.choice(WORDS) for _ in range(2))
        lm.append({"context": context, "continuation": continuation})
    return mc, lm


def test_lm_eval_matches_core_item_by_item(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    tok = tiny_tokenizer
    model = build_tiny_model(tok)
    mc, lm = make_items(model, tok, random.Random(0))
    for name, items, template in (("mc", mc, MC_TASK), ("lm", lm, LM_TASK)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        (tmp_path / f"{name}.yaml").write_text(template.format(path=tmp_path / f"{name}.jsonl"))
    export_hf(model, tok, tmp_path / "hf")  # lm-eval tokenizes with the exported HF tokenizer

    with ServerThread(create_app([(Engine(model, tok), tok, "cpu")], model_name="picochat")) as srv:
        results = simple_evaluate(
            model="local-completions",
            model_args={"model": "picochat", "base_url": srv.url + "/v1/completions", "tokenizer_backend": "huggingface",
                        "tokenizer": str(tmp_path / "hf"), "tokenized_requests": True, "max_length": 128,
                        "max_retries": 1},
            tasks=["pico_mc", "pico_lm"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
            num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)

    for task, items, task_type in (("pico_mc", mc, "multiple_choice"), ("pico_lm", lm, "language_modeling")):
        theirs = {s["doc_id"]: s["acc"] for s in results["samples"][task]}
        meta = {"task_type": task_type, "num_fewshot": 0, "continuation_delimiter": " "}
        ours = core_eval.evaluate_task(model, tok, items, meta, device="cpu", per_item=True)
        ours = [float(x) for x in ours]
        assert [theirs[i] for i in range(len(items))] == ours, task
        acc = results["results"][task]["acc,none"]
        assert abs(acc - sum(ours) / len(ours)) < 1e-9
    assert 0 < results["results"]["pico_lm"]["acc,none"] < 1  # the greedy half is found, the random half is not
