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

Endpoints: POST /v1/chat/completions (stream and non-stream; logprobs/top_logprobs without streaming),
POST /v1/completions (raw text completion for base and chat checkpoints alike: a prompt string, strings or token
ids; stream or not; logprobs with top-k alternatives and echo, so a harness such as lm-eval's local-completions
can score a prompt), GET /v1/models (with the context length), GET /metrics (Prometheus), GET /health,
GET /stats, GET / (the web UI, picochat/ui.html), and POST /chat/completions (nanochat's simple UI protocol:
`data: {"token": ...}` events ending with `data: {"done": true}`).

The worker pool and the generation threads are picochat/serving.py. The prompt comes from Engine.chat_prompt. A conversation that does not fit the context is refused with a 400
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
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch
import uvicorn
from fastapi.middleware.cors import CORSMiddleware

from picochat import PACKAGE_DIR
from picochat.api_schema import Limits, APIError, ChatRequest, parse_chat_request, parse_completion_request
from picochat.checkpoint import load_model, latest_source
from picochat.common import HelpFormatter, autodetect_device_type, check_device_type, logger
from picochat.engine import DECODE_DTYPES, Engine, resolve_decode_dtype
from picochat.serving import Generation, Server, Worker, sequence_len
from picochat.http_guard import RequestGuard, RequestMetrics, H11_MAX_EVENT_BYTES, MAX_JSON_DEPTH, json_depth

UI_PATH = PACKAGE_DIR / "ui.html"
STATIC_DIR = PACKAGE_DIR / "static"  # the UI's favicon and vendored libraries (static/vendor/README.md)
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".md": "text/markdown; charset=utf-8"}

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

    # only the files that ship under static/ are served, looked up by name: no path from a URL touches the disk
    static_files = {p.relative_to(STATIC_DIR).as_posix(): p for p in STATIC_DIR.rglob("*") if p.is_file()}

    @app.get("/static/{name:path}")
    async def static(name: str):
        path = static_files.get(name)
        if path is None:
            raise APIError(f"no static file {name!r}", code="not_found", status=404)
        return Response(path.read_bytes(), media_type=STATIC_TYPES.get(path.suffix, "text/plain; charset=utf-8"),
                        headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/favicon.ico")
    async def favicon():  # browsers ask for it whatever the page says
        return Response(static_files["favicon.svg"].read_bytes(), media_type="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/health")
    async def health():
        ready = bool(server.workers)
        body = {"status": "ok" if ready else "model not loaded", "ready": ready, "model": server.model_name,
                "num_workers": len(server.workers), "available_workers": server.stats()["available_workers"]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/stats")
    async def stats():
        return server.stats()

    def model_card():
        # context_length / max_model_len: the names other OpenAI-compatible servers (vLLM, ...) report it under
        ctx = sequence_len(server.workers[0].engine) if server.workers else None
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "picochat",
                "context_length": ctx, "max_model_len": ctx}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise APIError(f"model {model_id!r} does not exist; this server has {server.model_name!r}",
                           param="model", code="model_not_found", status=404)
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def check_context(req: ChatRequest):
        """By default a conversation that does not fit the context is refused (OpenAI's context_length_exceeded);
        with truncate_prompts the engine drops its oldest turns instead (the terminal chat's policy)."""
        worker = server.workers[0] if server.workers else None
        limit = getattr(worker.engine, "prompt_limit", None) if worker else None
        if truncate_prompts or limit is None or req.prompt_tokens is not None:  # (completions check their own)
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

    @app.post("/v1/completions")
    async def completions(request: Request):
        """Raw text completion (no chat template): base and chat checkpoints alike."""
        if not server.workers:
            raise APIError("no model is loaded on this server", code="model_not_loaded", status=503,
                           type_="server_error")
        tok = server.workers[0].tokenizer
        body = await read_json(request)
        reqs = parse_completion_request(body, limits, defaults, tok.encode, tok.get_vocab_size())
        ctx = sequence_len(server.workers[0].engine)
        for i, r in enumerate(reqs):
            n = len(r.prompt_tokens) + (r.prompt_tokens[0] != tok.get_bos_token_id())
            if ctx is not None and n + (r.max_tokens > 0) > ctx:
                raise APIError(f"prompt {i} takes {n} tokens (with BOS); this model's context is {ctx} and at least "
                               "one more is needed to complete it. Shorten the prompt", param="prompt",
                               code="context_length_exceeded")
        echo_texts = [r.prompt if isinstance(r.prompt, str) else tok.decode(r.prompt) for r in reqs]
        head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "system_fingerprint": "picochat"}
        if reqs[0].stream:
            return _GenerationStream(_completion_stream(reqs, echo_texts, head, start_generation), None)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for p, (r, echo_text) in enumerate(zip(reqs, echo_texts)):
            gen = await start_generation(r)
            got = await _collect(gen, r.n, request)
            if got is None:
                return JSONResponse({}, status_code=499)
            texts, reasons, u, details = got
            usage = {k: usage[k] + u[k] for k in usage}
            for j in range(r.n):
                lp = None
                if details["logprobs"] is not None:
                    entries = details["logprobs"][j]
                    if r.echo and not details["bos_added"]:  # the client's own first token has no context
                        entries = [(details["prompt"][0], None, [])] + entries
                    lp = completion_logprobs(tok, entries, r.logprobs)
                choices.append({"text": (echo_text if r.echo else "") + texts[j], "index": p * r.n + j,
                                "logprobs": lp, "finish_reason": reasons[j] or "stop"})
        server.prompt_tokens += usage["prompt_tokens"]
        return JSONResponse({**head, "choices": choices, "usage": usage})

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

    def record(path, status, seconds):
        server.metrics.requests.labels(path, str(status)).inc()
        server.metrics.latency.labels(path).observe(seconds)
    known = ("/", "/health", "/stats", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
             "/chat/completions", "/favicon.ico")
    return RequestMetrics(RequestGuard(app, max_body_bytes=max_body, body_timeout=body_timeout), record, known)

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
            if self.gen is not None:  # (a multi-prompt stream cancels its current generation itself)
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

async def _collect(gen: Generation, n: int, request):
    """Wait for a non-streamed generation: (texts, finish reasons, usage, details), or None when the client left
    (the generation is then cancelled)."""
    texts, reasons = [""] * n, [None] * n
    next_check = time.monotonic() + 0.25
    try:
        while True:
            # every 0.25 s, busy or not: a client that gave up (timeout, closed tab) stops its generation
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.25
                if await request.is_disconnected():
                    gen.cancel.set()
                    logger.info("client left before its answer was ready; generation cancelled")
                    return None
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
                return texts, reasons, ev[1], ev[2]
    finally:
        gen.cancel.set()  # no-op when finished; stops the thread if this handler was cancelled

def _token_text(tok, token_id) -> str:
    return tok.decode_bytes([token_id]).decode("utf-8", errors="replace")

def chat_logprobs(tok, entries):
    """OpenAI chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def item(t, lp):
        return {"token": _token_text(tok, t), "logprob": lp, "bytes": list(tok.decode_bytes([t]))}
    return {"content": [{**item(t, lp), "top_logprobs": [item(a, v) for a, v in alt]} for t, lp, alt in entries]}

def completion_logprobs(tok, entries, top: int):
    """OpenAI legacy format: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    tokens = [_token_text(tok, t) for t, _, _ in entries]
    offsets, pos = [], 0
    for text in tokens:
        offsets.append(pos)
        pos += len(text)
    top_lists = [({_token_text(tok, a): v for a, v in alt} if lp is not None else None) for _, lp, alt in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": top_lists if top else None, "text_offset": offsets}

async def _openai_complete(gen: Generation, req: ChatRequest, head: dict, server: Server, request):
    got = await _collect(gen, req.n, request)
    if got is None:
        return JSONResponse({}, status_code=499)
    texts, reasons, usage, details = got
    server.prompt_tokens += usage["prompt_tokens"]
    tok = gen.worker.tokenizer
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": chat_logprobs(tok, details["logprobs"][i]) if details["logprobs"] is not None else None,
                "finish_reason": reasons[i] or "stop"} for i in range(req.n)]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

async def _completion_stream(reqs, echo_texts, head, start_generation):
    """SSE for /v1/completions: the prompts one after another, choice index = prompt * n + sample."""
    gen = None
    try:
        for p, (req, echo_text) in enumerate(zip(reqs, echo_texts)):
            gen = await start_generation(req)
            chunk = lambda i, text, reason=None: _sse({**head, "choices": [{"text": text, "index": p * req.n + i,
                                                                             "logprobs": None,
                                                                             "finish_reason": reason}]})
            if req.echo:
                for i in range(req.n):
                    yield chunk(i, echo_text)
            while True:
                ev = await gen.events.get()
                if ev[0] == "delta":
                    yield chunk(ev[1], ev[2])
                elif ev[0] == "finish":
                    yield chunk(ev[1], "", ev[2])
                elif ev[0] == "error":
                    yield _sse({"error": {"message": ev[1], "type": "server_error", "param": None,
                                          "code": "generation_failed"}})
                    return
                elif ev[0] == "end":
                    break
        yield "data: [DONE]\n\n"
    finally:
        if gen is not None:
            gen.cancel.set()

# -----------------------------------------------------------------------------
# Running it

def load_workers(source, device_type, num_workers, model_tag=None, step=None, decode_dtype="auto"):
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
        dtype, note = resolve_decode_dtype(decode_dtype, model)
        workers.append(Worker(i, Engine(model, tokenizer, decode_dtype=dtype), tokenizer, device))
        logger.info("worker %d: %s step %s on %s; %s", i, source, meta.get("step"), device, note)
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
    p.add_argument("--decode-dtype", default="auto", choices=DECODE_DTYPES,
                   help="weights replies are decoded with: auto = a bf16 copy where the model computes in fp32 on CPU "
                        "(about twice the tokens/s), model = the model's own. Requests for logprobs always decode "
                        "with the model's own weights, so the logprobs reported are those of the tokens chosen")
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
    workers, meta = load_workers(source, device_type, num_workers, args.model_tag, args.step, args.decode_dtype)
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
