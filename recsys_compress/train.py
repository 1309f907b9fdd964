"""Entry point: ``python -m recsys_compress.train [overrides]`` (console script ``rcz-train``).

Composes the Hydra config, validates it, then wires data, model, LightningModule and callbacks,
fits, tests the best checkpoint and writes ``results.json`` into the run directory. This is the only
module that knows all the parts.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from recsys_compress.callbacks import CompressedEarlyStopping, CompressedModelCheckpoint, EpochTimer
from recsys_compress.compression import build_callbacks
from recsys_compress.compression.accounting import size_summary
from recsys_compress.config import TrainConfig, config_to_dict, to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.errors import RecsysCompressError
from recsys_compress.export import ARTIFACT_NAME, describe_structure, export_model
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule
from recsys_compress.results import (
    RESULTS_FILE,
    git_commit,
    model_size,
    now_iso,
    save_state_dict,
    versions,
    write_json,
)

log = logging.getLogger(__name__)
# Lightning notices that do not apply here: batches come from one in-process iterable (no worker
# duplication), and train metrics are logged per epoch, not every n steps.
for _notice in (
    r"Your `IterableDataset` has `__len__` defined",
    r"The number of training batches .* is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
):
    warnings.filterwarnings("ignore", message=_notice)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# A short random suffix keeps run dirs unique when jobs start in the same second.
if not OmegaConf.has_resolver("rcz_uid"):
    OmegaConf.register_new_resolver("rcz_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    return {
        key.split("/", 1)[1]: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(prefix + "/")
    }


def build_trainer(cfg: TrainConfig, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """A Lightning Trainer configured from ``cfg.trainer`` and ``cfg.logger``."""
    t = cfg.trainer
    if t.progress_bar:
        callbacks = [*callbacks, RichProgressBar(refresh_rate=t.progress_refresh_rate, leave=True)]
    logger = CSVLogger(run_dir, name="", version="") if cfg.logger.name == "csv" else False
    return L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        default_root_dir=run_dir,
    )


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Fit and test one configuration; return the results record (also written to run_dir)."""
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = RecDataModule(
        cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed
    )
    datamodule.setup()
    model = build_model(cfg.model, datamodule.num_users, datamodule.num_items)
    dense_bytes = size_summary(model)["dense_bytes"]
    explicit = cfg.data.feedback == "explicit"
    module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval, explicit=explicit)
    monitor, mode = cfg.eval.monitor_key(explicit)
    checkpoint = CompressedModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=f"val/{monitor}",
        mode=mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    timer = EpochTimer()
    # Compression acts after each optimizer step, before checkpoints see the weights.
    callbacks: list[L.Callback] = [*build_callbacks(cfg.compression), checkpoint, timer]
    if cfg.trainer.early_stopping_patience:
        callbacks.append(
            CompressedEarlyStopping(
                f"val/{monitor}", mode=mode, patience=cfg.trainer.early_stopping_patience
            )
        )
    trainer = build_trainer(cfg, run_dir, callbacks)
    trainer.fit(module, datamodule=datamodule)
    best_path = checkpoint.best_model_path
    best_epoch = None
    if best_path:
        best_epoch = torch.load(best_path, map_location="cpu", weights_only=True)["epoch"]
    # Validation and test metrics both come from the best checkpoint.
    ckpt_path = "best" if best_path else None
    trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    val_metrics = _metrics(trainer, "val")
    trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    record: dict[str, Any] = {
        "status": "completed",
        "run_dir": str(run_dir),
        "config": config_to_dict(cfg),
        "seed": cfg.seed,
        "data": {
            "num_users": datamodule.num_users,
            "num_items": datamodule.num_items,
            "num_train": len(datamodule.split.train),
            "num_val": len(datamodule.split.val),
            "num_test": len(datamodule.split.test),
        },
        "monitor": f"val/{monitor}",
        "best_epoch": best_epoch,
        "epochs_trained": trainer.current_epoch,
        "val": val_metrics,
        "test": _metrics(trainer, "test"),
        **model_size(module.model),
        "compression": {
            "methods": cfg.compression.methods(),
            "uncompressed_fp32_bytes": dense_bytes,
            **size_summary(module.model, dense_reference_bytes=dense_bytes),
            "structure": describe_structure(module.model),
        },
        "seconds_per_epoch": _mean(timer.train_seconds),
        "eval_seconds": _mean(timer.test_seconds),
        "val_eval_seconds": _mean(timer.val_seconds),
        "total_seconds": time.time() - started,
        "versions": versions(),
        "git_commit": git_commit(),
        "finished_at": now_iso(),
    }
    if cfg.save_model:
        save_state_dict(module.model, run_dir / "model.pt")
        record["model_file"] = str(run_dir / "model.pt")
    if cfg.compression.methods():
        inter = datamodule.interactions
        assert inter is not None
        artifact = run_dir / ARTIFACT_NAME
        size = export_model(module.model, cfg.model, inter.user_ids, inter.item_ids, artifact)
        record["compression"].update(
            artifact=str(artifact),
            artifact_bytes=size,
            artifact_ratio=size / dense_bytes,
        )
    write_json(run_dir / RESULTS_FILE, record)
    return record


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def print_summary(record: dict[str, Any], console: Console | None = None) -> None:
    """The metrics table (validation at the best epoch and test) and where the run lives."""
    console = console or Console()
    table = Table(
        title=f"{record['config']['model']['name']} on {record['config']['data']['name']}"
    )
    table.add_column("metric")
    table.add_column("val", justify="right")
    table.add_column("test", justify="right")
    for key in record["test"]:
        val = record["val"].get(key)
        table.add_row(key, "" if val is None else f"{val:.4f}", f"{record['test'][key]:.4f}")
    console.print(table)
    console.print(
        f"params {record['num_params']:,}  dense bytes {record['dense_bytes']:,}  "
        f"{record['seconds_per_epoch'] or math.nan:.2f} s/epoch  best epoch {record['best_epoch']}"
    )
    console.print(f"Run dir: {record['run_dir']}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(raw: DictConfig) -> float | None:
    """Hydra entry point; returns the monitored validation metric (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg = to_train_config(raw)
        record = train(cfg, run_dir)
    except RecsysCompressError as err:
        write_json(
            run_dir / RESULTS_FILE,
            {"status": "failed", "error": str(err), "run_dir": str(run_dir)},
        )
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
    except Exception as err:
        write_json(
            run_dir / RESULTS_FILE,
            {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
                "run_dir": str(run_dir),
            },
        )
        raise
    print_summary(record)
    return record["val"].get(record["monitor"].split("/", 1)[1])


if __name__ == "__main__":
    main()
