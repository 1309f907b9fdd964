"""Magnitude pruning: exact zeros under Adam, the cubic schedule, scale-aware ranking, resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from recsys_compress.compression.pruning import (
    MagnitudePruning,
    PruneConfig,
    _next_linear,
    cubic_sparsity,
)
from recsys_compress.compression.targets import TargetSpec, select_targets
from recsys_compress.errors import ConfigError
from tests.compression.helpers import tiny_setup, tiny_trainer


def sparsity(weight: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(weight)) / weight.numel()


def test_cubic_schedule_values() -> None:
    args = {"final": 0.8, "initial": 0.0, "start": 10, "end": 110, "frequency": 10}
    assert cubic_sparsity(5, **args) == 0.0
    assert cubic_sparsity(10, **args) == 0.0
    # halfway: s_f + (s_i - s_f) * (1 - 0.5)^3 = 0.8 - 0.8/8
    assert cubic_sparsity(60, **args) == pytest.approx(0.7)
    assert cubic_sparsity(65, **args) == pytest.approx(0.7)  # held between updates
    assert cubic_sparsity(110, **args) == 0.8
    assert cubic_sparsity(500, **args) == 0.8


def test_gradual_pruning_reaches_target_and_stays_exactly_zero_under_adam(tmp_path: Path) -> None:
    dm, module = tiny_setup()
    cfg = PruneConfig(sparsity=0.8, end_fraction=0.5, frequency=2, scope="layer")
    pruning = MagnitudePruning(cfg)
    trainer = tiny_trainer(tmp_path, [pruning], max_epochs=4)
    trainer.fit(module, datamodule=dm)
    total = trainer.global_step
    assert pruning.end_step == total // 2
    # Taylor sums are not accumulated after the last mask update (nothing would read them)
    assert pruning.last_update_step == pruning.end_step and pruning._taylor == {}
    for name in ("user_embedding", "item_embedding"):
        weight = getattr(module.model, name).weight
        assert sparsity(weight) == pytest.approx(0.8, abs=1e-3)
        # the zeros are exactly the masked entries, after many Adam steps past the end step
        assert torch.equal(weight != 0, pruning.masks[f"model.{name}"])
    # biases are excluded by default
    assert sparsity(module.model.user_bias.weight) < 0.5


def test_layer_scope_on_mlp_keeps_every_layer_alive_and_global_ranking_is_scale_aware() -> None:
    _, module = tiny_setup("neumf")
    with torch.no_grad():  # embeddings 100x larger than MLP weights, as after training
        for m in module.model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.mul_(100.0)
    for scope in ("global", "group"):
        pruning = MagnitudePruning(PruneConfig(sparsity=0.5, scope=scope, schedule="one_shot"))
        pruning.setup(L.Trainer(logger=False), module, "fit")
        pruning.update_masks(0)
        per_layer = pruning.sparsity_by_layer()
        assert max(per_layer.values()) < 1.0, per_layer
        linear = [v for k, v in per_layer.items() if "tower" in k or "predict" in k]
        # normalised scores: the MLP is pruned to a comparable level, not wiped out
        assert max(linear) < 0.9


def test_max_layer_sparsity_caps_a_pooled_threshold() -> None:
    _, module = tiny_setup("neumf")
    with torch.no_grad():  # heavy-tailed layer: after RMS normalisation most of it is tiny
        weight = module.model.mlp.tower[0].weight
        weight.fill_(1e-6)
        weight[0, :2] = 1.0
    pruning = MagnitudePruning(
        PruneConfig(
            sparsity=0.6,
            scope="global",
            schedule="one_shot",
            max_layer_sparsity=0.9,
            targets=TargetSpec(groups=["linear"]),
        )
    )
    pruning.setup(L.Trainer(logger=False), module, "fit")
    pruning.update_masks(0)
    assert pruning.sparsity_by_layer()["model.mlp.tower.0"] == pytest.approx(0.9, abs=0.01)


def test_structured_rows_and_neurons() -> None:
    _, module = tiny_setup("neumf")
    rows = MagnitudePruning(
        PruneConfig(
            sparsity=0.5,
            structure="rows",
            schedule="one_shot",
            targets=TargetSpec(groups=["embedding"], include=["*item_embedding*"]),
        )
    )
    rows.setup(L.Trainer(logger=False), module, "fit")
    rows.update_masks(0)
    table = module.model.mlp.item_embedding.weight
    zero_rows = (table == 0).all(dim=1)
    assert zero_rows.float().mean() == pytest.approx(0.5)
    kept_norm = table[~zero_rows].norm(dim=1).min()
    assert ((table != 0).any(dim=1) | zero_rows).all() and kept_norm > 0

    neurons = MagnitudePruning(
        PruneConfig(
            sparsity=0.5,
            structure="neurons",
            schedule="one_shot",
            targets=TargetSpec(groups=["linear"], include=["*tower*"]),
        )
    )
    neurons.setup(L.Trainer(logger=False), module, "fit")
    neurons.update_masks(0)
    first, second = module.model.mlp.tower[0], module.model.mlp.tower[2]
    dead = (first.weight == 0).all(dim=1)
    assert dead.float().mean() == pytest.approx(0.5)
    assert (first.bias[dead] == 0).all()
    # the next layer's input columns that read dead neurons are zero too
    assert (second.weight[:, dead] == 0).all()
    assert _next_linear(module, "model.mlp.tower.0") is second


def test_masks_and_schedule_survive_checkpoint_resume(tmp_path: Path) -> None:
    dm, module = tiny_setup()
    cfg = PruneConfig(sparsity=0.5, end_fraction=0.5, frequency=1)
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[MagnitudePruning(cfg)],
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    first = trainer.callbacks[0]
    saved_masks = {k: v.clone() for k, v in first.masks.items()}

    dm2, module2 = tiny_setup()
    resumed = MagnitudePruning(cfg)
    trainer2 = tiny_trainer(tmp_path, [resumed], max_epochs=4)
    trainer2.fit(module2, datamodule=dm2, ckpt_path=ckpt)
    assert resumed.end_step == first.end_step  # schedule position restored, not re-estimated
    for name, mask in saved_masks.items():
        # pruned stays pruned after the resume (final sparsity was reached before the save)
        assert torch.equal(resumed.masks[name], mask)
        weight = module2.get_submodule(name).weight
        assert sparsity(weight) == pytest.approx(0.5, abs=1e-3)


def test_taylor_score_runs_and_prunes_to_target(tmp_path: Path) -> None:
    dm, module = tiny_setup()
    pruning = MagnitudePruning(
        PruneConfig(sparsity=0.7, score="taylor", scope="layer", end_fraction=0.5)
    )
    tiny_trainer(tmp_path, [pruning], max_epochs=2).fit(module, datamodule=dm)
    assert sparsity(module.model.item_embedding.weight) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sparsity": 1.0}, "compression.prune.sparsity"),
        ({"sparsity": -0.1}, "compression.prune.sparsity"),
        ({"sparsity": None}, "compression.prune"),
        ({"sparsity": 0.5, "threshold": 0.1}, "compression.prune"),
        ({"structure": "blocks"}, "compression.prune.structure"),
        ({"frequency": 0}, "compression.prune.frequency"),
        ({"targets": TargetSpec(groups=["conv"])}, "compression.prune.targets.groups"),
    ],
)
def test_bad_prune_config(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        PruneConfig(**kwargs)


def test_target_spec_matching_nothing_is_an_error() -> None:
    _, module = tiny_setup()
    pruning = MagnitudePruning(PruneConfig(targets=TargetSpec(include=["*tower*"])))
    with pytest.raises(ConfigError, match=r"matches no module.*user_embedding"):
        pruning.setup(L.Trainer(logger=False), module, "fit")


def test_row_scope_prunes_every_row_to_the_same_count() -> None:
    _, module = tiny_setup()
    pruning = MagnitudePruning(PruneConfig(sparsity=0.75, scope="row", schedule="one_shot"))
    pruning.setup(L.Trainer(logger=False), module, "fit")
    before = module.model.item_embedding.weight.detach().abs().clone()
    pruning.update_masks(0)
    table = module.model.item_embedding.weight  # 8 dims: 2 kept per row
    assert ((table != 0).sum(dim=1) == 2).all()
    mask = pruning.masks["model.item_embedding"]
    kept_min = before.masked_fill(~mask, float("inf")).min(dim=1).values
    dropped_max = before.masked_fill(mask, 0.0).max(dim=1).values
    assert (dropped_max <= kept_min).all()


def _low_rank_mf(num_users: int = 60, num_items: int = 50, dim: int = 16) -> nn.Module:
    """MF whose score matrix has a decaying spectrum spread over every raw dimension."""
    from recsys_compress.models.mf import MF

    torch.manual_seed(5)
    model = MF(num_users, num_items, dim=dim)
    mix = torch.linalg.qr(torch.randn(dim, dim))[0]  # a random basis: no raw dim is special
    spectrum = torch.logspace(0, -2, dim)
    with torch.no_grad():
        model.user_embedding.weight.copy_(torch.randn(num_users, dim) * spectrum @ mix)
        model.item_embedding.weight.copy_(torch.randn(num_items, dim) * spectrum @ mix)
    return model


def test_spectral_basis_keeps_scores_and_orders_dimensions_by_energy(monkeypatch) -> None:
    from recsys_compress import ops
    from recsys_compress.compression.lowrank import rotate_to_spectral_basis

    monkeypatch.setattr(ops, "CHUNK", 16 * 16)  # rotated in place 16 rows at a time
    model = _low_rank_mf()
    users = torch.arange(60)
    with torch.no_grad():
        before = model.score_all(users)
        rotate_to_spectral_basis(model, TargetSpec(), "compression.prune", "basis=none")
        after = model.score_all(users)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for table in (model.user_embedding.weight, model.item_embedding.weight):
        norms = table.detach().norm(dim=0)
        assert (norms[:-1] >= norms[1:] - 1e-5).all()  # energy decreasing along the dims
    # both tables' columns are balanced: ||p_j|| = ||q_j|| = sqrt(s_j)
    torch.testing.assert_close(
        model.user_embedding.weight.norm(dim=0), model.item_embedding.weight.norm(dim=0)
    )


def test_spectral_basis_folds_the_gmf_head_and_refuses_neumf() -> None:
    from recsys_compress.compression.lowrank import rotate_to_spectral_basis

    _, gmf = tiny_setup("gmf")
    with torch.no_grad():
        gmf.model.predict.weight.uniform_(0.5, 2.0)
    users = torch.arange(20)
    before = gmf.model.score_all(users).detach()
    rotate_to_spectral_basis(gmf.model, TargetSpec(), "compression.prune", "basis=none")
    torch.testing.assert_close(gmf.model.score_all(users).detach(), before, rtol=1e-4, atol=1e-5)
    assert torch.equal(gmf.model.predict.weight, torch.ones_like(gmf.model.predict.weight))

    _, neumf = tiny_setup("neumf")
    state = {k: v.clone() for k, v in neumf.state_dict().items()}
    with pytest.raises(ConfigError, match=r"compression\.prune.*compression\.prune\.basis=none"):
        rotate_to_spectral_basis(
            neumf.model, TargetSpec(), "compression.prune", "compression.prune.basis=none"
        )
    assert all(torch.equal(v, neumf.state_dict()[k]) for k, v in state.items())  # untouched


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_pruning_in_the_spectral_basis_keeps_scores_better(scope: str) -> None:
    """Per-row pruning of a dot product in its raw basis keeps dims the other side dropped."""
    users = torch.arange(60)
    errors = {}
    for basis in ("none", "spectral"):
        model = _low_rank_mf()
        with torch.no_grad():
            reference = model.score_all(users)
        module = nn.ModuleDict({"model": model})
        pruning = MagnitudePruning(
            PruneConfig(sparsity=0.75, schedule="one_shot", score="magnitude", scope=scope)
        )
        pruning._root = module
        pruning._targets = select_targets(module, pruning.cfg.targets, "compression.prune")
        if basis == "spectral":
            pruning.cfg.basis = "spectral"
            pruning._rotate(SimpleNamespace(optimizers=[]))
        pruning.update_masks(0)
        assert sparsity(model.user_embedding.weight) == pytest.approx(0.75)
        with torch.no_grad():
            errors[basis] = float((model.score_all(users) - reference).norm() / reference.norm())
    assert errors["spectral"] < 0.5 * errors["none"], errors


def test_basis_auto_prunes_neumf_in_its_own_basis_and_spectral_refuses_it(tmp_path: Path) -> None:
    dm, module = tiny_setup("neumf")
    auto = MagnitudePruning(PruneConfig(sparsity=0.5, schedule="one_shot"))
    tiny_trainer(tmp_path, [auto], max_epochs=1).fit(module, datamodule=dm)
    assert auto.current_sparsity == pytest.approx(0.5, abs=0.01)
    dm, module = tiny_setup("neumf")
    strict = MagnitudePruning(PruneConfig(sparsity=0.5, schedule="one_shot", basis="spectral"))
    with pytest.raises(ConfigError, match=r"compression\.prune\.basis=none"):
        tiny_trainer(tmp_path, [strict], max_epochs=1).fit(module, datamodule=dm)
    with pytest.raises(ConfigError, match=r"compression\.prune\.basis='pca'"):
        PruneConfig(basis="pca")


def test_prepared_step_lists_follow_mask_updates_and_new_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-step Taylor sums and masking (lists prepared once) equal the straightforward
    |w*g| sums and w*mask, and are rebuilt when the masks change or a weight gets new storage
    (at a mask update the sums' tables are zeroed for reuse, released after the last);
    chunked tables too (CHUNK smaller than a table)."""
    from recsys_compress import ops

    monkeypatch.setattr(ops, "CHUNK", 300)  # the 120 x 8 table in 4 chunks, the 80 x 8 in 3
    _, module = tiny_setup()
    model = module.model
    cb = MagnitudePruning(PruneConfig(sparsity=0.5, basis="none"))
    cb._root = model
    cb._targets = select_targets(model, TargetSpec(groups=["embedding"]), "t")
    cb.end_step, cb.frequency = 10, 1
    gen = torch.Generator().manual_seed(0)
    tables = [t.weight for t in cb._targets]

    def backward() -> list[torch.Tensor]:
        grads = [torch.randn(w.shape, generator=gen) for w in tables]
        for w, g in zip(tables, grads, strict=True):
            w.grad = g.clone()
        return grads

    expected = [torch.zeros_like(w) for w in tables]
    for _ in range(3):
        for total, w, g in zip(expected, tables, backward(), strict=True):
            total += (w.detach() * g).abs()
        cb.accumulate_taylor()
    for t, total in zip(cb._targets, expected, strict=True):
        assert torch.equal(cb._taylor[t.name], total)

    for step in (1, 5):
        sums = dict(cb._taylor)
        cb.update_masks(step)  # resets the sums, replaces the masks
        assert cb._taylor == {}  # no sums until a step adds some
        with torch.no_grad():
            for w in tables:
                w.add_(1.0)  # pruned weights non-zero again, as after an Adam step
        before = [w.detach().clone() for w in tables]
        grads = backward()
        cb.accumulate_taylor()
        cb.apply_masks(only_touched=True)
        for t, w, w0, g in zip(cb._targets, tables, before, grads, strict=True):
            mask = cb.masks[t.name]
            assert torch.equal(cb._taylor[t.name], (w0 * g).abs())
            assert cb._taylor[t.name] is sums[t.name]  # the old table, zeroed and reused
            assert torch.equal(w.detach(), w0 * mask)
            assert 0.0 < float(mask.float().mean()) < 1.0

    with torch.no_grad():  # new storage for a weight: the lists follow it
        tables[0].data = torch.ones_like(tables[0])
    backward()
    cb.apply_masks(only_touched=True)
    assert torch.equal(tables[0].detach(), cb.masks[cb._targets[0].name].float())
    cb.update_masks(10)  # the last update (end_step): the sums are released
    assert cb._taylor == {} and cb._taylor_spare == {}
