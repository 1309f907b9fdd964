"""Uniform negative sampling that never returns an excluded (positive) item, with no rejection.

For a user with sorted positives ``p_0 < ... < p_{d-1}``, the r-th non-positive item
(``0 <= r < n - d``) is ``r + #{j : p_j - j <= r}``. Storing ``p_j - j`` for all users in one sorted
key array turns that count into one ``searchsorted`` for a pass of many users' draws: exact,
uniform, vectorised, and its cost does not grow for users who interacted with most items.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys_compress.data.sorting import sorted_unique
from recsys_compress.errors import DataError

# Users whose draws :meth:`ExclusionSampler.sample` turns into items in one pass of its
# element-wise ops (a few MB of temporaries at a few negatives each).
USERS_PER_PASS = 1 << 17
# At most this many draws per pass: with many draws per user (sampled evaluation's 99) a pass
# then holds fewer users, whose keys are a short slice of the key array that stays in cache
# during its search (at 1M users x 100k items, 99 draws a user: ~30 against ~40-50 ns a draw).
DRAWS_PER_PASS = 1 << 18


class ExclusionSampler:
    """Draws items uniformly from those a user has NOT interacted with (in the given pairs)."""

    def __init__(
        self, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int
    ) -> None:
        self.num_items = num_items
        user_ids = users.long().cpu().numpy()
        pairs = user_ids * num_items + items.long().cpu().numpy()
        pair_keys = sorted_unique(pairs, user_ids)
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
        self,
        users: torch.Tensor,
        k: int,
        generator: torch.Generator | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[len(users), k]`` items, each uniform over the user's non-excluded items.

        ``out``: a contiguous int64 ``[len(users), k]`` tensor to write them into. The uniform
        draws are made into its memory in one call (the same numbers as a float64
        ``torch.rand``) and turned into items in passes of up to :data:`USERS_PER_PASS` users and
        :data:`DRAWS_PER_PASS` draws, so the temporaries stay small (at 8M users x 4 negatives
        the one-pass form held four ``[8M, 4]`` tensors, ~1 GB, at once).

        Each pass searches only the keys of the users between its smallest and largest: keys
        below hold smaller users (all counted), keys above larger ones (none counted), so the
        items are those of one search over all keys. Callers pass users sorted (interactions
        are sorted by user), which makes that slice short."""
        users = users.long()
        shape = (len(users), k)
        if out is None:
            out = torch.empty(shape, dtype=torch.int64)
        if out.shape != shape or out.dtype != torch.int64 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous int64 tensor of shape {shape}")
        # float64 and int64 share a size: each row's draws are read before its items overwrite them
        uniform = torch.rand(
            shape, generator=generator, dtype=torch.float64, out=out.view(torch.float64)
        )
        step = max(1, min(USERS_PER_PASS, DRAWS_PER_PASS // max(k, 1)))
        for start in range(0, len(users), step):
            part = users[start : start + step]
            free = self.num_items - self.degree[part]
            # in place in the draws' memory, which this pass's items overwrite
            rank = uniform[start : start + len(part)].mul_(free.to(torch.float64)[:, None]).long()
            rank = torch.minimum(rank, (free - 1)[:, None], out=rank)
            query = rank + (part * (self.num_items + 1))[:, None]
            lo = int(self.indptr[int(part.min())])
            keys = self._keys[lo : int(self.indptr[int(part.max()) + 1])]
            below = torch.searchsorted(keys, query, right=True)
            out[start : start + len(part)] = below.sub_(self.indptr[part][:, None] - lo).add_(rank)
        return out
