"""Inference: ``recommend(user_ids, k=10)`` latency and load time of each compressed artifact.

One short training run per method (MF-64 on an ML-1M-sized synthetic catalogue: 6,040 users x
3,706 items) writes the real artifacts: int8 QAT, int4 QAT, pruned (80% zeros, stored as bitmask
+ values) and SVD (half the parameters). The dense reference is the dense run's ``model.pt``
(what ``train.py`` saves) loaded as the package loads one (:func:`load_run_model`: the model of
the run's config built on the meta device without random init, the saved tensors assigned, as
:func:`load_compressed` builds an artifact's; the config itself is parsed beforehand) and served
through the same :class:`CompressedRecommender` wrapper. The details also give the common idiom
(build the model with random weights, ``load_state_dict``; ~3x slower here), which the load
ratios were taken against before 2026-12-06 and which flattered every artifact.

Targets: each artifact recommends for 1,000 users within 1.5x the dense model's latency and
loads no slower than the dense checkpoint (ratio <= 1.0). Timed on one thread, interleaved with
the reference (see :mod:`benchmarks.evaluation` for why).

Two figures without a target time ``recommend``'s chunks of users (each chunk's scores written
into one buffer, top-k per chunk) against one score matrix for all the users and one top-k (what
``recommend`` did before 2026-12-07), with the same recommendations: the dense model above (its
~3,700 items) and an MF-64 of random weights with 100k items, where one matrix for 1,000 users
is 400 MB. At that size an int8 copy of the same model (its tables quantised as an int8 QAT
artifact holds them) is timed against it, with the artifacts' target: its item table, which each
chunk reads whole, is dequantised once a call.

One more figure without a target times ``recommend(..., exclude=seen)``, with each user's items
of the training log (``seen_items`` over the dataset's ~120k pairs) left out, against the same
call without, on the dense model; the details give a plain reference (one score matrix, the
pairs set to -inf, one top-k), checked to recommend the same items, and ``seen_items``' build
time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from benchmarks.common import Figure, interleaved_medians
from recsys_compress.compression.qat import QuantScheme, convert_module, to_fake_quant
from recsys_compress.compression.targets import replace_module
from recsys_compress.config import ModelConfig, TrainConfig, to_train_config
from recsys_compress.data.interactions import load_interactions
from recsys_compress.data.sorting import rows_of_users
from recsys_compress.export import (
    CompressedRecommender,
    load_compressed,
    load_run_model,
    load_run_state,
    recommend_chunk_rows,
)
from recsys_compress.models import build_model

SECTION = "inference"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
METHODS = {
    "int8 QAT": ["compression=qat", "compression.qat.bits=8"],
    "int4 QAT": ["compression=qat", "compression.qat.bits=4"],
    "pruned 80%": ["compression=prune"],
    "SVD 0.5 params": ["compression=svd"],
}
NUM_USERS = 1000
K = 10
LARGE_ITEMS = 100_000


def one_matrix(served: CompressedRecommender, user_ids: np.ndarray, k: int) -> np.ndarray:
    """The plain reference of ``recommend``: every user's scores in one matrix, one top-k."""
    users = torch.from_numpy(served.user_index(user_ids))
    with torch.no_grad():
        top = torch.topk(served.model.score_all(users), k, dim=1).indices
    return served.item_ids[top.numpy()]


def same_recommendations(
    served: CompressedRecommender,
    scores: torch.Tensor,
    ours: np.ndarray,
    reference: np.ndarray,
    what: str,
) -> None:
    """Raise unless ``ours`` and ``reference`` recommend the same items, or, where a near-tie
    is ordered otherwise, items of the same ``scores`` (the users' scores in one matrix) up to
    float rounding: a chunk's matmul may round differently from the whole matrix's."""
    if np.array_equal(ours, reference):
        return
    order = np.argsort(served.item_ids, kind="stable")
    picked = [
        scores.gather(1, torch.from_numpy(order[np.searchsorted(served.item_ids[order], ids)]))
        for ids in (ours, reference)
    ]
    scale = float(scores[scores.isfinite()].abs().max())
    if not torch.allclose(*picked, rtol=1e-5, atol=1e-6 * scale):
        raise AssertionError(f"{what} recommend different items")


def chunked_against_one_matrix(
    served: CompressedRecommender, user_ids: np.ndarray, repeat: int
) -> dict[str, float]:
    """``recommend`` and :func:`one_matrix` timed in alternation, after checking that they
    recommend the same items (:func:`same_recommendations`)."""
    users = torch.from_numpy(served.user_index(user_ids))
    with torch.no_grad():
        scores = served.model.score_all(users)
    ours, reference = served.recommend(user_ids, K), one_matrix(served, user_ids, K)
    same_recommendations(served, scores, ours, reference, "recommend's chunks and one matrix")
    times = interleaved_medians(
        {
            "chunks": lambda: served.recommend(user_ids, K),
            "one matrix": lambda: one_matrix(served, user_ids, K),
        },
        repeat,
    )
    num_items = served.model.num_items
    rows = min(recommend_chunk_rows(num_items), len(user_ids))
    return {
        "ms": times["chunks"] * 1e3,
        "one_matrix_ms": times["one matrix"] * 1e3,
        "num_items": num_items,
        "users_per_chunk": rows,
        "buffer_mb": rows * num_items * 4 / 1e6,
        "one_matrix_mb": len(user_ids) * num_items * 4 / 1e6,
    }


def excluding_seen(
    served: CompressedRecommender,
    log: tuple[np.ndarray, np.ndarray],
    user_ids: np.ndarray,
    repeat: int,
) -> dict[str, float]:
    """``recommend(..., exclude=seen)`` with each user's logged items left out, timed in
    alternation with ``recommend`` without and with a plain reference (one score matrix, the
    users' seen (row, item) pairs, prepared outside the timing, set to -inf, one top-k), after
    checking that it recommends what the reference does; and the time to build ``seen``."""
    start = time.perf_counter()
    seen = served.seen_items(*log)
    build_s = time.perf_counter() - start
    users = torch.from_numpy(served.user_index(user_ids))
    pairs = rows_of_users(seen.indptr, seen.items, users.numpy())
    rows, cols = torch.from_numpy(pairs[0]), torch.from_numpy(pairs[1])

    def masked_scores() -> torch.Tensor:
        with torch.no_grad():
            scores = served.model.score_all(users)
            scores[rows, cols] = float("-inf")
            return scores

    def reference() -> np.ndarray:
        return served.item_ids[torch.topk(masked_scores(), K, dim=1).indices.numpy()]

    ours = served.recommend(user_ids, K, exclude=seen)
    same_recommendations(
        served, masked_scores(), ours, reference(), "recommend(exclude=seen) and the reference"
    )
    times = interleaved_medians(
        {
            "exclude": lambda: served.recommend(user_ids, K, exclude=seen),
            "plain": lambda: served.recommend(user_ids, K),
            "reference": reference,
        },
        repeat,
    )
    return {
        "ms": times["exclude"] * 1e3,
        "without_ms": times["plain"] * 1e3,
        "reference_ms": times["reference"] * 1e3,
        "seen_pairs_of_these_users": len(rows),
        "log_pairs": len(log[0]),
        "seen_items_build_ms": build_s * 1e3,
    }


def large_catalogue_model(int8: bool = False) -> CompressedRecommender:
    """MF-64 of random weights with :data:`LARGE_ITEMS` items and 2,000 users; ``int8``: its
    tables quantised as an int8 artifact holds them (per-row scales)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mf", dim=64), 2 * NUM_USERS, LARGE_ITEMS)
    if int8:
        scheme = QuantScheme(8, None, True, "float16")
        for name in ("user_embedding", "item_embedding"):
            fake = to_fake_quant(model.get_submodule(name), scheme)
            replace_module(model, name, convert_module(fake))
    return CompressedRecommender(model, np.arange(2 * NUM_USERS), np.arange(LARGE_ITEMS))


def run_config(overrides: list[str], epochs: int) -> TrainConfig:
    base = [
        "data=synthetic",
        "data.synthetic.num_users=6040",
        "data.synthetic.num_items=3706",
        "data.synthetic.interactions_per_user=20",
        "model=mf",
        "compression.dense_epochs=0",
        f"trainer.max_epochs={epochs}",
        "trainer.progress_bar=false",
        "logger=none",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose("train", overrides=[*base, *overrides]))


def load_dense(
    run_dir: Path,
    cfg: TrainConfig,
    record: dict[str, Any],
    ids: tuple[np.ndarray, np.ndarray],
    idiom: bool = False,
) -> CompressedRecommender:
    """The dense reference: a run's ``model.pt`` as the model its config builds, without random
    init; ``idiom``: built with random weights and the state copied in (``load_state_dict``)."""
    users, items = record["data"]["num_users"], record["data"]["num_items"]
    path = run_dir / "model.pt"
    if idiom:
        model = build_model(cfg.model, users, items)
        load_run_state(model, path, {})
    else:
        model = load_run_model(path, cfg.model, users, items, {})
    return CompressedRecommender(model, *ids)


def run(quick: bool) -> list[Figure]:
    from recsys_compress.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    epochs, repeat = (1, 7) if quick else (2, 21)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            dense_cfg = run_config(["compression=none"], epochs)
            dense_record = train(dense_cfg, root / "dense")
            artifacts = {
                name: Path(train(run_config(o, epochs), root / str(i))["compression"]["artifact"])
                for i, (name, o) in enumerate(METHODS.items())
            }
            loaded = {name: load_compressed(path) for name, path in artifacts.items()}
            some = next(iter(loaded.values()))
            ids = (some.user_ids, some.item_ids)
            models = {"dense": load_dense(root / "dense", dense_cfg, dense_record, ids), **loaded}
            users = np.random.default_rng(0).choice(some.user_ids, NUM_USERS, replace=False)
            many = interleaved_medians(
                {name: (lambda m=m: m.recommend(users, K)) for name, m in models.items()}, repeat
            )
            one = interleaved_medians(
                {name: (lambda m=m: m.recommend(users[:1], K)) for name, m in models.items()},
                repeat * 5,
            )
            loads = {
                "dense": lambda: load_dense(root / "dense", dense_cfg, dense_record, ids),
                "dense idiom": lambda: load_dense(
                    root / "dense", dense_cfg, dense_record, ids, idiom=True
                ),
            }
            loads.update({name: (lambda p=p: load_compressed(p)) for name, p in artifacts.items()})
            load_s = interleaved_medians(loads, repeat)
            dense = models["dense"]
            data = load_interactions(dense_cfg.data)
            log = (data.user_ids[data.users.numpy()], data.item_ids[data.items.numpy()])
            seen = excluding_seen(dense, log, users, repeat)
            chunking = {
                f"{dense.model.num_items:,}": chunked_against_one_matrix(dense, users, repeat)
            }
            large = large_catalogue_model()
            large_users = np.random.default_rng(1).choice(large.user_ids, NUM_USERS, replace=False)
            large_repeat = max(3, repeat // 3)
            chunking[f"{LARGE_ITEMS:,}"] = chunked_against_one_matrix(
                large, large_users, large_repeat
            )
            large_int8 = large_catalogue_model(int8=True)
            large_s = interleaved_medians(
                {
                    "int8": lambda: large_int8.recommend(large_users, K),
                    "dense": lambda: large.recommend(large_users, K),
                },
                large_repeat,
            )
            dense_bytes = (root / "dense" / "model.pt").stat().st_size
            sizes = {name: path.stat().st_size for name, path in artifacts.items()}
    finally:
        torch.set_num_threads(threads)
    figures = []
    for name in artifacts:
        latency = {
            "ms": many[name] * 1e3,
            "dense_ms": many["dense"] * 1e3,
            "one_user_ms": one[name] * 1e3,
            "one_user_dense_ms": one["dense"] * 1e3,
        }
        loading = {
            "ms": load_s[name] * 1e3,
            "dense_ms": load_s["dense"] * 1e3,
            "dense_idiom_ms": load_s["dense idiom"] * 1e3,
            "ratio_to_idiom": load_s[name] / load_s["dense idiom"],
            "artifact_bytes": sizes[name],
            "dense_model_pt_bytes": dense_bytes,
        }
        figures += [
            Figure(
                SECTION,
                f"recommend {NUM_USERS} users k={K}: {name} / dense",
                many[name] / many["dense"],
                1.5,
                details=latency,
            ),
            Figure(
                SECTION,
                f"load: {name} artifact / dense model.pt",
                load_s[name] / load_s["dense"],
                1.0,
                details=loading,
            ),
        ]
    figures.append(
        Figure(
            SECTION,
            f"recommend {NUM_USERS} users k={K}, MF-64 with {LARGE_ITEMS:,} items: int8 / dense",
            large_s["int8"] / large_s["dense"],
            1.5,
            details={"ms": large_s["int8"] * 1e3, "dense_ms": large_s["dense"] * 1e3},
        )
    )
    figures.append(
        Figure(
            SECTION,
            f"recommend {NUM_USERS} users k={K}, dense: each user's logged items left out "
            "(exclude=seen_items) / not",
            seen["ms"] / seen["without_ms"],
            details=seen,
        )
    )
    for label, details in chunking.items():
        figures.append(
            Figure(
                SECTION,
                f"recommend {NUM_USERS} users k={K}, dense MF-64 with {label} items: "
                "in chunks into one buffer / one score matrix",
                details["ms"] / details["one_matrix_ms"],
                details=details,
            )
        )
    return figures
