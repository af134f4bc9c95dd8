"""
Chat benchmarks on a model: categorical (multiple choice by the allowed letters' logits) and generative
(sampled answers checked by the task), and ChatCORE over all of them. Used by chat-eval, and by chat-sft and
chat-rl for their periodic evaluations.

* categorical: one forward over a right-padded batch of prompts; the prediction is the argmax over the
  allowed letters' logits at each prompt's last position;
* generative: `num_samples` completions per problem with the Engine (calculator tool active); a problem
  passes if any sample passes (pass@n). HumanEval programs run in picochat.sandbox.
* ChatCORE = mean over tasks of (acc - baseline) / (1 - baseline) (baselines: 0.25 for the 4-way multiple
  choice, 0 for the generative tasks), computed only when every task ran.
Problems are strided across ranks and the counts all-reduced.
"""
import time

import torch

from picochat.common import all_reduce, print0, rank_world
from picochat.tasks import BASELINES, EVAL_TASKS

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


def _all_reduce_counts(*values, device):
    return all_reduce(torch.tensor(values, dtype=torch.long, device=device)).tolist()


@torch.no_grad()
def run_categorical(model, tokenizer, task, batch_size=8, max_problems=None):
    """-> (num_correct, num_total), all-reduced. Prompts longer than the context keep BOS + their tail."""
    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    rank, world = rank_world()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    bos = tokenizer.get_bos_token_id()
    T = model.config.sequence_len
    letter_cache = {}
    def letter_ids(letters):
        key = tuple(letters)
        if key not in letter_cache:
            ids = []
            for letter in letters:
                enc = tokenizer.encode(letter)
                if len(enc) != 1:
                    raise ValueError(f"answer letter {letter!r} encodes to {len(enc)} tokens; categorical "
                                     "evaluation needs single-token letters (retrain the tokenizer)")
                ids.append(enc[0])
            letter_cache[key] = ids
        return letter_cache[key]
    correct, total = 0, 0
    mine = list(range(rank, n, world))
    for b in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[b:b + batch_size]]
        prompts = []
        for conv in convs:
            p = tokenizer.render_for_completion(conv)
            if len(p) > T:
                p = [bos] + p[len(p) - (T - 1):]
            prompts.append(p)
        L = max(map(len, prompts))
        ids = torch.full((len(prompts), L), bos, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        logits = model(ids)
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            scores = logits[r, len(p) - 1, letter_ids(letters)]
            pred = letters[int(scores.argmax())]
            correct += int(bool(task.evaluate(conv, pred)))
            total += 1
    return tuple(_all_reduce_counts(correct, total, device=device))


@torch.no_grad()
def run_generative(engine, tokenizer, task, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                   max_problems=None, log_every=0):
    """-> (num_passed, num_total), all-reduced; pass@num_samples."""
    device = engine._device()
    rank, world = rank_world()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    passed, total = 0, 0
    for i in range(rank, n, world):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=i)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        ok = any(bool(task.evaluate(conv, c)) for c in completions)
        passed += int(ok)
        total += 1
        if log_every and total % log_every == 0:
            print0(f"  rank {rank}: {passed}/{total} ({100 * passed / total:.1f}%)")
    return tuple(_all_reduce_counts(passed, total, device=device))


def chatcore(results: dict):
    """Mean centered accuracy over ALL tasks, or None if any task is missing."""
    if any(name not in results for name in ALL_TASKS):
        return None
    return sum((results[t] - BASELINES[t]) / (1.0 - BASELINES[t]) for t in ALL_TASKS) / len(ALL_TASKS)


def evaluate_tasks(model, tokenizer, engine, task_names, batch_size=8, num_samples=1, max_new_tokens=512,
                   temperature=0.0, top_k=50, max_problems=None, max_cat=None, max_gen=None, tasks=None):
    """{task: accuracy}. max_cat / max_gen override max_problems for the two kinds (ChatCORE during SFT)."""
    tasks = {} if tasks is None else tasks   # a caller's dict doubles as a cache across calls
    results = {}
    for name in task_names:
        if name not in EVAL_TASKS:
            raise ValueError(f"unknown chat-eval task {name!r}; choose from {'|'.join(ALL_TASKS)}")
        if name not in tasks:
            tasks[name] = EVAL_TASKS[name]()
        task = tasks[name]
        t0 = time.time()
        if task.eval_type == "categorical":
            limit = max_cat if max_cat is not None else max_problems
            good, total = run_categorical(model, tokenizer, task, batch_size, limit)
        else:
            limit = max_gen if max_gen is not None else max_problems
            good, total = run_generative(engine, tokenizer, task, num_samples, max_new_tokens, temperature,
                                         top_k, limit)
        results[name] = good / max(total, 1)
        print0(f"{name}: {good}/{total} = {100 * results[name]:.2f}% ({time.time() - t0:.1f}s)")
    return results
