"""The comparison benchmarks run end to end at toy size (their figures live in dev/BENCH.md, not here)."""
import importlib.util
import json
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parents[1] / "bench"

def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

def test_bench_core_both_evaluators_agree(shared_data, picochat_home, capsys):
    bench = load("bench_core")
    bench.main(["--depth", "1", "--max-per-task", "3", "--tasks", "copa,lambada_openai", "--vocab-size", "300",
                "--tok-chars", "20000", "--max-seq-len", "256", "--bundle-dir", str(shared_data / "core")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 6 and result["items_differing"] == 0
    assert set(result["examples_per_s"]) == {"plain", "fast"}

def test_bench_decode_vs_nanochat_without_a_checkout_says_so(capsys):
    assert load("bench_decode_vs_nanochat").main(["--nanochat", ""]) == 0
    assert "no nanochat checkout" in capsys.readouterr().out

def test_bench_decode_vs_nanochat_runs_picochat_side(tmp_path, capsys):
    """A stand-in 'nanochat' package that is picochat itself: the script's plumbing (same weights, alternated
    timing, same greedy tokens) runs end to end without the real checkout."""
    pkg = tmp_path / "nanochat"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("from picochat.engine import Engine\n")
    (pkg / "gpt.py").write_text("from picochat.gpt import GPT as _G, GPTConfig\nimport torch\n"
                                "class GPT(_G):\n    def __init__(self, config):\n        super().__init__(config, torch.float32)\n")
    rc = load("bench_decode_vs_nanochat").main(["--nanochat", str(tmp_path), "--depth", "1", "--vocab-size", "256",
                                                "--max-seq-len", "64", "--prompt-tokens", "16", "--decode-tokens", "4",
                                                "--rounds", "1", "--decode-dtype", "model"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["same_tokens"] is True and result["medians"]["picochat"]["decode"] > 0
    assert result["decode_dtype"] == "float32"


@pytest.mark.slow
def test_gpu_check_pipeline_at_toy_size_on_cpu(tmp_path):
    """The GPU check can't rot between GPU sessions: --prepare, then the whole pipeline (train, infer-bench, SFT,
    chat-eval) at toy size on CPU, with its summary."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (shared / "pretrain").is_dir():
        pytest.skip(f"needs the real data in {shared} (pretrain/, gsm8k/, words/) to prepare from")
    gpu_check = load("gpu_check")
    assert gpu_check.main(["--prepare", str(tmp_path / "data"), "--source", str(shared), "--vocab-size", "512",
                           "--max-chars", "200000"]) == 0
    rc = gpu_check.main(["--data", str(tmp_path / "data"), "--smoke", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rc == 0 and summary["ok"], summary
    assert set(summary["steps"]) == {"train_bf16", "infer", "sft", "eval"}
    assert summary["train_bf16"]["tok_per_sec"] > 0 and summary["infer"]


def test_flex_attention_bench_at_toy_size(capsys):
    assert load("bench_flex_attention").main(["--seq", "256", "--window", "64", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "max |flex - sdpa|" in out
    assert float(out.split("max |flex - sdpa| = ")[1].split()[0]) < 1e-4  # the same attention


def test_sandbox_bench_at_toy_size(tmp_path, picochat_home, monkeypatch, capsys):
    from tests.test_tasks import make_tiny_mirror
    monkeypatch.setenv("PICOCHAT_MIRROR", str(make_tiny_mirror(tmp_path / "mirror")))
    assert load("bench_sandbox").main(["--problems", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "unsafe" in out and out.count("2/2") >= 1  # the canonical solutions pass


def test_hf_export_bench_at_toy_size(capsys):
    pytest.importorskip("transformers")
    assert load("bench_hf_export").main(["--depth", "1", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1",
                                         "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "(same tokens)" in out and "DIFFER" not in out


def test_completions_bench_at_toy_size(capsys):
    assert load("bench_completions").main(["--depth", "1", "--requests", "2", "--gen-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "score (echo+logprobs)" in out and "generate 2" in out


def test_chat_check_runs_and_its_checks_bite(picochat_home, tiny_tokenizer, capsys):
    from picochat.checkpoint import save_checkpoint, checkpoint_dir
    from picochat.gpt import GPTConfig, build_model
    chat_check = load("chat_check")
    c = chat_check.check
    transcript = "We need to count the letter 'r' in the word 'berry'. Let me spell it out: b,e,r,r,y. #### 2"
    assert c("greeting", "hello", None, transcript, True)["no_spelling"] is False
    assert c("greeting", "hello", None, "Hello! How can I help you today?", True) == {"no_spelling": True, "ends": True}
    assert c("identity", "Who are you?", None, "I am picochat, a small model.", True)["identity"] is True
    assert c("identity", "Who are you?", None, "I am ChatGPT.", False) == {"no_spelling": True, "ends": False,
                                                                         "identity": False}
    assert c("arithmetic", "What is 12*7?", 84, "12*7 = 84.", True)["arithmetic"] is True
    called = "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>"
    assert c("arithmetic", "What is 12*7?", 84, called, True)["arithmetic"] is True          # the tool's result
    miscopied = "<|python_start|>12*2<|python_end|><|output_start|>24<|output_end|>"
    assert c("arithmetic", "What is 12*7?", 84, miscopied, True)["arithmetic"] is False
    # a call's own expression computes nothing, though it mentions the answer's digits
    assert c("arithmetic", "How much is 144 / 12?", 12, "<|python_start|>144 / 12", False)["arithmetic"] is False
    assert c("arithmetic", "How much is 144 / 12?", 12, "<|python_start|>144 / 12<|python_end|><|output_start|>12.0"
             "<|output_end|>", True)["arithmetic"] is True
    assert c("arithmetic", "What is 12*7?", 84, "It is 74.", True)["arithmetic"] is False
    tiny_tokenizer.save(picochat_home / "tokenizer")
    cfg = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                    n_embd=64, window_pattern="L")
    save_checkpoint(checkpoint_dir("sft", "d1"), 3, build_model(cfg, "cpu"), None, {"model_config": cfg.to_dict()})
    assert chat_check.main(["--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "30 prompts" in out and all(name in out for name in ("no_spelling", "identity", "arithmetic", "ends"))

@pytest.mark.slow
def test_cpu_sweep_forces_the_compute_dtype_and_resumes(picochat_home, tmp_path, capsys):
    """bench/cpu_sweep.py end to end at toy size (small grid, a few seconds of training): a setting with a forced
    dtype runs base-train in that dtype (recorded from the run's own record) and keeps its own results key; a
    second invocation finds it in results.jsonl instead of training again."""
    import random
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = tmp_path / "shards"
    data.mkdir()
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and ships sailed many miles and few returned".split()
    for i in range(2):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "." for _ in range(200)]
        pq.write_table(pa.table({"text": docs}), data / f"shard_{i:05d}.parquet")
    sweep = load("cpu_sweep")
    argv = ["--grid", "small", "--budget-s", "8", "--mode", "full", "--axes", "dtype", "--axis", "dtype=float32",
            "--data-dir", str(data), "--work-dir", str(tmp_path / "sweep"), "--max-chars", "20000"]
    assert sweep.main(argv) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert record["dtype"] == "float32" and record["compute_dtype"] == "float32", record
    assert record["key"].endswith("_dtypefloat32") and record["num_iterations"] >= 1 and record["val_bpb"] > 0
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert "already in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        sweep.main(["--axis", "dtype=fp16", "--dry-run"])
    assert bad.value.code == 2
