"""A tiny Llama + tokenizer + adapters on disk, and `deltatune serve` on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_helpers import build_tokenizer  # noqa: E402

ADAPTERS = ("alpha", "beta", "gamma")


def build_model(vocab_size: int):
    """A tiny Llama whose next-token choices are far apart (greedy text is stable across batch shapes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=1, pad_token_id=1,
        bos_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def adapter_configs():
    import deltatune as dt

    return {
        "alpha": dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "beta": dt.LoraConfig(
            r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], use_dora=True, init_lora_weights=False
        ),
        "gamma": dt.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    }


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{"model": folder, "alpha"/"beta"/"gamma": adapter folders, "prompt": a prompt-tuning adapter}."""
    import torch

    import deltatune as dt

    root = tmp_path_factory.mktemp("serve")
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    paths = {"model": model_dir}
    for seed, (name, config) in enumerate(adapter_configs().items()):
        torch.manual_seed(100 + seed)
        tuned = dt.get_tuned_model(build_model(len(tokenizer)), config)
        tuned.save_pretrained(root / name)
        paths[name] = root / name
    torch.manual_seed(7)
    dt.get_tuned_model(
        build_model(len(tokenizer)), dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    ).save_pretrained(root / "prompt")
    paths["prompt"] = root / "prompt"
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base: str, proc=None, timeout: float = 120.0, log=None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with status {proc.returncode}: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if pytest itself is killed, so no server outlives its test run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@pytest.fixture(scope="session")
def server(assets):
    """The real `deltatune serve` command in a subprocess; yields its base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    flags = [f"--adapter={name}={assets[name]}" for name in ADAPTERS]
    cmd = [sys.executable, "-m", "deltatune.cli.main", "serve", "--model", str(assets["model"]), *flags,
           "--port", str(port), "--threads", "1", "--max-num-seqs", "8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(assets["model"].parent / "server.log", "w+")  # a file, not a pipe nobody reads (it could fill up)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log=log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class InProcessServer:
    """uvicorn in a thread, for tests that need their own limits (API key, one slot, short timeouts)."""

    def __init__(self, state):
        import uvicorn

        from deltatune.serve.app import create_app

        self.state = state
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_ready(self.base, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.state.engine.close()


def make_state(assets, adapters=ADAPTERS, *, api_key=None, max_num_seqs=8, **limits):
    """A ServerState over the tiny assets (what `deltatune serve` builds), in this process."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from deltatune.core.tuned_model import TunedModel
    from deltatune.serve.app import Limits, ServerState
    from deltatune.serve.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    tuned = TunedModel(LlamaForCausalLM.from_pretrained(assets["model"]).eval(), None)
    for name in adapters:
        tuned.load_adapter(assets[name], adapter_name=name)
    tuned.eval()
    engine = Engine(tuned, tokenizer, max_num_seqs=max_num_seqs, max_model_len=256)
    served = {name: str(assets[name]) for name in adapters}
    return ServerState(engine, tokenizer, "tiny-llama", served, api_key, Limits(**limits))


def post(base: str, path: str, body, *, headers=None, method="POST", raw: bytes | None = None):
    """(status, JSON body) of a raw HTTP request (no client library in between)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
