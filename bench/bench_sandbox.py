"""
Per-problem cost of running HumanEval programs in picochat's sandbox: each problem's canonical solution plus
its tests (what chat-eval runs for a correct answer), timed in kernel mode and unsafe mode alternately, and
optionally against another checkout's sandbox (e.g. the audit-hook sandbox before kernel isolation):

    python bench/bench_sandbox.py --problems 40
    git worktree add /tmp/old <rev> && python bench/bench_sandbox.py --problems 40 --baseline /tmp/old

The HumanEval file comes from PICOCHAT_MIRROR like every picochat download. Prints seconds per problem
(median over rounds) for each variant and the pass count, which must agree between variants.
"""
import sys
import time
import argparse
import statistics
import importlib.util
from pathlib import Path

from picochat import sandbox
from picochat.tasks import HumanEval


def load_baseline(checkout: str):
    path = Path(checkout) / "picochat" / "sandbox.py"
    spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_sandbox"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=40, help="first N HumanEval problems")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over the problems")
    ap.add_argument("--baseline", default=None, help="a checkout whose picochat/sandbox.py is timed as well")
    args = ap.parse_args(argv)

    task = HumanEval()
    programs = []
    for i in range(min(args.problems, len(task))):
        ex = task.get_example(i)
        programs.append(task.build_program(ex, ex["messages"][1]["content"]))
    variants = {"unsafe": lambda code: sandbox.execute_code(code, mode="unsafe")}
    missing = sandbox.kernel_isolation_missing()
    if missing:
        print(f"kernel mode unavailable here ({missing}); timing the other variants only")
    else:
        variants["kernel"] = lambda code: sandbox.execute_code(code, mode="kernel")
    if args.baseline:
        baseline = load_baseline(args.baseline)
        variants["baseline"] = lambda code: baseline.execute_code(code)
    times = {name: [] for name in variants}
    passed = {name: 0 for name in variants}
    for round_ in range(args.rounds):
        for program in programs:  # variants alternate per problem, so drift hits all of them alike
            for name, run in variants.items():
                t0 = time.perf_counter()
                ok = run(program).success
                times[name].append(time.perf_counter() - t0)
                passed[name] += ok if round_ == 0 else 0
    print(f"{len(programs)} problems x {args.rounds} rounds")
    print(f"{'variant':<10}{'s/problem (median)':>20}{'mean':>10}{'passed':>9}")
    for name in variants:
        print(f"{name:<10}{statistics.median(times[name]):>20.4f}{statistics.fmean(times[name]):>10.4f}"
              f"{passed[name]:>6}/{len(programs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
