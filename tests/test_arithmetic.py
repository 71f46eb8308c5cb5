"""Adapter arithmetic (add_weighted_adapter) equals the real peft's for every combination type."""

import pytest
import torch

import deltatune as dt
from deltatune.core import arithmetic
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

TINY = TINY_MODELS["llama"]
SEED = 7
WEIGHTS = [0.7, -0.4]


def _peft_pair(tmp_path, ranks=(4, 4), targets=("q_proj", "v_proj", "embed_tokens")):
    """A peft model with random LoRA adapters "one" and "two", both saved under tmp_path."""
    torch.manual_seed(0)
    cfg = dict(target_modules=list(targets), init_lora_weights=False)
    theirs = peft.get_peft_model(TINY.fresh(), peft.LoraConfig(r=ranks[0], lora_alpha=8, **cfg), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=ranks[1], lora_alpha=4, **cfg))
    theirs.save_pretrained(tmp_path)  # non-default names go in subfolders
    ours = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "two", "two")
    return theirs.eval(), ours.eval()


def _peft_combine(theirs, monkeypatch, name, **kwargs):
    """peft's add_weighted_adapter with the global RNG seeded with SEED just before its first DARE draw."""
    original, seeded = merge_utils.random_pruning, []

    def first_draw_seeded(*args, **kw):
        if not seeded:
            torch.manual_seed(SEED)
            seeded.append(True)
        return original(*args, **kw)

    monkeypatch.setattr(merge_utils, "random_pruning", first_draw_seeded)
    theirs.add_weighted_adapter(["one", "two"], WEIGHTS, name, **kwargs)
    monkeypatch.setattr(merge_utils, "random_pruning", original)
    theirs.set_adapter(name)
    return contract.run(TINY, theirs)


def _ours(ours, name, **kwargs):
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, name, seed=SEED, **kwargs)
    ours.set_adapter(name)
    return contract.run(TINY, ours)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _peft_pair(tmp_path_factory.mktemp("pair"))


@pytest.mark.parametrize("method", arithmetic.COMBINATION_TYPES)
def test_combination_equals_peft(pair, monkeypatch, method):
    theirs, ours = pair
    kwargs = {"combination_type": method}
    if method.removesuffix("_svd") in arithmetic.NEEDS_DENSITY:
        kwargs["density"] = 0.5
    if "ties" in method:
        kwargs["majority_sign_method"] = "frequency" if method.startswith("dare") else "total"
    expected = _peft_combine(theirs, monkeypatch, f"m_{method}", **kwargs)
    got = _ours(ours, f"m_{method}", **kwargs)
    base = contract.run(TINY, TINY.fresh())
    assert (expected - base).abs().max() > 1e-3, "the combined adapter does nothing; the test would prove nothing"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cat_and_svd_of_unequal_ranks_equal_peft(tmp_path, monkeypatch):
    theirs, ours = _peft_pair(tmp_path, ranks=(4, 2), targets=("q_proj", "down_proj"))
    for method, extra in (("cat", {}), ("svd", {"svd_rank": 3}), ("dare_ties_svd", {"density": 0.6})):
        expected = _peft_combine(theirs, monkeypatch, method, combination_type=method, **extra)
        torch.testing.assert_close(
            _ours(ours, method, combination_type=method, **extra), expected, atol=1e-4, rtol=1e-4
        )
    with pytest.raises(dt.ConfigError, match="equal rank"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "x", combination_type="ties", density=0.5)


def test_dare_is_seeded_and_deterministic(pair):
    _, ours = pair
    outs = []
    for name, seed in (("d1", 1), ("d2", 1), ("d3", 2)):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, name, combination_type="dare_linear", density=0.5, seed=seed)
        ours.set_adapter(name)
        outs.append(contract.run(TINY, ours))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_combined_adapter_round_trips_through_peft(pair, tmp_path):
    _, ours = pair
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, "default", combination_type="ties", density=0.5)
    ours.set_adapter("default")
    expected = contract.run(TINY, ours)
    ours.save_pretrained(tmp_path, selected_adapters=["default"])
    loaded = peft.PeftModel.from_pretrained(TINY.fresh(), tmp_path).eval()
    torch.testing.assert_close(contract.run(TINY, loaded), expected, atol=1e-5, rtol=0)


def test_bad_arguments_are_one_clear_error(pair):
    _, ours = pair
    with pytest.raises(dt.ConfigError, match="density"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "x", combination_type="ties")
    with pytest.raises(dt.ConfigError, match="combination_type"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "x", combination_type="mean")
    with pytest.raises(dt.ConfigError, match="no adapter named"):
        ours.add_weighted_adapter(["one", "zz"], WEIGHTS, "x")
    with pytest.raises(dt.ConfigError, match="one weight per adapter"):
        ours.add_weighted_adapter(["one", "two"], [1.0], "x")
    with pytest.raises(dt.ConfigError, match="already exists"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "one")
    assert "x" not in ours.adapters


def test_ia3_weighted_adapter_equals_peft(tmp_path):
    cfg = dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(TINY.fresh(), peft.IA3Config(**cfg), adapter_name="one")
    theirs.add_adapter("two", peft.IA3Config(**cfg))
    theirs.save_pretrained(tmp_path)
    ours = dt.TunedModel.from_pretrained(TINY.fresh(), tmp_path / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "two", "two")
    theirs.add_weighted_adapter(["one", "two"], WEIGHTS, "mix")
    theirs.set_adapter("mix")
    ours.add_weighted_adapter(["one", "two"], WEIGHTS, "mix")
    ours.set_adapter("mix")
    torch.testing.assert_close(contract.run(TINY, ours.eval()), contract.run(TINY, theirs.eval()), atol=1e-5, rtol=0)
    with pytest.raises(dt.ConfigError, match="linearly"):
        ours.add_weighted_adapter(["one", "two"], WEIGHTS, "x", combination_type="ties")
