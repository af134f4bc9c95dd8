"""
The serving machinery behind `picochat serve`, independent of HTTP: a pool of model replicas ("workers"), one
generation per request on one worker in a thread, per-token log-probabilities, and the Prometheus metrics.

Every worker sits in an asyncio.Queue of idle workers. A request takes one, and a thread runs the (synchronous)
Engine, pushing decoded text into that request's own asyncio queue, so concurrent streams can never mix. The
generation thread owns the worker until it exits and then puts it back itself, so a worker is never returned
while its engine is still running. A client disconnect sets the request's cancel flag; the thread stops at the
next token and the worker is free again.
"""
import time
import asyncio
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from picochat.api_schema import APIError, ChatRequest
from picochat.common import logger
from picochat.engine import TextStreamer

# -----------------------------------------------------------------------------
# Log-probabilities

@torch.inference_mode()
def token_logprobs(model, ids: list, top: int) -> list:
    """[(token id, log p(token | the tokens before it), [(alternative id, log p)] * top)] for ids[1:] under the
    model's own distribution (temperature 1, no top-k: what OpenAI's logprobs report), from one forward pass.
    ids[0] has no context, so it is not scored. The chosen token's value and the top list come from the same
    tensor, so "is this token the greedy one" is an exact float comparison."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, :-1].float()
    logp = F.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:], device=device)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    if top:
        values, indices = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [(t, lp, alt) for t, lp, alt in zip(ids[1:], chosen, alternatives)]

# -----------------------------------------------------------------------------
# Metrics (Prometheus text format at GET /metrics)

class Metrics:
    """Per-app registry (not the process-global one: tests and notebooks make several apps)."""
    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

    def __init__(self, server):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("picochat_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("picochat_request_seconds", "request latency (to the last byte for streams)",
                                 ["endpoint"], buckets=self.LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("picochat_time_to_first_token_seconds", "time from start to the first generated token",
                              buckets=self.LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("picochat_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("picochat_completion_tokens", "tokens generated", registry=r)
        self.generations = Counter("picochat_generations", "finished generations by outcome", ["outcome"], registry=r)
        Gauge("picochat_queue_depth", "requests waiting for a worker", registry=r).set_function(lambda: server.waiting)
        Gauge("picochat_active_generations", "workers generating now", registry=r).set_function(
            lambda: sum(w.busy for w in server.workers))
        Gauge("picochat_workers", "model replicas", registry=r).set_function(lambda: len(server.workers))

# -----------------------------------------------------------------------------
# Workers and generation

@dataclass
class Worker:
    id: int
    engine: object
    tokenizer: object
    device: object
    busy: bool = False

class Row:
    """One choice being decoded: UTF-8-safe text via TextStreamer, stop-string matching with a hold-back
    window (text that might be the beginning of a stop string is not emitted until it is resolved)."""
    def __init__(self, streamer, stops):
        self.streamer, self.stops = streamer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending, self.text = "", ""
        self.tokens, self.done, self.finish_reason = 0, False, None
        self.ids = []  # the generated token ids (for logprobs)

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
        self.ids.append(token_id)
        return self._emit(self.streamer.add(token_id))

    def finish(self, reason) -> str:
        out = self._emit(self.streamer.finish(), final=True) if not self.done else ""
        if not self.done:
            self.done, self.finish_reason = True, reason
        return out

def sequence_len(engine):
    model = getattr(engine, "model", None)
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None)

class Generation:
    """One request's generation on one worker, in a thread. Events go to `self.events` (an asyncio.Queue):
    ("delta", index, text) / ("finish", index, reason) / ("end", usage dict, details) / ("error", message).
    details: {"prompt": prompt ids, "logprobs": per row [(token, logprob, top)] for prompt (echo) + generated
    tokens, or None}. A request with prompt_tokens is a raw completion: no chat template, BOS in front."""
    def __init__(self, server, worker: Worker, req: ChatRequest):
        self.server, self.worker, self.req = server, worker, req
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.cancel = threading.Event()
        self.started_at, self.first_token_at = time.time(), None
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
                bos = tok.get_bos_token_id()
                if req.prompt_tokens is not None:  # raw completion, conditioned on BOS like every document
                    prompt = req.prompt_tokens if req.prompt_tokens[0] == bos else [bos] + req.prompt_tokens
                else:
                    prompt = engine.chat_prompt(req.messages, req.max_tokens)
                seq_len = sequence_len(engine)
                # the engine caps max_tokens at what fits in the context; mirror that to label "length" honestly
                budget = req.max_tokens if seq_len is None else max(0, min(req.max_tokens, seq_len - len(prompt)))
                terminal = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
                rows = [Row(TextStreamer(tok), req.stop) for _ in range(req.n)]
                # logprobs are the master model's: decode with it too, so "the greedy token" is the model's argmax
                gen = engine.generate(prompt, num_samples=req.n, max_tokens=req.max_tokens,
                                      temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                                      exact=req.logprobs is not None)
                try:
                    for column, _masks in (gen if budget > 0 else ()):
                        if self.first_token_at is None:
                            self.first_token_at = time.time()
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
                bos_added = req.prompt_tokens is not None and req.prompt_tokens[0] != bos
                details = {"prompt": prompt, "bos_added": bos_added, "logprobs": None}
                if req.logprobs is not None and not self.cancel.is_set():
                    model = getattr(engine, "model", engine)
                    # entry k scores token k+1: with echo every prompt token after the first, else the answer's only
                    scored_from = 0 if req.echo else len(prompt) - 1
                    details["logprobs"] = [token_logprobs(model, prompt + row.ids, req.logprobs)[scored_from:]
                                           for row in rows]
            completion = sum(r.tokens for r in rows)
            final = ("end", {"prompt_tokens": len(prompt), "completion_tokens": completion,
                             "total_tokens": len(prompt) + completion}, details)
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
            if self.first_token_at is not None:
                self.server.metrics.ttft.observe(self.first_token_at - self.started_at)
            self.server.release(self.worker, sum(r.tokens for r in rows), outcome,
                                len(prompt) if final[0] == "end" else 0)
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
        self.metrics = Metrics(self)

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

    def release(self, worker, tokens, outcome, prompt_tokens=0):
        """Called from the generation thread when it is completely done with the worker.
        outcome: "served" | "cancelled" (client left) | "failed" (the engine raised)."""
        self.metrics.completion_tokens.inc(tokens)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generations.labels(outcome).inc()
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
