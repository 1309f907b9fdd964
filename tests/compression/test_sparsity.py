"""L1 proximal regularisation: exact zeros, lower ‖w‖₁, warm-up, the final threshold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys_compress.compression.sparsity import L1Config, L1Proximal, soft_threshold_
from recsys_compress.compression.targets import TargetSpec
from recsys_compress.errors import ConfigError
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
    tiny_trainer(tmp_path, [l1], max_epochs=3).fit(module, datamodule=dm)
    table = module.model.item_embedding.weight
    assert float((table == 0).float().mean()) > 0.3
    assert float((plain.model.item_embedding.weight == 0).float().mean()) == 0.0
    assert l1_norm(module) < 0.5 * l1_norm(plain)


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
