"""
`picochat serve`'s /v1/completions, measured two ways on a random picochat model of --depth (tokenizer trained
in-process, nothing downloaded unless --lm-eval asks for CORE data):

1. throughput: --requests sequential requests of each kind a client sends: scoring (echo + logprobs,
   max_tokens 1, what lm-eval's loglikelihood does) and generation (--gen-tokens greedy tokens);
2. with --lm-eval: lm-evaluation-harness (local-completions) against picochat's CORE evaluator on the same
   items of real CORE tasks (copa: multiple choice, lambada_openai: language modelling; the first --items of
   each, zero-shot, from PICOCHAT_MIRROR's core/ bundle), item by item. lm-eval ranks choices by summed
   log-likelihood, CORE by mean loss per token: they agree exactly when an item's choices have one token length.

    python bench/bench_completions.py --depth 4 --requests 50
    PICOCHAT_MIRROR=../shared/data python bench/bench_completions.py --depth 4 --lm-eval --items 40
"""
import os
import json
import time
import argparse
import tempfile
import statistics
from pathlib import Path

import httpx
import torch

from picochat import core_eval
from picochat.engine import Engine
from picochat.gpt import build_model, config_from_depth
from picochat.tokenizer import Tokenizer
from picochat.stages.export import export_hf
from picochat.stages.serve import create_app
from picochat.server_thread import ServerThread

TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times. "
        "Ships sailed many miles and few returned; the river runs to the sea and the sun rises in the east. ") * 60

MC_TASK = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
           "output_type: multiple_choice\ndoc_to_text: \"{{{{query}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
           "doc_to_target: \"{{{{gold}}}}\"\ntarget_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
LM_TASK = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
           "output_type: loglikelihood\ndoc_to_text: \"{{{{context.strip()}}}}\"\n"
           "doc_to_target: \"{{{{' ' + continuation}}}}\"\nmetric_list:\n  - metric: acc\n")


def throughput(url, tok, n, gen_tokens):
    prompt = tok.encode("It was the best of times, it was the worst of times, the ships sailed")
    rows = []
    with httpx.Client(timeout=120) as c:
        for kind, body in (("score (echo+logprobs)", {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                      "temperature": 0}),
                           (f"generate {gen_tokens}", {"prompt": prompt, "max_tokens": gen_tokens, "temperature": 0,
                                                       "min_tokens": None})):
            body = {k: v for k, v in body.items() if v is not None}
            c.post(url, json=body).raise_for_status()  # warm-up
            times, tokens = [], 0
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.post(url, json=body).json()
                times.append(time.perf_counter() - t0)
                tokens += r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
            rows.append((kind, n / sum(times), tokens / sum(times), statistics.median(times) * 1000))
    print(f"{'request':<24}{'req/s':>8}{'tokens/s':>10}{'median ms':>11}")
    for kind, rps, tps, ms in rows:
        print(f"{kind:<24}{rps:>8.1f}{tps:>10.0f}{ms:>11.1f}")


def lm_eval_vs_core(url, model, tok, items, workdir: Path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = {t["label"]: t for t in core_eval.load_core_tasks(labels=["copa", "lambada_openai"])[0]}
    export_hf(model, tok, workdir / "hf")
    names = {}
    for label, task in tasks.items():
        data = core_eval.prepare_task_data(task["data"], items)
        name = "pico_" + label
        names[name] = (label, data, {"task_type": task["task_type"], "num_fewshot": 0,
                                     "continuation_delimiter": task["continuation_delimiter"]})
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
        template = MC_TASK if task["task_type"] == "multiple_choice" else LM_TASK
        (workdir / f"{name}.yaml").write_text(template.format(name=name, path=workdir / f"{name}.jsonl"))
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": "picochat", "base_url": url, "tokenizer_backend": "huggingface",
                    "tokenizer": str(workdir / "hf"), "tokenized_requests": True,
                    "max_length": model.config.sequence_len},
        tasks=list(names), task_manager=TaskManager(include_path=str(workdir)), log_samples=True, num_fewshot=0)
    print(f"\n{'task':<16}{'items':>6}{'lm-eval acc':>13}{'CORE acc':>10}{'same verdict':>14}")
    for name, (label, data, meta) in names.items():
        theirs = {s["doc_id"]: s["acc"] for s in results["samples"][name]}
        ours = [float(x) for x in core_eval.evaluate_task(model, tok, data, meta, device="cpu", per_item=True)]
        same = sum(theirs[i] == ours[i] for i in range(len(data)))
        print(f"{label:<16}{len(data):>6}{results['results'][name]['acc,none']:>13.3f}{sum(ours) / len(ours):>10.3f}"
              f"{same:>8}/{len(data)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--lm-eval", action="store_true", help="also compare lm-eval with CORE on copa and lambada")
    ap.add_argument("--items", type=int, default=40)
    args = ap.parse_args(argv)
    tok = Tokenizer.train_from_iterator(iter([TEXT]), vocab_size=400)
    torch.manual_seed(0)
    model = build_model(config_from_depth(args.depth, tok.get_vocab_size(), max_seq_len=512), "cpu").eval()
    print(f"depth {args.depth} (width {model.config.n_embd}), vocab {tok.get_vocab_size()}, "
          f"torch threads {torch.get_num_threads()}")
    with ServerThread(create_app([(Engine(model, tok), tok, "cpu")], model_name="picochat")) as srv:
        url = srv.url + "/v1/completions"
        throughput(url, tok, args.requests, args.gen_tokens)
        if args.lm_eval:
            with tempfile.TemporaryDirectory() as d:
                lm_eval_vs_core(url, model, tok, args.items, Path(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
