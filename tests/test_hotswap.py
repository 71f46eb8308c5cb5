"""hotswap_adapter replaces a loaded LoRA adapter's weights in place: outputs equal a fresh load,
the parameter objects stay the same (a compiled graph would keep them), padded ranks swap too."""

import pytest
import torch

import deltatune as dt
from deltatune.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

TINY = TINY_MODELS["llama"]
TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _saved(folder, seed, **lora):
    torch.manual_seed(seed)
    config = dt.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **lora)
    tuned = dt.get_tuned_model(TINY.fresh(), config)
    tuned.save_pretrained(folder)
    return contract.run(TINY, tuned.eval())


def _params(tuned):
    return {name: param for name, param in tuned.named_parameters() if ".deltas." in name}


def _check_swap(tuned, folder, expected):
    before = _params(tuned)
    hotswap_adapter(tuned, folder, "default")
    after = _params(tuned)
    assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
    fresh = dt.TunedModel.from_pretrained(TINY.fresh(), folder)
    torch.testing.assert_close(contract.run(TINY, tuned), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(contract.run(TINY, fresh), expected, atol=1e-5, rtol=0)


def test_hotswap_same_shapes_equals_a_fresh_load(tmp_path):
    first = _saved(tmp_path / "one", 1, r=4, lora_alpha=8)
    second = _saved(tmp_path / "two", 2, r=4, lora_alpha=16)  # another alpha: the scale swaps too
    assert not torch.allclose(first, second)
    tuned = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "one")
    torch.testing.assert_close(contract.run(TINY, tuned), first, atol=1e-5, rtol=0)
    _check_swap(tuned, tmp_path / "two", second)
    _check_swap(tuned, tmp_path / "one", first)


def test_padded_ranks_swap_in_place(tmp_path):
    small = _saved(tmp_path / "small", 1, r=2, lora_alpha=4)
    large = _saved(tmp_path / "large", 2, r=6, lora_alpha=3, use_rslora=False)
    tuned = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "small")
    prepare_model_for_compiled_hotswap(tuned, target_rank=6)
    torch.testing.assert_close(contract.run(TINY, tuned), small, atol=1e-5, rtol=0)  # padding changes nothing
    tuned.save_pretrained(tmp_path / "padded")  # the padded adapter still saves as an equivalent one
    reloaded = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "padded")
    torch.testing.assert_close(contract.run(TINY, reloaded), small, atol=1e-5, rtol=0)
    _check_swap(tuned, tmp_path / "large", large)
    _check_swap(tuned, tmp_path / "small", small)
    with pytest.raises(dt.ConfigError, match="target_rank"):
        prepare_model_for_compiled_hotswap(tuned, target_rank=3)


def test_peft_adapter_hotswaps_into_ours(tmp_path):
    peft = pytest.importorskip("peft")
    _saved(tmp_path / "ours", 1, r=4, lora_alpha=8)
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(TINY.fresh(), cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    expected = contract.run(TINY, theirs.eval())
    tuned = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "ours")
    _check_swap(tuned, tmp_path / "theirs", expected)


def test_incompatible_adapters_are_refused_unchanged(tmp_path):
    first = _saved(tmp_path / "one", 1, r=4)
    tuned = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "one")
    _saved(tmp_path / "dora", 2, r=4, use_dora=True)
    with pytest.raises(dt.ConfigError, match="use_dora"):
        hotswap_adapter(tuned, tmp_path / "dora", "default")
    _saved(tmp_path / "bigger", 3, r=8)
    with pytest.raises(dt.ConfigError, match="prepare_model_for_compiled_hotswap"):
        hotswap_adapter(tuned, tmp_path / "bigger", "default")
    torch.manual_seed(4)
    other = dt.get_tuned_model(TINY.fresh(), dt.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(dt.ConfigError, match="other layers"):
        hotswap_adapter(tuned, tmp_path / "other", "default")
    with pytest.raises(dt.ConfigError, match="no adapter named"):
        hotswap_adapter(tuned, tmp_path / "one", "missing")
    tuned.merge_adapter()
    with pytest.raises(dt.ConfigError, match="merged"):
        hotswap_adapter(tuned, tmp_path / "one", "default")
    tuned.unmerge_adapter()
    torch.testing.assert_close(contract.run(TINY, tuned), first, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_model_keeps_its_graph(tmp_path):
    """torch.compile traces once; a hotswap with another alpha changes values only (no re-trace)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    _saved(tmp_path / "one", 1, r=4, lora_alpha=8)
    second = _saved(tmp_path / "two", 2, r=4, lora_alpha=16)
    tuned = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "one")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tuned, backend="eager")
    with torch.no_grad():
        contract.run(TINY, compiled)
        graphs = counters["stats"]["unique_graphs"]
        hotswap_adapter(compiled, tmp_path / "two", "default")
        out = contract.run(TINY, compiled)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(out, second, atol=1e-5, rtol=0)
    torch._dynamo.reset()
