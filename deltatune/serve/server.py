"""`deltatune serve`: load the base model once, load every adapter strictly, run the HTTP server."""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

from deltatune.core.config import ConfigError, check_adapter_name

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_adapter_flags(values: list[str]) -> dict[str, str]:
    """--adapter name=path (repeatable) -> {name: path}; a bare path is served as its folder's name."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            name = os.path.basename(os.path.normpath(value))
        check_adapter_name(name)
        if name in adapters:
            raise ConfigError(f"--adapter {value!r}: the name {name!r} is given twice; give each adapter its own name")
        adapters[name] = path
    return adapters


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    try:
        local = host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local and not api_key:
        raise ConfigError(
            f"--host {host} makes the server reachable from other machines; give an --api-key (or set "
            "DELTATUNE_API_KEY) so that only clients holding it get answers"
        )


def build_state(ns: Any) -> Any:
    """A ServerState (model, tokenizer, adapters, engine) from parsed `deltatune serve` flags."""
    from deltatune.core.tuned_model import TunedModel
    from deltatune.models import load_model, load_tokenizer, resolve_model
    from deltatune.serve.app import Limits, ServerState, check_servable
    from deltatune.serve.engine import Engine
    from deltatune.serve.protocol import APIError

    adapters = parse_adapter_flags(ns.adapter)
    for name, path in adapters.items():  # every adapter's config checked before any weights load
        try:
            check_servable(path)
        except APIError as err:
            raise ConfigError(f"--adapter {name}={path}: {err.message}") from None
    source, _ = resolve_model(ns.model, trust_remote_code=ns.trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=ns.trust_remote_code)
    model = load_model(source, dtype=ns.dtype, trust_remote_code=ns.trust_remote_code)
    tuned = TunedModel(model, None)
    for name, path in adapters.items():
        tuned.load_adapter(path, adapter_name=name)
    tuned.eval()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    max_model_len = min(ns.max_model_len, limit) if ns.max_model_len else limit
    engine = Engine(tuned, tokenizer, max_num_seqs=ns.max_num_seqs, max_queue=ns.max_queue, max_model_len=max_model_len)
    base_id = ns.served_model_name or os.path.basename(os.path.normpath(str(ns.model)))
    if base_id in adapters:
        raise ConfigError(f"adapter name {base_id!r} is also the base model's id; rename it or set --served-model-name")
    limits = Limits(
        max_request_bytes=ns.max_request_bytes, request_timeout=ns.request_timeout,
        default_max_tokens=ns.default_max_tokens, max_n=ns.max_n,
    )  # fmt: skip
    api_key = ns.api_key or os.environ.get("DELTATUNE_API_KEY") or None
    return ServerState(engine, tokenizer, base_id, dict(adapters), api_key, limits)


def run(ns: Any) -> int:
    try:
        import uvicorn

        from deltatune.serve.app import create_app
    except ImportError as err:
        raise ConfigError(
            f"deltatune serve needs the 'serve' extra ({err.name} is missing): pip install 'deltatune[serve]'"
        ) from None

    api_key = ns.api_key or os.environ.get("DELTATUNE_API_KEY") or None
    check_bind(ns.host, api_key)
    for flag in ("max_num_seqs", "max_queue", "max_request_bytes", "default_max_tokens", "max_n"):
        if getattr(ns, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(ns, flag)}")
    if ns.request_timeout <= 0:
        raise ConfigError(f"--request-timeout must be > 0 seconds, got {ns.request_timeout}")
    state = build_state(ns)
    app = create_app(state)
    names = ", ".join([state.base_id, *state.adapters])
    print(f"deltatune serve: {names} on http://{ns.host}:{ns.port}/v1 (max {ns.max_num_seqs} sequences)", flush=True)
    config = uvicorn.Config(
        app, host=ns.host, port=ns.port, log_level=ns.log_level, timeout_keep_alive=5, timeout_graceful_shutdown=5,
    )  # fmt: skip
    try:
        uvicorn.Server(config).run()
    finally:
        state.engine.close()
    sys.stdout.flush()
    return 0


def add_flags(parser: Any) -> None:
    """The `deltatune serve` flags (besides --model, --dtype, --trust-remote-code, --threads)."""
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH",
        help="serve an adapter folder under NAME (the request's `model`); repeatable",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or DELTATUNE_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="the base model's id (default: --model's last part)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (batch rows)")
    parser.add_argument("--max-queue", type=int, default=256, help="sequences waiting beyond that (HTTP 429 past it)")
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: model's)")
    parser.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    parser.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (HTTP 413)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (HTTP 504 past it)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
