"""Train / validation / test splits over :class:`Interactions`, seeded and deterministic.

Each split returns row indices into the interactions; the three parts are disjoint and cover
only rows whose user and item also appear in training (so every evaluated embedding was trained).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from recsys_compress.config import SplitConfig
from recsys_compress.data.interactions import Interactions
from recsys_compress.data.sorting import group_fraction_order, stable_argsort, time_key
from recsys_compress.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Row indices of the training, validation and test interactions."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _group_positions(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by user: each row's position within its user, and each row's user size."""
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.r_[starts, len(users)])
    group_start = np.repeat(starts, sizes)
    return np.arange(len(users)) - group_start, np.repeat(sizes, sizes)


def _sorted_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """``np.sort(rows)`` for distinct row indices below ``n``, in linear time."""
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return np.flatnonzero(mask)


def leave_one_out_split(interactions: Interactions) -> Split:
    """Each user's latest interaction is the test item, the second latest the validation item
    (the NCF protocol). Needs at least 3 interactions per user.
    """
    users = interactions.users.numpy()
    position, size = _group_positions(users)
    too_few = np.unique(users[size < 3])
    if len(too_few):
        raise ConfigError(
            f"split=loo needs 3 interactions per user (train, validation, test), but "
            f"{len(too_few)} users have fewer: set data.min_user_interactions=3 to drop them, "
            "or use split=ratio."
        )
    test = np.flatnonzero(position == size - 1)
    val = np.flatnonzero(position == size - 2)
    train = np.flatnonzero(position < size - 2)
    return Split(train=train, val=val, test=test)


def ratio_split(interactions: Interactions, ratios: list[float], seed: int) -> Split:
    """Random per-user split by ratio (RecBole's ``RS`` with random order).

    Per user, ``floor(r * n)`` interactions go to validation and test; a part whose share is
    between 0 and 1 interaction still gets one while more than one stays in training.
    """
    users = interactions.users.numpy()
    rng = np.random.default_rng(seed)
    order = group_fraction_order(users, interactions.num_users, rng.random(len(users)))
    grouped = users[order]
    # Counts per user (not per row): how many of its interactions train and validate.
    size = np.bincount(grouped, minlength=interactions.num_users)
    total = sum(ratios)
    counts = []
    train_count = size.copy()
    for share in (ratios[1] / total, ratios[2] / total):
        count = np.floor(share * size).astype(np.int64)
        bump = (count == 0) & (share * size > 0) & (train_count - count > 1)
        count = count + bump
        train_count = train_count - count
        counts.append(count)
    val_end = train_count + counts[0]
    position = np.arange(len(users)) - (np.cumsum(size) - size)[grouped]
    part = np.empty(len(users), dtype=np.int8)  # 0 train, 1 validation, 2 test; by row
    part[order] = (position >= train_count[grouped]).view(np.int8) + (position >= val_end[grouped])
    return Split(
        train=np.flatnonzero(part == 0),
        val=np.flatnonzero(part == 1),
        test=np.flatnonzero(part == 2),
    )


def temporal_split(interactions: Interactions, ratios: list[float]) -> Split:
    """Global split by time: the earliest interactions train, the latest test.

    Validation and test rows whose user or item never occurs in training are dropped (their
    embeddings would be untrained); how many is logged.
    """
    timestamps = interactions.timestamps.numpy()
    if np.isnan(timestamps).any():
        raise ConfigError(
            "split=temporal needs timestamps, but the data has none: set data.timestamp_col, "
            "or use split=ratio."
        )
    keyed = time_key(timestamps)
    order = stable_argsort(*keyed) if keyed else np.argsort(timestamps, kind="stable")
    total = sum(ratios)
    n = len(order)
    train_end = round(n * ratios[0] / total)
    val_end = round(n * (ratios[0] + ratios[1]) / total)
    train = _sorted_rows(order[:train_end], n)
    users = interactions.users.numpy()
    items = interactions.items.numpy()
    seen_users = np.zeros(interactions.num_users, dtype=bool)
    seen_items = np.zeros(interactions.num_items, dtype=bool)
    seen_users[users[train]] = True
    seen_items[items[train]] = True
    parts = []
    for part in (order[train_end:val_end], order[val_end:]):
        known = seen_users[users[part]] & seen_items[items[part]]
        if (~known).any():
            log.info("temporal split: dropped %d rows of unseen users/items", (~known).sum())
        parts.append(_sorted_rows(part[known], n))
    return Split(train=train, val=parts[0], test=parts[1])


def make_split(interactions: Interactions, cfg: SplitConfig, seed: int) -> Split:
    """The split named by ``cfg.name``; raises if validation or test would be empty."""
    if cfg.name == "loo":
        split = leave_one_out_split(interactions)
    elif cfg.name == "ratio":
        split = ratio_split(interactions, cfg.ratios, cfg.seed if cfg.seed is not None else seed)
    else:
        split = temporal_split(interactions, cfg.ratios)
    for part in ("val", "test"):
        if len(getattr(split, part)) == 0:
            raise ConfigError(
                f"split={cfg.name} left the {part} set empty: the data is too small for "
                f"split.ratios={list(cfg.ratios)}; use more data or larger ratios."
            )
    return split
