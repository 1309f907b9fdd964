"""Negative sampling, training epochs and evaluation batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_compress.config import (
    DataConfig,
    EvalConfig,
    LossConfig,
    SplitConfig,
    SyntheticConfig,
)
from recsys_compress.data import sampling
from recsys_compress.data.datamodule import (
    RecDataModule,
    TrainBatches,
    full_ranking_batches,
    sampled_batches,
)
from recsys_compress.data.interactions import preprocess
from recsys_compress.data.sampling import ExclusionSampler
from recsys_compress.data.splits import leave_one_out_split
from recsys_compress.errors import DataError

NUM_ITEMS = 50


def random_pairs(num_users: int = 40, num_items: int = NUM_ITEMS, seed: int = 0):
    """Random positives with varied degrees, duplicates, and user 0 holding all but items 7, 31."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(num_users):
        if u == 0:
            chosen = np.setdiff1d(np.arange(num_items), [7, 31])
        elif u == 1:
            chosen = np.array([], dtype=np.int64)  # a user with no positives
        else:
            chosen = rng.choice(num_items, rng.integers(1, num_items - 1), replace=False)
        users.append(np.full(len(chosen), u))
        items.append(chosen)
    users, items = np.concatenate(users), np.concatenate(items)
    # repeat some pairs: duplicates must not change the sampling distribution
    dup = rng.choice(len(users), 30)
    users, items = np.r_[users, users[dup]], np.r_[items, items[dup]]
    perm = rng.permutation(len(users))
    return torch.from_numpy(users[perm]), torch.from_numpy(items[perm])


def positives_of(users: torch.Tensor, items: torch.Tensor) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        out.setdefault(u, set()).add(i)
    return out


def test_sampler_never_returns_an_excluded_item():
    users, items = random_pairs()
    sampler = ExclusionSampler(users, items, 40, NUM_ITEMS)
    pos = positives_of(users, items)
    query = torch.arange(40).repeat(5)
    drawn = sampler.sample(query, 200, torch.Generator().manual_seed(1))
    assert drawn.shape == (200, 200) and drawn.dtype == torch.int64
    assert drawn.min() >= 0 and drawn.max() < NUM_ITEMS
    for u, row in zip(query.tolist(), drawn.tolist(), strict=True):
        allowed = set(range(NUM_ITEMS)) - pos.get(u, set())
        assert set(row) <= allowed, u
        if len(allowed) <= 20:  # small sets are fully covered by 200 draws
            assert set(row) == allowed, u
    user0 = drawn[query == 0]
    assert set(user0.flatten().tolist()) == {7, 31}
    # the user without positives gets any item
    assert len(set(drawn[query == 1].flatten().tolist())) > 40


def test_sampler_is_uniform_over_allowed_items():
    users, items = random_pairs()
    sampler = ExclusionSampler(users, items, 40, NUM_ITEMS)
    pos = positives_of(users, items)
    for user in (2, 3, 1):
        allowed = sorted(set(range(NUM_ITEMS)) - pos.get(user, set()))
        n = 10_000
        drawn = sampler.sample(torch.tensor([user]), n, torch.Generator().manual_seed(user))
        counts = Counter(drawn.flatten().tolist())
        assert set(counts) == set(allowed)
        expected = n / len(allowed)
        chi2 = sum((counts[i] - expected) ** 2 / expected for i in allowed)
        dof = len(allowed) - 1
        # mean dof, sd sqrt(2 dof): 6 sd above the mean is a p-value far below 1e-6
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, (user, chi2, dof)


def test_sampler_reaches_exactly_the_allowed_items_of_every_user():
    # 4000 draws over at most 20 items: every allowed item appears, nothing else does
    users, items = random_pairs(num_users=10, num_items=20, seed=3)
    sampler = ExclusionSampler(users, items, 10, 20)
    pos = positives_of(users, items)
    drawn = sampler.sample(torch.arange(10), 4000, torch.Generator().manual_seed(0))
    for u in range(10):
        allowed = sorted(set(range(20)) - pos.get(u, set()))
        assert sorted(set(drawn[u].tolist())) == allowed


def test_sampler_is_deterministic_for_a_seeded_generator():
    users, items = random_pairs()
    sampler = ExclusionSampler(users, items, 40, NUM_ITEMS)
    query = torch.arange(40)
    a = sampler.sample(query, 30, torch.Generator().manual_seed(123))
    b = sampler.sample(query, 30, torch.Generator().manual_seed(123))
    c = sampler.sample(query, 30, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampler_in_passes_draws_what_one_pass_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    users, items = random_pairs()
    sampler = ExclusionSampler(users, items, 40, NUM_ITEMS)
    query = torch.arange(40).repeat(3)
    # the arithmetic of the one-pass form, on the whole batch at once
    uniform = torch.rand((120, 5), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    free = NUM_ITEMS - sampler.degree[query]
    rank = torch.minimum(uniform.mul(free.double()[:, None]).long(), (free - 1)[:, None])
    below = torch.searchsorted(sampler._keys, rank + (query * (NUM_ITEMS + 1))[:, None], right=True)
    expected = below - sampler.indptr[query][:, None] + rank
    monkeypatch.setattr(sampling, "USERS_PER_PASS", 7)  # 17 passes, the last of 1 user
    got = sampler.sample(query, 5, torch.Generator().manual_seed(8))
    assert torch.equal(got, expected)
    # passes of 3 users (15 draws at most), each searching only its users' slice of the keys:
    # sorted runs, a run that wraps around (users 39, 0, 1), and users in random order
    monkeypatch.setattr(sampling, "DRAWS_PER_PASS", 15)
    assert torch.equal(sampler.sample(query, 5, torch.Generator().manual_seed(8)), expected)
    mixed = query[torch.randperm(120, generator=torch.Generator().manual_seed(1))]
    free = NUM_ITEMS - sampler.degree[mixed]
    rank = torch.minimum(uniform.mul(free.double()[:, None]).long(), (free - 1)[:, None])
    below = torch.searchsorted(sampler._keys, rank + (mixed * (NUM_ITEMS + 1))[:, None], right=True)
    got = sampler.sample(mixed, 5, torch.Generator().manual_seed(8))
    assert torch.equal(got, below - sampler.indptr[mixed][:, None] + rank)
    # a pass of user 1 alone, who has no positives: an empty slice of keys, every item allowed
    monkeypatch.setattr(sampling, "DRAWS_PER_PASS", 5)
    alone = sampler.sample(torch.tensor([1, 1]), 5, torch.Generator().manual_seed(8))
    assert torch.equal(alone, uniform[:2].mul(NUM_ITEMS).long())
    out = torch.full((120, 5), -1, dtype=torch.int64)
    assert sampler.sample(query, 5, torch.Generator().manual_seed(8), out=out) is out
    assert torch.equal(out, expected)
    strided = torch.empty(5, 120, dtype=torch.int64).t()  # the right shape, not contiguous
    for bad in (torch.empty(120, 4, dtype=torch.int64), torch.empty(120, 5), strided):
        with pytest.raises(ValueError, match=r"contiguous int64 tensor of shape \(120, 5\)"):
            sampler.sample(query, 5, out=bad)


def test_sampler_rejects_a_user_with_every_item():
    users = torch.tensor([0, 0, 0, 1, 1])
    items = torch.tensor([0, 1, 2, 0, 0])
    with pytest.raises(DataError, match="1 users interacted with every item"):
        ExclusionSampler(users, items, 2, 3)
    # duplicates of one item are not "every item"
    sampler = ExclusionSampler(users[3:], items[3:], 2, 3)
    assert set(sampler.sample(torch.tensor([1]), 100).flatten().tolist()) == {1, 2}


# ------------------------------------------------------------------------------------------------
# TrainBatches
# ------------------------------------------------------------------------------------------------


def train_batches(loss: str, k: int = 3, batch_size: int = 64, epoch: list[int] | None = None):
    rng = np.random.default_rng(4)
    users, items = [], []
    for u in range(12):
        chosen = rng.choice(20, rng.integers(1, 15), replace=False)
        users += [u] * len(chosen)
        items += chosen.tolist()
    users_t, items_t = torch.tensor(users), torch.tensor(items)
    ratings = torch.arange(len(users), dtype=torch.float32)
    sampler = ExclusionSampler(users_t, items_t, 12, 20)
    epoch = epoch if epoch is not None else [0]
    return TrainBatches(
        users_t, items_t, ratings, sampler, loss, k, batch_size, seed=9, epoch_fn=lambda: epoch[0]
    )


def test_bce_epoch_has_positives_and_k_fresh_negatives_each():
    data = train_batches("bce", k=3)
    positives = len(data.users)
    train_pairs = Counter(zip(data.users.tolist(), data.items.tolist(), strict=True))
    pos = positives_of(data.users, data.items)
    epoch = data.epoch_tensors(0)
    assert data.num_samples() == positives * 4
    assert set(epoch) == {"users", "items", "labels"}
    assert all(len(v) == positives * 4 for v in epoch.values())
    labels = epoch["labels"]
    assert labels.dtype == torch.float32
    assert set(labels.tolist()) == {0.0, 1.0}
    ones = labels == 1
    assert ones.sum() == positives
    assert Counter(
        zip(epoch["users"][ones].tolist(), epoch["items"][ones].tolist(), strict=True)
    ) == (train_pairs)
    neg_users, neg_items = epoch["users"][~ones], epoch["items"][~ones]
    for u, i in zip(neg_users.tolist(), neg_items.tolist(), strict=True):
        assert i not in pos[u]
    # k negatives per positive of each user
    assert Counter(neg_users.tolist()) == {u: 3 * len(p) for u, p in pos.items()}
    # the epoch is shuffled: positives are not all first
    assert not ones[:positives].all()


def test_epochs_are_replayable_and_differ():
    data = train_batches("bce")
    a, b, c = data.epoch_tensors(2), data.epoch_tensors(2), data.epoch_tensors(3)
    for key in a:
        assert torch.equal(a[key], b[key])
    negatives_a = sorted(
        zip(a["users"][a["labels"] == 0].tolist(), a["items"][a["labels"] == 0], strict=True)
    )
    negatives_c = sorted(
        zip(c["users"][c["labels"] == 0].tolist(), c["items"][c["labels"] == 0], strict=True)
    )
    assert [int(i) for _, i in negatives_a] != [int(i) for _, i in negatives_c]
    # another seed gives other negatives for the same epoch
    other = train_batches("bce")
    other.seed = 10
    assert not torch.equal(other.epoch_tensors(2)["items"], a["items"])


def test_bpr_epoch_triples():
    data = train_batches("bpr", k=4)
    pos = positives_of(data.users, data.items)
    epoch = data.epoch_tensors(0)
    n = len(data.users) * 4
    assert set(epoch) == {"users", "pos_items", "neg_items"}
    assert all(len(v) == n for v in epoch.values()) and data.num_samples() == n
    pairs = Counter(zip(epoch["users"].tolist(), epoch["pos_items"].tolist(), strict=True))
    assert pairs == {p: 4 for p in zip(data.users.tolist(), data.items.tolist(), strict=True)}
    for u, i in zip(epoch["users"].tolist(), epoch["neg_items"].tolist(), strict=True):
        assert i not in pos[u]


def test_mse_epoch_is_the_shuffled_ratings():
    data = train_batches("mse")
    epoch = data.epoch_tensors(0)
    assert data.num_samples() == len(data.users)
    rows = epoch["ratings"].long()  # ratings were set to the row index
    assert sorted(rows.tolist()) == list(range(len(data.users)))
    assert torch.equal(epoch["users"], data.users[rows])
    assert torch.equal(epoch["items"], data.items[rows])


@pytest.mark.parametrize("loss", ["bce", "bpr", "mse"])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("per_call", [1, 3])
def test_batches_cover_the_epoch_once(loss, batch_size, per_call):
    epoch = [5]
    data = train_batches(loss, batch_size=batch_size, epoch=epoch)
    data.batches_per_call = per_call
    groups = list(data)
    total = data.num_samples()
    assert data.num_batches() == -(-total // batch_size)
    # items are lists of batches_per_call batches (one optimizer step each); the last may be short
    assert len(groups) == len(data) == -(-data.num_batches() // per_call)
    assert all(len(g) == per_call for g in groups[:-1]) and 1 <= len(groups[-1]) <= per_call
    batches = [b for g in groups for b in g]
    assert len(batches) == data.num_batches()
    assert all(len(b["users"]) == batch_size for b in batches[:-1])
    assert 1 <= len(batches[-1]["users"]) <= batch_size
    expected = data.epoch_tensors(5)  # __iter__ uses epoch_fn()
    for key, value in expected.items():
        assert torch.equal(torch.cat([b[key] for b in batches]), value)
    epoch[0] = 6
    assert not torch.equal(torch.cat([b["users"] for g in data for b in g]), expected["users"])


def test_resume_position_counts_batches_not_lists():
    data = train_batches("bce", batch_size=7)
    data.batches_per_call = 3
    data.progress_fn = lambda: 2  # two lists of 3 batches trained
    state = data.state_dict()
    assert state == {"epoch": 0, "batches_done": 6}
    data.load_state_dict(state)
    rest = [b for g in data for b in g]
    assert len(rest) == data.num_batches() - 6
    assert torch.equal(rest[0]["users"], data.epoch_tensors(0)["users"][42:49])


@pytest.mark.parametrize("per_call", [1, 4])
def test_ddp_ranks_share_each_batch_and_drop_a_last_batch_smaller_than_the_world(
    per_call: int,
) -> None:
    data = train_batches("bce")
    total = data.num_samples()
    data.batch_size = next(b for b in range(5, total) if 0 < total % b < 3)
    data.batches_per_call = per_call
    whole = [b for g in data for b in g]
    assert len(whole[-1]["users"]) < 3  # the last batch has fewer rows than three ranks
    shares = []
    for rank in range(3):
        data.shard = (rank, 3)
        shares.append([b for g in data for b in g])
    assert all(len(s) == len(whole) - 1 for s in shares)  # the short last batch is dropped
    for i, batch in enumerate(whole[:-1]):
        for key, value in batch.items():
            assert torch.equal(torch.cat([s[i][key] for s in shares]), value)


# ------------------------------------------------------------------------------------------------
# Evaluation batches through the data module
# ------------------------------------------------------------------------------------------------


def datamodule(tmp_path, protocol: str = "full", eval_seed: int | None = None, seed: int = 0):
    data = DataConfig(
        source="synthetic",
        synthetic=SyntheticConfig(num_users=30, num_items=40, interactions_per_user=9, seed=1),
        use_cache=False,
        cache_dir=str(tmp_path),
    )
    dm = RecDataModule(
        data,
        SplitConfig(name="loo"),
        LossConfig(name="bce", num_negatives=2),
        EvalConfig(protocol=protocol, num_negatives=25, batch_users=7, seed=eval_seed),
        batch_size=100,
        seed=seed,
    )
    dm.setup()
    return dm


def items_by_user(dm, rows) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for u, i in zip(
        dm.interactions.users[rows].tolist(), dm.interactions.items[rows].tolist(), strict=True
    ):
        out.setdefault(u, []).append(i)
    return {u: sorted(v) for u, v in out.items()}


def unpack_full(batches) -> tuple[dict, dict]:
    excluded: dict[int, list[int]] = {}
    targets: dict[int, list[int]] = {}
    for batch in batches:
        users = batch["users"]
        assert len(users) <= 7
        for rows, cols, out in (
            (batch["exclude_rows"], batch["exclude_items"], excluded),
            (batch["target_rows"], batch["target_items"], targets),
        ):
            for r, i in zip(rows.tolist(), cols.tolist(), strict=True):
                out.setdefault(int(users[r]), []).append(i)
    return {u: sorted(v) for u, v in excluded.items()}, {u: sorted(v) for u, v in targets.items()}


def test_full_ranking_batches_exclude_seen_and_target_held_out(tmp_path):
    dm = datamodule(tmp_path)
    assert (dm.num_users, dm.num_items) == (30, dm.interactions.num_items)
    split = dm.split
    assert len(split.test) == len(split.val) == 30  # leave one out
    assert dm.test_data.num_queries == dm.val_data.num_queries == 30
    assert len(dm.test_data.batches) == 5  # ceil(30 / 7)
    excluded, targets = unpack_full(dm.test_data.batches)
    assert excluded == items_by_user(dm, np.concatenate([split.train, split.val]))
    assert targets == items_by_user(dm, split.test)
    assert all(len(v) == 8 for v in excluded.values())  # 9 per user, 1 held out
    excluded, targets = unpack_full(dm.val_data.batches)
    assert excluded == items_by_user(dm, split.train)
    assert targets == items_by_user(dm, split.val)
    users = torch.cat([b["users"] for b in dm.test_data.batches])
    assert users.tolist() == list(range(30))
    assert "ratings" not in dm.test_data.batches[0]


def test_sampled_batches_put_held_out_item_first_and_exclude_interactions(tmp_path):
    dm = datamodule(tmp_path, protocol="sampled")
    inter, split = dm.interactions, dm.split
    seen = items_by_user(dm, np.arange(len(inter)))
    for data, rows in ((dm.val_data, split.val), (dm.test_data, split.test)):
        users = torch.cat([b["users"] for b in data.batches])
        candidates = torch.cat([b["candidates"] for b in data.batches])
        assert candidates.shape == (len(rows), 26)
        assert data.num_queries == len(rows)
        assert torch.equal(users, inter.users[rows])
        assert torch.equal(candidates[:, 0], inter.items[rows])
        for u, negatives in zip(users.tolist(), candidates[:, 1:].tolist(), strict=True):
            assert not set(negatives) & set(seen[u])
    assert not torch.equal(
        torch.cat([b["candidates"] for b in dm.val_data.batches])[:, 1:],
        torch.cat([b["candidates"] for b in dm.test_data.batches])[:, 1:],
    )


def test_sampled_candidates_depend_only_on_the_seed(tmp_path):
    def candidates(dm):
        return torch.cat([b["candidates"] for b in dm.test_data.batches])

    a = candidates(datamodule(tmp_path, "sampled", eval_seed=3, seed=0))
    b = candidates(datamodule(tmp_path, "sampled", eval_seed=3, seed=1))  # eval.seed wins
    c = candidates(datamodule(tmp_path, "sampled", eval_seed=4, seed=0))
    d = candidates(datamodule(tmp_path, "sampled", eval_seed=None, seed=3))  # falls back to seed
    assert torch.equal(a, b)
    assert torch.equal(a, d)
    assert torch.equal(a[:, 0], c[:, 0]) and not torch.equal(a, c)


def test_train_dataloader_yields_one_epoch(tmp_path):
    dm = datamodule(tmp_path)
    batches = [b for group in dm.train_dataloader() for b in group]
    positives = len(dm.split.train)
    assert positives == 30 * 7
    assert sum(len(b["users"]) for b in batches) == positives * 3
    assert len(batches) == -(-positives * 3 // 100)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.sum() == positives


def explicit_interactions():
    rng = np.random.default_rng(8)
    rows = []
    for u in range(9):
        for t, i in enumerate(rng.choice(12, 5, replace=False)):
            rows.append((u, int(i), float(rng.integers(1, 6)), float(t)))
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    return preprocess(frame, feedback="explicit")


def test_full_ranking_batches_carry_target_ratings():
    inter = explicit_interactions()
    split = leave_one_out_split(inter)
    data = full_ranking_batches(inter, split.train, split.test, 2, with_ratings=True)
    assert len(data.batches) == 5 and data.num_queries == 9
    got = []
    for batch in data.batches:
        users = batch["users"]
        # the rating rows of a batch are exactly its targets
        assert sorted(
            zip(batch["rating_users"].tolist(), batch["rating_items"].tolist(), strict=True)
        ) == sorted(
            zip(users[batch["target_rows"]].tolist(), batch["target_items"].tolist(), strict=True)
        )
        got += zip(
            batch["rating_users"].tolist(),
            batch["rating_items"].tolist(),
            batch["ratings"].tolist(),
            strict=True,
        )
    expected = zip(
        inter.users[split.test].tolist(),
        inter.items[split.test].tolist(),
        inter.ratings[split.test].tolist(),
        strict=True,
    )
    assert sorted(got) == sorted(expected)


def test_sampled_batches_carry_target_ratings():
    inter = explicit_interactions()
    split = leave_one_out_split(inter)
    sampler = ExclusionSampler(inter.users, inter.items, inter.num_users, inter.num_items)
    data = sampled_batches(inter, split.val, sampler, 4, 4, seed=0, with_ratings=True)
    assert [len(b["users"]) for b in data.batches] == [4, 4, 1]
    assert torch.equal(torch.cat([b["ratings"] for b in data.batches]), inter.ratings[split.val])
    assert torch.equal(
        torch.cat([b["candidates"][:, 0] for b in data.batches]), inter.items[split.val]
    )


def test_sampled_candidates_in_passes_equal_one_draw(monkeypatch):
    """sampled_batches draws its negatives a pass of users at a time into int32 candidates: the
    same items as one draw for all held-out pairs, concatenated after the positives."""
    from recsys_compress.data import datamodule as dm_module

    monkeypatch.setattr(dm_module, "USERS_PER_PASS", 3)  # several passes, the last one short
    inter = explicit_interactions()
    split = leave_one_out_split(inter)
    sampler = ExclusionSampler(inter.users, inter.items, inter.num_users, inter.num_items)
    data = sampled_batches(inter, split.val, sampler, 5, 4, seed=7, with_ratings=False)
    got = torch.cat([b["candidates"] for b in data.batches])
    assert got.dtype == torch.int32
    generator = torch.Generator().manual_seed(7)
    negatives = sampler.sample(inter.users[split.val], 5, generator)
    expected = torch.cat([inter.items[split.val][:, None], negatives], dim=1)
    assert torch.equal(got.long(), expected)
