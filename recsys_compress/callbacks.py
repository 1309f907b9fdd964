"""Lightning callbacks of the training run: timing, and checkpointing aware of compression."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint


class EpochTimer(L.Callback):
    """Wall-clock seconds of each training epoch (validation excluded) and of each eval loop."""

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.val_seconds: list[float] = []
        self.test_seconds: list[float] = []
        self._train_start: float | None = None
        self._eval_start = 0.0

    def _close_train_epoch(self) -> None:
        if self._train_start is not None:
            self.train_seconds.append(time.perf_counter() - self._train_start)
            self._train_start = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start = time.perf_counter()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_train_epoch()
        self._eval_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_seconds.append(time.perf_counter() - self._eval_start)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_train_epoch()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.perf_counter()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_seconds.append(time.perf_counter() - self._eval_start)


def _compression_done(trainer: L.Trainer) -> bool:
    """True once every compression callback has reached its final state (or there is none)."""
    return all(
        cb.compression_done(trainer) for cb in trainer.callbacks if hasattr(cb, "compression_done")
    )


class CompressedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that ranks only checkpoints of the finally compressed model.

    Otherwise the "best" checkpoint of a gradually pruned run is an early, still dense one, and
    the run would report a dense model's metrics. ``last.ckpt`` is still written every epoch.
    """

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if _compression_done(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)


class CompressedEarlyStopping(EarlyStopping):
    """EarlyStopping that starts counting only once compression has reached its final state."""

    def _should_skip_check(self, trainer: L.Trainer) -> bool:
        return super()._should_skip_check(trainer) or not _compression_done(trainer)
