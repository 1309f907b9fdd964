"""Crash safety and resuming: atomic checkpoints, the run's own config, finished-stage records.

A run directory holds everything ``resume=<run dir>`` needs:

- ``run_config.json``: the validated config the run started with (the resumed run uses it, so
  the two halves of a run cannot differ in a setting);
- ``<stage>/checkpoints/last.ckpt``: the rolling checkpoint (model, optimizer, LR scheduler,
  loop position within the epoch, callbacks' state: compression, early stopping, best checkpoint,
  random generators), written at every epoch end and every ``trainer.checkpoint_every_n_steps``
  optimizer steps (spaced by ``trainer.checkpoint_max_overhead``), each time atomically
  (:class:`AtomicCheckpointIO`);
- ``dense/stage.json`` and ``dense/model.pt``: the record and the weights of a finished dense
  stage, so a resumed run goes straight to the compression stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from recsys_compress.config import TrainConfig, config_to_dict, to_train_config
from recsys_compress.errors import ConfigError
from recsys_compress.io import atomic_write
from recsys_compress.results import NEUTRAL_SETTINGS, save_state_dict, write_json

RUN_CONFIG_FILE = "run_config.json"
STAGE_RECORD_FILE = "stage.json"
STAGE_MODEL_FILE = "model.pt"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Settings a resumed run may change: they do not alter what is computed (e.g. a machine without
# a C++ compiler resumes a run with compression.l1.kernel=eager). (Not
# trainer.checkpoint_every_n_steps: it can set how many batches one Lightning training step
# takes, the unit in which Lightning's loop records its position in a checkpoint.)
RESUME_MAY_CHANGE = (*NEUTRAL_SETTINGS, "logger")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes every Lightning checkpoint to a temporary file, fsyncs it and renames it over the
    target: a kill during a save leaves the previous checkpoint intact."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_write(Path(path)) as handle:
            torch.save(checkpoint, handle)


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The rolling checkpoint of a stage directory, if one was written."""
    path = stage_dir / LAST_CHECKPOINT
    return path if path.is_file() else None


def save_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Record the config a run starts with (what ``resume=<run dir>`` continues with)."""
    write_json(run_dir / RUN_CONFIG_FILE, config_to_dict(cfg))


def load_run_config(run_dir: Path) -> TrainConfig:
    """The config ``run_dir`` was started with; ConfigError if it is not a run directory."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir}: no {RUN_CONFIG_FILE} there, so it is not the directory of a run "
            "started by recsys_compress.train (or that run was killed before training began: "
            "start it again); give the run dir a run printed ('Run dir: ...')."
        )
    return to_train_config(json.loads(path.read_text()))


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resumed_config(given: TrainConfig, overridden: list[str], run_dir: Path) -> TrainConfig:
    """The stored config of ``run_dir``, after checking that the command-line ``overridden`` keys
    (e.g. ``model.dim``, ``compression``) agree with it: a resumed run cannot change what it
    computes. Display and checkpoint-spacing settings (:data:`RESUME_MAY_CHANGE`) are taken from
    ``given``."""
    stored = load_run_config(run_dir)
    # compared without the settings that may change, also inside an overridden group
    # (compression=l1 compression.l1.kernel=eager repeats the run's compression=l1)
    given_dict, stored_dict = (
        _without(config_to_dict(c), RESUME_MAY_CHANGE) for c in (given, stored)
    )
    conflicts = []
    for key in overridden:
        if key == "resume":
            continue
        if _lookup(given_dict, key) != _lookup(stored_dict, key):
            conflicts.append(f"{key} (run: {_lookup(stored_dict, key)!r})")
    if conflicts:
        raise ConfigError(
            f"resume={run_dir} continues that run with its own config, but the command line "
            f"changes {', '.join(conflicts)}: drop these overrides, or start a new run."
        )
    # the display and the logger follow this command; the other settings that may change
    # (checkpoint spacing by time, L1's kernel) stay the run's own unless overridden
    stored.trainer.progress_bar = given.trainer.progress_bar
    stored.trainer.progress_refresh_rate = given.trainer.progress_refresh_rate
    stored.logger = given.logger
    for key in overridden:
        if key.startswith(RESUME_MAY_CHANGE):
            _copy_setting(given, stored, key)
    return stored


def _copy_setting(source: Any, target: Any, dotted: str) -> None:
    """``target.<dotted> = source.<dotted>`` on nested config dataclasses; nothing when a group
    on the way is absent from either (e.g. ``compression.l1`` of a run without L1)."""
    *parents, last = dotted.split(".")
    for part in parents:
        source, target = getattr(source, part, None), getattr(target, part, None)
    if source is not None and target is not None and hasattr(source, last):
        setattr(target, last, getattr(source, last))


def _without(tree: dict[str, Any], dotted_keys: tuple[str, ...]) -> dict[str, Any]:
    """``tree`` (a nested dict, changed in place) without the entries at ``dotted_keys``."""
    for dotted in dotted_keys:
        *parents, last = dotted.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def save_stage(stage_dir: Path, record: dict[str, Any], model: nn.Module) -> None:
    """Mark a stage finished: its model weights, then its record (written last, so a record
    always has its weights)."""
    save_state_dict(model, stage_dir / STAGE_MODEL_FILE)
    write_json(stage_dir / STAGE_RECORD_FILE, record)


def load_stage(stage_dir: Path, model: nn.Module) -> dict[str, Any] | None:
    """The record of a finished stage, with its weights loaded into ``model``; None if the stage
    did not finish."""
    record_path = stage_dir / STAGE_RECORD_FILE
    if not record_path.is_file():
        return None
    state = torch.load(stage_dir / STAGE_MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return json.loads(record_path.read_text())


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys a list of Hydra command-line overrides sets (``+a.b=1`` -> ``a.b``)."""
    return [item.split("=", 1)[0].lstrip("+~") for item in overrides]
