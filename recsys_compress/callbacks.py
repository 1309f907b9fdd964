"""Small Lightning callbacks the training run uses for its results record."""

from __future__ import annotations

import time

import lightning as L


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
