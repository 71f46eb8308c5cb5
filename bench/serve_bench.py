"""Serving throughput and latency: `deltatune serve` (continuous batching, mixed adapters) against one
request at a time and against peft's `adapter_names` batching driven by the same clients.

    OMP_WAIT_POLICY=PASSIVE python -m bench.serve_bench [--threads 2] [--clients 16] [--rounds 2]

SmolLM2-135M-Instruct (real weights, fp32, CPU) with 4 LoRA adapters (r 8 on q/k/v/o, B drawn non-zero so
every adapter path really runs). Each of `clients` threads sends `rounds` chat requests one after the
other, each to one of the 4 adapters, greedy, max_tokens between 24 and 48.

- deltatune serve: the real server in a subprocess, the official `openai` client, over HTTP;
- one at a time: the same server, one client sending the same requests in turn;
- peft: a PeftModel holding the same 4 adapters; a worker takes every waiting request (up to `clients`),
  runs one left-padded `generate(adapter_names=...)` for them (static batching: a batch runs until its
  longest answer is done), and hands the answers back. In-process, so it pays no HTTP or JSON costs.

tokens/s counts generated tokens (the `usage` the server reports; for peft, tokens up to each request's
EOS or max_tokens) over the wall time of the whole load; latency is per request, submit to last token.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Name three colours of the rainbow.", "How many legs does a spider have?",
    "Give me a short tip for staying focused.", "What is 12 times 12?", "Describe the sea in one sentence.",
    "Why is the sky blue?", "Suggest a name for a cat.", "What do bees make?", "Write a haiku about rain.",
    "What is the boiling point of water?", "Tell me a fun fact about octopuses.", "What is a prime number?",
    "Recommend a good habit for mornings.", "What language is spoken in Brazil?", "How do plants make food?",
]  # fmt: skip
ADAPTERS = ("a0", "a1", "a2", "a3")


def make_adapters(folder: Path, base_dir: str) -> dict[str, str]:
    import torch
    from transformers import LlamaForCausalLM

    import deltatune as dt

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(0)  # A's initialisation: the same adapters in every run
    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    tuned = dt.get_tuned_model(model, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        tuned.add_adapter(name, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=gen)
    from deltatune.io import write_adapter

    paths = {}
    for name in ADAPTERS:  # the PEFT files save_pretrained writes, one folder per adapter
        config = tuned.adapters[name].config.replace(inference_mode=True, base_model_name_or_path=base_dir)
        write_adapter(folder / name, config, tuned.adapter_state_dict(name))
        paths[name] = str(folder / name)
    return paths


def workload(clients: int, rounds: int) -> list[list[tuple[str, str, int]]]:
    """Per client: [(adapter, question, max_tokens)] sent one after the other."""
    jobs = []
    for c in range(clients):
        jobs.append([(ADAPTERS[(c + r) % 4], QUESTIONS[(c * rounds + r) % len(QUESTIONS)], 24 + 8 * ((c + 3 * r) % 4))
                     for r in range(rounds)])  # fmt: skip
    return jobs


def summarize(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"setup": name, "requests": len(latencies), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(statistics.median(ordered), 2), "p95_s": round(p95, 2)}  # fmt: skip


# -- deltatune serve --------------------------------------------------------------------------------
def start_server(base_dir: str, adapters: dict[str, str], threads: int, max_num_seqs: int):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "deltatune.cli.main", "serve", "--model", base_dir, "--port", str(port),
           "--threads", str(threads), "--max-num-seqs", str(max_num_seqs),
           *[f"--adapter={n}={p}" for n, p in adapters.items()]]  # fmt: skip
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(log.read()[-2000:])
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def drive_server(base: str, jobs: list[list[tuple[str, str, int]]], parallel: bool) -> dict:
    import openai

    cli = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(job):
        adapter, question, max_tokens = job
        start = time.perf_counter()
        reply = cli.chat.completions.create(model=adapter, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=max_tokens)  # fmt: skip
        return time.perf_counter() - start, reply.usage.completion_tokens

    def client(seq):
        return [one(job) for job in seq]

    start = time.perf_counter()
    if parallel:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = [r for rs in pool.map(client, jobs) for r in rs]
    else:
        results = client([job for seq in jobs for job in seq])
    wall = time.perf_counter() - start
    name = "deltatune serve, concurrent" if parallel else "deltatune serve, one at a time"
    return summarize(name, [r[0] for r in results], sum(r[1] for r in results), wall)


# -- peft -------------------------------------------------------------------------------------------
def drive_peft(base_dir: str, adapters: dict[str, str], jobs: list[list[tuple[str, str, int]]], threads: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    eos = tokenizer.eos_token_id
    waiting: queue.Queue = queue.Queue()
    stop = threading.Event()

    def worker():
        with torch.inference_mode():
            while not stop.is_set():
                try:
                    first = waiting.get(timeout=0.05)
                except queue.Empty:
                    continue
                batch = [first]
                while len(batch) < len(jobs):
                    try:
                        batch.append(waiting.get_nowait())
                    except queue.Empty:
                        break
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                       tokenize=False) for (_, q, _), _ in batch]  # fmt: skip
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, adapter_names=[a for (a, _, _), _ in batch], do_sample=False,
                                     max_new_tokens=max(n for (_, _, n), _ in batch), pad_token_id=eos)  # fmt: skip
                for row, ((_, _, n), reply) in enumerate(batch):
                    new = out[row, enc["input_ids"].shape[1] :].tolist()[:n]
                    count = next((i + 1 for i, t in enumerate(new) if t == eos), len(new))
                    reply.put(count)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()

    def client(seq):
        results = []
        for job in seq:
            reply: queue.Queue = queue.Queue()
            start = time.perf_counter()
            waiting.put((job, reply))
            count = reply.get()
            results.append((time.perf_counter() - start, count))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [r for rs in pool.map(client, jobs) for r in rs]
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    return summarize("peft adapter_names, batched", [r[0] for r in results], sum(r[1] for r in results), wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["serve", "single", "peft"])
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from bench.worker import pretrained_folder

    base_dir = pretrained_folder("smollm2")
    jobs = workload(args.clients, args.rounds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), base_dir)
        if "serve" not in args.skip or "single" not in args.skip:
            proc, base = start_server(base_dir, adapters, args.threads, args.clients)
            try:
                drive_server(base, [[(ADAPTERS[0], QUESTIONS[0], 4)]], parallel=False)  # warm-up
                if "serve" not in args.skip:
                    rows.append(drive_server(base, jobs, parallel=True))
                    print(json.dumps(rows[-1]), flush=True)
                if "single" not in args.skip:
                    rows.append(drive_server(base, jobs, parallel=False))
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        if "peft" not in args.skip:
            rows.append(drive_peft(base_dir, adapters, jobs, args.threads))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| setup | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setup']} | {row['requests']} | {row['tokens']} | {row['wall_s']} | {row['tokens_per_s']} | "
              f"{row['p50_s']} | {row['p95_s']} |")  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
