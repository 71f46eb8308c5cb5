"""`deltatune merge`: combine saved adapters into one PEFT-format adapter (TunedModel.add_weighted_adapter).

    deltatune merge --model M --adapter a=OUT_A/adapter --adapter b=OUT_B/adapter \\
        --weights 0.7,0.3 --method ties --density 0.5 --output-dir merged
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from deltatune.core.arithmetic import COMBINATION_TYPES
from deltatune.core.config import ConfigError


def add_parser(sub) -> None:
    merge = sub.add_parser("merge", help="combine adapters into one (linear, cat, svd, ties, dare_*, ...)")
    merge.add_argument(
        "--model", required=True, help="base model the adapters were trained on (registry name, folder, hub id)"
    )
    merge.add_argument(
        "--adapter", action="append", required=True, metavar="NAME=PATH",
        help="an adapter folder (PEFT format), optionally named; give it once per adapter",
    )  # fmt: skip
    merge.add_argument("--weights", help="one weight per adapter, comma separated (default: 1 each)")
    merge.add_argument(
        "--method",
        choices=COMBINATION_TYPES,
        help="combination type, peft's names (default: svd for LoRA, linear for (IA)^3)",
    )
    merge.add_argument("--density", type=float, help="fraction of entries kept by ties / dare_* / magnitude_prune")
    merge.add_argument("--svd-rank", type=int, help="rank of the result for the *svd methods (default: largest rank)")
    merge.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="sign election of ties")
    merge.add_argument("--seed", type=int, default=0, help="seed of the random drops of dare_* (deterministic)")
    merge.add_argument("--output-dir", required=True)
    merge.add_argument("--overwrite", action="store_true", help="replace an --output-dir deltatune wrote")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="base weight dtype")
    merge.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run")
    merge.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")


def _adapters(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if not name or not path:
            raise ConfigError(f"--adapter {spec!r}: give NAME=PATH or PATH")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {spec!r}: {path} holds no adapter_config.json; give a saved adapter folder")
        out.append((name, path))
    return out


def _weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: give numbers separated by commas, e.g. 0.7,0.3") from None
    if len(weights) != count:
        raise ConfigError(
            f"--weights has {len(weights)} value(s) for {count} --adapter(s); give one weight per adapter"
        )
    return weights


def run_merge(ns: argparse.Namespace) -> int:
    from deltatune.core.tuned_model import TunedModel
    from deltatune.models import load_model, resolve_model
    from deltatune.train.outdir import check_replaceable, replace_folder

    adapters = _adapters(ns.adapter)
    weights = _weights(ns.weights, len(adapters))
    out = Path(ns.output_dir)
    check_replaceable(out, overwrite=ns.overwrite)
    source, _ = resolve_model(ns.model, trust_remote_code=ns.trust_remote_code)
    model = load_model(source, dtype=ns.dtype, trust_remote_code=ns.trust_remote_code)
    tuned = TunedModel(model, None)
    names = [f"input_{i}" for i in range(len(adapters))]  # the result is saved as "default", at the top
    for name, (_, path) in zip(names, adapters):
        tuned.load_adapter(path, name)
    tuned.add_weighted_adapter(
        names, weights, "default", combination_type=ns.method, svd_rank=ns.svd_rank, density=ns.density,
        majority_sign_method=ns.majority_sign, seed=ns.seed,
    )  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tuned.save_pretrained(tmp, selected_adapters=["default"])
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank = tuned.adapters["default"].config.r
    parts = ", ".join(f"{w:g} x {label}" for w, (label, _) in zip(weights, adapters))
    print(
        f"wrote {ns.method or 'default'} merge of {parts} (r={rank}) to {out}: PEFT adapter (load with deltatune or peft)"
    )
    return 0
