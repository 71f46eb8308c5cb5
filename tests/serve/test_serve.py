"""`deltatune serve` over real HTTP with the official `openai` client: greedy outputs equal `deltatune infer`,
mixed concurrent batches equal one-by-one answers, streaming equals non-streaming, errors are 4xx JSON."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from conftest import ADAPTERS, build_model, post  # noqa: E402

QUESTIONS = ["add one and two please", "add three and four", "add seven and zero please please", "add five and five",
             "add nine and two", "add six and eight please"]  # fmt: skip


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def chat(cli, model, question, **kw):
    kw = {"temperature": 0, "max_tokens": 12, **kw}
    return cli.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def infer_answers(assets, adapter: str | None, questions, max_new_tokens=12):
    """What `deltatune infer --adapter` prints: the same loading and generation code (greedy, chat template)."""
    import torch
    from transformers import AutoTokenizer

    from deltatune.core.tuned_model import TunedModel
    from deltatune.train.evaluate import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    model = build_model(len(tokenizer))
    model.load_state_dict(type(model).from_pretrained(assets["model"]).state_dict())
    if adapter is not None:
        model = TunedModel.from_pretrained(model, assets[adapter], is_trainable=False)
    with torch.no_grad():
        return generate_answers(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                                max_new_tokens=max_new_tokens, batch_size=1)  # fmt: skip


def test_models_lists_base_and_adapters(server):
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["tiny-llama", *ADAPTERS]


def test_greedy_answers_equal_infer_for_each_adapter(server, assets):
    cli = client(server)
    answers = {}
    for model in ["tiny-llama", *ADAPTERS]:
        replies = [chat(cli, model, q) for q in QUESTIONS[:2]]
        answers[model] = [r.choices[0].message.content.strip() for r in replies]
        expected = infer_answers(assets, None if model == "tiny-llama" else model, QUESTIONS[:2])
        assert answers[model] == expected, model
        usage = replies[0].usage
        assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len({tuple(a) for a in answers.values()}) == 4, "adapters answer like the base (vacuous check)"


def test_greedy_answer_equals_the_deltatune_infer_command(server, assets, capsys):
    from deltatune.cli.main import main

    served = chat(client(server), "beta", QUESTIONS[3]).choices[0].message.content
    capsys.readouterr()
    argv = ["infer", "--model", str(assets["model"]), "--adapter", str(assets["beta"]), "--prompt", QUESTIONS[3],
            "--max-new-tokens", "12", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]  # after the thread-policy line, the streamed answer
    assert answer == served.strip() != ""


def test_sixteen_concurrent_requests_over_three_adapters_equal_one_by_one(server):
    cli = client(server)
    jobs = [(ADAPTERS[i % 3], QUESTIONS[i % len(QUESTIONS)], 6 + i % 7) for i in range(16)]
    alone = [chat(cli, m, q, max_tokens=n).choices[0].message.content for m, q, n in jobs]
    with ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(lambda job: chat(cli, job[0], job[1], max_tokens=job[2]).choices[0].message.content, jobs)
        )
    assert together == alone
    assert len(set(alone)) > 3


def test_streaming_yields_the_same_text_as_non_streaming(server):
    cli = client(server)
    for model in ("alpha", "gamma"):
        whole = chat(cli, model, QUESTIONS[2], max_tokens=16)
        stream = chat(cli, model, QUESTIONS[2], max_tokens=16, stream=True, stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for part in stream:
            if part.usage is not None:
                usage = part.usage
            for choice in part.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == whole.choices[0].message.content
        assert finish == whole.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    text = cli.completions.create(model="beta", prompt="add two and", max_tokens=10, temperature=0).choices[0].text
    streamed = "".join(p.choices[0].text for p in cli.completions.create(
        model="beta", prompt="add two and", max_tokens=10, temperature=0, stream=True))  # fmt: skip
    assert streamed == text and text


def test_sampling_params_seed_n_stop(server):
    cli = client(server)
    kw = dict(model="alpha", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=10)
    first = cli.chat.completions.create(temperature=1.0, top_p=0.9, seed=3, n=3, **kw)
    again = cli.chat.completions.create(temperature=1.0, top_p=0.9, seed=3, n=3, **kw)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices] and [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1, "n seeded choices should differ"
    greedy = cli.chat.completions.create(temperature=0, **kw).choices[0].message.content
    assert len(greedy) > 3
    stop = greedy[2:4]
    cut = cli.chat.completions.create(temperature=0, stop=[stop], **kw).choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    longer = cli.chat.completions.create(temperature=0, **{**kw, "max_tokens": 3}).choices[0]
    assert longer.finish_reason == "length"


def test_bad_requests_get_4xx_json_errors(server):
    cli = client(server)
    with pytest.raises(openai.NotFoundError, match="not served; choose one of"):
        chat(cli, "nope", "hi")
    with pytest.raises(openai.BadRequestError, match="temperature must be a number from 0 to 2"):
        chat(cli, "alpha", "hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="more than this server's context"):
        chat(cli, "alpha", "hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="not supported by this server"):
        chat(cli, "alpha", "hi", logprobs=True)
    status, body = post(server, "/v1/chat/completions", {"model": "alpha", "messages": [], "bogus": 1})
    assert status == 400 and "unknown field 'bogus'" in body["error"]["message"]
    status, body = post(server, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(server, "/v1/nothing", {})
    assert status == 404 and "error" in body


def test_completions_take_several_prompts_and_token_ids(server):
    cli = client(server)
    reply = cli.completions.create(model="gamma", prompt=["add one", "add two and"], n=2, max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [c.text for c in reply.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # greedy: n copies agree
    alone = cli.completions.create(model="gamma", prompt="add two and", max_tokens=5, temperature=0)
    assert alone.choices[0].text == texts[2]
    assert (
        reply.usage.prompt_tokens
        == alone.usage.prompt_tokens
        + cli.completions.create(model="gamma", prompt="add one", max_tokens=1, temperature=0).usage.prompt_tokens
    )
    with pytest.raises(openai.BadRequestError, match="prompt token ids must be in"):
        cli.completions.create(model="gamma", prompt=[5, 10**9], max_tokens=2)
