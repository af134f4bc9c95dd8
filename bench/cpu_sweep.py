"""
CPU settings sweep for runs/cpu.sh: which depth / vocab / sequence length / batch / warmup / LR / document
splitting reaches the lowest val bpb when base-train gets a fixed wall-clock budget (default 15 minutes,
counted from the command's start, start-up and evaluations included) on this machine?

Each setting runs base-train with --max-time-s <budget>, exactly as runs/cpu.sh does: base-train times its
first steps and its val evaluation, then fixes the horizon (and so the LR schedule) to fit the budget. The
run's wall time is recorded next to the budget (`wall_s`, `over_budget_pct`) so a bad fit is visible.
bpb is tokenizer-independent, so settings with different vocabularies compare directly; each vocabulary
gets its own tokenizer, trained once into its own PICOCHAT_HOME (<work-dir>/vocab_<V>). The val bpb is
measured with the reference's packing whatever split_docs says; that packing only sees document openings,
the very text a cropping run trains on, so --whole-doc-bpb adds a val bpb over whole documents
(val_bpb_split_docs, from base-eval --split-docs) to judge the split_docs axis fairly.

Sweep modes: `oat` (default) varies one axis at a time around the base point (1 + sum(len(axis) - 1) runs);
`full` runs the cartesian product. Results are JSON lines in <work-dir>/results.jsonl; settings already there
are skipped, so an interrupted sweep continues. A human table and a final JSON line (best setting) are printed.

    python bench/cpu_sweep.py --data-dir /work/shared/data/pretrain                  # default grid, 15 min each
    python bench/cpu_sweep.py --data-dir /work/shared/data/pretrain --axes depth,total_batch --budget-s 360
    python bench/cpu_sweep.py --data-dir /work/shared/data/pretrain --axes depth --axis depth=2,3,4
    python bench/cpu_sweep.py --data-dir ../shared/data/pretrain --mode full --axes dtype --axis dtype=float32,bfloat16
    python bench/cpu_sweep.py --budget-s 20 --grid small --data-dir /tmp/tiny/pretrain --work-dir /tmp/sweep  # smoke
    PICOCHAT_MIRROR=../shared/data python bench/cpu_sweep.py     # shards downloaded into <work-dir>/data
    python bench/cpu_sweep.py --dry-run                          # print the settings and exit
"""
import os
import sys
import json
import time
import shutil
import argparse
import itertools
import statistics
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# base point and axes of the default grid. The base point = runs/cpu.sh's provisional defaults.
GRIDS = {
    "default": {
        "base": {"depth": 3, "vocab": 4096, "seq_len": 256, "total_batch": 4096, "warmup": 10, "lr_mult": 1.0,
                 "split_docs": 1, "aspect_ratio": 64, "head_dim": 64, "dtype": "auto"},
        "axes": {"depth": [2, 3, 4, 6], "vocab": [2048, 4096, 8192], "seq_len": [128, 256, 512],
                 "total_batch": [2048, 4096, 8192, 16384], "warmup": [0, 10, 40], "lr_mult": [0.5, 1.0, 2.0, 4.0],
                 "split_docs": [0, 1],
                 # the compute dtype base-train runs in: auto (its choice by the CPU's bf16 instructions) by default;
                 # --axis dtype=float32,bfloat16 compares the two at the same budget (forced via PICOCHAT_DTYPE)
                 "dtype": ["auto"]},
        "device_batch": 16, "eval_tokens": 65536, "max_chars": 50_000_000,
    },
    # smoke test: seconds per run
    "small": {
        "base": {"depth": 1, "vocab": 512, "seq_len": 64, "total_batch": 512, "warmup": 1, "lr_mult": 1.0,
                 "split_docs": 1, "aspect_ratio": 32, "head_dim": 32, "dtype": "auto"},
        "axes": {"depth": [1, 2], "vocab": [512, 768], "dtype": ["auto"]},
        "device_batch": 4, "eval_tokens": 1024, "max_chars": 200_000,
    },
}
# base-train's default LRs (before its sqrt(B/B_ref) batch scaling); lr_mult multiplies all four
BASE_LRS = {"embedding-lr": 0.3, "unembedding-lr": 0.008, "matrix-lr": 0.02, "scalar-lr": 0.5}
KEY_FIELDS = ["depth", "vocab", "seq_len", "total_batch", "warmup", "lr_mult", "split_docs", "aspect_ratio",
              "head_dim"]


def settings(grid: dict, mode: str, axes_filter=None) -> list[dict]:
    base, axes = grid["base"], grid["axes"]
    if axes_filter:
        unknown = set(axes_filter) - set(axes)
        if unknown:
            raise SystemExit(f"error: unknown axis {sorted(unknown)}; this grid has {sorted(axes)}")
        axes = {k: v for k, v in axes.items() if k in axes_filter}
    out = []
    if mode == "full":
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            out.append({**base, **dict(zip(names, values))})
    else:
        out.append(dict(base))
        for name, values in axes.items():
            for v in values:
                if v != base[name]:
                    out.append({**base, name: v})
    return out


def forced_dtype(s: dict):
    """The compute dtype a setting forces (via PICOCHAT_DTYPE), or None for "auto" (base-train's own choice)."""
    return None if s.get("dtype", "auto") == "auto" else s["dtype"]


def key_of(s: dict) -> str:
    # the compute dtype joins the key only when forced, so results.jsonl files from before the dtype axis still match
    return "_".join(f"{k}{s[k]}" for k in KEY_FIELDS) + (f"_dtype{s['dtype']}" if forced_dtype(s) else "")


def tag_of(s: dict) -> str:
    return (f"sweep_d{s['depth']}_v{s['vocab']}_t{s['seq_len']}_b{s['total_batch']}_w{s['warmup']}"
            f"_lr{s['lr_mult']:g}_s{s['split_docs']}" + (f"_{s['dtype']}" if forced_dtype(s) else ""))


def device_batch_for(s: dict, default: int):
    """Rows per micro-step: the grid default, lowered until it divides the total batch (None if impossible)."""
    if s["total_batch"] % s["seq_len"]:
        return None
    rows = s["total_batch"] // s["seq_len"]
    b = min(default, rows)
    while rows % b:
        b -= 1
    return b

# -----------------------------------------------------------------------------

def run(cmd, env, log_path, timeout=None):
    """Run a picochat command, output to a log file; returns (returncode, wall seconds)."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        try:
            r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return rc, time.time() - t0


def make_env(home: Path) -> dict:
    env = dict(os.environ)
    env["PICOCHAT_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def ensure_data(args, work: Path) -> Path:
    if args.data_dir:
        d = Path(args.data_dir)
        if not any(d.glob("*.parquet")):
            raise SystemExit(f"error: --data-dir {d} has no .parquet files")
        return d
    d = work / "data"
    cmd = [sys.executable, "-m", "picochat", "data", "download", "-n", str(args.num_shards), "--data-dir", str(d)]
    rc, _ = run(cmd, make_env(work / "download_home"), work / "setup.log")
    if rc != 0:
        raise SystemExit(f"error: data download failed (see {work / 'setup.log'}); set PICOCHAT_MIRROR or --data-dir")
    return d


def ensure_tokenizer(vocab: int, data_dir: Path, max_chars: int, work: Path) -> Path:
    home = work / f"vocab_{vocab}"
    if (home / "tokenizer" / "tokenizer.json").exists():
        return home
    cmd = [sys.executable, "-m", "picochat", "tok-train", "--vocab-size", str(vocab), "--max-chars", str(max_chars),
           "--data-dir", str(data_dir)]
    print(f"training the vocab-{vocab} tokenizer into {home} ...", flush=True)
    rc, wall = run(cmd, make_env(home), work / "setup.log")
    if rc != 0:
        raise SystemExit(f"error: tok-train --vocab-size {vocab} failed (see {work / 'setup.log'})")
    print(f"  done in {wall:.0f}s", flush=True)
    return home


def train_cmd(s, budget_s, device_batch, eval_tokens, data_dir, tag):
    return [sys.executable, "-m", "picochat", "base-train", "--device-type", "cpu",
            "--depth", str(s["depth"]), "--aspect-ratio", str(s["aspect_ratio"]), "--head-dim", str(s["head_dim"]),
            "--max-seq-len", str(s["seq_len"]), "--window-pattern", "L",
            "--device-batch-size", str(device_batch), "--total-batch-size", str(s["total_batch"]),
            "--max-time-s", f"{budget_s:g}", "--warmup-steps", str(s["warmup"]),
            "--eval-every", "1000000000", "--eval-tokens", str(eval_tokens),  # eval at step 0 and at the end
            "--core-metric-every", "0", "--sample-every", "0", "--save-every", "-1", "--keep-last", "1",
            "--data-dir", str(data_dir), "--model-tag", tag] + (["--split-docs"] if s.get("split_docs") else []) + \
        [a for name, lr in BASE_LRS.items() for a in (f"--{name}", f"{lr * s['lr_mult']:g}")]


def read_run(home: Path, tag: str) -> dict:
    """Final figures of a finished run from its checkpoint meta and metrics.jsonl."""
    sys.path.insert(0, str(REPO))
    os.environ["PICOCHAT_HOME"] = str(home)
    from picochat import checkpoint as ckpt
    d = ckpt.checkpoint_dir("base", tag)
    step = ckpt.find_last_step(d)
    if step is None:
        return {}
    from picochat.run_record import RunRecord
    run = RunRecord.from_meta(ckpt.read_meta(d, step))
    rows = ckpt.read_metrics(d)
    dts = [r["dt"] for r in rows if r.get("dt") is not None]
    derived = run.derived
    return {"step": step, "val_bpb": run.loop.get("val_bpb"), "dts": dts, "compute_dtype": run.compute_dtype,
            "scaling_params": derived.get("scaling_params"), "flops_per_token": derived.get("flops_per_token"),
            "tokens": derived.get("total_tokens")}


def whole_doc_bpb(home: Path, env: dict, tag: str, device_batch: int, eval_tokens: int, data_dir: Path, log: Path):
    """val bpb over whole documents (base-eval --split-docs) of the run's final checkpoint, or None.
    base-train's val bpb crops like the reference, so it only sees document openings: the very text a cropping
    (split_docs=0) run trains on. This second figure judges the split_docs axis without that bias."""
    cmd = [sys.executable, "-m", "picochat", "base-eval", "--device-type", "cpu", "--eval", "bpb", "--split-docs",
           "--model-tag", tag, "--device-batch-size", str(device_batch), "--split-tokens", str(eval_tokens),
           "--data-dir", str(data_dir)]
    rc, _ = run(cmd, env, log, timeout=1800)
    section = home / "report" / "base-evaluation.json"
    if rc != 0 or not section.exists():
        return None
    return json.loads(section.read_text())["data"].get("val_bpb_split_docs")


def sweep_one(s, args, grid, data_dir, work) -> dict:
    home = ensure_tokenizer(s["vocab"], data_dir, args.max_chars or grid["max_chars"], work)
    env = make_env(home)
    if forced_dtype(s):  # "auto" lets base-train choose by what the CPU computes natively
        env["PICOCHAT_DTYPE"] = forced_dtype(s)
    db = device_batch_for(s, grid["device_batch"])
    rec = {"key": key_of(s), **s, "device_batch": db, "budget_s": args.budget_s}
    if db is None:
        return {**rec, "error": f"total_batch {s['total_batch']} is not a multiple of seq_len {s['seq_len']}"}
    eval_tokens = args.eval_tokens or grid["eval_tokens"]
    log = work / "logs" / f"{tag_of(s)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rc, wall = run(train_cmd(s, args.budget_s, db, eval_tokens, data_dir, tag_of(s)), env, log,
                   timeout=max(60.0, 3 * args.budget_s))
    res = read_run(home, tag_of(s)) if rc == 0 else {}
    if res.get("step") and args.whole_doc_bpb:
        res["val_bpb_split_docs"] = whole_doc_bpb(home, env, tag_of(s), db, eval_tokens, data_dir, log)
    if not args.keep_checkpoints:
        shutil.rmtree(home / "checkpoints" / "base" / tag_of(s), ignore_errors=True)
    if rc != 0 or not res.get("step"):
        return {**rec, "error": f"run failed (exit {rc}); see {log}"}
    dts = res["dts"][1:] or res["dts"]  # the first step warms up allocators and caches
    step_s = statistics.median(dts)
    return {**rec, "compute_dtype": res["compute_dtype"], "num_iterations": res["step"], "tokens": res["tokens"],
            "scaling_params": res["scaling_params"],
            "flops_per_token": res["flops_per_token"], "val_bpb": res["val_bpb"],
            "val_bpb_split_docs": res.get("val_bpb_split_docs"), "wall_s": round(wall, 2),
            "over_budget_pct": round(100 * (wall - args.budget_s) / args.budget_s, 1),
            "step_s": round(step_s, 4), "tok_per_s": round(s["total_batch"] / step_s)}


def print_table(records):
    cols = ["depth", "vocab", "seq_len", "total_batch", "warmup", "lr_mult", "split_docs", "compute_dtype",
            "num_iterations", "tokens",
            "tok_per_s",
            "wall_s", "over_budget_pct", "val_bpb", "val_bpb_split_docs"]
    print("\n" + " ".join(f"{c:>14}" for c in cols))
    for r in sorted(records, key=lambda r: (r.get("val_bpb") is None, r.get("val_bpb") or 0)):
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>14.4f}" if isinstance(v, float) and c.startswith("val_bpb")
                         else f"{'' if v is None else v:>14}")
        print(" ".join(cells) + (f"  ERROR: {r['error']}" if r.get("error") else ""))


def main(argv=None):
    p = argparse.ArgumentParser(prog="cpu_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=900.0, help="wall-clock budget per base-train command")
    p.add_argument("--grid", choices=sorted(GRIDS), default="default")
    p.add_argument("--mode", choices=["oat", "full"], default="oat", help="one axis at a time, or the full product")
    p.add_argument("--axes", default=None, help="comma list: only sweep these axes (default: all of the grid's)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="replace one axis's values, e.g. --axis depth=2,3,4 (repeatable)")
    p.add_argument("--work-dir", default=None, help="default $PICOCHAT_HOME/cpu_sweep (or ~/.cache/picochat/...)")
    p.add_argument("--data-dir", default=None, help="directory of parquet shards (last = val); default: download")
    p.add_argument("--num-shards", type=int, default=4, help="train shards to download without --data-dir")
    p.add_argument("--max-chars", type=int, default=None, help="tokenizer training chars (default: the grid's)")
    p.add_argument("--eval-tokens", type=int, default=None, help="val tokens per evaluation (default: the grid's)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--whole-doc-bpb", action="store_true",
                   help="also measure val bpb over whole documents (base-eval --split-docs): val_bpb_split_docs")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)

    grid = GRIDS[args.grid]
    for spec in args.axis:
        name, _, values = spec.partition("=")
        if name not in grid["axes"] or not values:
            p.error(f"--axis {spec!r}: expected NAME=V1,V2 with NAME one of {sorted(grid['axes'])}")
        kind = type(grid["base"][name])
        if name == "dtype" and not set(values.split(",")) <= {"auto", "float32", "bfloat16"}:
            p.error(f"--axis {spec!r}: dtype values are auto, float32 or bfloat16")
        grid = {**grid, "axes": {**grid["axes"], name: [kind(v) for v in values.split(",")]}}
    todo = settings(grid, args.mode, args.axes.split(",") if args.axes else None)
    if args.dry_run:
        for s in todo:
            print(json.dumps(s))
        print(json.dumps({"settings": len(todo), "budget_s": args.budget_s,
                          "estimated_hours": round(len(todo) * args.budget_s * 1.3 / 3600, 2)}))
        return 0
    default_home = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat"))
    work = Path(args.work_dir) if args.work_dir else default_home / "cpu_sweep"
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if (not r.get("error") and r.get("budget_s") == args.budget_s
                        and (r.get("val_bpb_split_docs") is not None or not args.whole_doc_bpb)):
                    done[r["key"]] = r
    data_dir = ensure_data(args, work)
    print(f"cpu sweep: {len(todo)} settings x {args.budget_s:.0f}s budget, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', os.cpu_count())}, data {data_dir}, work {work}",
          flush=True)
    records = []
    for i, s in enumerate(todo):
        if key_of(s) in done:
            print(f"[{i + 1}/{len(todo)}] {key_of(s)}: already in {results_path}, skipping", flush=True)
            records.append(done[key_of(s)])
            continue
        print(f"[{i + 1}/{len(todo)}] {key_of(s)} ...", flush=True)
        rec = sweep_one(s, args, grid, data_dir, work)
        rec["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"  -> {'ERROR ' + rec['error'] if rec.get('error') else 'val bpb %.4f in %d steps, %.0fs wall' % (rec['val_bpb'], rec['num_iterations'], rec['wall_s'])}",
              flush=True)
        records.append(rec)
    print_table(records)
    ok = [r for r in records if r.get("val_bpb") is not None]
    best = min(ok, key=lambda r: r["val_bpb"]) if ok else None
    print(json.dumps({"results": str(results_path), "settings": len(records), "failed": len(records) - len(ok),
                      "budget_s": args.budget_s, "best": best}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
