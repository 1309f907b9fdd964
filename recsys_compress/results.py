"""The results record of a run (``results.json``), written atomically, and what goes into it."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from recsys_compress.io import atomic_write

RESULTS_FILE = "results.json"


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomically write ``record`` as indented JSON."""
    text = json.dumps(record, indent=2, sort_keys=False, default=str) + "\n"
    with atomic_write(path) as handle:
        handle.write(text.encode())


def save_state_dict(module: nn.Module, path: Path) -> None:
    """Atomically save ``module.state_dict()`` (loadable with ``weights_only=True``)."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    with atomic_write(path) as handle:
        torch.save(state, handle)


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
