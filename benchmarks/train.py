"""Training throughput: our Lightning epoch against a minimal PyTorch loop doing the same work.

Same model, data, batches (the data module's epoch tensors: fresh negatives, one shuffle), batch
size 4096, optimizer (``module.build_optimizer``: parameter groups, fused kernels) and loss. Ours
runs through ``train.build_trainer`` with the default callbacks: the rich progress bar, the CSV
logger and the rolling checkpoint every ``trainer.checkpoint_every_n_steps``. Target: ratio <=
1.15 for MF and NeuMF on ML-100K. The two loops alternate epoch by epoch so that load on the
shared machine hits both alike.

RecBole 1.2.1 on this 2-core machine (the issue's figures, same model, loss and batch size):
BPR-MF at batch 2048, 0.204 s per epoch of 80.8k pairs; NeuMF with 1 negative, 1.07 s per epoch.
Ours runs RecBole's default architectures for them (BPR-MF at 64 without biases; NeuMF at
64 / 64 / [128, 64] with dropout 0.1), not our own defaults.
Targets: >= 2x faster for BPR-MF, >= 1.3x for NeuMF (we run the same-sized epochs on ML-100K).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import Figure
from recsys_compress.callbacks import EpochTimer, RandomState
from recsys_compress.config import TrainConfig, to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule, build_optimizer, recommendation_loss
from recsys_compress.train import build_datamodule, build_trainer, run_checkpoint

RECBOLE_SECONDS = {"bpr_mf": 0.204, "neumf": 1.07}  # per epoch, RecBole 1.2.1, this machine


def make_config(
    model: str,
    loss: str,
    negatives: int,
    batch: int,
    epochs: int,
    trainer: dict[str, Any] | None = None,
    **model_kw: Any,
) -> TrainConfig:
    """ML-100K, ratio split, the model and loss given; ``trainer``: more trainer settings (e.g.
    ``accelerator`` and ``precision`` for the GPU section)."""
    model_cfg: dict[str, Any] = {"name": model, "dim": 64, **model_kw}
    if model == "neumf":
        model_cfg = {"name": "neumf", "dim": 32, **model_kw}
    trainer_cfg = {"max_epochs": epochs, "batch_size": batch, "early_stopping_patience": None}
    return to_train_config(
        {
            "data": {"name": "ml100k", "source": "ml100k"},
            "split": {"name": "ratio"},
            "model": model_cfg,
            "loss": {"name": loss, "num_negatives": negatives},
            "trainer": {**trainer_cfg, **(trainer or {})},
            "save_model": False,
        }
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so wall times are whole."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_epoch(
    dm: RecDataModule,
    model: torch.nn.Module,
    opt: Any,
    loss: str,
    epoch: int,
    device: torch.device,
    autocast: torch.dtype | None,
) -> None:
    """The minimal loop: the epoch's tensors on the device in one copy, then slice, forward
    (under autocast for mixed precision), backward, step."""
    batches = dm.train_batches
    data = {key: value.to(device) for key, value in batches.epoch_tensors(epoch).items()}
    size = batches.batch_size
    for start in range(0, len(data["users"]), size):
        batch = {key: value[start : start + size] for key, value in data.items()}
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, autocast, enabled=autocast is not None):
            batch_loss = recommendation_loss(model, batch, loss)
        batch_loss.backward()
        opt.step()
    synchronize(device)


class _Interleave(L.Callback):
    """Runs one plain epoch before each of our epochs (same process, same load)."""

    def __init__(self, plain: Any) -> None:
        self.plain = plain
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        self.plain(trainer.current_epoch)
        self.seconds.append(time.perf_counter() - start)


class _Synchronize(L.Callback):
    """Waits for the device at the end of each training epoch, before the timer reads it."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)


AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def compare(cfg: TrainConfig, device: torch.device | None = None) -> tuple[float, float, int]:
    """(our median epoch seconds, plain median epoch seconds, samples per epoch); the first
    epoch of each is a warm-up and is dropped. ``device``: where the plain loop runs (ours
    follows ``cfg.trainer.accelerator``; the CPU by default), with ``cfg.trainer.precision``'s
    autocast."""
    device = device or torch.device("cpu")
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    plain_model = build_model(cfg.model, dm.num_users, dm.num_items).to(device)
    plain_opt = build_optimizer(plain_model, cfg.optim)  # the same optimizer as ours
    autocast = AUTOCAST.get(str(cfg.trainer.precision))
    plain = _Interleave(
        lambda e: _plain_epoch(dm, plain_model, plain_opt, cfg.loss.name, e, device, autocast)
    )
    model = build_model(cfg.model, dm.num_users, dm.num_items)
    module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        # the callbacks of a run without compression (train.fit_and_test): its checkpoints
        # (last.ckpt every checkpoint_every_n_steps inside the epoch), its random state
        checkpoint = run_checkpoint(cfg, Path(tmp), module)
        callbacks = [plain, _Synchronize(), checkpoint, timer, RandomState()]
        trainer = build_trainer(cfg, Path(tmp), callbacks)
        trainer.limit_val_batches = 0
        trainer.fit(module, datamodule=dm)
    ours = statistics.median(timer.train_seconds[1:])
    ref = statistics.median(plain.seconds[1:])
    return ours, ref, dm.train_batches.num_samples()


def run(quick: bool) -> list[Figure]:
    epochs = 4 if quick else 8
    figures = []
    for label, model in (("MF", "mf"), ("NeuMF", "neumf")):
        cfg = make_config(model, "bce", 4, 4096, epochs)
        ours, ref, samples = compare(cfg)
        figures.append(
            Figure(
                "train",
                f"{label} epoch / plain loop (bce, 4 neg, b=4096)",
                ours / ref,
                1.15,
                details={
                    "ours_s": ours,
                    "plain_s": ref,
                    "ours_samples_per_s": samples / ours,
                    "plain_samples_per_s": samples / ref,
                },
            )
        )
    # Against RecBole's published-here epoch times: the same model, loss and batch size.
    # RecBole's BPR-MF has no bias terms: neither has ours here. Its NeuMF's defaults
    # (recbole/properties/model/NeuMF.yaml in the 1.2.1 wheel): GMF and MLP embeddings of 64,
    # MLP hidden sizes [128, 64], dropout 0.1 (ours defaults to 32 / 32 / [64, 32, 16] / 0).
    recbole_neumf = {"dim": 64, "mlp_dim": 64, "mlp_layers": [128, 64], "dropout": 0.1}
    for key, label, model, loss, negatives, batch, target, model_kw in (
        ("bpr_mf", "BPR-MF", "mf", "bpr", 1, 2048, 2.0, {"use_bias": False}),
        ("neumf", "NeuMF", "neumf", "bce", 1, 2048, 1.3, recbole_neumf),
    ):
        cfg = make_config(model, loss, negatives, batch, epochs, None, **model_kw)
        ours, _, samples = compare(cfg)
        figures.append(
            Figure(
                "train",
                f"{label} speed-up over RecBole 1.2.1 (b={batch}, 1 neg)",
                RECBOLE_SECONDS[key] / ours,
                target,
                op=">=",
                details={"ours_s": ours, "recbole_s": RECBOLE_SECONDS[key], "samples": samples},
            )
        )
    return figures
