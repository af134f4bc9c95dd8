"""
The recipes at a much smaller size: runs/cpu.sh end to end on a tiny mirror (every stage, then a re-run that
must skip/resume instead of redoing work), and bench/scaling_plot.py on a synthetic sweep CSV.

The tiny mirror is built in tmp from a few rows of ../shared/data (same layout, so the same fetch code paths
run); the test is skipped when ../shared/data is absent.

    python -m pytest tests/test_recipes.py -q --durations=10
    python tests/test_recipes.py /tmp/tiny_mirror     # build the tiny mirror by hand (for debugging cpu.sh)
"""
import csv
import sys
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# CORE tasks kept in the tiny bundle: one of each type (MC, schema, LM), all 0-shot so prompts stay short
TINY_CORE_TASKS = ["copa", "winograd", "lambada_openai"]

# -----------------------------------------------------------------------------
# Tiny mirror

def _head_lines(src: Path, dst: Path, n: int):
    dst.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(n), f)]
    with opener(dst, "wt", encoding="utf-8") as f:
        f.writelines(lines)


def build_tiny_mirror(src: Path, dst: Path, rows_per_shard=24, chars_per_row=3000, lines=24):
    """A PICOCHAT_MIRROR directory laid out like ../shared/data, with a few rows of each dataset."""
    import yaml
    import pyarrow as pa
    import pyarrow.parquet as pq
    src, dst = Path(src), Path(dst)
    # pretrain: 2 small train shards + the validation shard (last), with a manifest like the real one
    (dst / "pretrain").mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "pretrain" / "manifest.json").read_text())
    train = sorted(s["file"] for s in manifest["shards"] if s["split"] == "train")[:2]
    val = [s["file"] for s in manifest["shards"] if s["split"] == "val"]
    shards = []
    for name in train + val:
        texts = pq.read_table(src / "pretrain" / name, columns=["text"]).column("text").to_pylist()
        texts = [t[:chars_per_row] for t in texts[:rows_per_shard]]
        path = dst / "pretrain" / name
        pq.write_table(pa.table({"text": texts}), path, row_group_size=8, compression="zstd")
        shards.append({"file": name, "split": "val" if name in val else "train", "rows": len(texts),
                       "file_bytes": path.stat().st_size})
    (dst / "pretrain" / "manifest.json").write_text(json.dumps({"shards": shards}))
    # core: a bundle with three small 0-shot tasks
    config = yaml.safe_load((src / "core" / "core.yaml").read_text())
    entries = [e for e in config["icl_tasks"] if e["label"] in TINY_CORE_TASKS]
    (dst / "core").mkdir(parents=True, exist_ok=True)
    (dst / "core" / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    shutil.copy(src / "core" / "eval_meta_data.csv", dst / "core" / "eval_meta_data.csv")
    for e in entries:
        uri = e["dataset_uri"]
        _head_lines(src / "core" / "eval_data" / uri, dst / "core" / "eval_data" / uri, 8)
    # chat tasks
    for rel in ["gsm8k/train.jsonl", "gsm8k/test.jsonl", "mmlu/dev.jsonl", "mmlu/test.jsonl",
                "arc/ARC-Easy/train.jsonl", "arc/ARC-Easy/validation.jsonl", "arc/ARC-Easy/test.jsonl",
                "arc/ARC-Challenge/test.jsonl", "humaneval/HumanEval.jsonl.gz", "sft/dolly_hhrlhf_small.jsonl"]:
        _head_lines(src / rel, dst / rel, lines)
    _head_lines(src / "words" / "words_alpha.txt", dst / "words" / "words_alpha.txt", 2000)
    (dst / "README.md").write_text("tiny test mirror built by tests/test_recipes.py\n")
    return dst

# -----------------------------------------------------------------------------
# runs/cpu.sh end to end

# every size knob of runs/cpu.sh, at a size that runs in well under a minute of compute
TINY_KNOBS = {
    "NUM_SHARDS": "2", "VOCAB_SIZE": "512", "MAX_CHARS": "200000", "DEPTH": "1", "ASPECT_RATIO": "32",
    "HEAD_DIM": "32", "SEQ_LEN": "64", "DEVICE_BATCH": "4", "TOTAL_BATCH": "512", "BASE_ITERS": "4",
    "WARMUP_STEPS": "1", "BASE_EVAL_EVERY": "2", "BASE_EVAL_TOKENS": "512", "SPLIT_TOKENS": "512",
    "CORE_MAX_PER_TASK": "4", "SFT_ITERS": "3", "SFT_MIXTURE": "gsm8k@16,identity@16",
    "SFT_VAL_MIXTURE": "gsm8k@8", "SFT_EVAL_TOKENS": "512", "CHAT_EVAL_TASKS": "ARC-Easy|GSM8K",
    "CHAT_EVAL_MAX": "2", "CHAT_EVAL_MAX_TOKENS": "8", "IDENTITY_NUM": "20", "SAVE_EVERY": "2",
}


def _run_cpu_sh(env, cwd, timeout=300):
    t0 = time.time()
    r = subprocess.run(["bash", str(REPO / "runs" / "cpu.sh")], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"runs/cpu.sh failed (exit {r.returncode}):\n{out[-6000:]}"
    return out, time.time() - t0


def _stage_lines(out):
    """'[cpu.sh] <stage>: done in Xs' / 'skipped' lines -> {stage: 'done'|'skipped'|'resumed'}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\[cpu\.sh\] ([\w-]+): (done|skipped)", out, re.M)}


def test_cpu_recipe_end_to_end(shared_data, tmp_path):
    mirror = build_tiny_mirror(shared_data, tmp_path / "mirror")
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **TINY_KNOBS, "PICOCHAT_HOME": str(home), "PICOCHAT_MIRROR": str(mirror),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WANDB_RUN", None)
    out1, _ = _run_cpu_sh(env, work)

    # every stage ran and left its artifacts
    stages = _stage_lines(out1)
    for stage in ["data", "tok-train", "tok-eval", "base-train", "base-eval", "chat-sft", "chat-eval", "report"]:
        assert stages.get(stage) == "done", f"stage {stage} did not run: {stages}\n{out1[-3000:]}"
    assert len(list((home / "data" / "climbmix").glob("shard_*.parquet"))) == 3   # 2 train + val
    assert (home / "tokenizer" / "tokenizer.json").exists()
    base_dir = home / "checkpoints" / "base" / "d1"
    base_meta = json.loads((base_dir / "meta_000004.json").read_text())
    assert base_meta["model_config"]["n_layer"] == 1 and base_meta["model_config"]["vocab_size"] == 512
    assert base_meta["model_config"]["sequence_len"] == 64
    assert base_meta["run"]["loop"]["val_bpb"] is not None and math.isfinite(base_meta["run"]["loop"]["val_bpb"])
    base_csv = home / "base_eval" / "d1_000004.csv"
    rows = list(csv.reader(base_csv.open()))
    tasks = {r[0].strip() for r in rows[1:]}
    assert set(TINY_CORE_TASKS) <= tasks and "CORE" in tasks, rows
    sft_dir = home / "checkpoints" / "sft" / "d1"
    assert (sft_dir / "meta_000003.json").exists()
    eval_files = list((home / "chat_eval").glob("sft_*.json"))
    assert eval_files, "chat-eval wrote no result file"
    results = json.loads(eval_files[0].read_text())
    assert "ARC-Easy" in json.dumps(results) and "GSM8K" in json.dumps(results)
    # the report card shows every stage of the demo with figures, none marked missing
    report = (home / "report" / "report.md").read_text()
    for title in ["Environment", "Tokenizer training", "Tokenizer evaluation", "Base model training",
                  "Base model evaluation", "Chat SFT", "Chat evaluation (SFT)"]:
        body = report.split(f"## {title}\n", 1)
        assert len(body) == 2, f"report.md has no section {title!r}"
        assert not body[1].lstrip().startswith("*missing*"), f"report.md marks {title!r} as missing"
    assert (work / "report.md").exists()  # copied to where the user ran the script
    assert "picochat chat" in out1        # tells the user how to talk to the model

    # the report links its plots, and they are real PNGs
    for png in ["loss_vs_step.png", "lr_schedule.png"]:
        assert png in report and (home / "report" / png).read_bytes()[:4] == b"\x89PNG"

    # re-run after an "interruption": the final base checkpoint is gone (step 2 is the last complete one).
    # base-train must resume from step 2 and redo only steps 2-3; every other finished stage is skipped.
    from safetensors.torch import load_file
    final_before = load_file(base_dir / "model_000004.safetensors")
    for f in base_dir.glob("*_000004*"):
        f.unlink()
    mtime = (home / "tokenizer" / "tokenizer.json").stat().st_mtime
    out2, _ = _run_cpu_sh(env, work)
    stages2 = _stage_lines(out2)
    for stage in ["tok-train", "tok-eval", "base-eval", "gen-identity", "chat-sft", "chat-eval"]:
        assert stages2.get(stage) == "skipped", f"re-run redid {stage}: {stages2}\n{out2[-3000:]}"
    assert stages2.get("base-train") == "done" and stages2.get("report") == "done", stages2
    assert (home / "tokenizer" / "tokenizer.json").stat().st_mtime == mtime
    assert "resuming from step 2" in out2, out2[-3000:]
    trained = re.findall(r"^step (\d+)/00004", out2, re.M)
    assert trained == ["00002", "00003"], f"the resumed run trained steps {trained}, expected only 2 and 3"
    # resuming reproduces the uninterrupted run (same batches, same RNG, same optimizer state)
    final_after = load_file(base_dir / "model_000004.safetensors")
    assert final_before.keys() == final_after.keys()
    for k in final_before:
        assert torch.allclose(final_before[k], final_after[k], atol=1e-6, rtol=1e-5), f"resume diverged at {k}"
    assert "## Base model training" in (home / "report" / "report.md").read_text()

# -----------------------------------------------------------------------------
# bench/scaling_plot.py

def test_scaling_plot_synthetic(tmp_path):
    """A synthetic sweep where loss follows L(N, D) = E + A/N^alpha + B/D^beta: the frontier fit must recover
    the textbook optimum exponent a = beta / (alpha + beta) (Chinchilla, approach 3) within grid resolution."""
    import scaling_plot
    alpha, beta, E, A, B = 0.34, 0.28, 0.6, 2000.0, 900.0
    fields = scaling_plot.SCALING_COLUMNS
    path = tmp_path / "results.csv"
    budgets = [1e15, 1e16, 1e17, 1e18]
    depths = list(range(2, 41, 2))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for C in budgets:
            for d in depths:
                n = 12 * (64 * d) ** 2 * d          # transformer matrices of a d-layer, 64d-wide model
                tokens = C / (6 * n)
                bpb = E + A / n ** alpha + B / tokens ** beta
                w.writerow({"flops_budget": C, "depth": d, "model_dim": 64 * d, "params_wte": 0,
                            "params_value_embeds": 0, "params_lm_head": 0, "params_transformer": n,
                            "params_scalars": 0, "params_total": n, "num_iterations": 1,
                            "tokens_trained": int(tokens), "val_bpb": bpb, "core_score": "",
                            "train_time_sec": 1.0})
    out = tmp_path / "plots"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "scaling_plot.py"), "plot", "scaling", str(path),
                        "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "scaling_bpb_vs_flops.png" in pngs and "scaling_frontier.png" in pngs, pngs
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fit = json.loads(r.stdout.strip().splitlines()[-1])
    # every optimum is interior here (d6..d18), so each is parabola-refined; the grid is coarse (step 2)
    assert len(fit["frontier"]) == len(budgets) and all(f["refined"] for f in fit["frontier"]), fit
    assert abs(fit["n_opt_exponent"] - beta / (alpha + beta)) < 0.03, fit
    assert abs(fit["tokens_opt_exponent"] - (1 - beta / (alpha + beta))) < 0.03, fit
    # the frontier is the minimum-bpb depth at each budget
    best = {C: min(depths, key=lambda d: E + A / (12 * (64 * d) ** 2 * d) ** alpha
                   + B / (C / (6 * 12 * (64 * d) ** 2 * d)) ** beta) for C in budgets}
    assert {float(r["flops_budget"]): int(r["depth"]) for r in fit["frontier"]} == best


def test_scaling_plot_miniseries(tmp_path):
    import scaling_plot
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=scaling_plot.MINISERIES_COLUMNS)
        w.writeheader()
        for d, bpb, core in [(2, 1.9, 0.01), (4, 1.6, 0.03), (6, 1.4, ""), (8, 1.3, 0.07)]:
            w.writerow({"depth": d, "model_dim": 64 * d, "num_params": 1000 * d, "num_scaling_params": 900 * d,
                        "num_iterations": 10, "tokens_trained": 10000, "param_data_ratio": 10.0 / d,
                        "val_bpb": bpb, "core_score": core, "train_time_sec": 3.0})
    out = tmp_path / "plots"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "scaling_plot.py"), "plot", "miniseries", str(path),
                        "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "miniseries.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_plot_rejects_bad_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("depth,val_bpb\n2,1.0\n")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "scaling_plot.py"), "plot", "scaling", str(path),
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "flops_budget" in (r.stdout + r.stderr)


if __name__ == "__main__":
    shared = Path(os.environ.get("PICOCHAT_SHARED_DATA", REPO.parent / "shared" / "data"))
    print(build_tiny_mirror(shared, Path(sys.argv[1])))
