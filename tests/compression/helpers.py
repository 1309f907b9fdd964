"""Tiny models, data and trainers shared by the compression tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from recsys_compress.config import TrainConfig, to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule


def tiny_config(model: str = "mf", **overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "data": {
            "name": "synthetic",
            "source": "synthetic",
            "synthetic": {"num_users": 120, "num_items": 80, "interactions_per_user": 12},
        },
        "model": {"name": model, "dim": 8, "mlp_dim": 8, "mlp_layers": [16, 8]},
        "trainer": {"batch_size": 256, "progress_bar": False, "max_epochs": 3},
        "logger": {"name": "none"},
    }
    raw.update(overrides)
    return to_train_config(raw)


def tiny_setup(model: str = "mf", **overrides: Any) -> tuple[RecDataModule, RecommenderModule]:
    cfg = tiny_config(model, **overrides)
    L.seed_everything(0, verbose=False)
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed)
    dm.setup()
    net = build_model(cfg.model, dm.num_users, dm.num_items)
    return dm, RecommenderModule(net, cfg.loss, cfg.optim, cfg.eval)


def tiny_trainer(
    root: Path, callbacks: list[L.Callback], max_epochs: int = 3, **kw: Any
) -> L.Trainer:
    """A quiet trainer without checkpoints or validation; ``kw``: other ``L.Trainer`` options
    (these included)."""
    options: dict[str, Any] = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return L.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, default_root_dir=root, **(options | kw)
    )
