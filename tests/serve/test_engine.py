"""The engine without HTTP: a failing prefill fails only the requests it was admitting."""

from __future__ import annotations

import threading

from conftest import make_state

from deltatune.serve.engine import SamplingParams, Sequence


def test_a_failed_prefill_fails_only_the_new_requests(assets):
    state = make_state(assets, ["alpha"], max_num_seqs=4)
    engine = state.engine
    done = {name: threading.Event() for name in ("first", "second")}

    def seq(name, max_tokens):
        ids = state.tokenizer("add one and two", add_special_tokens=False).input_ids
        notify = lambda s: done[name].set() if s.finish_reason else None  # noqa: E731
        return Sequence("alpha", ids, SamplingParams(temperature=0, max_tokens=max_tokens), notify=notify)

    prefill, started = engine._prefill, threading.Event()
    decode = engine._decode

    def slow_decode():  # keep the first request running while the second arrives
        started.set()
        threading.Event().wait(0.01)
        decode()

    def failing_prefill(seqs):
        if any(s is second for s in seqs):
            raise RuntimeError("boom")
        prefill(seqs)

    engine._decode, engine._prefill = slow_decode, failing_prefill
    first, second = seq("first", 40), seq("second", 5)
    try:
        engine.submit([first])
        assert started.wait(30)
        engine.submit([second])
        assert done["second"].wait(30) and done["first"].wait(60)
    finally:
        engine.close()
    assert second.finish_reason == "error" and "boom" in second.error
    assert first.finish_reason in ("stop", "length") and first.error is None and first.generated
