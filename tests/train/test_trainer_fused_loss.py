"""transformers.Trainer and TRL's SFTTrainer train a TunedModel with the loss of the standard path.

Each trainer runs a few steps with gradient accumulation 2 (so `num_items_in_batch` is in play).
Its compute_loss records, per micro-batch, the loss it returned, the inputs and the adapter tensors
it was computed with; afterwards a reference TunedModel (same base, `fused_loss=False`: transformers'
own forward with full logits) loads each snapshot and computes `model(**inputs).loss` the
standard way. The losses must agree and the fused path must have been taken.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import build_model, build_tokenizer, synthetic_rows

import deltatune as dt
from deltatune.data import collate, encode_rows, pad_token_id
from deltatune.ops import fused_forward

CONFIGS = {
    "lora": lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def _recording(trainer_class):
    class Recording(trainer_class):
        records: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            snapshot = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
            seen = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            passed = num_items_in_batch if self.model_accepts_loss_kwargs else None
            self.records.append((loss.detach().clone(), seen, snapshot, passed))
            return loss

    return Recording


def _check_against_standard_path(records, tokenizer, kind):
    reference = dt.get_tuned_model(build_model(len(tokenizer)), CONFIGS[kind](), fused_loss=False).train()
    assert len(records) >= 4
    for loss, inputs, snapshot, count in records:
        reference.load_adapter_state_dict("default", snapshot)
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        extra = {"num_items_in_batch": count} if count is not None else {}
        with torch.no_grad():
            out = reference(**batch, **extra)
        assert out.logits is not None  # the reference really is the standard path
        torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    first, last = records[0][2], records[-1][2]
    assert any(not torch.equal(first[k], last[k]) for k in first), "training changed nothing"


@pytest.fixture
def fused_calls(monkeypatch):
    taken = []
    original = fused_forward.fused_causal_lm_forward

    def spy(model, kwargs):
        out = original(model, kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(fused_forward, "fused_causal_lm_forward", spy)
    return taken


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformers_trainer_loss_equals_the_standard_path(tmp_path, kind, fused_calls):
    from transformers import Trainer, TrainingArguments

    tokenizer = build_tokenizer()
    tuned = dt.get_tuned_model(build_model(len(tokenizer)), CONFIGS[kind]())
    examples, _ = encode_rows(tokenizer, synthetic_rows(32), max_length=32)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = _recording(Trainer)(
        model=tuned, args=args, train_dataset=examples, data_collator=lambda b: collate(b, pad_token_id(tokenizer))
    )
    trainer.records = []
    trainer.train()
    assert trainer.model_accepts_loss_kwargs and all(r[3] is not None for r in trainer.records)
    assert fused_calls and all(fused_calls), "Trainer's forward did not take the fused loss"
    _check_against_standard_path(trainer.records, tokenizer, kind)


def test_trl_sft_trainer_loss_equals_the_standard_path(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = build_tokenizer()
    tuned = dt.get_tuned_model(build_model(len(tokenizer)), CONFIGS["lora"]())
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        max_length=48, dataset_num_proc=None,
    )  # fmt: skip
    trainer = _recording(SFTTrainer)(
        model=tuned, args=args, train_dataset=Dataset.from_list(synthetic_rows(32)), processing_class=tokenizer
    )
    trainer.records = []
    trainer.train()
    _check_against_standard_path(trainer.records, tokenizer, "lora")


def test_trl_refuses_input_adapters_instead_of_skipping_them(tmp_path):
    """TRL replaces the forward of a model that is not a peft.PeftModel with one that calls the
    transformer stack directly, around TunedModel's input rewrite: an error, not a silent base run."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = build_tokenizer()
    tuned = dt.get_tuned_model(build_model(len(tokenizer)), CONFIGS["prompt"]())
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, max_length=48,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=tuned, args=args, train_dataset=Dataset.from_list(synthetic_rows(8)), processing_class=tokenizer
    )
    with pytest.raises(dt.ConfigError, match="virtual tokens would be skipped"):
        trainer.train()
