"""build_optimizer: parameter groups, fused kernels by default, the sparse path."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from recsys_compress.config import OptimConfig
from recsys_compress.errors import ConfigError
from recsys_compress.models import MF, NeuMF
from recsys_compress.module import build_optimizer
from recsys_compress.optim import (
    RowSparseAdam,
    RowWiseAdagrad,
    adam_denom,
    optimizer_step,
    sqrt_floor,
)


def train(cfg: OptimConfig, steps: int = 30) -> MF:
    torch.manual_seed(0)
    model = MF(20, 30, 8)
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        users, items = (
            torch.randint(20, (64,), generator=gen),
            torch.randint(30, (64,), generator=gen),
        )
        labels = (torch.rand(64, generator=gen) < 0.3).float()
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(users, items), labels).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad", "sgd"])
def test_fused_kernels_by_default_and_equal_to_the_loop_up_to_rounding(name: str) -> None:
    extra = {"momentum": 0.9} if name == "sgd" else {}
    fused_cfg = OptimConfig(name=name, lr=0.05, embedding_weight_decay=1e-3, **extra)
    loop_cfg = OptimConfig(name=name, lr=0.05, embedding_weight_decay=1e-3, fused=False, **extra)
    assert build_optimizer(MF(5, 5, 4), fused_cfg).defaults["fused"] is True
    assert not build_optimizer(MF(5, 5, 4), loop_cfg).defaults.get("fused")
    fused, loop = train(fused_cfg), train(loop_cfg)
    torch.manual_seed(0)
    start = MF(20, 30, 8)  # the weights both runs started from
    moved = 0.0
    for (key, a), b, c in zip(
        fused.named_parameters(), loop.parameters(), start.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
        moved = max(moved, float((a - c).abs().max()))
    assert moved > 1e-2  # the runs trained


def test_groups_give_embedding_tables_their_own_weight_decay() -> None:
    model = NeuMF(6, 7, 4, 4, [8, 4])
    optimizer = build_optimizer(model, OptimConfig(embedding_weight_decay=1e-4, weight_decay=0.1))
    tables, others = optimizer.param_groups
    assert tables["weight_decay"] == 1e-4 and others["weight_decay"] == 0.1
    embedding_weights = {id(m.weight) for m in model.modules() if hasattr(m, "num_embeddings")}
    assert {id(p) for p in tables["params"]} == embedding_weights
    assert len(tables["params"]) + len(others["params"]) == len(list(model.parameters()))


def test_sparse_path_uses_row_sparse_adam_and_unfused_sgd() -> None:
    model = MF(6, 7, 4)
    sparse = OptimConfig(sparse=True, embedding_weight_decay=0.0)
    assert isinstance(build_optimizer(model, sparse), RowSparseAdam)
    assert model.user_embedding.sparse and model.item_embedding.sparse
    sgd = build_optimizer(model, OptimConfig(name="sgd", sparse=True, embedding_weight_decay=0.0))
    assert not sgd.defaults.get("fused")  # torch's fused kernels take dense gradients only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("bias2_sqrt", "eps"), [(0.0316, 1e-8), (1.0, 1e-8), (0.5, 1e-6)])
def test_adam_denominator_with_a_floor_under_the_root_is_bit_identical(
    dtype: torch.dtype, bias2_sqrt: float, eps: float
) -> None:
    """Raising zero (and subnormal) second moments to the smallest normal float before the root
    changes no denominator: zeros, subnormals, values around the floor, typical moments."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(4000, generator=gen, dtype=dtype) * 1e-6
    v[::3] = 0.0
    v[1::7] = info.tiny / 4  # subnormal
    v[2::11] = info.tiny
    v[4::13] = info.tiny * 3
    v[5::17] = 1e-30
    assert sqrt_floor(dtype, bias2_sqrt, eps) == info.tiny
    expected = (v.sqrt() / bias2_sqrt).add_(eps)
    assert torch.equal(adam_denom(v, bias2_sqrt, eps), expected)
    # eps too small to absorb the floor's root: no floor, the plain root
    assert sqrt_floor(dtype, bias2_sqrt, 0.0) == 0.0
    assert torch.equal(adam_denom(v, bias2_sqrt, 0.0), v.sqrt() / bias2_sqrt)
    assert math.isinf(float((1.0 / adam_denom(v, bias2_sqrt, 0.0)).max()))


# -- optimizer_step: torch's step wrapper skipped only when it has nothing to do ------------------


def adam_pair() -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, list[torch.Tensor]]:
    """Two fused Adams over equal parameters with equal gradients."""
    gen = torch.Generator().manual_seed(7)
    data = [torch.randn(5, 4, generator=gen), torch.randn(3, generator=gen)]
    grads = [torch.randn(d.shape, generator=gen) for d in data]
    optimizers = []
    for _ in range(2):
        params = [torch.nn.Parameter(d.clone()) for d in data]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizers.append(torch.optim.Adam(params, lr=0.1, fused=True))
    return optimizers[0], optimizers[1], grads


def count_wrapper_runs(optimizer: torch.optim.Optimizer) -> list[int]:
    """Counts calls of the no-op entry point that only torch's wrapper calls."""
    calls = [0]

    def entry() -> None:
        calls[0] += 1

    optimizer._optimizer_step_code = entry  # type: ignore[method-assign]
    return calls


def test_optimizer_step_without_hooks_skips_the_wrapper_with_the_same_update() -> None:
    ours, reference, _ = adam_pair()
    calls = count_wrapper_runs(ours)
    for _ in range(3):
        optimizer_step(ours)
        reference.step()
    assert calls == [0]
    pairs = zip(ours.param_groups[0]["params"], reference.param_groups[0]["params"], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert ours.state[ours.param_groups[0]["params"][0]]["step"] == 3


def test_optimizer_step_runs_the_wrapper_for_hooks_and_profilers() -> None:
    seen: list[str] = []
    ours, _, _ = adam_pair()
    calls = count_wrapper_runs(ours)
    handles = [
        ours.register_step_pre_hook(lambda *a: seen.append("pre")),
        ours.register_step_post_hook(lambda *a: seen.append("post")),
    ]
    optimizer_step(ours)
    assert seen == ["pre", "post"] and calls == [1]
    for handle in handles:
        handle.remove()
    handle = register_optimizer_step_post_hook(lambda *a: seen.append("global post"))
    try:
        optimizer_step(ours)
    finally:
        handle.remove()
    assert seen[-1] == "global post" and calls == [2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer_step(ours)
    assert calls == [3]
    assert any(e.name == "Optimizer.step#Adam.step" for e in prof.events())
    optimizer_step(ours)  # nothing registered again
    assert calls == [3]


def test_optimizer_step_keeps_the_lr_schedulers_record_and_skips_no_override() -> None:
    ours, _, _ = adam_pair()
    calls = count_wrapper_runs(ours)
    scheduler = torch.optim.lr_scheduler.StepLR(ours, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()" would mean the record was lost
        warnings.simplefilter("error")
        optimizer_step(ours)
        scheduler.step()
    assert calls == [0] and ours.param_groups[0]["lr"] == 0.05

    class Overridden(torch.optim.SGD):
        ran = 0

        # functools.wraps copies torch's "hooked" mark, so torch leaves this step unwrapped
        @functools.wraps(torch.optim.SGD.step)
        def step(self, closure: Any = None) -> Any:
            Overridden.ran += 1
            return super().step(closure)

    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    optimizer_step(Overridden([param], lr=0.5))
    assert Overridden.ran == 1 and torch.equal(param.detach(), torch.full((2,), 0.5))
    replaced = torch.optim.SGD([param], lr=0.5)
    replaced.step = lambda *a: None  # type: ignore[method-assign]  # replaced on the instance
    optimizer_step(replaced)
    assert torch.equal(param.detach(), torch.full((2,), 0.5))


# -- RowWiseAdagrad ---------------------------------------------------------------------------


def rowwise_reference(
    table: torch.Tensor, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise Adagrad written out a row at a time: ``(weights, accumulators)`` after
    ``batches`` of (ids, per-id gradient rows; repeated ids summed)."""
    weights, sums = table.clone().double(), torch.zeros(len(table), dtype=torch.float64)
    for ids, grads in batches:
        for row in sorted(set(ids.tolist())):
            g = grads[ids == row].double().sum(0)
            sums[row] += float((g * g).mean())
            weights[row] -= lr * g / (math.sqrt(float(sums[row])) + eps)
    return weights, sums


def test_rowwise_adagrad_updates_only_the_batch_rows_with_one_accumulator_each() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(12, 5, sparse=True)
    start = table.weight.detach().clone()
    opt = RowWiseAdagrad(table.parameters(), lr=0.1, eps=1e-8)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for ids in ([3, 7, 3, 0], [7, 7, 11], [0, 3]):
        ids_t = torch.tensor(ids)
        upstream = torch.randn(len(ids), 5, generator=gen)
        opt.zero_grad()
        (table(ids_t) * upstream).sum().backward()
        opt.step()
        batches.append((ids_t, upstream))
    weights, sums = rowwise_reference(start, batches, 0.1, 1e-8)
    state = opt.state[table.weight]
    assert set(state) == {"sum"} and state["sum"].shape == (12,)  # one number per row
    torch.testing.assert_close(state["sum"].double(), sums, rtol=1e-6, atol=0)
    torch.testing.assert_close(table.weight.detach().double(), weights, rtol=1e-5, atol=1e-7)
    untouched = [1, 2, 4, 5, 6, 8, 9, 10]
    assert torch.equal(table.weight[untouched], start[untouched])
    assert not state["sum"][untouched].any()
    assert not torch.equal(table.weight[[0, 3, 7, 11]], start[[0, 3, 7, 11]])


def test_rowwise_adagrad_gives_dense_gradients_torch_adagrad() -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 3) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    ours = RowWiseAdagrad(layers[0].parameters(), lr=0.05, eps=1e-8, weight_decay=0.01)
    torch_adagrad = torch.optim.Adagrad(
        layers[1].parameters(), lr=0.05, eps=1e-8, weight_decay=0.01, foreach=False
    )
    x = torch.randn(16, 6)
    for _ in range(4):
        for layer, opt in zip(layers, (ours, torch_adagrad), strict=True):
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
    for a, b in zip(layers[0].parameters(), layers[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_rowwise_adagrad_refuses_mixed_gradients_and_table_weight_decay() -> None:
    table = torch.nn.Embedding(4, 2, sparse=True)
    opt = RowWiseAdagrad(table.parameters(), weight_decay=0.1)
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="weight_decay is not supported for sparse"):
        opt.step()
    opt = RowWiseAdagrad(table.parameters())
    opt.step()  # one accumulator per row from now on
    table.sparse = False
    opt.zero_grad()
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient after a dense one or the other"):
        opt.step()


def test_rowwise_adagrad_config_trains_mf_and_needs_the_sparse_path() -> None:
    cfg = OptimConfig(name="rowwise_adagrad", lr=0.05, sparse=True, embedding_weight_decay=0.0)
    model = MF(6, 7, 4)
    assert isinstance(build_optimizer(model, cfg), RowWiseAdagrad)
    assert model.user_embedding.sparse and model.item_embedding.sparse
    trained = train(cfg)
    torch.manual_seed(0)
    start = MF(20, 30, 8)
    assert (trained.user_embedding.weight - start.user_embedding.weight).abs().max() > 1e-2
    with pytest.raises(ConfigError, match=r"optim.name=rowwise_adagrad .* set optim.sparse=true"):
        OptimConfig(name="rowwise_adagrad")
