"""Truncated-SVD factorisation: exactness, errors against the spectrum, rank rules, the joint
dot-product reduction, the Lightning callback (fine-tuning on the factors) and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from recsys_compress import ops
from recsys_compress.compression import lowrank
from recsys_compress.compression.accounting import layer_stats, size_summary
from recsys_compress.compression.lowrank import (
    LowRankEmbedding,
    LowRankLinear,
    SVDConfig,
    SVDLowRank,
    apply_svd,
    balanced_factors,
    convert_to_lowrank,
    jointly_reduce_dot_product,
    lowrank_ranks,
    match_state_dict,
    rank_for_energy,
    rank_for_param_ratio,
)
from recsys_compress.compression.targets import TargetSpec
from recsys_compress.config import to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.errors import ConfigError
from recsys_compress.models import GMF, MF, NeuMF, build_model
from recsys_compress.module import RecommenderModule


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Order-1 parameters, so score differences are visible (the 0.01 init makes them tiny)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def matrix_with_spectrum(n: int, d: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    """``U diag(sigmas) Vᵀ`` with random orthonormal U [n, k], V [d, k]."""
    gen = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return (u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T


def eckart_young(matrix: torch.Tensor, r: int) -> float:
    """Relative error of the best rank-r approximation: sqrt(sum_{i>=r} σ²) / sqrt(sum σ²)."""
    s = torch.linalg.svdvals(matrix.double())
    return float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())


def svd_cfg(**kw) -> SVDConfig:
    kw.setdefault("param_ratio", None)
    return SVDConfig(**kw)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


def test_full_rank_reproduces_dense_embedding_and_linear():
    torch.manual_seed(0)
    emb = nn.Embedding(30, 8)
    low, info = LowRankEmbedding.from_module(emb, 8)
    ids = torch.tensor([0, 5, 5, 29, 17])
    assert torch.allclose(low(ids), emb(ids), atol=1e-5)
    assert info["relative_error"] < 1e-5
    assert (info["params_before"], info["params_after"]) == (240, 8 * (30 + 8))
    assert (low.num_embeddings, low.embedding_dim, low.rank) == (30, 8, 8)

    lin = nn.Linear(12, 7)
    low_lin, info = LowRankLinear.from_module(lin, 7)
    x = torch.randn(4, 3, 12)
    assert torch.allclose(low_lin(x), lin(x), atol=1e-5)
    assert torch.allclose(low_lin.dense_weight(), lin.weight, atol=1e-5)
    assert (info["params_before"], info["params_after"]) == (12 * 7 + 7, 7 * 19 + 7)
    # The factors are standard modules (so QAT / pruning act on them), and the factors()
    # protocol keeps the math orientation: weight = left @ right.
    assert [n for n, _ in low_lin.named_parameters()] == [
        "right.weight",
        "left.weight",
        "left.bias",
    ]
    assert type(low_lin.left) is nn.Linear and type(low_lin.right) is nn.Linear
    assert low_lin.bias is low_lin.left.bias
    left, right = low_lin.factors()
    assert left.shape == (7, 7) and right.shape == (7, 12)
    assert type(low.left) is nn.Embedding and low.left.weight.shape == (30, 8)
    assert type(low.right) is nn.Linear and low.right.weight.shape == (8, 8)
    left, right = low.factors()
    assert torch.allclose(left @ right, emb.weight, atol=1e-5)
    assert torch.equal(low.dense_weight(), left @ right)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_relative_error_is_the_discarded_spectrum(rank):
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    s = torch.linalg.svdvals(weight.double())
    expected = math.sqrt(float(s[rank:].square().sum()) / float(s.square().sum()))
    left, right, error = balanced_factors(weight, rank)
    assert error == pytest.approx(expected, abs=1e-5)
    direct = torch.linalg.matrix_norm(weight - left @ right) / torch.linalg.matrix_norm(weight)
    assert float(direct) == pytest.approx(expected, abs=1e-5)
    # Balanced split: leftᵀ left = right rightᵀ = diag(S_r).
    diag = torch.diag(s[:rank]).float()
    assert torch.allclose(left.T @ left, diag, atol=1e-4)
    assert torch.allclose(right @ right.T, diag, atol=1e-4)


def test_randomized_svd_is_close_to_exact_on_low_rank_plus_noise():
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(300, 5, generator=gen) @ torch.randn(5, 120, generator=gen)
    weight = signal + 0.01 * torch.randn(300, 120, generator=gen)
    exact_l, exact_r, exact_err = balanced_factors(weight, 5, randomized=False)
    rand_l, rand_r, rand_err = balanced_factors(weight, 5, randomized=True, niter=2)
    assert rand_err == pytest.approx(exact_err, rel=1e-3)
    assert rand_err == pytest.approx(eckart_young(weight, 5), rel=1e-3)
    diff = torch.linalg.matrix_norm(rand_l @ rand_r - exact_l @ exact_r)
    assert float(diff / torch.linalg.matrix_norm(weight)) < 1e-4


def test_full_rank_reproduces_mf_scores():
    model = randomise(MF(13, 17, 8))
    users = torch.arange(13)
    with torch.no_grad():
        dense = model.score_all(users)
        report = apply_svd(model, svd_cfg(rank=8))
        assert {e["name"] for e in report} == {"user_embedding", "item_embedding"}
        assert isinstance(model.user_embedding, LowRankEmbedding)
        assert type(model.user_bias) is nn.Embedding  # *bias* excluded
        assert (model.score_all(users) - dense).abs().max() < 1e-5
        assert all(e["relative_error"] < 1e-5 for e in report)


# ------------------------------------------------------------------------------------------------
# Rank rules
# ------------------------------------------------------------------------------------------------


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.layer.weight.copy_(weight)


SPECTRUM = [math.sqrt(40), math.sqrt(30), math.sqrt(20), math.sqrt(10)]  # σ² shares .4 .3 .2 .1


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"param_ratio": 0.5}, 6),  # floor(0.5 * 30*20 / 50)
        ({"param_ratio": 1.0}, 12),
        ({"param_ratio": 0.01}, 1),  # at least 1
        ({"energy": 0.4}, 1),
        ({"energy": 0.7}, 2),
        ({"energy": 0.75}, 3),
        ({"energy": 0.9}, 3),
        ({"energy": 0.95}, 4),
        ({"energy": 1.0}, 4),
        ({"rank": 3}, 3),
        ({"rank": 9, "linear_rank": 2}, 2),  # the group override wins
    ],
)
def test_rank_rules_on_a_known_spectrum(rule, expected):
    model = OneLayer(matrix_with_spectrum(30, 20, SPECTRUM).float())
    (entry,) = apply_svd(model, svd_cfg(targets=TargetSpec(groups=["linear"]), **rule))
    assert entry["rank"] == expected == model.layer.rank
    discarded = sum(s * s for s in SPECTRUM[expected:]) / 100.0
    assert entry["relative_error"] == pytest.approx(math.sqrt(discarded), abs=1e-5)


def test_rank_helpers():
    assert rank_for_param_ratio(300, 64, 0.5) == math.floor(0.5 * 300 * 64 / 364)
    assert rank_for_param_ratio(64, 64, 1.0) == 32
    assert rank_for_energy(torch.tensor(SPECTRUM), 0.71) == 3
    assert rank_for_energy(torch.zeros(4), 0.5) == 1


def test_layers_no_rank_can_shrink_stay_dense():
    model = randomise(GMF(20, 25, 8))
    report = apply_svd(model, svd_cfg(rank=2))
    by_name = {e["name"]: e for e in report}
    assert not by_name["predict"]["replaced"] and type(model.predict) is nn.Linear
    assert by_name["user_embedding"]["rank"] == 2


# ------------------------------------------------------------------------------------------------
# Joint reduction of the dot product
# ------------------------------------------------------------------------------------------------


def test_joint_reduction_is_optimal_and_beats_per_table_svd():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2])
    p = torch.randn(40, 8, generator=gen) * scales
    q = torch.randn(30, 8, generator=gen) * scales.flip(0).sqrt()
    scores = p @ q.T
    r = 3
    new_p, new_q = jointly_reduce_dot_product(p, q, r)
    assert new_p.weight.shape == (40, 3) and new_q.weight.shape == (30, 3)
    joint = torch.linalg.matrix_norm(scores - (new_p.weight @ new_q.weight.T).detach())
    optimum = eckart_young(scores, r) * float(torch.linalg.matrix_norm(scores))
    assert float(joint) == pytest.approx(optimum, rel=1e-4)
    lp, rp, _ = balanced_factors(p, r)
    lq, rq, _ = balanced_factors(q, r)
    per_table = torch.linalg.matrix_norm(scores - (lp @ rp) @ (lq @ rq).T)
    assert float(joint) < 0.9 * float(per_table)
    # Full rank: exact.
    full_p, full_q = jointly_reduce_dot_product(p, q, 8)
    assert torch.allclose((full_p.weight @ full_q.weight.T).detach(), scores, atol=1e-4)


def test_joint_reduction_of_mf_keeps_biases_and_reaches_eckart_young():
    model = randomise(MF(25, 35, 8))
    with torch.no_grad():
        users = torch.arange(25)
        dot = model.user_embedding.weight @ model.item_embedding.weight.T
        bias_part = model.score_all(users) - dot
        user_bias = model.user_bias.weight.clone()
        report = apply_svd(model, svd_cfg(rank=3, method="joint_dot_product"))
        assert type(model.user_embedding) is nn.Embedding
        assert model.user_embedding.embedding_dim == model.item_embedding.embedding_dim == 3
        assert torch.equal(model.user_bias.weight, user_bias)
        new_dot = model.score_all(users) - bias_part
        error = torch.linalg.matrix_norm(new_dot - dot) / torch.linalg.matrix_norm(dot)
        assert float(error) == pytest.approx(eckart_young(dot, 3), abs=1e-5)
        assert report[0]["relative_error"] == pytest.approx(eckart_young(dot, 3), abs=1e-5)
        assert [e["params_after"] for e in report] == [25 * 3, 35 * 3]


def test_joint_reduction_of_gmf_folds_the_predict_weights():
    users = torch.arange(20)
    model = randomise(GMF(20, 25, 8))
    with torch.no_grad():
        dense = model.score_all(users)
        bias = model.predict.bias.clone()
        weighted = (
            model.user_embedding.weight * model.predict.weight
        ) @ model.item_embedding.weight.T
        apply_svd(model, svd_cfg(rank=8, method="joint_dot_product"))
        assert torch.allclose(model.score_all(users), dense, atol=1e-5)
        assert torch.equal(model.predict.weight, torch.ones(1, 8))
        assert torch.equal(model.predict.bias, bias)

        model = randomise(GMF(20, 25, 8))
        apply_svd(model, svd_cfg(energy=0.8, method="joint_dot_product"))
        r = model.user_embedding.embedding_dim
        assert r < 8 and model.predict.in_features == r
        error = torch.linalg.matrix_norm(model.score_all(users) - bias - weighted)
        rel = float(error / torch.linalg.matrix_norm(weighted))
        assert rel == pytest.approx(eckart_young(weighted, r), abs=1e-5)
        assert rel <= math.sqrt(0.2) + 1e-6


def test_joint_reduction_refuses_models_that_are_not_a_dot_product():
    model = randomise(NeuMF(20, 25, 8, 8, [16, 8]))
    with pytest.raises(ConfigError, match=r"exactly one user table.*per_layer"):
        apply_svd(model, svd_cfg(rank=4, method="joint_dot_product"))
    gmf_only = TargetSpec(include=["*gmf_*"])
    with torch.no_grad():
        before = model(torch.arange(20), torch.arange(20))
        with pytest.raises(ConfigError, match="scores of NeuMF are not"):
            apply_svd(model, svd_cfg(rank=4, method="joint_dot_product", targets=gmf_only))
        # The tables are restored.
        assert model.gmf_user_embedding.embedding_dim == 8
        assert torch.equal(model(torch.arange(20), torch.arange(20)), before)


# ------------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"param_ratio": None}, r"compression\.svd: set exactly one"),
        ({"rank": 4}, r"compression\.svd: set exactly one"),  # with the default param_ratio
        ({"param_ratio": None, "rank": 2, "energy": 0.9}, r"compression\.svd: set exactly one"),
        ({"param_ratio": None, "rank": 0}, r"compression\.svd\.rank=0"),
        ({"param_ratio": 1.5}, r"compression\.svd\.param_ratio=1\.5"),
        ({"param_ratio": None, "energy": 0.0}, r"compression\.svd\.energy=0\.0"),
        ({"method": "tucker"}, r"compression\.svd\.method"),
        ({"at_epoch": -1}, r"compression\.svd\.at_epoch"),
        ({"targets": TargetSpec(groups=["conv"])}, r"compression\.svd\.targets\.groups"),
    ],
)
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        SVDConfig(**kw)


def test_group_overrides_alone_are_a_complete_rule():
    cfg = SVDConfig(param_ratio=None, embedding_rank=4, linear_rank=2)
    assert cfg.group_rank("linear") == (2, "compression.svd.linear_rank")


def test_rank_above_min_dim_names_the_key():
    with pytest.raises(ConfigError, match=r"compression\.svd\.rank=9 exceeds min\(n, d\)=8"):
        apply_svd(MF(13, 17, 8), svd_cfg(rank=9))
    with pytest.raises(ConfigError, match=r"compression\.svd\.embedding_rank=12"):
        apply_svd(MF(13, 17, 8), svd_cfg(rank=2, embedding_rank=12))
    with pytest.raises(ConfigError, match=r"compression\.svd\.rank=9 exceeds the rank"):
        apply_svd(MF(13, 17, 8), svd_cfg(rank=9, method="joint_dot_product"))
    with pytest.raises(ConfigError, match=r"compression\.svd\.targets"):
        apply_svd(MF(13, 17, 8), svd_cfg(rank=2, targets=TargetSpec(include=["*tower*"])))


# ------------------------------------------------------------------------------------------------
# Accounting and state dicts without a Trainer
# ------------------------------------------------------------------------------------------------


def test_accounting_counts_the_factors_once():
    model = MF(13, 17, 8)
    dense_params = sum(p.numel() for p in model.parameters())
    report = apply_svd(model, svd_cfg(rank=2))
    stats = {s.name: s for s in layer_stats(model)}
    assert stats["user_embedding"].rank == 2
    assert stats["user_embedding"].params == 2 * (13 + 8)
    summary = size_summary(model)
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    saved = sum(e["params_before"] - e["params_after"] for e in report)
    assert summary["params"] == dense_params - saved


def test_factorised_state_dict_loads_into_a_converted_model():
    source = randomise(NeuMF(20, 25, 8, 8, [16, 8]))
    apply_svd(source, svd_cfg(param_ratio=0.5))
    ranks = lowrank_ranks(source)
    assert ranks["mlp.tower.0"] == rank_for_param_ratio(16, 16, 0.5)
    fresh = NeuMF(20, 25, 8, 8, [16, 8])
    convert_to_lowrank(fresh, ranks)
    fresh.load_state_dict(source.state_dict())
    pairs = torch.arange(20), torch.arange(20)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*pairs), source(*pairs))
    # A jointly reduced model: match_state_dict reshapes the tables and the head.
    gmf = randomise(GMF(20, 25, 8))
    apply_svd(gmf, svd_cfg(rank=3, method="joint_dot_product"))
    fresh_gmf = GMF(20, 25, 8)
    rebuilt = match_state_dict(fresh_gmf, gmf.state_dict())
    assert set(rebuilt) == {"user_embedding", "item_embedding", "predict"}
    fresh_gmf.load_state_dict(gmf.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh_gmf.eval()(*pairs), gmf(*pairs))


# ------------------------------------------------------------------------------------------------
# Lightning: fine-tuning after the factorisation, checkpoints and resume
# ------------------------------------------------------------------------------------------------


def tiny_setup(model_name: str, **optim):
    cfg = to_train_config(
        {
            "data": {
                "name": "synthetic",
                "source": "synthetic",
                "use_cache": False,
                "synthetic": {
                    "num_users": 30,
                    "num_items": 40,
                    "interactions_per_user": 9,
                    "seed": 1,
                },
            },
            "split": {"name": "loo"},
            "model": {"name": model_name, "dim": 8, "mlp_dim": 8, "mlp_layers": [16, 8]},
            "loss": {"name": "bce", "num_negatives": 2},
            "eval": {"protocol": "full", "ks": [5], "metrics": ["ndcg"]},
            "optim": {"lr": 0.01, **optim},
            "trainer": {"batch_size": 64},
        }
    )
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, 0)
    dm.setup()
    L.seed_everything(0, verbose=False)
    model = build_model(cfg.model, dm.num_users, dm.num_items)
    return RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval), dm


def fit(module, dm, callbacks, tmp_path: Path, max_epochs: int, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


class Probe(L.Callback):
    """Runs after SVDLowRank in each epoch-start: records the LR, the optimizer's parameters and,
    at ``epoch``, the factors."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.lrs: list[float] = []
        self.optimizer_params: set[int] = set()
        self.factors: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.optimizer_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if trainer.current_epoch == self.epoch:
            self.factors = {
                n: p.detach().clone() for n, p in pl_module.named_parameters() if "left" in n
            }


@pytest.mark.parametrize("model_name", ["mf", "neumf"])
def test_fit_factorises_at_epoch_and_keeps_training_the_factors(model_name, tmp_path):
    module, dm = tiny_setup(model_name, scheduler="step", step_size=1, gamma=0.5)
    dense_params = sum(p.numel() for p in module.model.parameters())
    old_ids = {id(p) for p in module.parameters()}
    svd, probe = SVDLowRank(SVDConfig(at_epoch=1)), Probe(epoch=1)
    trainer = fit(module, dm, [svd, probe], tmp_path, max_epochs=2)

    params = sum(p.numel() for p in module.model.parameters())
    saved = sum(e["params_before"] - e["params_after"] for e in svd.report)
    assert svd.applied and saved > 0 and params == dense_params - saved
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    factorised = module.model.user_embedding if model_name == "mf" else module.model.mlp.tower[0]
    assert isinstance(factorised, LowRankEmbedding | LowRankLinear)
    # The optimizer holds exactly the current parameters: the factors, not the old weights.
    current = {id(p) for p in module.parameters()}
    assert probe.optimizer_params == current
    assert all(id(p) not in old_ids for n, p in module.named_parameters() if "left" in n)
    # The factors trained during epoch 1, and the LR schedule did not restart.
    assert probe.factors
    for name, before in probe.factors.items():
        assert not torch.equal(module.get_parameter(name).detach(), before), name
    assert probe.lrs == pytest.approx([0.01, 0.005])
    entry = next(e for e in svd.report if e["replaced"])
    logged = trainer.callback_metrics[f"compression/svd/{entry['name']}/relative_error"]
    assert float(logged) == pytest.approx(entry["relative_error"])


def test_checkpoint_of_a_factorised_model_resumes(tmp_path, caplog):
    module, dm = tiny_setup("mf")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True)
    svd = SVDLowRank(SVDConfig(at_epoch=1, param_ratio=None, rank=3))
    fit(module, dm, [svd, checkpoints], tmp_path, max_epochs=2)
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["state_dict"]["model.user_embedding.left.weight"].shape == (dm.num_users, 3)
    (callback_state,) = [v for k, v in state["callbacks"].items() if "SVDLowRank" in k]
    assert callback_state["applied"] is True
    assert callback_state["ranks"] == {"model.user_embedding": 3, "model.item_embedding": 3}

    # A fresh dense model + callback resumes: the pre-hook rebuilds the factors before loading.
    resumed, _ = tiny_setup("mf")
    svd2, probe = SVDLowRank(SVDConfig(at_epoch=1, param_ratio=None, rank=3)), Probe(epoch=2)
    trainer = fit(resumed, dm, [svd2, probe], tmp_path, max_epochs=3, ckpt_path=last)
    assert trainer.current_epoch == 3 and svd2.applied and svd2.ranks == callback_state["ranks"]
    assert isinstance(resumed.model.user_embedding, LowRankEmbedding)
    saved_left = state["state_dict"]["model.user_embedding.left.weight"]
    assert torch.equal(probe.factors["model.user_embedding.left.weight"], saved_left)
    left = resumed.model.user_embedding.left.weight.detach()
    assert not torch.equal(left, saved_left)  # it trained
    assert svd2.report == callback_state["report"]  # not re-applied

    # Validating the dense epoch-0 checkpoint restores the dense tables (with a warning).
    dense_ckpt = next((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    with caplog.at_level("WARNING"):
        L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            callbacks=[svd2],
        ).validate(resumed, datamodule=dm, ckpt_path=dense_ckpt, verbose=False)
    assert type(resumed.model.user_embedding) is nn.Embedding
    assert "saved before compression.svd was applied" in caplog.text

    # Resuming from that dense checkpoint factorises at epoch 1 as planned.
    again, _ = tiny_setup("mf")
    svd3 = SVDLowRank(SVDConfig(at_epoch=1, param_ratio=None, rank=3))
    fit(again, dm, [svd3], tmp_path, max_epochs=2, ckpt_path=dense_ckpt)
    assert svd3.applied and again.model.user_embedding.rank == 3


# ------------------------------------------------------------------------------------------------
# Composition with QAT: the factors are targets of their layer
# ------------------------------------------------------------------------------------------------


def test_qat_targets_the_factors_with_their_layers_group_and_names():
    from recsys_compress.compression.qat import QATConfig, plan

    model = randomise(NeuMF(20, 25, 8, 8, [16, 8]))
    apply_svd(model, svd_cfg(rank=4, targets=TargetSpec(groups=["embedding"])))
    planned = {p.name: (p.group, p.scheme.bits) for p in plan(model, QATConfig(linear_bits=4))}
    # an embedding's right factor is a Linear, but quantised with the embedding settings
    assert planned["mlp.user_embedding.left"] == ("embedding", 8)
    assert planned["mlp.user_embedding.right"] == ("embedding", 8)
    assert planned["mlp.tower.0"] == ("linear", 4)
    linear_only = QATConfig(targets=TargetSpec(groups=["linear"]))
    assert not any("embedding" in p.name for p in plan(model, linear_only))
    # the layer's own name selects both factors; a factor's name excludes it
    by_layer = QATConfig(targets=TargetSpec(include=["gmf_user_embedding"]))
    assert [p.name for p in plan(model, by_layer)] == [
        "gmf_user_embedding.left",
        "gmf_user_embedding.right",
    ]
    no_right = QATConfig(targets=TargetSpec(include=["*embedding*"], exclude=["*.right"]))
    assert all(p.name.endswith(".left") for p in plan(model, no_right))


def test_factor_widths_adapt_the_qat_scheme(caplog):
    from recsys_compress.compression.qat import QATConfig, plan

    model = randomise(MF(13, 17, 8))
    apply_svd(model, svd_cfg(rank=1, targets=TargetSpec(include=["user_embedding"])))
    apply_svd(model, svd_cfg(rank=6, targets=TargetSpec(include=["item_embedding"])))
    with caplog.at_level("WARNING"):
        planned = {
            p.name: p.scheme for p in plan(model, QATConfig(granularity="per_group", group_size=4))
        }
    # rank 1: rows of one value stay float; rank 6: group_size 4 does not divide it -> per channel
    assert set(planned) == {"item_embedding.left", "item_embedding.right"}
    assert all(s.group_size is None for s in planned.values())
    assert "user_embedding.left (kept float)" in caplog.text
    assert "item_embedding.right (per_channel)" in caplog.text
    assert "compression.qat.group_size" in caplog.text and "compression.svd.rank" in caplog.text
    exact = randomise(MF(13, 17, 8))
    apply_svd(exact, svd_cfg(rank=8))
    schemes = [p.scheme for p in plan(exact, QATConfig(granularity="per_group", group_size=4))]
    assert len(schemes) == 4 and all(s.group_size == 4 for s in schemes)


def test_factors_saved_as_raw_parameters_still_load():
    """State dicts written when the factors were Parameters ``left`` / ``right`` (and ``bias``)."""
    source = randomise(NeuMF(20, 25, 8, 8, [16, 8]))
    apply_svd(source, svd_cfg(rank=4))
    legacy = {}
    for key, value in source.state_dict().items():
        layer, _, rest = key.rpartition(".")
        layer, _, factor = layer.rpartition(".")
        module = source.get_submodule(layer) if factor in ("left", "right") else None
        if isinstance(module, LowRankEmbedding):
            legacy[f"{layer}.{factor}"] = value.T if factor == "right" else value
        elif isinstance(module, LowRankLinear):
            legacy[f"{layer}.{'bias' if rest == 'bias' else factor}"] = value
        else:
            legacy[key] = value
    assert "mlp.tower.0.bias" in legacy and "mlp.user_embedding.right" in legacy
    fresh = NeuMF(20, 25, 8, 8, [16, 8])
    match_state_dict(fresh, legacy)
    fresh.load_state_dict(legacy)
    pairs = torch.arange(20), torch.arange(20)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*pairs), source(*pairs))


def test_factors_of_a_table_get_the_embedding_weight_decay() -> None:
    from recsys_compress.config import EvalConfig, LossConfig, OptimConfig

    model = MF(30, 20, dim=8)
    optim = OptimConfig(embedding_weight_decay=1e-3, weight_decay=0.0)
    module = RecommenderModule(model, LossConfig(), optim, EvalConfig())
    apply_svd(model, SVDConfig(rank=4, param_ratio=None))
    decay = {
        id(p): group["weight_decay"]
        for group in module.configure_optimizers().param_groups
        for p in group["params"]
    }
    factors = [*model.user_embedding.parameters(), *model.item_embedding.parameters()]
    assert len(factors) == 4 and all(decay[id(p)] == 1e-3 for p in factors)
    assert len(decay) == len(list(model.parameters()))  # each parameter in exactly one group


# -- large tables: the exact SVD through the Gram matrix ------------------------------------------


@pytest.mark.parametrize("shape", [(3000, 24), (24, 3000)])
def test_gram_svd_equals_lapack_truncation(shape: tuple[int, int], monkeypatch) -> None:
    """U_r S_r Vh_r of the Gram path is LAPACK's truncation (tall and wide), passes included."""
    monkeypatch.setattr(ops, "CHUNK", 700 * 24)  # passes of 700 rows, the last one short
    monkeypatch.setattr(lowrank, "GRAM_MIN_NUMEL", 10_000)  # singular_values' Gram branch too
    sigmas = [10.0 * 0.7**i for i in range(24)]
    weight = matrix_with_spectrum(*shape, sigmas, seed=2).float()
    u, s, vh = lowrank.gram_svd(weight, 6)
    assert u.shape == (shape[0], 6) and s.shape == (6,) and vh.shape == (6, shape[1])
    assert torch.allclose(s.double(), torch.tensor(sigmas[:6], dtype=torch.float64), rtol=1e-5)
    lu, ls, lvh = torch.linalg.svd(weight.double(), full_matrices=False)
    expected = (lu[:, :6] * ls[:6]) @ lvh[:6]
    assert torch.allclose(((u * s) @ vh).double(), expected, atol=1e-5)
    assert torch.allclose(u.double().T @ u.double(), torch.eye(6, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(lowrank.singular_values(weight).double()[:6], ls[:6], rtol=1e-5)
    assert lowrank.use_gram(*shape, None) and not lowrank.use_gram(*shape, None, torch.float64)
    u, s, vh = lowrank.gram_svd(weight, 100)  # capped at the small side, as LAPACK's
    assert s.shape == (24,) and torch.allclose((u * s) @ vh, weight, atol=1e-4)


def test_gram_svd_of_a_rank_deficient_table_gives_zero_columns_not_noise() -> None:
    gen = torch.Generator().manual_seed(5)
    for weight in (
        torch.cat([torch.randn(500, 3, generator=gen), torch.zeros(500, 13)], dim=1),
        torch.randn(500, 3, generator=gen) @ torch.randn(3, 16, generator=gen),  # rotated
    ):
        u, s, vh = lowrank.gram_svd(weight, 8)
        assert torch.isfinite(u).all() and torch.isfinite(s).all()
        assert torch.allclose((u * s) @ vh, weight, atol=1e-4)
        assert torch.allclose(
            u[:, :3].double().T @ u[:, :3].double(), torch.eye(3).double(), atol=1e-5
        )
        assert torch.equal(u[:, 3:], torch.zeros(500, 5))  # roundoff directions dropped


def test_large_tables_take_the_gram_path(monkeypatch) -> None:
    """Above GRAM_MIN_NUMEL with a side <= 512 the auto choice is the exact Gram path (not
    torch.svd_lowrank); randomized=True / False keep svd_lowrank / LAPACK."""
    monkeypatch.setattr(lowrank, "GRAM_MIN_NUMEL", 10_000)
    calls: list[str] = []
    gram, lowrank_svd = lowrank.gram_svd, torch.svd_lowrank
    monkeypatch.setattr(lowrank, "gram_svd", lambda w, r: calls.append("gram") or gram(w, r))
    monkeypatch.setattr(
        torch, "svd_lowrank", lambda *a, **k: calls.append("randomized") or lowrank_svd(*a, **k)
    )
    weight = matrix_with_spectrum(2000, 32, [0.6**i for i in range(32)], seed=6).float()
    for randomized, path in ((None, "gram"), (True, "randomized"), (False, None)):
        calls.clear()
        *_, error = balanced_factors(weight, 8, randomized=randomized)
        assert calls == ([path] if path else [])
        assert error == pytest.approx(eckart_young(weight, 8), rel=1e-3 if randomized else 1e-5)
    assert lowrank.use_randomized(600, 600, None) and not lowrank.use_gram(600, 600, None)
    assert not lowrank.use_gram(2000, 4, None)  # 8,000 elements: LAPACK


def test_relative_error_sums_passes_as_the_whole_matrix(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(7)
    weight, left, right = (torch.randn(*s, generator=gen) for s in ((1000, 12), (1000, 3), (3, 12)))
    direct = torch.linalg.matrix_norm(weight - left @ right) / torch.linalg.matrix_norm(weight)
    monkeypatch.setattr(ops, "CHUNK", 300 * 12)  # passes of 300 rows
    assert lowrank.relative_error(weight, left, right) == pytest.approx(float(direct), rel=1e-6)
    # a wide matrix passes over its columns: the same value
    assert lowrank.relative_error(weight.T, right.T, left.T) == pytest.approx(
        float(direct), rel=1e-6
    )
    assert lowrank.relative_error(torch.zeros(5, 4), left[:5], right[:, :4]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_module_draws_no_placeholders_and_owns_contiguous_factors(
    dtype: torch.dtype, monkeypatch
) -> None:
    torch.manual_seed(0)
    modules = [nn.Embedding(40, 12, dtype=dtype), nn.Linear(12, 30, dtype=dtype)]
    monkeypatch.setattr(lowrank, "GRAM_MIN_NUMEL", 400)  # the float32 table: the Gram path
    for module in [*modules, nn.Embedding(3000, 12, dtype=dtype)]:
        rng = torch.get_rng_state()
        low, _ = lowrank.factorize_module(module, 4)
        assert torch.equal(torch.get_rng_state(), rng)  # no placeholder weights drawn
        for param in low.parameters():
            assert param.device.type == "cpu" and param.is_contiguous()
            assert param.dtype == dtype and param.requires_grad
        best = lowrank.truncated_svd(module.weight, 4)
        assert torch.allclose(low.dense_weight(), (best[0] * best[1]) @ best[2], atol=1e-5)
    assert torch.equal(lowrank.factorize_module(modules[1], 4)[0].bias, modules[1].bias)


@pytest.mark.parametrize("deficient", [False, True])
def test_joint_transforms_give_the_score_matrix_svd(deficient: bool, monkeypatch) -> None:
    """A = P' T_p and B = Q T_q are orthonormal and P' Qᵀ = A diag(S) Bᵀ with S the score
    matrix's singular values (P' = P diag(h), GMF's head folded in), over several passes; a
    rank-deficient table leaves only the numerical rank."""
    monkeypatch.setattr(ops, "CHUNK", 70 * 12)  # passes of 70 rows
    gen = torch.Generator().manual_seed(11)
    p, q = torch.randn(300, 12, generator=gen), torch.randn(200, 12, generator=gen)
    if deficient:  # rank 5, in a rotated basis (built in float64: float32 rounding stays far
        # below the roundoff cutoff, whatever the BLAS)
        gen64 = {"generator": gen, "dtype": torch.float64}
        p = (torch.randn(300, 5, **gen64) @ torch.randn(5, 12, **gen64)).float()
    head = torch.rand(12, generator=gen) + 0.5
    t_p, t_q, s = lowrank.joint_transforms(p, q, head)
    scores = (p * head).double() @ q.double().T
    expected = torch.linalg.svdvals(scores)
    assert len(s) == (5 if deficient else 12)
    assert torch.allclose(s, expected[: len(s)], rtol=1e-5)
    a = lowrank._transformed((p * head).double(), t_p)
    b = lowrank._transformed(q.double(), t_q)
    eye = torch.eye(len(s), dtype=torch.float64)
    assert torch.allclose(a.T @ a, eye, atol=1e-6) and torch.allclose(b.T @ b, eye, atol=1e-6)
    assert torch.allclose((a * s) @ b.T, scores, atol=1e-5 * float(scores.abs().max()))
    # in place and zero-padded: the callers' rotation of a table into itself
    table = p.clone()
    lowrank._transformed(table, t_p, table)
    assert torch.allclose(table[:, : len(s)].double(), p.double() @ t_p, atol=1e-4)
    assert torch.equal(table[:, len(s) :], torch.zeros(300, 12 - len(s)))


def test_joint_factors_of_two_tables_are_the_svd_of_their_score_matrix() -> None:
    """The public ``joint_factors``: ``P Qᵀ = A diag(S) Bᵀ`` with orthonormal A and B, S the
    score matrix's singular values (descending), in the tables' dtype."""
    gen = torch.Generator().manual_seed(5)
    p, q = torch.randn(90, 8, generator=gen), torch.randn(60, 8, generator=gen)
    a, b, s = lowrank.joint_factors(p, q)
    assert a.shape == (90, 8) and b.shape == (60, 8) and s.shape == (8,)
    assert a.dtype == b.dtype == s.dtype == torch.float32
    scores = p.double() @ q.double().T
    assert torch.allclose(s.double(), torch.linalg.svdvals(scores)[:8], rtol=1e-4)
    assert bool((s[:-1] >= s[1:]).all())
    eye = torch.eye(8)
    assert torch.allclose(a.T @ a, eye, atol=1e-4) and torch.allclose(b.T @ b, eye, atol=1e-4)
    torch.testing.assert_close((a * s) @ b.T, p @ q.T, rtol=1e-4, atol=1e-4)


def test_joint_svd_pads_a_rank_deficient_score_matrix_and_skips_a_zero_table() -> None:
    """param_ratio on a table with a zero column: the rank bound is structural (min(n, d)), the
    columns beyond the numerical rank are zero; a zero table is not rotated."""
    model = randomise(MF(40, 30, 8, use_bias=False))
    with torch.no_grad():
        model.user_embedding.weight[:, 5:] = 0.0  # numerical rank 5 of 8
        before = model.score_all(torch.arange(40))
    report = apply_svd(model, svd_cfg(method="joint_dot_product", param_ratio=0.75))
    assert report[0]["rank"] == 6
    assert torch.equal(model.user_embedding.weight[:, 5:], torch.zeros(40, 1))
    torch.testing.assert_close(model.score_all(torch.arange(40)), before, rtol=1e-4, atol=1e-4)
    zero = MF(40, 30, 8, use_bias=False)
    with torch.no_grad():
        zero.user_embedding.weight.zero_()
    item_table = zero.item_embedding.weight.detach().clone()
    assert lowrank.rotate_to_spectral_basis(zero, TargetSpec(), "compression.prune", "none") == []
    assert torch.equal(zero.item_embedding.weight, item_table)
