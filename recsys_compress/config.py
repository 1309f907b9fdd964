"""Typed schema of the Hydra config.

Hydra composes plain YAML from ``conf/``; :func:`to_train_config` merges it into these dataclasses,
so an unknown key, a value of the wrong type or a value out of range fails before any data is read,
with a :class:`~recsys_compress.errors.ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys_compress.compression.lowrank import SVDConfig
from recsys_compress.compression.pruning import PruneConfig
from recsys_compress.compression.qat import QATConfig
from recsys_compress.compression.sparsity import L1Config
from recsys_compress.errors import ConfigError
from recsys_compress.metrics import (
    SAMPLED_RANKING_METRICS,
    validate_ks,
    validate_metric_names,
)

DATA_SOURCES = ("ml100k", "ml1m", "ml20m", "ml25m", "csv", "synthetic")
MODELS = ("mf", "gmf", "mlp", "neumf")
LOSSES = ("bce", "bpr", "mse")
SPLITS = ("loo", "ratio", "temporal")
PROTOCOLS = ("full", "sampled")
OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad", "rowwise_adagrad")
SCHEDULERS = ("none", "step", "cosine", "exponential")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}: set {key} to one.")


def _at_least(key: str, value: float, low: float, hint: str = "") -> None:
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{key}={value} must be >= {low}{': ' + hint if hint else ''}.")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} must lie in [{low}, {high}].")


@dataclass
class SyntheticConfig:
    """Size of a random implicit dataset with popularity skew (for tests and scale runs)."""

    num_users: int = 300
    num_items: int = 200
    interactions_per_user: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("data.synthetic.num_users", self.num_users, 1)
        _at_least("data.synthetic.num_items", self.num_items, 2)
        _at_least("data.synthetic.interactions_per_user", self.interactions_per_user, 1)
        _at_least("data.synthetic.seed", self.seed, 0)
        if self.interactions_per_user >= self.num_items:
            raise ConfigError(
                "data.synthetic.interactions_per_user must be < data.synthetic.num_items "
                "(every user needs items left to sample negatives from)."
            )


@dataclass
class DataConfig:
    """Where interactions come from and how they are turned into implicit / explicit feedback."""

    name: str = "ml100k"
    source: str = "ml100k"
    path: str | None = None
    cache_dir: str | None = None
    connect_timeout: float = 5.0
    format: str = "auto"
    sep: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str | None = "rating"
    timestamp_col: str | None = "timestamp"
    feedback: str = "implicit"
    rating_threshold: float | None = None
    min_user_interactions: int = 0
    min_item_interactions: int = 0
    use_cache: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, DATA_SOURCES)
        _one_of("data.feedback", self.feedback, ("implicit", "explicit"))
        _one_of("data.format", self.format, ("auto", "csv", "tsv", "parquet"))
        _at_least("data.min_user_interactions", self.min_user_interactions, 0)
        _at_least("data.min_item_interactions", self.min_item_interactions, 0)
        _at_least("data.connect_timeout", self.connect_timeout, 0.1)
        if self.rating_threshold is not None and not math.isfinite(self.rating_threshold):
            raise ConfigError(
                f"data.rating_threshold={self.rating_threshold} must be a finite number (ratings "
                ">= it are positives), or null to keep every rating."
            )
        if self.source == "csv" and not self.path:
            raise ConfigError(
                "data=csv needs a file: set data.path=/path/to/interactions.csv "
                "(and data.user_col / data.item_col if the columns are not user_id / item_id)."
            )


@dataclass
class SplitConfig:
    """How interactions are divided into train / validation / test."""

    name: str = "loo"
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int | None = None

    def __post_init__(self) -> None:
        _one_of("split.name", self.name, SPLITS)
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or sum(self.ratios) <= 0:
            raise ConfigError(
                f"split.ratios={list(self.ratios)} must be three non-negative numbers "
                "(train, validation, test), e.g. [0.8,0.1,0.1]."
            )
        if self.ratios[0] <= 0 or self.ratios[1] <= 0 or self.ratios[2] <= 0:
            raise ConfigError(f"split.ratios={list(self.ratios)}: each part must be > 0.")
        if self.seed is not None:
            _at_least("split.seed", self.seed, 0)


@dataclass
class ModelConfig:
    """Architecture. ``dim``: embedding size of MF and GMF (and of the MLP unless ``mlp_dim``)."""

    name: str = "mf"
    dim: int = 64
    mlp_dim: int | None = None
    mlp_layers: list[int] = field(default_factory=lambda: [64, 32, 16])
    dropout: float = 0.0
    init_std: float = 0.01
    use_bias: bool = True
    pretrained_gmf: str | None = None
    pretrained_mlp: str | None = None
    alpha: float = 0.5

    def __post_init__(self) -> None:
        _one_of("model.name", self.name, MODELS)
        _at_least("model.dim", self.dim, 1)
        if self.mlp_dim is not None:
            _at_least("model.mlp_dim", self.mlp_dim, 1)
        if self.name in ("mlp", "neumf") and not self.mlp_layers:
            raise ConfigError("model.mlp_layers is empty: give the hidden sizes, e.g. [64,32,16].")
        for size in self.mlp_layers:
            _at_least("model.mlp_layers[*]", size, 1)
        _in_range("model.dropout", self.dropout, 0.0, 0.99)
        _at_least("model.init_std", self.init_std, 0.0)
        _in_range("model.alpha", self.alpha, 0.0, 1.0)
        if (self.pretrained_gmf is None) != (self.pretrained_mlp is None):
            raise ConfigError(
                "NeuMF pre-training needs both model.pretrained_gmf and model.pretrained_mlp "
                "(paths to the model.pt of a trained GMF and MLP run)."
            )
        if self.pretrained_gmf is not None and self.name != "neumf":
            raise ConfigError("model.pretrained_gmf / pretrained_mlp only apply to model=neumf.")


@dataclass
class LossConfig:
    """Training objective and how many sampled negatives each positive gets."""

    name: str = "bce"
    num_negatives: int = 4

    def __post_init__(self) -> None:
        _one_of("loss.name", self.name, LOSSES)
        if self.name != "mse":
            _at_least("loss.num_negatives", self.num_negatives, 1, "each positive needs negatives")


@dataclass
class EvalConfig:
    """Ranking protocol (full ranking or sampled candidates), cut-offs and the monitored metric."""

    protocol: str = "full"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    metrics: list[str] = field(
        default_factory=lambda: ["hr", "recall", "precision", "ndcg", "mrr", "map"]
    )
    num_negatives: int = 99
    seed: int | None = None
    monitor: str = "auto"
    batch_users: int = 1024

    def __post_init__(self) -> None:
        _one_of("eval.protocol", self.protocol, PROTOCOLS)
        validate_ks(self.ks)
        validate_metric_names(self.metrics)
        _at_least("eval.num_negatives", self.num_negatives, 1)
        _at_least("eval.batch_users", self.batch_users, 1)
        if self.seed is not None:
            _at_least("eval.seed", self.seed, 0)
        if self.monitor not in ("auto", "rmse", "mae"):
            names = self.metrics if self.protocol == "full" else SAMPLED_RANKING_METRICS
            logged = [f"{m}@{k}" for m in names for k in self.ks]
            if self.monitor not in logged:
                raise ConfigError(
                    f"eval.monitor={self.monitor!r} is not a logged metric: use auto or one of "
                    f"{', '.join(logged)}."
                )

    def monitor_key(self, explicit: bool) -> tuple[str, str]:
        """The validation metric that picks the best checkpoint, and whether it is maximised."""
        if self.monitor != "auto":
            name = self.monitor
        elif explicit:
            name = "rmse"
        else:
            name = f"ndcg@{10 if 10 in self.ks else self.ks[0]}"
        mode = "min" if name in ("rmse", "mae") else "max"
        return name, mode


@dataclass
class OptimConfig:
    """Optimizer and LR schedule. ``embedding_weight_decay`` applies to embedding tables only.

    ``sparse``: embedding tables get sparse gradients (only the rows a batch reads) and the
    optimizer updates only those rows, so a step's cost follows the batch, not the table (Adam:
    :class:`~recsys_compress.optim.RowSparseAdam`; SGD and Adagrad take sparse gradients as is).
    ``rowwise_adagrad`` (:class:`~recsys_compress.optim.RowWiseAdagrad`, sparse only): Adagrad
    with one accumulator per table row, TorchRec's usual optimizer for large tables.
    ``fused``: torch's fused optimizer kernels (one pass per parameter; with ``sparse``, fused
    Adam on the batch's rows; results differ from the for-loop implementation by float rounding
    only); false reproduces runs of versions before it.
    """

    name: str = "adam"
    lr: float = 0.002
    weight_decay: float = 0.0
    embedding_weight_decay: float = 1e-5
    momentum: float = 0.0
    scheduler: str = "none"
    step_size: int = 10
    gamma: float = 0.5
    sparse: bool = False
    fused: bool = True

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, OPTIMIZERS)
        _one_of("optim.scheduler", self.scheduler, SCHEDULERS)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr={self.lr} must be a finite number > 0, e.g. 0.002.")
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _at_least("optim.embedding_weight_decay", self.embedding_weight_decay, 0.0)
        _at_least("optim.momentum", self.momentum, 0.0)
        _at_least("optim.step_size", self.step_size, 1)
        _in_range("optim.gamma", self.gamma, 0.0, 1.0)
        if self.name == "rowwise_adagrad" and not self.sparse:
            raise ConfigError(
                "optim.name=rowwise_adagrad keeps one accumulator per row of the sparse "
                "gradients of embedding tables: set optim.sparse=true (optim=rowwise_adagrad "
                "does), or use optim.name=adagrad for dense gradients."
            )
        if self.sparse:
            self._check_sparse()

    def _check_sparse(self) -> None:
        if self.name == "adamw":
            raise ConfigError(
                "optim.sparse=true does not support optim.name=adamw (its decoupled weight decay "
                "changes every row every step): use optim.name=adam, sgd, adagrad or "
                "rowwise_adagrad."
            )
        if self.embedding_weight_decay > 0:
            raise ConfigError(
                f"optim.sparse=true with optim.embedding_weight_decay="
                f"{self.embedding_weight_decay}: weight decay is not supported with sparse "
                "gradients (like torch.optim.SparseAdam, the sparse step touches only the batch's "
                "rows); set optim.embedding_weight_decay=0 (and compression.embedding_weight_decay "
                "null or 0), or optim.sparse=false."
            )
        if self.name == "sgd" and self.momentum > 0:
            raise ConfigError(
                f"optim.sparse=true with optim.momentum={self.momentum}: momentum moves every row "
                "every step; set optim.momentum=0 or optim.sparse=false."
            )


# Lightning's precision values (``lightning.fabric.connector._PRECISION_INPUT``).
PRECISIONS = (
    *("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"),
    *("transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64"),
)
ACCELERATORS = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
STRATEGIES = ("auto", *StrategyRegistry.available_strategies())


def _check_devices(devices: Any) -> None:
    """``trainer.devices``: auto, -1 (all), a count >= 1, a list of device indices or "0,1"."""
    ok = False
    if isinstance(devices, str):
        ok = devices == "auto" or bool(re.fullmatch(r"-1|[1-9][0-9]*|[0-9]+(,[0-9]+)*,?", devices))
    elif isinstance(devices, int) and not isinstance(devices, bool):
        ok = devices == -1 or devices >= 1
    elif isinstance(devices, list | tuple):
        ok = bool(devices) and all(isinstance(d, int) and d >= 0 for d in devices)
        ok = ok and len(set(devices)) == len(devices)
    if not ok:
        raise ConfigError(
            f"trainer.devices={devices!r} is not a device count or list: use auto, -1 (all), a "
            "count >= 1 (e.g. 1) or device indices (e.g. [0,1])."
        )


@dataclass
class TrainerConfig:
    """Training-loop settings: the Lightning Trainer's and the batch size."""

    max_epochs: int = 40
    batch_size: int = 4096
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    early_stopping_patience: int | None = 5
    check_val_every_n_epoch: int = 1
    limit_train_batches: float = 1.0
    progress_bar: bool = True
    progress_refresh_rate: int = 20
    deterministic: bool = False
    gradient_clip_val: float | None = None
    # Debugging (conf/debug/): fast_dev_run: n train / val / test batches, no checkpoints or logs;
    # overfit_batches: train and validate on the same few batches (a fraction or a count);
    # profiler: simple | advanced, its report written into the run dir.
    fast_dev_run: int = 0
    overfit_batches: float = 0.0
    profiler: str | None = None
    # Crash safety: checkpoints/last.ckpt is also written every this many optimizer steps (a
    # killed run loses at most these; null: only at epoch ends). resume=<run dir> continues there.
    checkpoint_every_n_steps: int | None = 200
    # ... but writing last.ckpt takes at most this share of the wall time: after a write of s
    # seconds the next rolling one waits s * (1 / share - 1) seconds (tables of millions of
    # rows write GBs; a small model's milliseconds change nothing). null: every n steps.
    checkpoint_max_overhead: float | None = 0.05
    # Optimizer steps (batches of batch_size) per Lightning training step: Lightning's per-step
    # work (~0.5 ms on CPU) is paid once per this many batches. 1 under fast_dev_run and
    # overfit_batches, which count Lightning steps.
    batches_per_call: int = 16

    def __post_init__(self) -> None:
        _at_least("trainer.max_epochs", self.max_epochs, 1)
        _at_least(
            "trainer.batches_per_call",
            self.batches_per_call,
            1,
            "optimizer steps per Lightning training step",
        )
        if self.checkpoint_every_n_steps is not None:
            _at_least(
                "trainer.checkpoint_every_n_steps",
                self.checkpoint_every_n_steps,
                1,
                "optimizer steps between rolling checkpoints (null: only at epoch ends)",
            )
        if self.checkpoint_max_overhead is not None and not 0 < self.checkpoint_max_overhead <= 1:
            raise ConfigError(
                f"trainer.checkpoint_max_overhead={self.checkpoint_max_overhead} must be in "
                "(0, 1]: the most of the wall time that writing the rolling checkpoint may take "
                "(e.g. 0.05), or null to write it every trainer.checkpoint_every_n_steps steps."
            )
        _at_least("trainer.fast_dev_run", self.fast_dev_run, 0)
        if self.overfit_batches > 1 and not float(self.overfit_batches).is_integer():
            raise ConfigError(
                f"trainer.overfit_batches={self.overfit_batches} must be a fraction in [0, 1] "
                "or a whole number of batches."
            )
        _at_least("trainer.overfit_batches", self.overfit_batches, 0.0)
        if self.profiler is not None:
            _one_of("trainer.profiler", self.profiler, ("simple", "advanced"))
        _at_least("trainer.batch_size", self.batch_size, 1)
        if self.early_stopping_patience is not None:
            _at_least("trainer.early_stopping_patience", self.early_stopping_patience, 1)
        _at_least("trainer.check_val_every_n_epoch", self.check_val_every_n_epoch, 1)
        _at_least("trainer.progress_refresh_rate", self.progress_refresh_rate, 1)
        limit = self.limit_train_batches
        if not 0 < limit <= 1 and not float(limit).is_integer():
            raise ConfigError(
                f"trainer.limit_train_batches={self.limit_train_batches} must be a fraction in "
                "(0, 1] or a whole number of batches."
            )
        _at_least("trainer.limit_train_batches", self.limit_train_batches, 1e-9)
        if self.gradient_clip_val is not None:
            _at_least("trainer.gradient_clip_val", self.gradient_clip_val, 0.0)
        _one_of("trainer.precision", str(self.precision), PRECISIONS)
        _one_of("trainer.accelerator", self.accelerator, ACCELERATORS)
        _one_of("trainer.strategy", self.strategy, STRATEGIES)
        _check_devices(self.devices)


@dataclass
class LoggerConfig:
    """Experiment logger: ``csv`` (metrics.csv in the run dir), ``wandb`` (metrics.csv and a W&B
    run in ``<run dir>/wandb``) or ``none``. The other keys apply to ``wandb`` only.

    ``mode``: ``auto`` is online when a W&B API key is configured, else offline; ``group``: null
    groups a multirun's jobs by sweep; ``run_name``: null names a run by its Hydra overrides.
    """

    name: str = "csv"
    mode: str = "auto"
    project: str = "recsys-compress"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of("logger.name", self.name, ("csv", "wandb", "none"))
        _one_of("logger.mode", self.mode, ("auto", "offline", "online"))
        bad = sorted(set("/\\#?%:") & set(self.project))
        if not self.project or len(self.project) > 128 or bad:
            raise ConfigError(
                f"logger.project={self.project!r} is not a W&B project name: use 1-128 "
                "characters without / \\ # ? % :, e.g. logger.project=recsys-compress."
            )
        for key in ("entity", "group", "run_name"):
            value = getattr(self, key)
            if value is not None and not 0 < len(value) <= 128:
                raise ConfigError(
                    f"logger.{key}={value!r} must be 1-128 characters, or null for the default."
                )
        for tag in self.tags:
            if not 0 < len(tag) <= 64:
                raise ConfigError(
                    f"logger.tags has {tag!r}: W&B tags are 1-64 characters; shorten or drop it."
                )


@dataclass
class CompressionConfig:
    """The compression methods of a run (``compression=prune``, ``compression=[prune,l1]``, ...).

    Methods run in one fixed order, prune -> l1 -> svd -> qat; a method left out is None.
    Pairs that would undo each other are refused here, before any data is read; prune / l1 with
    svd compose only on disjoint targets, which needs the model: the SVD callback checks it in
    ``setup``, before training (``lowrank.check_disjoint_from_sparsity``).
    ``dense_epochs > 0``: train the dense model for that many epochs and evaluate it first, then
    compress while fine-tuning for ``trainer.max_epochs`` (before / after in one results.json).
    ``embedding_weight_decay``: the L2 on embedding tables while compressing (None: optim's).
    ``lr``: the learning rate while compressing (None: ``optim.lr``); fine-tuning a trained model
    often wants a smaller one than training it from scratch.
    """

    prune: PruneConfig | None = None
    l1: L1Config | None = None
    svd: SVDConfig | None = None
    qat: QATConfig | None = None
    dense_epochs: int = 0
    embedding_weight_decay: float | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"compression.lr={self.lr} must be > 0 (or null: optim.lr).")
        if self.dense_epochs < 0:
            raise ConfigError(f"compression.dense_epochs={self.dense_epochs} must be >= 0.")
        if self.embedding_weight_decay is not None:
            _at_least("compression.embedding_weight_decay", self.embedding_weight_decay, 0.0)
        if (
            self.svd is not None
            and self.qat is not None
            and self.svd.at_epoch > self.qat.start_epoch
        ):
            raise ConfigError(
                f"compression.svd.at_epoch={self.svd.at_epoch} is after "
                f"compression.qat.start_epoch={self.qat.start_epoch}: SVD cannot follow "
                "quantization (the order is prune -> l1 -> svd -> qat); start QAT later."
            )
        if self.qat is not None and not self.qat.symmetric and (self.prune or self.l1):
            raise ConfigError(
                "compression.qat.symmetric=false with pruning / L1: asymmetric offsets turn the "
                "zeros into non-zero values; use compression.qat.symmetric=true."
            )
        if self.qat is not None and self.qat.post_training:
            others = [m for m in self.methods() if m != "qat"]
            if others:
                raise ConfigError(
                    f"compression.qat.post_training=true quantises a trained model without "
                    f"training, but {others} train: use compression=qat alone for the PTQ "
                    "baseline, or compression.qat.post_training=false."
                )
            if self.dense_epochs == 0:
                raise ConfigError(
                    "compression.qat.post_training=true needs a trained model to quantise: set "
                    "compression.dense_epochs > 0 (e.g. 30)."
                )

    def methods(self) -> list[str]:
        names = ("prune", "l1", "svd", "qat")
        return [name for name in names if getattr(self, name) is not None]


@dataclass
class TrainConfig:
    """One run: every group of ``conf/train.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    seed: int = 42
    save_model: bool = True
    # A run (or sweep job) whose output dir already holds a completed results.json of the same
    # config returns its recorded metric without training: rerunning a sweep on its old
    # hydra.sweep.dir redoes only the failed or missing jobs.
    skip_completed: bool = False
    overwrite: bool = False
    # Continue a killed run from its last checkpoint: the run dir it printed ("Run dir: ...").
    # The run keeps its own config (run_config.json); overrides may only repeat it.
    resume: str | None = None
    # What main() returns to a sweeper: [] the monitored val metric; one entry a float; several a
    # list (multi-objective). Each is a val metric (ndcg@10) or a dotted results.json path
    # (compression.artifact_bytes, test.hr@10).
    optimized_metrics: list[str] = field(default_factory=list)
    # Budget mode (hparams_search=budget): the compressed artifact must fit in budget_bytes, or
    # in budget_ratio x the dense fp32 model's bytes; a config that cannot is not trained, and
    # a sweep scores a run over budget below any NDCG (recsys_compress/reporting/budget.py).
    budget_bytes: int | None = None
    budget_ratio: float | None = None

    def __post_init__(self) -> None:
        _at_least("seed", self.seed, 0)
        if self.budget_bytes is not None and self.budget_ratio is not None:
            raise ConfigError(
                "budget_bytes and budget_ratio are both set: give one (bytes of the artifact, or "
                "a fraction of the dense fp32 model), set the other to null."
            )
        if self.budget_bytes is not None:
            _at_least("budget_bytes", self.budget_bytes, 1, "the artifact's size limit in bytes")
        if self.budget_ratio is not None and not 0 < self.budget_ratio <= 1:
            raise ConfigError(
                f"budget_ratio={self.budget_ratio} must lie in (0, 1]: the fraction of the dense "
                "fp32 model's bytes the artifact may take, e.g. 0.1."
            )
        budgeted = self.budget_bytes is not None or self.budget_ratio is not None
        if budgeted and len(self.optimized_metrics) > 1:
            raise ConfigError(
                f"a budget (budget_bytes / budget_ratio) makes size a constraint, not an "
                f"objective: optimized_metrics={list(self.optimized_metrics)} must name one "
                "metric, e.g. [ndcg@10] (a size / quality front: hparams_search=compress_pareto)."
            )
        if budgeted and not self.compression.methods():
            raise ConfigError(
                "a budget needs a compression method to fit it: set compression= (e.g. "
                "[prune,qat]) or drop budget_bytes / budget_ratio."
            )
        if any(not name.strip() for name in self.optimized_metrics) or len(
            set(self.optimized_metrics)
        ) != len(self.optimized_metrics):
            raise ConfigError(
                f"optimized_metrics={list(self.optimized_metrics)} must be distinct, non-empty "
                "names, e.g. [ndcg@10] or [compression.artifact_bytes,ndcg@10]."
            )
        if self.loss.name == "mse" and self.data.feedback != "explicit":
            raise ConfigError(
                "loss=mse fits ratings, but data.feedback=implicit: set data.feedback=explicit "
                "(or use loss=bce / loss=bpr for implicit feedback)."
            )
        if self.data.feedback == "explicit" and self.loss.name != "mse":
            raise ConfigError(
                f"data.feedback=explicit keeps ratings as targets, but loss={self.loss.name} "
                "trains on implicit feedback: use loss=mse, or data.feedback=implicit."
            )
        if self.data.feedback == "explicit" and self.data.source == "synthetic":
            raise ConfigError("data=synthetic has no ratings: use data.feedback=implicit.")
        precision = str(self.trainer.precision)
        true_precisions = ("16-true", "bf16-true", "64-true", "64")
        if self.compression.qat is not None and precision in true_precisions:
            raise ConfigError(
                f"trainer.precision={precision} with compression qat: fake quantisation keeps "
                "float32 weights (its tables and scales are float32), and a run would fail at "
                "its first evaluation. Use trainer.precision=bf16-mixed or 16-mixed (float32 "
                "weights, half-precision compute), or 32-true."
            )
        if self.optim.name == "rowwise_adagrad" and precision in ("16-true", "bf16-true"):
            raise ConfigError(
                f"trainer.precision={precision} with optim.name=rowwise_adagrad: its per-row "
                "sums of squared gradients would be kept in half precision, where they stall "
                "(bf16) or underflow to a zero step divisor (float16). Use "
                "trainer.precision=bf16-mixed or 16-mixed (float32 weights and state), or 32-true."
            )


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """Validate a composed Hydra config into a :class:`TrainConfig`.

    Raises :class:`ConfigError` naming the offending key for unknown keys, wrong types and values
    out of range.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        message = str(err).splitlines()[0]
        raise ConfigError(
            f"invalid config at '{key}': {message}. Check the value you gave for {key} "
            "(see `python -m recsys_compress.train --cfg job` for the composed config)."
        ) from None


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain-dict form of a validated config (for results.json and cache keys)."""
    return asdict(cfg)
