"""The rolling checkpoint's schedule: every ``checkpoint_every_n_steps`` optimizer steps, no more
often than keeps its writes under ``checkpoint_max_overhead`` of the wall time."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys_compress import callbacks


class Clock:
    """A fake clock for the callback, advanced by :func:`drive`'s steps and writes."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drive(
    monkeypatch: pytest.MonkeyPatch,
    every: int,
    max_overhead: float | None,
    steps: int,
    step_s: float,
    write_s: float,
    last_batch_at: int | None = None,
) -> tuple[list[int], callbacks.CompressedModelCheckpoint, Clock]:
    """Run ``steps`` one-batch training steps through the callback; the steps it wrote at.
    ``last_batch_at``: the step that ends an epoch (Lightning's ``is_last_batch``)."""
    clock = Clock()
    written: list[int] = []
    one_process = SimpleNamespace(broadcast=lambda value, src=0: value)
    progress = SimpleNamespace(is_last_batch=False)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    trainer = SimpleNamespace(
        global_step=0, strategy=one_process, fit_loop=loop, is_global_zero=True
    )

    def save(self: ModelCheckpoint, trainer_: object, candidates: dict) -> None:
        clock.now += write_s
        written.append(trainer.global_step)

    monkeypatch.setattr(ModelCheckpoint, "on_train_batch_end", lambda *args: None)
    monkeypatch.setattr(ModelCheckpoint, "_save_last_checkpoint", save)
    monkeypatch.setattr(ModelCheckpoint, "_should_skip_saving_checkpoint", lambda *a: False)
    monkeypatch.setattr(ModelCheckpoint, "_monitor_candidates", lambda *a: {})
    checkpoint = callbacks.CompressedModelCheckpoint(every_n_steps=every, max_overhead=max_overhead)
    checkpoint._clock = clock
    for _ in range(steps):
        clock.now += step_s
        trainer.global_step += 1
        progress.is_last_batch = trainer.global_step == last_batch_at
        checkpoint.on_train_batch_end(trainer, None, None, {}, trainer.global_step - 1)  # type: ignore[arg-type]
    return written, checkpoint, clock


def test_cheap_writes_keep_every_n_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    written, checkpoint, _ = drive(monkeypatch, 5, 0.05, 50, step_s=0.01, write_s=0.002)
    assert written == list(range(5, 51, 5))
    assert checkpoint.rolling_written == 10 and checkpoint.rolling_skipped == 0


def test_costly_writes_are_spaced_to_the_overhead_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a write of 3 s at 0.25: the next one waits 3 * (1 / 0.25 - 1) = 9 s, 9 steps of 1 s, so
    # the next multiple of 2 after that
    written, checkpoint, clock = drive(monkeypatch, 2, 0.25, 40, step_s=1.0, write_s=3.0)
    assert written == [2, 12, 22, 32]
    assert checkpoint.rolling_written == 4 and checkpoint.rolling_skipped == 16
    assert 4 * 3.0 / (clock.now - 100.0) <= 0.25
    monkeypatch.setattr(ModelCheckpoint, "on_train_end", lambda *args: None)
    with caplog.at_level(logging.INFO, logger=callbacks.__name__):
        checkpoint.on_train_end(SimpleNamespace(is_global_zero=True), None)  # type: ignore[arg-type]
    assert "4 written, 16 skipped" in caplog.text
    assert "(3.0 s the last) under trainer.checkpoint_max_overhead=0.25" in caplog.text


def test_null_overhead_writes_every_n_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    written, checkpoint, _ = drive(monkeypatch, 2, None, 40, step_s=1.0, write_s=3.0)
    assert written == list(range(2, 41, 2)) and checkpoint.rolling_skipped == 0


def test_no_rolling_write_on_an_epochs_last_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # the epoch's end writes last.ckpt at that step anyway
    written, _, _ = drive(monkeypatch, 5, None, 20, 0.01, 0.002, last_batch_at=10)
    assert written == [5, 15, 20]
