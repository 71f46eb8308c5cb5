"""The `deltatune webui` page (Gradio): Train, Runs, Chat, Evaluate and Export tabs.

Each action shows the exact `deltatune ...` command first, then runs it as a subprocess
(deltatune.webui.runs); training progress and the loss curve are read from the run's logs.jsonl,
run status from its lock and checkpoint manifests.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path
from typing import Any

from deltatune.webui import runs

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_EXPORT_KINDS = ["adapter", "merge", "gguf", "gguf-lora"]


def check_bind(host: str, password: str | None) -> None:
    """Refuse to listen beyond this machine without a password."""
    from deltatune.core.config import ConfigError

    try:
        local = host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local and not password:
        raise ConfigError(
            f"--host {host} makes the web UI reachable from other machines, and it runs commands on this one; "
            "give --password (or set DELTATUNE_WEBUI_PASSWORD)"
        )


class _State:
    """The page's one training job (a local, single-user tool) and its output folder."""

    def __init__(self) -> None:
        self.job: runs.Job | None = None
        self.run_dir: Path | None = None
        self.chat = None


def _num(value: Any, kind: type = int) -> Any:
    if value is None or value == "":
        return None
    return kind(value)


def build_app(runs_dir: str | Path = "runs"):
    """The Gradio Blocks app; `runs_dir` holds new runs and is listed in the Runs tab."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import pandas as pd

    from deltatune.core.registry import all_specs
    from deltatune.data import list_datasets
    from deltatune.models.registry import list_models
    from deltatune.tasks.registry import task_names
    from deltatune.webui.chat import ChatModel

    runs_root = Path(runs_dir).resolve()
    state = _State()
    state.chat = ChatModel()
    tuners = sorted(s.name for s in all_specs())
    models = [m.name for m in list_models()]
    datasets = [d.name for d in list_datasets(offline_only=False)]
    headers = ["field", "value", "help"]

    def train_args(model, dataset, task, tuner, rows, extra, max_steps, batch_size, lr, max_length, val_size,
                   save_steps, num_samples, output_dir, overwrite) -> dict[str, Any]:  # fmt: skip
        rows = rows.values.tolist() if hasattr(rows, "values") else rows
        return {
            "model": model.strip(), "dataset": dataset.strip(), "task": task, "tuner": tuner,
            "tuner_args": runs.tuner_args(rows, tuner, extra), "max_steps": _num(max_steps),
            "batch_size": _num(batch_size), "lr": _num(lr, float), "max_length": _num(max_length),
            "val_size": _num(val_size, float), "save_steps": _num(save_steps), "num_samples": _num(num_samples),
            "output_dir": output_dir.strip(), "overwrite": bool(overwrite),
        }  # fmt: skip

    def command(*form) -> str:
        try:
            return runs.shown(runs.sft_argv(train_args(*form)))
        except Exception as err:  # noqa: BLE001 - a half-filled form
            return f"(incomplete form: {err})"

    def check(*form):
        args = train_args(*form)
        rc, out = runs.run(runs.inspect_argv(args["model"], args["tuner"], args["tuner_args"]), timeout=300)
        return out, runs.check_data(args["dataset"])

    def launch(*form):
        if state.job is not None and state.job.running:
            return "a run is already going; stop it first", command(*form)
        args = train_args(*form)
        argv = runs.sft_argv(args)
        state.job = runs.start(argv)
        state.run_dir = Path(args["output_dir"])
        return f"started: {runs.shown(argv)}", runs.shown(argv)

    def stop():
        if state.job is None or not state.job.running:
            return "nothing is running"
        state.job.stop()
        return "SIGTERM sent: the run writes a checkpoint, then exits"

    def resume(run_dir: str):
        if state.job is not None and state.job.running:
            return "a run is already going; stop it first", ""
        path = Path(run_dir.strip()) if run_dir and run_dir.strip() else state.run_dir
        if path is None or not (path / "run.json").exists():
            return f"{path} is not a run folder (no run.json)", ""
        argv = runs.resume_argv(path)
        state.job, state.run_dir = runs.start(argv), path
        return f"started: {runs.shown(argv)}", runs.shown(argv)

    def progress():
        if state.run_dir is None:
            return "no run yet", "", None
        records = runs.read_logs(state.run_dir)
        train = [r for r in records if r.get("event") == "train"]
        job = state.job
        total = next((a for a in [_saved_max_steps(state.run_dir)] if a), "?")
        if job is not None and job.running:
            phase = "running"
        elif job is not None:
            code = job.process.returncode
            phase = {0: "finished", 10: "stopped (checkpoint saved; resumable)"}.get(code, f"failed (exit {code})")
        else:
            phase = runs.run_status(state.run_dir)["status"]
        loss = f", loss {train[-1]['loss']:.4f}" if train else ""
        status = f"step {train[-1]['step'] if train else 0} / {total}{loss} - {phase}"
        frame = pd.DataFrame({"step": [r["step"] for r in train], "loss": [r["loss"] for r in train]})
        return status, job.read() if job else "", frame if train else None

    def runs_table():
        table = runs.list_runs(runs_root)
        return pd.DataFrame(table, columns=["run", "status", "step", "max_steps", "last_loss"])

    def set_fields(tuner):
        return pd.DataFrame(runs.tuner_fields(tuner), columns=headers)

    def uploaded(file):
        return file if isinstance(file, str) else getattr(file, "name", "")

    def chat(model, adapters, prompt, max_new_tokens):
        folders = [a.strip() for a in adapters.splitlines() if a.strip()][:3]
        blanks = ["" for _ in range(4)]
        try:
            for answers in state.chat.stream(model.strip(), folders, prompt, int(max_new_tokens)):
                yield (answers + blanks)[:4]
        except Exception as err:  # noqa: BLE001 - shown in the page as the CLI shows it
            from deltatune.cli.errors import describe

            yield [f"deltatune: {describe(err)}", "", "", ""]

    def run_streaming(argv: list[str]):
        job = runs.start(argv)
        while job.running:
            time.sleep(0.5)
            yield job.read()
        time.sleep(0.2)  # the reader thread's last lines
        yield job.read() + f"\n(exit status {job.process.returncode})"

    with gr.Blocks(title="deltatune") as app:
        gr.Markdown("# deltatune\nEvery action below is a `deltatune` command, shown before it runs.")
        with gr.Tab("Train", elem_id="tab-train"):
            with gr.Row():
                model = gr.Textbox("smollm2-135m-instruct", label="model", info="registry name or local folder",
                                   elem_id="train-model")  # fmt: skip
                dataset = gr.Textbox("chatterbot-en", label="dataset", info="catalogue name or a file path",
                                     elem_id="train-dataset")  # fmt: skip
                upload = gr.File(label="or upload a data file (.jsonl/.json/.csv/.parquet)", type="filepath",
                                 elem_id="train-upload")  # fmt: skip
                task = gr.Dropdown([t for t in task_names()], value="causal-lm", label="task", elem_id="train-task")
            with gr.Row():
                pick_model = gr.Dropdown(models, value=None, label="pick a registry model (`deltatune models`)",
                                         elem_id="train-pick-model")  # fmt: skip
                pick_data = gr.Dropdown(datasets, value=None, label="pick a catalogue data set (`deltatune datasets`)",
                                        elem_id="train-pick-data")  # fmt: skip
            with gr.Row():
                tuner = gr.Dropdown(tuners, value="lora", label="tuner", elem_id="train-tuner")
                extra = gr.Textbox("", label="more tuner args (KEY=VALUE,...)", elem_id="train-extra",
                                   info="added after the table's changed fields, e.g. target_modules=[q_proj,v_proj]")  # fmt: skip
            fields_table = gr.Dataframe(set_fields("lora"), headers=headers, interactive=True, wrap=True,
                                        label="tuner fields (edit a value; help from the config class)",
                                        elem_id="train-fields")  # fmt: skip
            with gr.Row():
                max_steps = gr.Number(200, label="max steps", precision=0, elem_id="train-max-steps")
                batch_size = gr.Number(8, label="batch size", precision=0, elem_id="train-batch-size")
                lr = gr.Number(2e-4, label="learning rate", elem_id="train-lr")
                max_length = gr.Number(512, label="max length", precision=0, elem_id="train-max-length")
                val_size = gr.Number(None, label="held-out rows (or fraction)", elem_id="train-val-size")
                save_steps = gr.Number(50, label="save every N steps", precision=0, elem_id="train-save-steps")
                num_samples = gr.Number(2, label="sample answers", precision=0, elem_id="train-num-samples")
            with gr.Row():
                output_dir = gr.Textbox(str(runs_root / time.strftime("run-%Y%m%d-%H%M%S")), label="output folder",
                                        elem_id="train-output-dir")  # fmt: skip
                overwrite = gr.Checkbox(False, label="--overwrite")
            form = [model, dataset, task, tuner, fields_table, extra, max_steps, batch_size, lr, max_length, val_size,
                    save_steps, num_samples, output_dir, overwrite]  # fmt: skip
            cmd = gr.Textbox(command(*[c.value for c in form]), label="the command it runs", buttons=["copy"],
                             interactive=False, elem_id="train-command")  # fmt: skip
            with gr.Row():
                check_btn = gr.Button("Check (inspect + data report)", elem_id="train-check")
                launch_btn = gr.Button("Launch", variant="primary", elem_id="train-launch")
                stop_btn = gr.Button("Stop (SIGTERM)", variant="stop", elem_id="train-stop")
                resume_btn = gr.Button("Resume", elem_id="train-resume")
            with gr.Row():
                inspect_out = gr.Textbox(label="inspect: targets, trainable values, memory", lines=8,
                                         elem_id="train-inspect")  # fmt: skip
                data_out = gr.Textbox(label="data validation report", lines=8, elem_id="train-data")
            message = gr.Textbox(label="message", elem_id="train-message")
            status = gr.Textbox(label="progress", elem_id="train-status")
            with gr.Row():
                plot = gr.LinePlot(None, x="step", y="loss", label="training loss", elem_id="train-plot")
                console = gr.Textbox(label="console", lines=12, max_lines=12, autoscroll=True, elem_id="train-console")
            timer = gr.Timer(1.0)

        with gr.Tab("Runs", elem_id="tab-runs"):
            runs_df = gr.Dataframe(runs_table(), label=f"runs in {runs_root}", elem_id="runs-table")
            with gr.Row():
                refresh_btn = gr.Button("Refresh", elem_id="runs-refresh")
                resume_dir = gr.Textbox("", label="run folder to resume", elem_id="runs-resume-dir")
                resume_run_btn = gr.Button("Resume this run", elem_id="runs-resume")
            runs_msg = gr.Textbox(label="message", elem_id="runs-message")

        with gr.Tab("Chat", elem_id="tab-chat"):
            with gr.Row():
                chat_model = gr.Textbox("smollm2-135m-instruct", label="base model", elem_id="chat-model")
                chat_adapters = gr.Textbox("", lines=3, label="adapter folders (one a line, up to 3)",
                                           elem_id="chat-adapters")  # fmt: skip
                chat_tokens = gr.Number(48, label="max new tokens", precision=0, elem_id="chat-tokens")
            prompt = gr.Textbox("", label="prompt", elem_id="chat-prompt")
            send_btn = gr.Button("Send to all", variant="primary", elem_id="chat-send")
            with gr.Row():
                answers = [gr.Textbox(label=name, lines=6, elem_id=f"chat-answer-{i}")
                           for i, name in enumerate(["base", "adapter 1", "adapter 2", "adapter 3"])]  # fmt: skip

        with gr.Tab("Evaluate", elem_id="tab-eval"):
            with gr.Row():
                ev_model = gr.Textbox("smollm2-135m-instruct", label="model", elem_id="eval-model")
                ev_adapter = gr.Textbox("", label="adapter folder (empty: the base)", elem_id="eval-adapter")
                ev_dataset = gr.Textbox("chatterbot-en#64", label="dataset", elem_id="eval-dataset")
                ev_len = gr.Number(96, label="max length", precision=0, elem_id="eval-max-length")
                ev_gen = gr.Number(8, label="rows answered for ROUGE-L", precision=0, elem_id="eval-generate")
            ev_form = [ev_model, ev_adapter, ev_dataset, ev_len, ev_gen]
            ev_cmd = gr.Textbox(runs.shown(runs.eval_argv(*[c.value for c in ev_form])), label="the command it runs",
                                buttons=["copy"], interactive=False, elem_id="eval-command")  # fmt: skip
            ev_btn = gr.Button("Run evaluation", variant="primary", elem_id="eval-run")
            ev_out = gr.Textbox(label="output", lines=12, elem_id="eval-output")

        with gr.Tab("Export", elem_id="tab-export"):
            with gr.Row():
                ex_model = gr.Textbox("smollm2-135m-instruct", label="model", elem_id="export-model")
                ex_adapter = gr.Textbox("", label="adapter folder", elem_id="export-adapter")
                ex_out = gr.Textbox(str(runs_root / "export"), label="output folder", elem_id="export-output-dir")
                ex_kind = gr.Radio(_EXPORT_KINDS, value="merge", label="what", elem_id="export-kind",
                                   info="adapter: a cleaned PEFT folder; merge: a plain transformers model; gguf: "
                                   "merged llama.cpp file; gguf-lora: llama.cpp LoRA file")  # fmt: skip
                ex_overwrite = gr.Checkbox(False, label="--overwrite")
            with gr.Row():
                ex_gguf_type = gr.Dropdown(["", "f32", "f16", "bf16", "q8_0"], value="", label="--gguf-type",
                                           info="GGUF kinds only; empty: f16 for gguf, f32 for gguf-lora",
                                           elem_id="export-gguf-type")  # fmt: skip
                ex_ollama = gr.Checkbox(False, label="--ollama (Modelfile beside the GGUF)", elem_id="export-ollama")
                ex_push = gr.Textbox("", label="--push-to-hub REPO (empty: no upload)", elem_id="export-push")
                ex_hub = gr.Radio(
                    ["huggingface", "modelscope"], value="huggingface", label="--hub", elem_id="export-hub"
                )
                ex_private = gr.Checkbox(False, label="--private", elem_id="export-private")
                ex_dry = gr.Checkbox(True, label="--dry-run (list what would be uploaded)", elem_id="export-dry-run")
            ex_form = [ex_model, ex_adapter, ex_out, ex_kind, ex_overwrite, ex_gguf_type, ex_ollama, ex_push, ex_hub,
                       ex_private, ex_dry]  # fmt: skip
            ex_cmd = gr.Textbox(runs.shown(runs.export_argv(*[c.value for c in ex_form])), label="the command it runs",
                                buttons=["copy"], interactive=False, elem_id="export-command")  # fmt: skip
            ex_btn = gr.Button("Export", variant="primary", elem_id="export-run")
            ex_log = gr.Textbox(label="output", lines=12, elem_id="export-output")

        # -- wiring ----------------------------------------------------------------------------------
        tuner.change(set_fields, tuner, fields_table)
        upload.upload(uploaded, upload, dataset)
        pick_model.input(lambda name: name, pick_model, model)
        pick_data.input(lambda name: name, pick_data, dataset)
        for component in form:
            component.change(command, form, cmd)
        check_btn.click(check, form, [inspect_out, data_out])
        launch_btn.click(launch, form, [message, cmd])
        stop_btn.click(stop, None, message)
        resume_btn.click(lambda d: resume(d), output_dir, [message, cmd])
        timer.tick(progress, None, [status, console, plot])
        refresh_btn.click(runs_table, None, runs_df)
        resume_run_btn.click(lambda d: resume(d)[0], resume_dir, runs_msg)
        send_btn.click(chat, [chat_model, chat_adapters, prompt, chat_tokens], answers)
        for component in ev_form:
            component.change(lambda *f: runs.shown(runs.eval_argv(*f)), ev_form, ev_cmd)
        ev_btn.click(lambda *f: (yield from run_streaming(runs.eval_argv(*f))), ev_form, ev_out)
        for component in ex_form:
            component.change(lambda *f: runs.shown(runs.export_argv(*f)), ex_form, ex_cmd)
        ex_btn.click(lambda *f: (yield from run_streaming(runs.export_argv(*f))), ex_form, ex_log)
    app.deltatune_state = state  # tests reach the job (to wait for it, or stop it on failure)
    return app


def _saved_max_steps(run_dir: Path) -> Any:
    import json

    try:
        return json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))["args"].get("max_steps")
    except (OSError, ValueError, KeyError):
        return None


def launch(host: str = "127.0.0.1", port: int = 7860, password: str | None = None, runs_dir: str = "runs",
           block: bool = True):  # fmt: skip
    """Serve the page; with block=False return the app (tests close it with app.close())."""
    check_bind(host, password)
    app = build_app(runs_dir)
    auth = (lambda _user, given: given == password) if password else None
    app.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block, share=False,
               ssr_mode=False, quiet=not block, footer_links=[])  # fmt: skip
    return app
