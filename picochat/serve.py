"""
`picochat serve`: an OpenAI-compatible chat API and a ChatGPT-like web UI for a picochat checkpoint.

    picochat serve                                # latest checkpoint (rl > sft > base), http://127.0.0.1:8000
    picochat serve -i sft -g d20 -s 1200 -p 8080  # a specific checkpoint and port
    picochat serve -n 8 --host 0.0.0.0            # one replica per GPU, reachable from other machines
    picochat serve --cors-origins http://localhost:3000   # allow a browser app on another origin

    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "picochat", "stream": true, "messages": [{"role": "user", "content": "Hi!"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="picochat", messages=[{"role": "user", "content": "Hi!"}])

Endpoints: POST /v1/chat/completions (stream and non-stream), GET /v1/models, GET /health, GET /stats,
GET / (the web UI, picochat/ui.html), and POST /chat/completions (nanochat's simple UI protocol:
`data: {"token": ...}` events ending with `data: {"done": true}`).

Design: every model replica ("worker") sits in an asyncio.Queue of idle workers. A request takes one, and a
thread runs the (synchronous) Engine, pushing decoded text into that request's own asyncio queue, so
concurrent streams can never mix. The generation thread owns the worker until it exits and then puts it
back itself, so a worker is never returned while its engine is still running. A client disconnect sets
the request's cancel flag; the thread stops at the next token and the worker is free again.
The prompt comes from Engine.chat_prompt, which also applies the context policy (long chats never crash).
"""
import sys
import json
import time
import uuid
import math
import random
import asyncio
import argparse
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.common import logger

UI_PATH = Path(__file__).with_name("ui.html")
ROLES = ("system", "developer", "user", "assistant")   # "developer" is OpenAI's newer name for system

# -----------------------------------------------------------------------------
# Limits and request validation

@dataclass
class Limits:
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens_limit: int = 4096
    max_top_k: int = 200          # as the reference UI server: 0 = off, 1..200
    max_n: int = 8                # choices per request (sampled as one batch from a shared prefill)
    max_stop: int = 4             # stop strings, as OpenAI
    max_stop_chars: int = 64

class APIError(Exception):
    """Becomes an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    def __init__(self, message, param=None, code=None, status=400, type_="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

@dataclass
class ChatRequest:
    messages: list            # normalized: [{"role": "system"|"user"|"assistant", "content": str}]
    max_tokens: int
    temperature: float
    top_k: int | None         # None = off
    top_p: float | None       # None = off
    seed: int
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list = field(default_factory=list)

def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)

def _number(body, key, lo, hi, default, integer=False, lo_open=False):
    """Read an optional numeric field and check its range; None/absent -> default."""
    x = body.get(key)
    if x is None:
        return default
    if integer and not _is_int(x):
        raise APIError(f"'{key}' must be an integer, got {json.dumps(x)[:40]}", param=key, code="invalid_type")
    if not integer and not _is_number(x):
        raise APIError(f"'{key}' must be a number, got {json.dumps(x)[:40]}", param=key, code="invalid_type")
    if (x <= lo if lo_open else x < lo) or x > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(f"'{key}' must be in {rng}, got {x}", param=key, code="out_of_range")
    return x

def _content_text(content, i):
    """OpenAI content is a string or a list of {"type": "text", "text": ...} parts."""
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{param}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                               param=param, code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"{param} must be a string (or a list of text parts), got {type(content).__name__}",
                   param=param, code="invalid_type")

def validate_messages(raw, limits: Limits) -> list:
    """Check roles/sizes and normalize to alternating turns: system messages (only at the start) are joined into
    one, consecutive messages of the same role are merged, the first turn after the system one and the last
    turn must be the user's."""
    if raw is None:
        raise APIError("'messages' is required: a list of {\"role\", \"content\"} objects", param="messages",
                       code="missing_required_parameter")
    if not isinstance(raw, list):
        raise APIError(f"'messages' must be a list, got {type(raw).__name__}", param="messages", code="invalid_type")
    if not raw:
        raise APIError("'messages' must contain at least one message", param="messages", code="empty_array")
    if len(raw) > limits.max_messages:
        raise APIError(f"too many messages: {len(raw)} > {limits.max_messages}; start a new conversation",
                       param="messages", code="too_many_messages")
    out, total, seen_turn = [], 0, False
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]",
                           code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"messages[{i}].role must be one of system, user, assistant; got {json.dumps(role)[:40]}",
                           param=f"messages[{i}].role", code="invalid_role")
        if m.get("tool_calls"):
            raise APIError(f"messages[{i}]: tool calls are not supported", param=f"messages[{i}].tool_calls",
                           code="unsupported")
        text = _content_text(m.get("content"), i)
        if not text.strip():
            raise APIError(f"messages[{i}].content is empty", param=f"messages[{i}].content", code="empty_content")
        if len(text) > limits.max_message_chars:
            raise APIError(f"messages[{i}].content is too long: {len(text)} > {limits.max_message_chars} characters",
                           param=f"messages[{i}].content", code="content_too_long")
        total += len(text)
        if total > limits.max_total_chars:
            raise APIError(f"conversation is too long: more than {limits.max_total_chars} characters in total; "
                           "start a new conversation", param="messages", code="conversation_too_long")
        role = "system" if role == "developer" else role
        if role == "system" and seen_turn:
            raise APIError(f"messages[{i}]: system messages are only supported at the start of the conversation",
                           param=f"messages[{i}].role", code="invalid_role")
        seen_turn |= role != "system"
        if out and out[-1]["role"] == role:  # merge consecutive same-role messages: the format alternates turns
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise APIError("the conversation needs a user message after the system message", param="messages",
                       code="missing_user_message")
    if turns[0]["role"] != "user":
        raise APIError("the first message after the system message must be from the user", param="messages",
                       code="invalid_role")
    if turns[-1]["role"] != "user":
        raise APIError("the last message must be from the user (the model answers it)", param="messages",
                       code="invalid_role")
    return out

def parse_chat_request(body, limits: Limits, defaults: dict) -> ChatRequest:
    """Validate an OpenAI /v1/chat/completions body (plus the top_k extension). Raises APIError."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_type")
    messages = validate_messages(body.get("messages"), limits)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError("'model' must be a string", param="model", code="invalid_type")
    mt = body.get("max_completion_tokens")
    key = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _number(body, key, 1, limits.max_tokens_limit, None, integer=True)
    if max_tokens is None:
        max_tokens = min(defaults["max_tokens"], limits.max_tokens_limit)
    temperature = float(_number(body, "temperature", 0.0, 2.0, defaults["temperature"]))
    top_p = _number(body, "top_p", 0.0, 1.0, None, lo_open=True)
    top_p = None if top_p is None or top_p >= 1.0 else float(top_p)
    top_k = _number(body, "top_k", 0, limits.max_top_k, defaults["top_k"], integer=True)
    top_k = None if not top_k else int(top_k)
    n = _number(body, "n", 1, limits.max_n, 1, integer=True)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError("'seed' must be an integer", param="seed", code="invalid_type")
    seed = random.randint(0, 2**31 - 1) if seed is None else seed % 2**63
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream", code="invalid_type")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise APIError("'stream_options' must be an object like {\"include_usage\": true}",
                           param="stream_options", code="invalid_type")
        include_usage = opts.get("include_usage", False)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > limits.max_stop
            or not all(isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars for s in stop)):
        raise APIError(f"'stop' must be a string or a list of at most {limits.max_stop} non-empty strings "
                       f"of at most {limits.max_stop_chars} characters", param="stop", code="invalid_value")
    # Features we do not have: say so instead of silently ignoring them.
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise APIError(f"'{key}' is not supported (only 0)", param=key, code="unsupported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise APIError("'logprobs' is not supported", param="logprobs", code="unsupported")
    if body.get("tools") or body.get("functions"):
        raise APIError("'tools' are not supported", param="tools", code="unsupported")
    return ChatRequest(messages=messages, max_tokens=int(max_tokens), temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=int(seed), n=int(n), stream=stream, include_usage=include_usage, stop=stop)

# -----------------------------------------------------------------------------
# Workers and generation

@dataclass
class Worker:
    id: int
    engine: object
    tokenizer: object
    device: object
    busy: bool = False

class _Row:
    """One choice being decoded: UTF-8-safe text via TextStreamer, stop-string matching with a hold-back
    window (text that might be the beginning of a stop string is not emitted until it is resolved)."""
    def __init__(self, streamer, stops):
        self.streamer, self.stops = streamer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending, self.text = "", ""
        self.tokens, self.done, self.finish_reason = 0, False, None

    def _emit(self, piece, final=False):
        self.pending += piece
        hits = [j for j in (self.pending.find(stop) for stop in self.stops) if j >= 0]
        if hits:  # the earliest stop string ends the choice; it is not part of the text
            out, self.pending = self.pending[:min(hits)], ""
            self.done, self.finish_reason = True, "stop"
        else:
            cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
            out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out

    def add(self, token_id) -> str:
        self.tokens += 1
        return self._emit(self.streamer.add(token_id))

    def finish(self, reason) -> str:
        out = self._emit(self.streamer.finish(), final=True) if not self.done else ""
        if not self.done:
            self.done, self.finish_reason = True, reason
        return out

def _sequence_len(engine):
    model = getattr(engine, "model", None)
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None)

class Generation:
    """One request's generation on one worker, in a thread. Events go to `self.events` (an asyncio.Queue):
    ("delta", index, text) / ("finish", index, reason) / ("end", usage dict) / ("error", message)."""
    def __init__(self, server, worker: Worker, req: ChatRequest):
        self.server, self.worker, self.req = server, worker, req
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"picochat-gen-w{worker.id}", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _put(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # event loop already closed (server shutting down)
            pass

    def _run(self):
        import torch
        from picochat.engine import TextStreamer
        req, engine, tok = self.req, self.worker.engine, self.worker.tokenizer
        rows, prompt, final = [], [], ("error", "generation was interrupted")
        t0 = time.time()
        try:
            with torch.inference_mode():
                prompt = engine.chat_prompt(req.messages, req.max_tokens)
                seq_len = _sequence_len(engine)
                # the engine caps max_tokens at what fits in the context; mirror that to label "length" honestly
                budget = req.max_tokens if seq_len is None else max(0, min(req.max_tokens, seq_len - len(prompt)))
                terminal = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
                rows = [_Row(TextStreamer(tok), req.stop) for _ in range(req.n)]
                gen = engine.generate(prompt, num_samples=req.n, max_tokens=req.max_tokens,
                                      temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
                try:
                    for column, _masks in gen:
                        if self.cancel.is_set():
                            break
                        for i, token in enumerate(column):
                            row = rows[i]
                            if row.done:
                                continue
                            if token in terminal:
                                out = row.finish("stop")
                            else:
                                out = row.add(token)
                            if out:
                                self._put("delta", i, out)
                            if row.done:
                                self._put("finish", i, row.finish_reason)
                        if all(r.done for r in rows):
                            break
                finally:
                    gen.close()
                if not self.cancel.is_set():
                    for i, row in enumerate(rows):
                        if not row.done:  # the engine stopped without a terminal token: length, or an early stop
                            out = row.finish("length" if row.tokens >= budget else "stop")
                            if out:
                                self._put("delta", i, out)
                            self._put("finish", i, row.finish_reason)
            completion = sum(r.tokens for r in rows)
            final = ("end", {"prompt_tokens": len(prompt), "completion_tokens": completion,
                             "total_tokens": len(prompt) + completion})
            dt = time.time() - t0  # sizes and speed only: conversation text is never logged
            logger.info("worker %d: %d prompt + %d completion tokens in %.2fs (%.1f tok/s)%s", self.worker.id,
                        len(prompt), completion, dt, completion / max(dt, 1e-9),
                        " [client disconnected]" if self.cancel.is_set() else "")
        except Exception as e:  # never kill the worker; report to the client
            logger.exception("generation failed on worker %d", self.worker.id)
            final = ("error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            # give the worker back BEFORE the last event, so a client that got its answer sees it free
            outcome = "cancelled" if self.cancel.is_set() else "failed" if final[0] == "error" else "served"
            self.server.release(self.worker, sum(r.tokens for r in rows), outcome)
        self._put(*final)

class Server:
    """The worker pool and counters shared by all requests of one app."""
    def __init__(self, workers, model_name, limits, defaults):
        self.workers = [w if isinstance(w, Worker) else Worker(i, *w) for i, w in enumerate(workers)]
        self.model_name, self.limits, self.defaults = model_name, limits, defaults
        self.started = time.time()
        self.created = int(self.started)
        self.pool = None          # asyncio.Queue, made inside the running loop (startup)
        self.loop = None
        self.lock = threading.Lock()
        self.requests_served = self.requests_cancelled = self.requests_failed = 0
        self.tokens_generated = self.prompt_tokens = 0
        self.waiting = 0

    def start(self):
        self.loop = asyncio.get_running_loop()
        self.pool = asyncio.Queue()
        for w in self.workers:
            w.busy = False
            self.pool.put_nowait(w)

    async def acquire(self) -> Worker:
        if not self.workers:
            raise APIError("no model is loaded on this server", code="model_not_loaded", status=503,
                           type_="server_error")
        self.waiting += 1
        try:
            w = await self.pool.get()
        finally:
            self.waiting -= 1
        w.busy = True
        return w

    def release(self, worker, tokens, outcome):
        """Called from the generation thread when it is completely done with the worker.
        outcome: "served" | "cancelled" (client left) | "failed" (the engine raised)."""
        with self.lock:
            self.tokens_generated += tokens
            key = {"served": "requests_served", "cancelled": "requests_cancelled"}.get(outcome, "requests_failed")
            setattr(self, key, getattr(self, key) + 1)
        def _back():
            worker.busy = False
            self.pool.put_nowait(worker)
        try:
            self.loop.call_soon_threadsafe(_back)
        except RuntimeError:
            pass

    def stats(self):
        busy = sum(w.busy for w in self.workers)
        return {
            "model": self.model_name,
            "total_workers": len(self.workers), "busy_workers": busy, "available_workers": len(self.workers) - busy,
            "waiting_requests": self.waiting,
            "requests_served": self.requests_served, "requests_cancelled": self.requests_cancelled,
            "requests_failed": self.requests_failed,
            "tokens_generated": self.tokens_generated, "prompt_tokens": self.prompt_tokens,
            "uptime_seconds": round(time.time() - self.started, 3),
            "workers": [{"id": w.id, "device": str(w.device), "busy": w.busy} for w in self.workers],
        }

# -----------------------------------------------------------------------------
# The app

def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"

def create_app(workers, model_name="picochat", limits: Limits | None = None, default_temperature=0.8,
               default_top_k=50, default_max_tokens=512, cors_origins=None):
    """Build the FastAPI app. workers: list of (engine, tokenizer, device) (or Worker); may be empty, then the
    server answers but reports "model not loaded". Tests inject a tiny random model here."""
    from contextlib import asynccontextmanager
    limits = limits or Limits()
    defaults = {"temperature": default_temperature, "top_k": default_top_k, "max_tokens": default_max_tokens}
    server = Server(workers, model_name, limits, defaults)
    max_body = 4 * limits.max_total_chars + 64 * limits.max_messages + 65536  # JSON escapes, per-message overhead

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        err = APIError(str(exc.detail), status=exc.status_code, code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def read_json(request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:  # refuse before reading it into memory
            raise APIError(f"request body too large ({declared} bytes)", code="body_too_large", status=413)
        body = await request.body()
        if len(body) > max_body:
            raise APIError(f"request body too large ({len(body)} bytes)", code="body_too_large", status=413)
        def bad_constant(c):
            raise ValueError(f"{c} is not valid JSON")
        try:
            return json.loads(body, parse_constant=bad_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"malformed JSON body: {e}", code="invalid_json")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(UI_PATH.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        ready = bool(server.workers)
        body = {"status": "ok" if ready else "model not loaded", "ready": ready, "model": server.model_name,
                "num_workers": len(server.workers), "available_workers": server.stats()["available_workers"]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/stats")
    async def stats():
        return server.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "picochat"}]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise APIError(f"model {model_id!r} does not exist; this server has {server.model_name!r}",
                           param="model", code="model_not_found", status=404)
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "picochat"}

    async def start_generation(req: ChatRequest) -> Generation:
        worker = await server.acquire()
        try:
            return Generation(server, worker, req).start()
        except BaseException:
            server.release(worker, 0, "failed")
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat_request(await read_json(request), limits, defaults)
        gen = await start_generation(req)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        head = {"id": cid, "object": None, "created": created, "model": server.model_name,
                "system_fingerprint": "picochat"}  # OpenAI's key order; "object" is filled in per response
        if req.stream:
            return _GenerationStream(_openai_stream(gen, req, head, server), gen)
        return await _openai_complete(gen, req, head, server, request)

    @app.post("/chat/completions")
    async def chat_completions_simple(request: Request):
        """nanochat's UI protocol: {messages, temperature?, max_tokens?, top_k?} -> data: {"token"} ... {"done"}."""
        body = await read_json(request)
        if isinstance(body, dict):
            body = {k: body[k] for k in ("messages", "temperature", "max_tokens", "top_k") if k in body}
        req = parse_chat_request(body, limits, defaults)
        gen = await start_generation(req)
        async def events():
            while True:
                ev = await gen.events.get()
                if ev[0] == "delta":
                    yield _sse({"token": ev[2], "gpu": gen.worker.id})
                elif ev[0] == "error":
                    yield _sse({"error": ev[1]})
                    return
                elif ev[0] == "end":
                    server.prompt_tokens += ev[1]["prompt_tokens"]
                    yield _sse({"done": True})
                    return
        return _GenerationStream(events(), gen)

    return app

class _GenerationStream(StreamingResponse):
    """A StreamingResponse that cancels its generation however the response ends: finished, client gone
    (send raises, or the disconnect listener cancels the stream), or server shutdown."""
    def __init__(self, content, gen: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.cancel.set()  # no-op when the generation already ended
            try:
                await self.body_iterator.aclose()
            except BaseException:
                pass

async def _openai_stream(gen: Generation, req: ChatRequest, head: dict, server: Server):
    def chunk(choices, usage=None):
        obj = {**head, "object": "chat.completion.chunk", "choices": choices}
        if req.include_usage:
            obj["usage"] = usage
        return _sse(obj)
    for i in range(req.n):  # the role comes first, as OpenAI does
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    while True:
        ev = await gen.events.get()
        kind = ev[0]
        if kind == "delta":
            yield chunk([{"index": ev[1], "delta": {"content": ev[2]}, "logprobs": None, "finish_reason": None}])
        elif kind == "finish":
            yield chunk([{"index": ev[1], "delta": {}, "logprobs": None, "finish_reason": ev[2]}])
        elif kind == "error":
            yield _sse({"error": {"message": ev[1], "type": "server_error", "param": None, "code": "generation_failed"}})
            yield "data: [DONE]\n\n"
            return
        elif kind == "end":
            server.prompt_tokens += ev[1]["prompt_tokens"]
            if req.include_usage:
                yield chunk([], usage=ev[1])
            yield "data: [DONE]\n\n"
            return

async def _openai_complete(gen: Generation, req: ChatRequest, head: dict, server: Server, request):
    texts, reasons = [""] * req.n, [None] * req.n
    try:
        while True:
            try:
                ev = await asyncio.wait_for(gen.events.get(), timeout=1.0)
            except asyncio.TimeoutError:  # nobody to answer to any more: stop generating
                if await request.is_disconnected():
                    gen.cancel.set()
                    return JSONResponse({}, status_code=499)
                continue
            if ev[0] == "delta":
                texts[ev[1]] += ev[2]
            elif ev[0] == "finish":
                reasons[ev[1]] = ev[2]
            elif ev[0] == "error":
                raise APIError(ev[1], code="generation_failed", status=500, type_="server_error")
            elif ev[0] == "end":
                usage = ev[1]
                break
    finally:
        gen.cancel.set()  # no-op when finished; stops the thread if this handler was cancelled
    server.prompt_tokens += usage["prompt_tokens"]
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                "finish_reason": reasons[i] or "stop"} for i in range(req.n)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

# -----------------------------------------------------------------------------
# Running it

class ServerThread:
    """Run an app with uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as srv:`,
    then talk to srv.url. port=0 picks a free port; the socket is bound here, so there is no race for it."""
    def __init__(self, app, host="127.0.0.1", port=0):
        import socket
        import uvicorn
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

def load_workers(source, device_type, num_workers, model_tag=None, step=None):
    """One replica per device: cuda:0..N-1 on CUDA, a single one on CPU/MPS."""
    import torch
    from picochat.checkpoint import load_model
    from picochat.engine import Engine
    if device_type != "cuda" and num_workers > 1:
        logger.warning("more than one worker needs CUDA (one replica per GPU); using 1 on %s", device_type)
        num_workers = 1
    if device_type == "cuda" and num_workers > torch.cuda.device_count():
        raise SystemExit(f"--num-workers {num_workers} but only {torch.cuda.device_count()} GPUs are visible")
    workers, meta = [], {}
    for i in range(num_workers):
        device = torch.device(f"cuda:{i}") if device_type == "cuda" else torch.device(device_type)
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=model_tag, step=step)
        workers.append(Worker(i, Engine(model, tokenizer), tokenizer, device))
        logger.info("worker %d: %s step %s on %s", i, source, meta.get("step"), device)
    return workers, meta

def main(argv=None):
    p = argparse.ArgumentParser(prog="picochat serve", description=__doc__.split("Endpoints:")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", choices=["base", "sft", "rl"], default=None,
                   help="checkpoint stage (default: the latest available: rl, then sft, then base)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d20 (default: the loader's choice)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("-n", "--num-workers", type=int, default=None,
                   help="model replicas, one per GPU (default: all GPUs on CUDA, 1 on CPU/MPS)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server to the network)")
    p.add_argument("-p", "--port", type=int, default=8000)
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    p.add_argument("--cors-origins", default=None, help="comma-separated allowed origins, or '*' (default: CORS off)")
    p.add_argument("--max-messages", type=int, default=500)
    p.add_argument("--max-message-chars", type=int, default=8000)
    p.add_argument("--max-total-chars", type=int, default=32000)
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    args = p.parse_args(argv)

    import torch
    import uvicorn
    from picochat.common import autodetect_device_type
    device_type = args.device_type or autodetect_device_type()
    num_workers = args.num_workers or (torch.cuda.device_count() if device_type == "cuda" else 1)
    if num_workers < 1:
        p.error("--num-workers must be at least 1")
    if not 0 <= args.temperature <= 2 or not 0 <= args.top_k <= 200 or not 1 <= args.max_tokens <= args.max_tokens_limit:
        p.error("defaults out of range: -t in [0, 2], -k in [0, 200], -m in [1, --max-tokens-limit]")
    from picochat.checkpoint import find_largest_model, latest_source
    from picochat.common import get_base_dir
    try:
        source = args.source or latest_source(args.model_tag)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    workers, meta = load_workers(source, device_type, num_workers, args.model_tag, args.step)
    tag = args.model_tag or find_largest_model(get_base_dir() / "checkpoints" / source)
    model_name = f"picochat-{source}-{tag}"   # e.g. picochat-sft-d20
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_total_chars=args.max_total_chars, max_tokens_limit=args.max_tokens_limit)
    cors = [o.strip() for o in args.cors_origins.split(",") if o.strip()] if args.cors_origins else None
    app = create_app(workers, model_name=model_name, limits=limits, default_temperature=args.temperature,
                     default_top_k=args.top_k, default_max_tokens=args.max_tokens, cors_origins=cors)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding to %s: anyone who can reach this address can use the model (no auth)", args.host)
    print(f"picochat serve: {model_name} on {len(workers)} worker(s) -> http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

if __name__ == "__main__":
    sys.exit(main())
