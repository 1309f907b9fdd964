"""The results record of a run (``results.json``), written atomically, and what goes into it."""

from __future__ import annotations

import errno
import io
import json
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from recsys_compress.errors import OutputWriteError, RunDirInUseError
from recsys_compress.io import atomic_write

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` (temp file, fsync, rename).

    A failed write (a full disk, no permission) raises :class:`OutputWriteError` naming the file;
    the previous version of the file, if any, is left intact and no temp file remains.
    """
    existed = path.is_file()
    try:
        with atomic_write(path) as handle:
            handle.write(data)
    except OSError as err:
        reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror or err
        kept = f"the previous {path.name} is intact" if existed else "nothing was written"
        raise OutputWriteError(
            f"{reason} while writing {path}; {kept}. Free space on that disk (or fix its "
            "permissions) and run again."
        ) from err


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically write ``record`` as indented JSON (:func:`write_bytes`)."""
    text = json.dumps(record, indent=2, sort_keys=False, default=str) + "\n"
    write_bytes(path, text.encode())


def save_state_dict(module: nn.Module, path: Path) -> None:
    """Atomically save ``module.state_dict()`` (loadable with ``weights_only=True``)."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``results.json`` of ``run_dir``; None if there is none or it cannot be read."""
    path = run_dir / RESULTS_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("Ignoring unreadable %s (%s).", path, err)
        return None
    return record if isinstance(record, dict) else None


def write_failure(run_dir: Path, record: dict[str, Any]) -> None:
    """Record a failed run in ``results.json``, unless that file holds a completed run (a rerun
    that fails keeps the earlier results) or cannot be written (the error is logged): the
    caller is already reporting a failure."""
    previous = read_record(run_dir)
    if previous is not None and previous.get("status") == "completed":
        log.warning("Kept the completed %s of the earlier run.", run_dir / RESULTS_FILE)
        return
    try:
        write_json(run_dir / RESULTS_FILE, record)
    except OutputWriteError as err:
        log.error("%s", err)


# Settings that change neither a run's results nor what it writes: the progress display, the
# spacing of rolling checkpoints by time, and how L1's dense step is computed (compiled or eager:
# the same values to the last place). A resumed run may change them, a completed run with other
# values is still the same run for ``skip_completed``, and the same configuration in reports.
NEUTRAL_SETTINGS = (
    "trainer.progress_bar",
    "trainer.progress_refresh_rate",
    "trainer.checkpoint_max_overhead",
    "compression.l1.kernel",
)


def _first_difference(
    old: Any, new: Any, prefix: str = "", ignore: tuple[str, ...] = ()
) -> str | None:
    """The first dotted key where ``new`` differs from ``old`` (keys ``old`` lacks are skipped:
    they did not exist when it ran; so are the dotted keys in ``ignore``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key, value in new.items():
            if key in old and f"{prefix}{key}" not in ignore:
                found = _first_difference(old[key], value, f"{prefix}{key}.", ignore)
                if found is not None:
                    return found
        return None
    return None if old == new else prefix.rstrip(".")


def completed_run(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """``skip_completed``: the record in ``run_dir`` if it is a completed run of ``config``
    (``skip_completed`` and :data:`NEUTRAL_SETTINGS` aside), else None (no results, or a failed
    run: train again).

    A completed run of another config raises :class:`RunDirInUseError` (nothing is written):
    the job's output dir (``hydra.sweep.subdir``, the job number) belongs to another job when the
    sweep's parameters changed.
    """
    record = read_record(run_dir)
    if record is None or record.get("status") != "completed":
        return None
    current = json.loads(json.dumps(config, default=str))
    current.pop("skip_completed", None)
    current.pop("overwrite", None)
    key = _first_difference(record.get("config", {}), current, ignore=NEUTRAL_SETTINGS)
    if key is not None:
        raise RunDirInUseError(
            f"skip_completed=true, but {run_dir / RESULTS_FILE} is a completed run of another "
            f"config ({key} differs): rerun the same sweep command on that hydra.sweep.dir, or "
            "use a new hydra.sweep.dir for new parameters."
        )
    return record


def refuse_overwrite(run_dir: Path) -> None:
    """Raise :class:`RunDirInUseError` if ``run_dir`` holds a completed run: a run dir is never
    overwritten unless the user says so (``overwrite=true``)."""
    record = read_record(run_dir)
    if record is not None and record.get("status") == "completed":
        raise RunDirInUseError(
            f"{run_dir} already holds a completed run ({RESULTS_FILE}), which this run would "
            "overwrite: use a new hydra.run.dir, skip_completed=true to keep that run, or "
            "overwrite=true to train again and replace it."
        )


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameter count and the bytes of the dense float state (parameters and buffers)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "dense_bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that determine a run's numbers."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    found["lightning"] = L.__version__
    for name in ("recsys-compress", "torchmetrics", "hydra-core", "numpy", "pandas"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit(repo: Path | None = None) -> str | None:
    """The commit of the code that ran (``+dirty`` if it had changes), when in a git checkout."""
    cwd = repo or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
