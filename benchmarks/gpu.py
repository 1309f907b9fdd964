"""The GPU figures: training throughput and full-ranking evaluation on CUDA, beside the CPU ones.

    python scripts/bench.py --only gpu --json gpu.json      # on a machine with a CUDA GPU

Without a CUDA device the section reports nothing (nothing in the project needs a GPU). Setting
``RCZ_BENCH_DEVICE=cpu`` runs the same code on the CPU with small repeats, as a dry run of this
file on a machine without one. On the lent H200 machine, ``scripts/gpu_bench.sh`` installs the
carried wheels and runs this section (see that script).

Figures, each with the card's name in its details:

* training: MF-64 and NeuMF epochs on ML-100K (BCE, 4 negatives, batch 4096) through
  ``train.build_trainer`` with the default callbacks, against the minimal PyTorch loop on the same
  device (``benchmarks.train.compare``), in full precision and in ``bf16-mixed`` (the plain loop
  under the same autocast). Target <= 1.15 as on the CPU; samples/s in the details. At this
  size a GPU step is dominated by launch latency, not arithmetic: the details say how far the
  GPU is ahead of the CPU figures.
* evaluation: full ranking of MF-64 on ML-100K and on an ML-1M-sized problem, and of NeuMF on
  ML-100K, ours / the plain references of ``benchmarks.evaluation`` with model and batches on
  the device (targets 2, 2, 1.5).
* scale: MF-64 with 1M users x 100k items, every user ranked against the whole catalogue in
  chunks of ``eval.batch_users`` (scores, one held-out item per user, all metrics at 5/10/20):
  seconds and the GPU's extra peak memory (target < 2 GB, as on the CPU).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from benchmarks import evaluation as ev
from benchmarks.common import Figure, interleaved_medians
from benchmarks.train import compare, make_config, synchronize

SECTION = "gpu"


def bench_device() -> torch.device | None:
    """``RCZ_BENCH_DEVICE`` if set (e.g. ``cpu`` for a dry run), else CUDA when present."""
    forced = os.environ.get("RCZ_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else None


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} (dry run)"


def training_figures(device: torch.device, quick: bool) -> list[Figure]:
    accelerator = "gpu" if device.type == "cuda" else device.type
    epochs = 4 if quick else 8
    figures = []
    for label, model in (("MF", "mf"), ("NeuMF", "neumf")):
        for precision in ("32-true", "bf16-mixed"):
            trainer = {"accelerator": accelerator, "devices": 1, "precision": precision}
            cfg = make_config(model, "bce", 4, 4096, epochs, trainer)
            ours, plain, samples = compare(cfg, device)
            figures.append(
                Figure(
                    SECTION,
                    f"{label} epoch / plain loop, {precision} (bce, 4 neg, b=4096)",
                    ours / plain,
                    1.15,
                    details={
                        "card": card(device),
                        "ours_s": ours,
                        "plain_s": plain,
                        "ours_samples_per_s": samples / ours,
                        "plain_samples_per_s": samples / plain,
                    },
                )
            )
    return figures


def _on_device(dm: Any, module: Any, device: torch.device) -> None:
    """Model and every test batch on ``device`` (moved once, before timing)."""
    module.to(device)
    dm.test_data.batches = [
        {key: value.to(device) for key, value in batch.items()} for batch in dm.test_data.batches
    ]


def evaluation_figures(device: torch.device, quick: bool) -> list[Figure]:
    ml100k = {"name": "ml100k", "source": "ml100k"}
    synthetic = {"name": "synthetic", "source": "synthetic", "synthetic": ev.ML1M_SIZE}
    mf = {"name": "mf", "dim": 64}
    neumf = {"name": "neumf", "dim": 32, "mlp_dim": 32, "mlp_layers": [64, 32, 16]}
    cases = [
        ("full ranking MF-64 ML-100K: ours / plain topk", ml100k, mf, ev.plain_mf, 2.0),
        ("full ranking MF-64 ML-1M-sized: ours / plain topk", synthetic, mf, ev.plain_mf, 2.0),
        ("full ranking NeuMF ML-100K: ours / plain MLP", ml100k, neumf, ev.plain_neumf, 1.5),
    ]
    figures = []
    for name, data, model, plain, target in cases:
        dm, module = ev._datamodule(data, model)
        _on_device(dm, module, device)

        def ours(dm: Any = dm, module: Any = module) -> None:
            ev.our_test_loop(dm, module)
            synchronize(device)

        def reference(dm: Any = dm, module: Any = module, plain: Any = plain) -> None:
            plain(dm, module.model)
            synchronize(device)

        times = interleaved_medians({"ours": ours, "plain": reference}, 3 if quick else 15)
        figures.append(
            Figure(
                SECTION,
                name,
                times["ours"] / times["plain"],
                target,
                details={
                    "card": card(device),
                    "ours_ms": 1e3 * times["ours"],
                    "plain_ms": 1e3 * times["plain"],
                },
            )
        )
    return figures


@torch.no_grad()
def scale_figure(device: torch.device, quick: bool) -> Figure:
    from recsys_compress.config import EvalConfig
    from recsys_compress.metrics import FullRankingMetrics
    from recsys_compress.models import MF

    num_users, num_items = (20_000, 100_000) if device.type != "cuda" else (1_000_000, 100_000)
    if quick:
        num_users //= 10
    torch.manual_seed(0)
    model = MF(num_users, num_items, 64).to(device).eval()
    metric = FullRankingMetrics().to(device)
    held_out = torch.randint(num_items, (num_users,), device=device)
    chunk = EvalConfig().batch_users
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    for first in range(0, num_users, chunk):
        users = torch.arange(first, min(first + chunk, num_users), device=device)
        scores = model.score_all(users).float()
        rows = torch.arange(len(users), device=device)
        metric.update(scores, (rows, held_out[users]))
    values = metric.compute()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return Figure(
        SECTION,
        f"MF-64 {num_users:,} x {num_items:,} full ranking: extra peak GPU memory",
        (peak - base) / 2**20,
        ev.SCALE_LIMIT_MB if cuda else None,  # a dry run has no GPU memory to judge
        unit="MB",
        details={
            "card": card(device),
            "seconds": seconds,
            "users_per_s": num_users / seconds,
            "batch_users": chunk,
            "ndcg@10": float(values["ndcg@10"]),
        },
    )


def run(quick: bool) -> list[Figure]:
    device = bench_device()
    if device is None:
        print("# gpu: no CUDA device, nothing measured (RCZ_BENCH_DEVICE=cpu for a dry run)")
        return []
    quick = quick or device.type != "cuda"
    return (
        training_figures(device, quick)
        + evaluation_figures(device, quick)
        + [scale_figure(device, quick)]
    )
