"""Interactions: raw (user, item, rating, timestamp) rows -> contiguous-id tensors, cached on disk.

Preprocessing turns the rows into implicit feedback (every rating, or ratings >= a threshold) or
explicit ratings, drops repeated (user, item) pairs (the latest one stays), applies k-core
filtering and remaps ids to ``0..n-1`` while keeping the raw ids, so that recommendations can be
reported in the dataset's own ids. The result is cached as an ``.npz`` keyed by everything that
determines it, so a second run skips parsing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_compress.config import DataConfig
from recsys_compress.data.sorting import (
    dense_span,
    grouped_kind,
    lexsort_ints,
    stable_argsort,
    time_key,
)
from recsys_compress.errors import DataError
from recsys_compress.io import atomic_write

log = logging.getLogger(__name__)

# Bump when preprocessing changes, so stale caches are not reused.
CACHE_VERSION = 1


@dataclass
class Interactions:
    """Deduplicated interactions with contiguous ids, sorted by (user, timestamp, row order).

    ``user_ids[u]`` / ``item_ids[i]`` give the raw id of internal user ``u`` / item ``i``.
    ``ratings`` is NaN-free for explicit feedback; ``timestamps`` is NaN where the source has none.
    """

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    timestamps: torch.Tensor
    num_users: int
    num_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.users.numel())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays, as stored in the cache file."""
        return {
            "users": self.users.numpy(),
            "items": self.items.numpy(),
            "ratings": self.ratings.numpy(),
            "timestamps": self.timestamps.numpy(),
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Interactions:
        return cls(
            users=torch.from_numpy(np.ascontiguousarray(arrays["users"])),
            items=torch.from_numpy(np.ascontiguousarray(arrays["items"])),
            ratings=torch.from_numpy(np.ascontiguousarray(arrays["ratings"])),
            timestamps=torch.from_numpy(np.ascontiguousarray(arrays["timestamps"])),
            num_users=len(arrays["user_ids"]),
            num_items=len(arrays["item_ids"]),
            user_ids=arrays["user_ids"],
            item_ids=arrays["item_ids"],
        )


def _id_array(values: pd.Series) -> np.ndarray:
    """Raw ids as an array that ``np.savez`` stores without pickle (int64 or fixed-width str)."""
    array = values.to_numpy()
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    return array.astype(str)


def _k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Boolean mask of the rows that survive iterative k-core filtering."""
    keep = np.ones(len(users), dtype=bool)
    if min_user <= 1 and min_item <= 1:
        return keep
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max() + 1)
        item_counts = np.bincount(items[keep], minlength=items.max() + 1)
        new_keep = keep & (user_counts[users] >= min_user) & (item_counts[items] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def _factorize(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``pd.factorize(ids, sort=True)``; integer ids spanning at most a few times as many values
    as there are rows (MovieLens ids) take a faster route through a dense lookup table."""
    values = ids.to_numpy()
    if values.dtype.kind in "iu" and len(values):
        low, high = int(values.min()), int(values.max())
        if dense_span(low, high, len(values)):
            codes, uniques = _compact(values.astype(np.int64, copy=False) - low, high - low + 1)
            return codes, (uniques + low).astype(values.dtype)
    return pd.factorize(ids, sort=True)


def _user_time_order(users: np.ndarray, timestamps: np.ndarray, num_users: int) -> np.ndarray:
    """Row order by (user, timestamp with NaN first, row): one packed integer sort when the
    timestamps are whole numbers, else a stable float sort then a stable sort by user."""
    keyed = time_key(timestamps)
    if keyed is not None:
        return lexsort_ints([users, keyed[0]], [num_users, keyed[1]])
    by_time = np.argsort(np.nan_to_num(timestamps, nan=-np.inf), kind="stable")
    return by_time[stable_argsort(users[by_time], num_users)]


# Up to this many (user, item) cells, and 64 a pair, repeated pairs are found with a bitmap of
# the cells (one byte each: 22 MB at ML-1M, 6.6 ms against 52-66 ms for sorting the 1M pairs,
# timing loops outside the repo); else by a sort.
BITMAP_CELLS = 1 << 26


def _has_repeats(pairs: np.ndarray, size: int) -> bool:
    """Whether ``pairs`` (``user * num_items + item`` in ``[0, size)``, in user order) holds a
    value twice."""
    if size <= min(BITMAP_CELLS, 64 * len(pairs)):
        seen = np.zeros(size, dtype=bool)
        seen[pairs] = True
        return int(np.count_nonzero(seen)) < len(pairs)
    ordered = np.sort(pairs, kind=grouped_kind())  # grouped by user
    return bool((ordered[1:] == ordered[:-1]).any())


def _compact(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes in ``[0, size)`` -> (codes renumbered ``0..m-1`` in the same order, the ``m`` old
    codes that occur, ascending): ``np.unique(codes, return_inverse=True)`` without a sort."""
    used = np.bincount(codes, minlength=size) > 0
    if used.all():
        return codes, np.arange(size)
    return (np.cumsum(used) - 1)[codes], np.flatnonzero(used)


def preprocess(
    frame: pd.DataFrame,
    *,
    feedback: str = "implicit",
    rating_threshold: float | None = None,
    min_user_interactions: int = 0,
    min_item_interactions: int = 0,
    origin: str = "the data file",
) -> Interactions:
    """Turn raw rows (columns user, item, rating, timestamp) into :class:`Interactions`.

    ``origin`` names the file in error messages.
    """
    if feedback == "explicit" and frame["rating"].isna().any():
        raise DataError(
            f"{origin} has rows without a rating, but data.feedback=explicit needs one per row: "
            "set data.rating_col to the rating column, or use data.feedback=implicit."
        )
    if rating_threshold is not None and frame["rating"].isna().all():
        raise DataError(
            f"data.rating_threshold={rating_threshold} but {origin} has no ratings: "
            "set data.rating_col, or data.rating_threshold=null."
        )
    user_codes, user_ids = _factorize(frame["user"])
    item_codes, item_ids = _factorize(frame["item"])
    timestamps = frame["timestamp"].to_numpy(np.float64)
    ratings = frame["rating"].to_numpy(np.float32)
    # Rows by (user, time, row order): the final order, in which the last row of a repeated
    # (user, item) pair is its latest interaction, the one that stays.
    rows = _user_time_order(user_codes, timestamps, len(user_ids))
    pair = user_codes[rows] * max(len(item_ids), 1) + item_codes[rows]
    if _has_repeats(pair, len(user_ids) * max(len(item_ids), 1)):
        rows = rows[~pd.Series(pair).duplicated(keep="last").to_numpy()]
    if rating_threshold is not None:
        # After de-duplication: a pair counts as positive by its latest rating.
        rows = rows[ratings[rows] >= rating_threshold]
    if len(rows):
        rows = rows[
            _k_core(
                user_codes[rows], item_codes[rows], min_user_interactions, min_item_interactions
            )
        ]
    if len(rows) == 0:
        raise DataError(
            f"no interactions left in {origin} after filtering (data.rating_threshold="
            f"{rating_threshold}, data.min_user_interactions={min_user_interactions}, "
            f"data.min_item_interactions={min_item_interactions}): lower these values."
        )
    users, used_users = _compact(user_codes[rows], len(user_ids))
    items, used_items = _compact(item_codes[rows], len(item_ids))
    return Interactions(
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        ratings=torch.from_numpy(ratings[rows]),
        timestamps=torch.from_numpy(timestamps[rows]),
        num_users=len(used_users),
        num_items=len(used_items),
        user_ids=_id_array(pd.Series(np.asarray(user_ids)[used_users])),
        item_ids=_id_array(pd.Series(np.asarray(item_ids)[used_items])),
    )


def _cache_key(cfg: DataConfig) -> str:
    """Hash of everything that determines the processed tensors (cache location excluded)."""
    fields = asdict(cfg)
    for ignored in ("cache_dir", "use_cache", "connect_timeout", "name"):
        fields.pop(ignored)
    if cfg.source != "synthetic":
        fields.pop("synthetic")
    if cfg.path:
        stat = Path(cfg.path).stat()
        fields["file"] = [str(Path(cfg.path).resolve()), stat.st_size, stat.st_mtime_ns]
    fields["version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def _load_frame(cfg: DataConfig, cache_dir: Path) -> tuple[pd.DataFrame, str]:
    """Raw rows and a description of where they came from."""
    from recsys_compress.data import sources
    from recsys_compress.data.synthetic import synthetic_interactions

    if cfg.source == "synthetic":
        s = cfg.synthetic
        frame = synthetic_interactions(s.num_users, s.num_items, s.interactions_per_user, s.seed)
        return frame, "synthetic data"
    if cfg.source == "csv":
        assert cfg.path is not None
        frame = sources.read_interaction_file(
            Path(cfg.path),
            fmt=cfg.format,
            sep=cfg.sep,
            user_col=cfg.user_col,
            item_col=cfg.item_col,
            rating_col=cfg.rating_col,
            timestamp_col=cfg.timestamp_col,
        )
        return frame, str(cfg.path)
    path = Path(cfg.path) if cfg.path else None
    frame = sources.load_movielens(
        cfg.source, cache_dir=cache_dir, path=path, connect_timeout=cfg.connect_timeout
    )
    return frame, str(path) if path else f"{cfg.source} in {cache_dir}"


def load_interactions(cfg: DataConfig) -> Interactions:
    """Read, preprocess and cache the interactions that ``cfg`` describes."""
    from recsys_compress.data.sources import default_cache_dir

    if cfg.path and not Path(cfg.path).is_file():
        raise DataError(f"data.path={cfg.path} does not exist: point data.path at the file.")
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    cache_file = cache_dir / "processed" / f"{cfg.source}-{_cache_key(cfg)}.npz"
    if cfg.use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as arrays:
                log.info("Loaded processed interactions from %s", cache_file)
                return Interactions.from_arrays(dict(arrays))
        except (OSError, ValueError, KeyError) as err:
            log.warning("Ignoring unreadable cache %s (%s); rebuilding it.", cache_file, err)
    frame, origin = _load_frame(cfg, cache_dir)
    interactions = preprocess(
        frame,
        feedback=cfg.feedback,
        rating_threshold=cfg.rating_threshold,
        min_user_interactions=cfg.min_user_interactions,
        min_item_interactions=cfg.min_item_interactions,
        origin=origin,
    )
    if cfg.use_cache and cfg.source != "synthetic":
        with atomic_write(cache_file) as handle:
            np.savez(handle, **interactions.to_arrays())
    return interactions
