"""Compression methods composed in one fit: SVD then QAT quantises the factors (scores, size,
artifact, checkpoints), and pruning / L1 with SVD compose only on disjoint targets."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys_compress import load_compressed, ops
from recsys_compress.compression import sparsity
from recsys_compress.compression.accounting import layer_stats
from recsys_compress.compression.lowrank import (
    LowRankEmbedding,
    LowRankLinear,
    SVDConfig,
    SVDLowRank,
    apply_svd,
)
from recsys_compress.compression.pruning import MagnitudePruning, PruneConfig
from recsys_compress.compression.qat import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    QATConfig,
    QuantizationAwareTraining,
    QuantizedEmbedding,
    QuantizedLinear,
)
from recsys_compress.compression.sparsity import L1Config, L1Proximal
from recsys_compress.compression.targets import TargetSpec
from recsys_compress.errors import ConfigError
from recsys_compress.export import describe_structure, export_model
from tests.compression.helpers import tiny_config, tiny_setup, tiny_trainer

RANK = 4


def factorised(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, LowRankEmbedding | LowRankLinear)
    }


def factor_bytes(model: torch.nn.Module) -> int:
    return sum(s.compressed_bytes for s in layer_stats(model) if s.rank is not None)


def svd_rank(rank: int = RANK, **kw) -> SVDConfig:
    return SVDConfig(rank=rank, param_ratio=None, **kw)


@pytest.mark.parametrize("model_name", ["mf", "neumf"])
def test_svd_then_qat_ends_with_int8_factors_close_to_the_fake_quant_model(
    model_name: str, tmp_path: Path
) -> None:
    dm, module = tiny_setup(model_name)
    svd_only = copy.deepcopy(module.model)
    apply_svd(svd_only, svd_rank())
    qat = QuantizationAwareTraining(QATConfig(convert_at_end=False))
    tiny_trainer(tmp_path, [SVDLowRank(svd_rank()), qat], max_epochs=2).fit(module, datamodule=dm)
    model = module.model.eval()
    layers = factorised(model)
    assert len(layers) == (2 if model_name == "mf" else 6)  # NeuMF: 4 tables, 2 MLP layers
    for layer in layers.values():
        assert isinstance(layer.left, FakeQuantEmbedding | FakeQuantLinear)
        assert isinstance(layer.right, FakeQuantLinear)
    users = torch.arange(dm.num_users)
    with torch.no_grad():
        fake = model.score_all(users)
        qat.convert(model)
        converted = model.score_all(users)
    for name, layer in layers.items():
        kinds = (QuantizedEmbedding if isinstance(layer, LowRankEmbedding) else QuantizedLinear,)
        assert isinstance(layer.left, kinds) and isinstance(layer.right, QuantizedLinear), name
        assert layer.left.qweight.dtype == layer.right.qweight.dtype == torch.int8
        assert layer.rank == RANK and layer.dense_weight().shape[1] == (
            layer.embedding_dim if isinstance(layer, LowRankEmbedding) else layer.in_features
        )
    # int8 per-channel factors (and float16 biases) move scores by well under 1% of their range
    assert float((converted - fake).abs().max()) < 2e-3 * float(fake.abs().max())

    # the accounting counts each factor with its bits, once, under its factorised layer
    stats = {s.name: s for s in layer_stats(model)}
    assert not any(n.endswith((".left", ".right")) for n in stats)
    user = stats["user_embedding" if model_name == "mf" else "gmf_user_embedding"]
    n, d = dm.num_users, 8
    # left int8 [n, r] and right int8 [d, r], one float16 scale per row of each
    assert (user.rank, user.bits, user.params) == (RANK, 8, RANK * (n + d))
    assert user.compressed_bytes == RANK * (n + d) + 2 * (n + d)

    # the artifact: the quantised factors are listed, it is smaller than SVD alone, and it loads
    # back scoring exactly like the in-memory model
    structure = describe_structure(model)
    assert set(structure["lowrank"]) == set(layers)
    assert set(structure["quantized"]) >= {f"{n}.{f}" for n in layers for f in ("left", "right")}
    model_cfg = tiny_config(model_name).model
    ids = np.arange(dm.num_users), np.arange(dm.num_items)
    both = export_model(model, model_cfg, *ids, tmp_path / "svd_qat.safetensors")
    alone = export_model(svd_only, model_cfg, *ids, tmp_path / "svd.safetensors")
    assert both < alone
    # int8 + a float16 scale per row of RANK values: 1.5 bytes a value instead of 4
    assert factor_bytes(model) == pytest.approx(1.5 / 4 * factor_bytes(svd_only), rel=0.02)
    loaded = load_compressed(tmp_path / "svd_qat.safetensors").model
    assert isinstance(factorised(loaded)[next(iter(layers))].left, QuantizedEmbedding)
    with torch.no_grad():
        assert torch.equal(loaded.score_all(users), converted)


def test_svd_qat_checkpoint_resumes_with_quantised_factors(tmp_path: Path) -> None:
    dm, module = tiny_setup("mf")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)

    def callbacks() -> list[L.Callback]:
        return [SVDLowRank(svd_rank()), QuantizationAwareTraining(QATConfig(freeze_epoch=0))]

    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[*callbacks(), ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    # saved during QAT: float factors with their frozen scales, under the factor modules' names
    assert saved["model.user_embedding.left.weight"].shape == (dm.num_users, RANK)
    assert saved["model.user_embedding.right.weight"].shape == (8, RANK)
    assert bool(saved["model.user_embedding.right.frozen"])

    # a fresh dense model resumes: SVD rebuilds the layers, QAT the fake-quant factors, before
    # the weights load; training goes on from the saved factors
    _, resumed = tiny_setup("mf")
    svd, qat = callbacks()
    first = FirstFactors()
    trainer = tiny_trainer(tmp_path, [svd, qat, first], max_epochs=3)
    trainer.fit(resumed, datamodule=dm, ckpt_path=last)
    assert trainer.current_epoch == 3 and svd.applied and qat.converted
    assert first.kind is FakeQuantEmbedding and first.frozen
    assert torch.equal(first.left, saved["model.user_embedding.left.weight"])
    table = resumed.model.user_embedding
    assert isinstance(table, LowRankEmbedding) and table.rank == RANK
    assert isinstance(table.left, QuantizedEmbedding) and isinstance(table.right, QuantizedLinear)
    assert not torch.equal(table.left.dequantize(), first.left)  # it trained on


class FirstFactors(L.Callback):
    """At the first epoch start: the user table's left factor, its type and frozen flag."""

    def __init__(self) -> None:
        self.left: torch.Tensor | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.left is None:
            factor = pl_module.model.user_embedding.left
            self.left, self.kind = factor.weight.detach().clone(), type(factor)
            self.frozen = bool(factor.frozen)


@pytest.mark.parametrize("method", ["prune", "l1"])
def test_sparsity_and_svd_on_the_same_modules_are_refused_before_training(
    method: str, tmp_path: Path
) -> None:
    dm, module = tiny_setup("neumf")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    sparse = MagnitudePruning(PruneConfig()) if method == "prune" else L1Proximal(L1Config())
    svd = SVDLowRank(SVDConfig(targets=TargetSpec(groups=["linear"])))
    trainer = tiny_trainer(tmp_path, [sparse, svd])
    pattern = (
        rf"compression\.{method}\.targets and compression\.svd\.targets overlap on "
        r"model\.mlp\.tower\.0, model\.mlp\.tower\.2: .*undo the sparsity.*disjoint"
    )
    with pytest.raises(ConfigError, match=pattern):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert not factorised(module.model)


class PreHookCount(L.Callback):
    """The first optimizer's step pre-hooks at each epoch's end."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts.append(len(trainer.optimizers[0]._optimizer_step_pre_hooks))


@pytest.mark.parametrize("method", ["prune", "l1"])
def test_sparsity_goes_on_after_svd_rebuilds_the_sparse_optimizer(
    tmp_path: Path, method: str
) -> None:
    """SVD factorises the MLP at epoch 1 and rebuilds the optimizer: pruning's and L1's row
    hooks go on the new one (before the twenty-first round they stayed on the old one, and on
    the sparse path the tables were neither masked nor shrunk from then on), and the tables end
    as sparse as on the dense path."""
    zeros = {}
    for sparse in (False, True):
        dm, module = tiny_setup("neumf", optim={"sparse": sparse, "embedding_weight_decay": 0.0})
        tables = TargetSpec(groups=["embedding"])
        if method == "prune":
            cb: L.Callback = MagnitudePruning(PruneConfig(targets=tables, end_fraction=0.3))
        else:
            cb = L1Proximal(L1Config(strength=3e-4, targets=tables))
        svd = SVDLowRank(svd_rank(targets=TargetSpec(groups=["linear"]), at_epoch=1))
        tiny_trainer(tmp_path, [cb, svd], max_epochs=4).fit(module, datamodule=dm)
        assert set(factorised(module.model)) == {"mlp.tower.0", "mlp.tower.2"}
        weight = module.model.get_submodule("mlp.item_embedding").weight
        zeros[sparse] = float((weight == 0).float().mean())
    if method == "prune":  # round(0.8 * 8) = 6 of each row's 8 weights
        assert zeros == {False: 0.75, True: 0.75}
    else:  # the sparse path shrinks only the rows a batch touched
        assert zeros[False] > 0.1 and zeros[True] == pytest.approx(zeros[False], abs=0.02)


def test_l1s_fused_steps_go_on_after_svd_rebuilds_the_optimizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dense Adam L1's step runs inside the optimizer's (its hooks): on the rebuilt
    optimizer too (the pass run eagerly here: no compiler needed)."""
    monkeypatch.setattr(sparsity, "_fused_kernel", lambda: sparsity.adam_proximal_step_)
    dm, module = tiny_setup("neumf")
    tables = TargetSpec(groups=["embedding"])
    l1 = L1Proximal(L1Config(strength=3e-4, targets=tables, kernel="compiled"))
    svd = SVDLowRank(svd_rank(targets=TargetSpec(groups=["linear"]), at_epoch=1))
    hooks = PreHookCount()
    tiny_trainer(tmp_path, [l1, svd, hooks], max_epochs=3).fit(module, datamodule=dm)
    assert set(factorised(module.model)) == {"mlp.tower.0", "mlp.tower.2"}
    assert hooks.counts == [1, 1, 1] and l1.steps_run() == "fused"


class KeptTables(L.Callback):
    """At each epoch's end: whether the module keeps exactly the model's current tables'
    gradients, and the tables it kept at the first epoch's end."""

    def __init__(self) -> None:
        self.current: list[bool] = []
        self.first: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tables = [m.weight for m in pl_module.modules() if isinstance(m, torch.nn.Embedding)]
        kept = pl_module._kept_gradients
        self.current.append([id(t) for t in kept] == [id(t) for t in tables])
        self.first = self.first or list(kept)


def test_the_module_keeps_the_gradients_of_the_tables_svd_puts_in(tmp_path: Path) -> None:
    """SVD's joint factorisation replaces MF's tables at epoch 1: the module keeps the new
    tables' gradients and lets the replaced ones go (they held a table-sized gradient each)."""
    dm, module = tiny_setup("mf")
    svd = SVDLowRank(svd_rank(method="joint_dot_product", at_epoch=1))
    look = KeptTables()
    tiny_trainer(tmp_path, [svd, look], max_epochs=2).fit(module, datamodule=dm)
    assert svd.applied and look.current == [True, True] and len(look.first) == 4
    tables = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    replaced = [t for t in look.first if id(t) not in tables]
    assert replaced and all(t not in ops._TABLES or not ops._TABLES[t].kept for t in replaced)


def test_pruned_embeddings_and_factorised_mlp_compose(tmp_path: Path) -> None:
    dm, module = tiny_setup("neumf")
    prune = MagnitudePruning(PruneConfig(targets=TargetSpec(groups=["embedding"])))
    svd = SVDLowRank(svd_rank(targets=TargetSpec(groups=["linear"])))
    tiny_trainer(tmp_path, [prune, svd], max_epochs=2).fit(module, datamodule=dm)
    model = module.model
    assert set(factorised(model)) == {"mlp.tower.0", "mlp.tower.2"}
    # round(0.8 * 8) = 6 of each row's 8 weights stay zero after the factorisation
    for name in ("gmf_user_embedding", "mlp.item_embedding"):
        weight = model.get_submodule(name).weight
        assert torch.equal((weight == 0).sum(dim=1), torch.full((weight.shape[0],), 6)), name
