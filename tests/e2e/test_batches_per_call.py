"""Several optimizer steps per Lightning step (``trainer.batches_per_call``) are a speed-up only:
the same optimizer steps on the same batches, so the same model, metrics and step count."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from recsys_compress.module import RecommenderModule
from recsys_compress.train import train
from tests.e2e.test_train import FAST, compose_config


def _run(tmp_path: Path, name: str, overrides: list[str]) -> tuple[dict, bytes, pd.DataFrame]:
    run_dir = tmp_path / name
    record = train(
        compose_config([*FAST, "trainer.checkpoint_every_n_steps=null", *overrides]), run_dir
    )
    losses = pd.read_csv(run_dir / "metrics.csv")["train/loss"].dropna().reset_index(drop=True)
    return record, (run_dir / "model.pt").read_bytes(), losses


@pytest.mark.parametrize(
    "compression",
    [
        ["compression=[prune,qat]", "compression.dense_epochs=1"],
        ["compression=l1", "compression.l1.warmup_steps=3"],
    ],
    ids=["prune+qat", "l1"],
)
def test_batches_per_call_trains_the_same_model(tmp_path: Path, compression: list[str]) -> None:
    one, one_bytes, one_loss = _run(tmp_path, "one", [*compression, "trainer.batches_per_call=1"])
    # 3 does not divide the epoch's batch count: the last list of each epoch is shorter.
    three, three_bytes, three_loss = _run(
        tmp_path, "three", [*compression, "trainer.batches_per_call=3"]
    )
    assert one["test"] == three["test"] and one["val"] == three["val"]
    # dense Adam on small tables: L1's step runs eagerly (results.json says so)
    assert one["compression"].get("l1_step") == (
        "eager" if "compression=l1" in compression else None
    )
    assert one_bytes == three_bytes
    pd.testing.assert_series_equal(one_loss, three_loss)


def test_global_step_counts_optimizer_steps(tmp_path: Path) -> None:
    overrides = [*FAST, "trainer.batches_per_call=4", "trainer.checkpoint_every_n_steps=null"]
    cfg = compose_config(overrides)
    train(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    from recsys_compress.data.datamodule import RecDataModule

    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed)
    dm.setup()
    steps_per_epoch = dm.train_batches.num_batches()
    assert steps_per_epoch % 4 != 0  # the short last list is counted by its own steps
    assert ckpt["global_step"] == cfg.trainer.max_epochs * steps_per_epoch
    # the loggers' step column counts optimizer steps too
    steps = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["train/loss"])["step"]
    assert steps.tolist() == [e * steps_per_epoch - 1 for e in (1, 2)]


def test_lightning_wrapped_steps_equal_plain_steps_with_clipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct backward / step path (one device, fp32) equals Lightning's manual_backward +
    LightningOptimizer.step path that mixed precision and DDP take, gradient clipping included."""
    overrides = ["compression=prune", "trainer.gradient_clip_val=0.05"]
    plain, plain_bytes, _ = _run(tmp_path, "plain", overrides)
    original = RecommenderModule.on_train_start

    def wrapped_path(self: RecommenderModule) -> None:
        original(self)
        assert self._plain_steps  # the default on CPU in fp32
        self._plain_steps = False

    monkeypatch.setattr(RecommenderModule, "on_train_start", wrapped_path)
    wrapped, wrapped_bytes, _ = _run(tmp_path, "wrapped", overrides)
    assert plain["test"] == wrapped["test"]
    assert plain_bytes == wrapped_bytes
