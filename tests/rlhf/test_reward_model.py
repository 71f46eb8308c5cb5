"""rm: the pairwise loss and its gradients equal TRL's RewardTrainer.compute_loss on the same model
and batch (a tiny Llama with a one-output score head and LoRA)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from deltatune.tasks.registry import get_task

pytest.importorskip("trl")


@pytest.mark.parametrize("center", [None, 0.05])
def test_reward_loss_and_gradients_equal_trl(center):
    from rlhf_helpers import preference_rows
    from train_helpers import build_model, build_tokenizer
    from transformers import LlamaForSequenceClassification
    from trl import RewardTrainer

    from deltatune.data.preference import encode_pairs

    tokenizer = build_tokenizer()
    lm = build_model(len(tokenizer))
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1}))
    model.model.load_state_dict(lm.model.state_dict())
    model.config.pad_token_id = 1
    tuned = dt.get_tuned_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="SEQ_CLS"))  # fmt: skip
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    task = get_task("rm")
    task.check_args(SimpleNamespace(method_args={"center_rewards": center} if center else {}, beta=None,
                                    loss_type=None, ref_adapter=None, packing=False))  # fmt: skip
    task.pad_id = 1
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in preference_rows(6)]  # fmt: skip
    examples, _ = encode_pairs(tokenizer, rows, 48)
    batch = task.collate(examples)

    ours = task.loss_sum(tuned, batch) / task.units(batch)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in tuned.named_parameters() if p.grad is not None}
    tuned.zero_grad(set_to_none=True)

    fake = SimpleNamespace(
        model=tuned, args=SimpleNamespace(center_rewards_coefficient=center), _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
    )  # fmt: skip
    tuned.train()
    theirs = RewardTrainer.compute_loss(
        fake, tuned, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    )
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    their_grads = {n: p.grad for n, p in tuned.named_parameters() if p.grad is not None}
    assert our_grads.keys() == their_grads.keys() and any("score" in n for n in our_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, msg=name)
