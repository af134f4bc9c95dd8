"""Report card: section logging (rank 0, atomic JSON), reset, and report.md + plots from synthetic data."""
import json
import math
from pathlib import Path

import pytest
import torch

from picochat import report
from picochat.stages import report as report_stage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_section(home: Path, slug: str, data: dict, timestamp: str):
    d = home / "report"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{slug}.json").write_text(json.dumps({"section": slug, "timestamp": timestamp, "data": data}))


def test_log_section_json_and_conversions(picochat_home):
    path = report.log_section("Tokenizer Training", {"t": torch.tensor(3.5), "p": Path("/x"), "nan": math.nan,
                                                      "arr": torch.arange(3), "n": 12})
    assert path == picochat_home / "report" / "tokenizer-training.json"
    obj = json.loads(path.read_text())
    assert obj["section"] == "tokenizer-training" and "timestamp" in obj
    assert obj["data"] == {"t": 3.5, "p": "/x", "nan": None, "arr": [0, 1, 2], "n": 12}
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer-training.json"]   # no temp file left


def test_log_section_rank0_only(picochat_home, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report.log_section("base-training", {"a": 1}) is None
    assert report.reset() is None
    assert not (picochat_home / "report").exists()


def test_hourly_cost():
    assert report.hourly_cost([])["usd_per_hour"] == 0.0
    assert report.hourly_cost([{"name": "NVIDIA H100 80GB HBM3"}] * 8)["usd_per_hour"] == pytest.approx(24.0)
    assert report.hourly_cost([{"name": "NVIDIA A100-SXM4-80GB"}])["usd_per_hour"] == pytest.approx(1.79)
    assert report.hourly_cost([{"name": "Some Future GPU"}] * 2)["usd_per_hour"] == pytest.approx(4.0)


def test_reset_clears_and_writes_environment(picochat_home):
    _write_section(picochat_home, "base-training", {"x": 1}, "2026-01-01T00:00:00+00:00")
    (picochat_home / "report" / "report.md").write_text("old")
    report.reset()
    names = sorted(p.name for p in (picochat_home / "report").iterdir())
    assert names == ["environment.json"]
    env = json.loads((picochat_home / "report" / "environment.json").read_text())["data"]
    assert env["hardware"]["cpu_count"] >= 1
    assert env["hardware"]["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert env["software"]["torch"] == torch.__version__
    assert env["cost"]["usd_per_hour"] >= 0
    assert "run_started" in env and isinstance(env["git"], dict)


def test_generate_full_report(picochat_home, tmp_path, monkeypatch):
    home = picochat_home
    t0 = "2026-01-01T00:00:00+00:00"
    _write_section(home, "environment", {"run_started": t0, "git": {"commit": "abc", "dirty": True},
                                         "hardware": {"cpu_count": 2, "gpus": []}}, t0)
    _write_section(home, "tokenizer-training", {"train_time_s": 9.5, "chars": 100_000_000, "vocab_size": 32768},
                   "2026-01-01T00:01:00+00:00")
    _write_section(home, "base-training", {"model_tag": "d4", "min_val_bpb": 1.234}, "2026-01-01T00:50:00+00:00")
    _write_section(home, "base-evaluation", {"core_metric": 0.21, "results": {"hellaswag": 0.4, "arc_easy": 0.5},
                                             "centered_results": {"hellaswag": 0.1, "arc_easy": 0.3}},
                   "2026-01-01T01:00:00+00:00")
    _write_section(home, "chat-evaluation-sft", {"results": {"arc_easy": 0.3, "GSM8K": 0.05}, "ChatCORE": 0.1},
                   "2026-01-01T01:30:00+00:00")
    # a decoy tag must not be picked: the section names d4
    for tag, loss0 in [("d4", 10.0), ("d99", 50.0)]:
        mdir = home / "checkpoints" / "base" / tag
        mdir.mkdir(parents=True)
        rows = [{"step": s, "loss": loss0 - s, "lr": 1.0 - s / 10, "tok_per_sec": 1000, "time_s": 2.0 * s}
                for s in range(5)]
        rows.insert(3, {"step": 2, "val_bpb": 2.5, "time_s": 4.0})
        (mdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{truncated line\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert report_stage.main([]) == 0

    md = (home / "report" / "report.md").read_text()
    assert (cwd / "report.md").exists()
    # every stage present in order, the absent ones marked missing
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:9] == ["## Environment"] + [f"## {report.TITLES[s]}" for s in report.SECTIONS]
    rl_block = md.split("## Chat RL\n", 1)[1].split("\n## ", 1)[0]
    assert "missing" in rl_block
    assert "missing" in md.split("## Tokenizer evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "- chars: 100,000,000" in md
    # summary table: rows metrics, columns BASE/SFT/RL
    assert "| Metric | BASE | SFT | RL |" in md
    assert "| CORE | 0.2100 | - | - |" in md
    assert "| ARC-Easy | - | 0.3000 | - |" in md
    assert "| GSM8K | - | 0.0500 | - |" in md
    assert "| ChatCORE | - | 0.1000 | - |" in md
    assert "| MMLU | - | - | - |" in md
    assert "Total wall clock time: 1h30m" in md
    assert report.core_per_task(report.load_sections()) == {"hellaswag": 0.1, "arc_easy": 0.3}  # centered, not raw
    # plots exist, are PNGs, and are linked
    for name in ["loss_vs_step.png", "loss_vs_time.png", "lr_schedule.png", "core_per_task.png"]:
        p = home / "report" / name
        assert p.read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in md
    assert (home / "report" / "loss_vs_step.png").stat().st_size > 5000
    # the cwd copy links back into the report directory
    assert str(home / "report" / "lr_schedule.png") in (cwd / "report.md").read_text()


def test_read_metrics_picks_tag_and_dedupes(picochat_home):
    mdir = picochat_home / "checkpoints" / "base" / "d4"
    mdir.mkdir(parents=True)
    rows = [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 1, "loss": 3.9},   # resumed: step 1 again
            {"step": 1, "val_bpb": 2.0}, "junk", {"no_step": 1}]
    (mdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    got = report.read_metrics(mdir / "metrics.jsonl")
    assert got == [{"step": 0, "loss": 5.0}, {"step": 1, "loss": 3.9}, {"step": 1, "val_bpb": 2.0}]
    assert report.find_metrics_file("base", None) == mdir / "metrics.jsonl"
    assert report.find_metrics_file("sft", None) is None


def test_generate_with_nothing_and_corrupt_section(picochat_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = picochat_home / "report"
    d.mkdir()
    (d / "base-training.json").write_text("{corrupt")
    path = report.generate()
    md = path.read_text()
    assert md.count("*missing*") == 1 + len(report.SECTIONS)       # environment + every stage
    assert "Total wall clock time: unknown" in md
    assert not list(d.glob("*.png"))
    assert (tmp_path / "report.md").read_text().startswith("# picochat training report")


def test_find_value_normalizes_keys():
    data = {"accuracy": {"arc_challenge": 0.25, "Human Eval": 0.1}, "spelling-bee": 0.5, "flag": True}
    assert report.find_value(data, ["ARC-Challenge"]) == 0.25
    assert report.find_value(data, ["HumanEval"]) == 0.1
    assert report.find_value(data, ["SpellingBee"]) == 0.5
    assert report.find_value(data, ["flag"]) is None          # booleans are not metrics
    assert report.find_value(data, ["MMLU"]) is None


def test_partial_core_is_flagged_samples_are_whole_and_stages_get_their_own_panels(picochat_home, tmp_path,
                                                                                   monkeypatch):
    import struct
    home = picochat_home
    long_sample = "The capital of France is " + "Paris and a very long continuation " * 20
    _write_section(home, "base-evaluation", {"core_metric": 0.05, "tasks_used": 21, "tasks_total": 22,
                                             "max_per_task": 16, "samples": [long_sample, "Second sample"]},
                   "2026-01-01T01:00:00+00:00")
    _write_section(home, "chat-sft", {"model_tag": "d2"}, "2026-01-01T01:10:00+00:00")
    for stage in ("base", "sft"):
        mdir = home / "checkpoints" / stage / "d2"
        mdir.mkdir(parents=True)
        key = "loss" if stage == "base" else "train_loss"  # what base-train and chat-sft each log
        rows = [{"step": s, key: 5.0 - s / 10, "time_s": float(s)} for s in range(12)]
        rows += [{"step": s, "val_bpb": 2.0 - s / 100, "time_s": float(s)} for s in range(0, 12, 2)]
        (mdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.chdir(tmp_path)
    assert report_stage.main([]) == 0
    md = (home / "report" / "report.md").read_text()
    assert "| CORE | 0.0500 (partial*) | - | - |" in md
    assert "partial CORE: CORE over 21/22 tasks, at most 16 items per task: not comparable" in md
    assert json.dumps(long_sample) in md and "- \"Second sample\"" in md  # whole, one per line
    # base and SFT val bpb are measured on different data: one row of panels per stage, never shared axes
    width, height = struct.unpack(">II", (home / "report" / "loss_vs_step.png").read_bytes()[16:24])
    assert height > 0.9 * width * 3.6 * 2 / 11, (width, height)  # two rows of 11 x 3.6 in panels
