"""Serving an artifact: ``recommend`` of every compressed form equals the top-K of the exported
model's own scores, in the dataset's raw ids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from recsys_compress import export, load_compressed
from recsys_compress.compression.lowrank import LowRankEmbedding
from recsys_compress.compression.qat import QuantScheme, convert_module, to_fake_quant
from recsys_compress.compression.targets import replace_module
from recsys_compress.config import ModelConfig
from recsys_compress.errors import DataError
from recsys_compress.export import CompressedRecommender, export_model, recommend_chunk_rows
from recsys_compress.models import Recommender, build_model

N_USERS, N_ITEMS, DIM = 60, 90, 32
TABLES = ("user_embedding", "item_embedding")
MODEL_CFG = ModelConfig(name="mf", dim=DIM)


def quantize(bits: int, group_size: int | None) -> Callable[[Recommender], None]:
    def apply(model: Recommender) -> None:
        scheme = QuantScheme(bits, group_size, True, "float16")
        for name in TABLES:
            fake = to_fake_quant(model.get_submodule(name), scheme)
            replace_module(model, name, convert_module(fake))

    return apply


def prune(model: Recommender) -> None:
    with torch.no_grad():
        for name in TABLES:
            weight = model.get_submodule(name).weight
            weight[weight.abs() < weight.abs().quantile(0.8)] = 0.0


def factorise(model: Recommender) -> None:
    for name in TABLES:
        low, _ = LowRankEmbedding.from_module(model.get_submodule(name), 8)
        replace_module(model, name, low)


def factorise_then_quantize(model: Recommender) -> None:
    factorise(model)
    scheme = QuantScheme(8, None, True, "float16")
    for name in TABLES:
        left = f"{name}.left"
        replace_module(
            model, left, convert_module(to_fake_quant(model.get_submodule(left), scheme))
        )


METHODS = {
    "dense": lambda model: None,
    "int8": quantize(8, None),
    "int4_groups": quantize(4, 8),
    "pruned": prune,
    "svd": factorise,
    "svd_int8": factorise_then_quantize,
}

RAW_ID_KINDS = {
    # raw user ids unsorted (the binary search goes through an argsort), string item ids
    "shuffled_ints": (
        np.random.default_rng(0).permutation(np.arange(N_USERS) * 7 + 1000),
        np.array([f"item-{i}" for i in range(N_ITEMS)]),
    ),
    "range": (np.arange(5, 5 + N_USERS), np.arange(N_ITEMS) * 2),
    "strings": (np.array([f"u{i:03d}" for i in range(N_USERS)]), np.arange(N_ITEMS)),
}


def compressed_model(method: str) -> Recommender:
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, N_USERS, N_ITEMS)
    with torch.no_grad():
        model.item_bias.weight.normal_(0, 0.01)
    METHODS[method](model)
    return model.eval()


QUERY = np.array([3, 0, 59, 3, 17])  # internal users, repeated and out of order


def exported(
    tmp_path: Path, method: str, ids: str
) -> tuple[CompressedRecommender, np.ndarray, np.ndarray, torch.Tensor]:
    """``compressed_model(method)`` exported with the raw ids ``RAW_ID_KINDS[ids]`` to
    ``tmp_path / "model.safetensors"`` and loaded; its raw user and item ids, and the loaded
    model's scores of :data:`QUERY`'s users."""
    path = tmp_path / "model.safetensors"
    user_ids, item_ids = RAW_ID_KINDS[ids]
    export_model(compressed_model(method), MODEL_CFG, user_ids, item_ids, path)
    loaded = load_compressed(path)
    with torch.no_grad():
        scores = loaded.model.score_all(torch.from_numpy(QUERY))
    return loaded, user_ids, item_ids, scores


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("ids", list(RAW_ID_KINDS))
def test_recommend_is_the_top_k_of_the_exported_model(tmp_path: Path, method: str, ids: str):
    model = compressed_model(method)
    user_ids, item_ids = RAW_ID_KINDS[ids]
    path = tmp_path / "model.safetensors"
    export_model(model, MODEL_CFG, user_ids, item_ids, path)
    loaded = load_compressed(path)
    users = torch.arange(N_USERS)
    with torch.no_grad():
        expected_scores = model.score_all(users)
        assert torch.equal(loaded.model.score_all(users), expected_scores)
    assert not any(t.is_meta for t in (*loaded.model.parameters(), *loaded.model.buffers()))
    internal = np.array([3, 0, 59, 3, 17])  # repeated and out of order
    recs = loaded.recommend(user_ids[internal], k=10)
    top = torch.topk(expected_scores[torch.from_numpy(internal)], 10, dim=1)
    assert recs.tolist() == item_ids[top.indices.numpy()].tolist()
    assert loaded.recommend(list(user_ids[internal]), k=10).tolist() == recs.tolist()
    # return_scores: the same items, with the model's scores of them, best first
    same, scores = loaded.recommend(user_ids[internal], k=10, return_scores=True)
    assert same.tolist() == recs.tolist()
    assert scores.dtype == np.float32 and scores.shape == (5, 10)
    # (scored in another batch than expected_scores: equal to the matmul's rounding)
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=1e-6, atol=0)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_recommend_scores_users_in_chunks_into_one_buffer(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 2 users (an uneven last one): the same recommendations as one score matrix,
    every chunk written into the same buffer, which holds one chunk's scores only."""
    loaded, user_ids, item_ids, scores = exported(tmp_path, method, "range")
    internal = QUERY
    expected = item_ids[torch.topk(scores, 7, dim=1).indices.numpy()]
    calls = []
    score_all = loaded.model.score_all

    def spy(users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((users.tolist(), out.data_ptr(), out.numel()))
        return score_all(users, out=out)

    loaded.model.score_all = spy
    table = loaded.model.item_embedding
    whole_table_reads = []
    table.register_forward_hook(
        lambda module, args, output: whole_table_reads.append(len(args[0]) == N_ITEMS)
    )
    monkeypatch.setattr(export, "RECOMMEND_MIN_ROWS", 2)
    monkeypatch.setattr(export, "RECOMMEND_CHUNK_ELEMENTS", 1)
    items, values = loaded.recommend(user_ids[internal], k=7, return_scores=True)
    assert items.tolist() == expected.tolist()
    np.testing.assert_allclose(values, torch.topk(scores, 7, dim=1).values, rtol=1e-6, atol=0)
    assert [users for users, _, _ in calls] == [[3, 0], [59, 3], [17]]
    assert len({ptr for _, ptr, _ in calls}) == 1
    assert {numel for _, _, numel in calls} == {2 * N_ITEMS}
    # a quantised or factorised item table is expanded once a call, not once a chunk
    assert whole_table_reads == ([] if type(table) is nn.Embedding else [True])


def tower_model(name: str, ids: str) -> tuple[CompressedRecommender, np.ndarray, torch.Tensor]:
    """A NeuMF or MLP of random weights served with the raw ids ``RAW_ID_KINDS[ids]``, 7
    internal users to query (one repeated) and the model's scores of them."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dim=8, mlp_layers=[16, 8]), N_USERS, N_ITEMS)
    served = CompressedRecommender(model, *RAW_ID_KINDS[ids])
    internal = np.array([5, 1, 44, 5, 30, 2, 9])
    with torch.no_grad():
        return served, internal, model.score_all(torch.from_numpy(internal))


@pytest.mark.parametrize("name", ["neumf", "mlp"])
def test_recommend_with_neumf_and_mlp_in_chunks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """NeuMF and MLP write each chunk of users into the call's buffer, themselves a few users
    at a time; a model whose ``score_all`` takes no buffer is called chunk by chunk as well."""
    from recsys_compress.models import ncf

    served, internal, scores = tower_model(name, "strings")
    model, user_ids, item_ids = served.model, served.user_ids, served.item_ids
    expected = item_ids[torch.topk(scores, 5, dim=1).indices].tolist()
    monkeypatch.setattr(export, "RECOMMEND_MIN_ROWS", 3)
    monkeypatch.setattr(export, "RECOMMEND_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(ncf, "TOWER_CHUNK_ELEMENTS", 2 * N_ITEMS * 16)  # 2 users a tower chunk
    buffers = []
    score_all = model.score_all

    def spy(users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        scores = score_all(users, out=out)
        buffers.append((len(users), out.data_ptr(), scores.data_ptr()))
        return scores

    model.score_all = spy
    assert served.recommend(user_ids[internal], k=5).tolist() == expected
    assert [n for n, _, _ in buffers] == [3, 3, 1]
    assert len({ptr for _, ptr, _ in buffers}) == 1  # one buffer, and the scores are in it
    assert all(ptr == written for _, ptr, written in buffers)
    calls = []
    model.score_all = lambda users: calls.append(len(users)) or score_all(users)
    assert served.recommend(user_ids[internal], k=5).tolist() == expected
    assert calls == [3, 3, 1]


def test_recommend_chunk_rows() -> None:
    """4 MB of scores a chunk at small catalogues (ML-1M's 3,706 items: 282 users), never
    fewer than 64 users (at 100k items: 26 MB)."""
    assert recommend_chunk_rows(3706) == 282
    assert recommend_chunk_rows(1) == 1 << 20
    assert recommend_chunk_rows(16384) == 64
    assert recommend_chunk_rows(100_000) == 64
    assert recommend_chunk_rows(0) == 1 << 20


def test_compressed_tables_stay_compressed_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    export_model(compressed_model("int8"), MODEL_CFG, *RAW_ID_KINDS["range"], path)
    table = load_compressed(path).model.item_embedding
    assert table.qweight.dtype == torch.int8 and not isinstance(table, nn.Embedding)


def test_unknown_users_and_edge_queries(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    user_ids, item_ids = RAW_ID_KINDS["strings"]
    export_model(compressed_model("dense"), MODEL_CFG, user_ids, item_ids, path)
    loaded = load_compressed(path)
    with pytest.raises(DataError, match=r"unknown user ids \['nobody', 'u999'\]"):
        loaded.recommend(["u001", "nobody", "u999"])
    with pytest.raises(DataError, match="unknown user ids"):
        loaded.recommend([1])  # an int where the ids are strings
    assert loaded.recommend([], k=4).shape == (0, 4)
    items, scores = loaded.recommend([], k=4, return_scores=True)
    assert items.shape == scores.shape == (0, 4) and scores.dtype == np.float32
    assert loaded.recommend(["u010"], k=500).shape == (1, N_ITEMS)  # k capped at the catalogue
    np.testing.assert_array_equal(loaded.user_index(["u002", "u000"]), [2, 0])


def log_of(seed: int, n: int = 900) -> tuple[np.ndarray, np.ndarray]:
    """Internal (user, item) pairs of a random log, repeats included."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, N_USERS, n), rng.integers(0, N_ITEMS, n)


def top_k_unseen(
    scores: torch.Tensor, internal: np.ndarray, log: tuple[np.ndarray, np.ndarray], k: int
) -> np.ndarray:
    """The plain reference: each queried user's seen items set to -inf, then top-k."""
    scores = scores.clone()
    for row, user in enumerate(internal):
        scores[row, torch.from_numpy(log[1][log[0] == user])] = float("-inf")
    return torch.topk(scores, k, dim=1).indices.numpy()


@pytest.mark.parametrize("method", ["dense", "int4_groups", "pruned", "svd"])
def test_recommend_leaves_out_seen_items(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``exclude=seen_items(log)``: the top-k of the scores with each user's logged items at
    -inf, in chunks of 2 users (repeated users, an uneven last chunk), from raw ids."""
    loaded, user_ids, item_ids, scores = exported(tmp_path, method, "shuffled_ints")
    internal = QUERY
    # random pairs, and each queried user's 3 best items, so that the exclusion decides
    best = torch.topk(scores, 3, dim=1).indices.numpy()
    users, items = log_of(1)
    log = (np.r_[users, internal.repeat(3)], np.r_[items, best.ravel()])
    seen = loaded.seen_items(user_ids[log[0]], item_ids[log[1]])
    assert (len(seen), seen.dropped) == (len(set(zip(*log, strict=True))), 0)  # repeats once
    assert len(seen) < 915
    expected = item_ids[top_k_unseen(scores, internal, log, 10)]
    monkeypatch.setattr(export, "RECOMMEND_MIN_ROWS", 2)
    monkeypatch.setattr(export, "RECOMMEND_CHUNK_ELEMENTS", 1)
    recs = loaded.recommend(user_ids[internal], k=10, exclude=seen)
    assert recs.tolist() == expected.tolist()
    plain = loaded.recommend(user_ids[internal], k=10)
    for row, user in enumerate(internal):
        history = set(item_ids[log[1][log[0] == user]].tolist())
        assert not history & set(recs[row].tolist())
        assert history & set(plain[row].tolist())  # without exclude, seen items come back
    # another load of the same file holds equal ids: its SeenItems fits
    again = load_compressed(tmp_path / "model.safetensors")
    assert again.recommend(user_ids[internal], k=10, exclude=seen).tolist() == recs.tolist()


@pytest.mark.parametrize("name", ["mf", "neumf"])
def test_seen_items_edge_cases(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dim=8, mlp_layers=[16, 8]), N_USERS, N_ITEMS)
    user_ids, item_ids = RAW_ID_KINDS["strings"]
    served = CompressedRecommender(model, user_ids, item_ids)
    with torch.no_grad():
        scores = served.model.score_all(torch.arange(N_USERS))
    # unknown users and items are left out and counted, a repeated pair counts once
    seen = served.seen_items(["u001", "ghost", "u001", "u002", "u001"], [0, 1, 999, 5, 0])
    assert (len(seen), seen.dropped) == (2, 2)
    assert seen.items[seen.indptr[1] : seen.indptr[2]].tolist() == [0]
    assert seen.items[seen.indptr[2] : seen.indptr[3]].tolist() == [5]
    # a user twice in one chunk: both rows left without the item
    recs = served.recommend(["u001", "u002", "u001"], k=N_ITEMS - 1, exclude=seen)
    assert 0 not in recs[0] and 5 not in recs[1] and recs[2].tolist() == recs[0].tolist()
    assert 5 in recs[0] and 0 in recs[1]
    # pandas columns of Python objects: strings, and with a missing value or mixed types
    objects = served.seen_items(pd.Series(["u001", "u002"], dtype=object), [0, 5])
    assert (len(objects), objects.dropped) == (2, 0)
    assert objects.items.tolist() == seen.items.tolist()
    mixed = served.seen_items(np.array(["u001", None, 7, "u002"], dtype=object), [0, 1, 2, 5])
    assert (len(mixed), mixed.dropped) == (2, 2)
    nullable = CompressedRecommender(model, *RAW_ID_KINDS["range"])  # int ids 5, 6, ...
    ints = nullable.seen_items(pd.array([5, None, 6], dtype="Int64"), pd.Series([0, 2, 4]))
    assert (len(ints), ints.dropped) == (2, 1)
    assert ints.items[: ints.indptr[2]].tolist() == [0, 2]
    # a user who saw all but 3 items gets those 3 first, best first, then seen ones
    unseen = np.array([7, 40, 81])
    saw = np.setdiff1d(np.arange(N_ITEMS), unseen)
    seen = served.seen_items(["u004"] * len(saw), item_ids[saw])
    recs = served.recommend(["u004"], k=6, exclude=seen)[0]
    order = unseen[torch.argsort(scores[4, torch.from_numpy(unseen)], descending=True).numpy()]
    assert recs[:3].tolist() == order.tolist()
    assert set(recs[3:].tolist()) <= set(saw.tolist())
    # ... and the scores tell them apart: the unseen items' own, -inf for the seen filling
    same, values = served.recommend(["u004"], k=6, exclude=seen, return_scores=True)
    assert same[0].tolist() == recs.tolist()
    expected_values = scores[4, torch.from_numpy(order)].numpy()
    close = 1e-6 * float(scores[4].abs().max())  # one user's matmul against all users'
    np.testing.assert_allclose(values[0, :3], expected_values, rtol=0, atol=close)
    assert values[0, 3:].tolist() == [float("-inf")] * 3
    # an empty log excludes nothing
    nothing = served.seen_items([], [])
    assert len(nothing) == 0
    assert (
        served.recommend(["u003", "u009"], k=5, exclude=nothing).tolist()
        == served.recommend(["u003", "u009"], k=5).tolist()
    )
    with pytest.raises(DataError, match="got 2 user ids and 1 item ids"):
        served.seen_items(["u001", "u002"], [3])
    with pytest.raises(DataError, match=r"none of the 3 \(user, item\) pairs .* users first"):
        served.seen_items([1, 2, 3], [4, 5, 6])  # ints where the user ids are strings
    with pytest.raises(DataError, match=r"none of the 1 .* \['u000', 'u001', 'u002'\]"):
        served.seen_items([3], ["u003"])  # the columns swapped
    other = CompressedRecommender(model, *RAW_ID_KINDS["range"])
    with pytest.raises(DataError, match="another recommender's seen_items"):
        other.recommend([5], exclude=served.seen_items(["u001"], [0]))


@pytest.mark.parametrize("name", ["neumf", "mlp"])
def test_recommend_leaves_out_seen_items_with_neumf_and_mlp_in_chunks(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, internal, scores = tower_model(name, "shuffled_ints")
    user_ids, item_ids = served.user_ids, served.item_ids
    best = torch.topk(scores, 2, dim=1).indices.numpy()
    users, items = log_of(2)
    log = (np.r_[users, internal.repeat(2)], np.r_[items, best.ravel()])
    expected = item_ids[top_k_unseen(scores, internal, log, 5)]
    monkeypatch.setattr(export, "RECOMMEND_MIN_ROWS", 3)
    monkeypatch.setattr(export, "RECOMMEND_CHUNK_ELEMENTS", 1)
    seen = served.seen_items(user_ids[log[0]], item_ids[log[1]])
    assert served.recommend(user_ids[internal], k=5, exclude=seen).tolist() == expected.tolist()


def test_exclusion_leaves_scores_it_does_not_own_alone() -> None:
    """A custom model whose ``score_all`` takes no buffer and returns a view of its own tensor:
    the seen items are set to -inf in a copy, not in the model."""

    class Fixed(nn.Module):
        num_items = N_ITEMS

        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(N_USERS, N_ITEMS), requires_grad=False)

        def score_all(self, users: torch.Tensor) -> torch.Tensor:
            return self.table[0:1] if len(users) == 1 and int(users[0]) == 0 else self.table[users]

    model = Fixed()
    before = model.table.detach().clone()
    user_ids, item_ids = RAW_ID_KINDS["range"]
    served = CompressedRecommender(model, user_ids, item_ids)
    seen = served.seen_items(user_ids[[0, 0]], item_ids[[3, 4]])
    recs = served.recommend(user_ids[:1], k=N_ITEMS - 2, exclude=seen)[0]
    assert not {item_ids[3], item_ids[4]} & set(recs.tolist())
    assert torch.equal(model.table, before)
    # a model without floating parameters whose scores are float64: they come back in float64
    del model.table
    model.register_buffer("table", before.double())
    _, values = served.recommend(user_ids[[0, 1]], k=N_ITEMS, return_scores=True)
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, torch.sort(model.table[:2], descending=True)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_recommend_returns_the_scores_of_a_bf16_or_float64_model(dtype: torch.dtype) -> None:
    """A bf16 model's scores (its own buffer's dtype) come back exactly in float32, a float64
    model's in float64, also for no users."""
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, N_USERS, N_ITEMS).to(dtype)
    served = CompressedRecommender(model, *RAW_ID_KINDS["range"])
    with torch.no_grad():
        scores = model.score_all(torch.from_numpy(QUERY))
    top = torch.topk(scores, 6, dim=1)
    items, values = served.recommend(served.user_ids[QUERY], k=6, return_scores=True)
    wide = np.float64 if dtype == torch.float64 else np.float32
    assert values.dtype == wide
    np.testing.assert_array_equal(values, top.values.to(torch.float64).numpy().astype(wide))
    assert items.tolist() == served.item_ids[top.indices.numpy()].tolist()
    _, none = served.recommend([], k=6, return_scores=True)
    assert none.shape == (0, 6) and none.dtype == wide


@pytest.mark.parametrize(
    "ids",
    [
        np.arange(100) + 5,  # a range: the dense table
        np.random.default_rng(3).permutation(np.arange(-50, 250, 3)),  # gaps, negative, unsorted
        np.random.default_rng(4).permutation(np.arange(100) * 10**6),  # too sparse: searched
        np.array([f"id{i}" for i in range(40)]),
    ],
    ids=["range", "gaps", "sparse", "strings"],
)
def test_raw_ids_are_found_as_a_dictionary_finds_them(ids: np.ndarray) -> None:
    from recsys_compress.export import _IdLookup

    lookup = _IdLookup.of(ids)
    assert (lookup.table is not None) == (ids.dtype.kind == "i" and np.ptp(ids) < 10**4)
    where = {v: i for i, v in enumerate(ids.tolist())}
    rng = np.random.default_rng(5)
    queries = [rng.choice(ids, 300)]
    if ids.dtype.kind == "i":
        # every gap and both ends of a short span; each id's neighbours in a long one
        if np.ptp(ids) < 10**4:
            near = np.arange(ids.min() - 2, ids.max() + 3)
        else:
            near = np.r_[ids - 1, ids, ids + 1]
        wrapping = np.array([2**63 + 5, 7, 2**64 - 50, 2**64 - 47], dtype=np.uint64)
        queries += [near, near.astype(np.int32), wrapping, np.r_[near.astype(float), near + 0.5]]
        queries.append(np.array([int(ids[0]), "x", None], dtype=object))  # the hash lookup
    else:
        queries += [np.array(["nope", ids[3], "", ids[0]]), np.array([3, 4])]
    for query in queries:
        query = query.ravel()
        index, found = lookup.find(query)
        expected = [where.get(v) for v in query.tolist()]
        assert found.tolist() == [e is not None for e in expected]
        assert index[found].tolist() == [e for e in expected if e is not None]
        assert index.dtype == np.int64


def test_duplicate_raw_ids_are_refused() -> None:
    model = build_model(MODEL_CFG, 4, N_ITEMS)
    with pytest.raises(DataError, match=r"raw ids \[7\] appear more than once"):
        CompressedRecommender(model, np.array([9, 7, 3, 7]), np.arange(N_ITEMS))
