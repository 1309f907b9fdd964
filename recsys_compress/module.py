"""The one LightningModule: any :class:`Recommender` with a loss, an optimizer and evaluation."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from recsys_compress.config import EvalConfig, LossConfig, OptimConfig
from recsys_compress.errors import RecsysCompressError
from recsys_compress.metrics import FullRankingMetrics, RatingMetrics, SampledRankingMetrics
from recsys_compress.models.base import Recommender


def recommendation_loss(
    model: Recommender, batch: dict[str, torch.Tensor], loss: str
) -> torch.Tensor:
    """BCE on (user, item, label) points, BPR on (user, pos, neg) triples, MSE on ratings."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(
            model(batch["users"], batch["items"]), batch["labels"]
        )
    if loss == "bpr":
        pos = model(batch["users"], batch["pos_items"])
        neg = model(batch["users"], batch["neg_items"])
        return -F.logsigmoid(pos - neg).mean()
    return F.mse_loss(model(batch["users"], batch["items"]), batch["ratings"])


class TrainingDivergedError(RecsysCompressError):
    """The loss or the weights became NaN / inf. Raised before the bad weights reach a checkpoint,
    so ``checkpoints/last.ckpt`` keeps the last good state."""


class RecommenderModule(L.LightningModule):
    """Trains ``model`` and evaluates it on validation / test batches of the data module.

    Logs ``train/loss`` per epoch and ``val/<metric>`` / ``test/<metric>`` (e.g. ``val/ndcg@10``).
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
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_cfg, self.optim_cfg, self.eval_cfg = loss, optim, evaluation
        self.explicit = explicit
        self.val_metrics = self._make_metrics()
        self.test_metrics = self._make_metrics()
        self._loss_sum = torch.zeros(())
        self._loss_count = 0
        self._bad_step: torch.Tensor | None = None  # first non-finite loss's step (accelerators)

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

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = recommendation_loss(self.model, batch, self.loss_cfg.name)
        # Summed here and logged once per epoch: ``self.log`` every step costs ~1 ms on CPU,
        # a large share of a ~4 ms MF step; ``detach`` keeps this free of host syncs.
        detached = loss.detach()
        size = len(batch["users"])
        if self._loss_sum.device != detached.device:  # resumed mid-epoch from a CPU checkpoint
            self._loss_sum = self._loss_sum.to(detached.device)
        self._loss_sum += detached * size
        self._loss_count += size
        self._check_loss(detached)
        return loss

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
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
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
        self._check_finite()
        if self._loss_count:
            self.log("train/loss", self._loss_sum / self._loss_count, sync_dist=True)

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
            scores = self.model.score_candidates(batch["users"], batch["candidates"])
            metrics["ranking"].update(scores[:, 0], scores[:, 1:])
            if "rating" in metrics:
                metrics["rating"].update(scores[:, 0], batch["ratings"])
            return
        scores = self.model.score_all(batch["users"]).float()
        scores[batch["exclude_rows"], batch["exclude_items"]] = float("-inf")
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        relevant[batch["target_rows"], batch["target_items"]] = True
        metrics["ranking"].update(
            scores, relevant, relevant_index=(batch["target_rows"], batch["target_items"])
        )
        if "rating" in metrics:
            preds = self.model(batch["rating_users"], batch["rating_items"])
            metrics["rating"].update(preds, batch["ratings"])

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
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        # Embedding-like modules (nn.Embedding and factorised tables, whose factors are child
        # modules) have ``num_embeddings``; all their parameters get the embedding L2.
        embedding_params = list(
            {
                id(p): p
                for m in self.model.modules()
                if hasattr(m, "num_embeddings")
                for p in m.parameters()
            }.values()
        )
        embedding_ids = {id(p) for p in embedding_params}
        other_params = [p for p in self.model.parameters() if id(p) not in embedding_ids]
        groups = [
            {"params": embedding_params, "weight_decay": cfg.embedding_weight_decay},
            {"params": other_params, "weight_decay": cfg.weight_decay},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.name == "adam":
            optimizer = torch.optim.Adam(groups, lr=cfg.lr)
        elif cfg.name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        elif cfg.name == "adagrad":
            optimizer = torch.optim.Adagrad(groups, lr=cfg.lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
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
