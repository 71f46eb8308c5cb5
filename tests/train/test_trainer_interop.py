"""A TunedModel trains inside transformers.Trainer (users bring their own trainer)."""

from __future__ import annotations

import torch
from train_helpers import build_model, build_tokenizer, synthetic_rows

import deltatune as dt
from deltatune.data import collate, encode_rows, pad_token_id


def test_tuned_model_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    tokenizer = build_tokenizer()
    tuned = dt.get_tuned_model(
        build_model(len(tokenizer)), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    base_before = {k: v.clone() for k, v in tuned.get_base_model().state_dict().items() if "deltas" not in k}
    adapter_before = {k: v.clone() for k, v in tuned.adapter_state_dict().items()}
    examples, _ = encode_rows(tokenizer, synthetic_rows(32), max_length=32)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_steps=1, remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=tuned, args=args, train_dataset=examples, data_collator=lambda b: collate(b, pad_token_id(tokenizer))
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = tuned.adapter_state_dict()
    assert any(not torch.equal(after[k], adapter_before[k]) for k in after)
    for key, value in tuned.get_base_model().state_dict().items():
        if key in base_before:
            assert torch.equal(value, base_before[key]), key
