"""Uniform negative sampling that never returns an excluded (positive) item, with no rejection.

For a user with sorted positives ``p_0 < ... < p_{d-1}``, the r-th non-positive item
(``0 <= r < n - d``) is ``r + #{j : p_j - j <= r}``. Storing ``p_j - j`` for all users in one sorted
key array turns that count into one ``searchsorted`` over the whole batch: exact, uniform,
vectorised, and its cost does not grow for users who interacted with most items.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys_compress.data.sorting import sorted_unique
from recsys_compress.errors import DataError


class ExclusionSampler:
    """Draws items uniformly from those a user has NOT interacted with (in the given pairs)."""

    def __init__(
        self, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int
    ) -> None:
        self.num_items = num_items
        pairs = users.long().cpu().numpy() * num_items + items.long().cpu().numpy()
        pair_keys = sorted_unique(pairs)
        pair_users = pair_keys // num_items
        counts = np.bincount(pair_users, minlength=num_users)
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        # user * (num_items + 1) + item - rank_in_user, with rank_in_user = j - indptr[user]
        keys = pair_keys + pair_users
        keys += indptr[pair_users]
        keys -= np.arange(len(keys))
        self._keys = torch.from_numpy(keys)
        self.indptr = torch.from_numpy(indptr)
        self.degree = torch.from_numpy(counts)
        full = np.flatnonzero(counts >= num_items)
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
        free = self.num_items - self.degree[users]
        uniform = torch.rand((len(users), k), generator=generator, dtype=torch.float64)
        rank = uniform.mul_(free.to(torch.float64)[:, None]).long()
        rank = torch.minimum(rank, (free - 1)[:, None], out=rank)
        query = rank + (users * (self.num_items + 1))[:, None]
        below = torch.searchsorted(self._keys, query, right=True)
        return below.sub_(self.indptr[users][:, None]).add_(rank)
