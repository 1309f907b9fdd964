"""Uniform negative sampling that never returns an excluded (positive) item, with no rejection.

For a user with sorted positives ``p_0 < ... < p_{d-1}``, the r-th non-positive item
(``0 <= r < n - d``) is ``r + #{j : p_j - j <= r}``. Storing ``p_j - j`` for all users in one sorted
key array turns that count into one ``searchsorted`` over the whole batch: exact, uniform,
vectorised, and its cost does not grow for users who interacted with most items.
"""

from __future__ import annotations

import torch

from recsys_compress.errors import DataError


class ExclusionSampler:
    """Draws items uniformly from those a user has NOT interacted with (in the given pairs)."""

    def __init__(
        self, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int
    ) -> None:
        self.num_items = num_items
        keys = torch.unique(users.long() * num_items + items.long())  # sorted, deduplicated
        pair_users = torch.div(keys, num_items, rounding_mode="floor")
        pair_items = keys - pair_users * num_items
        counts = torch.bincount(pair_users, minlength=num_users)
        self.indptr = torch.zeros(num_users + 1, dtype=torch.long)
        self.indptr[1:] = torch.cumsum(counts, 0)
        self.degree = counts
        rank_in_user = torch.arange(len(keys)) - self.indptr[pair_users]
        self._keys = pair_users * (num_items + 1) + (pair_items - rank_in_user)
        full = torch.nonzero(counts >= num_items).flatten()
        if len(full):
            raise DataError(
                f"{len(full)} users interacted with every item, so no negative item exists for "
                "them: filter them out (e.g. data.min_item_interactions) or add items."
            )

    def sample(
        self, users: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[len(users), k]`` items, each uniform over the user's non-excluded items."""
        users = users.long()
        free = (self.num_items - self.degree[users]).to(torch.float64)
        uniform = torch.rand((len(users), k), generator=generator, dtype=torch.float64)
        rank = (uniform * free[:, None]).long()
        rank = torch.minimum(rank, (free[:, None] - 1).long())
        base = users[:, None] * (self.num_items + 1)
        below = torch.searchsorted(self._keys, base + rank, right=True) - self.indptr[users, None]
        return rank + below
