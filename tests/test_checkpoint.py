"""Checkpoint save/discover/rotate/load: atomicity under crashes, rotation, bf16 -> CPU load, resume errors."""
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import picochat.checkpoint as ckpt
from picochat.checkpoint import (save_checkpoint, find_last_step, load_state, load_optimizer_state,
                                 check_resume_compat, get_rng_state, set_rng_state, list_steps,
                                 truncate_metrics, append_metrics, read_metrics)


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(10, 4).to(dtype)
        self.proj = nn.Linear(4, 3, bias=False)


class FakeOpt:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.state = {"g0.exp_avg": torch.randn(3, 4, generator=g), "g0.step": torch.tensor(7.0)}

    def shard_state_dict(self):
        return self.state


@pytest.fixture
def ck(tmp_path):
    return tmp_path / "ckpts"


def _save(d, step, model=None, opt=None, n_layer=1, **kw):
    save_checkpoint(d, step, model or Tiny(), opt or FakeOpt(), {"model_config": {"n_layer": n_layer}}, **kw)


def test_roundtrip_and_layout(ck, picochat_home):
    m, opt = Tiny(), FakeOpt(3)
    save_checkpoint(ck, 5, m, opt, {"model_config": {"n_layer": 1}, "loop_state": {"x": 0.1}})
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["meta_000005.json", "model_000005.safetensors", "optim_000005_rank0.safetensors"]
    state, meta = load_state(ck, None, "cpu")
    assert meta["step"] == 5 and meta["world_size"] == 1 and meta["loop_state"] == {"x": 0.1}
    assert "picochat_version" in meta and "tokenizer" in meta
    for k, v in m.state_dict().items():
        assert torch.equal(state[k], v)
    o = load_optimizer_state(ck, 5, 0)
    assert torch.equal(o["g0.exp_avg"], opt.state["g0.exp_avg"])


def test_compiled_prefix_is_stripped(ck, picochat_home):
    class Wrapper(nn.Module):  # what torch.compile returns: the real module under _orig_mod
        def __init__(self):
            super().__init__()
            self._orig_mod = Tiny()
    w = Wrapper()
    _save(ck, 1, model=w)
    state, _ = load_state(ck, 1, "cpu")
    assert set(state) == {"emb.weight", "proj.weight"}


def test_crash_mid_save_is_never_picked(ck, picochat_home, monkeypatch):
    _save(ck, 2)
    # crash while writing the optimizer shard of step 4: model file is there, meta is not
    real = ckpt._save_tensors
    def crash(path, tensors):
        if "optim_000004" in path.name:
            raise KeyboardInterrupt("simulated kill")
        real(path, tensors)
    monkeypatch.setattr(ckpt, "_save_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, 4)
    monkeypatch.undo()
    assert (ck / "model_000004.safetensors").exists()
    assert not list(ck.glob("*.tmp"))  # temp files were cleaned up
    assert find_last_step(ck) == 2

    # a meta whose model file is truncated (e.g. disk full on a non-atomic copy) is not complete either
    _save(ck, 6)
    p = ck / "model_000006.safetensors"
    p.write_bytes(p.read_bytes()[:-5])
    assert find_last_step(ck) == 2
    # garbage meta
    _save(ck, 8)
    (ck / "meta_000008.json").write_text('{"step": 8, "model_conf')
    assert find_last_step(ck) == 2
    # a multi-rank checkpoint missing rank 1's shard
    _save(ck, 10)
    meta = json.loads((ck / "meta_000010.json").read_text())
    meta["world_size"] = 2
    (ck / "meta_000010.json").write_text(json.dumps(meta))
    assert find_last_step(ck) == 2
    (ck / "optim_000010_rank1.safetensors").write_bytes((ck / "optim_000010_rank0.safetensors").read_bytes())
    assert find_last_step(ck) == 10


def test_steps_compare_as_integers(ck, picochat_home):
    _save(ck, 999999)
    _save(ck, 1000000)  # 7 digits: string order would pick 999999
    assert find_last_step(ck) == 1000000
    assert find_last_step(ck / "nothing") is None


def test_keep_last_rotation(ck, picochat_home):
    for s in (1, 2, 3, 4, 5):
        _save(ck, s, keep_last=2)
    assert list_steps(ck) == [4, 5]
    assert sorted(p.name for p in ck.glob("model_*")) == ["model_000004.safetensors", "model_000005.safetensors"]
    assert sorted(p.name for p in ck.glob("optim_*")) == ["optim_000004_rank0.safetensors",
                                                                 "optim_000005_rank0.safetensors"]


def test_bf16_checkpoint_loads_on_cpu_as_fp32(ck, picochat_home):
    m = Tiny(dtype=torch.bfloat16)
    _save(ck, 3, model=m)
    state, _ = load_state(ck, 3, "cpu")
    assert state["emb.weight"].dtype == torch.float32
    assert torch.equal(state["emb.weight"], m.emb.weight.detach().float())
    # and loads into an fp32 module on CPU
    fresh = Tiny()
    fresh.load_state_dict(state, strict=True)


def test_resume_mismatch_errors_name_the_difference():
    meta = {"model_config": {"n_layer": 4, "n_embd": 256}, "world_size": 8}
    check_resume_compat(meta, {"n_layer": 4, "n_embd": 256}, 8)
    with pytest.raises(ValueError, match=r"n_embd: checkpoint=256 vs now=384"):
        check_resume_compat(meta, {"n_layer": 4, "n_embd": 384}, 8)
    with pytest.raises(ValueError, match=r"world size 8 .* world size 2"):
        check_resume_compat(meta, {"n_layer": 4, "n_embd": 256}, 2)


def test_rng_state_json_roundtrip():
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    state = json.loads(json.dumps(get_rng_state()))  # must survive JSON
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_metrics_truncation(tmp_path):
    for s in range(6):
        append_metrics(tmp_path, {"step": s, "loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line of a killed run
    truncate_metrics(tmp_path, 4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_load_model_from_bf16_gpt_checkpoint_on_cpu(picochat_home, tiny_tokenizer):
    """A checkpoint written by a bf16-compute run (embeddings stored in bf16, as on CUDA) loads on CPU as an fp32
    model whose logits match the saved weights upcast."""
    from picochat.gpt import build_model, config_from_depth
    from picochat.checkpoint import checkpoint_dir, load_model
    tiny_tokenizer.save(picochat_home / "tokenizer")
    cfg = config_from_depth(2, tiny_tokenizer.get_vocab_size(), aspect_ratio=32, head_dim=16, max_seq_len=32,
                            window_pattern="L")
    torch.manual_seed(0)
    m16 = build_model(cfg, "cpu", torch.bfloat16)
    assert m16.transformer.wte.weight.dtype == torch.bfloat16
    d = checkpoint_dir("base", "d2")
    save_checkpoint(d, 3, m16, None, {"model_config": cfg.to_dict()})
    model, tok, meta = load_model("base", "cpu")  # largest tag, last step
    assert meta["step"] == 3 and not model.training
    assert model.transformer.wte.weight.dtype == torch.float32
    ref = build_model(cfg, "cpu", torch.float32)
    ref.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_find_largest_model_prefers_complete_runs(picochat_home):
    from picochat.checkpoint import find_largest_model
    stage = picochat_home / "checkpoints" / "base"
    _save(stage / "d4", 2, n_layer=4)
    _save(stage / "wide", 2, n_layer=12)  # the depth comes from the meta, whatever the tag is called
    _save(stage / "d6", 2, n_layer=6)
    (stage / "d26").mkdir()  # a run that crashed before its first complete checkpoint
    (stage / "d26" / "model_000010.safetensors").write_bytes(b"partial")
    assert find_largest_model(stage) == "wide"


def _garble_same_size(path):
    """Overwrite the last 16 bytes (tensor data, not the header) with different bytes: same size, still parses."""
    data = bytearray(path.read_bytes())
    data[-16:] = bytes((b ^ 0xFF) for b in data[-16:])
    path.write_bytes(bytes(data))


def test_sha256_recorded_verified_and_corrupt_steps_skipped(ck, picochat_home, monkeypatch):
    _save(ck, 2)
    _save(ck, 4, model=Tiny(), opt=FakeOpt(1))
    meta = json.loads((ck / "meta_000004.json").read_text())
    assert set(meta["sha256"]) == {"model_000004.safetensors", "optim_000004_rank0.safetensors"}
    assert ckpt.corrupt_files(ck, 4) == [] and ckpt.find_last_good_step(ck, optimizer=True) == 4
    _garble_same_size(ck / "model_000004.safetensors")
    assert ckpt.is_complete(ck, 4)  # the cheap structural check cannot see it ...
    assert ckpt.corrupt_files(ck, 4) == ["model_000004.safetensors"]  # ... the hash does
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"step 4 .*model_000004\.safetensors.*complete: \[2\]"):
        load_state(ck, 4, "cpu")  # an explicit step fails clearly
    warnings = []
    monkeypatch.setattr(ckpt.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    state, meta = load_state(ck, None, "cpu")  # "the last one" falls back, loudly
    assert meta["step"] == 2 and "CORRUPT checkpoint skipped: step 4" in warnings[0]
    # an optimizer shard damaged: loading the model is fine, resuming is not
    _save(ck, 6)
    _garble_same_size(ck / "optim_000006_rank0.safetensors")
    assert ckpt.find_last_good_step(ck) == 6 and ckpt.find_last_good_step(ck, optimizer=True) == 2
    with pytest.raises(ckpt.CorruptCheckpoint, match="optim_000006_rank0"):
        ckpt.verify_checkpoint(ck, 6)


def test_checkpoints_without_hashes_still_load(ck, picochat_home):
    _save(ck, 3)
    meta = json.loads((ck / "meta_000003.json").read_text())
    del meta["sha256"]  # written before hashes were recorded
    (ck / "meta_000003.json").write_text(json.dumps(meta))
    assert load_state(ck, 3, "cpu")[1]["step"] == 3


def test_stray_temp_files_are_removed_at_start(ck, picochat_home):
    from picochat.train_loop import resume_step
    _save(ck, 2)
    (ck / "model_000004.safetensors.k3j2h1.tmp").write_bytes(b"half a save")
    (ck / "tokenizer").mkdir(exist_ok=True)
    (ck / "tokenizer" / "tokenizer.json.x1.tmp").write_bytes(b"{")
    assert resume_step("auto", ck) == 2
    assert not list(ck.glob("*.tmp")) and not list(ck.glob("tokenizer/*.tmp"))


def test_weights_that_do_not_fit_the_meta_are_a_clear_error(picochat_home, tiny_tokenizer):
    from picochat.gpt import build_model, config_from_depth
    from picochat.checkpoint import checkpoint_dir, load_model
    tiny_tokenizer.save(picochat_home / "tokenizer")
    cfg = config_from_depth(2, tiny_tokenizer.get_vocab_size(), aspect_ratio=32, head_dim=16, max_seq_len=32,
                            window_pattern="L")
    d = checkpoint_dir("base", "d2")
    save_checkpoint(d, 1, build_model(cfg, "cpu", torch.float32), None, {"model_config": cfg.to_dict()})
    meta = json.loads((d / "meta_000001.json").read_text())
    meta["model_config"]["n_embd"] = 128  # an edited meta: the weights are 64 wide
    meta["model_config"]["n_head"] = 8
    meta["model_config"]["n_kv_head"] = 8
    (d / "meta_000001.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"do not match the model its meta describes .*transformer\..*weights \(.*64.*\) vs model"):
        load_model("base", "cpu", step=1)


def test_disk_full_during_a_save_is_one_line_and_keeps_the_earlier_checkpoints(ck, picochat_home, monkeypatch,
                                                                                capsys):
    import errno
    _save(ck, 2)
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}
    real = ckpt.save_file
    def fills_the_disk(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # the write got half way
            f.truncate(f.seek(0, 2) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    with pytest.raises(ckpt.DiskFull, match=r"no space left to write .*model_000004.*earlier checkpoints .* intact"):
        _save(ck, 4)
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before  # nothing new, nothing lost
    assert find_last_step(ck) == 2
    # through the CLI: one line and its own exit code, no traceback
    from picochat import __main__ as cli
    from picochat.stages import report
    monkeypatch.setattr(report, "main", lambda argv: _save(ck, 6))
    assert cli.main(["report"]) == ckpt.DiskFull.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([l for l in err.splitlines() if "error:" in l]) == 1
