"""
Evaluate a base checkpoint: CORE (DCLM, 22 tasks), bits per byte on train/val, and samples.

Examples:
    picochat base-eval                                  # core,bpb,sample on the largest base model, last step
    picochat base-eval --eval core --max-per-task 100   # quick partial CORE (not comparable with full CORE)
    PICOCHAT_MIRROR=/work/shared/data picochat base-eval --eval core   # CORE bundle from a mirror's core/
    picochat base-eval --eval core --bundle-dir ~/eval_bundle            # a local bundle directory
    torchrun --standalone --nproc_per_node=8 -m picochat base-eval --model-tag d24

CORE bundle source, first match wins: --bundle-dir; PICOCHAT_MIRROR (files core/core.yaml,
core/eval_meta_data.csv and core/eval_data/<uri> for each task in core.yaml, fetched into
$PICOCHAT_HOME/eval_bundle); an existing $PICOCHAT_HOME/eval_bundle; the reference's public eval_bundle.zip.
Tasks whose data file is missing are reported ("CORE over 21/22 tasks, missing: coqa"), never dropped silently.
Results: $PICOCHAT_HOME/base_eval/<model-tag>_<step>.csv (Task, Accuracy, Centered; last row CORE).
"""
import argparse
from pathlib import Path

from picochat import checkpoint as ckpt, fetch, report
from picochat.common import HelpFormatter, get_base_dir, compute_init, fill_sized_defaults, compute_cleanup, print0, atomic_path
from picochat.core_eval import evaluate_core, load_core_tasks
from picochat.dataloader import pretrain_batches
from picochat.dataset import data_fingerprint, list_parquet_files
from picochat.engine import Engine, sample_prompts
from picochat.loss_eval import evaluate_bpb

# -----------------------------------------------------------------------------

# (CUDA, CPU/MPS) defaults: full CORE and 40 x 524,288 tokens per bpb split take hours on a CPU, so CPU and
# MPS score a fixed subset (partial CORE says so wherever it is reported)
SIZED = dict(max_per_task=(-1, 50), split_tokens=(40 * 524288, 131072))

def build_parser():
    p = argparse.ArgumentParser(prog="picochat base-eval", description="Evaluate a base model checkpoint.", formatter_class=HelpFormatter)
    p.add_argument("--eval", default="core,bpb,sample", help="comma list of core, bpb, sample")
    p.add_argument("--model-tag", default=None, help='model tag, e.g. d12 (default: the deepest model of that stage)')
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: last complete)")
    p.add_argument("--max-per-task", type=int, default=None,
                   help=f"CORE items per task, -1 = all (default: all on CUDA, {SIZED['max_per_task'][1]} on CPU/MPS)")
    p.add_argument("--tasks", default=None, help="comma list of CORE task labels (default: all in core.yaml)")
    p.add_argument("--device-batch-size", type=int, default=32, help='rows per forward pass')
    p.add_argument("--split-tokens", type=int, default=None,
                   help=f"tokens per split for bpb (default: {SIZED['split_tokens'][0]:,} on CUDA, "
                        f"{SIZED['split_tokens'][1]:,} on CPU/MPS)")
    p.add_argument("--split-docs", action="store_true",
                   help="bpb over whole documents: cut long ones into row-sized pieces instead of cropping them "
                        "(the reference crops, so its bpb only sees each document's opening; reported as "
                        "train_bpb_split_docs / val_bpb_split_docs)")
    p.add_argument("--device-type", default="", help='cuda|cpu|mps (default: autodetect)')
    p.add_argument("--bundle-dir", default=None,
                   help="local CORE bundle directory (core.yaml, ...; default: the mirror, else the public bundle)")
    p.add_argument("--data-dir", default=None, help="parquet shards for bpb (default $PICOCHAT_HOME/data/climbmix)")
    p.add_argument("--mirror", default=None,
                   help="PICOCHAT_MIRROR for this run (URL or directory; default: the environment's)")
    return p


def write_csv(path: Path, results: dict, centered: dict, core: float):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
            for label in results:
                f.write(f"{label:<35}, {results[label]:<10.6f}, {centered[label]:<10.6f}\n")
            f.write(f"{'CORE':<35}, {'':<10}, {core:<10.6f}\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.mirror:
        fetch.set_mirror(args.mirror)
    evals = {e.strip() for e in args.eval.split(",") if e.strip()}
    if evals - {"core", "bpb", "sample"}:
        raise ValueError(f"--eval accepts core, bpb, sample; got {sorted(evals - {'core', 'bpb', 'sample'})}")
    rt = compute_init(args.device_type)
    for line in fill_sized_defaults(args, rt.device_type, SIZED):
        print0(line)
    model, tokenizer, meta = ckpt.load_model("base", rt.device, phase="eval", model_tag=args.model_tag,
                                             step=args.step)
    step, model_tag = meta["step"], meta["model_tag"]
    T = model.config.sequence_len
    print0(f"base-eval: {model_tag} step {step} on {rt.device_type}")
    section = {"model_tag": model_tag, "step": step}

    if "sample" in evals and rt.master:
        print0("conditioned samples (greedy, 16 tokens):")
        samples = sample_prompts(model, tokenizer)
        for s in samples:
            print0(f"  {s!r}")
        bos = tokenizer.get_bos_token_id()
        results, _ = Engine(model, tokenizer).generate_batch([bos], num_samples=8, max_tokens=128, temperature=1.0)
        print0("unconditioned samples (temperature 1.0, 128 tokens):")
        for r in results:
            print0(f"  {tokenizer.decode(r)!r}")
        section["samples"] = samples

    if "bpb" in evals:
        token_bytes = tokenizer.token_bytes().to(rt.device)  # the checkpoint's own tokenizer
        tokens_per_step = args.device_batch_size * T * rt.world_size
        steps = max(1, args.split_tokens // tokens_per_step)
        suffix = "_split_docs" if args.split_docs else ""  # a different measurement gets a different name
        # another data directory than the one the checkpoint trained on is another measurement: its own key, with
        # its path and content hash; it never stands in for the checkpoint's val_bpb (a single file is evaluated
        # whole, as split "all")
        trained_on = ((meta.get("run") or {}).get("user_config") or {}).get("data_dir")
        resolve = lambda d: str(Path(d).expanduser().resolve())
        other = args.data_dir is not None and (trained_on is None or resolve(trained_on) != resolve(args.data_dir))
        files = list_parquet_files(args.data_dir) if other else None
        splits = ("all",) if files is not None and len(files) == 1 else ("train", "val")
        target = section
        if files is not None:
            where = str(Path(args.data_dir).expanduser().resolve())
            target = {"path": where, "files": len(files), "sha256": data_fingerprint(files)}
            section["bpb_on_other_data"] = {**section.get("bpb_on_other_data", {}), where: target}
        for split in splits:
            loader = pretrain_batches(tokenizer, args.device_batch_size, T, split, rt.device, data_dir=args.data_dir,
                                      split_docs=args.split_docs)
            bpb = evaluate_bpb(model, loader, steps, token_bytes)
            del loader
            print0(f"{split} bpb{' (whole documents)' if args.split_docs else ''}"
                   f"{' on ' + args.data_dir if files is not None else ''}: {bpb:.6f}")
            target[f"{split}_bpb{suffix}"] = bpb

    if "core" in evals:
        labels = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
        tasks, missing, total = load_core_tasks(args.bundle_dir, labels)
        out = evaluate_core(model, tokenizer, tasks, max_per_task=args.max_per_task, device=rt.device,
                            batch_size=args.device_batch_size, max_len=getattr(model, "rotary_len", None),
                            log=print0)
        coverage = f"CORE over {len(tasks)}/{total} tasks" + (f" (missing: {', '.join(missing)})" if missing else "")
        print0(f"CORE metric: {out['core_metric']:.4f}  [{coverage}]")
        if args.max_per_task > 0:
            print0(f"(partial CORE: at most {args.max_per_task} items per task; not comparable with full CORE)")
        if rt.master:
            path = get_base_dir() / "base_eval" / f"{model_tag}_{step:06d}.csv"
            write_csv(path, out["results"], out["centered_results"], out["core_metric"])
            print0(f"wrote {path}")
        section.update({"core_metric": out["core_metric"], "coverage": coverage, "missing_tasks": missing,
                        "tasks_used": len(tasks), "tasks_total": total, "max_per_task": args.max_per_task,
                        "results": out["results"], "centered_results": out["centered_results"]})

    if rt.master:
        # a partial re-run (say --eval bpb --split-docs) of the same checkpoint adds to its section, not replaces it
        prev = report.load_sections().get("base-evaluation", {}).get("data", {})
        if (prev.get("model_tag"), prev.get("step")) == (model_tag, step):
            other = {**prev.get("bpb_on_other_data", {}), **section.get("bpb_on_other_data", {})}
            section = {**prev, **section, **({"bpb_on_other_data": other} if other else {})}
        report.log_section("base-evaluation", section)
    compute_cleanup()
    return 0
