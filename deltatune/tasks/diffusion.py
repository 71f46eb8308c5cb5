"""Text-to-image LoRA on a diffusers UNet: the noise-prediction step and diffusers' file layout.

Training objective (Ho et al. 2020, https://arxiv.org/abs/2006.11239): pick a timestep t, mix the
clean latents x0 with Gaussian noise eps as x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
(`scheduler.add_noise`), and train the UNet to predict eps (or the velocity
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for "v_prediction" schedulers) with an MSE loss.
LoRA usually targets the attention projections `to_q`, `to_k`, `to_v`, `to_out.0`.

Files: `TunedModel.save_pretrained` writes peft's layout, which `peft.PeftModel.from_pretrained`
reads. diffusers' `pipeline.load_lora_weights` / `unet.load_lora_adapter` want their own:
`pytorch_lora_weights.safetensors` with keys prefixed "unet." and the LoRA config in the file's
metadata; `save_diffusers_lora` writes that, `load_diffusers_lora` reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.core.tuned_model import TunedModel

UNET_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# LoraConfig fields diffusers passes on to peft's LoraConfig from the file's metadata.
_METADATA_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "use_dora",
    "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias", "init_lora_weights",
)  # fmt: skip


# -- training ----------------------------------------------------------------------------------------
def noise_prediction_loss(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction on noised latents and its target (eps or v).

    Args:
        latents: clean latents x0, (B, C, h, w) (already multiplied by the VAE's scaling factor).
        encoder_hidden_states: text embeddings, (B, T, cross_attention_dim).
        generator: seeds the noise and the timesteps (reproducible steps).
    """
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)  # (B, C, h, w)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)  # (B,)
    noisy = scheduler.add_noise(latents, noise, timesteps)  # x_t, (B, C, h, w)
    prediction = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    return F.mse_loss(prediction.float(), target.float())


def training_step(
    unet: nn.Module,
    scheduler: Any,
    optimizer: torch.optim.Optimizer,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> float:
    """One optimizer step on the noise-prediction loss; returns the loss."""
    unet.train()
    loss = noise_prediction_loss(unet, scheduler, latents, encoder_hidden_states, generator=generator)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text embeddings (B, T, dim), padded to the tokenizer's max length as SD does."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, T)
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def encode_images(
    vae: nn.Module, pixel_values: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, H/f, W/f) sampled from the VAE."""
    posterior = vae.encode(pixel_values).latent_dist
    return posterior.sample(generator=generator) * vae.config.scaling_factor


# -- diffusers' file layout ----------------------------------------------------------------------------
def save_diffusers_lora(
    tuned_unet: TunedModel, save_directory: str | os.PathLike, adapter_name: str | None = None, *, prefix: str = "unet"
) -> Path:
    """Write a LoRA adapter of a UNet the way diffusers' `save_lora_weights` does.

    Returns the written file. Raises ConfigError for adapters diffusers cannot represent (not LoRA,
    or with trained biases / modules_to_save)."""
    from safetensors.torch import save_file

    name = adapter_name or tuned_unet.active_adapters[0]
    config = tuned_unet.peft_config[name]
    if config.peft_type != "LORA":
        raise ConfigError(f"diffusers loads LoRA adapters only; adapter {name!r} is {config.peft_type}")
    tensors = tuned_unet.adapter_state_dict(name)
    foreign = sorted(k for k in tensors if ".lora_" not in k)
    if foreign:
        raise ConfigError(
            f"adapter {name!r} holds tensors diffusers' LoRA format cannot carry (modules_to_save or trained "
            f"biases): {foreign[:5]}; save it with save_pretrained (peft format) instead"
        )
    peft_fields, _ = config.to_peft_dict()
    metadata = {f"{prefix}.{key}": peft_fields[key] for key in _METADATA_FIELDS if key in peft_fields}
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DIFFUSERS_WEIGHT_NAME
    weights = {f"{prefix}.{key}": value.detach().contiguous() for key, value in tensors.items()}
    save_file(weights, path, metadata={"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def load_diffusers_lora(
    unet: nn.Module, path: str | os.PathLike, *, prefix: str = "unet", is_trainable: bool = False
) -> TunedModel:
    """Wrap `unet` with a diffusers-layout LoRA file (ours, or diffusers' own peft-style saves).

    Without config metadata in the file, r is read from the tensors and lora_alpha = r, as diffusers
    does. Old kohya/attn-processor key layouts are not converted."""
    from safetensors import safe_open

    from deltatune.core.registry import get_spec

    file = Path(path)
    if file.is_dir():
        file = file / DIFFUSERS_WEIGHT_NAME
    with safe_open(file, framework="pt") as handle:
        raw_metadata = (handle.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
        tensors = {
            k.removeprefix(f"{prefix}."): handle.get_tensor(k) for k in handle.keys() if k.startswith(f"{prefix}.")
        }
    if not tensors or not all(".lora_A." in k or ".lora_B." in k or "lora_magnitude" in k for k in tensors):
        raise ConfigError(
            f"{file}: no peft-style '{prefix}.*.lora_A/lora_B' tensors (older LoRA layouts are not supported)"
        )
    fields = {
        k.removeprefix(f"{prefix}."): v
        for k, v in json.loads(raw_metadata or "{}").items()
        if k.startswith(f"{prefix}.")
    }
    if "r" not in fields:
        rank = next(v.shape[1] for k, v in tensors.items() if ".lora_B." in k)
        targets = sorted({k.split(".lora_")[0] for k in tensors})
        fields = {"r": rank, "lora_alpha": rank, "target_modules": targets}
    config = get_spec("lora").config.from_dict(fields, source=str(file)).replace(inference_mode=not is_trainable)
    tuned = TunedModel(unet, None)
    tuned.add_adapter("default", config, _loading=True)
    try:
        tuned.load_adapter_state_dict("default", tensors, source=str(file))
    except BaseException:
        tuned.unload()
        raise
    tuned.set_adapter("default")
    return tuned
