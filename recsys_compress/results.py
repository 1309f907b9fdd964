"""The results record of a run (``results.json``), written atomically, and what goes into it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from torch import nn

RESULTS_FILE = "results.json"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file (or none) in place, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically write ``record`` as indented JSON."""
    text = json.dumps(record, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def save_state_dict(module: nn.Module, path: Path) -> None:
    """Atomically save ``module.state_dict()`` (loadable with ``weights_only=True``)."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    atomic_write(path, lambda handle: torch.save(state, handle))


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
