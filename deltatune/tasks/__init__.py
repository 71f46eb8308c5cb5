"""Task helpers around the adapter engine: images in, labels / noise / captions out.

- `deltatune.tasks.image`: decode, resize and normalize images; batch them for classification,
  counting (never raising on) images that cannot be used.
- `deltatune.tasks.diffusion`: the noise-prediction training step for a diffusers UNet and an
  exporter to diffusers' LoRA file layout.
- `deltatune.tasks.vision_language`: image + caption batches for LLaVA-style models, a training
  step and a target pattern that keeps the vision tower frozen.
- `deltatune.tasks.tiny`: tiny random vision models built from configs (tests, docs, demos).

Import the submodule you need; this package imports nothing heavy (diffusers stays optional).
"""
