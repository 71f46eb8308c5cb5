"""Every tuner in the registry trains from the command line with only `--tuner NAME`.

The registry is read at test time, so a newly registered tuner is covered without editing this file.
The tiny Llama here has attention biases, so BitFit has something to train.
"""

from __future__ import annotations

import json

import pytest
from train_helpers import build_tokenizer

from deltatune.cli.main import main
from deltatune.core.registry import all_specs


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory, tiny_assets):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, data = tiny_assets
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1, pad_token_id=1,
        bos_token_id=0, attention_bias=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("biased") / "tiny-llama-bias"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, data


FAST = ("lora", "ia3", "prompt_tuning")  # the rest (about 1.5 s each) run as slow tests, still in CI


@pytest.mark.parametrize(
    "tuner",
    [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in sorted(s.name for s in all_specs())],
)
def test_sft_trains_with_only_the_tuner_name(tuner, biased_llama, tmp_path, capsys):
    model_dir, data = biased_llama
    out = tmp_path / "run"
    code = main([
        "sft", "--tuner", tuner, "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
        "--batch-size", "4", "--max-length", "32", "--val-size", "8", "--num-samples", "0", "--max-steps", "2",
        "--save-steps", "2",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, f"deltatune sft --tuner {tuner}: exit {code}: {err.strip()[-400:]}"
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    sidecar = out / "adapter" / "deltatune_config.json"
    names = {saved.get("tuner"), json.loads(sidecar.read_text()).get("tuner") if sidecar.is_file() else None}
    assert tuner in names


def test_the_demo_keeps_its_lora_scale():
    from deltatune.models import get_model_spec
    from deltatune.train import TrainArgs
    from deltatune.train.setup import build_tuner_config

    args = TrainArgs()
    config = build_tuner_config(args.tuner, args.tuner_args, get_model_spec(args.model))
    assert (config.r, config.lora_alpha) == (8, 16)
    config = build_tuner_config("lora", {"r": 4}, None)
    assert (config.r, config.lora_alpha) == (4, 16)
