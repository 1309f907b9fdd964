"""L1-sparsity regularisation as a proximal step (soft-thresholding) after every optimizer step.

A subgradient penalty ``λ‖w‖₁`` added to the loss makes weights oscillate around zero but never
reach it. The proximal operator of ``η λ ‖w‖₁`` (η = the learning rate) is the soft threshold
``sign(w) max(|w| - η λ, 0)``, which produces exact zeros: that is what this callback applies.

Before: nothing until ``start_step``; λ then ramps up linearly over ``warmup_steps``.
During: soft threshold after each optimizer step; the penalty and sparsity are logged per epoch.
After: optionally a hard threshold zeroes the remaining ``|w| < final_threshold``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.hooks import RemovableHandle

from recsys_compress.compression.targets import Target, TargetSpec, select_targets
from recsys_compress.errors import ConfigError, KernelCompileError
from recsys_compress.ops import copy_rows_, flat_chunks, in_groups
from recsys_compress.optim import (
    RowHookSet,
    RowStep,
    RowWiseAdagrad,
    adam_denom,
    plain_steps,
    rowwise_denom,
    sqrt_floor,
    touched_rows,
)

KEY = "compression.l1"
KERNELS = ("auto", "compiled", "eager")
# kernel=auto compiles the dense proximal step when the dense tables it shrinks hold at least this
# many weights. Timed inside training at 1M x 100k MF-64 (70M weights, 2 CPU cores), the step
# took 66-99 ms eager and 31-39 ms compiled: ~0.4-1.0 ms saved a step per million weights, so
# ~7-16 ms at this size, against a compile of 15-18 s the first time and ~3 s from torch's
# on-disk cache: ~1,000-2,800 and ~200-450 steps pay for it.
COMPILE_MIN_WEIGHTS = 1 << 24

log = logging.getLogger(__name__)


@dataclass
class L1Config:
    """Settings of :class:`L1Proximal` (``conf/compression/l1.yaml``)."""

    targets: TargetSpec = field(default_factory=TargetSpec)
    strength: float = 1e-4
    embedding_strength: float | None = None
    linear_strength: float | None = None
    start_step: int = 0
    warmup_steps: int = 0
    final_threshold: float | None = None
    # How the proximal step of dense tables with Adam state runs: "compiled" as one fused pass
    # per table (torch.compile: a C++ compiler and Python's headers on CPU, Triton on CUDA),
    # with torch's Adam / AdamW on one device in full precision inside the optimizer's step (the
    # table's update and its shrinkage in that one pass), "eager" as chunked torch ops after
    # the step, "auto" compiled when those tables hold COMPILE_MIN_WEIGHTS weights or more in
    # all, eager (after a warning) where compiling fails.
    kernel: str = "auto"

    def __post_init__(self) -> None:
        self.targets.validate(f"{KEY}.targets")
        if self.kernel not in KERNELS:
            raise ConfigError(
                f"{KEY}.kernel={self.kernel!r} is not one of {', '.join(KERNELS)}: set it to "
                "auto (compiled for large dense tables), compiled or eager."
            )
        for name in ("strength", "embedding_strength", "linear_strength", "final_threshold"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ConfigError(f"{KEY}.{name}={value} must be a finite number >= 0.")
        if self.start_step < 0 or self.warmup_steps < 0:
            raise ConfigError(f"{KEY}.start_step and {KEY}.warmup_steps must be >= 0.")

    def group_strength(self, group: str) -> float:
        override = self.embedding_strength if group == "embedding" else self.linear_strength
        return self.strength if override is None else override


class L1Proximal(L.Callback):
    """Soft-thresholds the targets after every optimizer step (proximal gradient for L1)."""

    def __init__(self, cfg: L1Config) -> None:
        self.cfg = cfg
        self._targets: list[Target] = []
        self._row_hooks = RowHookSet()
        # "compiled" once the compiled kernel has run, "eager" once it failed under auto
        self._kernel_state: str | None = None
        # How the proximal step has run in this run (resumed runs included): see steps_run()
        self._steps_run: set[str] = set()
        # Dense tables whose proximal step runs inside torch's Adam step (register_fused_steps):
        # id(optimizer) -> the targets it holds, each with its parameter group; the step hooks;
        # the gradients taken from the optimizer for the step being taken; the weights that
        # step has updated and shrunk.
        self._fusable: dict[int, list[tuple[Target, dict[str, Any]]]] = {}
        self._step_hooks: list[RemovableHandle] = []
        self._taken: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], float]] = []
        self._fused: set[int] = set()
        self._fused_compiled = False  # the fused pass has compiled (for this callback)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._targets = select_targets(pl_module, self.cfg.targets, f"{KEY}.targets")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_optimizers_rebuilt(trainer)

    def on_optimizers_rebuilt(self, trainer: L.Trainer) -> None:
        """The row hooks and fused steps on ``trainer``'s optimizers (at the start, and after
        SVD rebuilt them)."""
        self.register_row_hooks(trainer)
        self.register_fused_steps(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._row_hooks.remove()
        self._remove_fused_steps()

    def register_row_hooks(self, trainer: L.Trainer) -> None:
        """On the sparse path (a :class:`RowUpdateOptimizer`), soft-threshold the rows the optimizer
        has just computed, with the step size it used, before they are written back: the same
        values as :meth:`proximal_step` without gathering and scattering the rows again."""
        hooks = [(t.weight, self._row_hook(trainer, t)) for t in self._targets]
        self._row_hooks.register(trainer.optimizers, hooks, reads_old=False)

    def _row_hook(self, trainer: L.Trainer, target: Target) -> Callable[[RowStep], None]:
        def hook(step: RowStep) -> None:
            # Inside optimizer.step(): global_step still counts the step being taken.
            strength = self.cfg.group_strength(target.group) * self.scale(trainer.global_step)
            if strength == 0.0:
                return
            soft_threshold_(step.new, _adam_threshold(step.denom, step.lr * strength, False))
            self._steps_run.add("rows")

        return hook

    def register_fused_steps(self, trainer: L.Trainer) -> None:
        """With dense Adam (torch's ``Adam`` or ``AdamW``) and the compiled kernel, run the
        dense targets' proximal step inside the optimizer's step: each table's (or layer's)
        Adam update and its soft threshold in one compiled pass (:func:`adam_proximal_step_`),
        which reads the weights and moments once where the update and a separate pass read
        them twice (at 1M x 100k MF-64, a timing loop: 48.7 ms against 43.1 + 30.1 ms). A step
        pre-hook takes those weights' gradients from the optimizer (which then leaves them
        alone), a post-hook runs the pass and gives them back. Only on the module's plain,
        manual steps (:func:`optim.plain_steps`): elsewhere Lightning calls
        ``on_before_optimizer_step`` (and automatic optimization the backward) inside the
        optimizer's step, after the pre-hook, and mixed precision's scaler may skip a step.
        Under ``kernel=auto`` the targets must reach :data:`COMPILE_MIN_WEIGHTS` together, as
        for the separate pass.
        """
        self._remove_fused_steps()
        if self.cfg.kernel == "eager" or self._kernel_state == "eager":
            return
        # With automatic optimization torch's step would run the closure (the backward) after
        # the pre-hook: only the module's own manual steps take the gradients first.
        if not plain_steps(trainer) or trainer.lightning_module.automatic_optimization:
            return
        for optimizer in trainer.optimizers:
            raw = getattr(optimizer, "optimizer", optimizer)
            groups = {id(p): group for group in raw.param_groups for p in group["params"]}
            targets = [
                (t, groups[id(t.weight)])
                for t in self._targets
                if id(t.weight) in groups and _fusable(raw, groups[id(t.weight)], t.weight)
            ]
            if not targets or not self._compiles(sum(t.weight.numel() for t, _ in targets)):
                continue
            self._fusable[id(raw)] = targets
            self._step_hooks.append(raw.register_step_pre_hook(self._take_gradients(trainer)))
            self._step_hooks.append(raw.register_step_post_hook(self._fused_step))

    def _remove_fused_steps(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        self._fusable.clear()
        self._taken.clear()
        self._fused.clear()

    def _take_gradients(self, trainer: L.Trainer) -> Callable[..., None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            """Before the optimizer's step: take the gradients of the tables this step updates
            and shrinks in one pass (a weight without a gradient, or with a sparse one, is left
            to the optimizer and :meth:`proximal_step`)."""
            self._taken.clear()
            # Inside optimizer.step(): global_step still counts the step being taken.
            scale = self.scale(trainer.global_step)
            if scale == 0.0 or not self._fused_kernel_ready(optimizer):
                return
            for t, group in self._fusable.get(id(optimizer), ()):
                grad = t.weight.grad
                strength = self.cfg.group_strength(t.group) * scale
                if grad is None or strength == 0.0 or not _flat_like(grad, t.weight):
                    continue
                self._taken.append((t.weight, grad, group, strength))
                t.weight.grad = None

        return hook

    @torch.no_grad()
    def _fused_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After the optimizer's step: Adam's update and the soft threshold of each table whose
        gradient :meth:`_take_gradients` took, in one compiled pass; the gradient goes back."""
        kernel = _fused_kernel()
        try:
            for weight, grad, group, strength in self._taken:
                state = optimizer.state[weight]
                if not state:  # torch's lazy initialisation (Adam._init_group), the same layout
                    state["step"] = _initial_step(group, weight)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(weight, memory_format=torch.preserve_format)
                step = float(state["step"]) + 1
                scalars = _adam_scalars(optimizer, group, weight, step, strength)
                flat = [weight.detach(), grad, state["exp_avg"], state["exp_avg_sq"]]
                kernel(*[t.view(-1) for t in flat], *scalars)
                state["step"] += 1  # after the pass: a pass that raised did not step
                self._fused.add(id(weight))
                self._steps_run.add("fused")
        finally:  # every gradient goes back, also when a pass raised
            for weight, grad, *_ in self._taken:
                weight.grad = grad
            self._taken.clear()

    def _fused_kernel_ready(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the fused pass can run: compiled once on small stand-in tensors before the
        first step takes any gradient, so that a missing compiler (or Triton) fails before a
        table is touched (:meth:`_compile_failed`: an error under ``kernel=compiled``, the
        separate passes from then on under ``auto``). One graph serves every table: they are
        passed flat, with dynamic shapes."""
        if self._kernel_state == "eager":
            return False
        if self._fused_compiled:
            return True
        # The first table's own scalars, without autograd, as the steps call it: another floor
        # (clamp_min specialises it) or grad mode recompiles, and that second graph ran ~1.7x
        # slower here (90-98 against 52-56 ms over 64M weights).
        target, group = self._fusable[id(optimizer)][0]
        state = optimizer.state.get(target.weight)
        step = float(state["step"]) + 1 if state else 1.0
        scalars = _adam_scalars(optimizer, group, target.weight, step, 0.0)
        log.info("%s: the dense tables' Adam and proximal steps run as one compiled pass", KEY)
        try:
            with torch.no_grad():
                _fused_kernel()(*[target.weight.new_zeros(3) for _ in range(4)], *scalars)
        except Exception as err:
            self._compile_failed(err)  # torch is iterating the hooks: removed after the step
            return False
        self._kernel_state = "compiled"
        self._fused_compiled = True
        return True

    def steps_run(self) -> str:
        """How the proximal step has run so far, for ``results.json``
        (``compression.l1_step``): ``fused`` (dense tables with torch's Adam or AdamW: the
        optimizer's update and the proximal step in one compiled pass), ``compiled`` (dense
        tables, one compiled pass after the optimizer's step: ``kernel``), ``eager`` (dense
        tables or layers, torch ops), ``rows`` (only the rows a sparse
        gradient holds), joined by ``+`` when a run used several (e.g. sparse embeddings and
        dense layers, or a resume with another ``kernel``); ``none`` when no step has shrunk
        anything yet (before ``start_step``, or every strength 0).
        The fused, compiled and eager steps differ in the last place, so this says which bits
        a run computed."""
        return "+".join(sorted(self._steps_run)) or "none"

    def state_dict(self) -> dict[str, Any]:
        return {"steps_run": sorted(self._steps_run)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a union: a resumed run also ran what its checkpoint had run
        self._steps_run |= set(state_dict.get("steps_run", ()))

    def compression_done(self, trainer: L.Trainer) -> bool:
        """λ has reached its full value (checkpoint ranking starts then)."""
        return trainer.global_step >= self.cfg.start_step + self.cfg.warmup_steps

    def scale(self, step: int) -> float:
        """Fraction of λ in force at ``step`` (0 before the start, linear warm-up to 1)."""
        if step < self.cfg.start_step:
            return 0.0
        if self.cfg.warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.cfg.start_step + 1) / self.cfg.warmup_steps)

    def _adam_terms(self, trainer: L.Trainer) -> dict[int, tuple[float, Any]]:
        """``id(param) -> (lr, adam)`` for every target, where ``adam`` is ``(exp_avg_sq,
        sqrt(1 - beta2^t), eps)`` for Adam-type optimizers (their step size per coordinate is
        ``lr / (sqrt(v) / sqrt(1 - beta2^t) + eps)``, the preconditioned proximal step),
        :class:`_RowSums` for :class:`RowWiseAdagrad`'s per-row accumulators (step size
        ``lr / (sqrt(s) + eps)`` per row) and None for others (step size ``lr``: SGD, and
        Adagrad's element-wise state, also RowWiseAdagrad's for dense layers)."""
        wanted = {id(t.weight) for t in self._targets if id(t.weight) not in self._fused}
        terms: dict[int, tuple[float, Any]] = {}
        for optimizer in trainer.optimizers:
            row_wise = isinstance(getattr(optimizer, "optimizer", optimizer), RowWiseAdagrad)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in wanted:
                        continue
                    state = optimizer.state.get(param, {})
                    adam = None
                    if "exp_avg_sq" in state and "betas" in group:
                        bias2 = math.sqrt(1.0 - group["betas"][1] ** float(state["step"]))
                        adam = (state["exp_avg_sq"], bias2, group["eps"])
                    elif row_wise and "sum" in state and state["sum"].shape == param.shape[:1]:
                        adam = _RowSums(state["sum"], group["eps"])
                    terms[id(param)] = (float(group["lr"]), adam)
        return terms

    @torch.no_grad()
    def proximal_step(self, trainer: L.Trainer, scale: float) -> None:
        """Soft-threshold every target by ``scale * λ * step size`` (after an optimizer step).

        A weight with a sparse gradient (``optim.sparse``) is shrunk in the rows that gradient
        holds only: the optimizer moved no other row, so their step size was 0 (with
        a :class:`RowUpdateOptimizer` its row hook has done it). A dense table with Adam state
        is shrunk in one compiled pass (``kernel``) or eagerly a chunk at a time, so that its
        temporaries stay small whatever its size.
        """
        if scale == 0.0:
            return
        terms = self._adam_terms(trainer)
        dense: list[tuple[torch.Tensor, torch.Tensor, float, float, float]] = []
        for t in self._targets:
            if self._row_hooks.covers(t.weight) or id(t.weight) in self._fused:
                continue
            rows = touched_rows(t.weight)
            lr, adam = terms.get(id(t.weight), (0.0, None))
            strength = self.cfg.group_strength(t.group) * scale
            if strength == 0.0:  # e.g. linear_strength=0: nothing to shrink
                continue
            if adam is None and lr * strength <= 0:  # e.g. a target no optimizer holds
                continue
            if rows is not None:  # each branch below shrinks these rows only
                self._steps_run.add("rows")
            weight = t.weight.detach()
            if adam is None:
                soft_threshold_(weight, lr * strength, rows)
                if rows is None:
                    self._steps_run.add("eager")
                continue
            if isinstance(adam, _RowSums):
                if rows is None:  # they come with sparse gradients only: no row moved
                    continue
                values = weight.index_select(0, rows)
                denom = rowwise_denom(adam.sums.index_select(0, rows), adam.eps, weight.dim())
                soft_threshold_(values, _adam_threshold(denom, lr * strength, True))
                copy_rows_(weight, rows, values)
                continue
            v, bias2, eps = adam
            if rows is not None:
                values = weight.index_select(0, rows)
                v_rows = v.index_select(0, rows)
                soft_threshold_(
                    values,
                    _adam_threshold(adam_denom(v_rows, bias2, eps), lr * strength, True),
                )
                copy_rows_(weight, rows, values)
                continue
            dense.append((weight, v, bias2, eps, lr * strength))
        if dense:
            self._dense_step(dense)

    def _dense_step(
        self, dense: list[tuple[torch.Tensor, torch.Tensor, float, float, float]]
    ) -> None:
        """The soft threshold of dense tables with Adam state, ``(weight, exp_avg_sq, bias2, eps,
        lr * λ)`` each: compiled, one fused pass per table (``kernel``), or eager."""
        size = sum(weight.numel() for weight, *_ in dense)
        if self._compiles(size) and self._compiled_step(dense):
            self._steps_run.add("compiled")
            return
        self._steps_run.add("eager")
        chunks = [
            (w_chunk, v_chunk, bias2, eps, lr_strength)
            for weight, v, bias2, eps, lr_strength in dense
            for w_chunk, v_chunk in zip(flat_chunks(weight), flat_chunks(v), strict=True)
        ]
        # Eager: each threshold pass once over all small tables (multi-tensor ops), the soft
        # threshold per tensor (a small table or a large table's chunk).
        for group in in_groups(chunks):
            weights, vs, bias2s, epss, lr_strengths = (list(x) for x in zip(*group, strict=True))
            floors = [sqrt_floor(v.dtype, b, e) for v, b, e in zip(vs, bias2s, epss, strict=True)]
            thresholds = torch._foreach_clamp_min(vs, floors)  # = adam_denom
            torch._foreach_sqrt_(thresholds)
            torch._foreach_div_(thresholds, bias2s)
            torch._foreach_add_(thresholds, epss)  # Adam's denominator
            torch._foreach_reciprocal_(thresholds)
            torch._foreach_mul_(thresholds, lr_strengths)  # = _adam_threshold
            # One clamp takes both bounds in one pass, where a multi-tensor maximum and minimum
            # take two (on ML-100K this step took 513 against 553 us, medians of 6 alternating
            # 10-epoch runs in one process, a timing script outside the repo).
            for w, t in zip(weights, thresholds, strict=True):
                soft_threshold_(w, t)

    def _compiled_step(
        self, dense: list[tuple[torch.Tensor, torch.Tensor, float, float, float]]
    ) -> bool:
        """:meth:`_dense_step` compiled; False (no table shrunk) if the first call, which
        compiles, fails under ``kernel=auto``. A later failure is raised as it is."""
        kernel = _compiled_kernel()
        for weight, v, bias2, eps, lr_strength in dense:
            args = (weight, v, sqrt_floor(v.dtype, bias2, eps), bias2, eps, lr_strength)
            if self._kernel_state == "compiled":
                kernel(*args)
                continue
            log.info("%s: the dense proximal step runs compiled (the first call compiles)", KEY)
            try:  # a missing compiler (or Triton) fails here, before any table is touched
                kernel(*args)
            except Exception as err:
                self._compile_failed(err)
                return False
            self._kernel_state = "compiled"
        return True

    def _compile_failed(self, err: Exception) -> None:
        """The first compiled call failed: stop under ``kernel=compiled``, else run eagerly from
        now on (with one warning)."""
        lines = str(err).strip().splitlines()
        cause = f"{type(err).__name__}: {lines[0] if lines else ''}"
        if self.cfg.kernel == "compiled":
            raise KernelCompileError(
                f"{KEY}.kernel=compiled: torch.compile could not build the fused proximal step "
                f"({cause}). It needs a C++ compiler and Python's headers on CPU, Triton on "
                f"CUDA: install them, or set {KEY}.kernel=eager (also on resume=)."
            ) from err
        self._kernel_state = "eager"
        log.warning(
            "%s.kernel=auto: torch.compile could not build the fused proximal step (%s); it "
            "runs eagerly, slower on large tables. A C++ compiler and Python's headers (Triton "
            "on CUDA) enable it; %s.kernel=eager skips the attempt.",
            KEY,
            cause,
            KEY,
        )
        log.debug("the compile error", exc_info=err)

    def _compiles(self, weights: int) -> bool:
        """Whether the dense step of ``weights`` weights runs compiled (``kernel``, and under
        auto the size and whether compiling has failed in this run)."""
        if self.cfg.kernel == "auto":
            return self._kernel_state != "eager" and weights >= COMPILE_MIN_WEIGHTS
        return self.cfg.kernel == "compiled"

    def on_optimizer_step_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, torch.Tensor]
    ) -> None:
        # global_step has already advanced past the step that just ran.
        self.proximal_step(trainer, self.scale(trainer.global_step - 1))
        self._fused.clear()
        if self._step_hooks and self._kernel_state == "eager":  # the fused pass failed to build
            self._remove_fused_steps()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # No table-sized temporaries (an |w| copy, a bool mask): at 1M x 64 these passes cost
        # 0.03 s instead of 0.4 s.
        penalty = sum(
            self.cfg.group_strength(t.group) * torch.linalg.vector_norm(t.weight.detach(), 1)
            for t in self._targets
        )
        zeros = sum(t.weight.numel() - int(torch.count_nonzero(t.weight)) for t in self._targets)
        total = sum(t.weight.numel() for t in self._targets)
        pl_module.log("compression/l1_penalty", float(penalty))
        pl_module.log("compression/l1_sparsity", zeros / total)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_final_threshold(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the fit a run evaluates (and saves) its best checkpoint, loaded into the module
        # by `validate`: the threshold applies to those weights too (zeroing twice is a no-op).
        if trainer.state.fn != TrainerFn.FITTING:
            self._apply_final_threshold(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_final_threshold(pl_module)

    @torch.no_grad()
    def _apply_final_threshold(self, pl_module: L.LightningModule) -> None:
        """Zero the targets' ``|w| < final_threshold``, when one is set. The targets are
        selected again when this process did not fit (``ddp_spawn``: the workers did)."""
        if not self.cfg.final_threshold:
            return
        targets = self._targets or select_targets(pl_module, self.cfg.targets, f"{KEY}.targets")
        for t in targets:
            t.weight.masked_fill_(t.weight.abs() < self.cfg.final_threshold, 0.0)


class _RowSums(NamedTuple):
    """:class:`RowWiseAdagrad`'s per-row accumulators of a table, with its ``eps``."""

    sums: torch.Tensor
    eps: float


def adam_soft_threshold_(
    weight: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    floor: float,
    bias2_sqrt: float,
    eps: float,
    lr_strength: float,
) -> None:
    """In place: ``soft_threshold_(weight, lr_strength / adam_denom(exp_avg_sq, bias2_sqrt,
    eps))`` with the root taken above ``floor`` (:func:`sqrt_floor`), written as one expression
    for :func:`torch.compile` to fuse into a single pass over ``weight`` and ``exp_avg_sq``
    with no temporaries (eagerly it makes table-sized ones: the eager path chunks instead).
    Compiled, the threshold is computed in float32 and rounded once; in float32 the result
    differs from the eager path's in the last place at most (eager float ``sqrt`` is not
    always correctly rounded on x86 CPUs, the compiled one is)."""
    threshold = exp_avg_sq.clamp_min(floor).sqrt().div(bias2_sqrt).add(eps)
    threshold = threshold.reciprocal().mul(lr_strength)
    weight.sub_(torch.clamp(weight, min=threshold.neg(), max=threshold))


@functools.cache
def _compiled_kernel() -> Callable[..., None]:
    """:func:`adam_soft_threshold_` compiled once per process, for tables of any size (dynamic
    shapes: one graph per number of dimensions; the float arguments are not specialised, so a
    new step size or bias correction does not recompile)."""
    return torch.compile(adam_soft_threshold_, dynamic=True, fullgraph=True)


def adam_proximal_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    l2: float,
    decay: float,
    one_minus_beta1: float,
    beta2: float,
    one_minus_beta2: float,
    step_size: float,
    floor: float,
    bias2_sqrt: float,
    eps: float,
    lr_strength: float,
) -> None:
    """In place: one step of torch's Adam (``l2``: its weight decay, added to the gradient) or
    AdamW (``decay = 1 - lr * weight_decay`` scales the weights) by the formulas of
    ``torch.optim.adam``'s single-tensor path (``step_size = lr / (1 - beta1^t)``,
    ``bias2_sqrt = sqrt(1 - beta2^t)``), then :func:`adam_soft_threshold_` with the step's new
    second moments: the threshold is ``lr_strength`` over the same denominator, so it is
    computed once. Written as one expression for :func:`torch.compile` to fuse into a single
    pass that reads the weights, gradient and moments once and writes the weights and moments
    (the optimizer's step and a separate proximal pass read them twice). The root is taken
    above ``floor`` (:func:`sqrt_floor`: the same denominator, faster on zeros). Compiled, the
    result differs from torch's Adam followed by the separate pass in the last place."""
    grad = grad + param * l2
    exp_avg_new = exp_avg + (grad - exp_avg) * one_minus_beta1  # exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq_new = exp_avg_sq * beta2 + grad * grad * one_minus_beta2
    denom = exp_avg_sq_new.clamp_min(floor).sqrt().div(bias2_sqrt).add(eps)
    updated = param * decay - exp_avg_new / denom * step_size
    threshold = denom.reciprocal().mul(lr_strength)
    exp_avg.copy_(exp_avg_new)
    exp_avg_sq.copy_(exp_avg_sq_new)
    param.copy_(updated - torch.clamp(updated, min=threshold.neg(), max=threshold))


def _adam_scalars(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    weight: torch.Tensor,
    step: float,
    strength: float,
) -> tuple[float, ...]:
    """The scalar arguments of :func:`adam_proximal_step_` for ``weight``'s Adam step number
    ``step`` in ``group``, with L1 strength ``strength`` (λ times the schedule's scale)."""
    lr, (beta1, beta2), eps = float(group["lr"]), group["betas"], group["eps"]
    decay = group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay") or isinstance(optimizer, torch.optim.AdamW)
    bias2_sqrt = (1 - beta2**step) ** 0.5  # as torch's Adam
    return (
        0.0 if decoupled else decay,  # Adam's weight decay: L2 in the gradient
        1.0 - lr * decay if decoupled else 1.0,  # AdamW's: the weights scaled
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        lr / (1 - beta1**step),
        sqrt_floor(weight.dtype, bias2_sqrt, eps),
        bias2_sqrt,
        eps,
        lr * strength,
    )


@functools.cache
def _fused_kernel() -> Callable[..., None]:
    """:func:`adam_proximal_step_` compiled once per process, over flat tensors of any size
    (dynamic shapes; the scalars are not specialised but for the floor, which ``clamp_min``
    fixes and :func:`sqrt_floor` keeps constant: a new step size does not recompile)."""
    return torch.compile(adam_proximal_step_, dynamic=True, fullgraph=True)


def _fusable(optimizer: torch.optim.Optimizer, group: dict[str, Any], weight: torch.Tensor) -> bool:
    """Whether ``weight``'s step in ``optimizer`` is torch's plain Adam / AdamW step, which
    :func:`adam_proximal_step_` computes: not amsgrad, maximize, capturable or differentiable,
    a float learning rate, float32 or float64 weights."""
    return (
        type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
        and not group.get("amsgrad")
        and not group.get("maximize")
        and not group.get("capturable")
        and not group.get("differentiable")
        and isinstance(group.get("lr"), float | int)
        and all(isinstance(b, float | int) for b in group.get("betas", ()))
        and weight.dtype in (torch.float32, torch.float64)
        and weight.is_contiguous()
    )


def _flat_like(grad: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``grad`` is a dense gradient that views flat like ``weight``."""
    return (
        not grad.is_sparse
        and grad.is_contiguous()
        and grad.dtype == weight.dtype
        and grad.device == weight.device
        and grad.shape == weight.shape
    )


def _initial_step(group: dict[str, Any], weight: torch.Tensor) -> torch.Tensor:
    """Adam's ``state["step"]`` as torch creates it for ``group`` (on the weight's device in
    float32 for fused steps, a float CPU tensor otherwise), so its state dict stays its own."""
    fused = bool(group.get("fused"))
    double = not fused and torch.get_default_dtype() == torch.float64
    device = weight.device if fused or group.get("capturable") else torch.device("cpu")
    return torch.zeros((), dtype=torch.float64 if double else torch.float32, device=device)


def _adam_threshold(denom: torch.Tensor, lr_strength: float, in_place: bool) -> torch.Tensor:
    """``lr * λ / denom`` as ``(1 / denom) * lr * λ`` (``denom``: Adam's ``sqrt(v̂) + eps``),
    into ``denom`` if ``in_place``; the dense path's multi-tensor form computes the same."""
    inverse = denom.reciprocal_() if in_place else torch.reciprocal(denom)
    return inverse.mul_(lr_strength)


@torch.no_grad()
def soft_threshold_(
    weight: torch.Tensor, threshold: torch.Tensor | float, rows: torch.Tensor | None = None
) -> None:
    """In place: ``w <- sign(w) * max(|w| - threshold, 0)`` (threshold scalar or per element),
    computed as ``w - clamp(w, -threshold, threshold)``: the same values (IEEE rounding is
    symmetric, so ``w + t`` for ``w < -t`` is ``-(|w| - t)`` exactly) in three passes, and
    exact zeros wherever ``|w| <= threshold``.

    ``rows``: only these rows of ``weight`` (a tensor ``threshold`` then holds their values).
    """
    if isinstance(threshold, float) and threshold <= 0:
        return
    values = weight if rows is None else weight.index_select(0, rows)
    if isinstance(threshold, torch.Tensor):
        values.sub_(torch.clamp(values, min=threshold.neg(), max=threshold))
    else:
        values.sub_(values.clamp(-threshold, threshold))
    if rows is not None:
        copy_rows_(weight, rows, values)
