"""The serving engine: continuous batching over one base model with many adapters.

One background thread owns the model. Between decoding steps it

1. runs queued control calls (load / unload an adapter),
2. drops finished, cancelled and timed-out sequences, freeing their slots (rows of the batch),
3. admits waiting sequences up to `max_num_seqs`: their prompts run as one left-padded prefill batch
   (each row with its own adapter), and their KV cache joins the running batch,
4. decodes one token for every running sequence in one forward pass, each row with its own adapter
   (`TunedModel.forward(adapter_names=...)`: the base weights are read once per step for all rows).

The running batch's KV cache is kept right-aligned: every row's newest token sits in the last column,
shorter histories are padded on the left and masked out. A joining prefill is padded to the batch's
width (or the batch to the prefill's), leaving rows are cut out, and columns that only pad are
dropped. Positions are counted per row from its own tokens, so padding never changes what a row
computes beyond floating-point rounding.

Sampling per row: greedy for temperature 0, else softmax(logits / T) cut to the smallest set of
tokens whose probability reaches top_p, drawn with the row's own generator (seeded when the request
gives `seed`). Nothing here logs prompts or outputs.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

BASE = "__base__"


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (HTTP 429)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One choice of one request, from waiting to finished."""

    adapter: str
    """Adapter name, or BASE."""
    prompt_ids: list[int]
    params: SamplingParams
    notify: Callable[[Sequence], None] = lambda seq: None
    """Called from the engine thread after each new piece of text and when the sequence finishes."""
    deadline: float = float("inf")
    """time.monotonic() after which the sequence stops with finish_reason "timeout"."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    """Text released so far (complete characters, stop strings cut off)."""
    finish_reason: str | None = None
    """None while running; "stop", "length", "timeout", "cancelled" or "error"."""
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            seed = self.params.seed if self.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator().manual_seed(seed)


class Engine:
    """Owns the model in a background thread; everything else talks to it through thread-safe calls."""

    def __init__(
        self, model: Any, tokenizer: Any, *, max_num_seqs: int = 16, max_queue: int = 256, max_model_len: int = 2048
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_queue, self.max_model_len = max_num_seqs, max_queue, max_model_len
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos_ids, default=0))
        self._cache_key = _cache_key(model)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._cache: Any = None  # DynamicCache over the running rows
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._last: torch.Tensor | None = None  # (B,) each row's newest token, not yet in the cache
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()

    # -- thread-safe API ------------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all of one request together); QueueFull when the queue is full."""
        with self._wake:
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.extend(seqs)
            self._wake.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop sequences at the next step boundary; their slots free up."""
        for seq in seqs:
            seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` in the engine thread between two steps (model changes: loading adapters)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def adapters_in_use(self) -> set[str]:
        with self._wake:
            return {s.adapter for s in list(self._running) + list(self._waiting) if s.finish_reason is None}

    def load(self) -> dict[str, int]:
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting), "max_num_seqs": self.max_num_seqs}

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stop or self._calls or self._waiting or self._running):
                        self._wake.wait()
                    if self._stop:
                        break
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, future in calls:
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # noqa: BLE001 - handed to the caller
                        future.set_exception(err)
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - a failed step fails its sequences, not the server
                    self._fail_all(f"{type(err).__name__}: {err}")
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._wake:
            seqs = self._running + list(self._waiting)
            self._running, self._cache, self._mask, self._last = [], None, None, None
            self._waiting.clear()
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason, seq.error = "error", message
                seq.notify(seq)

    def _step(self) -> None:
        now = time.monotonic()
        for seq in self._running:
            if seq.finish_reason is None and (seq.cancelled or now > seq.deadline):
                self._finish(seq, "cancelled" if seq.cancelled else "timeout")
        self._drop_finished()
        admitted: list[Sequence] = []
        with self._wake:
            kept: deque[Sequence] = deque()
            while self._waiting:
                seq = self._waiting.popleft()
                if seq.cancelled or now > seq.deadline:
                    self._finish(seq, "cancelled" if seq.cancelled else "timeout")
                elif seq.adapter != BASE and seq.adapter not in getattr(self.model, "adapters", {}):
                    seq.error = f"adapter {seq.adapter!r} was unloaded"
                    self._finish(seq, "error")
                elif len(self._running) + len(admitted) < self.max_num_seqs:
                    admitted.append(seq)
                else:
                    kept.append(seq)
            self._waiting = kept
        if admitted:
            try:
                self._prefill(admitted)  # the running batch is untouched until the new rows join it
            except Exception as err:  # noqa: BLE001 - fails the new requests only
                for seq in admitted:
                    if seq.finish_reason is None:
                        seq.error = f"{type(err).__name__}: {err}"
                        self._finish(seq, "error")
            self._drop_finished()
        if self._running:
            self._decode()
            self._drop_finished()

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, names: list[str]
    ):
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": True,
                  "logits_to_keep": 1, self._cache_key: cache, "adapter_names": names}  # fmt: skip
        out = self.model(**kwargs)
        return out.logits[:, -1].float(), cache  # (B, vocab); the cache was extended in place

    def _prefill(self, seqs: list[Sequence]) -> None:
        """One left-padded forward over the new prompts; their cache joins the running batch."""
        from transformers.cache_utils import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache(), [s.adapter for s in seqs])
        tokens = self._sample(logits, seqs)
        self._join(seqs, cache, mask, tokens)
        for seq, token in zip(seqs, tokens.tolist()):
            self._append(seq, token)

    def _decode(self) -> None:
        seqs = self._running
        positions = self._mask.sum(-1, keepdim=True)  # (B, 1): each row's next position
        self._mask = torch.cat((self._mask, torch.ones((len(seqs), 1), dtype=self._mask.dtype)), dim=1)
        logits, self._cache = self._forward(
            self._last.unsqueeze(1), self._mask, positions, self._cache, [s.adapter for s in seqs]
        )
        self.steps += 1
        tokens = self._sample(logits, seqs)
        self._last = tokens
        for seq, token in zip(seqs, tokens.tolist()):
            self._append(seq, token)

    # -- batch bookkeeping ----------------------------------------------------------------------------
    def _join(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        if self._cache is None or not self._running:
            self._cache, self._mask, self._last, self._running = cache, mask, tokens, list(seqs)
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat((_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)), dim=0)
            mine.values = torch.cat((_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)), dim=0)
        self._mask = torch.cat((_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)), dim=0)
        self._last = torch.cat((self._last, tokens))
        self._running = self._running + list(seqs)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache, self._mask, self._last = [], None, None, None
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns before this only pad the remaining rows
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._last = self._last.index_select(0, index)
        self._running = [self._running[i] for i in keep]

    # -- tokens -> text -------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        tokens = logits.argmax(-1)  # (B,)
        for row, seq in enumerate(seqs):
            if seq.generator is None:
                continue
            probs = torch.softmax(logits[row] / seq.params.temperature, dim=-1)
            if seq.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= seq.params.top_p  # keeps at least one
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0]
        return tokens

    def _append(self, seq: Sequence, token: int) -> None:
        if seq.finish_reason is not None:
            return
        seq.generated.append(token)
        if token in self.eos_ids:
            self._release(seq, final=True)
            self._finish(seq, "stop")
            return
        stopped = self._release(seq, final=False)
        if stopped:
            self._finish(seq, "stop")
        elif (
            len(seq.generated) >= seq.params.max_tokens
            or len(seq.prompt_ids) + len(seq.generated) >= self.max_model_len
        ):
            self._release(seq, final=True)
            self._finish(seq, "length")
        else:
            seq.notify(seq)

    def _release(self, seq: Sequence, *, final: bool) -> bool:
        """Move complete text into seq.text (only ever growing it); True when a stop string ended it."""
        ids = [t for t in seq.generated if t not in self.eos_ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stops = seq.params.stop
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            text, final = text[: min(hits)], True
        elif not final:
            text = text.rstrip("\ufffd")  # a character split across tokens: wait for the rest
            if stops:  # hold back what could still grow into a stop string
                text = text[: len(text) - (max(len(s) for s in stops) - 1)]
        if len(text) > len(seq.text) and text.startswith(seq.text):
            seq.text = text
        return bool(hits)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.notify(seq)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat((tensor.new_zeros(shape), tensor), dim=dim)


def _cache_key(model: Any) -> str:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
