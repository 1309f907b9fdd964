"""Preprocessing (feedback, thresholds, duplicates, k-core, id remap) and the on-disk cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_compress.config import DataConfig
from recsys_compress.data import sources
from recsys_compress.data.interactions import load_interactions, preprocess
from recsys_compress.errors import DataError


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


# (u1, i1) occurs three times: the latest (t=40, rating 2) must win although another row comes
# later in the file (t=5) and the first row has the highest rating.
ROWS = [
    ("u2", "i3", 4.0, 30.0),
    ("u1", "i1", 5.0, 20.0),
    ("u1", "i2", 3.0, 10.0),
    ("u1", "i1", 2.0, 40.0),
    ("u1", "i1", 4.0, 5.0),
    ("u3", "i1", 1.0, 50.0),
    ("u2", "i1", 5.0, 25.0),
]


def as_tuples(inter) -> list[tuple]:
    """(raw user, raw item, rating, timestamp) per row, in the stored row order."""
    return [
        (str(inter.user_ids[u]), str(inter.item_ids[i]), float(r), float(t))
        for u, i, r, t in zip(
            inter.users.tolist(),
            inter.items.tolist(),
            inter.ratings.tolist(),
            inter.timestamps.tolist(),
            strict=True,
        )
    ]


@pytest.mark.parametrize("feedback", ["implicit", "explicit"])
def test_dedup_keeps_latest_and_rows_sorted_by_user_then_time(feedback):
    inter = preprocess(frame(ROWS), feedback=feedback)
    assert as_tuples(inter) == [
        ("u1", "i2", 3.0, 10.0),
        ("u1", "i1", 2.0, 40.0),
        ("u2", "i1", 5.0, 25.0),
        ("u2", "i3", 4.0, 30.0),
        ("u3", "i1", 1.0, 50.0),
    ]
    assert inter.users.tolist() == [0, 0, 1, 1, 2]
    assert inter.items.tolist() == [1, 0, 0, 2, 0]
    assert (inter.num_users, inter.num_items) == (3, 3)
    assert list(inter.user_ids) == ["u1", "u2", "u3"]
    assert list(inter.item_ids) == ["i1", "i2", "i3"]
    assert len(inter) == 5
    assert inter.users.dtype == inter.items.dtype == torch.int64


def test_equal_timestamps_later_row_wins():
    inter = preprocess(frame([("a", "x", 1.0, 7.0), ("a", "x", 3.0, 7.0), ("a", "y", 2.0, 1.0)]))
    assert as_tuples(inter) == [("a", "y", 2.0, 1.0), ("a", "x", 3.0, 7.0)]


def test_rating_threshold_keeps_ratings_at_or_above():
    rows = [
        ("a", "x", 4.0, 1.0),
        ("a", "y", 3.9, 2.0),
        ("b", "x", 5.0, 3.0),
        ("b", "z", 1.0, 4.0),
        ("c", "z", 2.0, 5.0),
    ]
    inter = preprocess(frame(rows), rating_threshold=4.0)
    assert as_tuples(inter) == [("a", "x", 4.0, 1.0), ("b", "x", 5.0, 3.0)]
    # users / items with nothing left are not in the id maps
    assert list(inter.user_ids) == ["a", "b"]
    assert list(inter.item_ids) == ["x"]
    assert (inter.num_users, inter.num_items) == (2, 1)


def test_rating_threshold_applies_to_the_latest_rating_of_a_pair():
    rows = [("a", "x", 5.0, 1.0), ("a", "x", 1.0, 2.0), ("a", "y", 5.0, 3.0)]
    inter = preprocess(frame(rows), rating_threshold=4.0)
    # the user's latest opinion of x is 1 (< 4): x is not a positive of a
    assert as_tuples(inter) == [("a", "y", 5.0, 3.0)]


def test_rating_threshold_without_ratings_raises():
    rows = [("a", "x", np.nan, 1.0), ("b", "y", np.nan, 2.0)]
    with pytest.raises(DataError, match=r"data\.rating_threshold"):
        preprocess(frame(rows), rating_threshold=3.0)


def test_explicit_feedback_with_missing_rating_raises():
    rows = [("a", "x", 4.0, 1.0), ("a", "y", np.nan, 2.0)]
    with pytest.raises(DataError, match=r"data\.feedback=explicit"):
        preprocess(frame(rows), feedback="explicit", origin="ratings.csv")
    # implicit feedback does not need ratings
    assert len(preprocess(frame(rows), feedback="implicit")) == 2


def test_k_core_is_iterative():
    # D has one interaction -> dropped; then i3 has one (C) -> dropped; then C has one -> dropped.
    # A single pass would keep C with (i1, i3), since i3 had 2 interactions before D went.
    rows = [
        ("A", "i1", 1.0, 1.0),
        ("A", "i2", 1.0, 2.0),
        ("B", "i1", 1.0, 3.0),
        ("B", "i2", 1.0, 4.0),
        ("C", "i1", 1.0, 5.0),
        ("C", "i3", 1.0, 6.0),
        ("D", "i3", 1.0, 7.0),
    ]
    inter = preprocess(frame(rows), min_user_interactions=2, min_item_interactions=2)
    assert list(inter.user_ids) == ["A", "B"]
    assert list(inter.item_ids) == ["i1", "i2"]
    assert inter.users.tolist() == [0, 0, 1, 1]
    assert inter.items.tolist() == [0, 1, 0, 1]
    # only the user threshold: D goes, C stays (i3 is kept, its count does not matter)
    inter = preprocess(frame(rows), min_user_interactions=2)
    assert list(inter.user_ids) == ["A", "B", "C"]
    assert list(inter.item_ids) == ["i1", "i2", "i3"]
    # only the item threshold: i3 has 2 interactions, nothing goes
    assert len(preprocess(frame(rows), min_item_interactions=2)) == 7
    assert len(preprocess(frame(rows), min_item_interactions=3)) == 3  # only i1 (A, B, C) stays


def test_k_core_counts_deduplicated_pairs():
    # three rows, but one (user, item) pair: the user has a single interaction
    rows = [("a", "x", 1.0, 1.0), ("a", "x", 1.0, 2.0), ("a", "x", 1.0, 3.0), ("b", "x", 1, 1.0)]
    with pytest.raises(DataError, match=r"data\.min_user_interactions=2"):
        preprocess(frame(rows), min_user_interactions=2)


def test_filtering_everything_raises_naming_the_key():
    with pytest.raises(DataError, match=r"data\.min_user_interactions=10") as info:
        preprocess(frame(ROWS), min_user_interactions=10, origin="my.csv")
    assert "my.csv" in str(info.value)


def test_integer_raw_ids_are_kept_and_remapped_contiguously():
    rows = [(42, 1000, 1.0, 3.0), (7, 5, 1.0, 2.0), (42, 5, 1.0, 1.0), (10, 77, 1.0, 9.0)]
    inter = preprocess(frame(rows))
    assert inter.user_ids.dtype == np.int64 and inter.item_ids.dtype == np.int64
    assert inter.user_ids.tolist() == [7, 10, 42]
    assert inter.item_ids.tolist() == [5, 77, 1000]
    raw = list(
        zip(inter.user_ids[inter.users.numpy()], inter.item_ids[inter.items.numpy()], strict=True)
    )
    assert raw == [(7, 5), (10, 77), (42, 5), (42, 1000)]


def test_random_frame_properties():
    rng = np.random.default_rng(0)
    n = 400
    f = frame(
        list(
            zip(
                rng.choice([f"user{k}" for k in range(25)], n),
                rng.integers(0, 40, n) * 3,
                rng.integers(1, 6, n).astype(float),
                rng.permutation(n).astype(float),
                strict=True,
            )
        )
    )
    inter = preprocess(f, feedback="explicit")
    users, items = inter.users.numpy(), inter.items.numpy()
    ts = inter.timestamps.numpy()
    # sorted by (user, timestamp)
    key = list(zip(users, ts, strict=True))
    assert key == sorted(key)
    # contiguous ids that are all used
    assert set(users) == set(range(inter.num_users))
    assert set(items) == set(range(inter.num_items))
    # one row per pair, with the rating of the latest raw row
    pairs = list(zip(users, items, strict=True))
    assert len(set(pairs)) == len(pairs)
    latest = f.sort_values("timestamp").groupby(["user", "item"]).last()
    assert len(latest) == len(inter)
    for u, i, r, t in zip(users, items, inter.ratings.numpy(), ts, strict=True):
        expected = latest.loc[(inter.user_ids[u], inter.item_ids[i])]
        assert (r, t) == (expected["rating"], expected["timestamp"])


# ------------------------------------------------------------------------------------------------
# load_interactions and the cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def csv_cfg(tmp_path) -> DataConfig:
    path = tmp_path / "inter.csv"
    pd.DataFrame(
        {
            "user_id": ["u2", "u1", "u1", "u1", "u3", "u2", "u3"],
            "item_id": [3, 1, 2, 1, 1, 1, 2],
            "rating": [4.0, 5.0, 3.0, 2.0, 1.0, 5.0, 4.5],
            "timestamp": [30, 20, 10, 40, 50, 25, 60],
        }
    ).to_csv(path, index=False)
    return DataConfig(source="csv", path=str(path), cache_dir=str(tmp_path / "cache"))


def counting_reader(monkeypatch, fail_after: int) -> list[int]:
    calls: list[int] = []
    real = sources.read_interaction_file

    def reader(*args, **kwargs):
        calls.append(1)
        if len(calls) > fail_after:
            raise AssertionError("read_interaction_file called although the cache exists")
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "read_interaction_file", reader)
    return calls


def assert_same(a, b) -> None:
    for name in ("users", "items", "ratings", "timestamps"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        assert torch.equal(x, y), name
    assert (a.num_users, a.num_items) == (b.num_users, b.num_items)
    assert a.user_ids.tolist() == b.user_ids.tolist()
    assert a.item_ids.tolist() == b.item_ids.tolist()


def test_load_csv_writes_cache_and_reuses_it(csv_cfg, tmp_path, monkeypatch):
    calls = counting_reader(monkeypatch, fail_after=1)
    first = load_interactions(csv_cfg)
    assert len(calls) == 1
    cached = list((tmp_path / "cache" / "processed").glob("*.npz"))
    assert len(cached) == 1 and cached[0].name.startswith("csv-")
    assert list(first.user_ids) == ["u1", "u2", "u3"]
    assert first.item_ids.tolist() == [1, 2, 3]
    assert first.users.tolist() == [0, 0, 1, 1, 2, 2]
    assert first.items.tolist() == [1, 0, 0, 2, 0, 1]
    second = load_interactions(csv_cfg)
    assert len(calls) == 1
    assert_same(first, second)
    # no temporary files are left next to the cache
    assert sorted(p.name for p in cached[0].parent.iterdir()) == [cached[0].name]


def test_cache_key_depends_on_preprocessing(csv_cfg, tmp_path, monkeypatch):
    calls = counting_reader(monkeypatch, fail_after=10)
    base = load_interactions(csv_cfg)
    thresholded = load_interactions(dataclasses.replace(csv_cfg, rating_threshold=3.0))
    assert len(calls) == 2
    assert len(list((tmp_path / "cache" / "processed").glob("*.npz"))) == 2
    # (u1, 1) was re-rated 2 after 5: its latest rating decides, so it drops out too
    assert len(base) == 6 and len(thresholded) == 4
    # the cache location and use_cache do not change the key: the same file is reused
    again = load_interactions(dataclasses.replace(csv_cfg, rating_threshold=3.0, name="other"))
    assert len(calls) == 2
    assert_same(thresholded, again)


def test_use_cache_false_neither_reads_nor_writes(csv_cfg, tmp_path, monkeypatch):
    calls = counting_reader(monkeypatch, fail_after=10)
    cfg = dataclasses.replace(csv_cfg, use_cache=False)
    load_interactions(cfg)
    load_interactions(cfg)
    assert len(calls) == 2
    assert not (tmp_path / "cache" / "processed").exists()


def test_corrupt_cache_is_rebuilt(csv_cfg, tmp_path):
    first = load_interactions(csv_cfg)
    (cache_file,) = (tmp_path / "cache" / "processed").glob("*.npz")
    cache_file.write_bytes(b"not a zip file")
    assert_same(first, load_interactions(csv_cfg))
    with np.load(cache_file) as arrays:  # rewritten, readable again
        assert arrays["users"].tolist() == first.users.tolist()


def test_missing_path_raises(tmp_path):
    cfg = DataConfig(source="csv", path=str(tmp_path / "nope.csv"), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"data\.path"):
        load_interactions(cfg)
