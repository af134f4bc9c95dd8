"""/v1/completions (raw text, logprobs, echo), logprobs on chat completions, /v1/models' context length and the
Prometheus /metrics, through a real uvicorn server and the official openai client. Expected values come from the
model and Engine called directly (log_softmax of one forward pass; greedy decoding), never from the server."""
import math

import httpx
import pytest
import torch
import torch.nn.functional as F

from picochat.stages.serve import create_app
from picochat.server_thread import ServerThread
from test_serve import build_tiny_model

MODEL = "picochat-tiny"


@pytest.fixture(scope="module")
def stack(tiny_tokenizer):
    from picochat.engine import Engine
    return Engine(build_tiny_model(tiny_tokenizer), tiny_tokenizer), tiny_tokenizer


@pytest.fixture(scope="module")
def srv(stack):
    engine, tok = stack
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL)) as s:
        yield s


@pytest.fixture
def client(srv):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def reference_logprobs(model, ids):
    """log p(ids[k] | ids[:k]) for k >= 1, and the full log-distributions, straight from the model."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return [logp[k - 1, ids[k]].item() for k in range(1, len(ids))], logp


def test_echo_logprobs_score_the_prompt_like_the_model(stack, client):
    engine, tok = stack
    bos = tok.get_bos_token_id()
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0)
    ch = r.choices[0]
    assert ch.text == prompt and ch.finish_reason == "length"
    ids = tok.encode(prompt)
    want, logp = reference_logprobs(engine.model, [bos] + ids)  # conditioned on BOS, like every document
    lp = ch.logprobs
    assert "".join(lp.tokens) == prompt and len(lp.token_logprobs) == len(ids)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want)) < 1e-5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(ids))]
    for k, top in enumerate(lp.top_logprobs):  # the best 3 alternatives, best first, values from the same pass
        best = logp[k].topk(3).values.tolist()
        assert len(top) <= 3 and abs(max(top.values()) - best[0]) < 1e-6
    assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == 0


def test_greedy_completion_matches_the_engine_and_the_stream(stack, client):
    engine, tok = stack
    bos = tok.get_bos_token_id()
    prompt = "It was the best of times"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    ids = [bos] + tok.encode(prompt)
    out, _ = engine.generate_batch(ids, num_samples=1, max_tokens=12, temperature=0.0)
    gen = out[0][len(ids):]
    stops = {tok.encode_special("<|assistant_end|>"), bos}
    gen = gen[:next((i for i, t in enumerate(gen) if t in stops), len(gen))]
    text = tok.decode_bytes(gen).decode("utf-8", errors="replace")
    assert r.choices[0].text == text
    lp = r.choices[0].logprobs
    want, _ = reference_logprobs(engine.model, ids + gen)
    assert len(lp.token_logprobs) == len(gen) and max((abs(a - b) for a, b in zip(lp.token_logprobs, want[-len(gen):])),
                                                      default=0) < 1e-5
    # greedy: every chosen token is the top alternative (what lm-eval's is_greedy checks)
    assert all(t == max(top.values()) for t, top in zip(lp.token_logprobs, lp.top_logprobs))
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                                                            temperature=0, stream=True))
    assert streamed == text


def test_token_prompts_batches_and_n(stack, client):
    engine, tok = stack
    bos = tok.get_bos_token_id()
    r = client.completions.create(model=MODEL, prompt=[[10, 20, 30], [bos, 40, 50]], max_tokens=3, temperature=0, n=2,
                                  echo=True, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith(tok.decode([10, 20, 30]))
    # a prompt that starts with BOS is taken as is: its first token has no context, as in OpenAI's API
    assert r.choices[2].logprobs.token_logprobs[0] is None and r.choices[0].logprobs.token_logprobs[0] is not None
    assert r.usage.prompt_tokens == 4 + 3
    # echo gives back each prompt as sent: one token-id list, or each of several strings
    one = client.completions.create(model=MODEL, prompt=[10, 20, 30], max_tokens=1, temperature=0, echo=True)
    assert one.choices[0].text.startswith(tok.decode([10, 20, 30]))
    two = client.completions.create(model=MODEL, prompt=["The cat", "A dog"], max_tokens=1, temperature=0, echo=True)
    assert [c.text[:len(p)] for c, p in zip(two.choices, ["The cat", "A dog"])] == ["The cat", "A dog"]


@pytest.mark.parametrize("body, code", [
    ({"prompt": "x", "logprobs": 21}, "out_of_range"),
    ({"prompt": "x", "logprobs": 2, "stream": True}, "unsupported"),
    ({"prompt": "x", "max_tokens": 0}, "out_of_range"),  # scoring only makes sense with echo
    ({"prompt": [1, 2, 10 ** 9]}, "invalid_value"),
    ({"prompt": []}, "invalid_type"),
    ({"prompt": "x", "suffix": "y"}, "unsupported"),
    ({"prompt": "x", "best_of": 3}, "unsupported"),
    ({"prompt": "word " * 400}, "context_length_exceeded"),
])
def test_completion_errors_name_the_problem(srv, body, code):
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_chat_logprobs(stack, client):
    engine, tok = stack
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content).startswith(r.choices[0].message.content)
    prompt = engine.chat_prompt(messages, 8)
    gen = [tok.encode(c.token)[0] if len(tok.encode(c.token)) == 1 else None for c in content]
    if None not in gen:  # (each token's text re-encodes to itself for this tokenizer's plain tokens)
        want, _ = reference_logprobs(engine.model, prompt + gen)
        assert max(abs(c.logprob - w) for c, w in zip(content, want[-len(gen):])) < 1e-5
    assert all(len(c.top_logprobs) == 2 and c.logprob <= c.top_logprobs[0].logprob + 1e-6 for c in content)


def test_models_report_context_and_metrics_count(srv, client):
    models = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert models["context_length"] == 128 and models["max_model_len"] == 128
    before = httpx.get(srv.url + "/metrics").text
    client.completions.create(model=MODEL, prompt="a b c", max_tokens=4, temperature=0)
    httpx.post(srv.url + "/v1/completions", json={"prompt": []})
    text = httpx.get(srv.url + "/metrics").text
    def value(name, txt):
        rows = [l for l in txt.splitlines() if l.startswith(name + " ") or l.startswith(name + "{")]
        return sum(float(l.rsplit(" ", 1)[1]) for l in rows) if rows else 0.0
    ok = 'picochat_requests_total{endpoint="/v1/completions",status="200"}'
    bad = 'picochat_requests_total{endpoint="/v1/completions",status="400"}'
    assert value(ok, text) == value(ok, before) + 1 and value(bad, text) == value(bad, before) + 1
    assert value("picochat_completion_tokens_total", text) > value("picochat_completion_tokens_total", before)
    assert value("picochat_time_to_first_token_seconds_count", text) >= 1
    assert value('picochat_request_seconds_count{endpoint="/v1/completions"}', text) >= 2
    for gauge in ("picochat_queue_depth", "picochat_active_generations", "picochat_workers"):
        assert any(l.startswith(gauge + " ") for l in text.splitlines()), gauge
    assert math.isclose(value("picochat_workers", text), 1.0)
    httpx.get(srv.url + "/no/such/path")
    assert 'endpoint="other",status="404"' in httpx.get(srv.url + "/metrics").text  # unknown paths pooled
