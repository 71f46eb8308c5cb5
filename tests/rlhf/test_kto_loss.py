"""KTO: loss and gradients equal TRL's KTOTrainer._compute_loss on the same batch (its own collator's
output: rows, labels and the mismatched KL rows), reference = the adapter disabled on both sides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from deltatune.tasks.registry import get_task

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _key(name: str) -> str:
    return name[name.index("layers.") :].replace(".deltas.default", "").replace(".default", "")


def _grads(model) -> dict[str, torch.Tensor]:
    out = {_key(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_kto_loss_and_gradients_equal_trl(tmp_path):
    from datasets import Dataset
    from rlhf_helpers import preference_rows
    from train_helpers import build_model, build_tokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = build_tokenizer()
    rows = []
    for i, r in enumerate(preference_rows(4)):
        rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                     "completion": [{"role": "assistant", "content": r["chosen"] if i % 3 else r["rejected"]}],
                     "label": bool(i % 3)})  # fmt: skip
    config = KTOConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", beta=0.3, max_length=48,
        disable_tqdm=True, per_device_train_batch_size=4, desirable_weight=1.0, undesirable_weight=1.5,
    )  # fmt: skip
    trainer = KTOTrainer(
        model=build_model(len(tokenizer)), args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft.LoraConfig(**LORA),
    )  # fmt: skip
    policy = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert "KL_input_ids" in batch and batch["label"].tolist() == [False, True, True, False]
    loss = trainer._compute_loss(policy, batch, False)
    loss.backward()
    theirs = (float(loss.detach()), _grads(policy))

    ours = dt.get_tuned_model(build_model(len(tokenizer)), dt.LoraConfig(**LORA))
    state = peft.get_peft_model_state_dict(policy)
    ours.load_adapter_state_dict("default", {k.removeprefix("base_model.model."): v for k, v in state.items()})
    task = get_task("kto")
    task.check_args(SimpleNamespace(packing=False, ref_adapter=None, beta=0.3, loss_type=None,
                                    method_args={"undesirable_weight": 1.5}))  # fmt: skip
    ids, mask = batch["input_ids"], batch["completion_mask"]
    kl_ids, kl_mask = batch["KL_input_ids"], batch["KL_completion_mask"]
    our_batch = {
        "input_ids": ids, "attention_mask": batch["attention_mask"], "labels": ids.masked_fill(mask == 0, -100),
        "kl_input_ids": kl_ids, "kl_attention_mask": batch["KL_attention_mask"],
        "kl_labels": kl_ids.masked_fill(kl_mask == 0, -100), "label": batch["label"].bool(),
    }  # fmt: skip
    total = task.loss_sum(ours, our_batch) / task.units(our_batch)
    total.backward()
    mine = (float(total.detach()), _grads(ours))
    assert mine[0] == pytest.approx(theirs[0], rel=1e-5, abs=1e-6)
    assert mine[1].keys() == theirs[1].keys() and any(float(g.abs().sum()) > 0 for g in theirs[1].values())
    for name, grad in theirs[1].items():
        torch.testing.assert_close(mine[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_our_kto_batches_pair_each_prompt_with_the_previous_completion():
    from train_helpers import build_tokenizer

    from deltatune.data.preference import encode_answer

    task = get_task("kto")
    task.tokenizer, task.pad_id = build_tokenizer(), 1
    examples = []
    for i, text in enumerate(["one plus one is 2", "two plus two is 4!", "three"]):
        enc = encode_answer(task.tokenizer, [{"role": "user", "content": f"add {i}"}], text, 48)
        start = next(j for j, v in enumerate(enc["labels"]) if v != -100)
        examples.append({"row": enc, "label": i != 1, "prompt_length": start})
    batch = task.collate(examples)
    for i in range(3):
        prev = examples[i - 1]
        kl = batch["kl_input_ids"][i][batch["kl_attention_mask"][i].bool()].tolist()
        p = examples[i]["prompt_length"]
        assert kl == examples[i]["row"]["input_ids"][:p] + prev["row"]["input_ids"][prev["prompt_length"] :]
