"""LightningDataModule: interactions -> split -> training batches and eval batches.

Training batches are gathered from a shuffle and negatives drawn once per epoch, one call's
batches (``batches_per_call``) at a time, so there is no per-sample ``__getitem__`` and no
collate on the hot path, and no epoch-sized tensor per batch field. The training loader is
resumable mid-epoch: a checkpoint records how many batches of which epoch were trained, and the
resumed loader rebuilds that epoch from ``(seed, epoch)`` and skips them. Evaluation batches are
built once: chunks of users with the items to exclude and the held-out items to find, or
(sampled protocol) each held-out item with a fixed, seeded set of sampled negatives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from recsys_compress.config import DataConfig, EvalConfig, LossConfig, SplitConfig
from recsys_compress.data.interactions import Interactions, load_interactions
from recsys_compress.data.sampling import USERS_PER_PASS, ExclusionSampler
from recsys_compress.data.sorting import csr, rows_of_users, stable_argsort
from recsys_compress.data.splits import Split, make_split

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def shuffled(n: int, generator: torch.Generator) -> torch.Tensor:
    """``torch.randperm(n, generator=generator)``, as int32 where it fits: the same permutation
    (the same draws, tested) at ~3/4 of the time, and half the memory for the index passes that
    follow; the tensors gathered with it keep their own dtype."""
    dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
    return torch.randperm(n, generator=generator, dtype=dtype)


class EpochRows:
    """One epoch of :class:`TrainBatches`: its shuffled order of rows and, for ``bce`` and
    ``bpr``, the items its negatives come from. Called as ``rows(start, stop)`` it gathers the
    batch tensors of rows ``start:stop``; the whole range is :meth:`TrainBatches.epoch_tensors`.

    The training loader gathers one call's batches at a time, so an epoch holds its order and
    item pool (at the scale benchmark's 8M positives x 4 negatives: 160 + 320 MB, and a peak of
    0.48 GB while they are drawn) instead of all its batch tensors (800 MB, a 1.54 GB peak
    while they were built); building and gathering that epoch took 3.8-4.0 s instead of
    5.1-5.3 s, the two alternated in one process.
    """

    def __init__(
        self, batches: TrainBatches, order: torch.Tensor, pool: torch.Tensor | None = None
    ) -> None:
        self.batches = batches
        self.order = order
        self.pool = pool  # bce: the positives' items, then the negatives; bpr: the negatives
        self.total = len(order)

    def __call__(self, start: int, stop: int) -> Batch:
        b, order = self.batches, self.order[start:stop]
        if b.loss == "bce":
            n, k = len(b.users), b.num_negatives
            positive = order < n
            source = torch.where(positive, order, (order - n).div_(k, rounding_mode="floor"))
            assert self.pool is not None
            return {
                "users": b.users.index_select(0, source),
                "items": self.pool.index_select(0, order),
                "labels": positive.float(),
            }
        if b.loss == "bpr":
            assert self.pool is not None
            source = torch.div(order, b.num_negatives, rounding_mode="floor")
            return {
                "users": b.users.index_select(0, source),
                "pos_items": b.items.index_select(0, source),
                "neg_items": self.pool.index_select(0, order),
            }
        data = {"users": b.users, "items": b.items, "ratings": b.ratings}
        return {key: value.index_select(0, order) for key, value in data.items()}


class TrainBatches(IterableDataset):
    """One epoch of shuffled training batches, with negatives drawn anew for each epoch.

    ``bce``: pointwise (users, items, labels), ``k`` negatives per positive. ``bpr``: triples
    (users, pos_items, neg_items), ``k`` per positive. ``mse``: (users, items, ratings). The epoch's
    randomness comes from ``(seed, epoch)``, so an epoch can be replayed exactly.

    Resuming (:meth:`state_dict` / :meth:`load_state_dict`): ``progress_fn`` says how many batches
    of the current epoch the trainer has finished; after a load, the next iteration of that epoch
    starts after them.
    """

    def __init__(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        ratings: torch.Tensor,
        sampler: ExclusionSampler,
        loss: str,
        num_negatives: int,
        batch_size: int,
        seed: int,
        epoch_fn: Callable[[], int],
        progress_fn: Callable[[], int] | None = None,
        batches_per_call: int = 1,
    ) -> None:
        self.users, self.items, self.ratings = users, items, ratings
        self.batches_per_call = batches_per_call
        self.sampler = sampler
        self.loss = loss
        self.num_negatives = num_negatives
        self.batch_size = batch_size
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.progress_fn = progress_fn
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already trained)
        self.shard = (0, 1)  # (rank, world size) under DDP: see __iter__

    def num_samples(self) -> int:
        positives = len(self.users)
        if self.loss == "bce":
            return positives * (1 + self.num_negatives)
        if self.loss == "bpr":
            return positives * self.num_negatives
        return positives

    def num_batches(self) -> int:
        """Batches of ``batch_size`` (optimizer steps) in one epoch."""
        return -(-self.num_samples() // self.batch_size)

    def __len__(self) -> int:
        """Items per epoch: lists of up to ``batches_per_call`` batches."""
        return -(-self.num_batches() // self.batches_per_call)

    def epoch_tensors(self, epoch: int) -> Batch:
        """The whole epoch, shuffled, as tensors of equal length."""
        rows = self.epoch_rows(epoch)
        return rows(0, rows.total)

    def epoch_rows(self, epoch: int) -> EpochRows:
        """The epoch's shuffle and negatives, from which :meth:`__iter__` gathers one call's
        batches at a time (the same tensors as slices of :meth:`epoch_tensors`)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        k, n = self.num_negatives, len(self.users)
        if self.loss == "bce":
            # Row i < n is positive i; row n + j * k + c is positive j's c-th negative. The
            # negatives are drawn straight into the pool the rows' items are gathered from.
            pool = torch.empty(n * (1 + k), dtype=torch.int64)
            pool[:n] = self.items
            self.sampler.sample(self.users, k, generator, out=pool[n:].view(n, k))
            return EpochRows(self, shuffled(n * (1 + k), generator), pool)
        if self.loss == "bpr":
            negatives = self.sampler.sample(self.users, k, generator).reshape(-1)
            return EpochRows(self, shuffled(n * k, generator), negatives)
        return EpochRows(self, shuffled(n, generator))

    def __iter__(self) -> Iterator[list[Batch]]:
        """Lists of ``batches_per_call`` consecutive batches (the last list may be shorter)."""
        epoch = self.epoch_fn()
        skip = 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            skip = self._resume_at[1]
        self._resume_at = None
        rows = self.epoch_rows(epoch)
        rank, world = self.shard
        per_call = self.batch_size * self.batches_per_call
        for call_start in range(skip * self.batch_size, rows.total, per_call):
            data = rows(call_start, min(call_start + per_call, rows.total))
            group: list[Batch] = []
            for start in range(0, len(data["users"]), self.batch_size):
                batch = {key: value[start : start + self.batch_size] for key, value in data.items()}
                if world > 1:
                    # DDP: every rank builds the same epoch (same seed, same negatives) and takes
                    # its share of each batch, so ranks step in lockstep and the averaged
                    # gradient is the whole batch's. A last batch smaller than the world is
                    # dropped.
                    if len(batch["users"]) < world:
                        break
                    batch = {key: value.tensor_split(world)[rank] for key, value in batch.items()}
                group.append(batch)
            if group:
                yield group

    def state_dict(self) -> dict[str, int]:
        """The position to resume from: the epoch and how many of its batches were trained."""
        done = self.progress_fn() if self.progress_fn is not None else 0
        return {"epoch": self.epoch_fn(), "batches_done": done * self.batches_per_call}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration over ``state["epoch"]`` skips its first ``batches_done`` batches."""
        self._resume_at = (int(state["epoch"]), int(state["batches_done"]))


class TrainLoader(DataLoader):
    """The DataLoader of :class:`TrainBatches` that Lightning saves and restores mid-epoch
    (it has ``state_dict`` / ``load_state_dict``). Its own generator keeps the global RNG, which
    e.g. dropout draws from, untouched when an epoch's iterator is created, so a resumed run
    draws the same numbers as an uninterrupted one.
    """

    dataset: TrainBatches

    def __init__(self, dataset: TrainBatches, **kwargs: Any) -> None:
        # Keyword arguments: Lightning may re-create the loader with other settings.
        kwargs.setdefault("batch_size", None)
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


@dataclass
class EvalData:
    """Evaluation batches for one split part (validation or test)."""

    batches: list[Batch]
    num_queries: int


def full_ranking_batches(
    interactions: Interactions,
    exclude_rows: np.ndarray,
    target_rows: np.ndarray,
    batch_users: int,
    with_ratings: bool,
) -> EvalData:
    """User chunks with (row, item) pairs to exclude (-inf) and the held-out (row, item) targets."""
    users = interactions.users.numpy()
    items = interactions.items.numpy()
    n, n_items = interactions.num_users, interactions.num_items
    ex_ptr, ex_items = csr(users[exclude_rows], items[exclude_rows], n)
    target_users, target_items = users[target_rows], items[target_rows]
    if with_ratings:
        order = stable_argsort(target_users * n_items + target_items, n * n_items)
        target_rows = target_rows[order]
    tg_ptr, tg_items = csr(target_users, target_items, n)
    eval_users = np.flatnonzero(tg_ptr[1:] > tg_ptr[:-1])
    batches = []
    for start in range(0, len(eval_users), batch_users):
        chunk = eval_users[start : start + batch_users]
        ex_r, ex_c = rows_of_users(ex_ptr, ex_items, chunk)
        tg_r, tg_c = rows_of_users(tg_ptr, tg_items, chunk)
        batch = {
            "users": torch.from_numpy(chunk),
            "exclude_rows": torch.from_numpy(ex_r),
            "exclude_items": torch.from_numpy(ex_c),
            "target_rows": torch.from_numpy(tg_r),
            "target_items": torch.from_numpy(tg_c),
        }
        if with_ratings:
            rows = target_rows[tg_ptr[chunk[0]] : tg_ptr[chunk[-1] + 1]]
            batch["rating_users"] = interactions.users[rows]
            batch["rating_items"] = interactions.items[rows]
            batch["ratings"] = interactions.ratings[rows]
        batches.append(batch)
    return EvalData(batches=batches, num_queries=len(eval_users))


def sampled_batches(
    interactions: Interactions,
    target_rows: np.ndarray,
    sampler: ExclusionSampler,
    num_negatives: int,
    batch_users: int,
    seed: int,
    with_ratings: bool,
) -> EvalData:
    """Each held-out (user, item) with ``num_negatives`` fixed negatives: ``candidates[:, 0]`` is
    the held-out item. Negatives never include any interaction of the user.
    """
    generator = torch.Generator().manual_seed(seed)
    users = interactions.users[target_rows]
    positives = interactions.items[target_rows]
    # int32 where the items fit, drawn USERS_PER_PASS users at a time (the same draws as one
    # call): at 10M held-out pairs x 99 negatives the int64 negatives and their concatenation
    # with the positives held 16 GB at once; this holds the 4 GB result (the evaluation step
    # widens each batch's ids)
    fits = interactions.num_items <= torch.iinfo(torch.int32).max
    dtype = torch.int32 if fits else torch.int64
    candidates = torch.empty(len(users), num_negatives + 1, dtype=dtype)
    for start in range(0, len(users), USERS_PER_PASS):
        part = slice(start, start + USERS_PER_PASS)
        candidates[part, 0] = positives[part]
        candidates[part, 1:] = sampler.sample(users[part], num_negatives, generator)
    ratings = interactions.ratings[target_rows]
    batches = []
    for s in range(0, len(users), batch_users):
        batch = {"users": users[s : s + batch_users], "candidates": candidates[s : s + batch_users]}
        if with_ratings:
            batch["ratings"] = ratings[s : s + batch_users]
        batches.append(batch)
    return EvalData(batches=batches, num_queries=len(users))


class RecDataModule(L.LightningDataModule):
    """Loads and splits the data once; serves training and evaluation batches."""

    def __init__(
        self,
        data: DataConfig,
        split: SplitConfig,
        loss: LossConfig,
        evaluation: EvalConfig,
        batch_size: int,
        seed: int,
        batches_per_call: int = 1,
    ) -> None:
        super().__init__()
        self.data_cfg, self.split_cfg, self.loss_cfg, self.eval_cfg = data, split, loss, evaluation
        self.batch_size = batch_size
        self.batches_per_call = batches_per_call
        self.seed = seed
        self.interactions: Interactions | None = None
        self.split: Split | None = None
        self._epoch = 0

    @property
    def num_users(self) -> int:
        assert self.interactions is not None, "call setup() first"
        return self.interactions.num_users

    @property
    def num_items(self) -> int:
        assert self.interactions is not None, "call setup() first"
        return self.interactions.num_items

    def setup(self, stage: str | None = None) -> None:
        """Idempotent: load, split and build every batch source (raises on bad data/config)."""
        if self.interactions is not None:
            return
        inter = load_interactions(self.data_cfg)
        split = make_split(inter, self.split_cfg, self.seed)
        self.interactions, self.split = inter, split
        train_users, train_items = inter.users[split.train], inter.items[split.train]
        train_sampler = ExclusionSampler(train_users, train_items, inter.num_users, inter.num_items)
        self.train_batches = TrainBatches(
            train_users,
            train_items,
            inter.ratings[split.train],
            train_sampler,
            self.loss_cfg.name,
            self.loss_cfg.num_negatives,
            self.batch_size,
            self.seed,
            self._current_epoch,
            self._batches_done,
            self.batches_per_call,
        )
        eval_seed = self.eval_cfg.seed if self.eval_cfg.seed is not None else self.seed
        explicit = self.data_cfg.feedback == "explicit"
        if self.eval_cfg.protocol == "full":
            self.val_data = full_ranking_batches(
                inter, split.train, split.val, self.eval_cfg.batch_users, explicit
            )
            self.test_data = full_ranking_batches(
                inter,
                np.concatenate([split.train, split.val]),
                split.test,
                self.eval_cfg.batch_users,
                explicit,
            )
        else:
            all_sampler = ExclusionSampler(
                inter.users, inter.items, inter.num_users, inter.num_items
            )
            self.val_data, self.test_data = (
                sampled_batches(
                    inter,
                    rows,
                    all_sampler,
                    self.eval_cfg.num_negatives,
                    self.eval_cfg.batch_users,
                    eval_seed + offset,
                    explicit,
                )
                for offset, rows in ((1, split.val), (2, split.test))
            )
        log.info(
            "%d users, %d items; train %d / val %d / test %d interactions",
            inter.num_users,
            inter.num_items,
            len(split.train),
            len(split.val),
            len(split.test),
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self._epoch

    def _batches_done(self) -> int:
        """Training steps (lists of batches) of the current epoch finished so far (0 outside
        ``fit``)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _eval_shard(self, batches: list[Batch]) -> list[Batch]:
        """Under DDP each rank evaluates every world-th user chunk (the metric states are sums,
        synced at compute); with fewer chunks than ranks every rank evaluates all of them, which
        leaves the means unchanged."""
        rank, world = self._rank_and_world()
        return batches[rank::world] if len(batches) >= world else batches

    def train_dataloader(self) -> TrainLoader:
        self.train_batches.shard = self._rank_and_world()
        return TrainLoader(self.train_batches)

    def val_dataloader(self) -> DataLoader:
        batches = self._eval_shard(self.val_data.batches)
        return DataLoader(batches, batch_size=None, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        batches = self._eval_shard(self.test_data.batches)
        return DataLoader(batches, batch_size=None, shuffle=False)
