"""The paths that keep compression affordable at 1M users: exact thresholds without a sort of all
scores, sparse embedding gradients with a row-wise optimizer, and the callbacks on that path."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from torch import nn

from recsys_compress import ops, optim
from recsys_compress.compression import pruning
from recsys_compress.compression.lowrank import truncated_svd
from recsys_compress.compression.pruning import MagnitudePruning, PruneConfig
from recsys_compress.compression.qat import (
    FakeQuantEmbedding,
    QATConfig,
    QuantizationAwareTraining,
    QuantScheme,
)
from recsys_compress.compression.sparsity import L1Config, L1Proximal, soft_threshold_
from recsys_compress.compression.targets import TargetSpec, select_targets
from recsys_compress.config import OptimConfig
from recsys_compress.errors import ConfigError
from recsys_compress.models.mf import MF
from recsys_compress.models.ncf import NeuMF
from recsys_compress.module import RecommenderModule
from recsys_compress.optim import RowSparseAdam, RowStep, coalesce_rows, touched_rows
from tests.compression.helpers import tiny_setup, tiny_trainer


def sort_reference(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask from a stable sort: the n_prune smallest pruned, lower index first on ties."""
    flat = values.flatten()
    n_prune = min(round(sparsity * flat.numel()), flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:n_prune]] = False
    return keep.view_as(values)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.999])
@pytest.mark.parametrize("ties", [False, True])
def test_radix_threshold_equals_the_sort_based_one(
    sparsity: float, ties: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "CHUNK", 1000)  # several chunks, ties across chunk borders
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(97, 64, generator=gen)
    if ties:  # exact duplicates, zeros and the pruned-for-good marker
        scores = (scores * 8).floor() / 8
        scores[:5] = -1.0
    mask = pruning._keep_top(scores, sparsity)
    assert torch.equal(mask, sort_reference(scores, sparsity))
    assert int(mask.sum()) == scores.numel() - round(sparsity * scores.numel())


def test_kth_smallest_is_exact_on_signed_values() -> None:
    values = torch.randn(10_001, generator=torch.Generator().manual_seed(1)) * 1e3
    values[:300] = 0.0  # signed zeros count as one value, and a bin's neighbours nearby
    values[300:600] = -0.0
    values[600:700] = torch.tensor(1e-42).nextafter(torch.tensor(1.0))  # subnormal
    ordered = torch.sort(values).values
    for k in (1, 17, 2500, 5000, 5100, 10_001):
        value, smaller = pruning.kth_smallest(lambda: iter(values.split(777)), k)
        assert value == float(ordered[k - 1])
        assert smaller == int((values < value).sum())


def test_pooled_threshold_equals_concatenated_normalised_scores() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(50, 8, generator=gen) * 100, torch.rand(30, 16, generator=gen)
    a[0, :3] = -1.0
    scales = [pruning._alive_rms(a), pruning._alive_rms(b)]
    masks = pruning._keep_top_pooled([a, b], scales, 0.6)
    flat = torch.cat(
        [torch.where(s >= 0, s / sc, s).flatten() for s, sc in zip((a, b), scales, strict=True)]
    )
    reference = sort_reference(flat, 0.6)
    assert torch.equal(torch.cat([m.flatten() for m in masks]), reference)


def test_row_scope_in_blocks_equals_one_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "CHUNK", 64 * 7)
    scores = torch.rand(100, 64, generator=torch.Generator().manual_seed(3))
    mask = pruning._keep_top_per_row(scores, 0.75)
    drop = torch.topk(scores, 48, dim=1, largest=False).indices
    reference = torch.ones_like(mask).scatter_(1, drop, False)
    assert torch.equal(mask, reference)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.75, 1.0])
def test_row_scope_prunes_exactly_with_ties_lower_column_first(
    sparsity: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "CHUNK", 16 * 7)  # several blocks of rows
    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (40, 16), generator=gen).float()  # ties at every threshold
    scores[:5, :6] = -1.0  # pruned earlier
    reference = torch.stack([sort_reference(row, sparsity) for row in scores])
    for use_numpy in (True, False):  # numpy's partition (the CPU's) and topk (other devices')
        assert torch.equal(pruning._keep_top_per_row(scores, sparsity, use_numpy), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kth_smallest_per_row_equals_kthvalue(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    block = torch.randn(300, 64, generator=gen).to(dtype)
    block[:, :9] = -1.0
    for k in (1, 9, 10, 40, 64):
        expected = torch.kthvalue(block.float(), k, dim=1, keepdim=True).values.to(dtype)
        for use_numpy in (True, False):
            found = pruning._kth_smallest_per_row(block, k, use_numpy)
            assert found.dtype == dtype and torch.equal(found, expected)
    mask = pruning._keep_top_per_row(block, 0.5)
    assert torch.equal(mask, torch.stack([sort_reference(row.float(), 0.5) for row in block]))


def test_randomized_svd_error_is_close_to_exact_at_the_default_oversampling() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3000, 16, generator=gen) @ torch.randn(16, 200, generator=gen)
    w += 0.05 * torch.randn(3000, 200, generator=gen)
    errors = {}
    for randomized in (False, True):
        u, s, vh = truncated_svd(w, 12, randomized=randomized, oversample=10, niter=2)
        errors[randomized] = float(torch.linalg.matrix_norm(w - (u * s) @ vh))
    assert errors[True] <= errors[False] * 1.01


# -- the sparse optimizer path ------------------------------------------------------------------


def train_mf(sparse: bool, optimizer: str, steps: int = 6) -> MF:
    torch.manual_seed(0)
    model = MF(50, 40, 8, use_bias=True, init_std=0.1)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = sparse
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    elif optimizer.startswith("torch_adam"):
        opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=optimizer.endswith("fused"))
    else:
        opt = RowSparseAdam(model.parameters(), lr=0.01, fused=optimizer.endswith("fused"))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # every row appears in every batch, so lazy and dense Adam agree
        users = torch.cat([torch.arange(50), torch.randint(50, (30,), generator=gen)])
        items = torch.cat([torch.arange(40), torch.randint(40, (40,), generator=gen)])
        labels = torch.randint(2, (80,), generator=gen).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(users, items), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_sgd_with_sparse_gradients_gives_identical_weights() -> None:
    dense, sparse = train_mf(False, "sgd"), train_mf(True, "sgd")
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), name


@pytest.mark.parametrize("sparse", [False, True])
def test_row_sparse_adam_equals_adam_when_every_row_is_in_the_batch(sparse: bool) -> None:
    """Fused (the default): torch's fused Adam, bit for bit, on dense and on sparse gradients
    (:func:`coalesce_rows` sums a row's repeats in the order of the ids, as the dense embedding
    backward does; the batches repeat rows up to six times); the for-loop arithmetic: torch's
    Adam up to float rounding."""
    for ours, theirs in (("row_sparse_fused", "torch_adam_fused"), ("row_sparse", "torch_adam")):
        expected = train_mf(False, theirs).state_dict()
        for name, value in train_mf(sparse, ours).state_dict().items():
            if not ours.endswith("fused"):
                assert torch.allclose(expected[name], value, rtol=1e-5, atol=1e-7), name
            else:
                assert torch.equal(expected[name], value), name


def dense_order_sums(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids, sorted, and each one's values summed in the order of the ids."""
    rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return rows, values.new_zeros(len(rows), *values.shape[1:]).index_add_(0, inverse, values)


@pytest.mark.parametrize(
    ("num_rows", "dims", "dtype"),
    [
        (1_000_000, (8,), torch.float32),  # few repeats
        (30, (8,), torch.float32),  # every row repeated, up to ~30 times
        (50, (), torch.float32),  # a bias table's gradient: values of one element
        (40, (3,), torch.float64),
        (40, (3,), torch.bfloat16),
    ],
)
def test_coalesce_rows_sums_repeats_in_the_order_of_the_ids(
    num_rows: int, dims: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Sorted distinct rows, each row's values summed in the order of the ids (bit for bit as
    ``index_add_``, the dense backward's sums in float32 / float64), a coalesced tensor equal to
    torch's ``coalesce`` up to the order of the sums; the input is left as it was."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        ids = torch.randint(num_rows, (500,), generator=gen)
        values = torch.randn(500, *dims, generator=gen).to(dtype)
        grad = torch.sparse_coo_tensor(
            ids.view(1, -1), values, (num_rows, *dims), check_invariants=True
        )
        before = (grad._indices().clone(), grad._values().clone())
        ours = coalesce_rows(grad)
        rows, sums = dense_order_sums(ids, values)
        assert ours.is_coalesced() and ours.shape == grad.shape
        assert torch.equal(ours.indices()[0], rows)
        assert torch.equal(ours.values(), sums)
        theirs = grad.coalesce()
        assert torch.equal(ours.indices(), theirs.indices())
        tolerance = 0.1 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(ours.values(), theirs.values(), rtol=tolerance, atol=tolerance)
        assert torch.equal(grad._indices(), before[0]) and torch.equal(grad._values(), before[1])


def test_coalesce_rows_reuses_a_sort_only_for_the_same_ids() -> None:
    """An MF step's user table and user bias share their ids' sort; other ids of the same
    length (the next batch, the item table's) get their own, also after several tables."""
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randint(1000, (64,), generator=gen) for _ in range(6)]
    for step in range(2):
        for ids in batches:
            for width in (4, 1):  # the table, then its bias
                values = torch.randn(64, width, generator=gen)
                grad = torch.sparse_coo_tensor(
                    ids.view(1, -1), values, (1000, width), check_invariants=True
                )
                rows, sums = dense_order_sums(ids, values)
                ours = coalesce_rows(grad)
                assert torch.equal(ours.indices()[0], rows), step
                assert torch.equal(ours.values(), sums), step
    # a table and its bias share the sort: one index tensor
    table, bias = (
        coalesce_rows(
            torch.sparse_coo_tensor(
                batches[0].view(1, -1), torch.ones(64, width), (1000, width), check_invariants=True
            )
        )
        for width in (4, 1)
    )
    assert table._indices().data_ptr() == bias._indices().data_ptr()
    ids = batches[0].clone()
    for _ in range(2):  # the second time, the same tensor written in place: a new sort
        grad = torch.sparse_coo_tensor(
            ids.view(1, -1), torch.ones(64), (1000,), check_invariants=True
        )
        assert torch.equal(coalesce_rows(grad).indices()[0], torch.unique(ids))
        ids[ids == ids[0]] = 1000 - 1 - ids[0]


def test_coalesce_rows_keeps_no_sort_of_a_batch_above_its_cache_limit() -> None:
    """A batch of more ids than ``_CACHED_IDS`` is sorted and summed as any other, and its sort
    is not kept (each kept sort holds several arrays of the batch's size)."""
    ids = torch.tensor([3, 1, 3, 2, 1, 3])
    values = torch.arange(6.0).view(6, 1)
    grad = torch.sparse_coo_tensor(ids.view(1, -1), values, (4, 1), check_invariants=True)
    with mock.patch.object(optim, "_CACHED_IDS", 5):
        kept = optim._recent_sorts
        ours = coalesce_rows(grad)
        assert optim._recent_sorts is kept
    assert ours.indices()[0].tolist() == [1, 2, 3]
    assert ours.values().flatten().tolist() == [1.0 + 4.0, 3.0, 0.0 + 2.0 + 5.0]


def test_coalesce_rows_takes_strided_values_and_tables_too_tall_for_its_sort_key() -> None:
    """Values that are a strided view; a table so tall that ``id * n + position`` could overflow
    int64 goes to torch's coalesce (the sparse tensor allocates nothing of its size)."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(20, (50,), generator=gen)
    wide = torch.randn(50, 6, generator=gen)
    strided = wide[:, ::2]
    grad = torch.sparse_coo_tensor(ids.view(1, -1), strided, (20, 3), check_invariants=True)
    rows, sums = dense_order_sums(ids, strided.contiguous())
    ours = coalesce_rows(grad)
    assert torch.equal(ours.indices()[0], rows) and torch.equal(ours.values(), sums)
    tall = 2**62 // 50 + 1
    ids = torch.randint(tall, (50,), generator=gen)
    grad = torch.sparse_coo_tensor(ids.view(1, -1), wide, (tall, 6), check_invariants=True)
    theirs = grad.coalesce()
    with mock.patch.object(optim, "_sort_ids", side_effect=AssertionError("sorted a tall table")):
        ours = coalesce_rows(grad)
    assert torch.equal(ours.indices(), theirs.indices())
    assert torch.equal(ours.values(), theirs.values())


def test_coalesce_rows_leaves_other_sparse_tensors_to_torch() -> None:
    """Two sparse dimensions (not a gradient of rows) and empty gradients: torch's coalesce."""
    grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 0, 1], [0, 1, 0]]),
        torch.tensor([3.0, 2.0, 4.0]),
        (2, 2),
        check_invariants=True,
    )
    ours = coalesce_rows(grad)
    assert ours.is_coalesced() and torch.equal(ours.to_dense(), torch.tensor([[0, 2.0], [7, 0]]))
    empty = torch.sparse_coo_tensor(
        torch.empty(1, 0, dtype=torch.long), torch.empty(0, 3), (5, 3), check_invariants=True
    )
    assert coalesce_rows(empty)._nnz() == 0 and coalesce_rows(empty).is_coalesced()


def test_fused_row_update_equals_fused_adam_on_the_same_gradients() -> None:
    """The fused kernel on the gathered rows of a sparse gradient that holds every row once:
    the weights and moments of torch's fused Adam on the dense gradient, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(30, 8, generator=gen)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt = RowSparseAdam([ours], lr=0.05)
    reference = torch.optim.Adam([theirs], lr=0.05, fused=True)
    for _ in range(4):
        grad = torch.randn(30, 8, generator=gen)
        ours.grad, theirs.grad = grad.to_sparse(sparse_dim=1), grad.clone()
        opt.step()
        reference.step()
        assert torch.equal(ours.detach(), theirs.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[ours][key], reference.state[theirs][key]), key


@pytest.mark.parametrize("fused", [True, False])
def test_row_sparse_adam_resumed_from_its_state_dict_trains_on_identically(fused: bool) -> None:
    """Saved after some steps and loaded into a new optimizer (through torch.save, as a
    checkpoint), RowSparseAdam continues exactly as the uninterrupted one: moments, the step
    count (on the parameter's device when fused) and the arithmetic."""
    import io

    def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(3)
        return [
            (torch.randint(10, (6,), generator=gen), torch.randn(6, 4, generator=gen))
            for _ in range(6)
        ]

    def train(table: nn.Embedding, opt: RowSparseAdam, steps: list) -> None:
        for ids, target in steps:
            opt.zero_grad()
            ((table(ids) - target) ** 2).sum().backward()
            opt.step()

    torch.manual_seed(0)
    table = nn.Embedding(10, 4, sparse=True)
    opt = RowSparseAdam(table.parameters(), lr=0.05, fused=fused)
    train(table, opt, batches()[:3])
    buffer = io.BytesIO()
    torch.save({"weight": table.weight.detach().clone(), "opt": opt.state_dict()}, buffer)
    train(table, opt, batches()[3:])

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = nn.Embedding(10, 4, sparse=True)
    with torch.no_grad():
        resumed.weight.copy_(saved["weight"])
    opt2 = RowSparseAdam(resumed.parameters(), lr=0.05, fused=fused)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["fused"] is fused
    train(resumed, opt2, batches()[3:])
    assert torch.equal(resumed.weight, table.weight)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(opt2.state[resumed.weight][key], opt.state[table.weight][key]), key


def test_rowwise_adagrad_resumed_from_its_state_dict_trains_on_identically() -> None:
    import io

    gen = torch.Generator().manual_seed(3)
    steps = [
        (torch.randint(10, (6,), generator=gen), torch.randn(6, 4, generator=gen)) for _ in range(6)
    ]

    def train(
        table: nn.Embedding,
        opt: optim.RowWiseAdagrad,
        part: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        for ids, target in part:
            opt.zero_grad()
            ((table(ids) - target) ** 2).sum().backward()
            opt.step()

    torch.manual_seed(0)
    table = nn.Embedding(10, 4, sparse=True)
    opt = optim.RowWiseAdagrad(table.parameters(), lr=0.1)
    train(table, opt, steps[:3])
    buffer = io.BytesIO()
    torch.save({"weight": table.weight.detach().clone(), "opt": opt.state_dict()}, buffer)
    train(table, opt, steps[3:])
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = nn.Embedding(10, 4, sparse=True)
    with torch.no_grad():
        resumed.weight.copy_(saved["weight"])
    opt2 = optim.RowWiseAdagrad(resumed.parameters(), lr=0.1)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, steps[3:])
    assert torch.equal(resumed.weight, table.weight)
    assert torch.equal(opt2.state[resumed.weight]["sum"], opt.state[table.weight]["sum"])


def test_row_sparse_adam_unfused_keeps_the_lazy_adam_arithmetic() -> None:
    """``fused=False`` (``optim.fused=false``) updates rows with the same float operations as
    before the fused kernel, so earlier sparse runs reproduce bit for bit."""
    table = nn.Embedding(10, 4, sparse=True)
    weight, exp_avg, exp_avg_sq = (
        table.weight.detach().clone(),
        torch.zeros(10, 4),
        torch.zeros(10, 4),
    )
    opt = RowSparseAdam(table.parameters(), lr=0.1, fused=False)
    for step, ids in enumerate(([2, 5, 5], [5, 7], [0, 2, 9]), start=1):
        opt.zero_grad()
        (table(torch.tensor(ids)) ** 2).sum().backward()
        grad = table.weight.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        opt.step()
        m = exp_avg[rows].lerp_(values, 0.1)
        v = exp_avg_sq[rows].mul_(0.999).addcmul_(values, values, value=0.001)
        exp_avg[rows], exp_avg_sq[rows] = m, v
        denom = (v.sqrt() / math.sqrt(1 - 0.999**step)).add_(1e-8)
        weight[rows] = weight[rows].add(m.div_(denom), alpha=-0.1 / (1 - 0.9**step))
        assert torch.equal(table.weight.detach(), weight), step
        assert torch.equal(opt.state[table.weight]["exp_avg_sq"], exp_avg_sq), step
    # An optimizer state saved before the ``fused`` option resumes with this arithmetic.
    saved = opt.state_dict()
    del saved["param_groups"][0]["fused"]
    resumed = RowSparseAdam(table.parameters(), lr=0.1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["fused"] is False


def test_row_sparse_adam_leaves_untouched_rows_and_their_moments() -> None:
    table = nn.Embedding(10, 4, sparse=True)
    opt = RowSparseAdam(table.parameters(), lr=0.1)
    before = table.weight.detach().clone()
    table(torch.tensor([2, 5, 5])).sum().backward()
    opt.step()
    moved = (table.weight != before).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [2, 5]
    assert touched_rows(table.weight).tolist() == [2, 5]
    assert opt.state[table.weight]["exp_avg_sq"][[0, 1, 3]].abs().sum() == 0


def test_sparse_path_trains_through_the_module(tmp_path: Path) -> None:
    dm, module = tiny_setup(optim={"name": "adam", "sparse": True, "embedding_weight_decay": 0.0})
    trainer = tiny_trainer(tmp_path, [], max_epochs=4)
    trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.optimizers[0], RowSparseAdam)
    assert module.model.user_embedding.weight.grad.is_sparse
    assert float(trainer.callback_metrics["train/loss"]) < 0.6  # BCE at initialisation: 0.693


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "adamw", "embedding_weight_decay": 0.0}, "optim.name=adamw"),
        ({"embedding_weight_decay": 1e-5}, "optim.embedding_weight_decay"),
        ({"name": "sgd", "momentum": 0.9, "embedding_weight_decay": 0.0}, "optim.momentum"),
    ],
)
def test_sparse_optimizer_refuses_what_it_cannot_do(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        OptimConfig(sparse=True, **kwargs)


# -- the callbacks on the sparse path -----------------------------------------------------------


def sparse_step(model: MF, opt: torch.optim.Optimizer, users: list[int], items: list[int]) -> None:
    u, i = torch.tensor(users), torch.tensor(items)
    opt.zero_grad()
    model(u, i).square().mean().backward()
    opt.step()


def sparse_mf() -> tuple[MF, RowSparseAdam]:
    torch.manual_seed(0)
    model = MF(30, 20, 8, init_std=0.1)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = True
    return model, RowSparseAdam(model.parameters(), lr=0.05)


def test_masks_on_touched_rows_keep_every_pruned_weight_zero() -> None:
    model, opt = sparse_mf()
    cb = MagnitudePruning(
        PruneConfig(sparsity=0.5, scope="layer", score="magnitude", schedule="one_shot")
    )
    cb._targets = select_targets(model, TargetSpec(groups=["embedding"]), "t")
    cb._root = model
    cb.update_masks(0)
    for step in range(5):
        sparse_step(model, opt, [step, 7, 7], [3, step, 11])
        cb.apply_masks(only_touched=True)
        for t in cb._targets:
            assert not t.weight[~cb.masks[t.name]].any()


def test_taylor_sums_from_sparse_and_dense_gradients_agree() -> None:
    sums = []
    for sparse in (False, True):
        model, _ = sparse_mf()
        model.user_embedding.sparse = model.item_embedding.sparse = sparse
        cb = MagnitudePruning(PruneConfig(sparsity=0.5))
        cb._targets = select_targets(model, TargetSpec(groups=["embedding"]), "t")
        for _ in range(2):
            model.zero_grad()
            model(torch.tensor([1, 1, 4]), torch.tensor([2, 3, 2])).sum().backward()
            cb.accumulate_taylor()
        sums.append(cb._taylor)
    for name in sums[0]:
        assert torch.allclose(sums[0][name], sums[1][name], atol=1e-9)


def test_l1_proximal_step_shrinks_touched_rows_as_the_dense_step_does() -> None:
    model, opt = sparse_mf()
    cb = L1Proximal(L1Config(strength=0.5, targets=TargetSpec(groups=["embedding"])))
    cb._targets = select_targets(model, cb.cfg.targets, "t")
    trainer = SimpleNamespace(optimizers=[opt])
    sparse_step(model, opt, [1, 2, 2], [4, 5, 6])
    table = model.user_embedding.weight
    expected = table.detach().clone()
    v_hat = opt.state[table]["exp_avg_sq"] / (1 - 0.999)
    soft_threshold_(expected, 0.05 / (v_hat.sqrt() + 1e-8) * 0.5)
    untouched = table.detach().clone()
    cb.proximal_step(trainer, 1.0)
    assert cb.steps_run() == "rows"
    rows = torch.tensor([1, 2])
    assert torch.allclose(table[rows], expected[rows], atol=1e-7)
    others = torch.ones(30, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(table[others], untouched[others])
    assert (table[rows] == 0).any()


def test_fake_quant_embedding_gives_sparse_gradients_equal_to_dense_ones() -> None:
    scheme = QuantScheme(bits=4, group_size=8)
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        table = FakeQuantEmbedding(nn.Embedding(12, 16, sparse=sparse), scheme)
        table(torch.tensor([3, 3, 7])).square().sum().backward()
        grads.append(table.weight.grad)
    assert grads[1].is_sparse
    assert torch.allclose(grads[0], grads[1].to_dense())


# -- row hooks: the callbacks' per-step work fused into RowSparseAdam's row update --------------


def test_row_hooks_see_the_step_run_in_order_and_can_be_removed() -> None:
    table = nn.Embedding(10, 4, sparse=True)
    opt = RowSparseAdam(table.parameters(), lr=0.1)
    before = table.weight.detach().clone()
    seen: list[tuple[str, list[int]]] = []

    def first(step: RowStep) -> None:
        seen.append(("first", step.rows.tolist()))
        assert torch.equal(step.old, before[step.rows])
        # Adam's first step moves every coordinate with a gradient by lr (up to eps).
        assert torch.allclose((step.new - step.old).abs(), torch.full_like(step.new, 0.1))
        step.new.zero_()

    def second(step: RowStep) -> None:
        seen.append(("second", step.rows.tolist()))
        assert not step.new.any()  # sees the first hook's change
        step.new.add_(1.0)

    handles = [
        opt.register_row_hook(table.weight, first),
        opt.register_row_hook(table.weight, second),
    ]
    assert opt.has_row_hooks(table.weight)
    table(torch.tensor([5, 2, 5])).sum().backward()
    opt.step()
    assert seen == [("first", [2, 5]), ("second", [2, 5])]
    assert torch.equal(table.weight[[2, 5]], torch.ones(2, 4))
    assert torch.equal(table.weight[[0, 1, 3]], before[[0, 1, 3]])
    for handle in handles:
        handle.remove()
    assert not opt.has_row_hooks(table.weight)
    opt.zero_grad()
    table(torch.tensor([2])).sum().backward()
    opt.step()
    assert len(seen) == 2


def test_row_hooks_get_the_old_rows_only_when_one_of_them_reads_them() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(10, 4, sparse=True)
    opt = RowSparseAdam(table.parameters(), lr=0.1)
    olds: list[torch.Tensor | None] = []
    wanted = [False]

    def record(step: RowStep) -> None:
        olds.append(None if step.old is None else step.old.clone())

    def asked() -> bool:
        return wanted[0]

    def step_on(ids: list[int]) -> torch.Tensor:
        before = table.weight.detach().clone()
        opt.zero_grad()
        table(torch.tensor(ids)).sum().backward()
        opt.step()
        return before[sorted(set(ids))]

    handle = opt.register_row_hook(table.weight, record, reads_old=False)
    step_on([1, 4])
    assert olds == [None]
    asking = opt.register_row_hook(table.weight, lambda step: None, reads_old=asked)
    step_on([3])  # asked, and answered no
    assert olds[-1] is None
    wanted[0] = True
    before = step_on([4, 1, 4])  # the other hook reads them: every hook sees them
    assert torch.equal(olds[-1], before)
    asking.remove()
    handle.remove()
    opt.register_row_hook(table.weight, record)  # reads_old defaults to True
    before = step_on([0, 9])
    assert torch.equal(olds[-1], before)


SPARSE_OPTIMIZERS = {
    "adam": {"name": "adam", "sparse": True, "embedding_weight_decay": 0.0},
    "rowwise_adagrad": {
        "name": "rowwise_adagrad",
        "lr": 0.05,
        "sparse": True,
        "embedding_weight_decay": 0.0,
    },
}


def fit_sparse(
    tmp_path: Path, callback: L.Callback, fused: bool, optimizer: str = "adam"
) -> tuple[RecommenderModule, L.Callback]:
    """A few epochs of MF on the sparse path with ``callback``; ``fused=False`` keeps the
    callback off the optimizer's row hooks (its ``on_optimizer_step_end`` path instead)."""
    dm, module = tiny_setup(optim=SPARSE_OPTIMIZERS[optimizer])
    if not fused:
        callback.register_row_hooks = lambda *args: None  # type: ignore[method-assign]
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=3)
    trainer.fit(module, datamodule=dm)
    return module, callback


@pytest.mark.parametrize(
    ("score", "optimizer"),
    [("taylor", "adam"), ("magnitude", "adam"), ("taylor", "rowwise_adagrad")],
)
def test_pruning_in_the_row_hook_equals_pruning_after_the_step(
    tmp_path: Path, score: str, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the step's last mask update, whether the hook was handed the old rows), per row update
    handed: list[tuple[int, bool]] = []
    callbacks: list[MagnitudePruning] = []

    class Recorded(RowStep):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            handed.append((callbacks[-1].last_update_step, self.old is not None))

    monkeypatch.setattr(optim, "RowStep", Recorded)
    runs = {}
    for fused in (True, False):
        callbacks.append(MagnitudePruning(PruneConfig(sparsity=0.6, score=score, frequency=2)))
        runs[fused] = fit_sparse(tmp_path / str(fused), callbacks[-1], fused, optimizer)
    (fused_module, fused_cb), (plain_module, plain_cb) = runs[True], runs[False]
    assert fused_cb.last_update_step > 10  # several mask updates happened
    # The rows are copied before the step only while Taylor sums are added.
    final = fused_cb.last_update_step
    assert handed and all(old == (score == "taylor" and step < final) for step, old in handed)
    assert (score == "taylor") == any(old for _, old in handed)
    assert not fused_cb._row_hooks  # removed at the end of fit
    for name, value in plain_module.state_dict().items():
        assert torch.equal(fused_module.state_dict()[name], value), name
    for name, mask in plain_cb.masks.items():
        assert torch.equal(fused_cb.masks[name], mask), name
        weight = fused_module.get_submodule(name).weight
        assert not weight[~mask].any()
    for name, sums in plain_cb._taylor.items():
        assert torch.equal(fused_cb._taylor[name], sums), name
    # the schedule ended within the run: no sums kept after the last mask update, either path
    assert fused_cb._masks_final() and fused_cb._taylor == plain_cb._taylor == {}


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad"])
def test_l1_in_the_row_hook_equals_the_proximal_step_after_it(
    tmp_path: Path, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[bool] = []  # whether the hook was handed the old rows, per row update

    class Recorded(RowStep):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            handed.append(self.old is not None)

    monkeypatch.setattr(optim, "RowStep", Recorded)
    cfg = L1Config(strength=0.02, warmup_steps=5, targets=TargetSpec(groups=["embedding"]))
    fused, fused_cb = fit_sparse(tmp_path / "fused", L1Proximal(cfg), True, optimizer)
    assert handed and not any(handed)  # the proximal step never reads them: not copied
    plain, plain_cb = fit_sparse(tmp_path / "plain", L1Proximal(cfg), False, optimizer)
    assert isinstance(fused_cb, L1Proximal) and isinstance(plain_cb, L1Proximal)
    assert fused_cb.steps_run() == plain_cb.steps_run() == "rows"
    for name, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], value), name
    zeros = int((fused.model.user_embedding.weight == 0).sum())
    assert zeros > 0  # the proximal step made exact zeros


def test_row_masks_built_in_blocks_equal_one_ranking_of_the_whole_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops, "CHUNK", 8 * 7)  # blocks of 7 rows
    model, _ = sparse_mf()
    cb = MagnitudePruning(PruneConfig(sparsity=0.75, end_step=10, frequency=5, basis="none"))
    cb._targets = select_targets(model, TargetSpec(groups=["embedding"]), "t")
    cb._root, cb.end_step, cb.frequency = model, 10, 5
    gen = torch.Generator().manual_seed(6)
    expected = {}
    for step in (5, 10):  # the second update keeps the first one's pruned weights pruned
        for t in cb._targets:
            cb._taylor[t.name] = torch.rand(t.weight.shape, generator=gen)
            scores = cb._taylor[t.name] + 1e-12 * t.weight.detach().abs()
            if t.name in cb.masks:
                scores = scores.masked_fill(~cb.masks[t.name], -1.0)
            n_prune = round(cb.target_sparsity(step, "embedding") * 8)
            drop = torch.topk(scores, n_prune, dim=1, largest=False).indices
            expected[t.name] = torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)
            expected[t.name] &= cb.masks.get(t.name, expected[t.name])
        cb.update_masks(step)
        for t in cb._targets:
            assert torch.equal(cb.masks[t.name], expected[t.name]), (step, t.name)
            assert not t.weight[~expected[t.name]].any()
            assert (t.weight[expected[t.name]] != 0).all()
    assert cb.overall_sparsity() == pytest.approx(0.75)


def fit_dense_big_tables(
    root: Path, optim: dict, method: str = "prune"
) -> tuple[RecommenderModule, MagnitudePruning, dict[str, Any]]:
    """Two epochs on MF with tables ~10x larger than a batch's ids, with gradual pruning (or
    int8 QAT, or neither: the pruning callback is then not passed to the trainer), counting the
    targets pruned on their gradient rows and the backwards that added rows into the user
    table's kept gradient, and checking the pruned zeros after every batch."""
    synthetic = {"num_users": 400, "num_items": 300, "interactions_per_user": 3}
    dm, module = tiny_setup(
        data={"name": "synthetic", "source": "synthetic", "synthetic": synthetic},
        trainer={"batch_size": 32, "progress_bar": False},
        optim=optim,
    )
    cb = MagnitudePruning(PruneConfig(sparsity=0.6, frequency=25, basis="none"))
    calls: dict[str, Any] = {"rows": 0, "zeros_kept": True}
    mask_rows = cb._mask_gradient_rows

    def spy(rows: dict[str, torch.Tensor]) -> None:
        calls["rows"] += len(rows)
        mask_rows(rows)

    cb._mask_gradient_rows = spy  # type: ignore[method-assign]

    class ZerosKept(L.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            for name, mask in cb.masks.items():
                weight = module.get_submodule(name).weight
                calls["zeros_kept"] &= not weight[~mask].any()

    callbacks: list[L.Callback] = [cb, ZerosKept()] if method == "prune" else []
    if method == "qat":
        callbacks = [QuantizationAwareTraining(QATConfig(convert_at_end=False))]
    trainer = tiny_trainer(root, callbacks, max_epochs=2)
    # ops.gather_rows's backward returns a sparse gradient only to add it into a kept one.
    with mock.patch.object(torch, "sparse_coo_tensor", wraps=torch.sparse_coo_tensor) as sparse:
        trainer.fit(module, datamodule=dm)
    user_table = tuple(module.model.user_embedding.weight.shape)  # not the bias tables
    calls["kept"] = sum(tuple(call.args[2]) == user_table for call in sparse.call_args_list)
    return module, cb, calls


@pytest.mark.parametrize(
    ("optim", "method"),
    [
        ({"name": "adam"}, "none"),
        ({"name": "adamw", "weight_decay": 0.01, "embedding_weight_decay": 0.01}, "none"),
        ({"name": "sgd", "lr": 0.5, "momentum": 0.9}, "none"),
        ({"name": "adagrad", "lr": 0.05}, "none"),
        ({"name": "adam"}, "qat"),  # fake-quant tables read their shared Parameter's rows
    ],
    ids=lambda o: o["name"] if isinstance(o, dict) else o,
)
def test_kept_gradients_train_the_same_weights_as_fresh_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optim: dict, method: str
) -> None:
    """Tables much larger than a batch keep their dense gradient between steps (the rows a
    batch wrote are added in place and cleared after the step): the trained weights equal a fresh
    gradient per step bit for bit, with each dense optimizer and under QAT; the gradients are
    released after each epoch and the tables unregistered after the fit."""
    runs = {}
    for kept in (True, False):
        with monkeypatch.context() as patch:
            if not kept:
                patch.setattr(ops, "keep_gradient", lambda table, on=True: None)
            runs[kept] = fit_dense_big_tables(tmp_path / str(kept), optim, method)
    (fast, _, fast_calls), (plain, _, plain_calls) = runs[True], runs[False]
    assert fast_calls["kept"] > 100 and plain_calls["kept"] == 0  # each path was taken
    for name, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[name], value), name
    weight = fast.model.user_embedding.weight
    assert weight.grad is None and weight not in ops._TABLES and not weight._backward_hooks


@pytest.mark.parametrize(
    "optim",
    [
        {"name": "adam"},
        {"name": "adamw", "weight_decay": 0.01, "embedding_weight_decay": 0.01},
        {"name": "sgd", "lr": 0.5, "momentum": 0.9},
        {"name": "adagrad", "lr": 0.05},
    ],
    ids=lambda o: o["name"],
)
def test_pruning_on_the_gradients_rows_equals_masking_the_whole_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optim: dict
) -> None:
    """Dense optimizers, tables much larger than a batch: the Taylor sums in the batch's rows
    and masked gradient rows (with the pruned weights' optimizer state zeroed) train the same
    weights, bit for bit, as full-table sums and masking the whole table after each step; the
    pruned weights are exactly zero after every training batch."""
    runs = {}
    for rows_path in (True, False):
        with monkeypatch.context() as patch:
            if not rows_path:  # also a fresh gradient each step (no kept gradients)
                patch.setattr(ops, "gradient_rows", lambda table: None)
                patch.setattr(ops, "keep_gradient", lambda table, on=True: None)
            runs[rows_path] = fit_dense_big_tables(tmp_path / str(rows_path), optim)
    (fast, fast_cb, fast_calls), (full, full_cb, full_calls) = runs[True], runs[False]
    assert fast_calls["rows"] > 100 and full_calls["rows"] == 0  # each path was taken
    assert fast_calls["kept"] > 100 and full_calls["kept"] == 0
    assert fast_cb.last_update_step > 50 and fast_cb.masks  # several mask updates happened
    assert fast_calls["zeros_kept"] and full_calls["zeros_kept"]
    for name, value in full.state_dict().items():
        assert torch.equal(fast.state_dict()[name], value), name
    for name, mask in full_cb.masks.items():
        assert torch.equal(fast_cb.masks[name], mask), name
    assert fast.model.user_embedding.weight not in ops._TABLES  # untracked after fit


def test_tables_smaller_than_a_batch_stop_recording_their_gradient_rows(tmp_path: Path) -> None:
    """ML-100K-sized tables against a batch's ids take the full-table path; after the first
    step their gather records stop and their gradients are not kept (nothing per step left to
    pay for them)."""
    dm, module = tiny_setup()  # 120 users, 80 items, batches of 256 ids
    cb = MagnitudePruning(PruneConfig(sparsity=0.5, frequency=2, basis="none"))
    tracked: list[bool] = []

    class Watch(L.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            tracked.extend(t.weight in ops._TABLES for t in cb._targets)

    trainer = tiny_trainer(tmp_path, [cb, Watch()], max_epochs=1)
    trainer.fit(module, datamodule=dm)
    # The first step's records decide; from the second step on, none is kept.
    later = tracked[len(cb._targets) :]
    assert later and not any(later)
    assert cb.last_update_step > 0  # pruned on the full-table path all the same
    for name, mask in cb.masks.items():
        assert not module.get_submodule(name).weight[~mask].any()


def test_a_frozen_table_trains_beside_kept_gradients(tmp_path: Path) -> None:
    """A table that does not require gradients (frozen, e.g. pre-trained) is not kept: the fit
    runs, the frozen table is unchanged and the other table trains."""
    dm, module = tiny_setup()
    frozen = module.model.user_embedding.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    items = module.model.item_embedding.weight.detach().clone()
    tiny_trainer(tmp_path, [], max_epochs=1).fit(module, datamodule=dm)
    assert torch.equal(frozen, before) and frozen not in ops._TABLES
    assert not torch.equal(module.model.item_embedding.weight, items)


@pytest.mark.parametrize("scope", ["global", "group", "layer"])
def test_pooled_masks_from_score_blocks_equal_the_materialised_ranking(
    scope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """update_masks ranks unstructured scores a block of rows at a time (BlockScores): the masks
    equal a stable sort of the whole layers' normalised scores, pooled by scope (NeuMF: an
    embedding and a linear group), with ties and earlier masks."""
    monkeypatch.setattr(ops, "CHUNK", 8 * 7)  # blocks of a few rows, uneven last blocks
    model = NeuMF(50, 30, 8, 8, [16, 8])
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # ties at every threshold, and different scales per layer
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randint(-4, 5, p.shape, generator=gen) * (1.0 + i))
    cb = MagnitudePruning(
        PruneConfig(sparsity=0.6, scope=scope, score="magnitude", schedule="one_shot", basis="none")
    )
    cb._targets = select_targets(model, cb.cfg.targets, "compression.prune.targets")
    cb._root = model
    assert {t.group for t in cb._targets} == {"embedding", "linear"}
    weights = {t.name: t.weight.detach().clone() for t in cb._targets}
    pools: dict[str, list[str]] = {}
    for t in cb._targets:
        pool = {"global": "all", "group": t.group, "layer": t.name}[scope]
        pools.setdefault(pool, []).append(t.name)
    previous: dict[str, torch.Tensor] = {}
    for sparsity in (0.4, 0.6):
        monkeypatch.setattr(cb, "target_sparsity", lambda step, group, s=sparsity: s)
        scores = {n: w.abs() for n, w in weights.items()}
        for name, mask in previous.items():  # pruned-for-good weights score -1
            scores[name] = torch.where(mask, scores[name], -1.0)
        expected: dict[str, torch.Tensor] = {}
        for names in pools.values():
            if scope == "layer":
                expected[names[0]] = sort_reference(scores[names[0]], sparsity)
                continue
            normed = []
            for n in names:
                rms = pruning._alive_rms(scores[n]).clamp_min(1e-30)
                normed.append(torch.where(scores[n] >= 0, scores[n] / rms, scores[n]).flatten())
            keep = sort_reference(torch.cat(normed), sparsity).split([x.numel() for x in normed])
            expected.update({n: k.view_as(scores[n]) for n, k in zip(names, keep, strict=True)})
        cb.update_masks(0)
        for name, mask in expected.items():
            assert torch.equal(cb.masks[name], mask), (scope, sparsity, name)
        previous = expected
