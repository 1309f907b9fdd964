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
from dataclasses import dataclass, replace
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
    r"Experiment logs directory .* exists and is not empty",
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
        # no_grad instead of inference mode: a model evaluated here may be trained further
        # (dense stage -> compression stage), which inference tensors forbid.
        inference_mode=False,
        default_root_dir=run_dir,
    )


@dataclass
class StageResult:
    """What one fit + test of a model produced."""

    val: dict[str, float]
    test: dict[str, float]
    best_epoch: int | None
    epochs_trained: int
    timer: EpochTimer


def fit_and_test(
    cfg: TrainConfig,
    run_dir: Path,
    module: RecommenderModule,
    datamodule: RecDataModule,
    compress: bool,
) -> StageResult:
    """Fit ``module`` (with the compression callbacks if ``compress``), then load its best
    checkpoint and evaluate it on validation and test. ``module`` ends with the best weights."""
    monitor, mode = cfg.eval.monitor_key(module.explicit)
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
    compression = build_callbacks(cfg.compression) if compress else []
    callbacks: list[L.Callback] = [*compression, checkpoint, timer]
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
    return StageResult(
        val_metrics, _metrics(trainer, "test"), best_epoch, trainer.current_epoch, timer
    )


def train(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Fit and test one configuration; return the results record (also written to run_dir).

    With compression and ``compression.dense_epochs > 0`` the run has two stages: the dense model
    trains and is evaluated first (``<run dir>/dense``), then it is compressed while fine-tuning
    for ``trainer.max_epochs``; the record holds both, so before / after compare directly.
    """
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = RecDataModule(
        cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed
    )
    datamodule.setup()
    inter = datamodule.interactions
    assert inter is not None and datamodule.split is not None
    model = build_model(cfg.model, datamodule.num_users, datamodule.num_items)
    dense_bytes = size_summary(model)["dense_bytes"]
    explicit = cfg.data.feedback == "explicit"
    module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval, explicit=explicit)
    methods = cfg.compression.methods()
    dense_record = None
    if methods and cfg.compression.dense_epochs > 0:
        dense_cfg = replace(
            cfg, trainer=replace(cfg.trainer, max_epochs=cfg.compression.dense_epochs)
        )
        dense = fit_and_test(dense_cfg, run_dir / "dense", module, datamodule, compress=False)
        dense_artifact = run_dir / "dense" / ARTIFACT_NAME
        dense_record = {
            "val": dense.val,
            "test": dense.test,
            "best_epoch": dense.best_epoch,
            "artifact_bytes": export_model(
                module.model, cfg.model, inter.user_ids, inter.item_ids, dense_artifact
            ),
        }
    if methods and cfg.compression.embedding_weight_decay is not None:
        module.optim_cfg = replace(
            cfg.optim, embedding_weight_decay=cfg.compression.embedding_weight_decay
        )
    stage = fit_and_test(cfg, run_dir, module, datamodule, compress=bool(methods))
    monitor, _ = cfg.eval.monitor_key(explicit)
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
        "best_epoch": stage.best_epoch,
        "epochs_trained": stage.epochs_trained,
        "val": stage.val,
        "test": stage.test,
        **model_size(module.model),
        "compression": {
            "methods": methods,
            "uncompressed_fp32_bytes": dense_bytes,
            **size_summary(module.model, dense_reference_bytes=dense_bytes),
            "structure": describe_structure(module.model),
        },
        "seconds_per_epoch": _mean(stage.timer.train_seconds),
        "eval_seconds": _mean(stage.timer.test_seconds),
        "val_eval_seconds": _mean(stage.timer.val_seconds),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    if dense_record is not None:
        record["dense"] = dense_record
    if cfg.save_model:
        save_state_dict(module.model, run_dir / "model.pt")
        record["model_file"] = str(run_dir / "model.pt")
    if methods:
        artifact = run_dir / ARTIFACT_NAME
        size = export_model(module.model, cfg.model, inter.user_ids, inter.item_ids, artifact)
        record["compression"].update(
            artifact=str(artifact),
            artifact_bytes=size,
            artifact_ratio=size / dense_bytes,
        )
    record.update(total_seconds=time.time() - started, finished_at=now_iso())
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
        f"params {record['num_params']:,}  in-memory bytes {record['dense_bytes']:,}  "
        f"{record['seconds_per_epoch'] or math.nan:.2f} s/epoch  best epoch {record['best_epoch']}"
    )
    compression = record.get("compression", {})
    if compression.get("methods"):
        console.print(_compression_table(record))
    console.print(f"Run dir: {record['run_dir']}")


def _compression_table(record: dict[str, Any]) -> Table:
    """Size on disk and test metrics before and after compression."""
    comp = record["compression"]
    key = record["monitor"].split("/", 1)[1]
    table = Table(title=f"compression: {' + '.join(comp['methods'])}")
    for column in ("model", "bytes on disk", "vs dense fp32", f"test {key}"):
        table.add_column(column, justify="left" if column == "model" else "right")
    dense = record.get("dense")
    reference = comp["uncompressed_fp32_bytes"]
    if dense is not None:
        table.add_row(
            "dense",
            f"{dense['artifact_bytes']:,}",
            f"{dense['artifact_bytes'] / reference:.3f}",
            f"{dense['test'][key]:.4f}",
        )
    table.add_row(
        "compressed",
        f"{comp['artifact_bytes']:,}",
        f"{comp['artifact_ratio']:.3f}",
        f"{record['test'][key]:.4f}",
    )
    return table


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
