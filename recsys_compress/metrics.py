"""Ranking and rating metrics as torchmetrics ``Metric``s: vectorised, exact, DDP-safe.

Every state is a sum (``dist_reduce_fx="sum"``), so values sync correctly under DDP. Ranking
ties are broken pessimistically: a relevant item tied with a non-relevant one ranks after it, so a
model that scores every item the same does not look good. NaN scores are treated as ``-inf``
(the worst possible score), so a diverged model scores ~0 rather than looking good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from recsys_compress.errors import ConfigError

ALL_RANKING_METRICS = ("hr", "recall", "precision", "ndcg", "mrr", "map")
SAMPLED_RANKING_METRICS = ("hr", "ndcg")


def validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Return ``ks`` as a tuple of distinct positive ints; else raise ConfigError (``eval.ks``)."""
    fix = "set eval.ks to a non-empty list of distinct positive integers, e.g. [5, 10, 20]"
    if isinstance(ks, str | bytes) or not isinstance(ks, Sequence):
        raise ConfigError(f"eval.ks={ks!r} is not a list; {fix}.")
    values = list(ks)
    if not values:
        raise ConfigError(f"eval.ks is empty; {fix}.")
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, Integral) or k < 1]
    if bad:
        raise ConfigError(f"eval.ks={values!r} contains invalid cut-offs {bad!r}; {fix}.")
    if len(set(values)) != len(values):
        raise ConfigError(f"eval.ks={values!r} contains duplicates; {fix}.")
    return tuple(int(k) for k in values)


def validate_metric_names(
    metrics: Sequence[str], known: Sequence[str] = ALL_RANKING_METRICS
) -> tuple[str, ...]:
    """Return ``metrics`` as distinct known names; else raise ConfigError (``eval.metrics``)."""
    fix = f"set eval.metrics to a non-empty list of distinct names from {list(known)}"
    if isinstance(metrics, str | bytes) or not isinstance(metrics, Sequence):
        raise ConfigError(f"eval.metrics={metrics!r} is not a list; {fix}.")
    values = list(metrics)
    unknown = [m for m in values if m not in known]
    if not values or unknown or len(set(values)) != len(values):
        problem = f"unknown names {unknown!r}" if unknown else "empty or duplicated names"
        raise ConfigError(f"eval.metrics={values!r} has {problem}; {fix}.")
    return tuple(values)


def _relevant_pairs(
    scores: Tensor, relevant: Tensor | tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """(row, item) indices of the relevant entries, on the scores' device; checks the shapes."""
    if isinstance(relevant, Tensor):
        if scores.ndim != 2 or scores.shape != relevant.shape:
            raise ValueError(
                "scores and relevant must both be [n_users, n_items], got "
                f"{tuple(scores.shape)} and {tuple(relevant.shape)}"
            )
        mask = relevant.to(device=scores.device, dtype=torch.bool)
        return mask.nonzero(as_tuple=True)
    rows, items = relevant
    if scores.ndim != 2 or rows.ndim != 1 or rows.shape != items.shape:
        raise ValueError(
            "scores must be [n_users, n_items] and the relevant (row, item) indices two 1-D "
            f"tensors of one length, got {tuple(scores.shape)}, {tuple(rows.shape)} and "
            f"{tuple(items.shape)}"
        )
    return rows.to(scores.device), items.to(scores.device)


def _nan_as_lowest(values: Tensor) -> Tensor:
    return values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _place_among_ties(rows: Tensor, values: Tensor) -> Tensor:
    """For each entry, how many entries of the same row and the same value come before it
    (0, 1, ... within each group of ties; the order inside a group is arbitrary)."""
    order = values.argsort(stable=True)
    order = order[rows[order].argsort(stable=True)]
    sorted_rows, sorted_values = rows[order], values[order]
    position = torch.arange(len(order), device=rows.device)
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[1:] = (sorted_rows[1:] != sorted_rows[:-1]) | (sorted_values[1:] != sorted_values[:-1])
    group_start = torch.where(starts, position, 0).cummax(0).values
    place = torch.empty_like(position)
    place[order] = position - group_start
    return place


class FullRankingMetrics(Metric):
    """Top-K metrics over the full item catalogue (binary relevance, pessimistic ties).

    ``compute()`` returns ``{"<metric>@<k>": mean over counted users}`` for every metric and k;
    users without relevant items are skipped, and every value is 0.0 when no user was counted.
    Ties are broken exactly for scores of any float dtype (see ``update``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        ks: Sequence[int] = (5, 10, 20),
        metrics: Sequence[str] = ALL_RANKING_METRICS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ks = validate_ks(ks)
        self.metrics = validate_metric_names(metrics)
        shape = (len(self.metrics), len(self.ks))
        self.add_state("totals", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, relevant: Tensor | tuple[Tensor, Tensor]) -> None:
        """Add a chunk of users.

        ``scores``: float [B, n_items]; excluded (training) items already set to -inf by the caller.
        ``relevant``: the held-out items, as a bool [B, n_items] matrix or as its (row, item)
        indices, each pair once (what evaluation batches hold, so no dense matrix is built).
        Rows without any are skipped.

        Pessimistic ties, exactly, with one ``topk`` and no copy of the scores: a relevant item
        ranks at #(items scoring >= it) minus its place among the relevant items tied with it
        (tied relevant items take the last places of their tie). The top-K values give that
        count for every item scoring above the K-th value; only rows where a relevant item ties
        with the K-th value need a count over the whole row. NaN counts as -inf.
        """
        rows, items = _relevant_pairs(scores, relevant)
        n_users, n_items = scores.shape
        if n_items == 0:
            return
        k_max = min(max(self.ks), n_items)
        s = scores.detach()
        top = s.topk(k_max, dim=1).values  # [B, k_max], descending; NaN sorts first
        if bool(top[:, 0].isnan().any()):
            nan_rows = top[:, 0].isnan().nonzero().squeeze(1)
            top[nan_rows] = _nan_as_lowest(s[nan_rows]).topk(k_max, dim=1).values
        kth = top[:, -1]
        rel_scores = _nan_as_lowest(s[rows, items])
        # Only the relevant items scoring at least the K-th value can be in the top K.
        near = (rel_scores >= kth[rows]).nonzero().squeeze(1)
        near_rows, near_scores = rows[near], rel_scores[near]
        at_least = (top[near_rows] >= near_scores[:, None]).sum(1)
        boundary = near_scores == kth[near_rows]  # the tie may run past the top K: count it
        if bool(boundary.any()):
            tie_rows = near_rows[boundary].unique()
            tie_kth = kth[tie_rows, None]
            beyond = (_nan_as_lowest(s[tie_rows]) == tie_kth).sum(1)
            beyond -= (top[tie_rows] == tie_kth).sum(1)
            extra = torch.zeros(n_users, dtype=at_least.dtype, device=s.device)
            extra[tie_rows] = beyond
            at_least += torch.where(boundary, extra[near_rows], 0)
        rank = at_least - _place_among_ties(near_rows, near_scores)  # 1-based
        hit = rank <= k_max
        hits = torch.zeros(n_users, k_max, dtype=torch.float64, device=s.device)
        hits[near_rows[hit], rank[hit] - 1] = 1.0
        n_rel = torch.bincount(rows, minlength=n_users)
        counted = n_rel > 0

        f64 = {"device": s.device, "dtype": torch.float64}
        ranks = torch.arange(1, k_max + 1, **f64)
        discount = 1.0 / torch.log2(ranks + 1.0)
        cols = torch.tensor([min(k, k_max) - 1 for k in self.ks], device=s.device)
        k_t = torch.tensor(self.ks, **f64)
        n_rel_f = n_rel.to(torch.float64).clamp_min(1.0)[:, None]  # clamp: skipped rows only
        ideal = torch.minimum(n_rel_f, k_t)  # [B, n_ks] = min(|R|, K) <= k_max
        cum_hits = hits.cumsum(1)
        hits_at = cum_hits[:, cols]  # [B, n_ks]

        per_user = {
            "hr": (hits_at > 0).to(torch.float64),
            "recall": hits_at / n_rel_f,
            "precision": hits_at / k_t,
            "ndcg": (hits * discount).cumsum(1)[:, cols] / discount.cumsum(0)[ideal.long() - 1],
            "mrr": (hits / ranks).cummax(1).values[:, cols],
            "map": (cum_hits / ranks * hits).cumsum(1)[:, cols] / ideal,
        }
        values = torch.stack([per_user[m] for m in self.metrics])  # [n_metrics, B, n_ks]
        self.totals += (values * counted[None, :, None]).sum(1)
        self.count += counted.sum()

    def compute(self) -> dict[str, Tensor]:
        """Mean of each metric over counted users (float32), keyed ``"<metric>@<k>"``."""
        means = (self.totals / self.count.clamp_min(1)).float()
        return {
            f"{m}@{k}": means[i, j]
            for i, m in enumerate(self.metrics)
            for j, k in enumerate(self.ks)
        }


class SampledRankingMetrics(Metric):
    """HR@K and NDCG@K under the NCF protocol: one held-out positive ranked among N negatives.

    rank = 1 + #(negatives scoring >= the positive), i.e. ties are pessimistic; NaN counts as -inf.
    ``compute()`` returns ``{"hr@<k>", "ndcg@<k>"}`` means over users (0.0 before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (5, 10, 20), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = validate_ks(ks)
        zeros = torch.zeros(len(self.ks), dtype=torch.float64)
        self.add_state("hr", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("ndcg", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pos_scores: Tensor, neg_scores: Tensor) -> None:
        """Add users: ``pos_scores`` [B] (the held-out positive), ``neg_scores`` [B, N]."""
        if pos_scores.ndim != 1 or neg_scores.ndim != 2 or neg_scores.shape[0] != len(pos_scores):
            raise ValueError(
                "pos_scores must be [n_users] and neg_scores [n_users, n_negatives], got "
                f"{tuple(pos_scores.shape)} and {tuple(neg_scores.shape)}"
            )
        pos = pos_scores.detach().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        neg = neg_scores.detach().nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        rank = 1 + (neg >= pos[:, None]).sum(1)  # [B], 1-based
        in_top = (rank[:, None] <= torch.tensor(self.ks, device=rank.device)).to(torch.float64)
        gain = 1.0 / torch.log2(rank.to(torch.float64) + 1.0)
        self.hr += in_top.sum(0)
        self.ndcg += (in_top * gain[:, None]).sum(0)
        self.count += len(rank)

    def compute(self) -> dict[str, Tensor]:
        """Mean HR@K and NDCG@K over users (float32), keyed ``"hr@<k>"`` / ``"ndcg@<k>"``."""
        n = self.count.clamp_min(1)
        hr, ndcg = (self.hr / n).float(), (self.ndcg / n).float()
        return {
            **{f"hr@{k}": hr[j] for j, k in enumerate(self.ks)},
            **{f"ndcg@{k}": ndcg[j] for j, k in enumerate(self.ks)},
        }


class RatingMetrics(Metric):
    """RMSE and MAE of rating predictions, accumulated in float64; 0.0 before any update."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("sse", "sae"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add predictions and targets of the same shape (any shape; all elements count)."""
        if preds.shape != target.shape:
            raise ValueError(
                f"preds and target must have the same shape, got {tuple(preds.shape)} "
                f"and {tuple(target.shape)}"
            )
        diff = preds.detach().to(torch.float64) - target.detach().to(torch.float64)
        self.sse += diff.square().sum()
        self.sae += diff.abs().sum()
        self.count += diff.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"rmse": ..., "mae": ...}`` (float32)."""
        n = self.count.clamp_min(1)
        return {"rmse": (self.sse / n).sqrt().float(), "mae": (self.sae / n).float()}
