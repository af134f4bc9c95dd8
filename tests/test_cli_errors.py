"""User mistakes on the command line: one line naming the problem, exit code 2, no traceback (PICOCHAT_DEBUG=1
brings the traceback back)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

def run(args, home, **env):
    e = {**os.environ, "PICOCHAT_HOME": str(home), "PYTHONPATH": str(REPO), **env}
    e.pop("PICOCHAT_MIRROR", None)
    return subprocess.run([sys.executable, "-m", "picochat", *args], capture_output=True, text=True, env=e,
                          timeout=120, cwd=REPO)

CASES = {
    "depth 0": (["base-train", "--depth", "0"], {}, "--depth: must be at least 1"),
    "depth -1": (["base-train", "--depth", "-1"], {}, "--depth: must be at least 1"),
    "max-seq-len 0": (["base-train", "--max-seq-len", "0"], {}, "--max-seq-len: must be at least 1"),
    "device batch 0": (["base-train", "--device-batch-size", "0"], {}, "--device-batch-size: must be at least 1"),
    "device type typo": (["base-train", "--device-type", "cdua"], {}, "'cdua' is not one of cuda, cpu, mps"),
    "cuda without a GPU": (["base-eval", "--device-type", "cuda"], {}, "torch.cuda.is_available() is False"),
    "bad dtype": (["base-train", "--depth", "1"], {"PICOCHAT_DTYPE": "bf8"}, "PICOCHAT_DTYPE='bf8'"),
    "resume banana": (["base-train", "--depth", "1", "--resume", "banana"], {}, None),
    "no sft model": (["chat-eval", "-i", "sft", "--device-type", "cpu"], {}, None),
    "serve port out of range": (["serve", "-p", "99999"], {}, "--port 99999 is not a TCP port"),
    "serve without checkpoints": (["serve", "--device-type", "cpu"], {}, "no complete checkpoint"),
    "chat without checkpoints": (["chat", "--device-type", "cpu"], {}, "no complete checkpoint"),
    "serve cuda without a GPU": (["serve", "--device-type", "cuda"], {}, "torch.cuda.is_available() is False"),
}

@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistake_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    """In-process through the same entry point as the command line (an interpreter start per case would cost ~7 s
    each); the subprocess test below checks that the real `python -m picochat` behaves the same."""
    from picochat.__main__ import main
    if case in ("cuda without a GPU", "serve cuda without a GPU"):
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    args, env, expect = CASES[case]
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    monkeypatch.delenv("PICOCHAT_MIRROR", raising=False)
    monkeypatch.setenv("PICOCHAT_DEBUG", "")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 1, err[-3000:]
    if expect:
        assert expect in errors[0], errors[0]

def test_the_real_command_line_says_the_same(tmp_path):
    r = run(["base-train", "--device-type", "cdua"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "'cdua' is not one of cuda, cpu, mps" in errors[0], r.stderr

def test_debug_shows_the_traceback(tmp_path):
    r = run(["base-train", "--device-type", "cdua"], tmp_path, PICOCHAT_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "cdua" in r.stderr


# The same promise for the stages' own checks, run in-process (same handler as the CLI, without paying an interpreter
# start per case): a home with a tokenizer and one small base checkpoint (step 2), and an empty home.
IN_PROCESS = {
    "no tokenizer": (False, ["base-train", "--depth", "1", "--device-type", "cpu"], "run `picochat tok-train` first"),
    "data info of a missing dir": (False, ["data", "info", "--data-dir", "/nonexistent/x"], "does not exist"),
    "tok-train without data": (False, ["tok-train", "--data-dir", "/nonexistent/x"], "does not exist"),
    "chat-rl without an sft model": (False, ["chat-rl", "--device-type", "cpu"], "picochat chat-sft"),
    "import-nanochat of a missing dir": (False, ["import-nanochat", "/nonexistent/x"], "is not a directory"),
    "resume 999": (True, ["base-train", "--depth", "1", "--resume", "999", "--device-type", "cpu"],
                   "no complete checkpoint at step 999"),
    "chat with an unknown tag": (True, ["chat", "-i", "base", "-g", "nosuch", "-p", "hi", "--device-type", "cpu"],
                                 "tag 'nosuch'"),
    "chat with an unknown step": (True, ["chat", "-i", "base", "-g", "d1", "-s", "999", "-p", "hi",
                                         "--device-type", "cpu"], "complete steps: [2]"),
    "serve with an unknown step": (True, ["serve", "-i", "base", "-s", "999", "--device-type", "cpu"],
                                   "complete steps: [2]"),
    "export with an unknown step": (True, ["export", "-i", "base", "-s", "999", "--format", "hf", "OUT"],
                                    "complete steps: [2]"),
    "infer-bench with an unknown step": (True, ["infer-bench", "-i", "base", "-s", "999", "--device-type", "cpu"],
                                         "complete steps: [2]"),
    "base-eval with an unknown tag": (True, ["base-eval", "--model-tag", "nosuch", "--device-type", "cpu"],
                                      "tag 'nosuch'"),
    "chat-sft from an unknown base tag": (True, ["chat-sft", "--model-tag", "nosuch", "--device-type", "cpu",
                                                 "--chatcore-every", "0"], "tag 'nosuch'"),
    "total batch not divisible": (True, ["base-train", "--depth", "1", "--total-batch-size", "100",
                                         "--device-type", "cpu"], "not divisible"),
    "chat-eval unknown task": (True, ["chat-eval", "-i", "base", "-a", "Nope"], "unknown task(s) ['Nope']"),
    "serve with -n -1": (True, ["serve", "-n", "-1", "--device-type", "cpu"], "--num-workers must be at least 1"),
    "corrupt checkpoint at an explicit step": (True, ["export", "-i", "base", "-s", "2", "--format", "hf", "OUT"],
                                               "model_000002.safetensors does not match the SHA-256"),
}


@pytest.fixture(scope="module")
def homes(tmp_path_factory, tiny_tokenizer):
    from picochat.gpt import config_from_depth, build_model
    from picochat.checkpoint import save_checkpoint
    full, empty = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("empty")
    tiny_tokenizer.save(full / "tokenizer")
    cfg = config_from_depth(1, tiny_tokenizer.get_vocab_size(), aspect_ratio=32, head_dim=16, max_seq_len=32,
                            window_pattern="L")
    save_checkpoint(full / "checkpoints" / "base" / "d1", 2, build_model(cfg, "cpu"), None,
                    {"model_config": cfg.to_dict()})
    return full, empty


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_stage_checks_are_one_line_and_exit_2(case, homes, monkeypatch, capsys, tmp_path):
    from picochat.__main__ import main
    needs_checkpoint, args, expect = IN_PROCESS[case]
    home = homes[0] if needs_checkpoint else homes[1]
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.delenv("PICOCHAT_MIRROR", raising=False)
    monkeypatch.delenv("PICOCHAT_DEBUG", raising=False)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    model = home / "checkpoints" / "base" / "d1" / "model_000002.safetensors"
    original = model.read_bytes() if model.exists() else None
    if case.startswith("corrupt"):
        model.write_bytes(original[:-8] + bytes(8 * [0x7F]))  # same size: only the recorded hash can tell
    try:
        try:
            rc = main(args)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    finally:
        if original is not None:
            model.write_bytes(original)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 1 and expect in errors[0], err[-2000:]


def test_debug_flag_shows_the_traceback(homes, monkeypatch, capsys):
    from picochat.__main__ import main
    monkeypatch.setenv("PICOCHAT_HOME", str(homes[1]))
    monkeypatch.setenv("PICOCHAT_DEBUG", "")  # recorded, so the "1" that --debug sets is undone after the test
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "data", "info", "--data-dir", "/nonexistent/x"])
