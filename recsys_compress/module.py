"""The one LightningModule: any :class:`Recommender` with a loss, an optimizer and evaluation."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultMetric
from torch import nn

from recsys_compress import ops
from recsys_compress.config import EvalConfig, LossConfig, OptimConfig
from recsys_compress.errors import RecsysCompressError
from recsys_compress.metrics import FullRankingMetrics, RatingMetrics, SampledRankingMetrics
from recsys_compress.models.base import Recommender, takes_out
from recsys_compress.optim import RowSparseAdam, RowWiseAdagrad, optimizer_step, plain_steps

log = logging.getLogger(__name__)


def _on_device(value: Any, device: torch.device) -> bool:
    """Whether ``value`` (an attribute of a logged result) holds no tensor off ``device``,
    looking one container deep (the state's defaults and cache are dicts of tensors)."""
    if isinstance(value, torch.Tensor):
        return value.device == device
    if type(value) in (dict, OrderedDict):
        value = value.values()
    elif type(value) not in (list, tuple):
        return True
    return all(not isinstance(v, torch.Tensor) or v.device == device for v in value)


_move_result = _ResultMetric.to


def _result_to(self: _ResultMetric, *args: Any, **kwargs: Any) -> _ResultMetric:
    """Lightning's ``_ResultMetric.to`` without the walk when nothing needs to move.

    ``LightningModule.log`` calls it on every call with the value's device; Lightning 2.6
    rebuilds the result's whole ``__dict__`` with ``apply_to_collection`` each time, deep copies
    of its metadata included: ~70% of a ``self.log`` call under cProfile, ~0.25 ms in a timing
    loop (``make train`` logs 1,642 times: 0.76 s in all before, 0.29 s after; timing scripts
    outside the repo). When every tensor is on the device already, there is nothing to move and
    the result is returned as it is; anything else (a tensor elsewhere, a logged metric object,
    other arguments) takes Lightning's path. Installed for the Lightning version it was checked
    against only (pinned in pyproject.toml; a test fails when the pin moves without it)."""
    if self.is_tensor and len(args) == 1 and not kwargs and isinstance(args[0], torch.device):
        device = args[0]
        if all(_on_device(v, device) for v in self.__dict__.values()):
            return self
    return _move_result(self, *args, **kwargs)


if L.__version__ == "2.6.6":
    _ResultMetric.to = _result_to  # type: ignore[method-assign]


def recommendation_loss(
    model: Recommender, batch: dict[str, torch.Tensor], loss: str
) -> torch.Tensor:
    """BCE on (user, item, label) points, BPR on (user, pos, neg) triples, MSE on ratings."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(
            model(batch["users"], batch["items"]), batch["labels"]
        )
    if loss == "bpr":
        diff = model.score_difference(batch["users"], batch["pos_items"], batch["neg_items"])
        return -F.logsigmoid(diff).mean()
    return F.mse_loss(model(batch["users"], batch["items"]), batch["ratings"])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``: embedding tables in their own parameter group
    (``optim.embedding_weight_decay``), the rest with ``optim.weight_decay``.

    ``optim.sparse`` also switches every ``nn.Embedding`` (SVD factors and fake-quant tables
    included: they are built before the optimizer) to sparse gradients of the rows a batch reads.
    ``optim.fused`` (default) takes torch's fused implementation: one kernel per parameter
    instead of ~10 elementwise passes, ~5x faster for Adam on small tables on CPU; the results
    differ from the for-loop implementation only by float rounding (~1e-7 per step).
    """
    # Embedding-like modules (nn.Embedding and factorised tables, whose factors are child
    # modules) have ``num_embeddings``; all their parameters get the embedding L2.
    embedding_params = list(
        {
            id(p): p
            for m in model.modules()
            if hasattr(m, "num_embeddings")
            for p in m.parameters()
        }.values()
    )
    embedding_ids = {id(p) for p in embedding_params}
    other_params = [p for p in model.parameters() if id(p) not in embedding_ids]
    groups = [
        {"params": embedding_params, "weight_decay": cfg.embedding_weight_decay},
        {"params": other_params, "weight_decay": cfg.weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = cfg.sparse
    if cfg.name == "adam" and cfg.sparse:
        return RowSparseAdam(groups, lr=cfg.lr, fused=cfg.fused)
    if cfg.name == "rowwise_adagrad":
        return RowWiseAdagrad(groups, lr=cfg.lr)
    # torch's fused kernels take dense gradients only.
    fused = {"fused": True} if cfg.fused and not cfg.sparse else {}
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **fused)


def epoch_summary(trainer: L.Trainer, loss_sum: torch.Tensor, count: int) -> str:
    """One line per epoch for the console and train.log (the progress bar does not keep one):
    ``epoch 3/20: train/loss 0.2134, val/hr@10 0.6543, val/ndcg@10 0.3150`` (this process's
    loss; validation metrics of the epoch if it validated)."""
    parts = [f"train/loss {float(loss_sum) / count:.4f}"] if count else []
    val = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    parts += [f"{k} {float(v):.4f}" for k, v in sorted(val.items())]
    return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: " + ", ".join(parts)


class TrainingDivergedError(RecsysCompressError):
    """The loss or the weights became NaN / inf. Raised before the bad weights reach a checkpoint,
    so ``checkpoints/last.ckpt`` keeps the last good state."""


class RecommenderModule(L.LightningModule):
    """Trains ``model`` and evaluates it on validation / test batches of the data module.

    Logs ``train/loss`` per epoch and ``val/<metric>`` / ``test/<metric>`` (e.g. ``val/ndcg@10``).

    One Lightning training step runs several optimizer steps: the data module yields a list of
    ``trainer.batches_per_call`` batches and each gets its own forward, backward and
    ``optimizer.step()`` (``trainer.global_step`` counts optimizer steps). Lightning's own work
    per step (hooks, progress, loop bookkeeping: ~0.5 ms on CPU) is then paid once per list, not
    once per batch. Callbacks that must act around every optimizer step (pruning masks, the L1
    proximal step) implement ``on_optimizer_step_start`` / ``on_optimizer_step_end(trainer,
    pl_module, batch)``; Lightning's ``on_before_optimizer_step`` still runs for every step.
    A NaN / inf loss (or weights) stops training with :class:`TrainingDivergedError`: on CPU at
    that step; on an accelerator (no host sync per step) at the epoch end or the next checkpoint,
    naming the first bad step, and always before a checkpoint would store non-finite weights.
    """

    def __init__(
        self,
        model: Recommender,
        loss: LossConfig,
        optim: OptimConfig,
        evaluation: EvalConfig,
        explicit: bool = False,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        # Manual optimization: a training batch from the data module is a list of batches, one
        # optimizer step each (see the class doc).
        self.automatic_optimization = False
        self.model = model
        self.loss_cfg, self.optim_cfg, self.eval_cfg = loss, optim, evaluation
        self.explicit = explicit
        self.gradient_clip_val = gradient_clip_val
        self._step_start: list[Any] = []  # callbacks with on_optimizer_step_start / _end
        self._step_end: list[Any] = []
        self._before_step: list[Any] = []  # callbacks overriding on_before_optimizer_step
        self._plain_steps = False  # see on_train_start
        self._kept_gradients: list[torch.Tensor] = []  # see on_optimizers_rebuilt
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self._loss_sum = torch.zeros(())
        self._loss_count = 0
        self._bad_step: torch.Tensor | None = None  # first non-finite loss's step (accelerators)
        self._scores_buffer: torch.Tensor | None = None  # see _score_all

    def _make_metrics(self) -> nn.ModuleDict:
        metrics: dict[str, nn.Module] = {}
        if self.eval_cfg.protocol == "full":
            metrics["ranking"] = FullRankingMetrics(self.eval_cfg.ks, self.eval_cfg.metrics)
        else:
            metrics["ranking"] = SampledRankingMetrics(self.eval_cfg.ks)
        if self.explicit:
            metrics["rating"] = RatingMetrics()
        return nn.ModuleDict(metrics)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.model(users, items)

    def on_train_start(self) -> None:
        callbacks = self.trainer.callbacks
        self._step_start = [cb for cb in callbacks if hasattr(cb, "on_optimizer_step_start")]
        self._step_end = [cb for cb in callbacks if hasattr(cb, "on_optimizer_step_end")]
        base = L.Callback.on_before_optimizer_step
        self._before_step = [
            cb for cb in callbacks if type(cb).on_before_optimizer_step is not base
        ]
        self._plain_steps = plain_steps(self.trainer)
        self.on_optimizers_rebuilt(self.trainer)

    def on_optimizers_rebuilt(self, trainer: L.Trainer) -> None:
        """The tables whose gradients are kept (at the start, and again after SVD replaced
        modules and rebuilt the optimizer: its new tables are kept, the replaced ones let go).

        On the plain path, tables read with gather_rows keep their dense gradient between steps
        and clear only the rows a batch wrote (ops.keep_gradient): a table much larger than a
        batch (1M users) then costs no fresh table-sized gradient per step. Gradient clipping
        scales the whole gradient, so it keeps the fresh-gradient path."""
        tables = []
        if self._plain_steps and self.device.type == "cpu" and not self.gradient_clip_val:
            # Every dense table: fake-quant tables share their Parameter with the table they
            # replace and read it with gather_rows too; a table read any other way is never
            # added into in place, and zero_grad drops its gradient as usual.
            tables = [
                m.weight
                for m in self.model.modules()
                if isinstance(m, nn.Embedding) and not m.sparse and m.weight.requires_grad
            ]
        ids = {id(table) for table in tables}
        for table in self._kept_gradients:
            if id(table) not in ids:
                ops.keep_gradient(table, on=False)
        for table in tables:
            ops.keep_gradient(table)  # a table kept already stays as it is
        self._kept_gradients = tables

    def on_train_end(self) -> None:
        for table in self._kept_gradients:
            ops.keep_gradient(table, on=False)
        self._kept_gradients = []

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0

    def training_step(self, batch: list[dict[str, torch.Tensor]], batch_idx: int) -> None:
        batches = batch if isinstance(batch, list) else [batch]
        optimizer = self.optimizers()
        trainer = self.trainer
        for sub in batches:
            for cb in self._step_start:
                cb.on_optimizer_step_start(trainer, self, sub)
            loss = recommendation_loss(self.model, sub, self.loss_cfg.name)
            # Summed here and logged once per epoch: ``self.log`` every step costs ~1 ms on
            # CPU, a large share of a ~2 ms MF step; ``detach`` keeps this free of host syncs.
            detached = loss.detach()
            if self._loss_sum.device != detached.device:  # resumed mid-epoch from a CPU ckpt
                self._loss_sum = self._loss_sum.to(detached.device)
            size = len(sub["users"])
            self._loss_sum += detached * size
            self._loss_count += size
            self._check_loss(detached)
            if self._plain_steps:
                self._plain_step(optimizer, loss)
            else:
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if self.gradient_clip_val:
                    self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val)
                optimizer.step()
            for cb in self._step_end:
                cb.on_optimizer_step_end(trainer, self, sub)
        # The loggers' step (metrics.csv, W&B) counts optimizer steps, as with one per call.
        trainer.fit_loop.epoch_loop._batches_that_stepped += len(batches) - 1

    def _plain_step(self, optimizer: Any, loss: torch.Tensor) -> None:
        """``LightningOptimizer.step`` without its wrappers: the same hooks and step count."""
        raw = optimizer.optimizer
        ops.zero_grad(raw)  # zero_grad(set_to_none=True), kept gradients cleared in place
        loss.backward()
        if self.gradient_clip_val:
            # The optimizer's parameter order, as Lightning's clip_gradients (same sums).
            params = [p for group in raw.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
        optimizer._on_before_step()  # Lightning's optimizer-step progress (global_step)
        for cb in self._before_step:
            cb.on_before_optimizer_step(self.trainer, self, raw)
        optimizer_step(raw)  # without torch's profiling wrapper when it has nothing to do
        optimizer._on_after_step()

    def _check_loss(self, loss: torch.Tensor) -> None:
        step = self.trainer.global_step
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                self._diverged(f"the loss became {float(loss)}", step)
            return
        bad = ~torch.isfinite(loss)
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, step), self._bad_step)

    def _check_finite(self) -> None:
        """Raise if a loss since the last check (accelerators) or any weight is NaN / inf."""
        if self._bad_step is not None and (step := int(self._bad_step)) >= 0:
            self._diverged("the loss became NaN or inf", step)
        # The min and max of each weight are finite iff all its values are (min/max propagate
        # NaN): one read-only pass, ~25x faster than isfinite(p).all() and its bool temporary on
        # a 1M x 64 table (13 vs 316 ms on this CPU).
        params = [p for p in self.model.parameters() if p.is_floating_point() and p.numel()]
        if params:
            bounds = torch.stack([b for p in params for b in torch.aminmax(p.detach())])
            if not bool(torch.isfinite(bounds).all()):
                self._diverged("the weights became NaN or inf", self.trainer.global_step)

    def _diverged(self, what: str, step: int) -> None:
        lr = self.optim_cfg.lr
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "")
        kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint was written"
        raise TrainingDivergedError(
            f"training diverged: {what} at epoch {self.trainer.current_epoch}, step {step}; "
            f"{kept}. Start a new run with a lower learning rate (optim.lr={lr:g}, e.g. "
            f"optim.lr={lr / 10:g}) or with gradient clipping (e.g. trainer.gradient_clip_val=1.0)."
        )

    def on_train_epoch_end(self) -> None:
        for table in self._kept_gradients:  # no table-sized gradient held during evaluation
            table.grad = None
        self._check_finite()
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # manual optimization: epoch-interval schedules step here
            scheduler.step()
        if self._loss_count:
            self.log("train/loss", self._loss_sum / self._loss_count, sync_dist=True)
        if self.trainer.is_global_zero:
            log.info(epoch_summary(self.trainer, self._loss_sum, self._loss_count))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Never write NaN / inf weights over the last good checkpoint.
        self._check_finite()
        # The epoch's running loss, for a run resumed mid-epoch to log the same train/loss.
        checkpoint["train_loss_partial"] = [self._loss_sum.detach().cpu(), self._loss_count]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "train_loss_partial" in checkpoint:
            self._loss_sum, self._loss_count = checkpoint["train_loss_partial"]

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: nn.ModuleDict) -> None:
        if "candidates" in batch:
            # the data module stores candidates as int32 where the items fit
            scores = self.model.score_candidates(batch["users"], batch["candidates"].long())
            metrics["ranking"].update(scores[:, 0], scores[:, 1:])
            if "rating" in metrics:
                metrics["rating"].update(scores[:, 0], batch["ratings"])
            return
        scores = self._score_all(batch["users"]).float()
        scores[batch["exclude_rows"], batch["exclude_items"]] = float("-inf")
        metrics["ranking"].update(scores, (batch["target_rows"], batch["target_items"]))
        if "rating" in metrics:
            preds = self.model(batch["rating_users"], batch["rating_items"])
            metrics["rating"].update(preds, batch["ratings"])

    def _score_all(self, users: torch.Tensor) -> torch.Tensor:
        """``model.score_all(users)``, on CPU into one buffer kept for the evaluation's batches
        (released at its end). A fresh ``[batch_users, num_items]`` matrix larger than glibc's
        largest mmap threshold (32 MB) is mapped anew and page-faulted every batch: at 1,024
        users x 100k items, 100k faults and ~90 ms of a ~270 ms MF batch (score and top-k,
        timing loop). CUDA's caching allocator reuses its memory already. Models whose
        ``score_all`` takes no ``out`` (custom ones written before it) are called as before."""
        model = self.model
        if users.device.type != "cpu" or torch.is_grad_enabled() or not takes_out(model):
            return model.score_all(users)
        need = len(users) * model.num_items
        buffer = self._scores_buffer
        # an inference tensor (made under torch.inference_mode) cannot be written outside it
        stale = (
            buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
        )
        if buffer is None or buffer.numel() < need or stale:
            buffer = self._scores_buffer = torch.empty(need, device=users.device)
        return model.score_all(users, out=buffer)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _log_metrics(self, prefix: str, metrics: nn.ModuleDict) -> None:
        values: dict[str, torch.Tensor] = {}
        for metric in metrics.values():
            values.update({f"{prefix}/{k}": v for k, v in metric.compute().items()})
            metric.reset()
        self.log_dict(values)

    def on_validation_epoch_end(self) -> None:
        self._scores_buffer = None
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._scores_buffer = None
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        optimizer = build_optimizer(self.model, cfg)
        if cfg.scheduler == "none":
            return optimizer
        if cfg.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
        elif cfg.scheduler == "exponential":
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, cfg.gamma)
        else:
            max_epochs = self.trainer.max_epochs if self._trainer is not None else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}
