"""The synthetic generator: exact Gumbel top-k on small catalogues, candidates on large ones."""

from __future__ import annotations

import numpy as np
import torch

from recsys_compress.data import synthetic
from recsys_compress.data.synthetic import synthetic_interactions


def test_large_catalogue_draws_distinct_items_by_popularity_and_factors() -> None:
    num_users, num_items, per_user = 3000, 20_000, 8
    assert num_items > synthetic.EXACT_MAX_ITEMS  # the candidate path
    frame = synthetic_interactions(num_users, num_items, per_user, seed=3)
    assert len(frame) == num_users * per_user
    assert (frame.groupby("user").item.nunique() == per_user).all()
    assert frame.item.between(0, num_items - 1).all()
    # Popularity: the 1% most popular items (rank^-1/2 weights) get ~10% of the picks.
    generator = torch.Generator().manual_seed(3)
    torch.randn(num_users, 8, generator=generator)
    torch.randn(num_items, 8, generator=generator)
    rank_of_item = torch.randperm(num_items, generator=generator).numpy()
    top = rank_of_item[frame.item.to_numpy()] < num_items // 100
    assert 0.05 < top.mean() < 0.2
    # Factors: picked items score higher u·v than the popularity proposal alone would give.
    generator = torch.Generator().manual_seed(3)
    users = torch.randn(num_users, 8, generator=generator)
    items = torch.randn(num_items, 8, generator=generator)
    picked = (users[frame.user.to_numpy().copy()] * items[frame.item.to_numpy().copy()]).sum(1)
    assert float(picked.mean()) > 2.0  # E[u·v] is 0 for items unrelated to the user


def test_candidate_path_is_seeded() -> None:
    a = synthetic_interactions(200, 20_000, 5, seed=1)
    b = synthetic_interactions(200, 20_000, 5, seed=1)
    c = synthetic_interactions(200, 20_000, 5, seed=2)
    assert np.array_equal(a.item.to_numpy(), b.item.to_numpy())
    assert not np.array_equal(a.item.to_numpy(), c.item.to_numpy())


def _candidate_reference(num_users: int, num_items: int, per_user: int, seed: int) -> np.ndarray:
    """The candidate path written out with torch's fancy indexing and row sort, one user chunk."""
    generator = torch.Generator().manual_seed(seed)
    users = torch.randn(num_users, 8, generator=generator)
    items = torch.randn(num_items, 8, generator=generator)
    rank_of_item = torch.randperm(num_items, generator=generator)
    item_of_rank = torch.argsort(rank_of_item)
    span = 2.0 * np.sqrt(num_items + 1) - 2.0
    draws = torch.rand((num_users, synthetic.CANDIDATES), generator=generator, dtype=torch.float64)
    ranks = ((draws * span / 2 + 1.0) ** 2).long() - 1
    pool = item_of_rank[ranks.clamp(max=num_items - 1)].sort(dim=1).values
    logits = torch.einsum("ud,ucd->uc", users, items[pool])
    repeated = torch.zeros_like(pool, dtype=torch.bool)
    repeated[:, 1:] = pool[:, 1:] == pool[:, :-1]
    logits[repeated] = float("-inf")
    uniform = torch.rand(logits.shape, generator=generator).clamp(1e-12, 1.0)
    picks = torch.topk(logits - torch.log(-torch.log(uniform)), per_user, dim=1).indices
    return pool.gather(1, picks).reshape(-1).numpy()


def test_candidate_path_equals_the_straightforward_form() -> None:
    """numpy's row sort and ``index_select`` (the fast gathers) pick the same items."""
    frame = synthetic_interactions(500, 30_000, 6, seed=4)
    assert np.array_equal(frame.item.to_numpy(), _candidate_reference(500, 30_000, 6, seed=4))
