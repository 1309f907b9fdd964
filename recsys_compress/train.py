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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.profilers import AdvancedProfiler, SimpleProfiler
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from recsys_compress.callbacks import (
    CompressedEarlyStopping,
    CompressedModelCheckpoint,
    EpochTimer,
    RandomState,
)
from recsys_compress.compression import build_callbacks
from recsys_compress.compression.accounting import size_summary
from recsys_compress.compression.qat import post_training_quantize
from recsys_compress.compression.sparsity import L1Proximal
from recsys_compress.config import (
    STRATEGIES,
    TrainConfig,
    TrainerConfig,
    config_to_dict,
    to_train_config,
)
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.errors import RecsysCompressError
from recsys_compress.export import ARTIFACT_NAME, describe_structure, export_model
from recsys_compress.logging_wandb import (
    end_wandb_run,
    finish_wandb_run,
    run_info,
    start_wandb_run,
    wandb_logger,
)
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule
from recsys_compress.reporting.budget import (
    budget_limit,
    budget_objective,
    budget_record,
    min_artifact_bytes,
)
from recsys_compress.reporting.tables import record_value
from recsys_compress.results import (
    RESULTS_FILE,
    completed_run,
    git_commit,
    model_size,
    now_iso,
    refuse_overwrite,
    save_state_dict,
    versions,
    write_failure,
    write_json,
)
from recsys_compress.resume import (
    AtomicCheckpointIO,
    last_checkpoint,
    load_stage,
    override_keys,
    resumed_config,
    save_run_config,
    save_stage,
)

log = logging.getLogger(__name__)
# Lightning notices that do not apply here: batches come from one in-process iterable (no worker
# duplication), and train metrics are logged per epoch, not every n steps.
for _notice in (
    r"Your `IterableDataset` has `__len__` defined",
    r"The number of training batches .* is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Experiment logs directory .* exists and is not empty",
    # DDP: metrics are synced by torchmetrics at compute(); the rest is the same on every rank.
    r"It is recommended to use `self.log\(.*sync_dist=True\)`",
):
    warnings.filterwarnings("ignore", message=_notice)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# A short random suffix keeps run dirs unique when jobs start in the same second.
if not OmegaConf.has_resolver("rcz_uid"):
    OmegaConf.register_new_resolver("rcz_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
# ${rcz_mul:a,b} = a * b: configs that scale one value by another (NCF's tower from its factors).
if not OmegaConf.has_resolver("rcz_mul"):
    OmegaConf.register_new_resolver("rcz_mul", lambda a, b: a * b)


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
        # One bar reset each epoch (leave=False): a bar left per epoch stops and restarts rich's
        # display, whose refresh thread join costs ~25 ms an epoch (5% of an ML-100K MF epoch).
        # The per-epoch record is the "epoch N/M: ..." line in the console and train.log.
        callbacks = [*callbacks, RichProgressBar(refresh_rate=t.progress_refresh_rate)]
    # logger=wandb keeps metrics.csv: per-epoch numbers readable next to results.json without W&B.
    loggers: list[Logger] = []
    if cfg.logger.name in ("csv", "wandb"):
        loggers.append(CSVLogger(run_dir, name="", version=""))
    if cfg.logger.name == "wandb":
        loggers.append(wandb_logger(run_dir))
    return L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        # Gradient clipping: the module clips (manual optimization; see RecommenderModule).
        deterministic=t.deterministic,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        # no_grad instead of inference mode: a model evaluated here may be trained further
        # (dense stage -> compression stage), which inference tensors forbid.
        inference_mode=False,
        default_root_dir=run_dir,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=t.overfit_batches,
        profiler=_profiler(t.profiler, run_dir),
        plugins=[AtomicCheckpointIO()],  # a kill mid-save keeps the previous checkpoint
        # The data module shards DDP batches itself (Lightning's DistributedSampler would pad
        # the evaluation chunks with repeats, counting some users twice).
        use_distributed_sampler=False,
    )


def batches_per_call(trainer: TrainerConfig) -> int:
    """``trainer.batches_per_call``, or 1 where Lightning's step counts are the user's unit
    (``fast_dev_run`` / ``overfit_batches`` name a number of batches). At most
    ``checkpoint_every_n_steps``: rolling checkpoints are written between Lightning steps, so
    a killed run still loses fewer than that many optimizer steps."""
    if trainer.fast_dev_run or trainer.overfit_batches:
        return 1
    return min(trainer.batches_per_call, trainer.checkpoint_every_n_steps or sys.maxsize)


def build_datamodule(cfg: TrainConfig) -> RecDataModule:
    """The run's data module, set up (data loaded, split, batch sources built)."""
    datamodule = RecDataModule(
        cfg.data,
        cfg.split,
        cfg.loss,
        cfg.eval,
        cfg.trainer.batch_size,
        cfg.seed,
        batches_per_call(cfg.trainer),
    )
    datamodule.setup()
    return datamodule


def is_rank_zero() -> bool:
    """True in the process that writes the run's files (rank 0 of DDP, or no DDP). Under a
    spawning strategy the Hydra process is the main one; its workers write nothing but the
    checkpoints (Lightning's rank 0)."""
    return rank_zero_only.rank == 0


def spawns_workers(strategy: str) -> bool:
    """Whether ``trainer.strategy`` runs the fit in new worker processes (``ddp_spawn``,
    ``ddp_fork``, ...) rather than in this one (and re-executed copies of it, ``ddp``)."""
    return any(word in strategy for word in ("spawn", "fork", "notebook"))


def strategy_for_multirun(trainer: TrainerConfig) -> TrainerConfig:
    """``trainer.strategy`` for a job of a Hydra multirun: ``ddp`` (also ``auto`` on several
    devices) launches its other ranks by re-executing this program's command line, which inside
    a multirun is the whole sweep; ``ddp_spawn`` starts workers that run only this job's fit."""
    strategy = trainer.strategy
    one_device = trainer.devices in (1, "1") or (
        isinstance(trainer.devices, list | tuple) and len(trainer.devices) == 1
    )
    if spawns_workers(strategy) or not (
        strategy.startswith("ddp") or (strategy == "auto" and not one_device)
    ):
        return trainer
    spawn = strategy.replace("ddp", "ddp_spawn", 1) if strategy != "auto" else "ddp_spawn"
    if spawn not in STRATEGIES:
        spawn = "ddp_spawn"
    log.warning(
        "trainer.strategy=%s inside a multirun would re-run the whole sweep in each DDP child "
        "process: using trainer.strategy=%s for this job.",
        strategy,
        spawn,
    )
    return replace(trainer, strategy=spawn)


class SpawnHandback(L.Callback):
    """Under a spawning strategy the model is compressed in the workers (modules swapped,
    masks applied), which Lightning's hand-back of a state dict cannot express: rank 0 saves the
    whole fitted model, the compression callbacks' states, the epoch timings and the epoch
    count for the main process."""

    def __init__(self, path: Path, timer: EpochTimer, compression: list[L.Callback]) -> None:
        self.path = path
        self.timer = timer
        self.compression = compression

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            payload = {
                "model": pl_module.model,
                "compression": [callback.state_dict() for callback in self.compression],
                "train_seconds": self.timer.train_seconds,
                "val_seconds": self.timer.val_seconds,
                "epochs_trained": trainer.current_epoch,
            }
            torch.save(payload, self.path)


def _profiler(name: str | None, run_dir: Path) -> SimpleProfiler | AdvancedProfiler | None:
    """``trainer.profiler``: its report goes to ``<run dir>/<stage>-profile.txt``."""
    if name is None:
        return None
    kind = SimpleProfiler if name == "simple" else AdvancedProfiler
    return kind(dirpath=run_dir, filename="profile")


@dataclass
class StageResult:
    """What one fit + test of a model produced."""

    val: dict[str, float]
    test: dict[str, float]
    best_epoch: int | None
    epochs_trained: int
    timer: EpochTimer
    # what the compression callbacks report for results.json's "compression" section
    compression: dict[str, Any] = field(default_factory=dict)


def run_checkpoint(
    cfg: TrainConfig, run_dir: Path, module: RecommenderModule
) -> CompressedModelCheckpoint:
    """A run's checkpoints: ``best.ckpt`` by the validation metric, ``last.ckpt`` at each
    epoch's end and every ``trainer.checkpoint_every_n_steps`` optimizer steps (no more often
    than ``trainer.checkpoint_max_overhead`` allows)."""
    monitor, mode = cfg.eval.monitor_key(module.explicit)
    return CompressedModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=f"val/{monitor}",
        mode=mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        every_n_steps=cfg.trainer.checkpoint_every_n_steps,
        max_overhead=cfg.trainer.checkpoint_max_overhead,
    )


def fit_and_test(
    cfg: TrainConfig,
    run_dir: Path,
    module: RecommenderModule,
    datamodule: RecDataModule,
    compress: bool,
    resume: bool = False,
) -> StageResult:
    """Fit ``module`` (with the compression callbacks if ``compress``), then load its best
    checkpoint and evaluate it on validation and test. ``module`` ends with the best weights.
    ``resume``: continue from ``<run_dir>/checkpoints/last.ckpt`` if there is one."""
    monitor, mode = cfg.eval.monitor_key(module.explicit)
    checkpoint = run_checkpoint(cfg, run_dir, module)
    timer = EpochTimer()
    # Compression acts after each optimizer step, before checkpoints see the weights.
    compression = build_callbacks(cfg.compression) if compress else []
    callbacks: list[L.Callback] = [*compression, checkpoint, timer, RandomState()]
    if cfg.trainer.early_stopping_patience:
        callbacks.append(
            CompressedEarlyStopping(
                f"val/{monitor}", mode=mode, patience=cfg.trainer.early_stopping_patience
            )
        )
    spawned = spawns_workers(cfg.trainer.strategy)
    handback = run_dir / "spawn_handback.pt"
    if spawned:
        callbacks.append(SpawnHandback(handback, timer, compression))
    trainer = build_trainer(cfg, run_dir, callbacks)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=last_checkpoint(run_dir) if resume else None
    )
    epochs_trained = trainer.current_epoch
    if spawned:
        # The fitted model comes from the workers; evaluation runs here, on one device (cheap
        # next to training, and a second spawn per evaluation would cost more than it saves).
        payload = torch.load(handback, map_location="cpu", weights_only=False)
        handback.unlink()
        module.model = payload["model"]
        for callback, state in zip(compression, payload["compression"], strict=True):
            callback.load_state_dict(state)  # e.g. QAT: converted, so checkpoints load as such
        timer.train_seconds, timer.val_seconds = payload["train_seconds"], payload["val_seconds"]
        epochs_trained = payload["epochs_trained"]
        # Lightning's own hand-back loaded rank 0's metric states (mid-sum) into this module.
        for metric in (*module.val_metrics.values(), *module.test_metrics.values()):
            metric.reset()
        one_process = replace(cfg.trainer, strategy="auto", devices=1)
        trainer = build_trainer(replace(cfg, trainer=one_process), run_dir, [*compression, timer])
    best_path = checkpoint.best_model_path or None
    best_epoch = None
    if best_path:
        # mmap: the epoch is read without loading the tensors (GBs at millions of rows)
        best = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True)
        best_epoch = best["epoch"]
        del best
    # Validation and test metrics both come from the best checkpoint, loaded once: validate
    # leaves its weights in the module.
    trainer.validate(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    val_metrics = _metrics(trainer, "val")
    trainer.test(module, datamodule=datamodule, verbose=False)
    # how L1's proximal step ran (compiled or eager: they differ in the last place)
    facts: dict[str, Any] = {}
    for callback in compression:
        if isinstance(callback, L1Proximal):
            facts["l1_step"] = callback.steps_run()
    test_metrics = _metrics(trainer, "test")
    return StageResult(val_metrics, test_metrics, best_epoch, epochs_trained, timer, facts)


def evaluate_as_is(
    cfg: TrainConfig, run_dir: Path, module: RecommenderModule, datamodule: RecDataModule
) -> StageResult:
    """Evaluate ``module`` as it is on validation and test (e.g. after post-training
    quantisation, which trains nothing)."""
    timer = EpochTimer()
    trainer = build_trainer(cfg, run_dir, [timer])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val_metrics = _metrics(trainer, "val")
    trainer.test(module, datamodule=datamodule, verbose=False)
    return StageResult(val_metrics, _metrics(trainer, "test"), None, 0, timer)


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Fit and test one configuration; return the results record (also written to run_dir).

    With compression and ``compression.dense_epochs > 0`` the run has two stages: the dense model
    trains and is evaluated first (``<run dir>/dense``), then it is compressed while fine-tuning
    for ``trainer.max_epochs``; the record holds both, so before / after compare directly.
    ``resume``: continue a killed run in ``run_dir`` (a finished dense stage is not redone; each
    stage continues from its ``checkpoints/last.ckpt``); the results equal an uninterrupted run's.
    """
    started = time.time()
    wandb_run = start_wandb_run(cfg, run_dir)  # None unless logger=wandb
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    inter = datamodule.interactions
    assert inter is not None and datamodule.split is not None
    model = build_model(cfg.model, datamodule.num_users, datamodule.num_items)
    dense_bytes = size_summary(model)["dense_bytes"]
    explicit = cfg.data.feedback == "explicit"
    module = RecommenderModule(
        model,
        cfg.loss,
        cfg.optim,
        cfg.eval,
        explicit=explicit,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
    )
    methods = cfg.compression.methods()
    writer = is_rank_zero()  # DDP: only rank 0 writes the run's files
    limit = budget_limit(cfg, dense_bytes)
    predicted = min_artifact_bytes(module, cfg.compression) if limit is not None else 0
    if limit is not None and predicted > limit:  # cannot fit: do not train it
        over = {
            "status": "over_budget",
            "run_dir": str(run_dir),
            "config": config_to_dict(cfg),
            "seed": cfg.seed,
            "budget": budget_record(limit, predicted, None),
            "compression": {"methods": methods, "uncompressed_fp32_bytes": dense_bytes},
        }
        if writer:
            write_json(run_dir / RESULTS_FILE, over)
        return over
    if not resume and writer:
        save_run_config(run_dir, cfg)
    dense_record = None
    if methods and cfg.compression.dense_epochs > 0:
        dense_dir = run_dir / "dense"
        dense_record = load_stage(dense_dir, module.model) if resume else None
        if dense_record is None:
            dense_cfg = replace(
                cfg, trainer=replace(cfg.trainer, max_epochs=cfg.compression.dense_epochs)
            )
            dense = fit_and_test(dense_cfg, dense_dir, module, datamodule, False, resume)
            dense_artifact = dense_dir / ARTIFACT_NAME
            dense_record = {"val": dense.val, "test": dense.test, "best_epoch": dense.best_epoch}
            if writer:
                dense_record["artifact_bytes"] = export_model(
                    module.model, cfg.model, inter.user_ids, inter.item_ids, dense_artifact
                )
                save_stage(dense_dir, dense_record, module.model)
        # The compression stage starts from the same random state whether or not the dense
        # stage ran in this process (a resumed run skips it).
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    if methods and cfg.compression.embedding_weight_decay is not None:
        module.optim_cfg = replace(
            module.optim_cfg, embedding_weight_decay=cfg.compression.embedding_weight_decay
        )
    if methods and cfg.compression.lr is not None:
        module.optim_cfg = replace(module.optim_cfg, lr=cfg.compression.lr)
    qat = cfg.compression.qat
    if qat is not None and qat.post_training:  # the PTQ baseline: quantise, no training
        post_training_quantize(module.model, qat)
        stage = evaluate_as_is(cfg, run_dir, module, datamodule)
    else:
        stage = fit_and_test(cfg, run_dir, module, datamodule, bool(methods), resume)
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
            **stage.compression,
        },
        "seconds_per_epoch": _mean(stage.timer.train_seconds),
        "eval_seconds": _mean(stage.timer.test_seconds),
        "val_eval_seconds": _mean(stage.timer.val_seconds),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    if dense_record is not None:
        record["dense"] = dense_record
    if not writer:
        return record
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
        if limit is not None:
            record["budget"] = budget_record(limit, predicted, size)
    record.update(total_seconds=time.time() - started, finished_at=now_iso())
    if wandb_run is not None:
        record["wandb"] = run_info(wandb_run)
    write_json(run_dir / RESULTS_FILE, record)
    if wandb_run is not None:
        finish_wandb_run(wandb_run, record)
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
def main(raw: DictConfig) -> float | list[float] | None:
    """Hydra entry point; returns what a sweeper optimises (:func:`sweep_objective`)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg = to_train_config(raw)
        resume = cfg.resume is not None
        if cfg.resume is not None:
            resume_dir = Path(cfg.resume).expanduser().resolve()
            cfg = resumed_config(cfg, override_keys(list(hydra_cfg.overrides.task)), resume_dir)
            run_dir = resume_dir
            print(f"Resuming {run_dir} from its last checkpoint.")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            cfg = replace(cfg, trainer=strategy_for_multirun(cfg.trainer))
        done = completed_run(run_dir, config_to_dict(cfg)) if cfg.skip_completed else None
        if done is not None:
            print(f"skip_completed: {run_dir / RESULTS_FILE} is a completed run of this config.")
            return sweep_objective(done, cfg.optimized_metrics)
        if not resume and not cfg.overwrite:
            refuse_overwrite(run_dir)
        record = train(cfg, run_dir, resume=resume)
    except RecsysCompressError as err:
        if is_rank_zero():
            failure = {"status": "failed", "error": str(err), "run_dir": str(run_dir)}
            write_failure(run_dir, failure)
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
    except Exception as err:
        if is_rank_zero():
            write_failure(
                run_dir,
                {
                    "status": "failed",
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                    "run_dir": str(run_dir),
                },
            )
        raise
    finally:
        # A job that failed left its W&B run open: end it (exit code 1) so the next job of a
        # multirun gets its own run.
        end_wandb_run(run_dir)
    if not is_rank_zero():  # another DDP rank of a single run: rank 0 reports
        return None
    if record["status"] == "over_budget":
        budget = record["budget"]
        print(
            f"over budget: the artifact needs at least {budget['predicted_min_bytes']:,} bytes "
            f"> {budget['limit_bytes']:,}; not trained."
        )
    else:
        print_summary(record)
    if "budget" in record:
        return budget_objective(record, cfg.optimized_metrics)
    return sweep_objective(record, cfg.optimized_metrics)


def sweep_objective(record: dict[str, Any], names: list[str]) -> float | list[float] | None:
    """The value(s) a sweeper optimises: ``optimized_metrics`` read from the record (a val metric
    such as ``ndcg@10`` or a dotted path such as ``compression.artifact_bytes``), one float for one
    name, a list for several (multi-objective); no names: the monitored val metric. None (a
    failed trial) if a name is not in the record."""
    monitored = record["monitor"].split("/", 1)[1]
    values = [record_value(record, name, "val") for name in names or [monitored]]
    missing = [name for name, value in zip(names, values, strict=False) if value is None]
    if missing or None in values:
        print(
            f"error: optimized_metrics {missing or [monitored]} not in {RESULTS_FILE}: use a val "
            "metric (ndcg@10) or a dotted path of the record (compression.artifact_bytes).",
            file=sys.stderr,
        )
        return None
    return values if len(names) > 1 else values[0]


if __name__ == "__main__":
    main()
