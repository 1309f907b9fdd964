"""Metrics against slow, obviously correct pure-Python references and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from recsys_compress.errors import ConfigError
from recsys_compress.metrics import (
    ALL_RANKING_METRICS,
    FullRankingMetrics,
    RatingMetrics,
    SampledRankingMetrics,
)

INF = math.inf
KS = (1, 3, 5, 10, 30, 50)  # 30 == n_items, 50 > n_items


def ref_full(scores: torch.Tensor, relevant: torch.Tensor, ks) -> dict[str, float]:
    """Loops and ``sorted`` with key (-score, is_relevant): relevant items lose ties."""
    sums = {f"{m}@{k}": 0.0 for m in ALL_RANKING_METRICS for k in ks}
    n_users = 0
    for row, rel in zip(scores.double().tolist(), relevant.tolist(), strict=True):
        row = [-INF if math.isnan(x) else x for x in row]
        n_rel = sum(rel)
        if n_rel == 0:
            continue
        n_users += 1
        ranked = [rel[i] for i in sorted(range(len(row)), key=lambda i: (-row[i], rel[i]))]
        for k in ks:
            top = ranked[:k]
            hits = sum(top)
            sums[f"hr@{k}"] += float(hits > 0)
            sums[f"recall@{k}"] += hits / n_rel
            sums[f"precision@{k}"] += hits / k
            dcg = sum(1 / math.log2(i + 2) for i, h in enumerate(top) if h)
            idcg = sum(1 / math.log2(i + 2) for i in range(min(n_rel, k)))
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"mrr@{k}"] += next((1 / (i + 1) for i, h in enumerate(top) if h), 0.0)
            ap = sum(sum(top[: i + 1]) / (i + 1) for i, h in enumerate(top) if h)
            sums[f"map@{k}"] += ap / min(n_rel, k)
    return {key: value / n_users if n_users else 0.0 for key, value in sums.items()}


def ref_sampled(pos, neg, ks) -> dict[str, float]:
    out = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg") for k in ks}
    for p, negs in zip(pos.tolist(), neg.tolist(), strict=True):
        rank = 1 + sum(n >= p for n in negs)
        for k in ks:
            out[f"hr@{k}"] += float(rank <= k) / len(pos)
            out[f"ndcg@{k}"] += (1 / math.log2(rank + 1) if rank <= k else 0.0) / len(pos)
    return out


def make_data(seed: int = 0, n_users: int = 40, n_items: int = 30):
    """Heavily tied scores, -inf masked items, users without relevant items, edge-case users."""
    g = torch.Generator().manual_seed(seed)
    scores = (2 * torch.randn(n_users, n_items, generator=g)).round(decimals=1)
    relevant = torch.rand(n_users, n_items, generator=g) < 0.15
    relevant[::7] = False  # users with no held-out item: skipped
    train = (torch.rand(n_users, n_items, generator=g) < 0.2) & ~relevant
    scores[train] = -INF
    scores[1] = 0.5  # constant-score user
    relevant[1] = False
    relevant[1, [0, 5, 9]] = True
    scores[2] = -INF  # only 3 finite items, one relevant item masked to -inf
    scores[2, :3] = torch.tensor([1.0, 2.0, 3.0])
    relevant[2] = False
    relevant[2, [1, 20]] = True
    relevant[3] = True  # every item relevant
    return scores, relevant


def as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in result.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_ranking_matches_reference(dtype, seed):
    scores, relevant = make_data(seed)
    scores = scores.to(dtype)
    metric = FullRankingMetrics(ks=KS)
    metric.update(scores, relevant)
    got = as_floats(metric.compute())
    assert got == pytest.approx(ref_full(scores, relevant, KS), rel=1e-6, abs=1e-7)
    assert list(got) == [f"{m}@{k}" for m in ALL_RANKING_METRICS for k in KS]
    assert metric.count.item() == int((relevant.sum(1) > 0).sum())


def test_chunked_updates_equal_one_call():
    scores, relevant = make_data(3)
    whole = FullRankingMetrics(ks=KS)
    whole.update(scores, relevant)
    chunked = FullRankingMetrics(ks=KS)
    for lo, hi in [(0, 5), (5, 6), (6, 19), (19, 40)]:
        chunked.update(scores[lo:hi], relevant[lo:hi])
    torch.testing.assert_close(chunked.compute(), whole.compute())


def test_merged_states_equal_one_metric():
    """All states are sums, so merging per-rank states (what DDP sync does) is exact."""
    scores, relevant = make_data(4)
    whole, a, b = (FullRankingMetrics(ks=KS) for _ in range(3))
    whole.update(scores, relevant)
    a.update(scores[:17], relevant[:17])
    b.update(scores[17:], relevant[17:])
    a.merge_state(b)
    torch.testing.assert_close(a.compute(), whole.compute())
    for m in (whole, SampledRankingMetrics(), RatingMetrics()):
        assert all(fx is dim_zero_sum for fx in m._reductions.values())


def test_subset_of_metrics_and_unsorted_ks():
    scores, relevant = make_data(5)
    metric = FullRankingMetrics(ks=(10, 2), metrics=("ndcg", "hr"))
    metric.update(scores, relevant)
    got = as_floats(metric.compute())
    assert list(got) == ["ndcg@10", "ndcg@2", "hr@10", "hr@2"]
    expected = ref_full(scores, relevant, (10, 2))
    assert got == pytest.approx({key: expected[key] for key in got}, rel=1e-6)


def test_hand_computed_example():
    """One user, 5 items, relevant items at ranks 2 and 4."""
    metric = FullRankingMetrics(ks=(1, 3, 5))
    metric.update(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]), torch.tensor([[0, 1, 0, 1, 0]]).bool())
    got = as_floats(metric.compute())
    d2, d4 = 1 / math.log2(3), 1 / math.log2(5)
    expected = {
        **{f"{m}@1": 0.0 for m in ALL_RANKING_METRICS},
        "hr@3": 1.0,
        "recall@3": 0.5,
        "precision@3": 1 / 3,
        "ndcg@3": d2 / (1 + d2),
        "mrr@3": 0.5,
        "map@3": (1 / 2) / 2,
        "hr@5": 1.0,
        "recall@5": 1.0,
        "precision@5": 0.4,
        "ndcg@5": (d2 + d4) / (1 + d2),
        "mrr@5": 0.5,
        "map@5": (1 / 2 + 2 / 4) / 2,
    }
    assert got == pytest.approx(expected, rel=1e-6)


def test_constant_scores_rank_relevant_items_last():
    metric = FullRankingMetrics(ks=(1, 3, 4, 10))
    metric.update(torch.zeros(1, 4), torch.tensor([[True, False, False, False]]))
    got = as_floats(metric.compute())
    assert got["hr@3"] == 0.0 and got["ndcg@3"] == 0.0 and got["mrr@3"] == 0.0
    assert got["hr@4"] == 1.0 and got["mrr@4"] == pytest.approx(0.25)
    assert got["precision@10"] == pytest.approx(0.1)  # k > n_items still divides by k
    assert got["ndcg@10"] == pytest.approx(1 / math.log2(5))
    assert got["map@4"] == pytest.approx(0.25)


@pytest.mark.parametrize("x", [1.0, -3.5, 1e30, 1e-40, 0.0, 3.4e38, INF])
def test_adjacent_float32_scores_are_not_tied(x):
    """The float64 nudge must only break exact ties, never reorder distinct float32 scores."""
    x32 = torch.tensor(x, dtype=torch.float32)
    below = torch.nextafter(x32, torch.tensor(-INF))
    metric = FullRankingMetrics(ks=(1,), metrics=("hr",))
    metric.update(torch.stack([x32, below])[None], torch.tensor([[True, False]]))
    assert metric.compute()["hr@1"].item() == 1.0  # relevant item strictly higher: rank 1
    metric.reset()
    metric.update(torch.stack([x32, x32])[None], torch.tensor([[True, False]]))
    assert metric.compute()["hr@1"].item() == 0.0  # exact tie: relevant ranks second


def test_negative_zero_and_nan_scores():
    scores = torch.tensor([[0.0, -0.0, 1.0, float("nan")], [float("nan"), 0.0, -INF, 2.0]])
    relevant = torch.tensor([[False, True, False, False], [True, False, False, False]])
    metric = FullRankingMetrics(ks=(1, 2, 3, 4))
    metric.update(scores, relevant)
    expected = ref_full(scores, relevant, (1, 2, 3, 4))  # NaN treated as -inf
    assert as_floats(metric.compute()) == pytest.approx(expected, rel=1e-6)
    assert expected["mrr@4"] == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_no_counted_users_gives_zeros():
    metric = FullRankingMetrics(ks=(5,))
    metric.update(torch.randn(3, 7), torch.zeros(3, 7, dtype=torch.bool))
    assert all(v.item() == 0.0 for v in metric.compute().values())
    assert metric.count.item() == 0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="n_items"):
        FullRankingMetrics().update(torch.randn(2, 5), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("ks", [[], [0], [5, -1], [2.5], [True], "10", 10, [5, 5]])
def test_invalid_ks_raise_config_error(ks):
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        FullRankingMetrics(ks=ks)
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        SampledRankingMetrics(ks=ks)


@pytest.mark.parametrize("metrics", [["hr", "auc"], [], "ndcg", ["hr", "hr"]])
def test_invalid_metric_names_raise_config_error(metrics):
    with pytest.raises(ConfigError, match=r"eval\.metrics") as info:
        FullRankingMetrics(metrics=metrics)
    assert "recall" in str(info.value)  # the message lists the valid names


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(50, generator=g).round(decimals=1)
    neg = torch.randn(50, 99, generator=g).round(decimals=1)  # many ties with the positive
    neg[0] = pos[0]  # positive tied with every negative: rank 100
    neg[1, :10] = -INF
    ks = (1, 5, 10, 100, 200)
    metric = SampledRankingMetrics(ks=ks)
    metric.update(pos[:20], neg[:20])
    metric.update(pos[20:], neg[20:])
    got = as_floats(metric.compute())
    assert got == pytest.approx(ref_sampled(pos, neg, ks), rel=1e-6, abs=1e-7)
    assert list(got) == [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


def test_sampled_hand_computed_and_nan():
    metric = SampledRankingMetrics(ks=(1, 2, 3))
    # user 0: one negative above, one tied -> rank 3; user 1: rank 1; user 2: NaN positive -> last
    pos = torch.tensor([1.0, 5.0, float("nan")])
    neg = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    metric.update(pos, neg)
    got = as_floats(metric.compute())
    assert got == pytest.approx(
        {
            "hr@1": 1 / 3,
            "hr@2": 1 / 3,
            "hr@3": 2 / 3,
            "ndcg@1": 1 / 3,
            "ndcg@2": 1 / 3,
            "ndcg@3": (1 + 1 / math.log2(4)) / 3,
        }
    )


def test_rating_metrics_match_numpy():
    rng = np.random.default_rng(0)
    preds, target = rng.normal(3, 1, size=1000), rng.integers(1, 6, size=1000).astype(float)
    metric = RatingMetrics()
    for lo in range(0, 1000, 300):
        metric.update(
            torch.tensor(preds[lo : lo + 300], dtype=torch.float32),
            torch.tensor(target[lo : lo + 300]),
        )
    got = as_floats(metric.compute())
    preds32 = preds.astype(np.float32).astype(np.float64)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((preds32 - target) ** 2)), rel=1e-6)
    assert got["mae"] == pytest.approx(np.mean(np.abs(preds32 - target)), rel=1e-6)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert as_floats(RatingMetrics().compute()) == {"rmse": 0.0, "mae": 0.0}
