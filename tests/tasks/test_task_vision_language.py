"""Image-to-text LoRA on a tiny LLaVA (CLIP vision tower + Llama language model, from configs)."""

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.tasks import tiny
from deltatune.tasks import vision_language as vl
from deltatune.tasks.image import ImageTransform

CAPTIONS = ["the red cat is sitting on the grass", "a blue bird flying in the sky", "a small white dog running"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tiny_word_tokenizer()


def _collator(tokenizer, model):
    transform = ImageTransform((16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    return vl.CaptionCollator(
        tokenizer, transform, vl.count_image_tokens(model.config), model.config.image_token_id, prompt="a photo of"
    )


def _rows():
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "caption": c} for c in CAPTIONS]


def test_collator_masks_everything_but_the_caption(tokenizer):
    model = tiny.tiny_llava(len(tokenizer))
    collate = _collator(tokenizer, model)
    rows = _rows() + [{"image": b"broken", "caption": "a cat"}, {"image": np.zeros((8, 8), np.uint8), "caption": " "}]
    batch = collate(rows)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert collate.report.n_dropped == 2 and dict(collate.report.dropped) == {"decode": 1, "label": 1}
    n_prefix = 1 + 16 + 3  # bos, 16 image tokens, "a photo of"
    assert (batch["input_ids"][:, 1:17] == model.config.image_token_id).all()
    assert (batch["labels"][:, :n_prefix] == vl.IGNORE_INDEX).all()
    first = batch["labels"][0][batch["labels"][0] != vl.IGNORE_INDEX].tolist()
    assert tokenizer.decode(first, skip_special_tokens=True) == CAPTIONS[0] and first[-1] == tokenizer.eos_token_id
    assert batch["attention_mask"].sum(1).tolist() == [n_prefix + len(c.split()) + 1 for c in CAPTIONS]


def test_lora_on_language_model_only_trains_and_generates(tmp_path, tokenizer):
    model = tiny.tiny_llava(len(tokenizer))
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    collate = _collator(tokenizer, model)
    batch = collate(_rows())
    with torch.no_grad():
        base_logits = model(**batch).logits
    config = dt.LoraConfig(
        r=8, lora_alpha=16, target_modules=vl.language_model_targets(), modules_to_save=["multi_modal_projector"]
    )
    tuned = dt.get_tuned_model(model, config)
    targets = tuned.adapters["default"].targets
    assert len(targets) == 4 and all(".language_model." in t for t in targets)
    assert not [n for n, _ in tuned.named_modules() if "vision_tower" in n and ("deltas" in n or "base_layer" in n)]
    vision_has_same_names = [n for n, _ in model.model.vision_tower.named_modules() if n.endswith("q_proj")]
    assert vision_has_same_names, "the check above is vacuous if the vision tower has no q_proj"
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not [n for n in trainable if "vision_tower" in n]

    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=3e-2)
    losses = [vl.training_step(tuned, opt, batch) for _ in range(20)]
    assert losses[-1] < 0.6 * losses[0], losses
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision_before[key]), f"vision tower changed: {key}"

    tuned.eval()
    with torch.no_grad():
        logits = tuned(**batch).logits
    assert (logits - base_logits).abs().max() > 1e-3
    captions = vl.generate_captions(tuned, collate, _rows(), max_new_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    with tuned.disable_adapter():
        base_captions = vl.generate_captions(tuned, collate, _rows(), max_new_tokens=6)
    assert captions != base_captions

    tuned.save_pretrained(tmp_path)
    loaded = dt.TunedModel.from_pretrained(tiny.tiny_llava(len(tokenizer)), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=0)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny.tiny_llava(len(tokenizer)), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, logits, atol=1e-5, rtol=0)
