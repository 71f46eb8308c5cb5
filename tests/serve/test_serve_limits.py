"""Limits and safety of the server (in-process uvicorn on 127.0.0.1): API key, body size, queue, timeouts,
cancelled streams freeing their slot, adapters loaded and unloaded at run time with strict loading."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from conftest import InProcessServer, make_state, post  # noqa: E402


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def ask(cli, model="alpha", **kw):
    kw = {"temperature": 0, "max_tokens": 8, **kw}
    return cli.chat.completions.create(model=model, messages=[{"role": "user", "content": "add one and two"}], **kw)


def test_api_key_and_body_limit(assets):
    with InProcessServer(make_state(assets, ["alpha"], api_key="s3cret", max_request_bytes=2000)) as srv:
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            ask(client(srv.base, "wrong"))
        assert ask(client(srv.base, "s3cret")).choices[0].message.content
        auth = {"Authorization": "Bearer s3cret"}
        status, body = post(srv.base, "/v1/completions", {"model": "alpha", "prompt": "x" * 3000}, headers=auth)
        assert status == 413 and "--max-request-bytes" in body["error"]["message"]
        with urllib.request.urlopen(f"{srv.base}/health") as reply:  # liveness needs no key
            assert json.loads(reply.read())["status"] == "ok"


def test_cancelled_stream_frees_its_slot_and_timeouts_are_504(assets):
    state = make_state(assets, ["alpha"], max_num_seqs=1, request_timeout=60.0)
    cancelled = []
    engine_cancel = state.engine.cancel
    state.engine.cancel = lambda seqs: (cancelled.extend(s for s in seqs if s not in cancelled), engine_cancel(seqs))
    decode = state.engine._decode  # the tiny model decodes 200 tokens in well under a second: slow it down
    state.engine._decode = lambda: (time.sleep(0.02), decode())
    with InProcessServer(state) as srv:
        cli = client(srv.base)
        stream = ask(cli, max_tokens=200, stream=True, temperature=1.0, seed=0)
        next(iter(stream))
        stream.close()  # the client goes away mid-answer
        end = time.time() + 10
        # the first chunk may arrive before the engine admits the sequence, so wait for its finish
        while (not cancelled or cancelled[0].finish_reason is None or state.engine.load()["running"]) and (
            time.time() < end
        ):
            time.sleep(0.05)
        assert [s.finish_reason for s in cancelled] == ["cancelled"]
        assert len(cancelled[0].generated) < 200
        assert state.engine.load() == {"running": 0, "waiting": 0, "max_num_seqs": 1}
        assert ask(cli).choices[0].finish_reason in ("stop", "length")  # the one slot is free again
        # a non-streaming client that hangs up is noticed too
        body = json.dumps({"model": "alpha", "prompt": "add", "max_tokens": 200, "temperature": 1.0, "seed": 1})
        end = time.time() + 10
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
            while not state.engine.load()["running"] and time.time() < end:
                time.sleep(0.01)
            assert state.engine.load()["running"] == 1
        end = time.time() + 10
        while (len(cancelled) < 2 or cancelled[1].finish_reason is None) and time.time() < end:
            time.sleep(0.05)
        assert [s.finish_reason for s in cancelled] == ["cancelled", "cancelled"]
        assert len(cancelled[1].generated) < 200
        state.limits.request_timeout = 0.0  # every request is now past its deadline
        with pytest.raises(openai.APIStatusError, match="--request-timeout") as err:
            ask(cli)
        assert err.value.status_code == 504


def test_queue_full_is_429(assets):
    state = make_state(assets, ["alpha"], max_num_seqs=1)
    state.engine.max_queue = 0
    with InProcessServer(state) as srv:
        with pytest.raises(openai.RateLimitError, match="--max-queue"):
            ask(client(srv.base))


def test_adapters_load_and_unload_at_run_time(assets, tmp_path):
    import deltatune as dt

    state = make_state(assets, ["alpha"])
    with InProcessServer(state) as srv:
        cli = client(srv.base)
        before = ask(cli, model="tiny-llama").choices[0].message.content
        status, body = post(srv.base, "/v1/adapters", {"name": "beta", "path": str(assets["beta"])})
        assert status == 201 and body["id"] == "beta"
        assert [m.id for m in cli.models.list().data] == ["tiny-llama", "alpha", "beta"]
        beta = ask(cli, model="beta").choices[0].message.content
        assert beta != before
        status, body = post(srv.base, "/v1/adapters", {"name": "beta", "path": str(assets["beta"])})
        assert status == 409
        # strict loading: an adapter for another base (hidden size 48) is refused and nothing changes
        other = dt.get_tuned_model(build_model_wide(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
        other.save_pretrained(tmp_path / "wide")
        status, body = post(srv.base, "/v1/adapters", {"name": "wide", "path": str(tmp_path / "wide")})
        assert status == 400 and "was not loaded" in body["error"]["message"] and "shape" in body["error"]["message"]
        status, body = post(srv.base, "/v1/adapters", {"name": "soft", "path": str(assets["prompt"])})
        assert status == 400 and "prompt_tuning adapter" in body["error"]["message"]
        status, body = post(srv.base, "/v1/adapters", {"name": "../x", "path": str(assets["beta"])})
        assert status == 400
        assert [m.id for m in cli.models.list().data] == ["tiny-llama", "alpha", "beta"]
        status, body = post(srv.base, "/v1/adapters/beta", None, method="DELETE", raw=b"")
        assert status == 200 and body["deleted"] is True
        with pytest.raises(openai.NotFoundError):
            ask(cli, model="beta")
        assert "beta" not in state.engine.model.adapters
        assert ask(cli, model="tiny-llama").choices[0].message.content == before


def build_model_wide():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))  # fmt: skip


def test_public_interfaces_need_an_api_key():
    from deltatune.core.config import ConfigError
    from deltatune.serve.server import check_bind, parse_adapter_flags

    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(ConfigError, match="give an --api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    assert parse_adapter_flags(["a=/x/y", "/p/q/"]) == {"a": "/x/y", "q": "/p/q/"}
    with pytest.raises(ConfigError):
        parse_adapter_flags(["../a=/x"])


def test_serve_command_refuses_before_loading(assets, capsys):
    from deltatune.cli.main import main

    model = str(assets["model"])
    assert main(["serve", "--model", model, "--host", "0.0.0.0", "--port", "1"]) == 4
    assert "give an --api-key" in capsys.readouterr().err
    assert main(["serve", "--model", model, "--adapter", f"soft={assets['prompt']}", "--port", "1"]) == 4
    assert "prompt_tuning adapter" in capsys.readouterr().err
    assert main(["serve", "--model", model, "--adapter", "a=/nowhere", "--port", "1"]) == 4
    assert "does not exist" in capsys.readouterr().err
