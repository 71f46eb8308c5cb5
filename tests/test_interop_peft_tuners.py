"""The peft method family beyond LoRA/IA3 (LoHa, LoKr, OFT, BOFT, VeRA, ...) crosses between deltatune
and the real `peft` package unchanged: an adapter made non-trivial in either library, saved, loads
in the other with identical outputs, on a tiny Llama and (where the method supports convolutions)
a toy Conv1d/Conv2d model."""

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.registry import get_spec
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

peft = pytest.importorskip("peft")

LLAMA = ["q_proj", "v_proj", "down_proj"]
CONV = ["conv1", "conv2", "conv1d"]
CONV2D = ["conv1", "conv2"]

# name -> (peft config class name, shared fields, {tiny model: target_modules})
METHODS = {
    "loha": ("LoHaConfig", {"r": 2, "alpha": 4}, {"llama": LLAMA, "conv": CONV}),
    "loha-effective": ("LoHaConfig", {"r": 2, "alpha": 3, "use_effective_conv2d": True}, {"conv": CONV}),
    "lokr": ("LoKrConfig", {"r": 2, "alpha": 4}, {"llama": LLAMA, "conv": CONV}),
    "lokr-both": (
        "LoKrConfig", {"r": 1, "alpha": 2, "decompose_both": True, "use_effective_conv2d": True},
        {"llama": LLAMA, "conv": CONV2D},  # peft itself fails on the effective Conv1d here (torch.kron strides)
    ),
    "lokr-factor": ("LoKrConfig", {"r": 8, "alpha": 8, "decompose_factor": 4}, {"llama": LLAMA, "conv": CONV2D}),
    "oft": ("OFTConfig", {"oft_block_size": 4}, {"llama": LLAMA, "conv": CONV2D}),
    "oft-exact": (
        "OFTConfig", {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False, "block_share": True},
        {"llama": LLAMA, "conv": CONV2D},
    ),
    "boft": ("BOFTConfig", {"boft_block_size": 4}, {"llama": LLAMA, "conv": ["conv2"]}),
    "boft-num": ("BOFTConfig", {"boft_block_size": 0, "boft_block_num": 2}, {"llama": LLAMA}),
    "fourierft": ("FourierFTConfig", {"n_frequency": 40, "scaling": 20.0}, {"llama": LLAMA}),
    "fourierft-init": ("FourierFTConfig", {"n_frequency": 30, "init_weights": True, "random_loc_seed": 5}, {"llama": LLAMA}),
    "hra": ("HRAConfig", {"r": 4}, {"llama": LLAMA, "conv": CONV2D}),
    "hra-gs": ("HRAConfig", {"r": 3, "apply_GS": True, "init_weights": False}, {"llama": LLAMA, "conv": CONV2D}),
    "miss": ("MissConfig", {"r": 3, "miss_dropout": 0.1}, {"llama": LLAMA}),
    "miss-mini": ("MissConfig", {"r": 4, "init_weights": "mini", "mini_r": 4}, {"llama": LLAMA}),
    "c3a": ("C3AConfig", {"block_size": 4}, {"llama": LLAMA}),
    "c3a-zero": ("C3AConfig", {"block_size": 8, "init_weights": True}, {"llama": LLAMA}),
    "delora": ("DeloraConfig", {"r": 2, "delora_lambda": 4.0}, {"llama": LLAMA}),
    "road": ("RoadConfig", {"group_size": 4}, {"llama": LLAMA}),
    "road-2": ("RoadConfig", {"variant": "road_2", "group_size": 8}, {"llama": LLAMA}),
    "road-4": ("RoadConfig", {"variant": "road_4", "group_size": 2}, {"llama": LLAMA}),
    "gralora": ("GraloraConfig", {"r": 4, "alpha": 8}, {"llama": LLAMA}),
    "gralora-hybrid": ("GraloraConfig", {"r": 4, "alpha": 8, "gralora_k": 4, "hybrid_r": 2}, {"llama": LLAMA}),
    "shira": ("ShiraConfig", {"r": 2, "random_seed": 11}, {"llama": LLAMA}),
    "shira-unseeded": ("ShiraConfig", {"r": 1}, {"llama": LLAMA}),
    "vera": ("VeraConfig", {"r": 4, "projection_prng_key": 7}, {"llama": LLAMA}),
    "vera-seed-only": ("VeraConfig", {"r": 6, "save_projection": False}, {"llama": LLAMA}),
    "randlora": ("RandLoraConfig", {"r": 4, "randlora_alpha": 8}, {"llama": LLAMA}),
    "randlora-sparse": ("RandLoraConfig", {"r": 6, "randlora_alpha": 6, "sparse": True}, {"llama": LLAMA}),
    "randlora-seed-only": (
        "RandLoraConfig", {"r": 5, "randlora_alpha": 5, "very_sparse": True, "save_projection": False},
        {"llama": LLAMA},
    ),
    "vblora": ("VBLoRAConfig", {"r": 2, "num_vectors": 16, "vector_length": 4, "topk": 2}, {"llama": LLAMA}),
    "waveft": ("WaveFTConfig", {"n_frequency": 40, "scaling": 10.0}, {"llama": LLAMA}),
    "waveft-no-idwt": ("WaveFTConfig", {"n_frequency": 30, "use_idwt": False, "random_loc_seed": 3}, {"llama": LLAMA}),
    "hira": ("HiraConfig", {"r": 2, "hira_dropout": 0.1}, {"llama": LLAMA}),
    "pvera": ("PveraConfig", {"r": 4, "projection_prng_key": 3}, {"llama": LLAMA}),
    "peanut": ("PeanutConfig", {"r": 4, "depth": 2, "act_fn": "gelu", "scaling": 2.0}, {"llama": LLAMA}),
    "beft": ("BeftConfig", {}, {"llama": LLAMA}),
    "deft": ("DeftConfig", {"r": 2, "alpha": 4}, {"llama": LLAMA}),
    "deft-qr-para": ("DeftConfig", {"r": 3, "decomposition_method": "qr", "para": True}, {"llama": LLAMA}),
    "supertuning": ("SupertuningConfig", {"sparsity": 0.9}, {"llama": LLAMA}),
    "supertuning-supra": (
        "SupertuningConfig", {"sparsity": 0.95, "r": 2, "select_top": False, "save_precomputed_indices": False},
        {"llama": LLAMA},
    ),
    "glora": ("GloraConfig", {"r": 2}, {"llama": LLAMA}),
    "glora-vectors": (
        "GloraConfig", {"r": 2, "config_A_B": "vector", "config_C": "vector", "config_D_E": "vector"},
        {"bert": ["query", "value"]},  # layers with biases: every slot in use
    ),
    "unilora": ("UniLoraConfig", {"r": 2, "theta_d_length": 32, "proj_seed": 3}, {"llama": LLAMA}),
    "unilora-saved": ("UniLoraConfig", {"r": 2, "theta_d_length": 20, "save_indices": True}, {"llama": LLAMA}),
}  # fmt: skip
# peft's unmerged forward on these differs from its own merge (OFT on k > 1 convolutions rotates unfolded
# input patches); deltatune computes the merged form, so these compare with peft's merged model
PEFT_MERGED = {("oft", "conv"), ("oft-exact", "conv")}
CASES = [pytest.param(m, t, id=f"{m}-{t}") for m, (_, _, models) in METHODS.items() for t in models]


def _ours(method: str, tiny_name: str):
    peft_class, fields, models = METHODS[method]
    spec = next(s for s in dt.all_specs() if s.config.__name__ == peft_class)
    return spec.config(target_modules=models[tiny_name], task_type=TINY_MODELS[tiny_name].task_type, **fields)


def _theirs(method: str, tiny_name: str):
    peft_class, fields, models = METHODS[method]
    return getattr(peft, peft_class)(
        target_modules=models[tiny_name], task_type=TINY_MODELS[tiny_name].task_type, **fields
    )


def _perturb_peft(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize(("method", "tiny_name"), CASES)
def test_deltatune_adapter_loads_in_peft(tmp_path, method, tiny_name):
    tiny = TINY_MODELS[tiny_name]
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), _ours(method, tiny_name))
    contract.perturb(tuned)
    ours = contract.assert_changes_output(tiny, tuned, base_out)
    tuned.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path).eval()
    if (method, tiny_name) in PEFT_MERGED:
        theirs = theirs.merge_and_unload()
    for w in record:
        text = str(w.message).lower()
        assert "missing" not in text and "unexpected" not in text, text
    torch.testing.assert_close(contract.run(tiny, theirs), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "tiny_name"), CASES)
def test_peft_adapter_loads_in_deltatune(tmp_path, method, tiny_name):
    tiny = TINY_MODELS[tiny_name]
    base_out = contract.run(tiny, tiny.fresh())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny.fresh(), _theirs(method, tiny_name))
    _perturb_peft(theirs)
    expected = contract.run(tiny, theirs.eval())
    assert (expected - base_out).abs().max() > 1e-4, "the perturbed peft adapter does not change the output"
    theirs.save_pretrained(tmp_path)
    if (method, tiny_name) in PEFT_MERGED:
        expected = contract.run(tiny, theirs.merge_and_unload())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    assert not [str(w.message) for w in record if "unknown" in str(w.message)], "peft wrote fields we do not read"
    assert get_spec(ours.adapters["default"].spec.name).peft_type == _theirs(method, tiny_name).peft_type.value
    torch.testing.assert_close(contract.run(tiny, ours), expected, atol=1e-5, rtol=1e-5)


def test_fourierft_small_layers_get_all_frequencies_and_peft_agrees(tmp_path):
    """n_frequency above a layer's size (peft refuses it) is capped per layer through n_frequency_pattern."""
    tiny = TINY_MODELS["llama"]
    config = dt.FourierFTConfig(target_modules=LLAMA, n_frequency=300, scaling=5.0, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="fewer than n_frequency"):
        tuned = dt.get_tuned_model(tiny.fresh(), config)
    sizes = {name: p.numel() for name, p in tuned.named_parameters() if "fourierft_spectrum" in name}
    assert sorted(set(sizes.values())) == [128, 256, 300]  # v_proj (8 x 16), q_proj (16 x 16), down_proj
    tuned.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path).eval()
    torch.testing.assert_close(contract.run(tiny, theirs), contract.run(tiny, tuned), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", [0, 2])
def test_cartridge_crosses_both_ways(tmp_path, frozen):
    """CARTRIDGE (a trained KV cache served like prefix tuning): peft's file in deltatune and ours in peft."""
    tiny = TINY_MODELS["llama"]
    base_out = contract.run(tiny, tiny.fresh())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            tiny.fresh(), peft.CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=frozen, task_type="CAUSAL_LM")
        )
    _perturb_peft(theirs)
    expected = contract.run(tiny, theirs.eval())
    assert (expected - base_out).abs().max() > 1e-4
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path / "theirs")
    torch.testing.assert_close(contract.run(tiny, ours), expected, atol=1e-5, rtol=1e-5)

    config = dt.CartridgeConfig(num_virtual_tokens=4, num_frozen_tokens=frozen, task_type="CAUSAL_LM")
    tuned = dt.get_tuned_model(tiny.fresh(), config)
    contract.perturb(tuned)
    mine = contract.assert_changes_output(tiny, tuned, base_out)
    assert (
        sum(p.numel() for p in tuned.parameters() if p.requires_grad) == (4 - frozen) * 2 * 2 * 8
    )  # L=2, 2 KV heads x 4
    tuned.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path / "ours").eval()
    torch.testing.assert_close(contract.run(tiny, back), mine, atol=1e-5, rtol=1e-5)
