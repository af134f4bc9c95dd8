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
def test_user_mistake_is_one_line_and_exit_2(case, tmp_path):
    if case in ("cuda without a GPU", "serve cuda without a GPU"):
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    args, env, expect = CASES[case]
    r = run(args, tmp_path, **env)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, r.stderr[-3000:]
    if expect:
        assert expect in errors[0], errors[0]

def test_debug_shows_the_traceback(tmp_path):
    r = run(["base-train", "--device-type", "cdua"], tmp_path, PICOCHAT_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "cdua" in r.stderr
