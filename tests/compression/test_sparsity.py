"""L1 proximal regularisation: exact zeros, lower ‖w‖₁, warm-up, the final threshold."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recsys_compress import ops
from recsys_compress.compression import sparsity
from recsys_compress.compression.sparsity import L1Config, L1Proximal, soft_threshold_
from recsys_compress.compression.targets import TargetSpec, select_targets
from recsys_compress.errors import ConfigError, KernelCompileError
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


def adam_stepped(kernel: str = "auto") -> tuple[L1Proximal, torch.optim.Adam, dict]:
    """An MF after one Adam step, an L1 callback on its tables, and what the callback's
    proximal step must make of each table (:func:`shrunk`)."""
    torch.manual_seed(0)
    model = MF(30, 20, 8, init_std=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(torch.tensor([1, 2, 2, 7]), torch.tensor([4, 5, 6, 4])).square().mean().backward()
    opt.step()
    cfg = L1Config(strength=0.003, targets=TargetSpec(groups=["embedding"]), kernel=kernel)
    cb = L1Proximal(cfg)
    cb._targets = select_targets(model, cb.cfg.targets, "t")
    return cb, opt, shrunk(cb, opt, 1.0)


def shrunk(cb: L1Proximal, opt: torch.optim.Adam, scale: float) -> dict[str, torch.Tensor]:
    """Each target soft-thresholded by Adam's step size x λ x ``scale``, table by table."""
    expected = {}
    for t in cb._targets:
        state = opt.state[t.weight]
        denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999 ** float(state["step"])) + 1e-8
        weight = t.weight.detach().clone()
        soft_threshold_(weight, 0.05 * cb.cfg.strength * scale / denom)
        expected[t.name] = weight
    return expected


def assert_thresholded(cb: L1Proximal, expected: dict) -> None:
    for t in cb._targets:
        assert torch.allclose(t.weight, expected[t.name], rtol=0, atol=1e-7), t.name
        assert torch.equal(t.weight == 0, expected[t.name] == 0), t.name
        assert (t.weight == 0).any() and (t.weight != 0).any()


@pytest.mark.parametrize("chunk", [1 << 20, 48])
def test_dense_proximal_step_equals_the_per_table_soft_threshold(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The multi-tensor, chunked dense path against soft_threshold_ table by table."""
    monkeypatch.setattr(ops, "CHUNK", chunk)  # 48: several chunks per table, several groups
    cb, opt, expected = adam_stepped()
    assert cb.steps_run() == "none"
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert cb._kernel_state is None  # 400 weights: eager under auto
    assert cb.steps_run() == "eager"
    assert_thresholded(cb, expected)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)",
)
def test_compiled_proximal_step_equals_the_per_table_soft_threshold() -> None:
    """kernel=compiled: one fused pass per table (torch.compile), the same shrinkage and zeros
    as soft_threshold_ by Adam's step size, to the last place (the compiled root is correctly
    rounded, eager float sqrt on x86 not always)."""
    cb, opt, expected = adam_stepped("compiled")
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert cb._kernel_state == "compiled" and cb.steps_run() == "compiled"
    assert_thresholded(cb, expected)
    # another step, with another bias correction and λ scale, runs the same compiled graph
    for t in cb._targets:
        # gradients from 1e-5 to 1: thresholds from ~10 to ~1e-4 against weights of ~0.04
        spread = torch.logspace(-5, 0, t.weight.numel()).view_as(t.weight)
        t.weight.grad = torch.randn_like(t.weight) * spread
    opt.step()
    expected = shrunk(cb, opt, 0.5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 0.5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert_thresholded(cb, expected)


def test_auto_kernel_compiles_when_the_dense_tables_reach_the_threshold_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(sparsity, "_compiled_kernel", lambda: _stand_in(calls))
    cb, opt, expected = adam_stepped("auto")
    monkeypatch.setattr(sparsity, "COMPILE_MIN_WEIGHTS", 401)  # the two tables: 240 + 160
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert calls == [] and cb._kernel_state is None and cb.steps_run() == "eager"
    assert_thresholded(cb, expected)
    cb, opt, expected = adam_stepped("auto")
    monkeypatch.setattr(sparsity, "COMPILE_MIN_WEIGHTS", 400)
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert calls == [240, 160] and cb._kernel_state == "compiled"
    assert cb.steps_run() == "compiled"
    assert_thresholded(cb, expected)


def _stand_in(calls: list[int], fail_at: int | None = None) -> Callable[..., None]:
    """A stand-in for the compiled kernel: records each table's size, and raises on call
    number ``fail_at`` (1 = the first: the compiler is missing)."""

    def kernel(weight: torch.Tensor, *args: float) -> None:
        calls.append(weight.numel())
        if len(calls) == fail_at:
            raise OSError("no C++ compiler\nthe compiler's output")
        sparsity.adam_soft_threshold_(weight, *args)

    return kernel


def test_a_failed_compile_falls_back_under_auto_and_stops_under_compiled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(sparsity, "_compiled_kernel", lambda: _stand_in(calls, fail_at=1))
    monkeypatch.setattr(sparsity, "COMPILE_MIN_WEIGHTS", 1)
    cb, opt, expected = adam_stepped("auto")
    with caplog.at_level("WARNING", logger=sparsity.__name__):
        cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert cb._kernel_state == "eager" and calls == [240] and cb.steps_run() == "eager"
    assert "compression.l1.kernel=auto: torch.compile could not build" in caplog.text
    assert "(OSError: no C++ compiler); it runs eagerly" in caplog.text
    assert_thresholded(cb, expected)  # every table shrunk once, eagerly
    caplog.clear()
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1e-9)
    assert calls == [240] and caplog.text == ""  # no second attempt, no second warning
    calls.clear()
    cb, opt, expected = adam_stepped("compiled")
    before = {t.name: t.weight.detach().clone() for t in cb._targets}
    with pytest.raises(KernelCompileError, match=r"kernel=compiled: .* no C\+\+ compiler\)"):
        cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert all(torch.equal(t.weight, before[t.name]) for t in cb._targets)


def test_a_failure_after_the_kernel_compiled_is_raised_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the kernel has run, an error is not a missing compiler: no fallback, no rewording."""
    calls: list[int] = []
    monkeypatch.setattr(sparsity, "_compiled_kernel", lambda: _stand_in(calls, fail_at=2))
    monkeypatch.setattr(sparsity, "COMPILE_MIN_WEIGHTS", 1)
    cb, opt, _ = adam_stepped("auto")
    with pytest.raises(OSError, match="no C"):
        cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert calls == [240, 160] and cb._kernel_state == "compiled"


def test_a_group_without_strength_is_skipped_and_the_state_keeps_how_the_step_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cb, opt, _ = adam_stepped()
    cb.cfg.embedding_strength = 0.0  # both targets are embeddings
    before = {t.name: t.weight.detach().clone() for t in cb._targets}
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert all(torch.equal(t.weight, before[t.name]) for t in cb._targets)
    assert cb.steps_run() == "none" and cb.state_dict() == {"steps_run": []}
    cb.cfg.embedding_strength = None
    cb.proximal_step(SimpleNamespace(optimizers=[]), 1.0)  # no optimizer holds them: lr 0
    assert all(torch.equal(t.weight, before[t.name]) for t in cb._targets)
    assert cb.steps_run() == "none"
    # a resumed run (or the parent of ddp_spawn workers) adds what its checkpoint ran
    monkeypatch.setattr(sparsity, "_compiled_kernel", lambda: _stand_in([]))
    cb, opt, expected = adam_stepped("compiled")
    cb.proximal_step(SimpleNamespace(optimizers=[opt]), 1.0)
    assert_thresholded(cb, expected)
    cb.load_state_dict({"steps_run": ["eager", "rows"]})
    assert cb.steps_run() == "compiled+eager+rows"
    assert cb.state_dict() == {"steps_run": ["compiled", "eager", "rows"]}


def test_unknown_kernel_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"compression\.l1\.kernel='fast' is not one of auto"):
        L1Config(kernel="fast")


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
    assert record["compression"]["l1_step"] == "none"  # strength 0: no step shrank anything


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
