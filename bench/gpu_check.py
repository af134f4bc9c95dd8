"""
One command that proves a CUDA machine trains, fine-tunes, evaluates and serves picochat, and measures it.
Runs from the checkout with no install and no internet (PYTHONPATH is the checkout); what it needs beyond the
machine's own PyTorch stack comes in the folder --prepare writes on a CPU machine that has the data.

    python bench/gpu_check.py --prepare .gpu_check              # CPU machine: tokenizer, 3 shards, tiny task mirror
    bash bench/gpu_check.sh --data .gpu_check --out OUTDIR      # GPU machine: everything below, ~6 min on one H200
    bash bench/gpu_check.sh --data .gpu_check --nproc 8         # a rented 8-GPU node
    python bench/gpu_check.py --data DIR --smoke --out OUTDIR   # the same pipeline at toy size on CPU (the tests)

Steps, each with its own time limit; a failed step is recorded and the rest still run:
  pytest      the tests that need CUDA (fp8, attention, optimizer, compile) run for real
  train_bf16  base-train d12 (seq 2048, bf16, compile on): compile time (step 0), steady tok/s and MFU, peak
              memory; its loss curve is held against bench/gpu_golden.json (written to OUTDIR the first time)
  train_fp8   the same model with --fp8 for a few steps: tok/s and MFU
  train_sssl  the same model with sliding windows (SSSL) for a few steps: FlexAttention's block-sparse windows
              when FA3 is absent (offline, or not Hopper), FA3 otherwise; tok/s and MFU against the L run
  infer       infer-bench of the d12 checkpoint at batch 1, 8, 32
  sft, eval   a few chat-sft steps on GSM8K, then chat-eval on a handful of GSM8K and SpellingBee items
OUTDIR/gpu_check.json holds every figure; the key ones are printed last.
"""
import os
import re
import sys
import json
import time
import shutil
import argparse
import statistics
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "bench" / "gpu_golden.json"
GOLDEN_STEPS = [0, 25, 50, 100, 150, 199]
GOLDEN_RTOL = 0.03  # bf16 on another GPU/torch build moves the curve by well under this

# (full run, --smoke) sizes: the smoke run is the same pipeline on CPU in seconds
SIZES = {
    False: dict(train=["--depth", "12", "--max-seq-len", "2048", "--device-batch-size", "32"], batch_per_gpu=131072,
                steps=200, fp8_steps=30, infer=["--batch-sizes", "1,8,32"], sft_steps=10, eval_items=8,
                eval_tokens=64, device=[]),
    True: dict(train=["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "128",
                      "--device-batch-size", "2"], batch_per_gpu=512, steps=6, fp8_steps=0,
               infer=["--batch-sizes", "1,2", "--prompt-tokens", "32", "--decode-tokens", "8"], sft_steps=2,
               eval_items=2, eval_tokens=8, device=["--device-type", "cpu"]),
}


def prepare(out: Path, source: Path, vocab_size: int, max_chars: int):
    """Everything the GPU machine lacks, in one folder small enough to carry (~25 MB)."""
    shards = sorted((source / "pretrain").glob("*.parquet"))
    if len(shards) < 3:
        raise SystemExit(f"error: {source}/pretrain needs at least 3 parquet shards (2 train + validation)")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for s in shards[:2] + shards[-1:]:  # the last file of a directory is the validation split
        shutil.copy(s, out / "shards" / s.name)
    for sub in ("gsm8k", "words"):  # chat-sft's GSM8K and the SpellingBee word list, laid out as a mirror
        shutil.copytree(source / sub, out / "mirror" / sub, dirs_exist_ok=True)
    env = dict(os.environ, PICOCHAT_HOME=str(out / "home"), PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "picochat", "tok-train", "--data-dir", str(out / "shards"),
                    "--vocab-size", str(vocab_size), "--max-chars", str(max_chars)], env=env, check=True)
    print(f"prepared {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def run(name, cmd, env, timeout, summary):
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
    print(out[-3000:], flush=True)
    summary["steps"][name] = {"rc": rc, "wall_s": round(time.time() - t0, 1)}
    return out, rc


def train_figures(home: Path, tag: str, out: str) -> dict:
    rows = [json.loads(line) for line in (home / "checkpoints" / "base" / tag / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r.get("dt") is not None]
    steady = timed[10:] or timed[1:]
    peak = re.search(r"peak memory: ([\d.]+) MiB", out)
    return {"compile_and_first_step_s": timed[0]["dt"] if timed else None,
            "steady_step_s": statistics.median(r["dt"] for r in steady) if steady else None,
            "tok_per_sec": statistics.median(r["tok_per_sec"] for r in steady) if steady else None,
            "mfu_percent": statistics.median(r["mfu"] for r in steady) if steady and steady[0].get("mfu") else None,
            "peak_memory_mib": float(peak.group(1)) if peak else None,
            "losses": {r["step"]: r["loss"] for r in timed}}


def check_golden(losses: dict, outdir: Path, smoke: bool) -> dict:
    curve = {str(s): losses.get(s) for s in GOLDEN_STEPS if losses.get(s) is not None}
    if smoke:
        return {"status": "skipped (smoke run)"}
    if not GOLDEN.exists():
        (outdir / "gpu_golden.json").write_text(json.dumps(curve, indent=1))
        return {"status": "recorded: copy gpu_golden.json into bench/ to hold later runs against it", "curve": curve}
    golden = json.loads(GOLDEN.read_text())
    worst = max(abs(curve[s] - golden[s]) / golden[s] for s in golden if s in curve)
    return {"status": "pass" if worst <= GOLDEN_RTOL else "FAIL", "max_rel_diff": worst, "rtol": GOLDEN_RTOL}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", metavar="DIR", help="write the folder the GPU machine needs, then stop")
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data"),
                    help="data laid out like shared/data, for --prepare (default: ../shared/data)")
    ap.add_argument("--vocab-size", type=int, default=32768, help="tokenizer vocab for --prepare")
    ap.add_argument("--max-chars", type=int, default=20_000_000, help="tokenizer training text for --prepare")
    ap.add_argument("--data", help="the folder --prepare wrote")
    ap.add_argument("--out", default="gpu_check_out", help="where gpu_check.json (and a first golden curve) go")
    ap.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun processes)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU: the pipeline, not the figures")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), Path(args.source), args.vocab_size, args.max_chars)
        return 0
    if not args.data or not (Path(args.data) / "home" / "tokenizer").is_dir():
        ap.error("--data must be a folder written by --prepare (it has home/tokenizer, shards/, mirror/)")
    data, outdir, size = Path(args.data).resolve(), Path(args.out).resolve(), SIZES[args.smoke]
    outdir.mkdir(parents=True, exist_ok=True)
    home = outdir / "home"  # a writable copy: checkpoints and caches go here, the carried folder stays as it came
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(data / "home", home)
    env = dict(os.environ, PICOCHAT_HOME=str(home), PICOCHAT_MIRROR=str(data / "mirror"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    import torch
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "nproc": args.nproc, "smoke": args.smoke,
               "steps": {}}
    if torch.cuda.is_available():
        from picochat import attention
        summary["attention_windows"] = attention.backend_name(torch.bfloat16, "cuda")
        summary["fa3_unavailable_because"] = attention._FA3_ERROR
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
              "-m", "picochat"]
    total = str(size["batch_per_gpu"] * args.nproc)
    def train_args(window_pattern):
        return [*size["train"], "--total-batch-size", total, "--window-pattern", window_pattern, "--warmup-steps",
                "20", "--eval-every", "-1", "--eval-tokens", total, "--core-metric-every", "0", "--sample-every", "0",
                "--save-every", "-1", "--data-dir", str(data / "shards"), *size["device"]]
    train = train_args("L")

    if not args.smoke:
        run("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fp8.py",
                       "tests/test_attention.py", "tests/test_optim.py", "tests/test_compile.py"], env, 600, summary)
    out, rc = run("train_bf16", [*launch, "base-train", *train, "--num-iterations", str(size["steps"]),
                                 "--model-tag", "gc"], env, 900, summary)
    if rc == 0:
        summary["train_bf16"] = train_figures(home, "gc", out)
        summary["golden"] = check_golden(summary["train_bf16"].pop("losses"), outdir, args.smoke)
    if size["fp8_steps"]:
        out, rc = run("train_fp8", [*launch, "base-train", *train, "--fp8", "--num-iterations",
                                    str(size["fp8_steps"]), "--model-tag", "gc_fp8"], env, 600, summary)
        if rc == 0:
            summary["train_fp8"] = {k: v for k, v in train_figures(home, "gc_fp8", out).items() if k != "losses"}
        out, rc = run("train_sssl", [*launch, "base-train", *train_args("SSSL"), "--num-iterations",
                                     str(size["fp8_steps"]), "--model-tag", "gc_sssl"], env, 600, summary)
        if rc == 0:
            summary["train_sssl"] = {k: v for k, v in train_figures(home, "gc_sssl", out).items() if k != "losses"}
    out, rc = run("infer", [sys.executable, "-m", "picochat", "infer-bench", "-i", "base", "-g", "gc",
                            *size["infer"], *size["device"]], env, 600, summary)
    if rc == 0:
        summary["infer"] = json.loads(out.strip().splitlines()[-1])
    run("sft", [*launch, "chat-sft", "--model-tag", "gc", "--num-iterations", str(size["sft_steps"]),
                "--mixture", "gsm8k@256", "--val-mixture", "gsm8k@16", "--eval-every", "-1", "--eval-tokens", total,
                "--chatcore-every", "0", "--load-optimizer", "0", *size["device"]], env, 600, summary)
    out, rc = run("eval", [*launch, "chat-eval", "-i", "sft", "-g", "gc", "-a", "GSM8K|SpellingBee",
                           "-x", str(size["eval_items"]), "-m", str(size["eval_tokens"]), *size["device"]],
                  env, 600, summary)
    summary["ok"] = all(s["rc"] == 0 for s in summary["steps"].values()) and \
        summary.get("golden", {}).get("status") != "FAIL"
    (outdir / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print("\n=== gpu_check summary")
    print(f"{summary['device']} x{args.nproc}, torch {summary['torch']}, CUDA {summary['cuda']}")
    for name, s in summary["steps"].items():
        print(f"  {name:<11} rc {s['rc']:<4} {s['wall_s']:>7.1f}s")
    print(f"  sliding-window attention: {summary.get('attention_windows')} "
          f"(FA3: {summary.get('fa3_unavailable_because') or 'loaded'})")
    for key in ("train_bf16", "train_fp8", "train_sssl"):
        if key in summary:
            f = summary[key]
            print(f"  {key}: {f['tok_per_sec']} tok/s, MFU {f['mfu_percent']}%, step 0 (compile) "
                  f"{f['compile_and_first_step_s']}s, peak {f['peak_memory_mib']} MiB")
    print(f"  golden curve: {summary.get('golden', {}).get('status')}")
    print(f"  all ok: {summary['ok']}  ({outdir / 'gpu_check.json'})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
