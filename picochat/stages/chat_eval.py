"""
Chat evaluation of an SFT or RL checkpoint: ARC-Easy, ARC-Challenge, MMLU (categorical), GSM8K, HumanEval,
SpellingBee (generative), and ChatCORE = mean over tasks of (acc - baseline) / (1 - baseline)
(baselines: 0.25 for the 4-way multiple choice, 0 for the generative tasks), computed only when every
task ran.

How each kind of task is scored: picochat/task_eval.py.

Writes get_base_dir()/chat_eval/<source>_<tag>_<step>.json and the report section chat-evaluation-<source>.

Examples:
    picochat chat-eval -i sft
    picochat chat-eval -i sft -a "ARC-Easy|GSM8K" -x 100
    picochat chat-eval -i rl -a GSM8K -n 8 -t 1.0
    torchrun --nproc_per_node=8 -m picochat chat-eval -i sft
"""
import argparse

from picochat import checkpoint, report, sandbox
from picochat.common import HelpFormatter, compute_init, fill_sized_defaults, compute_cleanup, print0, get_base_dir, atomic_write_json
from picochat.engine import Engine
from picochat.tasks import EVAL_TASKS, HumanEval
from picochat.task_eval import ALL_TASKS, evaluate_tasks, chatcore

# (CUDA, CPU/MPS) defaults: every problem of every task with 512-token answers takes hours on a CPU, so CPU and
# MPS evaluate a fixed subset (ChatCORE over a subset is reported with its max_problems)
SIZED = dict(max_new_tokens=(512, 256), max_problems=(-1, 100))

def main(argv=None):
    p = argparse.ArgumentParser(prog="picochat chat-eval", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("-i", "--source", type=str, required=True, choices=["sft", "rl", "base"],
                   help="which checkpoint stage to evaluate")
    p.add_argument("-a", "--task-name", type=str, default=None, help=f"tasks separated by '|' (default all: {'|'.join(ALL_TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0,
                   help='sampling temperature of generative tasks (0: greedy)')
    p.add_argument("-m", "--max-new-tokens", type=int, default=None,
                   help=f"tokens per generative answer (default: {SIZED['max_new_tokens'][0]} on CUDA, "
                        f"{SIZED['max_new_tokens'][1]} on CPU/MPS)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help='answers per problem (pass@n)')
    p.add_argument("-k", "--top-k", type=int, default=50, help='top-k for sampling (0: off)')
    p.add_argument("-b", "--batch-size", type=int, default=8, help="categorical batch size")
    p.add_argument("-g", "--model-tag", type=str, default=None,
                   help='model tag, e.g. d12 (default: the deepest model of that stage)')
    p.add_argument("-s", "--step", type=int, default=None, help='checkpoint step (default: the last complete one)')
    p.add_argument("-x", "--max-problems", type=int, default=None,
                   help=f"at most this many problems per task, -1 = all (default: all on CUDA, "
                        f"{SIZED['max_problems'][1]} on CPU/MPS)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    sandbox.add_unsafe_flag(p)
    args = p.parse_args(argv)

    task_names = ALL_TASKS if args.task_name is None else [t.strip() for t in args.task_name.split("|") if t.strip()]
    unknown = [t for t in task_names if t not in EVAL_TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {'|'.join(ALL_TASKS)}")
    sandbox_mode = None
    if "HumanEval" in task_names:  # say (or refuse) how model-written code will run before loading anything
        sandbox_mode = sandbox.mode_for_cli(p, args.unsafe_sandbox, log=print0)

    rt = compute_init(args.device_type)
    for line in fill_sized_defaults(args, rt.device_type, SIZED):
        print0(line)
    if args.max_problems is not None and args.max_problems < 0:
        args.max_problems = None  # -1 = every problem
    model, tokenizer, meta = checkpoint.load_model(args.source, rt.device, phase="eval", model_tag=args.model_tag,
                                                  step=args.step)
    tag, step = meta["model_tag"], meta["step"]
    engine = Engine(model, tokenizer)
    tasks = {"HumanEval": HumanEval(sandbox_mode=sandbox_mode)} if sandbox_mode else {}

    results = evaluate_tasks(model, tokenizer, engine, task_names, args.batch_size, args.num_samples,
                             args.max_new_tokens, args.temperature, args.top_k, args.max_problems, tasks=tasks)
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
        report.log_section(f"chat-evaluation-{args.source}",
                           {"args": vars(args), "model_tag": tag, "step": step, **results, "ChatCORE": core})
    compute_cleanup()
    return 0
