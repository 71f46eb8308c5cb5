"""DPO (sigmoid, hinge, ipo), ORPO, SimPO and CPO: loss and gradients equal TRL's on the same inputs.

Both sides get the same tiny Llama with the same LoRA weights (B perturbed away from zero, so the
policy differs from the reference) and the same batch: TRL's own DPO collator output ([chosen;
rejected] rows with a completion mask). TRL's side: DPOTrainer._compute_loss (peft model, reference
= adapter disabled), and CPOTrainer / ORPOTrainer's loss functions on full logits. Ours: the task's
loss through the chunked supervised-token path (`deltatune.ops.sequence_logps`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from deltatune.tasks.registry import get_task

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from rlhf_helpers import preference_rows
    from train_helpers import build_model, build_tokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = build_tokenizer()
    rows = preference_rows(6)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows
    ])  # fmt: skip
    config = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, save_strategy="no", beta=0.1,
        max_length=48, disable_tqdm=True,
    )  # fmt: skip
    # A new adapter (peft_config): TRL's reference is then the model with the adapter disabled, as ours.
    trainer = DPOTrainer(
        model=build_model(len(tokenizer)), args=config, train_dataset=data, processing_class=tokenizer,
        peft_config=peft.LoraConfig(**LORA),
    )  # fmt: skip
    policy = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = dt.get_tuned_model(build_model(len(tokenizer)), dt.LoraConfig(**LORA))
    state = peft.get_peft_model_state_dict(policy)
    ours.load_adapter_state_dict("default", {k.removeprefix("base_model.model."): v for k, v in state.items()})
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    our_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    assert int(batch["completion_mask"][:, 0].sum()) == 0  # the first token is never an answer token
    return SimpleNamespace(trainer=trainer, policy=policy, ours=ours, batch=batch, our_batch=our_batch, labels=labels)


def _grads(model) -> dict[str, torch.Tensor]:
    def key(name: str) -> str:  # peft's and our parameter names of the same tensor
        return name[name.index("layers.") :].replace(".deltas.default", "").replace(".default", "")

    out = {key(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _our_loss(setup, method: str, **args) -> tuple[float, dict[str, torch.Tensor]]:
    task = get_task(method)
    task.check_args(SimpleNamespace(packing=False, ref_adapter=None, method_args={}, beta=None, loss_type=None) if not args
                    else SimpleNamespace(packing=False, ref_adapter=None, method_args=args.pop("method_args", {}),
                                         beta=args.get("beta"), loss_type=args.get("loss_type")))  # fmt: skip
    setup.ours.zero_grad(set_to_none=True)
    total = task.loss_sum(setup.ours, setup.our_batch)
    loss = total / task.units(setup.our_batch)
    loss.backward()
    return float(loss.detach()), _grads(setup.ours)


def _compare(ours: tuple[float, dict], theirs: tuple[float, dict]) -> None:
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5, abs=1e-6)
    assert ours[1].keys() == theirs[1].keys() and ours[1]
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in theirs[1].values())


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_gradients_equal_trl(setup, loss_type):
    trainer = setup.trainer
    trainer.loss_types, trainer.loss_weights, trainer.beta = [loss_type], [1.0], 0.25
    trainer.policy = setup.policy
    setup.policy.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(setup.policy, setup.batch, False)
    loss.backward()
    theirs = (float(loss.detach()), _grads(setup.policy))
    _compare(_our_loss(setup, "dpo", beta=0.25, loss_type=loss_type), theirs)
    if loss_type == "ipo":
        _compare(_our_loss(setup, "ipo", beta=0.25), theirs)


def _trl_logps(setup, average: bool):
    from trl.experimental.cpo import CPOTrainer

    setup.policy.zero_grad(set_to_none=True)
    logits = setup.policy(input_ids=setup.batch["input_ids"], attention_mask=setup.batch["attention_mask"]).logits
    logps = CPOTrainer.get_batch_logps(logits, setup.labels, average_log_prob=average)
    pairs = logps.shape[0] // 2
    nll = torch.nn.functional.cross_entropy(
        logits[:pairs, :-1].reshape(-1, logits.shape[-1]), setup.labels[:pairs, 1:].reshape(-1)
    )
    return logps[:pairs], logps[pairs:], nll


@pytest.mark.parametrize("variant", ["cpo-sigmoid", "cpo-hinge", "simpo"])
def test_cpo_and_simpo_equal_trl(setup, variant):
    from trl.experimental.cpo import CPOTrainer

    simpo = variant == "simpo"
    fake = SimpleNamespace(alpha=0.0, beta=2.0 if simpo else 0.3, loss_type="simpo" if simpo else variant.split("-")[1],
                           simpo_gamma=0.7, label_smoothing=0.0, accelerator=SimpleNamespace(device="cpu"))  # fmt: skip
    cpo_alpha = 0.0 if simpo else 0.8
    chosen, rejected, nll = _trl_logps(setup, average=simpo)
    losses, _, _ = CPOTrainer.cpo_loss(fake, chosen, rejected)
    loss = losses.mean() + cpo_alpha * nll
    loss.backward()
    theirs = (float(loss.detach()), _grads(setup.policy))
    if simpo:
        ours = _our_loss(setup, "simpo", beta=2.0, method_args={"simpo_gamma": 0.7})
    else:
        ours = _our_loss(setup, "cpo", beta=0.3, loss_type=fake.loss_type, method_args={"cpo_alpha": 0.8})
    _compare(ours, theirs)


def test_orpo_equals_trl(setup):
    from trl.experimental.orpo import ORPOTrainer

    fake = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    chosen, rejected, nll = _trl_logps(setup, average=True)
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    loss = nll - losses.mean()
    loss.backward()
    _compare(_our_loss(setup, "orpo", beta=0.2), (float(loss.detach()), _grads(setup.policy)))


def test_our_side_takes_the_chunked_path(setup, monkeypatch):
    """The tuned tiny Llama has a frozen plain head: no full logits are built for the policy."""
    from deltatune.ops import sequence_logps

    calls = []
    original = sequence_logps._FusedTokenLogps.apply
    monkeypatch.setattr(sequence_logps._FusedTokenLogps, "apply", lambda *a: calls.append(1) or original(*a))
    _our_loss(setup, "dpo")
    assert len(calls) == 2  # policy and reference, one forward each for chosen + rejected


def test_ref_adapter_equals_trl_reference_copy(setup, tmp_path):
    """--ref-adapter: TRL given a PeftModel with a trained adapter keeps a frozen copy ("ref") as the
    reference; ours loads the same weights from the adapter folder. Then the policy moves on."""
    from train_helpers import build_model, build_tokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    start = peft.get_peft_model(build_model(len(tokenizer)), peft.LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    start.save_pretrained(tmp_path / "sft")
    config = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no", beta=0.5,
                       max_length=48, disable_tqdm=True)  # fmt: skip
    trainer = DPOTrainer(
        model=start, args=config, train_dataset=setup.trainer.train_dataset, processing_class=tokenizer
    )
    policy = trainer.model
    assert "ref" in policy.peft_config
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name and ".default." in name:
                p.add_(torch.randn_like(p) * 0.2)
    policy.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(policy, setup.batch, False)
    loss.backward()
    theirs = (float(loss.detach()), _grads(policy))

    ours = dt.get_tuned_model(build_model(len(tokenizer)), dt.LoraConfig(**LORA))
    state = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(policy).items()}
    ours.load_adapter_state_dict("default", state)
    task = get_task("dpo")
    task.check_args(SimpleNamespace(packing=False, ref_adapter=str(tmp_path / "sft"), method_args={}, beta=0.5,
                                    loss_type=None))  # fmt: skip
    total = task.loss_sum(ours, setup.our_batch) / task.units(setup.our_batch)
    total.backward()
    mine = (float(total.detach()), _grads(ours))
    assert ours.active_adapters == ["default"] and "reference" in ours.adapters
    _compare(mine, theirs)
    assert theirs[0] != pytest.approx(0.6931, abs=1e-3)  # the policy differs from its reference
