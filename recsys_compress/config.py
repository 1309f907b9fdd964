"""Typed schema of the Hydra config.

Hydra composes plain YAML from ``conf/``; :func:`to_train_config` merges it into these dataclasses,
so an unknown key, a value of the wrong type or a value out of range fails before any data is read,
with a :class:`~recsys_compress.errors.ConfigError` that names the key and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad")
SCHEDULERS = ("none", "step", "cosine", "exponential")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}: set {key} to one.")


def _at_least(key: str, value: float, low: float, hint: str = "") -> None:
    if value < low:
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
    """Optimizer and LR schedule. ``embedding_weight_decay`` applies to embedding tables only."""

    name: str = "adam"
    lr: float = 0.002
    weight_decay: float = 0.0
    embedding_weight_decay: float = 1e-5
    momentum: float = 0.0
    scheduler: str = "none"
    step_size: int = 10
    gamma: float = 0.5

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, OPTIMIZERS)
        _one_of("optim.scheduler", self.scheduler, SCHEDULERS)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0.")
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _at_least("optim.embedding_weight_decay", self.embedding_weight_decay, 0.0)
        _at_least("optim.momentum", self.momentum, 0.0)
        _at_least("optim.step_size", self.step_size, 1)
        _in_range("optim.gamma", self.gamma, 0.0, 1.0)


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

    def __post_init__(self) -> None:
        _at_least("trainer.max_epochs", self.max_epochs, 1)
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


@dataclass
class LoggerConfig:
    """Experiment logger: ``csv`` (metrics.csv in the run dir) or ``none``."""

    name: str = "csv"

    def __post_init__(self) -> None:
        _one_of("logger.name", self.name, ("csv", "none"))


@dataclass
class CompressionConfig:
    """The compression methods of a run (``compression=prune``, ``compression=[prune,l1]``, ...).

    Methods run in one fixed order, prune -> l1 -> svd -> qat; a method left out is None.
    Pairs that would undo each other are refused here, before any data is read.
    ``dense_epochs > 0``: train the dense model for that many epochs and evaluate it first, then
    compress while fine-tuning for ``trainer.max_epochs`` (before / after in one results.json).
    ``embedding_weight_decay``: the L2 on embedding tables while compressing (None: optim's).
    """

    prune: PruneConfig | None = None
    l1: L1Config | None = None
    svd: SVDConfig | None = None
    qat: QATConfig | None = None
    dense_epochs: int = 0
    embedding_weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.dense_epochs < 0:
            raise ConfigError(f"compression.dense_epochs={self.dense_epochs} must be >= 0.")
        if self.embedding_weight_decay is not None and self.embedding_weight_decay < 0:
            raise ConfigError(
                f"compression.embedding_weight_decay={self.embedding_weight_decay} must be >= 0."
            )
        if self.svd is not None and (self.prune is not None or self.l1 is not None):
            raise ConfigError(
                "compression=[prune|l1, svd]: SVD would replace the sparse weights by dense "
                "factors and silently undo the sparsity. Use one of them, or prune + qat."
            )
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

    def __post_init__(self) -> None:
        _at_least("seed", self.seed, 0)
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
