"""A run whose training finished but whose final outputs did not: resume writes them.

A SIGKILL after the last checkpoint's manifest but before OUT/adapter is renamed into place, and a
disk that fills up during the final adapter save, both leave a run folder whose newest checkpoint
is at max_steps. `--resume` must write the adapter and the loss curve from that checkpoint (not
exit "nothing to do"), and clean the temporary folders of the failed save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import sft_flags

from deltatune.cli.main import main


def sft(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(sft_flags(model_dir, data, out, *extra))


@pytest.fixture(scope="module")
def finished(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert sft(*tiny_assets, out) == 0
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(out: Path, reference: Path) -> None:
    mine, theirs = tensors(out / "adapter"), tensors(reference / "adapter")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_killed_after_the_last_checkpoint_resume_writes_the_outputs(tiny_assets, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # the state a SIGKILL between the final checkpoint and the adapter's rename leaves
    shutil.rmtree(out / "adapter")
    (out / "loss.png").unlink()
    lines = (out / "logs.jsonl").read_text().splitlines()
    (out / "logs.jsonl").write_text("\n".join(r for r in lines if json.loads(r)["event"] == "train") + "\n")
    (out / ".adapter.old-999").mkdir()  # a rename interrupted half-way

    assert sft(*tiny_assets, out, "--resume") == 0
    assert "step-6 is the run's last step" in capsys.readouterr().out
    assert_same_adapter(out, finished)
    assert (out / "loss.png").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter")]
    # and now it is complete: a second resume has nothing to do
    assert sft(*tiny_assets, out, "--resume") == 3


def test_disk_full_in_the_final_save_cleans_up_and_resume_retries(tiny_assets, finished, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    from safetensors import SafetensorError

    from deltatune.io import peft_format

    real = peft_format.save_file

    def full_for_the_final_adapter(tensors, path, metadata=None):
        if ".adapter.tmp-" in str(path):
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        return real(tensors, path, metadata=metadata)

    out = tmp_path / "run"
    monkeypatch.setattr(peft_format, "save_file", full_for_the_final_adapter)
    assert sft(*tiny_assets, out) == 12
    err = capsys.readouterr().err
    assert "could not write the final adapter" in err and "no space left" in err and "--resume" in err
    assert "Traceback" not in err and err.count("deltatune:") == 1
    assert not (out / "adapter").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".adapter")]

    monkeypatch.setattr(peft_format, "save_file", real)
    assert sft(*tiny_assets, out, "--resume") == 0
    assert_same_adapter(out, finished)


@pytest.mark.slow  # a subprocess: ~20 s on two shared cores
def test_real_sigkill_after_the_final_checkpoint(tiny_assets, finished, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTATUNE_FAULT": "kill@after_save:6"}
    killed = subprocess.run([sys.executable, "-m", "deltatune.cli.main", *sft_flags(*tiny_assets, out)], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-500:]
    assert (out / "checkpoints" / "step-6" / "manifest.json").is_file() and not (out / "adapter").exists()
    assert sft(*tiny_assets, out, "--resume") == 0
    assert_same_adapter(out, finished)
