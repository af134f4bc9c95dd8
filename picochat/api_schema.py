"""
The OpenAI chat-completions and (legacy) completions requests as picochat serve accepts them: limits, and
validation that turns every malformed request into an APIError (HTTP 400 with an OpenAI-style error body) naming
the field and the fix.
"""
import json
import math
import random
from dataclasses import dataclass, field

ROLES = ("system", "developer", "user", "assistant")   # "developer" is OpenAI's newer name for system

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
    logprobs: int | None = None   # top alternatives per token to report (0: only the chosen token's); None: off
    prompt_tokens: list | None = None  # /v1/completions: the raw prompt as token ids (no chat template)
    echo: bool = False            # /v1/completions: the prompt comes back in front of the text (and its logprobs)
    prompt: str | list | None = None  # /v1/completions: the prompt as the client sent it (text, or token ids)

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 20 on chat, 5 on legacy completions)

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

# Parameters a client may send that picochat cannot honour, with the values that change nothing: any other value
# is a 400 naming the parameter (a JSON-mode client must not get free text back as if it had asked for it).
UNHONOURED = {
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "min_p": (None, 0, 0.0),
    "top_a": (None, 0, 0.0),
    "typical_p": (None, 1, 1.0),
    "repetition_penalty": (None, 1, 1.0),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}

def parse_chat_request(body, limits: Limits, defaults: dict) -> ChatRequest:
    """Validate an OpenAI /v1/chat/completions body (plus the top_k extension). Raises APIError."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_type")
    messages = validate_messages(body.get("messages"), limits)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError("'model' must be a string", param="model", code="invalid_type")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    s = _sampling(body, limits, defaults, defaults["max_tokens"], 1, max_tokens_key=key)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise APIError("'stream_options' must be an object like {\"include_usage\": true}",
                           param="stream_options", code="invalid_type")
        include_usage = opts.get("include_usage", False)
    logprobs = body.get("logprobs")
    if logprobs not in (None, True, False):
        raise APIError("'logprobs' must be true or false", param="logprobs", code="invalid_type")
    top = _number(body, "top_logprobs", 0, MAX_LOGPROBS, None, integer=True)
    if top is not None and not logprobs:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    logprobs = (top or 0) if logprobs else None
    if logprobs is not None and s["stream"]:
        raise APIError("'logprobs' is only available without streaming (stream: false)", param="logprobs",
                       code="unsupported")
    # Features we do not have: say so instead of silently ignoring them.
    if body.get("tools") or body.get("functions"):
        raise APIError("'tools' are not supported", param="tools", code="unsupported")
    _refuse_unhonoured(body)
    return ChatRequest(messages=messages, include_usage=include_usage, logprobs=logprobs, **s)

def _refuse_unhonoured(body):
    for key, harmless in UNHONOURED.items():
        if key in body and body[key] not in harmless:  # silently ignoring it would give the client other output
            raise APIError(f"'{key}' is not supported by this server (allowed: {harmless!r})", param=key,
                           code="unsupported")

def _sampling(body, limits, defaults, max_tokens_default, max_tokens_floor, max_tokens_key="max_tokens"):
    """The sampling fields both endpoints share -> dict. Features we do not have are refused by name, never
    silently ignored."""
    max_tokens = _number(body, max_tokens_key, max_tokens_floor, limits.max_tokens_limit, None, integer=True)
    if max_tokens is None:
        max_tokens = min(max_tokens_default, limits.max_tokens_limit)
    top_p = _number(body, "top_p", 0.0, 1.0, None, lo_open=True)
    top_k = _number(body, "top_k", 0, limits.max_top_k, defaults["top_k"], integer=True)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError("'seed' must be an integer", param="seed", code="invalid_type")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream", code="invalid_type")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > limits.max_stop
            or not all(isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars for s in stop)):
        raise APIError(f"'stop' must be a string or a list of at most {limits.max_stop} non-empty strings "
                       f"of at most {limits.max_stop_chars} characters", param="stop", code="invalid_value")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise APIError(f"'{key}' is not supported (only 0)", param=key, code="unsupported")
    return dict(max_tokens=int(max_tokens), temperature=float(_number(body, "temperature", 0.0, 2.0,
                                                                      defaults["temperature"])),
                top_p=None if top_p is None or top_p >= 1.0 else float(top_p), top_k=int(top_k) if top_k else None,
                n=int(_number(body, "n", 1, limits.max_n, 1, integer=True)), stream=stream, stop=stop,
                seed=random.randint(0, 2**31 - 1) if seed is None else seed % 2**63)

def parse_completion_request(body, limits: Limits, defaults: dict, encode, vocab_size: int) -> list:
    """Validate an OpenAI /v1/completions body -> one ChatRequest per prompt (prompt_tokens set, messages empty).
    prompt: a string, a list of strings, a list of token ids, or a list of such lists. encode: str -> ids.
    max_tokens may be 0 with echo (score the prompt only), as OpenAI allows; default 16, as OpenAI's."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_type")
    prompt = body.get("prompt")
    is_ids = lambda p: isinstance(p, list) and p and all(_is_int(t) for t in p)
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError("'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id "
                       "lists (none of them empty)", param="prompt", code="invalid_type")
    if len(prompts) > limits.max_messages:
        raise APIError(f"too many prompts: {len(prompts)} > {limits.max_messages}", param="prompt",
                       code="too_many_prompts")
    token_lists = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if len(p) > limits.max_total_chars:
                raise APIError(f"prompt {i} is too long: {len(p)} > {limits.max_total_chars} characters",
                               param="prompt", code="content_too_long")
            ids = encode(p)
        else:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise APIError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
                               param="prompt", code="invalid_value")
            ids = list(p)
        if not ids:
            raise APIError(f"prompt {i} is empty", param="prompt", code="empty_content")
        token_lists.append(ids)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError("'echo' must be true or false", param="echo", code="invalid_type")
    logprobs = _number(body, "logprobs", 0, MAX_LOGPROBS, None, integer=True)
    if body.get("suffix") not in (None, ""):
        raise APIError("'suffix' (insertion) is not supported", param="suffix", code="unsupported")
    if body.get("best_of") not in (None, 1):
        raise APIError("'best_of' is not supported (only 1)", param="best_of", code="unsupported")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError("'model' must be a string", param="model", code="invalid_type")
    s = _sampling(body, limits, defaults, 16, 0 if echo else 1)
    if logprobs is not None and s["stream"]:
        raise APIError("'logprobs' is only available without streaming (stream: false)", param="logprobs",
                       code="unsupported")
    if s["max_tokens"] == 0 and s["stream"]:
        raise APIError("'max_tokens': 0 (score the prompt) needs stream: false", param="max_tokens",
                       code="invalid_value")
    _refuse_unhonoured(body)
    return [ChatRequest(messages=[], prompt_tokens=ids, prompt=p, echo=echo, logprobs=logprobs, include_usage=False,
                        **s) for p, ids in zip(prompts, token_lists)]

