"""`picochat chat` end to end on a tiny checkpoint written with checkpoint.save_checkpoint."""
import os
import sys
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _save_tiny(home, tokenizer, stage, tag="d2", step=3, seed=0):
    from picochat.checkpoint import save_checkpoint
    from picochat.gpt import GPTConfig, build_model
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                    n_embd=32, window_pattern="L")
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # a flatter-than-init but still random model
        model.lm_head.weight.normal_(0, 0.05)
    save_checkpoint(home / "checkpoints" / stage / tag, step, model, None, {"model_config": cfg.to_dict()})


@pytest.fixture
def tiny_home(picochat_home, tiny_tokenizer):
    tiny_tokenizer.save(picochat_home / "tokenizer")
    _save_tiny(picochat_home, tiny_tokenizer, "base")
    _save_tiny(picochat_home, tiny_tokenizer, "sft", step=7)
    return picochat_home


def _run(args, home, stdin=None):
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "picochat", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_pick_source_prefers_latest_stage(tiny_home, tiny_tokenizer):
    from picochat.checkpoint import latest_source as pick_source
    assert pick_source() == "sft"
    _save_tiny(tiny_home, tiny_tokenizer, "rl")
    assert pick_source() == "rl"


def test_one_shot_prompt(tiny_home):
    r = _run(["-p", "hi", "-m", "12", "--seed", "1", "--device-type", "cpu"], tiny_home)
    assert r.returncode == 0, r.stderr
    assert "sft" in r.stderr and "step 7" in r.stderr  # says which model was loaded
    assert r.stdout.strip(), f"no reply printed: {r.stdout!r}"


def test_interactive_via_stdin(tiny_home, tiny_tokenizer, monkeypatch, capsys):
    # in-process (a second interpreter start costs ~10 s on a loaded box); input() reads this stdin
    import io
    from picochat.stages import chat_cli
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nand then\nclear\nwhat now?\nexit\nnever read\n"))
    prompts = []
    real = chat_cli.stream_reply
    def spy(engine, tokenizer, prompt, args, out=None):
        prompts.append(list(prompt))
        return real(engine, tokenizer, prompt, args)
    monkeypatch.setattr(chat_cli, "stream_reply", spy)
    assert chat_cli.main(["-m", "8", "--seed", "0", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 3  # empty line ignored, 'exit' stops before the last line
    assert "(conversation cleared)" in out
    assert len(prompts) == 3
    first, second, third = (tiny_tokenizer.decode(p) for p in prompts)
    assert first == "<|bos|><|user_start|>hello there<|user_end|><|assistant_start|>"
    # the history is kept: turn 1, the assistant's reply, turn 2
    assert second.startswith(first) and second.endswith("<|assistant_end|><|user_start|>and then<|user_end|><|assistant_start|>")
    # after 'clear' a fresh conversation
    assert third == "<|bos|><|user_start|>what now?<|user_end|><|assistant_start|>"


def test_sandbox_mode_is_announced(tiny_home, capsys, sandbox_mode):
    from picochat.stages.chat_cli import main
    assert main(["-p", "hi", "-m", "4", "--seed", "0", "--device-type", "cpu", "--sandbox"]) == 0
    err = capsys.readouterr().err
    assert ("kernel-enforced" in err) if sandbox_mode == "kernel" else ("UNSAFE" in err)
    assert main(["-p", "hi", "-m", "4", "--seed", "0", "--device-type", "cpu", "--unsafe-sandbox"]) == 0
    assert "UNSAFE sandbox" in capsys.readouterr().err


def test_base_model_continuation_in_process(tiny_home, capsys):
    from picochat.stages.chat_cli import main
    assert main(["-i", "base", "-p", "The quick", "-m", "5", "--seed", "0", "--device-type", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The quick") and "base" in out.err


def test_tokens_to_parts(tiny_tokenizer):
    from picochat.stages.chat_cli import tokens_to_parts
    tok = tiny_tokenizer
    sp = tok.encode_special
    ids = (tok.encode("Let me compute. ") + [sp("<|python_start|>")] + tok.encode("2+3") + [sp("<|python_end|>")]
           + [sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")] + tok.encode(" It is 5."))
    assert tokens_to_parts(ids, tok) == [
        {"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"}, {"type": "text", "text": " It is 5."}]


def test_no_checkpoint_is_a_clear_error(picochat_home, capsys):
    from picochat.stages.chat_cli import main
    assert main(["-p", "hi", "--device-type", "cpu"]) == 2  # a user's mistake: exit code 2, one line
    assert "no complete checkpoint" in capsys.readouterr().err


class _ScriptedEngine:
    """Replays a fixed reply (the tool-call markers included) through stream_reply's Engine interface."""
    def __init__(self, tok, reply):
        sp = tok.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.assistant_end, self.bos = sp("<|assistant_end|>"), tok.get_bos_token_id()
        self.reply = reply + [self.assistant_end]

    def generate(self, prompt, **kwargs):
        for t in self.reply:
            yield [t], [1]


def test_tool_calls_print_readably(tiny_tokenizer):
    import io
    from types import SimpleNamespace
    from picochat.stages.chat_cli import stream_reply
    tok = tiny_tokenizer
    sp = tok.encode_special
    reply = (tok.encode("Let me check. ") + [sp("<|python_start|>")] + tok.encode("'strawberry'.count('r')")
             + [sp("<|python_end|>"), sp("<|output_start|>")] + tok.encode("3") + [sp("<|output_end|>")]
             + tok.encode("So 3."))
    out = io.StringIO()
    args = SimpleNamespace(seed=0, max_tokens=64, temperature=0.0, top_k=None)
    assert stream_reply(_ScriptedEngine(tok, reply), tok, [1], args, out=out) == reply
    assert out.getvalue() == "Let me check. [python] 'strawberry'.count('r') -> 3\nSo 3.\n"
    assert "<|" not in out.getvalue()


def test_context_is_shown_and_trimming_is_announced(tiny_home, monkeypatch, capsys):
    import io
    from picochat.stages import chat_cli
    long_line = "the quick brown fox jumps over the lazy dog " * 6  # the tiny model's context is 64 tokens
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_line}\n{long_line}\nexit\n"))
    assert chat_cli.main(["-m", "8", "--seed", "0", "--device-type", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "context 64 tokens" in err
    assert "of the oldest were dropped" in err, err
