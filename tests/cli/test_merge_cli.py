"""`deltatune merge` writes a PEFT adapter equal to TunedModel.add_weighted_adapter's (and peft loads it)."""

from __future__ import annotations

import pytest
import torch

from deltatune.cli.main import main


@pytest.fixture(scope="module")
def two_adapters(tiny_assets, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model_dir, _ = tiny_assets
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        tuned = dt.get_tuned_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        folder = tmp_path_factory.mktemp(f"adapter{seed}")
        tuned.save_pretrained(folder)
        folders.append(folder)
    return model_dir, folders


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_writes_the_combined_adapter(two_adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model_dir, (a, b) = two_adapters
    out = tmp_path / "merged"
    args = ["merge", "--model", str(model_dir), "--adapter", f"a={a}", "--adapter", f"b={b}", "--weights", "0.7,0.3"]
    args += ["--method", "ties", "--density", "0.5", "--output-dir", str(out)]
    assert main(args) == 0
    assert "ties merge of 0.7 x a, 0.3 x b" in capsys.readouterr().out
    tuned = dt.TunedModel(AutoModelForCausalLM.from_pretrained(model_dir), None)
    tuned.load_adapter(a, "a")
    tuned.load_adapter(b, "b")
    tuned.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="ties", density=0.5)
    tuned.set_adapter("mix")
    expected = _logits(tuned.eval())
    merged = dt.TunedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)
    assert main(args) == 7  # not empty, no --overwrite
    assert main([*args, "--overwrite"]) == 0


def test_merge_bad_input_is_one_line(two_adapters, tmp_path, capsys):
    model_dir, (a, b) = two_adapters
    base = [
        "merge",
        "--model",
        str(model_dir),
        "--adapter",
        str(a),
        "--adapter",
        str(b),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main([*base, "--weights", "0.7"]) != 0
    assert "one weight per adapter" in capsys.readouterr().err
    assert main([*base, "--method", "ties"]) != 0
    assert "density" in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path), *base[5:]]) != 0
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
