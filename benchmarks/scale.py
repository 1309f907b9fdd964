"""Scale: one epoch of MF on synthetic 1M users x 100k items x 10M interactions (dim 64, BCE with
4 negatives, batch 4096, the sparse optimizer path), then each compression method and the export
on that model. Each step runs in its own subprocess, so its peak RSS is its own; the target is
24 GB for every step. Quick: 50k users x 5k items x 250k interactions.

Steps (a fresh process each; the trained model is passed on as a state dict file, loaded as a
run's ``model.pt`` is, so a step's peak holds one copy of the model, not two):
``train``  the epoch (data generation, split and negative sampling included; details: the time
           to the first step, mostly the epoch's shuffle and negatives, and the median seconds
           of an optimizer step);
``train_rowwise``  the same epoch with ``optim=rowwise_adagrad`` (one accumulator per row
           instead of Adam's two moment tables; its model is not passed on);
``prune``  global magnitude masks at 80% over both tables (the exact radix threshold);
``l1``     200 optimizer steps (quick: 30) with the L1 proximal step (sparse path);
``svd``    per-layer truncated SVD at half the parameters (exact, through the Gram matrix, at
           this size: ``lowrank.gram_svd``);
``qat``    as many fake-quantised steps, then the conversion to int8;
``export`` the artifact of the trained model quantised to int8 after training (the QAT step's
           model is not passed on: the same int8 layout and size);
``load``   that artifact (``load_compressed``, its raw ids included) against the trained
           ``model.pt`` (``load_run_model``: the same meta-device build), each read once to
           warm up, then 5 times in alternation (quick: 15), the files in the page cache: the
           inference section's load figure at a size where the bytes, not the fixed costs,
           decide (target: no slower).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import Figure, bare_trainer, interleaved_medians, optim_preset, peak_rss_mb

SECTION = "scale"
ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 24 * 1024
FULL = {"num_users": 1_000_000, "num_items": 100_000, "interactions_per_user": 10}
QUICK = {"num_users": 50_000, "num_items": 5_000, "interactions_per_user": 5}


SPARSE_ADAM = optim_preset("sparse_adam")
ROWWISE_ADAGRAD = optim_preset("rowwise_adagrad")


def _config(size: dict[str, int], optim: dict[str, Any] | None = None) -> Any:
    from recsys_compress.config import to_train_config

    return to_train_config(
        {
            "data": {"name": "synthetic", "source": "synthetic", "synthetic": size},
            "model": {"name": "mf", "dim": 64},
            "loss": {"name": "bce", "num_negatives": 4},
            "optim": optim or SPARSE_ADAM,
            "trainer": {"batch_size": 4096, "progress_bar": False, "max_epochs": 1},
            "logger": {"name": "none"},
        }
    )


def _model(cfg: Any, state: Path | None = None) -> Any:
    """A fresh model, or the one saved at ``state``, loaded as a run's ``model.pt`` is (no
    random init, the file's tensors become the parameters): a step's peak is its own work's,
    not a second copy of the model."""
    from recsys_compress.export import load_run_model
    from recsys_compress.models import build_model

    s = cfg.data.synthetic
    if state is None:
        return build_model(cfg.model, s.num_users, s.num_items)
    return load_run_model(state, cfg.model, s.num_users, s.num_items, {})


class _StepTimes(L.Callback):
    """The time from the epoch's start to its first step (the epoch's shuffle and negatives, the
    first call's batches) and each Lightning step's seconds per optimizer step in it."""

    def __init__(self) -> None:
        self.epoch_start = self.step_start = 0.0
        self.to_first_step: float | None = None
        self.per_step: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.step_start = time.perf_counter()
        if self.to_first_step is None:
            self.to_first_step = self.step_start - self.epoch_start

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.per_step.append((time.perf_counter() - self.step_start) / len(batch))


def _random_loader(cfg: Any, steps: int) -> Any:
    s, gen = cfg.data.synthetic, torch.Generator().manual_seed(0)
    batches = [
        {
            "users": torch.randint(s.num_users, (4096,), generator=gen),
            "items": torch.randint(s.num_items, (4096,), generator=gen),
            "labels": (torch.rand(4096, generator=gen) < 0.2).float(),
        }
        for _ in range(steps)
    ]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def step(name: str, size: dict[str, int], workdir: Path) -> dict[str, Any]:
    """Run one step in this process; returns its seconds and details."""
    from recsys_compress.module import RecommenderModule

    size = dict(size)
    train_steps = size.pop("train_steps", -1)  # -1: the whole epoch
    cfg = _config(size, ROWWISE_ADAGRAD if name == "train_rowwise" else SPARSE_ADAM)
    steps = 200 if size["num_users"] >= FULL["num_users"] else 30
    state = workdir / "model.pt"
    start = time.perf_counter()
    details: dict[str, Any] = {}
    if name in ("train", "train_rowwise"):
        from recsys_compress.train import build_datamodule

        dm = build_datamodule(cfg)
        details["data_s"] = time.perf_counter() - start
        model = _model(cfg)
        module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval)
        times = _StepTimes()
        trainer = bare_trainer(max_epochs=1, max_steps=train_steps, callbacks=[times])
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        details["epoch_s"] = time.perf_counter() - fit_start
        details["to_first_step_s"] = times.to_first_step
        details["step_ms"] = 1000 * statistics.median(times.per_step)
        details["steps"] = trainer.global_step
        details["train_loss"] = float(trainer.callback_metrics.get("train/loss", float("nan")))
        if name == "train":  # the model the other steps start from
            torch.save(model.state_dict(), state)
    elif name == "prune":
        from recsys_compress.compression.pruning import MagnitudePruning, PruneConfig
        from recsys_compress.compression.targets import select_targets

        model = _model(cfg, state)
        cb = MagnitudePruning(
            PruneConfig(sparsity=0.8, scope="global", score="magnitude", schedule="one_shot")
        )
        cb._targets = select_targets(model, cb.cfg.targets, "compression.prune.targets")
        cb._root = model
        start = time.perf_counter()
        cb.update_masks(0)
        details["sparsity"] = cb.overall_sparsity()
    elif name in ("l1", "qat"):
        from recsys_compress.compression.qat import QATConfig, QuantizationAwareTraining
        from recsys_compress.compression.sparsity import L1Config, L1Proximal

        model = _model(cfg, state)
        module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval)
        cb = L1Proximal(L1Config()) if name == "l1" else QuantizationAwareTraining(QATConfig())
        start = time.perf_counter()
        trainer = bare_trainer(max_steps=steps, max_epochs=1, callbacks=[cb])
        trainer.fit(module, train_dataloaders=_random_loader(cfg, steps))
        details["steps"] = trainer.global_step
    elif name == "svd":
        from recsys_compress.compression.lowrank import SVDConfig, apply_svd

        model = _model(cfg, state)
        start = time.perf_counter()
        report = apply_svd(model, SVDConfig(param_ratio=0.5))
        details["relative_error"] = max(r["relative_error"] for r in report)
    elif name == "export":
        import numpy as np

        from recsys_compress.compression.qat import QATConfig, post_training_quantize
        from recsys_compress.export import export_model

        model = _model(cfg, state)
        post_training_quantize(model, QATConfig())
        s = cfg.data.synthetic
        start = time.perf_counter()
        details["bytes"] = export_model(
            model,
            cfg.model,
            np.arange(s.num_users),
            np.arange(s.num_items),
            workdir / "model.rcz",
        )
    elif name == "load":
        from recsys_compress.export import load_compressed, load_run_model

        s = cfg.data.synthetic
        start = time.perf_counter()
        times = interleaved_medians(
            {
                "dense": lambda: load_run_model(state, cfg.model, s.num_users, s.num_items, {}),
                "artifact": lambda: load_compressed(workdir / "model.rcz"),
            },
            repeat=5 if s.num_users >= FULL["num_users"] else 15,  # quick: ms loads, noisy
        )
        details["artifact_s"], details["dense_s"] = times["artifact"], times["dense"]
        details["ratio"] = times["artifact"] / times["dense"]
        details["artifact_bytes"] = (workdir / "model.rcz").stat().st_size
        details["dense_model_pt_bytes"] = state.stat().st_size
    details["seconds"] = time.perf_counter() - start
    details["peak_rss_mb"] = peak_rss_mb()
    return details


STEPS = ("train", "train_rowwise", "prune", "l1", "svd", "qat", "export", "load")


def run_steps(section: str, size: dict[str, int]) -> list[Figure]:
    """Every step of :data:`STEPS` at ``size`` (synthetic sizes, and ``train_steps``: the
    optimizer steps the two training steps run, -1 or absent for the whole epoch), each in its
    own process: one peak-RSS figure per step, and the load ratio."""
    label = (
        f"{size['num_users']:,} users x {size['num_items']:,} items x "
        f"{size['interactions_per_user']} per user"
    )
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in STEPS:
            args = [sys.executable, "-m", "benchmarks.scale", name, json.dumps(size), tmp]
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{section} step {name} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            figures.append(
                Figure(
                    section,
                    f"{name}: peak RSS, MF-64 {label}",
                    result["peak_rss_mb"],
                    LIMIT_MB,
                    unit="MB",
                    details=result,
                )
            )
            if name == "load":
                figures.append(
                    Figure(
                        section,
                        f"load: int8 artifact / dense model.pt, MF-64 {label}",
                        result["ratio"],
                        1.0,
                        details=result,
                    )
                )
    return figures


def run(quick: bool) -> list[Figure]:
    return run_steps(SECTION, QUICK if quick else FULL)


if __name__ == "__main__":
    print(json.dumps(step(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))))
