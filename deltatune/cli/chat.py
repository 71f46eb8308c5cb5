"""`deltatune infer` with neither --prompt nor --dataset: chat from standard input.

On a terminal it is a REPL: the conversation carries over between turns, answers stream, arrow
keys recall earlier prompts (readline, history kept in ~/.cache/deltatune/infer_history), `/reset`
starts a new conversation, `/exit` or Ctrl-D ends. When standard input is a pipe or a file, every
non-empty line is one independent prompt and its answer is printed (`user:` / `assistant:`), so
`deltatune infer < prompts.txt` answers a file of prompts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

HELP = "type a message; /reset starts a new conversation, /exit (or Ctrl-D) quits"


def history_file() -> Path:
    from deltatune.assets import cache_root

    return cache_root() / "infer_history"


def _enable_history(path: Path) -> Callable[[], None]:
    """Turn on readline editing and history; returns the function that saves it."""
    try:
        import readline
    except ImportError:  # not every platform has readline
        return lambda: None
    try:
        readline.read_history_file(path)
    except (OSError, ValueError):
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def chat(
    model: Any, tokenizer: Any, *, max_new_tokens: int, stdin: TextIO | None = None, stdout: TextIO | None = None,
    interactive: bool | None = None, read: Callable[[str], str] = input, history: Path | None = None,
) -> int:  # fmt: skip
    """Answer prompts from `stdin` (a REPL when it is a terminal). Returns the number of answers.

    Raises:
        ConfigError: standard input is not a terminal and holds no prompt.
    """
    from deltatune.train.evaluate import generate_answers

    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    interactive = stdin.isatty() if interactive is None else interactive
    answered = 0
    if not interactive:
        for line in stdin:
            prompt = line.strip()
            if not prompt:
                continue
            answer = generate_answers(model, tokenizer, [[{"role": "user", "content": prompt}]],
                                      max_new_tokens=max_new_tokens, progress=False)[0]  # fmt: skip
            print(f"user:      {prompt}\nassistant: {answer}\n", file=stdout, flush=True)
            answered += 1
        if answered == 0:
            from deltatune.core.config import ConfigError

            raise ConfigError("no prompt on standard input; give --prompt TEXT, --dataset D, or pipe one prompt a line")
        return answered

    from transformers import TextStreamer

    save_history = _enable_history(history or history_file())
    print(HELP, file=stdout, flush=True)
    conversation: list[dict[str, str]] = []
    try:
        while True:
            try:
                prompt = read(">>> ").strip()
            except EOFError:
                print(file=stdout)
                break
            if not prompt:
                continue
            if prompt in ("/exit", "/quit"):
                break
            if prompt == "/reset":
                conversation = []
                print("(new conversation)", file=stdout, flush=True)
                continue
            conversation.append({"role": "user", "content": prompt})
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = generate_answers(model, tokenizer, [conversation], max_new_tokens=max_new_tokens,
                                      streamer=streamer, progress=False)[0]  # fmt: skip
            conversation.append({"role": "assistant", "content": answer})
            answered += 1
    finally:
        save_history()
    return answered
