"""
Chat evaluation of an SFT or RL checkpoint: ARC-Easy, ARC-Challenge, MMLU (categorical), GSM8K, HumanEval,
SpellingBee (generative), and ChatCORE = mean over tasks of (acc - baseline) / (1 - baseline)
(baselines: 0.25 for the 4-way multiple choice, 0 for the generative tasks), computed only when every
task ran.

* categorical: one forward over a right-padded batch of prompts; the prediction is the argmax over the
  allowed letters' logits at each prompt's last position;
* generative: `num_samples` completions per problem with the Engine (calculator tool active); a problem
  passes if any sample passes (pass@n). HumanEval programs run in picochat.sandbox.
Problems are strided across ranks and the counts all-reduced.

Writes get_base_dir()/chat_eval/<source>_<tag>_<step>.json and the report section chat-evaluation-<source>.

Examples:
    picochat chat-eval -i sft
    picochat chat-eval -i sft -a "ARC-Easy|GSM8K" -x 100
    picochat chat-eval -i rl -a GSM8K -n 8 -t 1.0
    torchrun --nproc_per_node=8 -m picochat chat-eval -i sft
"""
import time
import argparse

import torch
import torch.distributed as dist

from picochat.common import compute_init, fill_sized_defaults, compute_cleanup, print0, get_base_dir, atomic_write_json

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


def _all_reduce_counts(*values, device):
    t = torch.tensor(values, dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def run_categorical(model, tokenizer, task, batch_size=8, max_problems=None):
    """-> (num_correct, num_total), all-reduced. Prompts longer than the context keep BOS + their tail."""
    device = model.get_device() if hasattr(model, "get_device") else next(model.parameters()).device
    rank, world = _rank_world()
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
    rank, world = _rank_world()
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
    from picochat.tasks import BASELINES
    if any(name not in results for name in ALL_TASKS):
        return None
    return sum((results[t] - BASELINES[t]) / (1.0 - BASELINES[t]) for t in ALL_TASKS) / len(ALL_TASKS)


def evaluate_tasks(model, tokenizer, engine, task_names, batch_size=8, num_samples=1, max_new_tokens=512,
                   temperature=0.0, top_k=50, max_problems=None, max_cat=None, max_gen=None, tasks=None):
    """{task: accuracy}. max_cat / max_gen override max_problems for the two kinds (ChatCORE during SFT)."""
    from picochat.tasks import EVAL_TASKS
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


def find_tag(source: str, model_tag=None) -> str:
    """The model tag to load from checkpoints/<source> (default: the largest), with an error naming the stage
    that makes them."""
    from picochat import checkpoint
    stage_dir = get_base_dir() / "checkpoints" / source
    if model_tag and not (stage_dir / model_tag).is_dir():
        raise FileNotFoundError(f"no {source} checkpoints for tag {model_tag!r} in {stage_dir}; "
                                f"run `{checkpoint.PRODUCER[source]}` first or pick another --model-tag")
    return model_tag or checkpoint.find_largest_model(stage_dir)


# (CUDA, CPU/MPS) defaults: every problem of every task with 512-token answers takes hours on a CPU, so CPU and
# MPS evaluate a fixed subset (ChatCORE over a subset is reported with its max_problems)
SIZED = dict(max_new_tokens=(512, 256), max_problems=(-1, 100))

def main(argv=None):
    p = argparse.ArgumentParser(prog="picochat chat-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", type=str, required=True, choices=["sft", "rl", "base"],
                   help="which checkpoint stage to evaluate")
    p.add_argument("-a", "--task-name", type=str, default=None, help=f"tasks separated by '|' (default all: {'|'.join(ALL_TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-m", "--max-new-tokens", type=int, default=None,
                   help=f"tokens per generative answer (default: {SIZED['max_new_tokens'][0]} on CUDA, "
                        f"{SIZED['max_new_tokens'][1]} on CPU/MPS)")
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical batch size")
    p.add_argument("-g", "--model-tag", type=str, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-x", "--max-problems", type=int, default=None,
                   help=f"at most this many problems per task, -1 = all (default: all on CUDA, "
                        f"{SIZED['max_problems'][1]} on CPU/MPS)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    args = p.parse_args(argv)

    task_names = ALL_TASKS if args.task_name is None else [t.strip() for t in args.task_name.split("|") if t.strip()]
    from picochat.tasks import EVAL_TASKS
    unknown = [t for t in task_names if t not in EVAL_TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {'|'.join(ALL_TASKS)}")

    from picochat import checkpoint
    from picochat.engine import Engine
    rt = compute_init(args.device_type)
    for line in fill_sized_defaults(args, rt.device_type, SIZED):
        print0(line)
    if args.max_problems is not None and args.max_problems < 0:
        args.max_problems = None  # -1 = every problem
    tag = find_tag(args.source, args.model_tag)
    model, tokenizer, meta = checkpoint.load_model(args.source, rt.device, phase="eval", model_tag=tag, step=args.step)
    step = meta.get("step", args.step)
    engine = Engine(model, tokenizer)

    results = evaluate_tasks(model, tokenizer, engine, task_names, args.batch_size, args.num_samples,
                             args.max_new_tokens, args.temperature, args.top_k, args.max_problems)
    core = chatcore(results)

    print0(f"\n{'task':<16}{'accuracy':>10}")
    for name, acc in results.items():
        print0(f"{name:<16}{100 * acc:>9.2f}%")
    print0(f"{'ChatCORE':<16}{('%9.4f' % core) if core is not None else '       n/a'}"
           + ("" if core is not None else "  (only when all tasks run)"))

    if rt.master:
        out = {"source": args.source, "model_tag": tag, "step": step, "results": results, "chatcore": core,
               "args": vars(args), "max_problems": args.max_problems}
        path = get_base_dir() / "chat_eval" / f"{args.source}_{tag}_{step}.json"
        atomic_write_json(path, out)
        print0(f"wrote {path}")
        from picochat import report
        report.log_section(f"chat-evaluation-{args.source}",
                           {"args": vars(args), "model_tag": tag, "step": step, **results, "ChatCORE": core})
    compute_cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
