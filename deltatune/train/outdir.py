"""The output directory policy: never resume or overwrite silently, one writer at a time.

A run folder holds `run.json` (written first), `logs.jsonl`, `checkpoints/`, `adapter/`,
`loss.png`. A non-empty folder needs --resume or --overwrite; --overwrite only deletes folders
that look like a deltatune run. `.lock` is held with an OS file lock (released by the kernel
when the process dies, so a SIGKILLed run never leaves a stale lock).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deltatune.train.errors import OutputDirError

LOCK_NAME = ".lock"
RUN_MARKERS = ("run.json", "logs.jsonl", "checkpoints", "adapter")


class RunLock:
    """An exclusive, non-blocking lock on OUT/.lock for the lifetime of a run."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock made, outermost last

    def acquire(self) -> RunLock:
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise OutputDirError(f"--output-dir {folder} is a file; give a folder (a new or empty one)")
        self._created = [p for p in [folder, *folder.parents] if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputDirError(
                f"cannot create --output-dir {folder}: {err.strerror or err}; pick another --output-dir"
            ) from None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): best effort, no lock
            pass
        except OSError:
            os.close(fd)
            holder = self.path.read_text(errors="replace").strip() or "another process"
            raise OutputDirError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it or pick another --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; a run that wrote nothing besides the lock leaves no trace (the lock file and any
        folders it created go)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            folder = self.path.parent
            try:
                if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                    self.path.unlink()
                    for created in self._created:
                        created.rmdir()  # only folders this run made, and only while empty
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_empty(folder: Path) -> bool:
    return not folder.exists() or not any(p.name != LOCK_NAME for p in folder.iterdir())


def prepare_output_dir(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Apply the policy (call with the lock held).

    Raises:
        OutputDirError: a file in the way, a non-empty folder without a choice, or --overwrite of a
            folder that is not a deltatune run.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--output-dir {folder} is a file; give a folder")
    if resume and (is_empty(folder) or not {p.name for p in folder.iterdir()} & set(RUN_MARKERS)):
        from deltatune.train.errors import ResumeError

        what = "is empty" if is_empty(folder) else "is not a deltatune run (no run.json)"
        raise ResumeError(f"--resume: {folder} {what}, so there is no run to resume; drop --resume to start a new run")
    if resume:
        remove_stale_outputs(folder)
    if is_empty(folder) or resume:
        return
    if not overwrite:
        raise OutputDirError(
            f"{folder} is not empty; add --resume to continue that run, --overwrite to start over, "
            "or pick another --output-dir"
        )
    names = {p.name for p in folder.iterdir()} - {LOCK_NAME}
    if not names & set(RUN_MARKERS):
        raise OutputDirError(f"{folder} does not look like a deltatune run (no run.json); refusing to delete it")
    for child in folder.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# -- the run's final outputs -----------------------------------------------------------------------
ADAPTER_DIR = "adapter"
_STALE_PREFIXES = (f".{ADAPTER_DIR}.tmp-", f".{ADAPTER_DIR}.old-")


def remove_stale_outputs(folder: Path) -> list[str]:
    """Delete temporary folders a killed or failed final save left in a run folder; their names."""
    removed = []
    if folder.is_dir():
        for child in folder.iterdir():
            if child.name.startswith(_STALE_PREFIXES) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return sorted(removed)


def missing_outputs(folder: Path, *, plot: bool) -> list[str]:
    """What a finished run should hold but this folder lacks (the adapter's files, loss.png)."""
    adapter = folder / ADAPTER_DIR
    missing = [f"{ADAPTER_DIR}/{name}" for name in ("adapter_config.json", "adapter_model.safetensors")
               if not (adapter / name).is_file()]  # fmt: skip
    if plot and not (folder / "loss.png").is_file():
        missing.append("loss.png")
    return missing


def save_final_adapter(tuned, final: Path) -> None:
    """The final PEFT-format adapter, written beside `final`, fsynced and renamed into place.

    Raises:
        SaveError: the write failed (disk full, ...); the temporary folder is removed and an adapter
            already at `final` is left as it was.
    """
    from safetensors import SafetensorError

    from deltatune.train import checkpoint as ckpt
    from deltatune.train.errors import SaveError, write_failure

    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tuned.save_pretrained(tmp, selected_adapters=[tuned.active_adapters[0]])
        for path in tmp.iterdir():
            ckpt.fsync_file(path)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        ckpt.fsync_dir(final.parent)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        why, code = write_failure(err)
        raise SaveError(
            f"could not write the final adapter {final}: {why}; free disk space and run again with --resume "
            f"--output-dir {final.parent} (it writes the adapter from the last checkpoint)",
            code,
        ) from err


# -- folders other commands write (export) ---------------------------------------------------------
EXPORT_MARKER = ".deltatune-export.json"
"""Written into every folder `deltatune export` produces, so --overwrite can tell it from anything else."""
_ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "deltatune_config.json"})


def written_by_deltatune(folder: Path) -> bool:
    """True for a folder an export wrote (its marker), or a bare adapter folder deltatune saved."""
    names = {p.name for p in folder.iterdir()} - {LOCK_NAME}
    if EXPORT_MARKER in names:
        return True
    return "deltatune_config.json" in names and names <= _ADAPTER_FILES


def check_replaceable(folder: Path, *, overwrite: bool, flag: str = "--output-dir") -> None:
    """Refuse to write into `folder` unless it is empty, or --overwrite is given and deltatune wrote it.

    Raises:
        OutputDirError: `folder` is a file; it is not empty and overwrite is off; or overwrite is on
            but deltatune did not write it (the message lists what is there).
    """
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{flag} {folder} is a file; give a folder")
    if is_empty(folder):
        return
    if not overwrite:
        raise OutputDirError(f"{folder} is not empty; add --overwrite to replace it, or pick another {flag}")
    if not written_by_deltatune(folder):
        names = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(names[:10]) + (f", ... {len(names) - 10} more" if len(names) > 10 else "")
        raise OutputDirError(
            f"--overwrite only replaces folders deltatune wrote, and {folder} holds other files ({shown}); "
            f"empty or remove it yourself, or pick another {flag}"
        )


def mark_written(folder: Path, what: str) -> None:
    """Mark a folder (before it is renamed into place) as deltatune's, for a later --overwrite."""
    import json

    from deltatune import __version__

    (folder / EXPORT_MARKER).write_text(json.dumps({"written_by": "deltatune", "what": what, "version": __version__}))


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a finished `tmp` folder to `final`, replacing what was there only once `tmp` is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
