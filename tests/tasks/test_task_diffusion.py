"""Text-to-image LoRA on a tiny UNet2DConditionModel: training step, peft and diffusers loading,
and generation through a tiny StableDiffusionPipeline built offline from configs."""

import pytest
import torch

import deltatune as dt

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from deltatune.tasks import diffusion, tiny  # noqa: E402

GEN = torch.Generator().manual_seed(0)
LATENTS = torch.randn(2, 4, 8, 8, generator=GEN)  # (B, C, h, w)
TEXT = torch.randn(2, 16, 16, generator=GEN)  # (B, T, cross_attention_dim)
TIMESTEPS = torch.tensor([10, 60])


def run(unet):
    with torch.no_grad():
        return unet(LATENTS, TIMESTEPS, encoder_hidden_states=TEXT).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter trained a few noise-prediction steps, saved both ways, and its output."""
    pipe = tiny.tiny_sd_pipeline()
    base = run(pipe.unet)
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=diffusion.UNET_ATTENTION_TARGETS)
    tuned = dt.get_tuned_model(pipe.unet, config)
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-2)

    def loss_on_fixed_noise():
        with torch.no_grad():
            return diffusion.noise_prediction_loss(
                tuned, pipe.scheduler, LATENTS, TEXT, generator=torch.Generator().manual_seed(7)
            ).item()

    before = loss_on_fixed_noise()
    for _ in range(8):
        diffusion.training_step(tuned, pipe.scheduler, opt, LATENTS, TEXT, generator=torch.Generator().manual_seed(7))
    after = loss_on_fixed_noise()
    tuned.eval()
    out = run(tuned)
    folder = tmp_path_factory.mktemp("unet_lora")
    tuned.save_pretrained(folder / "peft")
    diffusion.save_diffusers_lora(tuned, folder / "diffusers")
    return {"base": base, "out": out, "folder": folder, "losses": (before, after), "tuned": tuned, "pipe": pipe}


def test_training_step_lowers_noise_prediction_loss_and_changes_output(trained):
    before, after = trained["losses"]
    assert after < 0.95 * before, (before, after)
    assert (trained["out"] - trained["base"]).abs().max() > 1e-3
    wrapped = trained["tuned"].adapters["default"].targets
    assert wrapped and {t.split("attn")[-1].split(".", 1)[1] for t in wrapped} == set(diffusion.UNET_ATTENTION_TARGETS)


def test_peft_loads_the_unet_adapter(trained):
    theirs = peft.PeftModel.from_pretrained(tiny.tiny_unet(), trained["folder"] / "peft").eval()
    torch.testing.assert_close(run(theirs), trained["out"], atol=1e-5, rtol=0)
    ours = dt.TunedModel.from_pretrained(tiny.tiny_unet(), trained["folder"] / "peft")
    torch.testing.assert_close(run(ours), trained["out"], atol=1e-5, rtol=0)


def test_diffusers_loads_the_exported_lora(trained):
    folder = trained["folder"] / "diffusers"
    assert (folder / diffusion.DIFFUSERS_WEIGHT_NAME).is_file()
    unet = tiny.tiny_unet()
    unet.load_lora_adapter(folder, prefix="unet", weight_name=diffusion.DIFFUSERS_WEIGHT_NAME)
    torch.testing.assert_close(run(unet), trained["out"], atol=1e-5, rtol=0)
    pipe = tiny.tiny_sd_pipeline()
    pipe.load_lora_weights(folder)
    torch.testing.assert_close(run(pipe.unet), trained["out"], atol=1e-5, rtol=0)
    back = diffusion.load_diffusers_lora(tiny.tiny_unet(), folder)
    torch.testing.assert_close(run(back), trained["out"], atol=1e-5, rtol=0)


def test_diffusers_own_lora_save_loads_in_deltatune(tmp_path):
    """diffusers' save_lora_weights (no config metadata here): r from shapes, alpha = r."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = tiny.tiny_unet()
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    expected = run(unet)
    assert (expected - run(tiny.tiny_unet())).abs().max() > 1e-4
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    loaded = diffusion.load_diffusers_lora(tiny.tiny_unet(), tmp_path)
    torch.testing.assert_close(run(loaded), expected, atol=1e-5, rtol=0)


def test_exporter_refuses_what_diffusers_cannot_carry(tmp_path):
    config = dt.LoraConfig(r=2, target_modules=["to_q"], modules_to_save=["conv_out"])
    tuned = dt.get_tuned_model(tiny.tiny_unet(), config)
    with pytest.raises(dt.ConfigError, match="modules_to_save"):
        diffusion.save_diffusers_lora(tuned, tmp_path)


def test_pipeline_generates_with_the_adapter(trained):
    pipe = trained["pipe"]

    def generate():
        out = pipe(
            "a red cat",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
        return out.images

    with_adapter = generate()
    assert with_adapter.shape == (1, 3, 16, 16) and torch.isfinite(with_adapter).all()
    with trained["tuned"].disable_adapter():  # the pipeline holds the same, adapter-wrapped UNet
        without = generate()
    assert (with_adapter - without).abs().max() > 1e-4
