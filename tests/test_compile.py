"""torch.compile can't rot: the model (forward + backward, fullgraph: no graph breaks) and the optimizer's fused
updates (0-D tensor hyperparameters, as on CUDA) compile with inductor on CPU and match eager. On CUDA these are
the default paths; here they run at tiny size on every CI run."""
import shutil

import pytest
import torch

from picochat import optim
from picochat.gpt import GPTConfig, build_model
from picochat.optim import MuonAdamW

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor on CPU needs a C++ compiler (apt-get install g++); none found on PATH")]


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # every path active: zero-initialised projections and smear would hide mistakes
        model.smear_lambda.fill_(0.5)
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def test_model_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (2, 64), generator=gen), torch.randint(0, 300, (2, 64), generator=gen)
    eager, compiled_src = _tiny(), _tiny()
    loss_eager = eager(x, y)
    loss_eager.backward()
    compiled = torch.compile(compiled_src, fullgraph=True, dynamic=False)  # a graph break would raise here
    loss_compiled = compiled(x, y)
    loss_compiled.backward()
    # fp32, the same math fused differently (and the plain ops instead of the eager CPU kernels)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled_src.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)  # logits (inference graph)


def _groups(params):
    emb, w1, w2, w3 = params
    return [dict(kind="adamw", params=[emb], lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
            dict(kind="muon", params=[w1, w2, w3], lr=0.02, momentum=0.95, beta2=0.9, ns_steps=5, weight_decay=0.1)]


def test_optimizer_updates_compile_and_match_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    optim._compiled.clear()
    torch.manual_seed(0)
    shapes = [(50, 16), (32, 16), (32, 16), (32, 16)]
    init = [torch.randn(s) for s in shapes]
    runs = {}
    for compiled in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = MuonAdamW(_groups(params), compile_updates=compiled)
        gen = torch.Generator().manual_seed(5)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            for g in opt.param_groups:  # a schedule: new values every step must not recompile
                g["lr"] = g["initial_lr"] * (1 - step / 4)
            opt.step()
        runs[compiled] = params
    assert set(optim._compiled) == {optim.adamw_update, optim.muon_update}
    for a, b in zip(runs[False], runs[True]):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-4, atol=1e-5)
    # one graph per update function despite four different learning rates
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 2, f"expected 2 compiled graphs (adamw, muon), got {frames}: a hyperparameter recompiled"
