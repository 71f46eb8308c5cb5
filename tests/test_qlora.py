"""QLoRA: adapters on bitsandbytes 4-bit (NF4, double quant) and 8-bit bases, loaded through
transformers' BitsAndBytesConfig on the CPU, with the normal deltatune API."""

import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune import backends
from deltatune.quantization import bnb_config, check_quantized_model, prepare_for_kbit_training

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
TARGETS = ["q_proj", "v_proj", "down_proj"]
# bnb's CPU kernels vs the dequantized weight in a dense matmul: same weights, different summation
# order (and bf16 absmax in the AVX512-BF16 inference path).
QUANT_ATOL = {"4bit": 2e-3, "8bit": 2e-2}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved once; every quantized model in this file loads from it."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def load(folder, kind, raw=False, **kw):
    """kind: "4bit" (NF4 + double quant, fp32 compute), "8bit" or "dense". Unless `raw`, quantized
    layers are made to run the differentiable kernels deltatune uses for tuned models, so outputs
    compare exactly with a tuned model's (bitsandbytes' CPU inference kernel rounds differently)."""
    quant = {"4bit": bnb_config(4, compute_dtype=kw.pop("compute_dtype", torch.float32)), "8bit": bnb_config(8)}
    extra = {"quantization_config": quant[kind], "device_map": "cpu"} if kind != "dense" else {}
    model = transformers.LlamaForCausalLM.from_pretrained(folder, **extra, **kw)
    if not raw:
        backends.prepare_for_training(model)
    return model.eval()


def ids(seed=0, shape=(2, 8)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, inputs=None):
    with torch.no_grad():
        return model(input_ids=ids() if inputs is None else inputs).logits.float()


def perturb(tuned, seed=1, scale=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def q_proj(model):
    return model.get_submodule("model.layers.0.self_attn.q_proj")


KINDS = ["4bit", "8bit"]
BNB_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


# -- backends -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_backend_reads_and_requantizes(base_dir, kind):
    dense = load(base_dir, "dense")
    model = load(base_dir, kind)
    layer, original = q_proj(model), q_proj(dense).weight.detach()
    info = backends.describe(layer)
    assert (type(layer).__name__, info.kind, info.quantized) == (BNB_CLASS[kind], "linear", kind)
    assert (info.in_features, info.out_features) == (64, 64)

    weight = backends.read_weight(layer)  # (out, in), dequantized
    assert weight.shape == original.shape and weight.is_floating_point()
    assert 0 < (weight.float() - original).abs().max() < (0.05 if kind == "4bit" else 0.01)

    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.float().T, atol=QUANT_ATOL[kind], rtol=0)

    target = original + 0.01  # requantizing stays within one quantization step of what was asked
    backends.write_weight(layer, target)
    assert type(layer.weight).__name__ == ("Params4bit" if kind == "4bit" else "Int8Params")
    again = backends.read_weight(layer).float()
    assert (again - target).abs().max() < (0.05 if kind == "4bit" else 0.01)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ again.T, atol=QUANT_ATOL[kind], rtol=0)


def test_4bit_read_survives_cpu_inference_repacking(base_dir):
    """bitsandbytes repacks 4-bit CPU weights in place on the first eval forward without grad."""
    model = load(base_dir, "4bit", raw=True)
    before = backends.read_weight(q_proj(model)).clone()
    logits(model)  # eval + no_grad: the AVX512-BF16 path (where the CPU has it) repacks the weight
    torch.testing.assert_close(backends.read_weight(q_proj(model)), before, atol=1e-2, rtol=0)


# -- tuning through the normal API ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_quantized_base(base_dir, kind):
    base_out = logits(load(base_dir, kind))
    tuned = dt.get_tuned_model(load(base_dir, kind), dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert type(q_proj(tuned.model).base_layer).__name__ == BNB_CLASS[kind]  # the quantized layer is called unchanged
    torch.testing.assert_close(logits(tuned), base_out, atol=0, rtol=0)  # B = 0: identity at init

    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if not p.requires_grad}

    tuned.train()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    inputs = ids(3)
    for _ in range(2):
        loss = tuned(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval()
    assert (logits(tuned) - base_out).abs().max() > 1e-3  # the adapter trained
    for name, param in tuned.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param.detach(), frozen[name]), name
    with tuned.disable_adapter():
        torch.testing.assert_close(logits(tuned), base_out, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_dora_reads_the_dequantized_weight(base_dir, kind):
    base_out = logits(load(base_dir, kind))
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    tuned = dt.get_tuned_model(load(base_dir, kind), config)
    wrapper = q_proj(tuned.model)
    norms = backends.read_weight(wrapper.base_layer).float().norm(dim=1)  # ||W||_row of the dequantized W
    torch.testing.assert_close(wrapper.deltas["default"].lora_magnitude_vector.detach(), norms)
    torch.testing.assert_close(logits(tuned), base_out, atol=1e-4, rtol=0)  # m = ||W||: identity at init
    perturb(tuned)
    assert (logits(tuned) - base_out).abs().max() > 1e-2


def test_ia3_on_4bit_base(base_dir):
    if "ia3" not in {spec.name for spec in dt.all_specs()}:
        pytest.skip("IA3 tuner not registered")
    config_cls = dt.get_spec("ia3").config
    base_out = logits(load(base_dir, "4bit"))
    config = config_cls(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    tuned = dt.get_tuned_model(load(base_dir, "4bit"), config)
    torch.testing.assert_close(logits(tuned), base_out, atol=1e-5, rtol=0)
    perturb(tuned)
    assert (logits(tuned) - base_out).abs().max() > 1e-2
    with pytest.raises(dt.QuantizedMergeError):
        tuned.merge_adapter()
    merged = tuned.merge_and_unload(dequantize=True)
    assert tuned.merge_report.max_abs_logit_diff < 0.05
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_training_after_cpu_eval_keeps_every_gradient(base_dir, kind):
    """bitsandbytes' 4-bit CPU inference repacking has no backward; wrapped models must not use it."""

    def grads(eval_first):
        torch.manual_seed(1)
        config = dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
        tuned = dt.get_tuned_model(load(base_dir, kind, raw=True), config)
        if eval_first:
            logits(tuned)  # eval mode, no grad: where bitsandbytes would repack
        tuned.train()
        inputs = ids(6)
        tuned(input_ids=inputs, labels=inputs).loss.backward()
        return {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}

    fresh, after_eval = grads(False), grads(True)
    for name, grad in fresh.items():
        assert after_eval[name] is not None, name
        torch.testing.assert_close(after_eval[name], grad, atol=1e-6, rtol=1e-4)


# -- gradient checkpointing --------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_prepare_for_kbit_training_gives_adapter_gradients_under_checkpointing(base_dir, reentrant):
    model = load(base_dir, "4bit", dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    model = prepare_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.norm.weight.dtype == torch.float32  # norms and the dense head in fp32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing

    config = dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)  # A and B both get gradients
    tuned = dt.get_tuned_model(model, config)
    tuned.train()
    inputs = ids(4)
    tuned(input_ids=inputs, labels=inputs).loss.backward()
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(TARGETS) * 2  # A and B, 3 targets, 2 layers
    for name, param in trainable.items():
        assert param.grad is not None, f"{name} got no gradient under checkpointing"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


# -- merging -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_quantized_storage_is_refused(base_dir, kind):
    tuned = dt.get_tuned_model(load(base_dir, kind), dt.LoraConfig(r=4, target_modules=TARGETS))
    perturb(tuned)
    before = logits(tuned)
    stored = q_proj(tuned.model).base_layer.weight.detach().clone()
    for attempt in (tuned.merge_adapter, tuned.merge_and_unload):
        with pytest.raises(dt.QuantizedMergeError, match=r"merge_and_unload\(dequantize=True\)") as err:
            attempt()
        assert kind in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)
    assert torch.equal(q_proj(tuned.model).base_layer.weight.detach(), stored)
    assert all(not w.merged for _, w in dt.core.inject.delta_wrappers(tuned.model))
    torch.testing.assert_close(logits(tuned), before, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_dequantize_gives_a_dense_model_and_reports_drift(base_dir, kind, caplog, tmp_path):
    tuned = dt.get_tuned_model(load(base_dir, kind), dt.LoraConfig(r=4, target_modules=TARGETS))
    perturb(tuned)
    probe = ids(5, (1, 12))
    expected = logits(tuned, probe)
    with caplog.at_level("WARNING", logger="deltatune"):
        merged = tuned.merge_and_unload(dequantize=True, probe_inputs={"input_ids": probe})
    assert type(merged) is transformers.LlamaForCausalLM
    assert not any(type(m).__module__.startswith(("bitsandbytes", "deltatune")) for m in merged.modules())
    assert type(q_proj(merged)) is torch.nn.Linear
    assert not merged.is_quantized and not hasattr(merged.config, "quantization_config")

    report = tuned.merge_report
    assert len(report.dequantized_layers) == 14 and report.dtype == torch.float32  # all 7 linears x 2 layers
    got = logits(merged, probe)
    assert report.max_abs_logit_diff == pytest.approx((got - expected).abs().max().item(), abs=1e-6)
    assert 0 < report.max_abs_logit_diff < 10 * QUANT_ATOL[kind]
    assert 0 <= report.max_prob_diff <= report.max_abs_logit_diff
    assert "max |delta logits|" in caplog.text

    merged.save_pretrained(tmp_path)  # a plain dense checkpoint: reloads without bitsandbytes
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, probe), got, atol=1e-5, rtol=0)


def test_merge_and_unload_dequantize_default_probe(base_dir):
    tuned = dt.get_tuned_model(load(base_dir, "4bit"), dt.LoraConfig(r=4, target_modules=TARGETS))
    perturb(tuned)
    tuned.merge_and_unload(dequantize=True)
    assert tuned.merge_report.max_abs_logit_diff is not None
    assert "drift" in tuned.merge_report.summary()


def test_base_rewriting_init_is_refused_on_quantized_layers(base_dir):
    model = load(base_dir, "4bit")
    with pytest.raises(dt.ConfigError, match="rewrites the base weight.*4bit"):
        dt.get_tuned_model(model, dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    assert not any(type(m).__name__ == "DeltaWrapper" for m in model.modules())  # left as it was


# -- peft interop: QLoRA adapters are plain LoRA adapters ----------------------------------------------------
@pytest.mark.slow
def test_qlora_adapter_loads_in_peft_on_quantized_and_dense_bases(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    tuned = dt.get_tuned_model(load(base_dir, "4bit"), dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    perturb(tuned)
    ours = logits(tuned)
    tuned.save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load(base_dir, "4bit"), tmp_path).eval()
    assert not [w for w in record if re.search(r"missing|unexpected", str(w.message), re.I)]
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=0)

    on_dense_theirs = logits(peft.PeftModel.from_pretrained(load(base_dir, "dense"), tmp_path).eval())
    on_dense_ours = logits(dt.TunedModel.from_pretrained(load(base_dir, "dense"), tmp_path))
    torch.testing.assert_close(on_dense_ours, on_dense_theirs, atol=1e-5, rtol=0)
    base_gap = (logits(load(base_dir, "dense")) - logits(load(base_dir, "4bit"))).abs().max()
    assert (on_dense_ours - ours).abs().max() < 2 * base_gap  # apart by about the quantization error only


# -- bad input ------------------------------------------------------------------------------------------------
def test_missing_bitsandbytes_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"pip install 'deltatune\[qlora\]'"):
        bnb_config(4)


def test_deltatune_works_without_bitsandbytes():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # as if it were not installed
        import deltatune as dt
        from deltatune import backends
        from deltatune.testing.tiny_models import build_tiny
        assert not any("bnb" in type(b).__module__ for b in backends.BACKENDS)
        tuned = dt.get_tuned_model(build_tiny("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
        tuned.merge_and_unload()
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_deltatune_import_does_not_import_bitsandbytes():
    code = "import sys, deltatune; assert 'bitsandbytes' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn])
def test_4bit_compute_dtype_bitsandbytes_gets_wrong_is_refused(base_dir, dtype):
    with pytest.raises(dt.ConfigError, match="compute dtype"):
        bnb_config(4, compute_dtype=dtype)  # before any weights load
    raw = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, quantization_config=raw, device_map="cpu")
    with pytest.raises(dt.ConfigError, match="compute dtype"):
        prepare_for_kbit_training(model)
    with pytest.raises(dt.ConfigError, match="compute dtype"):
        dt.get_tuned_model(model, dt.LoraConfig(r=4, target_modules=TARGETS))  # before training starts


def test_bad_bnb_config_values():
    with pytest.raises(dt.ConfigError, match="bits must be 4 or 8"):
        bnb_config(3)
    with pytest.raises(dt.ConfigError, match="quant_type"):
        bnb_config(4, quant_type="int4")


def test_unsupported_quantized_layer_type(base_dir):
    model = load(base_dir, "4bit")
    model.model.embed_tokens = bnb.nn.Embedding4bit(VOCAB, 64).to("cpu")
    with pytest.raises(dt.ConfigError, match="Embedding4bit"):
        dt.get_tuned_model(model, dt.LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(dt.ConfigError, match=r"'model.embed_tokens' is a bitsandbytes Embedding4bit"):
        check_quantized_model(model)
    tuned = dt.get_tuned_model(model, dt.LoraConfig(r=4, target_modules="all-linear"))  # the linear layers still work
    with pytest.raises(TypeError, match="Embedding4bit"):
        tuned.merge_and_unload(dequantize=True)
    assert type(q_proj(tuned.model).base_layer).__name__ == "Linear4bit"  # refused before changing anything


def test_docs_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "qlora.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace = {"__name__": "__docs__"}  # the page's blocks continue one another
    for index, code in enumerate(blocks):
        exec(compile(code, f"docs/qlora.md[{index}]", "exec"), namespace)
