"""L1 proximal regularisation: exact zeros, lower ‖w‖₁, warm-up, the final threshold."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recsys_compress import ops
from recsys_compress.compression.sparsity import L1Config, L1Proximal, soft_threshold_
from recsys_compress.compression.targets import TargetSpec, select_targets
from recsys_compress.errors import ConfigError
from recsys_compress.models.mf import MF
from tests.compression.helpers import tiny_setup, tiny_trainer


def test_soft_threshold_values() -> None:
    w = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.3])
    soft_threshold_(w, 0.1)
    assert w.tolist() == pytest.approx([-0.4, 0.0, 0.0, 0.0, 0.2])
    v = torch.tensor([1.0, -1.0])
    soft_threshold_(v, torch.tensor([0.5, 2.0]))
    assert v.tolist() == [0.5, 0.0]


def l1_norm(module: torch.nn.Module) -> float:
    return float(
        module.model.user_embedding.weight.abs().sum()
        + module.model.item_embedding.weight.abs().sum()
    )


def test_proximal_l1_gives_exact_zeros_and_lowers_the_norm(tmp_path: Path) -> None:
    dm, plain = tiny_setup()
    tiny_trainer(tmp_path, [], max_epochs=3).fit(plain, datamodule=dm)
    dm, module = tiny_setup()
    l1 = L1Proximal(L1Config(strength=0.05, targets=TargetSpec(groups=["embedding"])))
    trainer = tiny_trainer(tmp_path, [l1], max_epochs=3)
    trainer.fit(module, datamodule=dm)
    table = module.model.item_embedding.weight
    assert float((table == 0).float().mean()) > 0.3
    assert float((plain.model.item_embedding.weight == 0).float().mean()) == 0.0
    assert l1_norm(module) < 0.5 * l1_norm(plain)
    # the epoch-end log: λ·Σ|w| and the share of exact zeros over the targeted tables
    targets = [module.model.user_embedding.weight, table]
    logged = trainer.callback_metrics
    zeros = sum(int((w == 0).sum()) for w in targets) / sum(w.numel() for w in targets)
    assert float(logged["compression/l1_sparsity"]) == pytest.approx(zeros, abs=1e-6)
    penalty = 0.05 * sum(float(w.detach().abs().double().sum()) for w in targets)
    assert float(logged["compression/l1_penalty"]) == pytest.approx(penalty, rel=1e-5)


def test_warmup_scale_and_final_threshold(tmp_path: Path) -> None:
    l1 = L1Proximal(L1Config(strength=1.0, start_step=10, warmup_steps=4))
    assert [l1.scale(s) for s in (0, 9, 10, 11, 13, 20)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    dm, module = tiny_setup()
    cb = L1Proximal(L1Config(strength=0.0, final_threshold=0.005))
    tiny_trainer(tmp_path, [cb], max_epochs=1).fit(module, datamodule=dm)
    weight = module.model.user_embedding.weight
    assert (weight.abs() >= 0.005).logical_or(weight == 0).all()
    assert (weight == 0).any()


@pytest.mark.parametrize("field", ["strength", "final_threshold", "linear_strength"])
def test_negative_values_are_rejected(field: str) -> None:
    with pytest.raises(ConfigError, match=f"compression.l1.{field}"):
        L1Config(**{field: -1.0})


@pytest.mark.parametrize("chunk", [1 << 20, 48])
def test_dense_proximal_step_equals_the_per_table_soft_threshold(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The multi-tensor, chunked dense path against soft_threshold_ table by table."""
    monkeypatch.setattr(ops, "CHUNK", chunk)  # 48: several chunks per table, several groups
    torch.manual_seed(0)
    model = MF(30, 20, 8, init_std=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(torch.tensor([1, 2, 2, 7]), torch.tensor([4, 5, 6, 4])).square().mean().backward()
    opt.step()
    cb = L1Proximal(L1Config(strength=0.3, targets=TargetSpec(groups=["embedding"])))
    cb._targets = select_targets(model, cb.cfg.targets, "t")
    expected = {}
    for t in cb._targets:
        state = opt.state[t.weight]
        denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999 ** float(state["step"])) + 1e-8
        weight = t.weight.detach().clone()
        soft_threshold_(weight, 0.05 * 0.3 / denom)
        expected[t.name] = weight
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    for t in cb._targets:
        assert torch.allclose(t.weight, expected[t.name], rtol=0, atol=1e-7), t.name
        assert torch.equal(t.weight == 0, expected[t.name] == 0), t.name
        assert (t.weight == 0).any()


def test_final_threshold_reaches_the_evaluated_and_saved_model(tmp_path: Path) -> None:
    """A run evaluates and saves its best checkpoint's weights, loaded after the fit: the final
    threshold applies to them, not only to the last weights the fit ended with."""
    from recsys_compress.train import train
    from tests.e2e.test_train import FAST, compose_config

    overrides = [*FAST, "model.dim=16", "compression=l1", "compression.l1.strength=0"]
    threshold = 0.05
    record = train(
        compose_config([*overrides, f"compression.l1.final_threshold={threshold}"]), tmp_path
    )
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for name in ("user_embedding.weight", "item_embedding.weight"):
        weight = saved[name]
        assert (weight.abs() >= threshold).logical_or(weight == 0).all(), name
        assert (weight == 0).float().mean() > 0.1, name
    assert record["compression"]["sparsity"] > 0.1


def test_final_threshold_in_a_process_that_did_not_fit() -> None:
    """Under ``ddp_spawn`` the workers fit and the parent evaluates the best checkpoint: its
    callback never ran ``setup("fit")``, and selects the targets itself."""
    _, module = tiny_setup()
    cb = L1Proximal(L1Config(strength=0.0, final_threshold=0.005))
    cb.on_test_start(SimpleNamespace(), module)  # type: ignore[arg-type]
    for name in ("user_embedding", "item_embedding"):
        weight = getattr(module.model, name).weight
        assert (weight.abs() >= 0.005).logical_or(weight == 0).all(), name
        assert (weight == 0).any(), name
