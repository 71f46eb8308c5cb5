"""CI runs the README's test command in a fresh environment; pyproject's ranges and constraints.txt agree."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tomllib
from importlib.machinery import SourceFileLoader
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Two commands", 1)[1].split("```")[1]
    return [line for line in block.splitlines() if line.strip() and not line.startswith(("#", "bash"))]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    printed = subprocess.run([str(ROOT / ".ci" / "run"), "--print-command"], capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == readme_commands()[1]
    assert printed.stdout.strip().endswith("&& python -m pytest -q")
    script = (ROOT / ".ci" / "run").read_text()
    assert '-m venv "$work/venv"' in script and "system-site-packages" not in script
    assert 'rm -rf "$work"' in script  # a new environment every run, removed afterwards


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_runtime_dependencies_have_tested_lower_bounds_met_by_the_constraints():
    pins = _pins()
    for req in _runtime_requirements():
        assert any(s.operator == ">=" for s in req.specifier), f"{req}: no lower bound"
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} missing from constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} vs {req}"
    assert "constraints.txt" in ROOT.joinpath("README.md").read_text(encoding="utf-8")


def test_freeze_constraints_drops_local_labels_and_our_own_package(tmp_path):
    loader = SourceFileLoader("freeze_constraints", str(ROOT / ".ci" / "freeze-constraints"))
    spec = importlib.util.spec_from_loader("freeze_constraints", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    freeze = "torch==2.13.0+cpu\n-e git+https://x@y#egg=deltatune\ndeltatune==0.1.0\nNumPy==2.4.6\n@ file:///z\n"
    assert module.constraints_from_freeze(freeze) == ["NumPy==2.4.6", "torch==2.13.0"]
    source, output = tmp_path / "freeze.txt", tmp_path / "constraints.txt"
    source.write_text("# python 3.11.7, passed .ci/run at T\n" + freeze)
    assert module.main(["--from", str(source), "--output", str(output)]) == 0
    assert output.read_text().splitlines()[-2:] == ["NumPy==2.4.6", "torch==2.13.0"]
