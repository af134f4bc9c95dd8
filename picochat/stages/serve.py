r"""
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
The prompt comes from Engine.chat_prompt. A conversation that does not fit the context is refused with a 400
(context_length_exceeded), or, with --truncate-prompts, trimmed by the engine's context policy (oldest turns
first); either way a long chat never crashes the server.
"""
import os
import sys
import hmac
import json
import time
import uuid
import asyncio
import argparse
import threading
from dataclasses import dataclass
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch
import uvicorn
from fastapi.middleware.cors import CORSMiddleware

from picochat import PACKAGE_DIR
from picochat.api_schema import Limits, APIError, ChatRequest, parse_chat_request
from picochat.checkpoint import load_model, latest_source
from picochat.common import HelpFormatter, autodetect_device_type, check_device_type, logger
from picochat.engine import Engine, TextStreamer
from picochat.http_guard import RequestGuard, H11_MAX_EVENT_BYTES, MAX_JSON_DEPTH, json_depth

UI_PATH = PACKAGE_DIR / "ui.html"

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
               default_top_k=50, default_max_tokens=512, cors_origins=None, api_key=None, truncate_prompts=False,
               body_timeout=30.0):
    """Build the app: FastAPI inside picochat.http_guard.RequestGuard (header/body size, body timeout). workers:
    list of (engine, tokenizer, device) (or Worker); may be empty, then the server answers but reports "model not
    loaded". Tests inject a tiny random model here. With api_key, every /v1/ and /chat/ request must carry
    `Authorization: Bearer <api_key>`. A conversation longer than the context is a 400 (context_length_exceeded)
    unless truncate_prompts, then its oldest turns are dropped."""
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
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    if api_key:
        @app.middleware("http")
        async def _require_key(request, call_next):
            if request.url.path.startswith(("/v1/", "/chat/")) and \
                    not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}"):
                err = APIError("missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                               status=401)
                return JSONResponse(err.body(), status_code=401)
            return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        err = APIError(str(exc.detail), status=exc.status_code, code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def read_json(request):
        body = await request.body()  # RequestGuard has bounded its size and read time already
        def bad_constant(c):
            raise ValueError(f"{c} is not valid JSON")
        try:
            text = body.decode("utf-8")
            if json_depth(text) > MAX_JSON_DEPTH:
                raise APIError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
            return json.loads(text, parse_constant=bad_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
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

    def check_context(req: ChatRequest):
        """By default a conversation that does not fit the context is refused (OpenAI's context_length_exceeded);
        with truncate_prompts the engine drops its oldest turns instead (the terminal chat's policy)."""
        worker = server.workers[0] if server.workers else None
        limit = getattr(worker.engine, "prompt_limit", None) if worker else None
        if truncate_prompts or limit is None:
            return
        n = len(worker.tokenizer.render_conversation({"messages": req.messages}, max_tokens=1 << 62)[0]) + 1
        if n > limit(req.max_tokens):
            raise APIError(f"this model's context is {worker.engine.sequence_len} tokens; the messages take {n} and "
                           f"max_tokens={req.max_tokens} needs room too (longest prompt: {limit(req.max_tokens)}). "
                           "Shorten the conversation or lower max_tokens", param="messages",
                           code="context_length_exceeded")

    async def start_generation(req: ChatRequest) -> Generation:
        check_context(req)
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

    return RequestGuard(app, max_body_bytes=max_body, body_timeout=body_timeout)

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
    next_check = time.monotonic() + 0.25
    try:
        while True:
            # every 0.25 s, busy or not: a client that gave up (timeout, closed tab) stops its generation
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.25
                if await request.is_disconnected():
                    gen.cancel.set()
                    logger.info("client left before its answer was ready; generation cancelled")
                    return JSONResponse({}, status_code=499)
            try:
                ev = await asyncio.wait_for(gen.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
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

def load_workers(source, device_type, num_workers, model_tag=None, step=None):
    """One replica per device: cuda:0..N-1 on CUDA, a single one on CPU/MPS."""
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
                                formatter_class=HelpFormatter)
    p.add_argument("-i", "--source", choices=["base", "sft", "rl"], default=None,
                   help="checkpoint stage (default: the latest available: rl, then sft, then base)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d20 (default: the loader's choice)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("-n", "--num-workers", type=int, default=None,
                   help="model replicas, one per GPU (default: all GPUs on CUDA, 1 on CPU/MPS)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server to the network)")
    p.add_argument("-p", "--port", type=int, default=8000, help='TCP port')
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    p.add_argument("--cors-origins", default=None, help="comma-separated allowed origins, or '*' (default: CORS off)")
    p.add_argument("--max-messages", type=int, default=500, help='most messages a request may carry')
    p.add_argument("--max-message-chars", type=int, default=8000, help='longest message, in characters')
    p.add_argument("--max-total-chars", type=int, default=32000, help='most characters over all messages of a request')
    p.add_argument("--api-key", default=os.environ.get("PICOCHAT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PICOCHAT_API_KEY, else no auth)")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="drop a long conversation's oldest turns to fit the context instead of refusing it with "
                        "a 400 (context_length_exceeded)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may stall between chunks before the request is dropped (408)")
    args = p.parse_args(argv)

    device_type = check_device_type(args.device_type or autodetect_device_type())
    if not 0 < args.port < 65536:  # checked before the (slow) model load, not by the socket bind after it
        p.error(f"--port {args.port} is not a TCP port (1-65535)")
    num_workers = args.num_workers or (torch.cuda.device_count() if device_type == "cuda" else 1)
    if num_workers < 1:
        p.error("--num-workers must be at least 1")
    if not 0 <= args.temperature <= 2 or not 0 <= args.top_k <= 200 or not 1 <= args.max_tokens <= args.max_tokens_limit:
        p.error("defaults out of range: -t in [0, 2], -k in [0, 200], -m in [1, --max-tokens-limit]")
    try:
        source = args.source or latest_source(args.model_tag)
    except FileNotFoundError as e:
        print(f"picochat serve: error: {e}", file=sys.stderr)
        return 2
    workers, meta = load_workers(source, device_type, num_workers, args.model_tag, args.step)
    tag = meta["model_tag"]
    model_name = f"picochat-{source}-{tag}"   # e.g. picochat-sft-d20
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_total_chars=args.max_total_chars, max_tokens_limit=args.max_tokens_limit)
    cors = [o.strip() for o in args.cors_origins.split(",") if o.strip()] if args.cors_origins else None
    app = create_app(workers, model_name=model_name, limits=limits, default_temperature=args.temperature,
                     default_top_k=args.top_k, default_max_tokens=args.max_tokens, cors_origins=cors,
                     api_key=args.api_key, truncate_prompts=args.truncate_prompts, body_timeout=args.body_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("binding to %s without --api-key: anyone who can reach this address can use the model",
                       args.host)
    print(f"picochat serve: {model_name} on {len(workers)} worker(s) -> http://{args.host}:{args.port}/", flush=True)
    # h11 (not httptools) with a header limit above RequestGuard's, so oversized headers get its JSON 431
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http="h11",
                h11_max_incomplete_event_size=H11_MAX_EVENT_BYTES)
    return 0
