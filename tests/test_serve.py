"""picochat serve: the OpenAI-compatible API on a tiny random model, through a real uvicorn server on 127.0.0.1.
Expected outputs come from the Engine called directly (greedy, so they are unique), never from the server."""
import json
import time
import concurrent.futures as cf

import httpx
import pytest
import torch

from picochat.stages.serve import create_app, Limits, main as serve_main
from picochat.serving import Row as _Row
from picochat.server_thread import ServerThread

MODEL = "picochat-tiny"

def build_tiny_model(tokenizer, seed=0):
    from picochat.gpt import GPTConfig, build_model
    cfg = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                    n_embd=64, window_pattern="SL")
    torch.manual_seed(seed)
    model = build_model(cfg, torch.device("cpu"))
    model.eval()
    return model

@pytest.fixture(scope="module")
def stack(tiny_tokenizer):
    from picochat.engine import Engine
    model = build_tiny_model(tiny_tokenizer)
    return Engine(model, tiny_tokenizer), tiny_tokenizer

@pytest.fixture(scope="module")
def server(stack):
    """Two workers (two Engines sharing one read-only model) so that requests really run concurrently."""
    engine, tok = stack
    from picochat.engine import Engine
    workers = [(engine, tok, "cpu"), (Engine(engine.model, tok), tok, "cpu")]
    app = create_app(workers, model_name=MODEL, default_max_tokens=16)
    with ServerThread(app) as srv:
        yield srv

def expected(stack, messages, max_tokens):
    """(prompt_len, completion ids, text, finish_reason) of greedy decoding, straight from the Engine."""
    engine, tok = stack
    prompt = engine.chat_prompt(messages, max_tokens)
    results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0)
    ids = results[0][len(prompt):]
    budget = min(max_tokens, engine.model.config.sequence_len - len(prompt))
    text = tok.decode_bytes(ids).decode("utf-8", errors="replace")
    return len(prompt), ids, text, ("length" if len(ids) >= budget else "stop")

def sse_events(lines):
    """Parse an SSE body into a list of JSON objects / the string "[DONE]"."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events

def check_stream(events, n=1):
    """Well-formed OpenAI stream: role first, one finish_reason per choice, [DONE] last. Returns (texts, reasons)."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [e for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    texts, reasons = [""] * n, [None] * n
    seen_role = [False] * n
    for c in chunks:
        for ch in c["choices"]:
            i = ch["index"]
            if "role" in ch["delta"]:
                assert not seen_role[i] and texts[i] == "" and ch["delta"]["role"] == "assistant"
                seen_role[i] = True
            assert seen_role[i], "content before the role chunk"
            assert reasons[i] is None, "chunk after finish_reason"
            texts[i] += ch["delta"].get("content") or ""
            reasons[i] = ch["finish_reason"]
    assert all(r in ("stop", "length") for r in reasons)
    return texts, reasons

# -----------------------------------------------------------------------------
# The official OpenAI client

def test_openai_client_non_stream(server, stack):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is 6*7?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    n_prompt, ids, text, reason = expected(stack, messages, 12)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(ids))
    assert r.usage.total_tokens == n_prompt + len(ids)

def test_openai_client_stream(server, stack):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    n_prompt, ids, text, reason = expected(stack, messages, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    usage = chunks[-1].usage  # include_usage: a last chunk with no choices carries the usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == n_prompt and usage.completion_tokens == len(ids)

def test_system_message_merges_into_first_user_turn(server, stack):
    """A system message is rendered exactly as "system\\n\\nuser" in the first user turn."""
    engine, tok = stack
    merged = [{"role": "user", "content": "Be brief.\n\nHi"}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == len(engine.chat_prompt(merged, 6))
    assert r.json()["choices"][0]["message"]["content"] == expected(stack, merged, 6)[2]

def test_long_conversation_is_refused_or_truncated(server, stack):
    """Far beyond the tiny model's 128-token context: by default a 400 context_length_exceeded (as OpenAI's API),
    with truncate_prompts the engine's context policy trims it and the server answers; never a crash."""
    msgs = []
    for i in range(40):
        msgs += [{"role": "user", "content": f"question number {i} about the quick brown fox"},
                 {"role": "assistant", "content": f"answer {i}: it was the best of times"}]
    msgs.append({"role": "user", "content": "and the last one?"})
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "128 tokens" in r.json()["error"]["message"]
    short = [{"role": "user", "content": "hi"}]  # what fits still runs
    assert httpx.post(server.url + "/v1/chat/completions", json={"messages": short, "max_tokens": 8}).status_code == 200
    engine, tok = stack
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL, truncate_prompts=True)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 8}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 128

def test_stop_strings(server, stack):
    """The reply ends right before the first occurrence of a stop string (also when it spans tokens)."""
    messages = [{"role": "user", "content": "tell me a story"}]
    _, _, text, _ = expected(stack, messages, 16)
    assert len(text) >= 6
    stop = text[3:6]
    cut = text[:text.find(stop)]
    for stream in (False, True):
        body = {"messages": messages, "max_tokens": 16, "temperature": 0, "stop": [stop, "\x00never"],
                "stream": stream}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200
        if stream:
            texts, reasons = check_stream(sse_events(r.text.split("\n")))
            content, reason = texts[0], reasons[0]
        else:
            content, reason = r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
        assert (content, reason) == (cut, "stop")

class _FakeStreamer:
    """Each 'token' is a str; lets us test stop-string hold-back independently of the tokenizer."""
    def add(self, t):
        return t
    def finish(self):
        return ""

def test_stop_string_holdback_unit():
    row = _Row(_FakeStreamer(), ["END", "xyz"])
    out = [row.add(p) for p in ["hello E", "N", "D and more"]]
    assert "".join(out) == "hello " and row.done and row.finish_reason == "stop"
    row = _Row(_FakeStreamer(), ["END"])
    out = [row.add(p) for p in ["abcEN", "q"]] + [row.finish("length")]
    assert "".join(out) == "abcENq" and row.finish_reason == "length"

def test_n_samples(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0, "n": 3,
            "seed": 1}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    r2 = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r2.json()["choices"] == r.json()["choices"]  # same seed, same samples
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
    texts, _ = check_stream(sse_events(r.text.split("\n")), n=3)
    assert len(texts) == 3

# -----------------------------------------------------------------------------
# Other endpoints

def test_models_health_stats_and_ui(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(server.url + f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert httpx.get(server.url + "/v1/models/nope").status_code == 404
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["ready"] is True and health["model"] == MODEL
    before = httpx.get(server.url + "/stats").json()
    httpx.post(server.url + "/v1/chat/completions", timeout=30,
               json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "temperature": 0})
    stats = httpx.get(server.url + "/stats").json()
    assert (stats["total_workers"], stats["busy_workers"], stats["available_workers"]) == (2, 0, 2)
    assert stats["requests_served"] == before["requests_served"] + 1
    assert 1 <= stats["tokens_generated"] - before["tokens_generated"] <= 5
    assert stats["uptime_seconds"] > 0
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    # nothing from elsewhere: every script and stylesheet is served by picochat itself (offline, no CDN)
    import re
    refs = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("/static/") for r in refs), refs
    assert all(httpx.get(server.url + r).status_code == 200 for r in refs)
    assert "@import" not in html and "http://" not in html and "https://" not in html

def test_simple_ui_protocol(server, stack):
    """nanochat's original protocol on POST /chat/completions: {"token"} events then {"done": true}."""
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(server.url + "/chat/completions", json={"messages": messages, "temperature": 0,
                                                           "max_tokens": 8}, timeout=30)
    events = sse_events(r.text.split("\n"))
    assert events[-1] == {"done": True}
    assert "".join(e["token"] for e in events[:-1]) == expected(stack, messages, 8)[2]

def test_no_model_loaded():
    app = create_app([], model_name=MODEL)
    with ServerThread(app) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["ready"] is False
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"

def test_cors_off_by_default_and_on_when_asked(stack):
    from fastapi.testclient import TestClient
    engine, tok = stack
    hdr = {"Origin": "http://example.com"}
    with TestClient(create_app([(engine, tok, "cpu")])) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers=hdr).headers
    with TestClient(create_app([(engine, tok, "cpu")], cors_origins=["http://example.com"])) as c:
        assert c.get("/health", headers=hdr).headers["access-control-allow-origin"] == "http://example.com"

# -----------------------------------------------------------------------------
# Load: 16 concurrent streams, never mixed

def test_16_concurrent_streams(server, stack):
    prompts = [f"prompt {i}: " + "the quick brown fox "[: i + 3] for i in range(16)]
    refs = [expected(stack, [{"role": "user", "content": p}], 12) for p in prompts]

    def one(i):
        body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 12, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return sse_events(list(r.iter_lines()))

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for events, (n_prompt, ids, text, reason) in zip(results, refs):
        texts, reasons = check_stream(events)
        assert (texts[0], reasons[0]) == (text, reason)  # not mixed with any other stream
        assert events[-2]["usage"]["completion_tokens"] == len(ids)
    stats = httpx.get(server.url + "/stats").json()
    assert stats["available_workers"] == 2 and stats["waiting_requests"] == 0

# -----------------------------------------------------------------------------
# Validation

def _malformed(limits):
    u = lambda c: {"role": "user", "content": c}
    ok = [u("hi")]
    return [
        ("not json", b"{not json"),
        ("truncated json", b'{"messages": [{"role": "user", "content": "hi"}'),
        ("NaN literal", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        ("json array", []),
        ("json string", "hello"),
        ("no messages", {"model": MODEL}),
        ("messages null", {"messages": None}),
        ("messages object", {"messages": {"role": "user", "content": "hi"}}),
        ("empty messages", {"messages": []}),
        ("message not object", {"messages": ["hi"]}),
        ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}),
        ("tool role", {"messages": [{"role": "tool", "content": "hi"}]}),
        ("missing role", {"messages": [{"content": "hi"}]}),
        ("missing content", {"messages": [{"role": "user"}]}),
        ("empty content", {"messages": [u("")]}),
        ("whitespace content", {"messages": [u("  \n ")]}),
        ("content number", {"messages": [u(42)]}),
        ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
        ("oversized content", {"messages": [u("x" * (limits.max_message_chars + 1))]}),
        ("too many messages", {"messages": [u("a"), {"role": "assistant", "content": "b"}] * 3}),
        ("total chars", {"messages": [u("x" * 50), {"role": "assistant", "content": "y" * 50}, u("z" * 50)]}),
        ("last is assistant", {"messages": [u("hi"), {"role": "assistant", "content": "hello"}]}),
        ("starts with assistant", {"messages": [{"role": "assistant", "content": "hello"}, u("hi")]}),
        ("only system", {"messages": [{"role": "system", "content": "be nice"}]}),
        ("system in the middle", {"messages": [u("a"), {"role": "assistant", "content": "b"},
                                               {"role": "system", "content": "c"}, u("d")]}),
        ("temperature high", {"messages": ok, "temperature": 2.5}),
        ("temperature negative", {"messages": ok, "temperature": -0.1}),
        ("temperature string", {"messages": ok, "temperature": "hot"}),
        ("temperature bool", {"messages": ok, "temperature": True}),
        ("top_p zero", {"messages": ok, "top_p": 0}),
        ("top_p high", {"messages": ok, "top_p": 1.5}),
        ("top_k negative", {"messages": ok, "top_k": -1}),
        ("top_k huge", {"messages": ok, "top_k": 100000}),
        ("top_k float", {"messages": ok, "top_k": 5.5}),
        ("max_tokens zero", {"messages": ok, "max_tokens": 0}),
        ("max_tokens over limit", {"messages": ok, "max_tokens": limits.max_tokens_limit + 1}),
        ("max_tokens string", {"messages": ok, "max_tokens": "10"}),
        ("max_completion_tokens negative", {"messages": ok, "max_completion_tokens": -5}),
        ("n zero", {"messages": ok, "n": 0}),
        ("n too many", {"messages": ok, "n": 100}),
        ("stream string", {"messages": ok, "stream": "yes"}),
        ("stream_options bad", {"messages": ok, "stream": True, "stream_options": {"include_usage": "yes"}}),
        ("seed float", {"messages": ok, "seed": 1.5}),
        ("stop too many", {"messages": ok, "stop": ["a", "b", "c", "d", "e"]}),
        ("stop empty", {"messages": ok, "stop": [""]}),
        ("stop number", {"messages": ok, "stop": 5}),
        ("model number", {"messages": ok, "model": 7}),
        ("logprobs with streaming", {"messages": ok, "logprobs": True, "stream": True}),
        ("top_logprobs without logprobs", {"messages": ok, "top_logprobs": 3}),
        ("top_logprobs over 20", {"messages": ok, "logprobs": True, "top_logprobs": 21}),
        ("tools", {"messages": ok, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("presence penalty", {"messages": ok, "presence_penalty": 1.0}),
        # what the server cannot honour is refused, never silently ignored (a JSON-mode client broke on that)
        ("response_format json", {"messages": ok, "response_format": {"type": "json_object"}}),
        ("logit_bias", {"messages": ok, "logit_bias": {"42": -100}}),
        ("tool_choice", {"messages": ok, "tool_choice": "auto"}),
        ("min_p", {"messages": ok, "min_p": 0.1}),
        ("repetition_penalty", {"messages": ok, "repetition_penalty": 1.3}),
    ]

def test_malformed_requests_get_4xx_and_server_stays_healthy(stack):
    engine, tok = stack
    limits = Limits(max_messages=4, max_message_chars=100, max_total_chars=120, max_tokens_limit=64)
    cases = _malformed(limits)
    assert len(cases) >= 30
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL, limits=limits)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        for name, body in cases:
            if isinstance(body, bytes):
                r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            else:
                r = c.post("/v1/chat/completions", json=body)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]})
        assert c.post("/v1/chat/completions", content=big).status_code == 413
        # the same limits bound the nanochat-protocol endpoint
        assert c.post("/chat/completions", json={"messages": []}).status_code == 400
        assert c.post("/v1/nowhere", json={}).status_code == 404
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert c.get("/stats").json()["available_workers"] == 1

def test_openai_client_sees_400(server):
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert "temperature" in str(e.value)

# -----------------------------------------------------------------------------
# Disconnects free the worker

class SlowEngine:
    """The real engine, slowed to ~50 ms per token so a disconnect happens mid-generation; counts tokens."""
    def __init__(self, engine):
        self.engine, self.model, self.yielded = engine, engine.model, 0
    def chat_prompt(self, *a, **kw):
        return self.engine.chat_prompt(*a, **kw)
    def generate(self, *a, **kw):
        for item in self.engine.generate(*a, **kw):
            time.sleep(0.05)
            self.yielded += 1
            yield item

def stats_once_free(url, timeout):
    """/stats as soon as the single worker is free again (or at the deadline, for the caller to assert on)."""
    deadline = time.time() + timeout
    while True:
        stats = httpx.get(url + "/stats").json()
        if stats["available_workers"] == 1 or time.time() >= deadline:
            return stats
        time.sleep(0.05)

def test_client_disconnect_frees_worker(stack):
    engine, tok = stack
    slow = SlowEngine(engine)
    app = create_app([(slow, tok, "cpu")], model_name=MODEL, default_top_k=0)
    with ServerThread(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 1.0,
                "stream": True}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"content"' in line and '"role"' not in line:
                        break  # first content chunk, then hang up
            assert c.get(srv.url + "/stats").json()["busy_workers"] in (0, 1)
        stats = stats_once_free(srv.url, timeout=10)
        assert stats["available_workers"] == 1 and stats["requests_cancelled"] == 1
        assert slow.yielded < 40, "generation kept running after the client left"
        # the freed worker serves the next request
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "again"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

def test_queued_requests_wait_for_the_single_worker(stack):
    """Three clients, one worker: all are served in turn, none fails."""
    engine, tok = stack
    app = create_app([(SlowEngine(engine), tok, "cpu")], model_name=MODEL)
    with ServerThread(app) as srv:
        def one(i):
            return httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4, "temperature": 0}).status_code
        with cf.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(one, range(3))) == [200, 200, 200]
        assert httpx.get(srv.url + "/stats").json()["requests_served"] == 3

# -----------------------------------------------------------------------------
# CLI: a real checkpoint on disk -> load_workers -> app

def test_serve_loads_a_checkpoint(picochat_home, tiny_tokenizer, monkeypatch):
    from picochat.checkpoint import save_checkpoint, checkpoint_dir
    from picochat.stages import serve
    tiny_tokenizer.save(picochat_home / "tokenizer")
    model = build_tiny_model(tiny_tokenizer)
    save_checkpoint(checkpoint_dir("sft", "d2"), 7, model, None, {"model_config": model.config.to_dict()})
    from picochat.checkpoint import latest_source
    assert latest_source(None) == "sft"
    workers, meta = serve.load_workers("sft", "cpu", num_workers=1)
    assert meta["step"] == 7 and len(workers) == 1
    # fp32 on CPU: decode reads a bf16 copy by default; --decode-dtype model keeps the model's own weights
    engine = workers[0].engine
    assert engine.decode_model is not engine.model and engine.decode_model.compute_dtype == torch.bfloat16
    plain = serve.load_workers("sft", "cpu", num_workers=1, decode_dtype="model")[0][0].engine
    assert plain.decode_model is plain.model
    # main() wires flags to create_app and uvicorn.run; capture instead of listening
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    assert serve_main(["--device-type", "cpu", "-p", "8123", "--max-messages", "3"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    with __import__("fastapi.testclient").testclient.TestClient(seen["app"]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "picochat-sft-d2"
        many = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
        assert c.post("/v1/chat/completions", json={"messages": many}).status_code == 400
    # a base checkpoint serves raw completion (its natural interface) through /v1/completions
    save_checkpoint(checkpoint_dir("base", "d2"), 3, model, None, {"model_config": model.config.to_dict()})
    assert serve_main(["--device-type", "cpu", "-i", "base"]) == 0
    with __import__("fastapi.testclient").testclient.TestClient(seen["app"]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "picochat-base-d2"
        r = c.post("/v1/completions", json={"prompt": "The quick brown", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] >= 1

def test_serve_without_checkpoints_says_what_to_do(picochat_home, capsys):
    assert serve_main(["--device-type", "cpu"]) == 2  # a user's mistake: exit code 2, one line
    assert "no complete checkpoint" in capsys.readouterr().err

class BrokenEngine(SlowEngine):
    """Fails after two tokens, like a device error mid-generation."""
    def generate(self, *a, **kw):
        for k, item in enumerate(self.engine.generate(*a, **kw)):
            if k == 2:
                raise RuntimeError("simulated device failure")
            yield item

def test_engine_failure_is_reported_and_the_worker_survives(stack):
    engine, tok = stack
    app = create_app([(BrokenEngine(engine), tok, "cpu")], model_name=MODEL)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and "simulated device failure" in r.json()["error"]["message"]
        events = sse_events(c.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n"))
        assert events[-1] == "[DONE]" and "simulated device failure" in events[-2]["error"]["message"]
        stats = c.get("/stats").json()
        assert stats["requests_failed"] == 2 and stats["available_workers"] == 1
        assert c.get("/health").json()["status"] == "ok"


def test_unhonoured_parameters_name_themselves_and_harmless_values_pass(stack):
    engine, tok = stack
    ok = [{"role": "user", "content": "hi"}]
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        for key, value in [("response_format", {"type": "json_object"}), ("logit_bias", {"42": -100}),
                           ("tool_choice", "required"), ("min_p", 0.05), ("repetition_penalty", 1.1)]:
            r = c.post("/v1/chat/completions", json={"messages": ok, "max_tokens": 2, key: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == key, (key, r.text)
        r = c.post("/v1/chat/completions", json={"messages": ok, "max_tokens": 2, "response_format": {"type": "text"},
                                                 "logit_bias": {}, "tool_choice": "none", "repetition_penalty": 1.0})
        assert r.status_code == 200, r.text


def test_api_key_guards_the_api(stack):
    import openai
    engine, tok = stack
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL, api_key="s3cret")) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert c.get("/v1/models").status_code == 401 and c.post("/chat/completions", json=body).status_code == 401
        assert c.get("/health").status_code == 200  # liveness probes need no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
