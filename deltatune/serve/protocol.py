"""OpenAI request validation: JSON bodies -> plain values, or an APIError (a 4xx JSON answer).

Strict on purpose: an unknown field, a wrong type or an out-of-range value is a 400 naming the field,
and OpenAI features this server does not implement (logprobs, tools, penalties, ...) are refused
instead of ignored, so a client never gets an answer computed differently from what it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.serve.engine import SamplingParams


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
                             504: "timeout_error"}.get(status, "server_error")  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# Fields accepted and ignored (they change nothing here), and fields refused unless left at their default.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_DEFAULT_ONLY = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "echo": (None, False), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
}  # fmt: skip
_SAMPLING = {"model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "stream",
             "stream_options", "best_of"}  # fmt: skip


@dataclass
class Parsed:
    model: str
    params: SamplingParams
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool


def parse_common(body: dict[str, Any], extra_fields: set[str], *, max_n: int) -> Parsed:
    allowed = _SAMPLING | extra_fields | _IGNORED | set(_DEFAULT_ONLY)
    for key in body:
        if key not in allowed:
            raise APIError(
                400, f"unknown field {key!r}; this server accepts {sorted(_SAMPLING | extra_fields)}", param=key
            )
    for key, defaults in _DEFAULT_ONLY.items():
        if key in body and body[key] not in defaults:
            raise APIError(400, f"{key}={body[key]!r} is not supported by this server; leave it out", param=key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(
            400, "field 'model' is required: the base model's id or an adapter name (GET /v1/models)", param="model"
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "top_p must be > 0 and <= 1", param="top_p")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise APIError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", param=key)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise APIError(400, f"seed must be an integer in [0, 2**63), got {seed!r}", param="seed")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not _is_int(n) or not 1 <= n <= max_n:
        raise APIError(400, f"n must be an integer from 1 to {max_n} (--max-n), got {n!r}", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of is not supported (leave it out, or equal to n)", param="best_of")
    stream = body.get("stream", False) if body.get("stream") is not None else False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise APIError(400, "stream_options may only hold include_usage", param="stream_options")
    if options and not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be true or false", param="stream_options")
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens or 0, stop=stops, seed=seed)
    return Parsed(model, params, max_tokens, n, stream, include_usage)


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages as [{"role", "content": str}]; text content parts are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "field 'messages' is required: a non-empty list of {role, content}", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param="messages")
        role, content = message.get("role"), message.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role={role!r}: use system, user or assistant", param="messages")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise APIError(400, f"messages[{i}] has unsupported fields {sorted(unknown)}", param="messages")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": role, "content": content})
    return out


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """Completion prompts: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise APIError(400, "field 'prompt' is required: a string, a list of strings, or token ids", param="prompt")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number from {low:g} to {high:g}, got {value!r}", param=key)
    return float(value)
