"""Leave-one-out, ratio and temporal splits on small interaction sets built here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_compress.config import SplitConfig
from recsys_compress.data.interactions import Interactions, preprocess
from recsys_compress.data.splits import (
    Split,
    leave_one_out_split,
    make_split,
    ratio_split,
    temporal_split,
)
from recsys_compress.errors import ConfigError

RATIOS = [0.8, 0.1, 0.1]


def interactions(
    sizes: list[int], num_items: int = 60, seed: int = 0, timestamps: str = "random"
) -> Interactions:
    """User ``u`` gets ``sizes[u]`` distinct items; timestamps are distinct (random order)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.concatenate([rng.choice(num_items, size, replace=False) for size in sizes])
    if timestamps == "random":
        ts = rng.permutation(len(users)).astype(float)
    else:
        ts = np.full(len(users), np.nan)
    frame = pd.DataFrame({"user": users, "item": items, "rating": 1.0, "timestamp": ts})
    inter = preprocess(frame)
    assert len(inter) == len(users)
    return inter


def assert_partition(split: Split, n: int) -> None:
    parts = [split.train, split.val, split.test]
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "parts overlap"
    assert sorted(joined.tolist()) == list(range(n)), "parts do not cover every row"
    for part in parts:
        assert part.tolist() == sorted(part.tolist())


def per_user_counts(inter: Interactions, rows: np.ndarray) -> np.ndarray:
    return np.bincount(inter.users.numpy()[rows], minlength=inter.num_users)


# ------------------------------------------------------------------------------------------------
# leave one out
# ------------------------------------------------------------------------------------------------


def test_leave_one_out_takes_latest_as_test_and_second_latest_as_val():
    inter = interactions([3, 5, 10, 4, 7], seed=1)
    split = leave_one_out_split(inter)
    assert_partition(split, len(inter))
    users, ts = inter.users.numpy(), inter.timestamps.numpy()
    assert per_user_counts(inter, split.test).tolist() == [1] * 5
    assert per_user_counts(inter, split.val).tolist() == [1] * 5
    assert per_user_counts(inter, split.train).tolist() == [1, 3, 8, 2, 5]
    for u in range(inter.num_users):
        own = np.flatnonzero(users == u)
        by_time = own[np.argsort(ts[own])]
        (test_row,) = split.test[users[split.test] == u]
        (val_row,) = split.val[users[split.val] == u]
        assert test_row == by_time[-1]
        assert val_row == by_time[-2]
        assert sorted(split.train[users[split.train] == u]) == sorted(by_time[:-2])


def test_leave_one_out_needs_three_interactions_per_user():
    inter = interactions([3, 2, 5, 1])
    with pytest.raises(ConfigError, match=r"data\.min_user_interactions") as info:
        leave_one_out_split(inter)
    assert "2 users" in str(info.value)


# ------------------------------------------------------------------------------------------------
# ratio
# ------------------------------------------------------------------------------------------------


def test_ratio_split_is_seeded():
    inter = interactions([10, 20, 7, 15, 30, 12])
    a, b = ratio_split(inter, RATIOS, 3), ratio_split(inter, RATIOS, 3)
    c = ratio_split(inter, RATIOS, 4)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.test, c.test)
    assert_partition(a, len(inter))
    assert_partition(c, len(inter))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1, (1, 0, 0)),
        (2, (1, 1, 0)),
        (3, (1, 1, 1)),
        (5, (3, 1, 1)),  # floor(0.5) = 0, bumped to 1
        (10, (8, 1, 1)),
        (19, (17, 1, 1)),
        (20, (16, 2, 2)),
        (25, (21, 2, 2)),
    ],
)
def test_ratio_split_per_user_counts(size, expected):
    inter = interactions([size, 10], num_items=30)
    split = ratio_split(inter, RATIOS, 0)
    counts = tuple(int(per_user_counts(inter, rows)[0]) for rows in split.__dict__.values())
    assert counts == expected
    assert_partition(split, len(inter))


def test_ratio_split_unnormalised_ratios_and_uneven_shares():
    inter = interactions([20, 40], num_items=50)
    # [6, 3, 1] / 10: val floor(0.3 n), test floor(0.1 n)
    split = ratio_split(inter, [6, 3, 1], 0)
    assert per_user_counts(inter, split.val).tolist() == [6, 12]
    assert per_user_counts(inter, split.test).tolist() == [2, 4]
    assert per_user_counts(inter, split.train).tolist() == [12, 24]


def test_ratio_split_has_no_pair_in_two_parts():
    inter = interactions([12, 9, 30, 4, 6], num_items=40, seed=5)
    split = ratio_split(inter, RATIOS, 11)
    users, items = inter.users.numpy(), inter.items.numpy()

    def pairs(rows):
        return set(zip(users[rows].tolist(), items[rows].tolist(), strict=True))

    assert not pairs(split.train) & pairs(split.test)
    assert not pairs(split.train) & pairs(split.val)
    assert not pairs(split.val) & pairs(split.test)


def test_ratio_split_is_random_within_user():
    # over seeds, each of a user's rows lands in test sometimes (not always the same position)
    inter = interactions([10])
    hits = np.zeros(10, dtype=int)
    for seed in range(60):
        hits[ratio_split(inter, RATIOS, seed).test] += 1
    assert hits.sum() == 60
    assert (hits > 0).all()


# ------------------------------------------------------------------------------------------------
# temporal
# ------------------------------------------------------------------------------------------------


def test_temporal_split_orders_parts_by_time_and_drops_unseen():
    rng = np.random.default_rng(0)
    n = 200
    users = rng.integers(0, 15, n)
    items = rng.integers(0, 25, n)
    ts = rng.permutation(n).astype(float)
    # user 99 and item 999 only occur at the very end: they must be dropped from val/test
    users = np.r_[users, 99, 99, 3]
    items = np.r_[items, 4, 7, 999]
    ts = np.r_[ts, 1000.0, 1001.0, 1002.0]
    frame = pd.DataFrame({"user": users, "item": items, "rating": 1.0, "timestamp": ts})
    inter = preprocess(frame)
    m = len(inter)
    split = temporal_split(inter, RATIOS)
    t = inter.timestamps.numpy()

    # expected parts: the first 80% / next 10% / last 10% by time
    order = np.argsort(t, kind="stable")
    train_end, val_end = round(0.8 * m), round(0.9 * m)
    assert sorted(split.train.tolist()) == sorted(order[:train_end].tolist())
    seen_u = set(inter.users.numpy()[split.train].tolist())
    seen_i = set(inter.items.numpy()[split.train].tolist())

    def known(rows):
        return sorted(
            r
            for r in rows.tolist()
            if inter.users[r].item() in seen_u and inter.items[r].item() in seen_i
        )

    assert split.val.tolist() == known(order[train_end:val_end])
    assert split.test.tolist() == known(order[val_end:])
    assert len(split.test) < m - val_end  # something was dropped
    assert t[split.train].max() <= t[split.val].min()
    assert t[split.val].max() <= t[split.test].min()
    for part in (split.val, split.test):
        assert set(inter.users.numpy()[part].tolist()) <= seen_u
        assert set(inter.items.numpy()[part].tolist()) <= seen_i
    raw_test_users = set(inter.user_ids[inter.users.numpy()[split.test]].tolist())
    raw_test_items = set(inter.item_ids[inter.items.numpy()[split.test]].tolist())
    assert 99 not in raw_test_users and 999 not in raw_test_items
    joined = np.concatenate([split.train, split.val, split.test])
    assert len(np.unique(joined)) == len(joined)


def test_temporal_split_with_tied_timestamps():
    inter = interactions([8, 8, 8, 8], num_items=10)
    inter.timestamps[:] = 5.0  # all equal: stable order, still a valid split
    split = temporal_split(inter, RATIOS)
    assert len(split.train) == round(0.8 * 32)
    assert split.train.tolist() == list(range(26))


def test_temporal_split_needs_timestamps():
    inter = interactions([5, 5], timestamps="none")
    with pytest.raises(ConfigError, match=r"data\.timestamp_col"):
        temporal_split(inter, RATIOS)


# ------------------------------------------------------------------------------------------------
# make_split
# ------------------------------------------------------------------------------------------------


def test_make_split_dispatches_and_uses_seeds():
    inter = interactions([10, 12, 8, 9], seed=2)
    loo = make_split(inter, SplitConfig(name="loo"), seed=0)
    assert np.array_equal(loo.test, leave_one_out_split(inter).test)
    run_seeded = make_split(inter, SplitConfig(name="ratio"), seed=5)
    assert np.array_equal(run_seeded.test, ratio_split(inter, RATIOS, 5).test)
    own_seed = make_split(inter, SplitConfig(name="ratio", seed=7), seed=5)
    assert np.array_equal(own_seed.test, ratio_split(inter, RATIOS, 7).test)
    temporal = make_split(inter, SplitConfig(name="temporal"), seed=0)
    assert np.array_equal(temporal.train, temporal_split(inter, RATIOS).train)


def test_make_split_raises_on_empty_test():
    # every user has 2 interactions: ratio split puts 1 in train, 1 in val, none in test
    inter = interactions([2, 2, 2])
    with pytest.raises(ConfigError, match="left the test set empty"):
        make_split(inter, SplitConfig(name="ratio"), seed=0)


def test_make_split_raises_on_empty_val():
    # 5 rows: train_end = round(4.0) = 4, val_end = round(4.5) = 4 -> no validation rows
    inter = interactions([5], num_items=10)
    with pytest.raises(ConfigError, match="left the val set empty") as info:
        make_split(inter, SplitConfig(name="temporal"), seed=0)
    assert "split.ratios" in str(info.value)
