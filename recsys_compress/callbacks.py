"""Lightning callbacks of the training run: timing, checkpointing aware of compression, and the
state a resumed run needs (rolling ``last.ckpt``, early-stopping decision, random generators)."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

log = logging.getLogger(__name__)


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


def _train_batches(trainer: L.Trainer) -> Any:
    return getattr(trainer.train_dataloader, "dataset", None)


def optimizer_steps_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer steps in one training epoch. The data module's training items are lists of
    ``batches_per_call`` batches, one optimizer step each, so Lightning's
    ``num_training_batches`` (and ``estimated_stepping_batches``) count lists, not steps."""
    dataset = _train_batches(trainer)
    steps = int(trainer.num_training_batches) * getattr(dataset, "batches_per_call", 1)
    if hasattr(dataset, "num_batches"):
        steps = min(steps, dataset.num_batches())
    return steps


def estimated_optimizer_steps(trainer: L.Trainer) -> int:
    """Optimizer steps of the whole fit (``estimated_stepping_batches`` in optimizer steps)."""
    per_call = getattr(_train_batches(trainer), "batches_per_call", 1)
    calls = int(trainer.estimated_stepping_batches)
    return min(calls * per_call, optimizer_steps_per_epoch(trainer) * max(1, trainer.max_epochs))


def _compression_done(trainer: L.Trainer) -> bool:
    """True once every compression callback has reached its final state (or there is none)."""
    return all(
        cb.compression_done(trainer) for cb in trainer.callbacks if hasattr(cb, "compression_done")
    )


class CompressedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that ranks only checkpoints of the finally compressed model.

    Otherwise the "best" checkpoint of a gradually pruned run is an early, still dense one, and
    the run would report a dense model's metrics. ``last.ckpt`` is written every epoch and, with
    ``every_n_steps``, also every that many optimizer steps (the rolling checkpoint a killed run
    resumes from; ranking still happens only after validation).

    ``max_overhead`` bounds the share of the wall time that writing ``last.ckpt`` takes: after a
    write of ``s`` seconds the next rolling write waits at least ``s * (1 / max_overhead - 1)``
    seconds (then comes at the next multiple of ``every_n_steps``). A small model's write takes
    milliseconds and changes nothing; at 1M rows one took ~1.1 s, at 10M rows 2-3 s (3 GB), and
    one every 200 steps (~1 s of training at 10M rows) made the run mostly checkpoint writes.
    None: every ``every_n_steps``.
    """

    def __init__(
        self,
        *args: Any,
        every_n_steps: int | None = None,
        max_overhead: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.rolling_written = 0  # rolling (mid-epoch) writes of last.ckpt, this process
        self.rolling_skipped = 0  # multiples of every_n_steps passed without one (max_overhead)
        self._clock = time.monotonic
        self._rolling_after = 0.0  # the clock's time before which no rolling write starts
        self.write_seconds = 0.0  # the last write of last.ckpt

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning 2.6 writes ``last.ckpt`` at an epoch's end only with a new top-k
        checkpoint: an epoch that did not improve the metric (or did not validate) left the
        rolling checkpoint behind it, and a run killed later replayed that epoch. This hook runs
        after the epoch's validation and its saves; it writes ``last.ckpt`` when nothing was
        saved at this step (the same on every rank: it is a collective save)."""
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        started = self._clock()
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.write_seconds = self._clock() - started
        if self.max_overhead is not None:
            wait = self.write_seconds * (1.0 / self.max_overhead - 1.0)
            self._rolling_after = self._clock() + wait

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.rolling_skipped and trainer.is_global_zero:
            log.info(
                "rolling checkpoint: %d written, %d skipped to keep its writes (%.1f s the last) "
                "under trainer.checkpoint_max_overhead=%g of the time",
                self.rolling_written,
                self.rolling_skipped,
                self.write_seconds,
                self.max_overhead,
            )

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if _compression_done(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self.every_n_steps
        # A training step may run several optimizer steps: save when it crossed a multiple.
        step = trainer.global_step
        ran = len(batch) if isinstance(batch, list) else 1
        if not every or step // every == (step - ran) // every:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch's end writes last.ckpt at this step anyway
        # rank 0's clock decides for every rank: the save is collective (a barrier)
        if trainer.strategy.broadcast(self._clock() < self._rolling_after, 0):
            self.rolling_skipped += 1
            return
        saved_step = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.rolling_written += 1
        # Should this step still end the epoch (``is_last_batch`` unset), its top-k and
        # epoch-end saves must still happen.
        self._last_global_step_saved = saved_step


class CompressedEarlyStopping(EarlyStopping):
    """EarlyStopping that starts counting only once compression has reached its final state.

    A run resumed from the checkpoint of the epoch that decided to stop stops again at once
    (Lightning does not store ``trainer.should_stop``; this callback's state holds the decision).
    """

    def _should_skip_check(self, trainer: L.Trainer) -> bool:
        return super()._should_skip_check(trainer) or not _compression_done(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.wait_count >= self.patience or self.stopped_epoch > 0:
            trainer.should_stop = True


class RandomState(L.Callback):
    """Saves the global random generators (Python, NumPy, torch CPU and CUDA) in checkpoints and
    restores them on resume, so randomness after the checkpoint (e.g. dropout) repeats exactly.
    The state holds only tensors and Python scalars (checkpoints load with ``weights_only``)."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
