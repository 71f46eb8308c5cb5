"""The HTTP layer: OpenAI-compatible routes on FastAPI, in front of the engine.

    GET    /v1/models                 the base model and every loaded adapter
    POST   /v1/chat/completions       chat (the model's chat template), streaming or not
    POST   /v1/completions            plain text completion, streaming or not
    POST   /v1/adapters               {"name", "path"}: load an adapter strictly, at run time
    DELETE /v1/adapters/{name}        unload one (refused while requests use it)
    GET    /health                    liveness and load (no API key needed)

The request's `model` picks the adapter (its name) or the base model (its id). Errors are
{"error": {...}} with a 4xx status for bad requests; a client that disconnects or cancels a stream
frees its rows of the batch at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.serve.engine import BASE, Engine, QueueFull, Sequence
from deltatune.serve.protocol import APIError, Parsed, parse_common, parse_messages, parse_prompts

SERVABLE_KINDS = ("delta", "select")
"""Tuner kinds whose adapters can run in the rows of a shared batch (see deltatune.core.rows)."""


@dataclass
class Limits:
    max_request_bytes: int = 1 << 20
    """Largest request body accepted (HTTP 413 beyond)."""
    request_timeout: float = 600.0
    """Seconds a request may run (queued + generating) before it is stopped (HTTP 504)."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none (capped by the room left in the context)."""
    max_n: int = 8
    """Largest `n` (choices per request)."""


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Any
    base_id: str
    adapters: dict[str, str] = field(default_factory=dict)
    """Served adapter name -> the folder it was loaded from."""
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="deltatune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error ({type(err).__name__})").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **state.engine.load()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(state, request)
        data = [_model_card(state.base_id, state.created, None)]
        data += [_model_card(name, state.created, state.base_id) for name in state.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        _check_key(state, request)
        body = await _read_json(request, state.limits.max_request_bytes)
        parsed = parse_common(body, {"messages"}, max_n=state.limits.max_n)
        messages = parse_messages(body)
        prompt_ids = [_chat_ids(state.tokenizer, messages)]
        return await _complete(state, request, parsed, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _check_key(state, request)
        body = await _read_json(request, state.limits.max_request_bytes)
        parsed = parse_common(body, {"prompt"}, max_n=state.limits.max_n)
        prompts = parse_prompts(body)
        vocab = len(state.tokenizer)
        for ids in (p for p in prompts if isinstance(p, list)):
            if not all(0 <= t < vocab for t in ids):
                raise APIError(
                    400, f"prompt token ids must be in [0, {vocab}) (this model's vocabulary)", param="prompt"
                )
        prompt_ids = [p if isinstance(p, list) else state.tokenizer(p).input_ids for p in prompts]
        return await _complete(state, request, parsed, prompt_ids, chat=False)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        _check_key(state, request)
        body = await _read_json(request, state.limits.max_request_bytes)
        name, path = body.get("name"), body.get("path")
        if set(body) - {"name", "path"} or not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, 'POST /v1/adapters takes {"name": str, "path": adapter folder}')
        if name in state.adapters or name == state.base_id or name == BASE:
            raise APIError(
                409, f"an adapter or model named {name!r} is already served; DELETE it first or pick another name"
            )
        check_servable(path)  # before the engine is asked to do anything
        await asyncio.wrap_future(state.engine.call(lambda: _load_into(state.engine.model, name, path)))
        state.adapters[name] = path
        return JSONResponse(_model_card(name, int(time.time()), state.base_id), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
        _check_key(state, request)
        if name not in state.adapters:
            raise APIError(404, f"no adapter named {name!r} is served; served: {sorted(state.adapters)}")
        path = state.adapters.pop(name)  # new requests for it get 404 from here on
        if name in state.engine.adapters_in_use():
            state.adapters[name] = path
            raise APIError(409, f"adapter {name!r} is in use by running or queued requests; retry when they finish")
        await asyncio.wrap_future(state.engine.call(lambda: state.engine.model.delete_adapter(name)))
        return {"id": name, "object": "model", "deleted": True}

    return app


# -- requests ------------------------------------------------------------------------------------------
def _check_key(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), state.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)")


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes is over the limit of {limit} (--max-request-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes (--max-request-bytes)")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from jinja2.exceptions import SecurityError, TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except SecurityError:
        raise APIError(400, "the model's chat template was refused by Jinja's sandbox") from None
    except TemplateError as err:
        raise APIError(400, f"the chat template rejected these messages: {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _adapter_for(state: ServerState, model: str) -> str:
    if model == state.base_id:
        return BASE
    if model in state.adapters:
        return model
    served = [state.base_id, *state.adapters]
    raise APIError(404, f"model {model!r} is not served; choose one of {served} (GET /v1/models)", param="model")


async def _complete(
    state: ServerState, request: Request, parsed: Parsed, prompts: list[list[int]], *, chat: bool
) -> Any:
    adapter = _adapter_for(state, parsed.model)
    engine, limits = state.engine, state.limits
    seqs: list[Sequence] = []
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + limits.request_timeout
    for ids in prompts:
        room = engine.max_model_len - len(ids)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else min(limits.default_max_tokens, room)
        if room < 1 or max_tokens > room:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, more than this server's context "
                f"of {engine.max_model_len} tokens (--max-model-len); shorten the prompt or lower max_tokens",
                param="max_tokens",
            )  # fmt: skip
        for choice in range(parsed.n):
            params = _choice_params(parsed, max_tokens, choice)
            notify = lambda seq: loop.call_soon_threadsafe(queue.put_nowait, seq)  # noqa: E731
            seqs.append(Sequence(adapter, list(ids), params, notify=notify, deadline=deadline))
    try:
        engine.submit(seqs)
    except QueueFull as err:
        raise APIError(429, f"the server is busy: {err}; retry later") from None
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if parsed.stream:
        return StreamingResponse(
            _stream(state, request, seqs, queue, parsed, ident, chat), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip
    try:
        await _wait(request, engine, seqs, queue)
    finally:
        if any(s.finish_reason is None for s in seqs):
            engine.cancel(seqs)
    _raise_failed(seqs, limits)
    choices = []
    for index, seq in enumerate(seqs):
        if chat:
            message = {"role": "assistant", "content": seq.text}
            choices.append({"index": index, "message": message, "finish_reason": seq.finish_reason, "logprobs": None})
        else:
            choices.append({"index": index, "text": seq.text, "finish_reason": seq.finish_reason, "logprobs": None})
    return {
        "id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": parsed.model, "choices": choices, "usage": _usage(seqs, parsed.n),
    }  # fmt: skip


def _choice_params(parsed: Parsed, max_tokens: int, choice: int):
    from dataclasses import replace

    seed = parsed.params.seed + choice if parsed.params.seed is not None else None  # n seeded choices differ
    return replace(parsed.params, max_tokens=max_tokens, stop=list(parsed.params.stop), seed=seed)


async def _wait(request: Request, engine: Engine, seqs: list[Sequence], queue: asyncio.Queue) -> None:
    """Until every sequence finished; a client that went away cancels them (checked twice a second)."""
    checked = time.monotonic()
    while any(s.finish_reason is None for s in seqs):
        try:
            await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            pass
        if time.monotonic() - checked >= 0.5:
            checked = time.monotonic()
            if await request.is_disconnected():
                engine.cancel(seqs)
                return


def _raise_failed(seqs: list[Sequence], limits: Limits) -> None:
    reasons = {s.finish_reason for s in seqs}
    if "timeout" in reasons:
        raise APIError(
            504, f"the request ran past the server's timeout of {limits.request_timeout:g} s (--request-timeout)"
        )
    failed = next((s for s in seqs if s.finish_reason == "error"), None)
    if failed is not None:
        status = 404 if "was unloaded" in (failed.error or "") else 500
        raise APIError(status, f"generation failed: {failed.error}")


def _usage(seqs: list[Sequence], n: int) -> dict[str, int]:
    prompt = sum(len(s.prompt_ids) for s in seqs[::n])
    completion = sum(len(s.generated) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(
    state: ServerState,
    request: Request,
    seqs: list[Sequence],
    queue: asyncio.Queue,
    parsed: Parsed,
    ident: str,
    chat: bool,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of new text per choice, the finish, usage, [DONE]."""
    created, sent, closed = int(time.time()), [0] * len(seqs), [False] * len(seqs)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": ident, "object": kind, "created": created, "model": parsed.model, "choices": [choice]}
        if parsed.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            for index in range(len(seqs)):
                yield chunk(index, None, None, first=True)
        while not all(closed):
            try:
                await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            for index, seq in enumerate(seqs):
                if closed[index]:
                    continue
                text = seq.text
                if len(text) > sent[index]:
                    yield chunk(index, text[sent[index] :], None)
                    sent[index] = len(text)
                if seq.finish_reason is not None:
                    closed[index] = True
                    if seq.finish_reason in ("stop", "length"):
                        yield chunk(index, None, seq.finish_reason)
        try:
            _raise_failed(seqs, state.limits)
        except APIError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        else:
            if parsed.include_usage:
                usage = {"id": ident, "object": kind, "created": created, "model": parsed.model, "choices": [],
                         "usage": _usage(seqs, parsed.n)}  # fmt: skip
                yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # normal end, client gone, or the task cancelled: free the rows
        if any(s.finish_reason is None for s in seqs):
            state.engine.cancel(seqs)


# -- adapters ------------------------------------------------------------------------------------------
def check_servable(path: str) -> None:
    """Refuse, before loading anything, an adapter folder this server cannot batch (HTTP 400)."""
    from deltatune.core.config import ConfigError
    from deltatune.core.registry import spec_for_config
    from deltatune.io import AdapterFileError
    from deltatune.io.peft_format import read_config

    if not Path(path).is_dir():
        raise APIError(400, f"adapter folder {path!r} does not exist on the server", param="path")
    try:
        spec = spec_for_config(read_config(path))
    except (ConfigError, AdapterFileError, OSError) as err:
        raise APIError(400, f"adapter {path!r}: {err}", param="path") from None
    if spec.kind not in SERVABLE_KINDS:
        raise APIError(
            400, f"adapter {path!r} is a {spec.name} adapter ({spec.kind} tuner), which this server cannot batch with "
            "others; serve it with `deltatune infer`, or merge it first if it can be merged", param="path",
        )  # fmt: skip


def _load_into(model: Any, name: str, path: str) -> None:
    """Strict load (exact keys and shapes, finite values), in the engine thread; errors become 400s."""
    from deltatune.core.config import ConfigError
    from deltatune.core.tuned_model import AdapterLoadError
    from deltatune.io import AdapterFileError

    try:
        model.load_adapter(path, adapter_name=name)
    except (ConfigError, AdapterLoadError, AdapterFileError, OSError) as err:
        raise APIError(400, f"adapter {path!r} was not loaded: {err}", param="path") from None
    model.eval()


def _model_card(name: str, created: int, parent: str | None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "deltatune", "root": parent or name,
            "parent": parent}  # fmt: skip
