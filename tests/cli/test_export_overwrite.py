"""`deltatune export --overwrite` replaces only folders deltatune wrote; anything else is refused
with the list of what is there, and nothing is deleted."""

from __future__ import annotations

import pytest
import torch

from deltatune.cli.main import main


@pytest.fixture(scope="module")
def adapter(tiny_assets, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import deltatune as dt

    model_dir, _ = tiny_assets
    torch.manual_seed(0)
    tuned = dt.get_tuned_model(
        AutoModelForCausalLM.from_pretrained(model_dir), dt.LoraConfig(r=2, target_modules=["q_proj"])
    )
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    tuned.save_pretrained(folder)
    return model_dir, folder


def export(model_dir, adapter, out, *extra) -> int:
    return main(["export", "--model", str(model_dir), "--adapter", str(adapter), "--output-dir", str(out), *extra])


def test_overwrite_refuses_a_folder_deltatune_did_not_write(adapter, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    (target / "adapter_config.json").write_text("{}")
    assert export(*adapter, target, "--overwrite") == 7
    err = capsys.readouterr().err
    assert "--overwrite only replaces folders deltatune wrote" in err and "notes.txt" in err
    assert (target / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder either


def test_overwrite_replaces_an_earlier_export_and_a_saved_adapter(adapter, tmp_path, capsys):
    model_dir, folder = adapter
    out = tmp_path / "exported"
    assert export(model_dir, folder, out) == 0
    assert export(model_dir, folder, out) == 7  # not empty, no --overwrite
    assert export(model_dir, folder, out, "--overwrite") == 0
    assert export(model_dir, folder, out, "--merge", "--overwrite") == 0
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    plain = tmp_path / "plain-adapter"  # what save_pretrained wrote, before exports carried a marker
    import shutil

    shutil.copytree(folder, plain)
    assert export(model_dir, folder, plain, "--overwrite") == 0


def test_output_dir_that_is_a_file(adapter, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert export(*adapter, target, "--overwrite") == 7
    assert "is a file" in capsys.readouterr().err and target.read_text() == "x"
