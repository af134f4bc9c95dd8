"""
The server's first line against hostile HTTP input, as plain ASGI middleware wrapped around the app:

    app = RequestGuard(create_app(...), max_body_bytes=..., body_timeout=30.0)

Before the app sees a request it
  * refuses request headers larger than max_header_bytes in total: 431, as JSON;
  * reads the body itself, enforcing the size limit WHILE it streams in (a declared Content-Length over the limit
    is refused before a byte is read; a chunked upload is cut off the moment it passes the limit): 413;
  * gives up on a body that stalls for body_timeout seconds between chunks: 408 (a slow-loris upload cannot
    hold a connection and its buffer forever);
  * treats a client that disconnects mid-upload as one log line, not a traceback.
The app then gets the body replayed from memory (at most max_body_bytes), and later receive() calls go to the
real connection, so disconnect detection keeps working. Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.

Header floods beyond uvicorn's own parser limit (h11_max_incomplete_event_size, raised by `picochat serve` to
H11_MAX_EVENT_BYTES) are refused by uvicorn itself with a plain-text 400 before any app code runs; nothing in
the ASGI interface reaches those.
"""
import re
import json
import asyncio
import logging

MAX_HEADER_BYTES = 16 * 1024
H11_MAX_EVENT_BYTES = 256 * 1024   # uvicorn's header parser limit: above ours, so ours answers first, in JSON
MAX_JSON_DEPTH = 32                 # a chat request nests 5 deep (body, messages, message, content parts, part)
DRAIN_BYTES = 8 * 1024 * 1024       # an oversized body up to this size is read and dropped before the 413, so the
                                    # client, still sending, gets the answer instead of a connection reset

logger = logging.getLogger("picochat")


def error_body(message, code, type_="invalid_request_error", param=None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in a JSON text, found without parsing it (the parser itself would hit the
    recursion limit first): strings are cut out, then only the bracket characters are walked (regexes do the
    scanning, so a 4 MB body costs milliseconds)."""
    depth = deepest = 0
    for ch in _BRACKETS.findall(_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class _TooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app, max_body_bytes: int, body_timeout: float = 30.0, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app, self.max_body, self.timeout, self.max_headers = app, max_body_bytes, body_timeout, max_header_bytes
        self.state = getattr(app, "state", None)  # so callers (tests) reach the app's state through the wrapper

    async def _reply(self, send, status, message, code):
        body = error_body(message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive, size):
        """Read and drop the rest of a body, up to DRAIN_BYTES in all (past that the connection just closes)."""
        try:
            while size <= DRAIN_BYTES:
                message = await asyncio.wait_for(receive(), timeout=self.timeout)
                size += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
        except asyncio.TimeoutError:
            return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_headers:
            return await self._reply(send, 431, f"request headers too large ({header_bytes} bytes; limit "
                                                f"{self.max_headers})", "headers_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            if int(declared) <= DRAIN_BYTES:
                await self._drain(receive, 0)
            return await self._reply(send, 413, f"request body too large ({int(declared)} bytes; limit "
                                                f"{self.max_body})", "body_too_large")
        chunks, size = [], 0
        try:
            while True:
                message = await asyncio.wait_for(receive(), timeout=self.timeout)
                if message["type"] == "http.disconnect":
                    logger.info("client disconnected during the upload of %s %s", scope["method"], scope["path"])
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise _TooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.TimeoutError:
            return await self._reply(send, 408, f"the request body stalled for {self.timeout:g} s; send it "
                                                "without pauses", "body_timeout")
        except _TooLarge:
            await self._drain(receive, size)
            return await self._reply(send, 413, f"request body too large (over {self.max_body} bytes)",
                                     "body_too_large")

        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the real connection (http.disconnect)

        return await self.app(scope, replay, send)


class RequestMetrics:
    """ASGI middleware that reports every HTTP request once it has ENDED (the last byte of a stream sent, or the
    client gone): on_done(path, status, seconds). Paths outside `known` are reported as "other", so a scanner
    probing random URLs cannot grow the metrics without bound."""
    def __init__(self, app, on_done, known=()):
        self.app, self.on_done, self.known = app, on_done, frozenset(known)
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = asyncio.get_running_loop().time(), [500]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            path = scope["path"] if scope["path"] in self.known else "other"
            self.on_done(path, status[0], asyncio.get_running_loop().time() - t0)
