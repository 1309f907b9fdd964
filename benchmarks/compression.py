"""Compression overhead: the training time of a run with a compression callback over the same run
without one (pruning <= 1.1x, L1 proximal <= 1.2x, QAT <= 1.5x).

ML-100K (MF dim 64, batch 4096, BCE with 4 negatives): a 10-epoch run through the real data module
and Trainer with the default settings of each method, against the same run without it (the gradual
pruning schedule updates its masks 21 times over the first 75% of the steps). A 1-epoch run, whose
one epoch holds all its 24 mask updates (a 90-step schedule in steps of 4), is reported beside it
as pruning's worst case (no target). 1M users x 100k items (MF dim 64, ~70M parameters): a fixed
number of optimizer steps on uniformly random batches of the same shape, the median step after the
first (a mask update, ~20 per run, is timed apart in the details); on the sparse optimizer path
(``optim.sparse=true``: Adam and, in the full run, row-wise Adagrad) and, in the full run, on the
dense Adam path. Runs with and without the callback alternate in one process
(:func:`benchmarks.common.interleaved_medians` style).
The full run also times the plain dense step with a fresh table-sized gradient every step
against the kept gradient (:func:`recsys_compress.ops.keep_gradient`, the default; no target) and
L1's dense step run eagerly against compiled (``compression.l1.kernel``; no target), and every
run the plain sparse step of ``optim=rowwise_adagrad`` against ``sparse_adam``'s.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import lightning as L
import torch

from benchmarks.common import Figure, bare_trainer, optim_preset, rotated
from recsys_compress import ops
from recsys_compress.compression.pruning import MagnitudePruning, PruneConfig
from recsys_compress.compression.qat import QATConfig, QuantizationAwareTraining
from recsys_compress.compression.sparsity import L1Config, L1Proximal
from recsys_compress.config import EvalConfig, LossConfig, OptimConfig, to_train_config
from recsys_compress.models import MF, build_model
from recsys_compress.module import RecommenderModule
from recsys_compress.train import build_datamodule

SECTION = "compression"
TARGETS = {"prune": 1.1, "l1": 1.2, "qat": 1.5}
BIG_USERS, BIG_ITEMS, DIM, BATCH = 1_000_000, 100_000, 64, 4096
EPOCH_STEPS = 10_000_000 * 5 // BATCH  # 10M interactions, 1 positive : 4 negatives


def make_callback(method: str, epoch_steps: int | None = None) -> L.Callback | None:
    """The method's callback with its default settings; ``epoch_steps``: the schedule of pruning
    spans that many steps (a run of a few steps then updates its masks as often as a real one)."""
    if method == "prune":
        end = None if epoch_steps is None else int(0.75 * epoch_steps)
        return MagnitudePruning(PruneConfig(end_step=end))
    if method in ("l1", "l1_eager"):
        return L1Proximal(L1Config(kernel="eager" if method == "l1_eager" else "auto"))
    if method == "qat":
        return QuantizationAwareTraining(QATConfig(convert_at_end=False))
    return None


class StepTimer(L.Callback):
    """Wall time of the training epochs and of each Lightning training batch.

    ``epoch_seconds`` runs from the first epoch's start (first in the callback list) to the end
    of training, so every callback's and the module's epoch-end work is in it, however the
    callbacks are ordered (review finding: closing each epoch in this callback's own
    ``on_train_epoch_end``, which runs first, left out the compression callbacks' epoch-end
    statistics)."""

    def __init__(self) -> None:
        self.epoch_seconds = 0.0
        self.batch_seconds: list[float] = []
        self._start: float | None = None
        self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()
        if self._start is None:
            self._start = self._last

    def on_train_batch_end(self, *args: Any) -> None:
        now = time.perf_counter()
        self.batch_seconds.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:  # else stopped before its first epoch: 0 s
            self.epoch_seconds = time.perf_counter() - self._start


def fit(
    module: RecommenderModule,
    data: Any,
    method: str,
    epoch_steps: int | None = None,
    **trainer_kw: Any,
) -> tuple[StepTimer, L.Callback | None]:
    timer, callback = StepTimer(), make_callback(method, epoch_steps)
    trainer = bare_trainer(callbacks=[timer] + ([callback] if callback else []), **trainer_kw)
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    return timer, callback


def alternate(
    runs: dict[str, Callable[[], float]], repeat: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median of each run's measured seconds, the runs taken in alternation (a warm-up first)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeat):
        for name in rotated(list(runs), i):
            run = runs[name]
            gc.collect()
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}, times


ML100K_EPOCHS = 10


def ml100k_figures(quick: bool) -> list[Figure]:
    cfg = to_train_config(
        {
            "data": {"name": "ml100k", "source": "ml100k"},
            "model": {"name": "mf", "dim": DIM},
            "loss": {"name": "bce", "num_negatives": 4},
            "trainer": {"batch_size": BATCH, "progress_bar": False},
            "logger": {"name": "none"},
        }
    )
    dm = build_datamodule(cfg)

    def run(method: str, epochs: int) -> Callable[[], float]:
        def one() -> float:
            torch.manual_seed(0)
            net = build_model(cfg.model, dm.num_users, dm.num_items)
            module = RecommenderModule(net, cfg.loss, cfg.optim, cfg.eval)
            timer, _ = fit(module, dm, method, max_epochs=epochs)
            return timer.epoch_seconds / epochs

        return one

    figures = []
    cases = [(method, ML100K_EPOCHS, target) for method, target in TARGETS.items()]
    cases.append(("prune", 1, None))
    for method, epochs, target in cases:
        runs = {"none": run("none", epochs), method: run(method, epochs)}
        medians, _ = alternate(runs, 2 if quick else 9)
        run_kind = f"{epochs}-epoch run" if epochs > 1 else "1-epoch run (all 24 mask updates)"
        figures.append(
            Figure(
                SECTION,
                f"{method} epoch / plain epoch, ML-100K MF-64, {run_kind}",
                medians[method] / medians["none"],
                target,
                details={"plain_epoch_s": medians["none"], f"{method}_epoch_s": medians[method]},
            )
        )
    return figures


def random_batches(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """BCE batches of the ML-100K shape (1 positive : 4 negatives) over the 1M x 100k ids."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "users": torch.randint(BIG_USERS, (BATCH,), generator=gen),
            "items": torch.randint(BIG_ITEMS, (BATCH,), generator=gen),
            "labels": (torch.rand(BATCH, generator=gen) < 0.2).float(),
        }
        for _ in range(steps)
    ]


def big_module(sparse: bool, optimizer: str = "adam") -> RecommenderModule:
    """MF at 1M x 100k; ``optimizer`` (adam or rowwise_adagrad) with ``sparse`` takes the
    settings of its config group (``optim=sparse_adam`` / ``optim=rowwise_adagrad``), without
    it dense Adam with no table weight decay."""
    torch.manual_seed(0)
    model = MF(BIG_USERS, BIG_ITEMS, DIM)
    if sparse:
        optim = OptimConfig(**optim_preset("sparse_adam" if optimizer == "adam" else optimizer))
    else:
        optim = OptimConfig(name=optimizer, sparse=False, embedding_weight_decay=0.0)
    return RecommenderModule(model, LossConfig(name="bce"), optim, EvalConfig())


def big_run(
    method: str,
    sparse: bool,
    batches: list[dict[str, torch.Tensor]],
    details: dict[str, Any],
    kept: bool = True,
    optimizer: str = "adam",
) -> Callable[[], float]:
    """A fresh 1M x 100k model trained on ``batches``; returns the median step after the first
    (which holds the one-time work: the spectral basis, the first masks). ``kept=False``: a
    fresh dense gradient every step, as before kept gradients."""

    def one() -> float:
        module = big_module(sparse, optimizer)
        with mock.patch.object(ops, "keep_gradient", ops.keep_gradient if kept else _never):
            timer, callback = fit(
                module, batches, method, EPOCH_STEPS, max_steps=len(batches), max_epochs=1
            )
        if isinstance(callback, MagnitudePruning):
            # at the schedule's end: the final sparsity, every row's top-k (review finding:
            # the step after the last update was one whose target sparsity was still 0)
            step = max(callback.end_step or 0, callback.last_update_step + 1)
            start = time.perf_counter()
            callback.update_masks(step)
            details["prune_mask_update_s"] = time.perf_counter() - start
            details["prune_mask_update_sparsity"] = callback.current_sparsity
        del module
        return statistics.median(timer.batch_seconds[1:])

    return one


def step_ratio(name: str, runs: dict[str, Callable[[], float]], repeat: int) -> Figure:
    """The median step of the first of two ``runs`` over the second's, alternated (no target);
    the details hold each as ``<its key>_step_ms``."""
    medians, _ = alternate(runs, repeat)
    gc.collect()
    first, second = runs
    details = {f"{key}_step_ms": 1e3 * medians[key] for key in runs}
    return Figure(SECTION, name, medians[first] / medians[second], details=details)


def _never(table: torch.Tensor, on: bool = True) -> None:
    """``ops.keep_gradient`` that keeps nothing."""


def big_figures(quick: bool) -> list[Figure]:
    # 5 alternations on the sparse path: with 3, a slow spell of the shared machine during one
    # method's plain runs moved a ratio by 0.3 (QAT read 0.91x, its plain step 10.2 ms against
    # 8.0 ms in the other methods' alternations of the same run)
    # path: (steps, alternations, optimizer, sparse gradients, label)
    paths = {"sparse": (20 if quick else 120, 1 if quick else 5, "adam", True, "sparse Adam")}
    if not quick:
        paths["rowwise"] = (120, 5, "rowwise_adagrad", True, "row-wise Adagrad")
        paths["dense"] = (9, 3, "adam", False, "dense Adam")
    figures = []
    for steps, repeat, optimizer, sparse, label in paths.values():
        batches = random_batches(steps)
        for method, target in TARGETS.items():
            details: dict[str, Any] = {"steps": steps}
            runs = {
                m: big_run(m, sparse, batches, details, optimizer=optimizer)
                for m in ("none", method)
            }
            medians, _ = alternate(runs, repeat)
            details |= {"plain_step_ms": 1e3 * medians["none"], "step_ms": 1e3 * medians[method]}
            figures.append(
                Figure(
                    SECTION,
                    f"{method} step / plain step, 1M x 100k MF-64 {label}",
                    medians[method] / medians["none"],
                    target,
                    details=details,
                )
            )
            gc.collect()
    steps, repeat = paths["sparse"][:2]
    batches = random_batches(steps)
    runs = {
        "rowwise_adagrad": big_run("none", True, batches, {}, optimizer="rowwise_adagrad"),
        "sparse_adam": big_run("none", True, batches, {}, optimizer="adam"),
    }
    name = "plain sparse step, 1M x 100k MF-64: optim=rowwise_adagrad / optim=sparse_adam"
    figures.append(step_ratio(name, runs, repeat))
    if not quick:
        steps, repeat = paths["dense"][:2]
        batches = random_batches(steps)
        runs = {
            "eager": big_run("l1_eager", False, batches, {}),
            "compiled": big_run("l1", False, batches, {}),
        }
        name = "l1 step, 1M x 100k MF-64 dense Adam: kernel=eager / kernel=auto (compiled)"
        figures.append(step_ratio(name, runs, repeat))
        runs = {
            "fresh": big_run("none", False, batches, {}, kept=False),
            "kept": big_run("none", False, batches, {}, kept=True),
        }
        name = "plain dense Adam step, 1M x 100k MF-64: fresh gradient / kept gradient"
        figures.append(step_ratio(name, runs, repeat))
    return figures


def run(quick: bool) -> list[Figure]:
    return ml100k_figures(quick) + big_figures(quick)
