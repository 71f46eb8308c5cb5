"""The chat tab's model: one base loaded once, adapters added to it by name, and one prompt answered
by the base and every chosen adapter together in one batch (`adapter_names=` per row), streamed.

Switching or adding adapters never reloads the base: `TunedModel.load_adapter` adds an adapter
next to the others, and a row's adapter is picked per call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BASE = "__base__"
"""The row name that runs the base model without any adapter (peft's meaning)."""
EMPTY = "(empty answer: the model ended its turn at once)"


class _RowStreamer:
    """A `generate` streamer for a batch: each call to put() brings one new token per row."""

    def __init__(self) -> None:
        self.tokens: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call is the prompt
            self._prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())  # (B,)

    def end(self) -> None:
        self.tokens.put(None)


class ChatModel:
    """A base model plus named adapters, loaded once per model path."""

    def __init__(self) -> None:
        self.model_id: str | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.adapters: dict[str, str] = {}  # name -> folder
        self.lock = threading.Lock()

    def load(self, model_id: str) -> None:
        """Load the base (only when it changed)."""
        if model_id == self.model_id:
            return
        from deltatune.core.tuned_model import TunedModel
        from deltatune.models import load_model, load_tokenizer, resolve_model

        source, _ = resolve_model(model_id)
        self.tokenizer = load_tokenizer(source)
        self.model = TunedModel(load_model(source, dtype="fp32"), None).eval()
        self.model_id, self.adapters = model_id, {}

    def adapter(self, folder: str) -> str:
        """The name of the adapter in `folder`, loading it next to the others on first use."""
        folder = str(Path(folder).resolve())
        for name, path in self.adapters.items():
            if path == folder:
                return name
        name = f"adapter{len(self.adapters) + 1}"
        self.model.load_adapter(folder, name)
        self.adapters[name] = folder
        return name

    def stream(
        self, model_id: str, adapter_dirs: list[str], prompt: str, max_new_tokens: int = 32
    ) -> Iterator[list[str]]:
        """Yield the answers so far, one per column: the base, then each adapter in order."""
        import torch

        with self.lock:
            self.load(model_id)
            names = [BASE] + [self.adapter(a) for a in adapter_dirs]
            tok = self.tokenizer
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            enc = tok([text] * len(names), return_tensors="pt", add_special_tokens=False)  # same prompt: no padding
            streamer = _RowStreamer()
            errors: list[BaseException] = []

            def generate() -> None:
                try:
                    with torch.no_grad():
                        self.model.generate(
                            **enc, adapter_names=names, max_new_tokens=int(max_new_tokens), do_sample=False,
                            pad_token_id=tok.pad_token_id, streamer=streamer, temperature=None, top_p=None, top_k=None,
                        )  # fmt: skip
                except BaseException as err:  # noqa: BLE001 - shown in the page
                    errors.append(err)
                finally:
                    streamer.end()

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            ids: list[list[int]] = [[] for _ in names]
            done = [False] * len(names)
            while (step := streamer.tokens.get()) is not None:
                for row, token in enumerate(step):
                    if done[row]:
                        continue
                    if token == tok.eos_token_id:
                        done[row] = True
                    else:
                        ids[row].append(token)
                yield [tok.decode(i, skip_special_tokens=True) for i in ids]
            worker.join()
            if errors:
                raise errors[0]
            yield [tok.decode(i, skip_special_tokens=True) or EMPTY for i in ids]
