"""Evaluation: our full-ranking test loop against plain PyTorch doing the least the task needs.

``ours``: ``RecommenderModule.test_step`` over every batch of ``dm.test_data`` (``score_all``,
training items set to -inf, :class:`FullRankingMetrics` with all six metrics at 5/10/20), then
``compute()``. ``plain``: over the same user chunks, scores, the same -inf mask and a ``topk``,
no metric at all. Figures (untrained models: the work does not depend on the weights):

- MF-64 on ML-100K and on an ML-1M-sized synthetic problem (6,040 x 3,706, ~1M interactions):
  ours / (matmul + item bias + mask + topk), target <= 2.
- NeuMF (the default ``model=neumf``) on ML-100K: ours / a chunked MLP over every (user, item)
  pair (GMF product, MLP tower, predict layer, mask, topk), target <= 1.5.
- Sampled evaluation (``eval=sampled``: each held-out pair ranked among 99 sampled negatives)
  of MF-64 on the ML-1M-sized problem: ours (``test_step``: ``score_candidates``, HR and NDCG at
  5/10/20) / a plain loop (the user's row and the candidates' rows gathered, their products
  summed, item bias, the positive's rank), target <= 1.5.
- MF-64 on 1M users x 100k items in chunks of ``eval.batch_users``: the extra peak memory of
  evaluating (peak RSS minus RSS once model and batches exist, in a fresh process), target
  < 2 GB. Scoring all 1e11 pairs takes hours on one core, so a sample of users is timed and
  extrapolated.

Timed on one thread, ours and plain interleaved: on the shared two-core machine these run on, a
second thread mostly waits for a core (each parallel op stalls for milliseconds when another
process holds the other core), which adds noise proportional to the number of ops, not work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Figure, interleaved_medians, peak_rss_mb, rss_mb

SECTION = "evaluation"
ROOT = Path(__file__).resolve().parents[1]
K = 20  # the largest default cut-off: what a plain loop needs for the same metrics
SCALE_LIMIT_MB = 2048.0
ML1M_SIZE = {"num_users": 6040, "num_items": 3706, "interactions_per_user": 166}


def _datamodule(
    data: dict[str, Any], model: dict[str, Any], evaluation: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    from recsys_compress.config import to_train_config
    from recsys_compress.models import build_model
    from recsys_compress.module import RecommenderModule
    from recsys_compress.train import build_datamodule

    cfg = to_train_config(
        {
            "data": data,
            "split": {"name": "ratio"},
            "model": model,
            "trainer": {"batch_size": 4096},
            "logger": {"name": "none"},
            "eval": evaluation or {},
        }
    )
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    net = build_model(cfg.model, dm.num_users, dm.num_items).eval()
    return dm, RecommenderModule(net, cfg.loss, cfg.optim, cfg.eval).eval()


@torch.no_grad()
def our_test_loop(dm: Any, module: Any) -> dict[str, torch.Tensor]:
    for batch in dm.test_data.batches:
        module.test_step(batch, 0)
    metric = module.test_metrics["ranking"]
    values = metric.compute()
    metric.reset()
    return values


def _masked_topk(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    scores[batch["exclude_rows"], batch["exclude_items"]] = float("-inf")
    return torch.topk(scores, K, dim=1).indices


@torch.no_grad()
def plain_mf(dm: Any, model: Any) -> list[torch.Tensor]:
    """matmul + item bias + mask + topk (a user's bias and the global bias do not change ranks).
    Returns each batch's top-K items."""
    items, item_bias = model.item_embedding.weight, model.item_bias.weight.T
    tops = []
    for batch in dm.test_data.batches:
        scores = model.user_embedding.weight[batch["users"]] @ items.T
        scores += item_bias
        tops.append(_masked_topk(scores, batch))
    return tops


@torch.no_grad()
def plain_sampled_mf(dm: Any, model: Any) -> torch.Tensor:
    """Per batch: the users' rows and the candidates' rows (``index_select`` into one buffer
    kept across batches), their products summed in place, item bias, the positive's rank
    (candidate 0) among its negatives (user and global biases do not change ranks). The
    fastest plain form found: ``bmm`` took 1.9x its time, fancy indexing with an out-of-place
    product 2.2x. A fresh 26 MB gather per batch (``F.embedding``, until the nineteenth round)
    page-faulted in some processes and not in others: 290-1,047 ms for the same work. Returns
    the 1-based ranks (ties pessimistic, as ours)."""
    users, items = model.user_embedding.weight, model.item_embedding.weight
    item_bias = model.item_bias.weight.squeeze(-1)
    ranks = []
    buffer = torch.empty(0, items.shape[1], dtype=items.dtype)
    for batch in dm.test_data.batches:
        candidates = batch["candidates"].long()
        if buffer.shape[0] < candidates.numel():
            buffer = torch.empty(candidates.numel(), items.shape[1], dtype=items.dtype)
        gathered = torch.index_select(
            items, 0, candidates.view(-1), out=buffer[: candidates.numel()]
        )
        user_rows = F.embedding(batch["users"], users)[:, None, :]
        scores = gathered.view(*candidates.shape, -1).mul_(user_rows).sum(-1)
        scores += item_bias[candidates]
        ranks.append(1 + (scores[:, 1:] >= scores[:, :1]).sum(1))
    return torch.cat(ranks)


@torch.no_grad()
def plain_neumf(dm: Any, model: Any, pairs_per_chunk: int = 1 << 18) -> list[torch.Tensor]:
    """Every (user, item) pair through GMF product, MLP tower and predict layer, in user chunks.
    Returns each batch's top-K items."""
    n_items = model.num_items
    all_items = torch.arange(n_items, device=model.predict.weight.device)  # no host copies
    linears = [m for m in model.mlp.tower if isinstance(m, torch.nn.Linear)]
    rows = max(1, pairs_per_chunk // n_items)
    tops = []
    for batch in dm.test_data.batches:
        chunks = []
        for users in batch["users"].split(rows):
            pair_users = users.repeat_interleave(n_items)
            pair_items = all_items.repeat(len(users))
            gmf = (
                model.gmf_user_embedding.weight[pair_users]
                * (model.gmf_item_embedding.weight[pair_items])
            )
            hidden = torch.cat(
                [
                    model.mlp.user_embedding.weight[pair_users],
                    model.mlp.item_embedding.weight[pair_items],
                ],
                dim=1,
            )
            for linear in linears:
                hidden = torch.relu(F.linear(hidden, linear.weight, linear.bias))
            out = F.linear(
                torch.cat([gmf, hidden], dim=1), model.predict.weight, model.predict.bias
            )
            chunks.append(out.view(len(users), n_items))
        tops.append(_masked_topk(torch.cat(chunks), batch))
    return tops


def ratio_figure(
    name: str, dm: Any, module: Any, plain: Callable[[], object], target: float, repeat: int
) -> Figure:
    times = interleaved_medians({"ours": lambda: our_test_loop(dm, module), "plain": plain}, repeat)
    users = sum(len(b["users"]) for b in dm.test_data.batches)
    return Figure(
        SECTION,
        name,
        times["ours"] / times["plain"],
        target,
        details={
            "ours_ms": times["ours"] * 1e3,
            "plain_ms": times["plain"] * 1e3,
            "users": users,
            "items": dm.num_items,
            "threads": torch.get_num_threads(),
        },
    )


def scale_child(num_users: int, num_items: int, sample_users: int, per_user: int) -> dict:
    """Run in a fresh process: MF-64 on ``num_users x num_items``, evaluation batches (from
    ``full_ranking_batches``) for ``sample_users`` users spread over all of them, each with
    ``per_user`` training items (excluded) and 2 held-out items. Returns timings and memory."""
    from recsys_compress.config import EvalConfig, LossConfig, OptimConfig
    from recsys_compress.data.datamodule import full_ranking_batches
    from recsys_compress.data.interactions import Interactions
    from recsys_compress.models import MF
    from recsys_compress.module import RecommenderModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MF(num_users, num_items, 64).eval()
    rng = np.random.default_rng(0)
    users = np.linspace(0, num_users - 1, sample_users).astype(np.int64)
    n = per_user + 2
    items = rng.integers(0, num_items, size=(sample_users, n))
    items = np.sort(items, axis=1)
    items[:, 1:] += np.cumsum(items[:, 1:] == items[:, :-1], axis=1)  # distinct per user
    items %= num_items
    count = sample_users * n
    interactions = Interactions(
        users=torch.from_numpy(np.repeat(users, n)),
        items=torch.from_numpy(items.reshape(-1)),
        ratings=torch.full((count,), float("nan")),
        timestamps=torch.zeros(count, dtype=torch.float64),
        num_users=num_users,
        num_items=num_items,
        user_ids=np.arange(num_users),
        item_ids=np.arange(num_items),
    )
    held_out = (np.arange(count) % n) >= per_user
    evaluation = EvalConfig()
    batches = full_ranking_batches(
        interactions,
        np.flatnonzero(~held_out),
        np.flatnonzero(held_out),
        evaluation.batch_users,
        False,
    ).batches
    module = RecommenderModule(model, LossConfig(), OptimConfig(), evaluation).eval()
    base_mb = rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        peak_field = "VmHWM since the reset"
    except OSError:  # the process's lifetime peak instead: an upper bound
        peak_field = "lifetime peak"
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            module.test_step(batch, 0)
        ndcg = float(module.test_metrics["ranking"].compute()["ndcg@10"])
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()  # VmHWM since the reset, where there is one
    per_1k = seconds / sample_users * 1000
    return {
        "extra_peak_mb": peak_mb - base_mb,
        "rss_after_build_mb": base_mb,
        "peak_from": peak_field,
        "users_timed": sample_users,
        "batch_users": evaluation.batch_users,
        "seconds": seconds,
        "seconds_per_1k_users": per_1k,
        "extrapolated_hours_all_users": per_1k * num_users / 1000 / 3600,
        "ndcg@10": ndcg,
        "threads": 1,
    }


def scale_figure(quick: bool) -> Figure:
    sample = 4096 if quick else 20_000
    args = [sys.executable, "-m", "benchmarks.evaluation", "1000000", "100000", str(sample), "20"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"evaluation scale child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Figure(
        SECTION,
        "MF-64 1M x 100k, chunked: extra peak memory",
        result["extra_peak_mb"],
        SCALE_LIMIT_MB,
        unit="MB",
        details=result,
    )


def run(quick: bool) -> list[Figure]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figures = []
        ml100k = {"name": "ml100k", "source": "ml100k"}
        mf = {"name": "mf", "dim": 64}
        dm, module = _datamodule(ml100k, mf)
        figures.append(
            ratio_figure(
                "full ranking MF-64 ML-100K: ours / plain topk",
                dm,
                module,
                lambda: plain_mf(dm, module.model),
                2.0,
                5 if quick else 15,
            )
        )
        synthetic = {"name": "synthetic", "source": "synthetic", "synthetic": ML1M_SIZE}
        dm_1m, module_1m = _datamodule(synthetic, mf)
        figures.append(
            ratio_figure(
                "full ranking MF-64 ML-1M-sized: ours / plain topk",
                dm_1m,
                module_1m,
                lambda: plain_mf(dm_1m, module_1m.model),
                2.0,
                3 if quick else 7,
            )
        )
        dm_s, module_s = _datamodule(synthetic, mf, {"protocol": "sampled"})
        figures.append(
            ratio_figure(
                "sampled evaluation MF-64 ML-1M-sized: ours / plain gather + dot",
                dm_s,
                module_s,
                lambda: plain_sampled_mf(dm_s, module_s.model),
                1.5,
                3 if quick else 7,
            )
        )
        neumf = {"name": "neumf", "dim": 32, "mlp_dim": 32, "mlp_layers": [64, 32, 16]}
        dm, module = _datamodule(ml100k, neumf)
        figures.append(
            ratio_figure(
                "full ranking NeuMF ML-100K: ours / plain MLP on pairs",
                dm,
                module,
                lambda: plain_neumf(dm, module.model),
                1.5,
                3 if quick else 7,
            )
        )
    finally:
        torch.set_num_threads(threads)
    figures.append(scale_figure(quick))
    return figures


if __name__ == "__main__":
    print(json.dumps(scale_child(*(int(a) for a in sys.argv[1:5]))))
