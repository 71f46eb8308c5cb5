"""`deltatune webui` driven in a real headless Chromium (Playwright): bad input shows the CLI's error in
the page, then a tiny local model + data file is trained from the form, watched (step count, loss
chart), stopped (SIGTERM), listed as resumable, resumed to the end and chatted with (base and adapter
side by side); the Evaluate and Export tabs show their commands and export runs. Screenshots of
each tab go to DELTATUNE_WEBUI_SHOTS (default: the test's tmp folder); docs/images/ holds copies.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_helpers import make_assets  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    if os.environ.get("DELTATUNE_REQUIRE_BROWSER") == "1":
        import gradio  # noqa: F401
        from playwright import sync_api
    else:
        pytest.importorskip("gradio", reason="Gradio is not installed (pip install -e '.[test]')")
        sync_api = pytest.importorskip(
            "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')"
        )
    if not os.path.exists(CHROMIUM):
        reason = f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)"
        if os.environ.get("DELTATUNE_REQUIRE_BROWSER") == "1":  # CI: the browser test must run
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # commit: Gradio sends change events on blur


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _wait_text(page, elem_id: str, pattern: str, timeout_s: float = 120) -> str:
    """Wait until the box's value matches `pattern`; return the value."""
    regex = re.compile(pattern, re.S)
    page.wait_for_function(
        "([sel, pat]) => { const e = document.querySelector(sel); return e && new RegExp(pat, 's').test(e.value); }",
        arg=[f"#{elem_id} textarea, #{elem_id} input", pattern], timeout=timeout_s * 1000,
    )  # fmt: skip
    value = _text(page, elem_id)
    assert regex.search(value), value
    return value


def _shot(page, shots: Path, name: str) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"webui-{name}.png"), full_page=True)


def test_train_stop_resume_chat_export_in_browser(browser, tmp_path):
    from deltatune.webui.app import launch

    model_dir, data = make_assets(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\nnot json\n', encoding="utf-8")
    runs_dir, run = tmp_path / "runs", tmp_path / "runs" / "run1"
    shots = Path(os.environ.get("DELTATUNE_WEBUI_SHOTS", tmp_path / "shots"))
    port = _free_port()
    app = launch("127.0.0.1", port, runs_dir=str(runs_dir), block=False)
    state = app.deltatune_state
    page = None
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")

        # -- the form, and bad input: the CLI's own error lines, in the page --------------------------
        for elem_id, value in [("train-model", model_dir), ("train-dataset", bad), ("train-extra", "target_modules=[nope_proj]"),
                               ("train-max-steps", 300), ("train-batch-size", 4), ("train-lr", 0.01),
                               ("train-max-length", 32), ("train-val-size", 16), ("train-save-steps", 5),
                               ("train-num-samples", 0), ("train-output-dir", run)]:  # fmt: skip
            _fill(page, elem_id, value)
        assert "Rank of the update" in page.locator("#train-fields").inner_text()  # help from the docstrings
        page.click("#train-check")
        _wait_text(page, "train-inspect", r"deltatune: .*nope_proj")
        _wait_text(page, "train-data", r"deltatune: .*bad\.jsonl")
        assert "deltatune:" in _text(page, "train-data")

        _fill(page, "train-dataset", data)
        _fill(page, "train-extra", "target_modules=[q_proj,v_proj]")
        page.click("#train-check")
        _wait_text(page, "train-inspect", r"matched:\s+4 modules")
        _wait_text(page, "train-data", r"96 of 96 rows kept")
        command = _wait_text(page, "train-command", r"target_modules=\[q_proj,v_proj\]")
        assert command.startswith("deltatune sft --max-steps 300 --task causal-lm --model ")
        assert f"--output-dir {run}" in command

        # -- launch: the step count advances and the loss chart draws ---------------------------------
        page.click("#train-launch")
        first = _wait_text(page, "train-status", r"step ([3-9]|\d\d+) / 300.* - running")
        _wait_text(page, "train-status", r"step (\d+) / 300")
        page.locator("#train-plot canvas, #train-plot svg").first.wait_for(timeout=30_000)
        assert page.locator("#train-plot").inner_text() != "" or page.locator("#train-plot canvas").count()
        _shot(page, shots, "train")
        page.click("#train-stop")
        stopped = _wait_text(page, "train-status", r"stopped \(checkpoint saved; resumable\)")
        steps_at_stop = int(re.search(r"step (\d+)", stopped).group(1))
        assert steps_at_stop >= int(re.search(r"step (\d+)", first).group(1)) and steps_at_stop < 300
        assert state.job.process.returncode == 10

        # -- runs list reads the manifests: interrupted and resumable ---------------------------------
        page.get_by_role("tab", name="Runs").click()
        page.click("#runs-refresh")
        page.wait_for_function("() => document.querySelector('#runs-table').innerText.includes('interrupted')")
        _shot(page, shots, "runs")

        # -- resume to the end ------------------------------------------------------------------------
        page.get_by_role("tab", name="Train").click()
        page.click("#train-resume")
        _wait_text(page, "train-command", r"--resume")
        _wait_text(page, "train-status", r"step 300 / 300.* - finished", timeout_s=240)
        assert "resumed from" in state.job.read()
        assert (run / "adapter" / "adapter_config.json").exists()

        # -- chat: base and adapter on the same prompt ------------------------------------------------
        page.get_by_role("tab", name="Chat").click()
        _fill(page, "chat-model", model_dir)
        _fill(page, "chat-adapters", run / "adapter")
        _fill(page, "chat-tokens", 6)
        _fill(page, "chat-prompt", "add one and two")
        page.click("#chat-send")
        base_answer = _wait_text(page, "chat-answer-0", r"\S")
        tuned_answer = _wait_text(page, "chat-answer-1", r"\S")
        assert tuned_answer != base_answer  # the adapter's row runs the adapter
        _shot(page, shots, "chat")

        # -- evaluate: the command; export: the command, run ------------------------------------------
        page.get_by_role("tab", name="Evaluate").click()
        _fill(page, "eval-model", model_dir)
        _fill(page, "eval-adapter", run / "adapter")
        _fill(page, "eval-dataset", data)
        _fill(page, "eval-max-length", 32)
        _fill(page, "eval-generate", 2)
        _wait_text(
            page,
            "eval-command",
            r"^deltatune eval --model .* --adapter .*adapter --dataset .*data\.jsonl .*--generate 2$",
        )
        page.click("#eval-run")
        _wait_text(page, "eval-output", r"perplexity.*\(exit status 0\)", timeout_s=120)
        _shot(page, shots, "eval")
        page.get_by_role("tab", name="Export").click()
        _fill(page, "export-model", model_dir)
        _fill(page, "export-adapter", run / "adapter")
        _fill(page, "export-output-dir", tmp_path / "merged")
        _wait_text(page, "export-command", r"--output-dir \S*merged --merge$")
        page.click("#export-run")
        _wait_text(page, "export-output", r"\(exit status 0\)", timeout_s=120)
        assert (tmp_path / "merged" / "config.json").exists()
        _shot(page, shots, "export")
    except BaseException:
        if page is not None:
            _shot(page, shots, "failure")
        raise
    finally:
        if state.job is not None and state.job.running:
            state.job.process.kill()
        app.close()
    if os.environ.get("DELTATUNE_WEBUI_SHOTS_TO_DOCS") == "1":
        images = Path(__file__).parents[2] / "docs" / "images"
        images.mkdir(exist_ok=True)
        for png in [p for p in shots.glob("webui-*.png") if p.name != "webui-failure.png"]:
            from PIL import Image  # 256 colours: a third of the size, the same look for a UI

            Image.open(png).convert("RGB").quantize(256).save(images / png.name, optimize=True)
