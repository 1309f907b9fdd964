"""Benchmarks that compare our code with a minimal reference in the same process.

    python scripts/bench.py [--quick] [--data ml100k|synthetic] [--json out.json]

Ratios, not absolute times, are the targets (the machine is shared and noisy):
- train_epoch: one Lightning epoch of ``RecommenderModule`` (default callbacks: rich progress bar,
  CSV logger, checkpointing off) / one epoch of a plain PyTorch loop doing the same work (same
  model, batches with fresh negatives, optimizer). Target <= 1.5.
- full_ranking: our test loop over all users (``score_all`` + exclusion mask + metrics) / a plain
  matmul + mask + topk over the same users. Target <= 2.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from recsys_compress.callbacks import EpochTimer
from recsys_compress.config import TrainConfig, to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule
from recsys_compress.train import build_trainer


def make_config(data: str, epochs: int) -> TrainConfig:
    data_cfg: dict = {"name": data, "source": data}
    if data == "synthetic":
        data_cfg["synthetic"] = {"num_users": 943, "num_items": 1682, "interactions_per_user": 100}
    return to_train_config(
        {
            "data": data_cfg,
            "split": {"name": "ratio"},
            "model": {"name": "mf", "dim": 64},
            "loss": {"name": "bce", "num_negatives": 4},
            "trainer": {"max_epochs": epochs, "batch_size": 4096, "early_stopping_patience": None},
            "save_model": False,
        }
    )


def plain_epoch_seconds(dm: RecDataModule, cfg: TrainConfig, epochs: int) -> list[float]:
    """A minimal PyTorch loop over the same batches (same negatives code, same shuffling)."""
    model = build_model(cfg.model, dm.num_users, dm.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    batches, times = dm.train_batches, []
    for epoch in range(epochs):
        start = time.perf_counter()
        data = batches.epoch_tensors(epoch)
        for s in range(0, len(data["users"]), batches.batch_size):
            users = data["users"][s : s + batches.batch_size]
            items = data["items"][s : s + batches.batch_size]
            labels = data["labels"][s : s + batches.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(users, items), labels)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def lightning_epoch_seconds(dm: RecDataModule, cfg: TrainConfig, run_dir: Path) -> list[float]:
    model = build_model(cfg.model, dm.num_users, dm.num_items)
    module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval)
    timer = EpochTimer()
    trainer = build_trainer(cfg, run_dir, [timer])
    trainer.limit_val_batches = 0
    trainer.fit(module, datamodule=dm)
    return timer.train_seconds


def plain_ranking_seconds(dm: RecDataModule, model: torch.nn.Module, k: int) -> float:
    """matmul + mask + topk over every test user, with the same exclusion lists."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in dm.test_data.batches:
            users = batch["users"]
            scores = model.user_embedding.weight[users] @ model.item_embedding.weight.T
            scores += model.item_bias.weight.T
            scores[batch["exclude_rows"], batch["exclude_items"]] = float("-inf")
            torch.topk(scores, k, dim=1)
    return time.perf_counter() - start


def our_ranking_seconds(dm: RecDataModule, module: RecommenderModule) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in dm.test_data.batches:
            module.test_step(batch, 0)
        module.test_metrics["ranking"].compute()
        module.test_metrics["ranking"].reset()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--data", default="ml100k", choices=["ml100k", "synthetic"])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 6
    torch.manual_seed(0)
    cfg = make_config(args.data, epochs)
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed)
    dm.setup()
    samples = dm.train_batches.num_samples()

    plain = plain_epoch_seconds(dm, cfg, epochs)[1:]
    with tempfile.TemporaryDirectory() as tmp:
        ours = lightning_epoch_seconds(dm, cfg, Path(tmp))[1:]
    plain_s, ours_s = statistics.median(plain), statistics.median(ours)

    model = build_model(cfg.model, dm.num_users, dm.num_items).eval()
    module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval).eval()
    k = max(cfg.eval.ks)
    reps = 5 if args.quick else 15
    plain_rank = min(plain_ranking_seconds(dm, model, k) for _ in range(reps))
    our_rank = min(our_ranking_seconds(dm, module) for _ in range(reps))

    rows = [
        ("train_epoch MF bce k=4 b=4096", ours_s, plain_s, 1.5),
        ("full_ranking MF all test users", our_rank, plain_rank, 2.0),
    ]
    results = {
        "data": args.data,
        "train_samples_per_epoch": samples,
        "ours_samples_per_s": samples / ours_s,
        "plain_samples_per_s": samples / plain_s,
        "rows": [],
    }
    print(f"{'benchmark':34} {'ours s':>9} {'plain s':>9} {'ratio':>6} {'target':>7}  result")
    ok = True
    for name, our, ref, target in rows:
        ratio = our / ref
        passed = ratio <= target
        ok &= passed
        print(
            f"{name:34} {our:9.4f} {ref:9.4f} {ratio:6.2f} {'<= ' + str(target):>7}  "
            f"{'PASS' if passed else 'FAIL'}"
        )
        results["rows"].append(
            {
                "name": name,
                "ours_s": our,
                "plain_s": ref,
                "ratio": ratio,
                "target": target,
                "pass": passed,
            }
        )
    print(f"training samples/s: ours {samples / ours_s:,.0f}, plain {samples / plain_s:,.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    sys.exit(main())
