"""The fast data paths give exactly what the straightforward code gives.

The ML-1M reader against pandas' python engine with ``sep="::"``, the packed sorts against
``np.lexsort`` / ``np.unique``, preprocessing / splits / sampler / epoch tensors against plain
reference versions of themselves, and a processed-cache hit against a fresh parse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_compress.config import DataConfig
from recsys_compress.data import interactions as interactions_module
from recsys_compress.data import sorting
from recsys_compress.data.datamodule import TrainBatches, shuffled
from recsys_compress.data.interactions import Interactions, load_interactions, preprocess
from recsys_compress.data.sampling import ExclusionSampler
from recsys_compress.data.sorting import (
    group_fraction_order,
    lexsort_ints,
    sort_ints,
    sorted_unique,
    stable_argsort,
    time_key,
)
from recsys_compress.data.sources import COLUMNS, _count_byte, read_ml1m
from recsys_compress.data.splits import ratio_split
from recsys_compress.errors import DataError

# --- the ML-1M reader --------------------------------------------------------------------------


def _ml1m_lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"{rng.integers(1, 6041)}::{rng.integers(1, 3953)}::{rng.integers(1, 6)}::"
        f"{rng.integers(956_703_932, 1_046_454_590)}"
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "layout", ["trailing newline", "no trailing newline", "crlf", "blank lines"]
)
def test_read_ml1m_matches_the_python_engine(tmp_path: Path, layout: str) -> None:
    lines = _ml1m_lines(500, seed=len(layout))
    text = {
        "trailing newline": "\n".join(lines) + "\n",
        "no trailing newline": "\n".join(lines),
        "crlf": "\r\n".join(lines) + "\r\n",
        "blank lines": "\n".join(lines[:200]) + "\n\n" + "\n".join(lines[200:]) + "\n",
    }[layout]
    path = tmp_path / "ratings.dat"
    path.write_bytes(text.encode())
    slow = pd.read_csv(path, sep="::", engine="python", header=None, names=list(COLUMNS))
    slow = slow.astype(dict(zip(COLUMNS, ("int64", "int64", "float32", "float64"), strict=True)))
    pd.testing.assert_frame_equal(read_ml1m(path), slow)


@pytest.mark.parametrize(
    "bad",
    ["7::8::3", "7::x::3::4", "7:8::3::4", "7::8::3::4::5", "7::8::3::4:", "7::8::3::4::"],
)
def test_read_ml1m_names_the_file_and_the_bad_line(tmp_path: Path, bad: str) -> None:
    lines = _ml1m_lines(4, seed=1)
    path = tmp_path / "ratings.dat"
    path.write_text("\n".join([*lines[:2], bad, *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=rf"ratings\.dat: line 3 reads '{bad}'\..*pass data\.path"):
        read_ml1m(path)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="a /proc file (Linux)")
def test_counting_bytes_of_a_file_without_a_memory_map_reads_it(tmp_path: Path) -> None:
    """``read_ml1m`` counts the ':' over a memory map; a file that reports size 0 but has
    content (here /proc) cannot be mapped, and is read instead."""
    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::2::3::4\n5::6::7::8\n")
    assert _count_byte(path, b":") == 12
    proc = Path("/proc/self/status")
    assert proc.stat().st_size == 0
    assert _count_byte(proc, b":") == proc.read_bytes().count(b":") > 10


# --- packed sorts ------------------------------------------------------------------------------


def test_packed_sorts_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 17, 2_000):
        a, b = rng.integers(0, 5, n), rng.integers(0, 40, n)
        assert np.array_equal(lexsort_ints([a, b], [5, 40]), np.lexsort((b, a)))
        assert np.array_equal(lexsort_ints([a, b], [2**40, 2**40]), np.lexsort((b, a)))  # fallback
        assert np.array_equal(stable_argsort(b, 40), np.argsort(b, kind="stable"))
        assert np.array_equal(sorted_unique(b), np.unique(b))
        fractions = np.floor(rng.random(n) * 8) / 8 if n % 2 else rng.random(n)  # ties, none
        assert np.array_equal(group_fraction_order(a, 5, fractions), np.lexsort((fractions, a)))
        assert np.array_equal(
            group_fraction_order(a, 5, fractions / 1e12), np.lexsort((fractions, a))
        )
        # distinct fractions that tie in their leading 32 bits: the ties put in exact order
        close = np.floor(rng.random(n) * 16) / 16 + rng.random(n) * 2.0**-40
        assert np.array_equal(group_fraction_order(a, 5, close), np.lexsort((close, a)))
        # 8-15 leading bits (2**40 groups, 2,000 rows: 11), where most close fractions tie
        assert np.array_equal(group_fraction_order(a, 2**40, close), np.lexsort((close, a)))
        # too many groups for 8 leading bits: the exact sort
        assert np.array_equal(group_fraction_order(a, 2**50, close), np.lexsort((close, a)))
        # int32 groups (the key of group and leading bits is int64 whatever they come as)
        a32 = a.astype(np.int32)
        assert np.array_equal(group_fraction_order(a32, 5, close), np.lexsort((close, a)))
        assert np.array_equal(group_fraction_order(a32, 2**30, close), np.lexsort((close, a)))
        # a primary key in order (rows grouped by user) takes numpy's stable sort: the same
        grouped = np.sort(a)
        assert sorting.grouped_kind() in ("stable", "quicksort")
        assert sorting._kind(grouped) == sorting.grouped_kind()
        assert n < 17 or sorting._kind(a) == "quicksort"
        assert np.array_equal(lexsort_ints([grouped, b], [5, 40]), np.lexsort((b, grouped)))
        for primary in (a, grouped):
            values = primary * 40 + b
            assert np.array_equal(sort_ints(values, primary), np.sort(values))
            assert np.array_equal(sorted_unique(values, primary), np.unique(values))


@pytest.mark.parametrize(
    "timestamps",
    [[3.0, np.nan, 1.0, 3.0, -2.0], [np.nan, np.nan], [1.5, 0.5, 1.5], [np.inf, 1.0], [1e300, 0.0]],
)
def test_time_key_orders_like_the_floats(timestamps: list[float]) -> None:
    ts = np.array(timestamps)
    keyed = time_key(ts)
    if keyed is None:  # not whole numbers (or too wide): callers sort the floats
        assert not np.array_equal(ts[~np.isnan(ts)], np.floor(ts[~np.isnan(ts)])) or (
            np.nanmax(ts) - np.nanmin(ts) >= 2**52
        )
        return
    expected = np.argsort(np.nan_to_num(ts, nan=-np.inf), kind="stable")
    assert np.array_equal(stable_argsort(*keyed), expected)


# --- preprocessing, split, sampler and epoch against plain reference versions ----------------


def _reference_preprocess(frame: pd.DataFrame, threshold: float | None, k: int) -> Interactions:
    """The straightforward version: latest row of each pair wins, then k-core, then lexsort."""
    user_codes, user_ids = pd.factorize(frame["user"], sort=True)
    item_codes, item_ids = pd.factorize(frame["item"], sort=True)
    ts = frame["timestamp"].to_numpy(np.float64)
    ratings = frame["rating"].to_numpy(np.float32)
    order = np.lexsort((np.arange(len(frame)), np.nan_to_num(ts, nan=-np.inf)))
    pair = user_codes[order] * max(len(item_ids), 1) + item_codes[order]
    _, last = np.unique(pair[::-1], return_index=True)
    rows = np.sort(order[len(order) - 1 - last])
    if threshold is not None:
        rows = rows[ratings[rows] >= threshold]
    keep = interactions_module._k_core(user_codes[rows], item_codes[rows], k, k)
    rows = rows[keep]
    used_users, users = np.unique(user_codes[rows], return_inverse=True)
    used_items, items = np.unique(item_codes[rows], return_inverse=True)
    final = np.lexsort((np.nan_to_num(ts[rows], nan=-np.inf), users))
    return Interactions(
        users=torch.from_numpy(users[final].astype(np.int64)),
        items=torch.from_numpy(items[final].astype(np.int64)),
        ratings=torch.from_numpy(ratings[rows][final]),
        timestamps=torch.from_numpy(ts[rows][final]),
        num_users=len(used_users),
        num_items=len(used_items),
        user_ids=interactions_module._id_array(pd.Series(np.asarray(user_ids)[used_users])),
        item_ids=interactions_module._id_array(pd.Series(np.asarray(item_ids)[used_items])),
    )


def _random_frame(rng: np.random.Generator, trial: int) -> pd.DataFrame:
    n = int(rng.integers(20, 400))
    ts = rng.integers(0, 30, n).astype(np.float64)
    if trial % 3 == 1:
        ts = rng.random(n) * 5  # fractional: the float-sort route
    if trial % 3 == 2:
        ts[rng.random(n) < 0.3] = np.nan
    frame = pd.DataFrame(
        {
            "user": rng.integers(0, 15, n) * 3 + 100,
            "item": rng.integers(0, 25, n),
            "rating": rng.integers(1, 6, n).astype(np.float32),
            "timestamp": ts,
        }
    )
    if trial % 4 == 0:
        frame["user"] = "u" + frame["user"].astype(str)  # string ids: the pandas route
    return frame


def _assert_same_interactions(got: Interactions, want: Interactions) -> None:
    for name in ("users", "items", "ratings", "timestamps"):
        assert torch.equal(getattr(got, name), getattr(want, name)) or name == "timestamps"
    np.testing.assert_array_equal(got.timestamps.numpy(), want.timestamps.numpy())
    assert (got.num_users, got.num_items) == (want.num_users, want.num_items)
    np.testing.assert_array_equal(got.user_ids, want.user_ids)
    np.testing.assert_array_equal(got.item_ids, want.item_ids)


def _reference_ratio_split(inter: Interactions, seed: int) -> list[np.ndarray]:
    users = inter.users.numpy()
    order = np.lexsort((np.random.default_rng(seed).random(len(users)), users))
    grouped = users[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    size = np.repeat(np.diff(np.r_[starts, len(users)]), np.diff(np.r_[starts, len(users)]))
    position = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    train_count, counts = size.copy(), []
    for share in (0.1, 0.1):
        count = np.floor(share * size).astype(np.int64)
        count = count + ((count == 0) & (share * size > 0) & (train_count - count > 1))
        train_count = train_count - count
        counts.append(count)
    is_train = position < train_count
    is_val = ~is_train & (position < train_count + counts[0])
    return [np.sort(order[m]) for m in (is_train, is_val, ~is_train & ~is_val)]


@pytest.mark.parametrize("bitmap_cells", [interactions_module.BITMAP_CELLS, 0])
def test_preprocess_split_and_sampler_match_the_reference_versions(
    bitmap_cells: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 bitmap cells: repeated pairs found by a sort, as for tables too large for a bitmap."""
    monkeypatch.setattr(interactions_module, "BITMAP_CELLS", bitmap_cells)
    rng = np.random.default_rng(0)
    for trial in range(40):
        frame = _random_frame(rng, trial)
        if trial % 7 == 3:  # a file grouped by user: the packed sort's stable route
            frame = frame.sort_values("user", kind="stable", ignore_index=True)
        threshold, k = (3.0 if trial % 2 else None), (2 if trial % 5 == 0 else 0)
        inter = preprocess(frame, rating_threshold=threshold, min_user_interactions=k,
                           min_item_interactions=k)  # fmt: skip
        _assert_same_interactions(inter, _reference_preprocess(frame, threshold, k))

        split = ratio_split(inter, [0.8, 0.1, 0.1], seed=trial)
        for got, want in zip((split.train, split.val, split.test),
                             _reference_ratio_split(inter, trial), strict=True):  # fmt: skip
            np.testing.assert_array_equal(got, want)

        sampler = ExclusionSampler(inter.users, inter.items, inter.num_users, inter.num_items)
        keys = torch.unique(inter.users * inter.num_items + inter.items)
        pair_users = keys // inter.num_items
        indptr = torch.zeros(inter.num_users + 1, dtype=torch.long)
        indptr[1:] = torch.cumsum(torch.bincount(pair_users, minlength=inter.num_users), 0)
        rank = torch.arange(len(keys)) - indptr[pair_users]
        expected = pair_users * (inter.num_items + 1) + (keys % inter.num_items - rank)
        assert torch.equal(sampler._keys, expected) and torch.equal(sampler.indptr, indptr)


@pytest.mark.parametrize("loss", ["bce", "bpr", "mse"])
def test_epoch_tensors_match_the_concatenate_then_shuffle_version(loss: str) -> None:
    users = torch.repeat_interleave(torch.arange(6), torch.tensor([3, 1, 4, 2, 5, 3]))
    items = torch.tensor([0, 2, 5, 1, 3, 4, 6, 7, 0, 1, 2, 3, 4, 5, 8, 6, 7, 9])
    ratings = torch.arange(len(users), dtype=torch.float32)
    sampler = ExclusionSampler(users, items, 6, 10)
    batches = TrainBatches(users, items, ratings, sampler, loss, 3, 4, 7, lambda: 0)
    got = batches.epoch_tensors(2)

    generator = torch.Generator().manual_seed(7 * 100_003 + 2)
    if loss == "bce":
        negatives = sampler.sample(users, 3, generator).reshape(-1)
        data = {
            "users": torch.cat([users, users.repeat_interleave(3)]),
            "items": torch.cat([items, negatives]),
            "labels": torch.cat([torch.ones(len(users)), torch.zeros(len(negatives))]),
        }
    elif loss == "bpr":
        data = {
            "users": users.repeat_interleave(3),
            "pos_items": items.repeat_interleave(3),
            "neg_items": sampler.sample(users, 3, generator).reshape(-1),
        }
    else:
        data = {"users": users, "items": items, "ratings": ratings}
    order = torch.randperm(len(data["users"]), generator=generator)
    assert got.keys() == data.keys()
    for key, value in data.items():
        assert torch.equal(got[key], value[order]) and got[key].dtype == value.dtype


def test_int32_shuffle_is_the_int64_randperm() -> None:
    for n in (1, 2, 1000, 300_007):
        got = shuffled(n, torch.Generator().manual_seed(n))
        want = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)


# --- the processed cache -----------------------------------------------------------------------


def test_cache_hit_returns_the_fresh_parse_without_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(1, 50, 600),
            "item_id": rng.integers(1, 80, 600),
            "rating": rng.integers(1, 6, 600),
            "timestamp": rng.integers(0, 10_000, 600),
        }
    )
    path = tmp_path / "ratings.csv"
    frame.to_csv(path, index=False)

    def config(use_cache: bool) -> DataConfig:
        return DataConfig(
            source="csv", path=str(path), cache_dir=str(tmp_path), use_cache=use_cache
        )

    fresh = load_interactions(config(use_cache=False)).to_arrays()
    first = load_interactions(config(use_cache=True)).to_arrays()  # parses, writes the cache
    assert len(list((tmp_path / "processed").glob("csv-*.npz"))) == 1

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not read the file")

    monkeypatch.setattr(interactions_module, "_load_frame", no_parsing)
    hit = load_interactions(config(use_cache=True)).to_arrays()
    for arrays in (first, hit):
        assert arrays.keys() == fresh.keys()
        for key, value in fresh.items():
            np.testing.assert_array_equal(arrays[key], value)
            assert arrays[key].dtype == value.dtype
