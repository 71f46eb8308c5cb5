"""--packing without cross-contamination: a packed row gives each example exactly the loss and the
gradients it gets alone (position ids restart per example, attention stays inside it)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import build_model, build_tokenizer, synthetic_rows

import deltatune as dt
from deltatune.data import collate, encode_rows, pack
from deltatune.tasks.causal_lm import CausalLMTask
from deltatune.tasks.registry import task_names

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _per_token_losses(model, batch) -> torch.Tensor:
    """(T-1,) next-token losses of row 0 (0 where unsupervised)."""
    kwargs = {"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch else {}
    mask = None if kwargs else batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, **kwargs).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=-100, reduction="none")


@pytest.fixture(scope="module")
def examples():
    tokenizer = build_tokenizer()
    encoded, _ = encode_rows(tokenizer, synthetic_rows(8, seed=3), max_length=32)
    return encoded[:3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(examples, attn):
    tokenizer = build_tokenizer()
    base = build_model(len(tokenizer))
    base.config._attn_implementation = attn
    torch.manual_seed(0)
    model = dt.get_tuned_model(base, dt.LoraConfig(**LORA))
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1

    # unpacked: one example per forward
    alone, grads_alone = [], [torch.zeros_like(p) for p in params]
    for example in examples:
        loss = _per_token_losses(model, collate([example], 1)).sum()
        alone.append(loss.detach())
        for acc, g in zip(grads_alone, torch.autograd.grad(loss, params)):
            acc += g

    (packed_row,) = pack(examples, max_length=sum(lengths))
    batch = collate([packed_row], 1)
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    token_losses = _per_token_losses(model, batch)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    packed = [token_losses[bounds[i] : bounds[i + 1]].sum() for i in range(len(examples))]
    # position t predicts token t+1, so an example's losses sit at [start, end - 1); the position
    # before the next example start is masked (its label is -100), which the split above keeps at 0
    grads_packed = torch.autograd.grad(torch.stack(packed).sum(), params)
    for a, b in zip(alone, packed):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_alone, grads_packed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_alone)

    # non-vacuity: the same packed row with one attention mask over the whole row leaks context
    with torch.no_grad():
        leaky = _per_token_losses(model, {k: v for k, v in batch.items() if k != "position_ids"})
    leaked = [leaky[bounds[i] : bounds[i + 1]].sum() for i in range(len(examples))]
    assert any(abs(float(a - b)) > 1e-3 for a, b in zip(alone[1:], leaked[1:]))


def test_the_task_loss_on_packed_batches_is_the_unpacked_sum(examples):
    """The loop's own path (CausalLMTask.loss_sum / units, fused loss) on a packed batch of two rows."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = dt.get_tuned_model(build_model(len(tokenizer)), dt.LoraConfig(**LORA))
    task = CausalLMTask()
    task.pad_id = 1
    unpacked = collate(examples, 1)
    rows = pack(examples, max_length=len(examples[0]["input_ids"]) + len(examples[1]["input_ids"]))
    assert len(rows) == 2  # the first two examples share a row; the third is alone, padded
    packed = collate(rows, 1)
    assert task.units(packed) == task.units(unpacked)
    with torch.no_grad():
        torch.testing.assert_close(task.loss_sum(model, packed), task.loss_sum(model, unpacked), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", task_names())
def test_packing_is_refused_up_front_by_every_task_that_does_not_pack(name, tmp_path):
    from deltatune.core.config import ConfigError
    from deltatune.tasks.registry import get_task
    from deltatune.train.args import TrainArgs
    from deltatune.train.loop import train

    args = TrainArgs(task=name, packing=True, model="no-such-model", dataset="no-such-data", max_steps=1,
                     output_dir=str(tmp_path / "out"))  # fmt: skip
    if getattr(get_task(name), "supports_packing", False):  # these go on to load the (missing) model or data
        with pytest.raises(Exception, match="no-such") as err:
            train(args)
        assert "packing" not in str(err.value)
    else:
        with pytest.raises(ConfigError, match=f"--task {name} does not support --packing"):
            train(args)
    assert not (tmp_path / "out").exists()  # refused before the output folder was made
