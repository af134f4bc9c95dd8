"""base-train: depth derivations and schedules against the reference's numbers; an end-to-end CPU run that is
SIGKILLed (once mid-save, once between checkpoints), resumed with --resume auto, and must match an uninterrupted
run bitwise; then base-eval on a small CORE subset from the shared data mirror."""
import os
import csv
import json
import shutil
import math
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picochat.run_record import RunRecord
from picochat.stages.base_train import build_parser, derive, lr_multiplier, muon_momentum, muon_weight_decay

REPO = Path(__file__).resolve().parents[1]


def _derive(depth, *flags, world=1):
    from picochat.gpt import GPT, config_from_depth
    args = build_parser().parse_args(["--depth", str(depth), "--device-batch-size", "1", *flags])
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, 32768, args.aspect_ratio, args.head_dim, args.max_seq_len))
    return derive(args, model, world)


@pytest.mark.parametrize("depth,batch,wd,iters", [
    # the reference's table: batch 2^18 for d3-d8, 2^19 d9-d16, 2^20 d17-d31, 2^21 d32+; WD and horizons from its tables
    (6, 2 ** 18, None, None), (8, 2 ** 18, None, None), (12, 2 ** 19, 0.28, 2520), (16, 2 ** 19, None, None),
    (20, 2 ** 20, 0.1002, 4980), (24, 2 ** 20, 0.0597, 8352), (26, 2 ** 20, 0.0475, 10510), (32, 2 ** 21, None, None),
])
def test_depth_derivations_match_reference(depth, batch, wd, iters):
    d = _derive(depth)
    assert d["total_batch_size"] == batch
    assert d["batch_lr_scale"] == pytest.approx(math.sqrt(batch / 2 ** 19))
    if wd is not None:
        assert d["weight_decay"] == pytest.approx(wd, abs=6e-5)
    if iters is not None:
        assert d["num_iterations"] == iters


def test_horizon_precedence_and_divisibility_error():
    d = _derive(12, "--num-iterations", "7", "--target-flops", "1e18")
    assert d["num_iterations"] == 7 and d["total_batch_size"] == 2 ** 19  # batch still from the ratio rule
    d = _derive(12, "--target-flops", "1e18")
    assert d["num_iterations"] == round(1e18 / (d["flops_per_token"] * 2 ** 19))
    # the error names the numbers and the fix
    with pytest.raises(ValueError, match=r"512 tokens is not divisible by .* 3 x 256 x 1 = 768.*--total-batch-size"):
        _derive(4, "--device-batch-size", "3", "--max-seq-len", "256", "--total-batch-size", "512")
    assert _derive(4, "--device-batch-size", "1", "--max-seq-len", "256", "--total-batch-size", "512",
                   world=2)["grad_accum_steps"] == 1


def test_schedules():
    n = 100  # warmdown = round(0.65 * 100) = 65 steps: from it=35 on
    assert lr_multiplier(0, n, 40, 0.65, 0.05) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(30, n, 10, 0.65, 0.05) == 1.0
    assert lr_multiplier(35, n, 10, 0.65, 0.05) == 1.0
    p = (100 - 60) / 65
    assert lr_multiplier(60, n, 10, 0.65, 0.05) == pytest.approx(p + (1 - p) * 0.05)
    assert lr_multiplier(100, n, 10, 0.65, 0.05) == pytest.approx(0.05)
    assert muon_momentum(0, 10000, 0.65) == pytest.approx(0.85)
    assert muon_momentum(200, 10000, 0.65) == pytest.approx(0.91)
    assert muon_momentum(1000, 10000, 0.65) == pytest.approx(0.97)
    assert muon_momentum(10000, 10000, 0.65) == pytest.approx(0.90)
    assert muon_weight_decay(0, 10, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(5, 10, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(10, 10, 0.2) == pytest.approx(0.0)

# -----------------------------------------------------------------------------
# End to end

TRAIN = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "64", "--window-pattern", "L",
         "--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "8", "--eval-every", "4",
         "--eval-tokens", "128", "--save-every", "2", "--core-metric-every", "0", "--sample-every", "8",
         "--warmup-steps", "2", "--device-type", "cpu"]


def _env(home, **extra):
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("PICOCHAT_MIRROR", None)
    env.update(extra)
    return env


def _train(home, tag, *flags, env_extra=None):
    cmd = [sys.executable, "-m", "picochat", "base-train", *TRAIN, "--data-dir", str(home / "shards"),
           "--model-tag", tag, *flags]
    p = subprocess.Popen(cmd, env=_env(home, **(env_extra or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=REPO)
    out = p.communicate()[0]
    return out, p.returncode


def _metrics(home, tag):
    rows = [json.loads(l) for l in (home / "checkpoints" / "base" / tag / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("smooth_loss"), r.get("val_bpb")) for r in rows]


@pytest.fixture
def tiny_home(picochat_home, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tiny_tokenizer.save(picochat_home / "tokenizer")
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog it was the best of times and the worst of times "
             "ships sailed many miles and few returned").split()
    shards = picochat_home / "shards"
    shards.mkdir()
    for i in range(3):  # 2 train shards + 1 val shard, several row groups each
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "." for _ in range(120)]
        pq.write_table(pa.table({"text": docs}), shards / f"shard_{i:05d}.parquet", row_group_size=40)
    return picochat_home


def test_kill_and_resume_is_bitwise_exact_then_base_eval(tiny_home, request):
    home = tiny_home
    # the uninterrupted reference run, in parallel with the interrupted chain (separate model tags)
    ref = subprocess.Popen([sys.executable, "-m", "picochat", "base-train", *TRAIN, "--data-dir", str(home / "shards"),
                            "--model-tag", "ref"], env=_env(home), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=REPO)
    ckdir = home / "checkpoints" / "base" / "run"
    # 1) SIGKILL in the middle of the step-4 save: tensors written, meta not -> must resume from step 2
    out, rc = _train(home, "run", env_extra={"PICOCHAT_FAULT_SIGKILL_SAVE": "4"})
    assert rc == -signal.SIGKILL, out
    assert (ckdir / "model_000004.safetensors").exists() and not (ckdir / "meta_000004.json").exists()
    # 2) resume, then SIGKILL between checkpoints: before step 5, i.e. after step 4's checkpoint and one
    # completed step that the resumed run must redo identically
    kill_at = 5
    out, rc = _train(home, "run", "--resume", "auto", env_extra={"PICOCHAT_FAULT_SIGKILL": str(kill_at)})
    assert rc == -signal.SIGKILL, out
    assert "resuming from step 2" in out, out
    # 3) resume to the end
    out, rc = _train(home, "run", "--resume", "auto")
    assert rc == 0, out
    assert "resuming from step 4" in out, out
    ref_out = ref.communicate()[0]
    assert ref.returncode == 0, ref_out
    a, b = _metrics(home, "ref"), _metrics(home, "run")
    assert [r[0] for r in a] == list(range(9))
    assert a == b, f"kill at {kill_at}: metrics differ\n{a}\n{b}"  # bitwise: floats compared exactly
    assert sum(r[3] is not None for r in a) == 3  # val bpb at steps 0, 4, 8
    assert "sample:" in ref_out and "minimum val bpb" in ref_out
    # a same-size corruption of the FINAL checkpoint (an explicit step of it is a one-line error: test_cli_errors)
    # is not "nothing to do": --resume auto skips it loudly, redoes steps 6..8 and ends on the same bits; a killed
    # save's temp file is swept at the start
    from picochat import checkpoint as ckpt
    model8 = ckpt.model_path(ckdir, 8)
    data = bytearray(model8.read_bytes())
    data[-16:] = bytes(x ^ 0xFF for x in data[-16:])
    model8.write_bytes(bytes(data))
    (ckdir / "optim_000008_rank0.safetensors.abc123.tmp").write_bytes(b"half a save")
    out, rc = _train(home, "run", "--resume", "auto")
    assert rc == 0 and "CORRUPT checkpoint skipped: step 8" in out and "resuming from step 6" in out, out
    assert _metrics(home, "run") == a and ckpt.corrupt_files(ckdir, 8) == [] and not list(ckdir.glob("*.tmp"))
    meta = json.loads((ckdir / "meta_000008.json").read_text())
    for key in ("model_config", "run", "picochat_version", "world_size", "tokenizer", "rng_state"):
        assert key in meta, key
    assert meta["tokenizer"]["sha256"]
    run = RunRecord.from_meta(meta)  # the typed run record: every value once
    assert (run.stage, run.model_tag, run.max_seq_len, run.num_iterations) == ("base", "run", 64, 8)
    assert run.loader["world_size"] == 1 and run.loop["val_bpb"] == a[-1][3]
    # a different model config is refused, naming the difference
    out, rc = _train(home, "run", "--resume", "6", "--aspect-ratio", "64")
    assert rc != 0 and "n_embd: checkpoint=64 vs now=128" in out, out
    # a fresh (non-resume) run refuses to mix with the existing run's checkpoints
    out, rc = _train(home, "run")
    assert rc != 0 and "already holds checkpoints" in out and "--resume auto" in out, out

    # 4) base-eval on a small CORE subset through the shared-data mirror (skips when absent)
    shared = request.getfixturevalue("mirror_url")
    tasks = "copa,winograd,lambada_openai,arc_easy,coqa"
    p = subprocess.run([sys.executable, "-m", "picochat", "base-eval", "--model-tag", "ref", "--eval", "core,bpb",
                        "--tasks", tasks, "--max-per-task", "3", "--device-batch-size", "2", "--split-tokens", "128",
                        "--data-dir", str(home / "shards"), "--device-type", "cpu"],
                       env=_env(home, PICOCHAT_MIRROR=shared), capture_output=True, text=True, cwd=REPO)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "CORE over 4/5 tasks (missing: coqa)" in out
    rows = list(csv.reader((home / "base_eval" / "ref_000008.csv").read_text().splitlines()))
    labels = [r[0].strip() for r in rows[1:]]
    assert labels == ["arc_easy", "copa", "lambada_openai", "winograd", "CORE"]
    accs = [float(r[1]) for r in rows[1:-1]]
    assert all(0.0 <= x <= 1.0 for x in accs)
    assert "val bpb" in out
    # 5) bpb over whole documents (--split-docs): a differently named figure, so it never passes for the other
    p = subprocess.run([sys.executable, "-m", "picochat", "base-eval", "--model-tag", "ref", "--eval", "bpb",
                        "--split-docs", "--device-batch-size", "2", "--split-tokens", "128",
                        "--data-dir", str(home / "shards"), "--device-type", "cpu"],
                       env=_env(home), capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "val bpb (whole documents)" in p.stdout
    data = json.loads((home / "report" / "base-evaluation.json").read_text())["data"]
    # 6) another data directory, a single file: its own key with path and content hash, never the checkpoint's val_bpb
    other = home / "other"
    other.mkdir()
    shutil.copy(home / "shards" / "shard_00001.parquet", other / "only.parquet")
    from picochat.stages import base_eval  # in-process (this test already pays for enough interpreter starts)
    assert base_eval.main(["--model-tag", "ref", "--eval", "bpb", "--device-batch-size", "2", "--split-tokens", "128",
                           "--data-dir", str(other), "--device-type", "cpu"]) == 0
    after = json.loads((home / "report" / "base-evaluation.json").read_text())["data"]
    rec = after["bpb_on_other_data"][str(other.resolve())]
    assert 0 < rec["all_bpb"] < 20 and len(rec["sha256"]) == 64 and rec["files"] == 1
    assert after["val_bpb"] == data["val_bpb"] and after["val_bpb_split_docs"] == data["val_bpb_split_docs"]
    assert 0 < data["val_bpb_split_docs"] < 20 and 0 < data["train_bpb_split_docs"] < 20
    # ... added to the same checkpoint's section: step 4's CORE and cropped bpb are kept
    assert "core_metric" in data and "val_bpb" in data and data["val_bpb"] != data["val_bpb_split_docs"]


def test_budget_refit_keeps_the_schedule():
    """The refit step lies before the warmdown of both the first and the refit horizon, so the LR multiplier of
    every step already taken is the same under either horizon."""
    from picochat.stages.base_train import lr_multiplier
    from picochat.train_loop import budget_refine_step
    for n in [40, 100, 479, 1153, 10_000]:
        at = budget_refine_step(10, n, 0.65)
        if at is None:
            assert n < 100
            continue
        for n2 in [math.ceil(at / 0.35) + 1, n, 2 * n]:
            assert [lr_multiplier(s, n, 10, 0.65, 0.05) for s in range(at + 1)] == \
                   [lr_multiplier(s, n2, 10, 0.65, 0.05) for s in range(at + 1)]


def test_horizon_for_budget_fits_the_wall_clock():
    """The chosen horizon's simulated wall time (steps + periodic and final val evals) fits the budget, and
    one more step's worth of training would not have fitted by much."""
    from picochat.train_loop import horizon_for_budget
    for budget, elapsed, step, step_s, eval_s, every in [(900, 40, 10, 0.7, 12.0, 100), (60, 20, 10, 0.5, 0.0, -1),
                                                        (3600, 300, 10, 2.0, 60.0, 250), (120, 30, 10, 0.1, 3.0, 5)]:
        n = horizon_for_budget(budget, elapsed, step, step_s, eval_s, every)
        evals = (n // every - step // every) if every > 0 else 0
        simulated = elapsed + (n - step) * step_s + evals * eval_s + eval_s  # + the final eval
        assert simulated <= 0.98 * budget + 1e-9
        assert simulated >= 0.95 * 0.98 * budget  # and it does not leave much of the budget unused
    assert horizon_for_budget(10, 100, 10, 1.0, 0.0, -1) == 11  # over budget already: one more step, never zero


def test_time_budget_run_with_split_docs(tiny_home):
    """--max-time-s fixes the horizon after its timed first steps, finishes within the budget, and leaves a final
    checkpoint that says so (what runs/cpu.sh's finished_step reads); a re-run has nothing to do."""
    import time
    budget = 15
    flags = [f for f in TRAIN]
    i = flags.index("--num-iterations")
    del flags[i:i + 2]
    flags[flags.index("--save-every") + 1] = "-1"
    flags[flags.index("--sample-every") + 1] = "0"  # sampling is outside the budget
    # --expect-steps far above what 15 s give: the run must say it is on a slow machine, at the start and in the report
    cmd = [sys.executable, "-m", "picochat", "base-train", *flags, "--max-time-s", str(budget), "--split-docs",
           "--data-dir", str(tiny_home / "shards"), "--model-tag", "budget", "--resume", "auto",
           "--expect-steps", "100000"]
    t0 = time.time()
    p = subprocess.run(cmd, env=_env(tiny_home), capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    from picochat.train_loop import budget_refine_step
    fits = re.findall(r"--max-time-s 15: .* -> horizon ([\d,]+) iterations( \(refit\))?", out)
    first = int(fits[0][0].replace(",", ""))
    # fixed after the probe steps, then refit once before the warmdown when the first horizon leaves room for it
    # (on a slow machine start-up eats the budget and the run is too short for a refit)
    if budget_refine_step(10, first, 0.65) is not None:
        assert len(fits) == 2 and fits[1][1] and not fits[0][1], out
    else:
        assert len(fits) == 1, out
    # later re-checks may shorten it (this machine's speed varies): the last horizon message is the final horizon
    horizons = re.findall(r"--max-time-s 15: .* -> horizon (?:shortened from [\d,]+ to )?([\d,]+) iterations", out)
    horizon = int(horizons[-1].replace(",", ""))
    assert horizon <= int(fits[-1][0].replace(",", "")) and horizon > 10  # more than the timed probe steps
    assert wall < 1.5 * budget, f"{wall:.1f}s for a {budget}s budget\n{out}"
    assert "SLOW OR BUSY MACHINE: the 15s budget fits only" in p.stderr, out  # announced when the horizon is fit
    budget_rec = json.loads((tiny_home / "report" / "base-training.json").read_text())["data"]["budget"]
    assert budget_rec["max_time_s"] == budget and budget_rec["expected_steps"] == 100000
    assert "SLOW OR BUSY MACHINE" in budget_rec["warning"] and abs(budget_rec["off_budget_percent"]) < 50
    ckdir = tiny_home / "checkpoints" / "base" / "budget"
    meta = json.loads((ckdir / f"meta_{horizon:06d}.json").read_text())
    assert meta["run"]["num_iterations"] == horizon
    assert meta["run"]["loader"]["ranks"][0]["split_docs"] is True
    assert [r[0] for r in _metrics(tiny_home, "budget")][-1] == horizon
    p = subprocess.run(cmd, env=_env(tiny_home), capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and "nothing to do" in p.stdout + p.stderr, p.stdout + p.stderr


def _launch(home, tag, launcher_flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_flags, "-m", "picochat", "base-train", *TRAIN,
           "--data-dir", str(home / "shards"), "--model-tag", tag]
    return subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_node(tiny_home):
    """The multi-node path on every CI run: two torchrun launchers (--nnodes=2, one process each, gloo, rendezvous
    on 127.0.0.1) train exactly what one launcher with two processes trains: the same ranks see the same rows
    (each rank reads its own share of the row groups, so a 1-process run at the same global batch reads other
    rows and is not the reference here), and the per-step losses and val bpb are bitwise equal."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = _launch(tiny_home, "one", ["--standalone", "--nproc_per_node=2"])
    out_one = one.communicate()[0]
    assert one.returncode == 0, out_one
    nodes = [_launch(tiny_home, "two", ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
                                        "--master_addr=127.0.0.1", f"--master_port={port}"]) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(outs)
    assert "2 process(es)" in outs[0], outs[0]
    a, b = _metrics(tiny_home, "one"), _metrics(tiny_home, "two")
    assert [r[0] for r in a] == list(range(9)) and a == b, f"{a}\n{b}"
    assert json.loads((tiny_home / "checkpoints" / "base" / "two" / "meta_000008.json").read_text())["world_size"] == 2


def test_nonfinite_loss_stops_the_run_and_keeps_the_good_checkpoints(tiny_home):
    """An absurd LR blows the weights up within a few steps: the run stops with exit code 3 and one line naming
    the step and the fix, the checkpoint on disk is the last good one, and --skip-nonfinite drops such steps."""
    out, rc = _train(tiny_home, "nan", "--matrix-lr", "1e30", "--embedding-lr", "1e30", "--warmup-steps", "1")
    assert rc == 3, out
    line = [l for l in out.splitlines() if "NaN or inf" in l]
    assert line and "--resume auto" in line[0] and "--skip-nonfinite" in line[0] and "Traceback" not in out, out
    ckdir = tiny_home / "checkpoints" / "base" / "nan"
    from picochat import checkpoint as ckpt
    good = ckpt.find_last_step(ckdir)
    if good is not None:  # whatever was saved holds finite weights
        state, _ = ckpt.load_state(ckdir, good, "cpu")
        assert all(torch.isfinite(v).all() for v in state.values())
    rows = _metrics(tiny_home, "nan")
    assert all(r[1] is None or math.isfinite(r[1]) for r in rows), rows  # no NaN row was logged
    out, rc = _train(tiny_home, "skip", "--matrix-lr", "1e30", "--embedding-lr", "1e30", "--warmup-steps", "1",
                     "--skip-nonfinite")
    assert rc == 0 and "optimizer step dropped (--skip-nonfinite" in out, out
