"""L1's proximal step inside torch's Adam / AdamW step (one compiled pass per dense table)."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys_compress.compression import sparsity
from recsys_compress.compression.sparsity import (
    L1Config,
    L1Proximal,
    adam_proximal_step_,
    soft_threshold_,
)
from recsys_compress.compression.targets import TargetSpec
from recsys_compress.errors import KernelCompileError
from recsys_compress.module import RecommenderModule
from tests.compression.helpers import tiny_setup, tiny_trainer

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)",
)
TABLES = ("model.user_embedding.weight", "model.item_embedding.weight")


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_fused_formula_is_torchs_adam_step_then_the_soft_threshold(
    name: str, weight_decay: float
) -> None:
    """Run eagerly, adam_proximal_step_ is torch's single-tensor Adam / AdamW step (its weight
    decay either way) followed by the soft threshold by the step's own step size x λ: step by
    step from the same weights and moments."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(40, 8) * 0.1)
    kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    opt = kind([weight], lr=0.01, weight_decay=weight_decay, foreach=False)
    state = {"exp_avg": torch.zeros(40, 8), "exp_avg_sq": torch.zeros(40, 8)}
    for step in range(1, 6):
        mine = weight.detach().clone()
        weight.grad = torch.randn(40, 8) * torch.logspace(-4, 0, 8)
        opt.step()
        torch_state = opt.state[weight]
        bias2 = (1 - 0.999**step) ** 0.5
        denom = torch_state["exp_avg_sq"].sqrt() / bias2 + 1e-8
        soft_threshold_(weight.data, 0.01 * 0.02 / denom)
        scalars = sparsity._adam_scalars(opt, opt.param_groups[0], weight, float(step), 0.02)
        adam_proximal_step_(mine, weight.grad, state["exp_avg"], state["exp_avg_sq"], *scalars)
        # within a unit or two in the last place of weights and moments up to ~0.5 (and of
        # v where the gradient and the weight decay cancel: torch adds them in one rounding)
        assert torch.allclose(mine, weight, rtol=0, atol=1e-7), step
        assert int(((mine == 0) != (weight == 0)).sum()) <= 1, step
        assert torch.allclose(state["exp_avg"], torch_state["exp_avg"], rtol=0, atol=1e-7)
        assert torch.allclose(state["exp_avg_sq"], torch_state["exp_avg_sq"], rtol=1e-6, atol=1e-12)
        state = {key: torch_state[key].clone() for key in state}
    assert (weight == 0).any() and (weight != 0).any()


class GradientRecord(L.Callback):
    """Whether each optimizer step left the tables' gradients as the backward made them: the
    same tensors, unchanged, after the step as before it."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.kept: list[bool] = []
        self.step_hooks: list[int] = []  # the optimizer's step pre-hooks at each epoch's end

    def tables(self, pl_module: Any) -> tuple[torch.Tensor, ...]:
        return (pl_module.model.user_embedding.weight, pl_module.model.item_embedding.weight)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, opt: Any) -> None:
        self.before = [(t.grad, t.grad.clone()) for t in self.tables(pl_module)]

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: Any, batch: Any) -> None:
        after = [t.grad for t in self.tables(pl_module)]
        self.kept.append(
            all(
                a is g and torch.equal(a, copy)
                for a, (g, copy) in zip(after, self.before, strict=True)
            )
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.step_hooks.append(len(trainer.optimizers[0]._optimizer_step_pre_hooks))


def l1_run(
    root: Path, kernel: str, optim: dict[str, Any] | None = None, **trainer_kw: Any
) -> tuple[RecommenderModule, L1Proximal, GradientRecord, L.Trainer]:
    """A tiny MF trained 3 epochs with L1 on its tables (λ ramped from step 2 over 5 steps)."""
    dm, module = tiny_setup(**({"optim": optim} if optim else {}))
    cfg = L1Config(
        strength=1e-5,
        targets=TargetSpec(groups=["embedding"]),
        kernel=kernel,
        start_step=2,
        warmup_steps=5,
    )
    cb, record = L1Proximal(cfg), GradientRecord()
    trainer = tiny_trainer(root, [cb, record], **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return module, cb, record, trainer


def assert_same_training(a: RecommenderModule, b: RecommenderModule) -> None:
    """The same weights up to the last places, the same exact zeros but for a weight or two
    that sits on its threshold, and the same Adam state."""
    params_b = dict(b.named_parameters())
    for name, param in a.named_parameters():
        other = params_b[name]
        assert torch.allclose(param, other, rtol=1e-5, atol=1e-7), name
        assert int(((param == 0) != (other == 0)).sum()) <= 2, name
    opt_a, opt_b = a.trainer.optimizers[0], b.trainer.optimizers[0]
    for name in TABLES:
        state_a, state_b = (
            opt_a.state[dict(a.named_parameters())[name]],
            opt_b.state[params_b[name]],
        )
        assert float(state_a["step"]) == float(state_b["step"]), name
        for key in ("exp_avg", "exp_avg_sq"):  # to ~1e-5 of the largest (L2 cancels)
            error = (state_a[key] - state_b[key]).abs().max()
            assert error <= 1e-5 * state_b[key].abs().max(), (name, key)


@needs_compiler
@pytest.mark.parametrize(
    "optim", [None, {"name": "adamw", "embedding_weight_decay": 0.01}], ids=["adam", "adamw"]
)
def test_fused_steps_train_as_adam_and_the_eager_proximal_step(
    tmp_path: Path, optim: dict[str, Any] | None
) -> None:
    """kernel=compiled with torch's Adam (its default L2 on the tables) or AdamW: each table's
    update and shrinkage in one compiled pass, the warm-up's λ at each step's index, the same
    training as the optimizer's step followed by the eager proximal step; one graph for every
    step and table (a recompile makes torch pass the scalars as inputs, ~1.7x slower)."""
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fused, cb, record, _ = l1_run(tmp_path, "compiled", optim)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 1
    assert cb.steps_run() == "fused" and cb._kernel_state == "compiled"
    eager, cb_eager, _, _ = l1_run(tmp_path, "eager", optim)
    assert cb_eager.steps_run() == "eager"
    assert_same_training(fused, eager)
    table = fused.model.item_embedding.weight
    assert 0.05 < float((table == 0).float().mean()) < 0.95
    # the gradients went back after every step, as they were
    assert len(record.kept) > 10 and all(record.kept)
    # torch's own state layout: the Adam step counts as torch keeps them for fused Adam
    opt = fused.trainer.optimizers[0]
    bias_state = opt.state[fused.model.item_bias.weight]
    for name in TABLES:
        step = opt.state[dict(fused.named_parameters())[name]]["step"]
        assert step.dtype == bias_state["step"].dtype and step.device == bias_state["step"].device
        assert float(step) == float(bias_state["step"]) == len(record.kept)


@needs_compiler
def test_a_resumed_optimizer_continues_the_fused_state(tmp_path: Path) -> None:
    """The optimizer state the fused steps wrote is torch's: a torch Adam loads it and steps."""
    fused, _, _, _ = l1_run(tmp_path, "compiled")
    opt = fused.trainer.optimizers[0]
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint holds it
    fresh = torch.optim.Adam(opt.param_groups, fused=True)
    fresh.load_state_dict(saved)
    weight = fused.model.user_embedding.weight
    moments = opt.state[weight]["exp_avg"].clone()
    for p in fused.parameters():
        p.grad = torch.ones_like(p)
    fresh.step()
    state = fresh.state[weight]
    assert float(state["step"]) == float(opt.state[weight]["step"]) + 1
    assert state["step"].dtype == torch.float32 and state["step"].device == weight.device
    assert torch.allclose(state["exp_avg"], moments * 0.9 + 0.1)


@pytest.mark.parametrize(
    ("kernel", "optim", "trainer_kw", "ran"),
    [
        ("eager", None, {}, "eager"),  # the eager kernel: torch's step, then the eager pass
        ("auto", None, {}, "eager"),  # auto, tables far under COMPILE_MIN_WEIGHTS
        ("auto", {"sparse": True, "embedding_weight_decay": 0.0}, {}, "rows"),  # row hooks
        ("compiled", {"name": "sgd"}, {}, "eager"),  # no Adam state
    ],
)
def test_who_is_not_fused(
    tmp_path: Path, kernel: str, optim: dict | None, trainer_kw: dict, ran: str
) -> None:
    _, cb, _, _ = l1_run(tmp_path, kernel, optim, **trainer_kw)
    assert cb.steps_run() == ran and cb._fusable == {} and cb._step_hooks == []


@needs_compiler
def test_not_fused_where_lightning_calls_the_step_hooks_inside_the_step(
    tmp_path: Path,
) -> None:
    """Under 64-true precision (not the module's plain steps) and with amsgrad the separate
    compiled pass runs after torch's step."""
    _, cb, _, _ = l1_run(tmp_path, "compiled", precision="64-true")
    assert cb.steps_run() == "compiled" and torch.get_default_dtype() == torch.float32
    dm, module = tiny_setup()
    module.configure_optimizers = lambda: torch.optim.Adam(module.parameters(), amsgrad=True)
    cb = L1Proximal(L1Config(strength=1e-5, kernel="compiled"))
    tiny_trainer(tmp_path, [cb], max_epochs=1).fit(module, datamodule=dm)
    assert cb.steps_run() == "compiled" and cb._fusable == {}


def _failing(calls: list[int]) -> Callable[[], Callable[..., None]]:
    def kernel(weight: torch.Tensor, *args: Any) -> None:
        calls.append(weight.numel())
        raise OSError("no C++ compiler\nthe compiler's output")

    return lambda: kernel


def test_a_failed_compile_leaves_the_step_to_torch_under_auto_and_stops_under_compiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fused pass compiles on stand-in tensors before a gradient is taken: without a
    compiler, auto trains exactly as kernel=eager (bit for bit), compiled stops at once."""
    calls: list[int] = []
    monkeypatch.setattr(sparsity, "_fused_kernel", _failing(calls))
    monkeypatch.setattr(sparsity, "COMPILE_MIN_WEIGHTS", 1)
    with caplog.at_level("WARNING", logger=sparsity.__name__):
        auto, cb, record, _ = l1_run(tmp_path, "auto")
    assert calls == [3] and cb.steps_run() == "eager" and cb._kernel_state == "eager"
    assert "compression.l1.kernel=auto: torch.compile could not build" in caplog.text
    assert all(record.kept)
    assert record.step_hooks == [0, 0, 0]  # the hooks went after the first step: torch's path
    eager, _, _, _ = l1_run(tmp_path, "eager")
    for (name, a), b in zip(auto.named_parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b), name
    calls.clear()
    with pytest.raises(KernelCompileError, match=r"kernel=compiled: .* no C\+\+ compiler\)"):
        l1_run(tmp_path, "compiled")
    assert calls == [3]


def test_a_pass_that_raises_gives_every_gradient_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in the fused pass (after it compiled) is raised as it is, and no table is left
    without its gradient."""

    def kernel(weight: torch.Tensor, *args: Any) -> None:
        if weight.numel() > 3:  # the compile probe passes, the first table's pass fails
            raise RuntimeError("out of memory")

    monkeypatch.setattr(sparsity, "_fused_kernel", lambda: kernel)
    monkeypatch.setattr(sparsity, "COMPILE_MIN_WEIGHTS", 1)
    dm, module = tiny_setup()
    cb = L1Proximal(L1Config(strength=1e-5, targets=TargetSpec(groups=["embedding"])))
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit(module, datamodule=dm)
    assert module.model.user_embedding.weight.grad is not None
    assert module.model.item_embedding.weight.grad is not None


@needs_compiler
def test_a_fused_run_resumed_from_its_checkpoint_trains_as_one_run(tmp_path: Path) -> None:
    """A checkpoint of a fused run (its optimizer state written by the fused pass) resumes
    into the same training as the run that went on: fused again, or with the eager kernel."""

    def run(kernel: str, epochs: int, ckpt: Path | None = None) -> RecommenderModule:
        dm, module = tiny_setup()
        cfg = L1Config(strength=1e-5, targets=TargetSpec(groups=["embedding"]), kernel=kernel)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
        trainer = tiny_trainer(
            tmp_path, [L1Proximal(cfg), checkpoint], max_epochs=epochs, enable_checkpointing=True
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return module

    whole = run("compiled", 3)
    run("compiled", 2)  # its last.ckpt: after epoch 2
    for kernel in ("compiled", "eager"):
        resumed = run(kernel, 3, tmp_path / "ckpt" / "last.ckpt")
        for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
            if kernel == "compiled":
                assert torch.equal(a, b), name
            else:  # the last epoch's steps in the eager kernel's roundings
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
