"""Data loading: a GroupLens ML-1M ``ratings.dat`` -> the batched tensors the trainer consumes.

The file is synthetic but has ML-1M's exact shape (1,000,209 ratings, 6,040 users, 3,706 of the
3,952 movie ids, at least 20 ratings per user, no repeated pair, ratings 1-5, timestamps in
2000-2003), so ``data=ml1m data.path=<it>`` accepts it as it accepts the real file: for ML-1M,
``load_movielens`` checks only the published counts (no table checksum is pinned), and they match.
That is the route a user's run takes, so it is the one measured (not ``source=csv``).

The reference is the fastest plain ``pandas.read_csv`` of the file, timed in alternation with
ours in the same process: ``sep="::"`` forces the python engine (about 30x slower), so the
reference gets the C-engine call ``sep=":"``, ``usecols=[0, 2, 4, 6]``, int64 (the trick our
reader uses too; pandas' pyarrow engine and ``low_memory=False`` were no faster here).

Figures (each ours / read_csv):

* interaction tensors: ``load_interactions`` with the cache off (read, verify, preprocess); the
  cache-hit time of the same call (``np.load`` of ``processed/*.npz``) is in its details;
* epoch-0 batches: what ``train.py`` runs before the first step with the default split / loss /
  eval (ratio 8:1:1, BCE with 4 negatives, full ranking): ``RecDataModule.setup()`` (also split,
  negative sampler, evaluation batches) plus ``epoch_tensors(0)``, cache off and cache hit.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import Figure, interleaved_medians
from recsys_compress.config import DataConfig, EvalConfig, LossConfig, SplitConfig
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.data.interactions import Interactions, load_interactions

SECTION = "data"
ML1M_ROWS, ML1M_USERS, ML1M_ITEMS, ML1M_MAX_MOVIE_ID = 1_000_209, 6_040, 3_706, 3_952
TARGET_RATIO = 2.0


def write_ml1m_like(path: Path, seed: int = 0) -> Path:
    """Write a ``UserID::MovieID::Rating::Timestamp`` file with ML-1M's counts; rows grouped by
    user (as in the real file), items per user drawn without repetition by popularity."""
    rng = np.random.default_rng(seed)
    movie_ids = np.sort(rng.choice(np.arange(1, ML1M_MAX_MOVIE_ID + 1), ML1M_ITEMS, replace=False))
    weights = rng.pareto(1.5, ML1M_USERS) + 1
    degree = 20 + np.floor(weights / weights.sum() * (ML1M_ROWS - 20 * ML1M_USERS)).astype(int)
    degree = np.minimum(degree, 2_314)  # ML-1M's most active user
    while (short := ML1M_ROWS - int(degree.sum())) > 0:
        np.add.at(degree, rng.choice(np.flatnonzero(degree < 2_314), short), 1)
        degree = np.minimum(degree, 2_314)
    log_pop = -0.8 * np.log(rng.permutation(ML1M_ITEMS) + 1.0)
    # Each user takes its d most popular items after Gumbel noise: d draws without replacement.
    items = np.concatenate(
        [np.argpartition(-(log_pop + rng.gumbel(size=ML1M_ITEMS)), d - 1)[:d] for d in degree]
    )
    users = np.repeat(np.arange(1, ML1M_USERS + 1), degree)
    missing = np.setdiff1d(np.arange(ML1M_ITEMS), items)
    for item in missing:  # give each unrated movie to a user who has not rated it
        user_rows = np.flatnonzero(users == users[rng.integers(len(users))])
        items[user_rows[-1]] = item
    table = np.stack(
        [
            users,
            movie_ids[items],
            rng.choice(5, len(users), p=[0.06, 0.11, 0.26, 0.35, 0.22]) + 1,
            rng.integers(956_703_932, 1_046_454_590, len(users)),
        ],
        axis=1,
    )
    frame = pd.DataFrame(table)
    assert frame[[0, 1]].duplicated().sum() == 0 and frame[1].nunique() == ML1M_ITEMS
    path.write_text("\n".join("::".join(map(str, row)) for row in table.tolist()) + "\n")
    return path


REFERENCE_CALL = 'pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6], dtype="int64")'


def read_csv_reference(path: Path) -> pd.DataFrame:
    """The fastest plain pandas read of the file (C engine, split on ':', every other field)."""
    cols = [0, 2, 4, 6]
    return pd.read_csv(path, sep=":", header=None, usecols=cols, dtype=dict.fromkeys(cols, "int64"))


def make_datamodule(path: Path, cache_dir: Path, use_cache: bool) -> RecDataModule:
    """``RecDataModule.setup()`` as ``train.py`` runs it with the default split, loss and eval."""
    data = DataConfig(
        name="ml1m", source="ml1m", path=str(path), cache_dir=str(cache_dir), use_cache=use_cache
    )
    split = SplitConfig(name="ratio")  # conf/train.yaml's default (the dataclass's is loo)
    datamodule = RecDataModule(data, split, LossConfig(), EvalConfig(), 4096, seed=42)
    datamodule.setup()
    return datamodule


def load_to_batches(path: Path, cache_dir: Path, use_cache: bool) -> dict[str, torch.Tensor]:
    """File -> ``setup()`` -> the first epoch's training tensors (shuffled, with negatives)."""
    return make_datamodule(path, cache_dir, use_cache).train_batches.epoch_tensors(0)


def load_tensors(path: Path, cache_dir: Path, use_cache: bool) -> Interactions:
    """File -> the interaction tensors (read, verify, preprocess), or the processed cache."""
    data = DataConfig(
        name="ml1m", source="ml1m", path=str(path), cache_dir=str(cache_dir), use_cache=use_cache
    )
    return load_interactions(data)


def run(quick: bool) -> list[Figure]:
    repeat = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        path = write_ml1m_like(Path(tmp) / "ratings.dat")
        cache_dir = Path(tmp) / "cache"
        start = time.perf_counter()
        load_to_batches(path, cache_dir, use_cache=True)  # the first run: parses, writes the cache
        first_run = time.perf_counter() - start
        times = interleaved_medians(
            {
                "read_csv": lambda: read_csv_reference(path),
                "tensors": lambda: load_tensors(path, cache_dir, use_cache=False),
                "tensors_hit": lambda: load_tensors(path, cache_dir, use_cache=True),
                "setup": lambda: make_datamodule(path, cache_dir, use_cache=False),
                "batches": lambda: load_to_batches(path, cache_dir, use_cache=False),
                "batches_hit": lambda: load_to_batches(path, cache_dir, use_cache=True),
            },
            repeat=repeat,
        )
    reference = times["read_csv"]
    details = {"read_csv_s": reference, "reference": REFERENCE_CALL}
    return [
        Figure(
            SECTION,
            "ML-1M file -> interaction tensors, no cache / read_csv",
            times["tensors"] / reference,
            TARGET_RATIO,
            details={
                **details,
                "ours_s": times["tensors"],
                "cache_hit_s": times["tensors_hit"],
                "cache_hit_ratio": times["tensors_hit"] / reference,
            },
        ),
        Figure(
            SECTION,
            "ML-1M file -> epoch-0 batches, no cache / read_csv",
            times["batches"] / reference,
            TARGET_RATIO,
            details={
                **details,
                "ours_s": times["batches"],
                "setup_only_s": times["setup"],
                "setup_only_ratio": times["setup"] / reference,
                "first_run_writing_cache_s": first_run,
            },
        ),
        Figure(
            SECTION,
            "ML-1M file -> epoch-0 batches, cache hit / read_csv",
            times["batches_hit"] / reference,
            details={**details, "ours_s": times["batches_hit"]},
        ),
    ]
