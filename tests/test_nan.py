"""A NaN / inf loss or weights stop the run with a clear error; the last good checkpoint stays."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import recsys_compress.module as module_py
import recsys_compress.train as train_py
from recsys_compress.module import TrainingDivergedError
from tests.e2e.test_train import compose_config, run_cli

FAST = [
    "compression=none",
    "data=synthetic",
    "model.dim=8",
    "trainer.max_epochs=2",
    "trainer.batch_size=512",
    "trainer.progress_bar=false",
    "trainer.checkpoint_every_n_steps=5",
    "trainer.checkpoint_max_overhead=null",  # a write every 5 steps, however long it takes
    "logger=none",
]


def _last_checkpoint(run_dir: Path) -> dict[str, Any]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = ckpt["state_dict"].values()
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())
    return ckpt


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def loss_turning_nan(*args: Any) -> torch.Tensor:
        calls.append(None)
        loss = module_py.recommendation_loss.__wrapped__(*args)
        return loss * float("nan") if len(calls) > 12 else loss  # NaN from step 12 on

    loss_turning_nan.__wrapped__ = module_py.recommendation_loss  # type: ignore[attr-defined]
    monkeypatch.setattr(module_py, "recommendation_loss", loss_turning_nan)
    with pytest.raises(TrainingDivergedError) as caught:
        train_py.train(compose_config(FAST), tmp_path)
    message = str(caught.value)
    assert "the loss became nan at epoch 0, step 12;" in message
    assert f"the last good checkpoint is kept: {tmp_path / 'checkpoints' / 'last.ckpt'}" in message
    assert "optim.lr=0.002" in message and "trainer.gradient_clip_val" in message
    # the rolling checkpoint of step 10 is kept; the NaN step never reached the disk
    assert _last_checkpoint(tmp_path)["global_step"] == 10


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nan_weights_are_never_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    class PoisonWeights(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, module: Any, *_: Any) -> None:
            if trainer.global_step == 15:
                with torch.no_grad():
                    module.model.user_embedding.weight[7, 3] = bad

    build_trainer = train_py.build_trainer
    monkeypatch.setattr(
        train_py,
        "build_trainer",
        lambda cfg, run_dir, callbacks: build_trainer(cfg, run_dir, [*callbacks, PoisonWeights()]),
    )
    with pytest.raises(TrainingDivergedError, match=r"the weights became NaN or inf .* step 15"):
        train_py.train(compose_config(FAST), tmp_path)
    assert _last_checkpoint(tmp_path)["global_step"] == 10


def test_cli_divergence_fails_cleanly_with_status_failed(tmp_path: Path) -> None:
    result = run_cli([*FAST, "optim.lr=1e30", "trainer.checkpoint_every_n_steps=1"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: training diverged: the loss became" in result.stderr
    assert "at epoch 0, step 1;" in result.stderr and "optim.lr=1e+30" in result.stderr
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("training diverged")
    # the weights after the first (absurd) step were finite, and are what last.ckpt holds
    ckpt = _last_checkpoint(tmp_path / "run")
    assert ckpt["global_step"] == 1
    assert math.isfinite(float(ckpt["state_dict"]["model.user_embedding.weight"].abs().max()))
