"""picochat serve under hostile HTTP input (a real uvicorn on 127.0.0.1): huge and chunked bodies are cut off while
they stream in, stalled uploads time out, deep JSON and oversized headers get JSON errors, a client that gives up
on a non-streamed request cancels its generation, and after all of it the server is healthy and its memory flat."""
import json
import time
import socket
import resource
import concurrent.futures as cf

import httpx
import pytest

from picochat.stages.serve import create_app
from picochat.server_thread import ServerThread
from test_serve import build_tiny_model, SlowEngine, MODEL, stats_once_free

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def stack(tiny_tokenizer):
    from picochat.engine import Engine
    return Engine(build_tiny_model(tiny_tokenizer), tiny_tokenizer), tiny_tokenizer


def _healthy(c):
    r = c.post("/v1/chat/completions", json=HI)
    return r.status_code == 200 and c.get("/stats").json()["available_workers"] == 1


def _raw(srv, data: bytes, read=True, timeout=5.0):
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    s.sendall(data)
    if not read:
        return s
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except socket.timeout:
        pass
    s.close()
    return out


def test_bodies_are_limited_while_they_stream_in(stack):
    engine, tok = stack
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        def chunks():  # 400 MB, chunked (no Content-Length): the server must stop reading at its limit
            block = b"x" * (1 << 20)
            for _ in range(400):
                yield block
        t0 = time.time()
        try:
            r = c.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        except httpx.TransportError:
            pass  # the server answered 413 and closed while the client was still sending: also a refusal
        assert time.time() - t0 < 20
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert grew_mb < 100, f"the server buffered the upload: peak RSS grew {grew_mb:.0f} MB"
        # a declared Content-Length over the limit: refused before a byte of the body is read
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
               b"Content-Length: 400000000\r\n\r\n"
        reply = _raw(srv, head)
        assert reply.startswith(b"HTTP/1.1 413") and b'"body_too_large"' in reply
        assert _healthy(c)


def test_stalled_uploads_time_out_and_disconnects_are_one_line(stack, capfd):
    engine, tok = stack
    app = create_app([(engine, tok, "cpu")], model_name=MODEL, body_timeout=0.5)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
               b"Content-Length: 1000\r\n\r\n{\"messages\": ["
        t0 = time.time()
        with cf.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: _raw(srv, head), range(50)))
        assert all(r.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in r for r in replies), replies[:2]
        assert time.time() - t0 < 15  # all 50 were let go, not held open
        # a client that hangs up mid-upload: no traceback, the server carries on
        s = _raw(srv, head, read=False)
        s.close()
        time.sleep(0.3)
        assert _healthy(c)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ClientDisconnect" not in err


def test_deep_json_and_big_headers_get_json_errors(stack):
    engine, tok = stack
    with ServerThread(create_app([(engine, tok, "cpu")], model_name=MODEL)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        nested_40 = {"messages": [{"role": "user", "content": "hi", "x": json.loads("[" * 40 + "]" * 40)}]}
        for body in ("[" * 100_000 + "]" * 100_000, json.dumps(nested_40)):
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text[:200]
        r = c.post("/v1/chat/completions", json=HI, headers={"X-Filler": "a" * 20_000})
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        r = c.post("/v1/chat/completions", json=HI, headers={f"X-F{i}": "b" * 1000 for i in range(40)})
        assert r.status_code == 431
        assert _healthy(c)


class EndlessEngine(SlowEngine):
    """Never picks an ending token (a random tiny model sometimes ends after a few tokens): 50 ms per token until
    max_tokens or until the server stops asking."""
    def generate(self, prompt, num_samples=1, max_tokens=None, **kw):
        for _ in range(max_tokens):
            time.sleep(0.05)
            self.yielded += 1
            yield [65] * num_samples, [1] * num_samples


def test_a_client_that_gives_up_cancels_its_generation(stack):
    """Non-streamed: the client times out after 0.5 s; the generation stops within about a second (it does not run
    to max_tokens), the worker is free and the cancellation is counted."""
    engine, tok = stack
    slow = EndlessEngine(engine)
    app = create_app([(slow, tok, "cpu")], model_name=MODEL, default_top_k=0)
    with ServerThread(app) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 1.0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.5)
        stats = stats_once_free(srv.url, timeout=5)
        assert stats["available_workers"] == 1 and stats["requests_cancelled"] == 1, stats
        assert slow.yielded < 40, f"generation ran on after the client left ({slow.yielded} tokens)"
