"""Synthetic implicit feedback with a learnable structure, for tests and scale runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def synthetic_interactions(
    num_users: int,
    num_items: int,
    interactions_per_user: int,
    seed: int = 0,
    *,
    latent_dim: int = 8,
    user_chunk: int = 4096,
) -> pd.DataFrame:
    """Each user picks ``interactions_per_user`` distinct items with probability proportional to
    ``exp(u·v + popularity)`` (Gumbel top-k), so a model that learns the factors beats popularity.

    Rows come in per-user order with increasing timestamps; ``rating`` is NaN. Memory stays at
    ``user_chunk x num_items`` scores, so 1M x 100k is feasible.
    """
    generator = torch.Generator().manual_seed(seed)
    user_factors = torch.randn(num_users, latent_dim, generator=generator)
    item_factors = torch.randn(num_items, latent_dim, generator=generator)
    popularity = -torch.log(torch.arange(1, num_items + 1, dtype=torch.float32)) * 0.5
    popularity = popularity[torch.randperm(num_items, generator=generator)]
    chosen = []
    for start in range(0, num_users, user_chunk):
        logits = user_factors[start : start + user_chunk] @ item_factors.T + popularity
        uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-12, 1.0)
        gumbel = -torch.log(-torch.log(uniform))
        chosen.append(torch.topk(logits + gumbel, interactions_per_user, dim=1).indices)
    items = torch.cat(chosen).numpy().reshape(-1)
    users = np.repeat(np.arange(num_users, dtype=np.int64), interactions_per_user)
    timestamps = np.tile(np.arange(interactions_per_user, dtype=np.float64), num_users)
    timestamps += users * 1e-3
    return pd.DataFrame(
        {
            "user": users,
            "item": items.astype(np.int64),
            "rating": np.full(len(users), np.nan, dtype=np.float32),
            "timestamp": timestamps,
        }
    )
