"""Chat stages: SFT packing loader (whole conversations, exact resume), the NaN guard, identity data
(templates and a fake OpenAI-compatible endpoint), and a tiny CPU end-to-end
base checkpoint -> chat-sft -> chat-rl -> chat-eval."""
import os
import sys
import json
import math
import signal
import threading
import subprocess
from pathlib import Path
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import pytest
import torch
import torch.nn.functional as F

from picochat import fetch
from picochat.stages import gen_identity
from picochat.stages.chat_sft import SFTLoader, accumulate_gradients, lr_multiplier
from picochat.gpt import GPTConfig, build_model
from picochat.run_record import RunRecord
from picochat.tasks import CustomJSON, BASELINES, make_task

from test_tasks import make_tiny_mirror

REPO = Path(__file__).resolve().parents[1]


def save_tiny_base(tok):
    """A d2 base checkpoint (step 0) with the run record chat-sft inherits its sizes and LRs from."""
    from picochat import checkpoint
    torch.manual_seed(0)
    model = build_model(tiny_config(tok, 128), torch.device("cpu"), torch.float32)
    run = RunRecord(stage="base", model_tag="d2", compute_dtype="float32", max_seq_len=128, device_batch_size=2,
                    total_batch_size=512, lrs={"embedding": 0.1, "unembedding": 0.004, "matrix": 0.01, "scalar": 0.5},
                    num_iterations=0)
    checkpoint.save_checkpoint(checkpoint.checkpoint_dir("base", "d2"), 0, model, model.setup_optimizer(),
                               {"model_config": model.config.to_dict(), "run": run.to_dict()})


def tiny_config(tok, seq_len=128):
    return GPTConfig(sequence_len=seq_len, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                     n_embd=64, window_pattern="L")


class ListTask:
    def __init__(self, convs):
        self.convs = convs
    def __len__(self):
        return len(self.convs)
    def __getitem__(self, i):
        return self.convs[i]


def _convs(n):
    out = []
    for i in range(n):
        words = " ".join(["word"] * (1 + (i * 7) % 23))
        out.append({"messages": [{"role": "user", "content": f"question {i}: {words}?"},
                                 {"role": "assistant", "content": f"answer {i} " + "ok " * (i % 5)}]})
    return out

# -----------------------------------------------------------------------------
# SFT loader

def test_sft_loader_packs_whole_conversations(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = _convs(40)
    rendered = [tok.render_conversation(c, max_tokens=10**9) for c in convs]
    assert max(len(r[0]) for r in rendered) <= 97
    B, T = 2, 96   # every test conversation fits a row (<= 77 tokens)
    loader = SFTLoader(ListTask(convs), tok, B, T, torch.device("cpu"), buffer_size=8)
    bos = tok.get_bos_token_id()
    placed = []
    for _ in range(6):
        x, y = loader.next_batch()
        assert x.shape == (B, T) and y.shape == (B, T)
        for r in range(B):
            row = torch.cat([x[r], y[r, -1:].clamp(min=0)]).tolist()  # reconstruct T+1 (last target may be -1)
            # walk the row: it must be a concatenation of whole rendered conversations, then BOS padding
            pos = 0
            while pos < T:
                match = [k for k, (ids, _) in enumerate(rendered) if row[pos:pos + len(ids)] == ids
                         and pos + len(ids) <= T + 1]
                if not match:
                    break
                k = max(match, key=lambda k: len(rendered[k][0]))
                ids, mask = rendered[k]
                # targets: next token where the next position is supervised, else -1
                for j in range(len(ids) - 1):
                    if pos + j < T:
                        expect = ids[j + 1] if mask[j + 1] else -1
                        assert y[r, pos + j].item() == expect
                placed.append(k)
                pos += len(ids)
            assert all(t == bos for t in row[pos:T]), "the rest of a row must be BOS padding"
            assert all(t == -1 for t in y[r, max(pos - 1, 0):].tolist()[1:])   # no loss on padding
    assert len(placed) == len(set(placed)) and len(placed) >= 6   # each conversation once, whole


def test_sft_loader_exact_resume(tiny_tokenizer):
    convs = _convs(10)
    dev = torch.device("cpu")
    a = SFTLoader(ListTask(convs), tiny_tokenizer, 2, 48, dev, buffer_size=5)
    for _ in range(7):   # wraps around the dataset: epochs are counted
        a.next_batch()
    state = json.loads(json.dumps(a.state()))   # must survive JSON
    b = SFTLoader(ListTask(convs), tiny_tokenizer, 2, 48, dev, buffer_size=5, state=state)
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == b.epoch and a.epoch >= 2


def test_overlong_conversation_is_truncated_and_counted(tiny_tokenizer):
    long = {"messages": [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "yo"}]}
    loader = SFTLoader(ListTask([long]), tiny_tokenizer, 1, 32, torch.device("cpu"), buffer_size=1)
    x, y = loader.next_batch()
    assert loader.truncated >= 1 and (y == -1).all()   # only user tokens fit: nothing to learn
    assert loader.empty_rows == 1

# -----------------------------------------------------------------------------
# NaN guard (a mean over zero supervised tokens would be 0/0)

def test_nan_guard_all_masked_micro_batch(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(tiny_tokenizer, 32), torch.device("cpu"), torch.float32)
    V = tiny_tokenizer.get_vocab_size()
    x = torch.randint(0, V, (2, 32))
    y_masked = torch.full((2, 32), -1)
    y_real = torch.randint(0, V, (2, 32))
    y_real[:, :10] = -1
    # the naive mean CE over zero targets is NaN: this is what the guard must avoid
    assert math.isnan(F.cross_entropy(torch.randn(4, V), torch.full((4,), -1), ignore_index=-1).item())

    opt = model.setup_optimizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, n, empty = accumulate_gradients(model, [(x, y_masked)])
    assert n == 0 and empty == 1 and math.isfinite(loss)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    if n > 0:
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # untouched

    # a masked micro-batch next to a real one changes nothing: same grads as the real one alone
    model.zero_grad(set_to_none=True)
    loss_mix, n_mix, empty_mix = accumulate_gradients(model, [(x, y_masked), (x, y_real)])
    g_mix = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    loss_one, n_one, _ = accumulate_gradients(model, [(x, y_real)])
    g_one = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert n_mix == n_one == int((y_real >= 0).sum()) and empty_mix == 1
    assert math.isfinite(loss_mix) and abs(loss_mix - loss_one) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_mix, g_one))
    # and the loss is the textbook mean CE over the supervised tokens
    with torch.no_grad():
        ref = F.cross_entropy(model(x).reshape(-1, V).double(), y_real.reshape(-1), ignore_index=-1)
    assert abs(loss_one - ref.item()) < 1e-4


def test_lr_schedule_shape():
    assert lr_multiplier(0.0) == 1.0 and lr_multiplier(0.5) == 1.0
    assert abs(lr_multiplier(0.75) - 0.5) < 1e-9 and abs(lr_multiplier(1.0)) < 1e-9

# -----------------------------------------------------------------------------
# Identity conversations

def test_identity_task_reads_what_gen_identity_wrote(picochat_home):
    # reading the mixture never generates data: without the file the error names the stage that writes it
    with pytest.raises(FileNotFoundError, match="picochat gen-identity"):
        make_task("identity", "train")
    assert not (picochat_home / "identity_conversations.jsonl").exists()
    assert gen_identity.main(["--num", "12"]) == 0
    assert len(make_task("identity", "train")) == 12

def test_gen_identity_templates(tmp_path, picochat_home):
    out = tmp_path / "id.jsonl"
    assert gen_identity.main(["--num", "300", "--output", str(out), "--seed", "1"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 300 and len(set(lines)) == 300           # distinct
    task = CustomJSON(out)                                          # loadable by SFT
    text = " ".join(m["content"] for c in task for m in c["messages"])
    assert "picochat" in text
    firsts = {c["messages"][0]["content"] for c in task}
    assert len(firsts) > 100                                        # diverse openings
    assert len({len(c["messages"]) for c in task}) >= 3             # several conversation shapes
    for c in task:
        assert gen_identity.validate_conversation(c["messages"]) is None
    out2 = tmp_path / "id2.jsonl"
    gen_identity.main(["--num", "300", "--output", str(out2), "--seed", "1"])
    assert out2.read_text() == out.read_text()                      # seeded
    # the knowledge file drives the content
    kb = tmp_path / "kb.md"
    kb.write_text("name: zorbot\ncreator: the zorb lab\n## identity\nQ: Who are you?\n- I am zorbot, a tiny model.\n")
    out3 = tmp_path / "id3.jsonl"
    gen_identity.main(["--num", "20", "--output", str(out3), "--knowledge", str(kb)])
    body = out3.read_text()
    assert "zorbot" in body and "picochat" not in body
    kb.write_text("## identity\n- fact without a name line\n")
    with pytest.raises(ValueError, match="name"):
        gen_identity.load_knowledge(kb)


def test_validate_conversation():
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I am picochat."}]
    assert gen_identity.validate_conversation(ok) is None
    assert gen_identity.validate_conversation(ok[:1])
    assert gen_identity.validate_conversation([ok[1], ok[0]])
    assert gen_identity.validate_conversation([ok[0], {"role": "assistant", "content": "  "}])
    assert gen_identity.validate_conversation([ok[0], {"role": "assistant", "content": "日本語の返事です"}])
    assert gen_identity.validate_conversation([ok[0], {"role": "assistant", "content": "x" * 5000}])


class _FakeChatAPI(BaseHTTPRequestHandler):
    """OpenAI-compatible /chat/completions returning canned conversations, every third one invalid."""
    calls = 0
    auth = []
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _FakeChatAPI.lock:
            _FakeChatAPI.calls += 1
            n = _FakeChatAPI.calls
            _FakeChatAPI.auth.append(self.headers.get("Authorization"))
        assert body["model"] == "fake-model" and body["messages"][0]["role"] == "system"
        if n % 3 == 0:
            content = json.dumps({"messages": [{"role": "assistant", "content": "I speak first, wrongly."}]})
        elif n % 3 == 1:
            content = json.dumps({"messages": [{"role": "user", "content": f"who are you? ({n})"},
                                               {"role": "assistant", "content": "I am picochat."}]})
        else:
            content = "```json\n" + json.dumps([{"role": "user", "content": f"name? ({n})"},
                                                {"role": "assistant", "content": "picochat."}]) + "\n```"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_gen_identity_api_path(tmp_path, picochat_home, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChatAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "api.jsonl"
        rc = gen_identity.main(["--num", "6", "--output", str(out), "--api-base",
                                f"http://127.0.0.1:{server.server_address[1]}/v1", "--api-key", "sk-test",
                                "--model", "fake-model", "--workers", "1", "--retries", "1"])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0
    convs = CustomJSON(out).conversations
    # 6 conversations: calls 1,2 ok; 3 invalid -> retry 4 ok; 5 ok; 6 invalid -> retry 7 ok; 8 ok
    assert len(convs) == 6 and _FakeChatAPI.calls == 8
    assert all(a == "Bearer sk-test" for a in _FakeChatAPI.auth)
    assert all(c[0]["role"] == "user" for c in convs)
    assert "6/6 valid conversations; 2 invalid attempts, 0 dropped" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Tiny end-to-end on CPU: base checkpoint -> chat-sft -> chat-rl -> chat-eval

def test_end_to_end_cpu(tmp_path, picochat_home, tiny_tokenizer, monkeypatch, capsys):
    from picochat import checkpoint
    from picochat.stages import chat_sft, chat_rl, chat_eval
    mirror = make_tiny_mirror(tmp_path / "mirror")
    fetch.set_mirror(None)
    monkeypatch.setenv("PICOCHAT_MIRROR", str(mirror))
    tiny_tokenizer.save(picochat_home / "tokenizer")

    save_tiny_base(tiny_tokenizer)

    # SFT: a small repetitive mixture so the loss must fall within a few steps
    rc = chat_sft.main(["--device-type", "cpu", "--num-iterations", "12", "--device-batch-size", "2",
                        "--total-batch-size", "256", "--mixture", "simplespelling@4:2", "--val-mixture", "gsm8k@2", "--eval-every", "6",
                        "--eval-tokens", "256", "--chatcore-every", "12", "--chatcore-max-sample", "1",
                        "--chatcore-max-new-tokens", "8", "--save-every", "6", "--init-lr-frac", "1.0"])
    assert rc == 0
    sft_dir = checkpoint.checkpoint_dir("sft", "d2")
    assert checkpoint.find_last_step(sft_dir) == 12
    rows = checkpoint.read_metrics(sft_dir)
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses) == 12 and all(math.isfinite(l) for l in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert any("val_bpb" in r and math.isfinite(r["val_bpb"]) for r in rows)
    core_rows = [r for r in rows if "chatcore_metric" in r]
    assert core_rows and core_rows[-1]["step"] == 12
    sft_meta = checkpoint.read_meta(sft_dir, 12)
    assert sft_meta["model_config"]["window_pattern"] == "L"     # SFT keeps the base run's window pattern
    assert sft_meta["run"]["loader"]["ranks"][0]["consumed"] > 0
    assert sft_meta["run"]["parent"] == {"source": "base", "model_tag": "d2", "step": 0}

    # exact resume: continuing from step 6 reproduces the step-12 weights bit for bit
    w12 = checkpoint.load_state(sft_dir, 12, "cpu")[0]
    checkpoint.delete_checkpoint(sft_dir, 12)
    rc = chat_sft.main(["--device-type", "cpu", "--num-iterations", "12", "--device-batch-size", "2",
                        "--total-batch-size", "256", "--mixture", "simplespelling@4:2",
                        "--val-mixture", "gsm8k@2", "--eval-every", "0", "--chatcore-every", "0",
                        "--save-every", "6", "--init-lr-frac", "1.0", "--resume", "auto"])
    assert rc == 0
    w12b = checkpoint.load_state(sft_dir, 12, "cpu")[0]
    assert all(torch.equal(w12[k], w12b[k]) for k in w12)

    # RL: two steps of GRPO on GSM8K
    rc = chat_rl.main(["--device-type", "cpu", "--num-iterations", "2", "--examples-per-step", "1",
                       "--num-samples", "2", "--device-batch-size", "2", "--max-new-tokens", "8",
                       "--eval-every", "2", "--eval-examples", "2", "--eval-samples", "2", "--save-every", "-1"])
    assert rc == 0
    rl_dir = checkpoint.checkpoint_dir("rl", "d2")
    assert checkpoint.find_last_step(rl_dir) == 2
    rl_rows = checkpoint.read_metrics(rl_dir)
    assert [r["step"] for r in rl_rows if "reward" in r] == [0, 1]
    assert any("pass@2" in r for r in rl_rows)

    # eval: every task on a handful of problems
    capsys.readouterr()
    rc = chat_eval.main(["-i", "rl", "-x", "3", "-m", "8", "-b", "2", "--device-type", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ChatCORE" in out and ("sandbox: kernel-enforced" in out or "UNSAFE sandbox" in out)
    result = json.loads((picochat_home / "chat_eval" / "rl_d2_2.json").read_text())
    res = result["results"]
    assert set(res) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    assert all(0.0 <= v <= 1.0 for v in res.values())
    expected = sum((res[t] - BASELINES[t]) / (1 - BASELINES[t]) for t in res) / len(res)
    assert abs(result["chatcore"] - expected) < 1e-9
    # a subset of tasks: no ChatCORE
    chat_eval.main(["-i", "rl", "-a", "ARC-Easy|GSM8K", "-x", "2", "-m", "4", "--device-type", "cpu"])
    assert json.loads((picochat_home / "chat_eval" / "rl_d2_2.json").read_text())["chatcore"] is None

# -----------------------------------------------------------------------------
# Categorical evaluation reads the answer position of each right-padded row

class _RiggedModel(torch.nn.Module):
    """Logits favour letter B only where the input token is <|assistant_start|> (the answer position of a
    completion prompt), and letter A everywhere else (padding, inside the prompt)."""
    def __init__(self, tok, seq_len=4096):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"sequence_len": seq_len})()
        self.V = tok.get_vocab_size()
        self.a, self.b = tok.encode("A")[0], tok.encode("B")[0]
        self.ast = tok.encode_special("<|assistant_start|>")
    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.V)
        at = idx == self.ast
        logits[..., self.a] = torch.where(at, 0.0, 5.0)
        logits[..., self.b] = torch.where(at, 5.0, 0.0)
        return logits


def test_categorical_uses_answer_position(tmp_path, picochat_home, tiny_tokenizer, monkeypatch):
    from picochat.task_eval import run_categorical
    from picochat.tasks import MMLU
    from test_tasks import MMLU_ROWS
    mirror = make_tiny_mirror(tmp_path / "mirror")
    fetch.set_mirror(None)
    monkeypatch.setenv("PICOCHAT_MIRROR", str(mirror))
    task = MMLU("all", "test")
    want = sum("ABCD"[r["answer"]] == "B" for r in MMLU_ROWS)
    for bs in (1, 2, 3):   # different paddings, same answer
        correct, total = run_categorical(_RiggedModel(tiny_tokenizer), tiny_tokenizer, task, batch_size=bs)
        assert (correct, total) == (want, len(MMLU_ROWS))
    # prompts longer than the context are cut to BOS + tail, keeping the answer position
    correct, total = run_categorical(_RiggedModel(tiny_tokenizer, seq_len=16), tiny_tokenizer, task, batch_size=2)
    assert (correct, total) == (want, len(MMLU_ROWS))

# -----------------------------------------------------------------------------
# Exact resume of chat-sft and chat-rl: SIGKILL mid-run, --resume auto, and the losses, rewards and weights are
# bitwise those of the uninterrupted run (both run as processes with the same settings)

SFT_FLAGS = ["--device-type", "cpu", "--num-iterations", "10", "--device-batch-size", "2", "--total-batch-size", "256",
             "--mixture", "simplespelling@8:2", "--val-mixture", "gsm8k@2", "--eval-every", "0",
             "--chatcore-every", "0", "--save-every", "4", "--init-lr-frac", "1.0"]
RL_FLAGS = ["--device-type", "cpu", "--num-iterations", "4", "--examples-per-step", "1", "--num-samples", "2",
            "--device-batch-size", "2", "--max-new-tokens", "8", "--temperature", "1.0", "--eval-every", "0",
            "--save-every", "2", "--init-lr-frac", "1.0"]


def _stage(home, mirror, stage, flags, kill_at=None):
    env = dict(os.environ, PICOCHAT_HOME=str(home), PICOCHAT_MIRROR=str(mirror), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    env.pop("PICOCHAT_FAULT_SIGKILL", None)
    if kill_at is not None:
        env["PICOCHAT_FAULT_SIGKILL"] = str(kill_at)
    p = subprocess.run([sys.executable, "-m", "picochat", stage, *flags], env=env, capture_output=True, text=True,
                       cwd=REPO)
    return p.stdout + p.stderr, p.returncode


@pytest.mark.slow
def test_sft_and_rl_kill_and_resume_are_bitwise_exact(tmp_path, tiny_tokenizer, monkeypatch):
    from picochat import checkpoint
    mirror = make_tiny_mirror(tmp_path / "mirror")
    homes = {}
    for name in ("ref", "run"):
        home = homes[name] = tmp_path / name
        monkeypatch.setenv("PICOCHAT_HOME", str(home))
        tiny_tokenizer.save(home / "tokenizer")
        save_tiny_base(tiny_tokenizer)

    def final(home, source, key, steps):
        d = home / "checkpoints" / source / "d2"
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r[key]) for r in rows if key in r], checkpoint.load_state(d, steps, "cpu")[0]

    for stage, flags, kill_at, key, steps, source in [("chat-sft", SFT_FLAGS, 6, "train_loss", 10, "sft"),
                                                       ("chat-rl", RL_FLAGS, 3, "reward", 4, "rl")]:
        out, rc = _stage(homes["ref"], mirror, stage, flags)
        assert rc == 0, out
        out, rc = _stage(homes["run"], mirror, stage, flags, kill_at=kill_at)
        assert rc == -signal.SIGKILL, out
        out, rc = _stage(homes["run"], mirror, stage, flags)  # a fresh run must not mix with the killed one's
        assert rc == 2 and "already holds checkpoints" in out and "--resume auto" in out, out
        out, rc = _stage(homes["run"], mirror, stage, [*flags, "--resume", "auto"])
        assert rc == 0 and f"resuming from step {kill_at - kill_at % int(flags[flags.index('--save-every') + 1])}" in out, out
        (rows_ref, w_ref), (rows_run, w_run) = final(homes["ref"], source, key, steps), final(homes["run"], source, key, steps)
        assert [s for s, _ in rows_ref] == list(range(steps))
        assert rows_ref == rows_run, f"{stage}: {rows_ref} != {rows_run}"  # floats compared exactly
        assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref), f"{stage}: final weights differ"
