"""L1-sparsity regularisation as a proximal step (soft-thresholding) after every optimizer step.

A subgradient penalty ``λ‖w‖₁`` added to the loss makes weights oscillate around zero but never
reach it. The proximal operator of ``η λ ‖w‖₁`` (η = the learning rate) is the soft threshold
``sign(w) max(|w| - η λ, 0)``, which produces exact zeros: that is what this callback applies.

Before: nothing until ``start_step``; λ then ramps up linearly over ``warmup_steps``.
During: soft threshold after each optimizer step; the penalty and sparsity are logged per epoch.
After: optionally a hard threshold zeroes the remaining ``|w| < final_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch

from recsys_compress.compression.targets import Target, TargetSpec, select_targets
from recsys_compress.errors import ConfigError
from recsys_compress.optim import touched_rows

KEY = "compression.l1"


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

    def __post_init__(self) -> None:
        self.targets.validate(f"{KEY}.targets")
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._targets = select_targets(pl_module, self.cfg.targets, f"{KEY}.targets")

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

    def _step_sizes(
        self, trainer: L.Trainer, rows: dict[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor | float]:
        """Each target's step size: ``lr`` for SGD; for Adam-type optimizers the per-coordinate
        ``lr / (sqrt(v̂) + eps)`` it actually applied (the preconditioned proximal step).

        ``rows`` (``id(weight)`` -> row indices): for those weights, the sizes of these rows
        only (``[len(rows), cols]``), so the cost follows the batch on the sparse path. Each
        size is one fresh tensor built in place (no full-table temporaries beyond it).
        """
        rows = rows or {}
        sizes: dict[int, torch.Tensor | float] = {}
        wanted = {id(t.weight) for t in self._targets}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in wanted:
                        continue
                    state = optimizer.state.get(param, {})
                    size: torch.Tensor | float = float(group["lr"])
                    if "exp_avg_sq" in state and "betas" in group:
                        step = float(state["step"])
                        v = state["exp_avg_sq"]
                        if id(param) in rows:
                            v = v.index_select(0, rows[id(param)])
                        denom = v.div(1.0 - group["betas"][1] ** step).sqrt_().add_(group["eps"])
                        size = torch.div(denom.new_tensor(group["lr"]), denom, out=denom)
                    sizes[id(param)] = size
        return sizes

    @torch.no_grad()
    def proximal_step(self, trainer: L.Trainer, scale: float) -> None:
        """Soft-threshold every target by ``scale * λ * step size`` (after an optimizer step).

        A weight with a sparse gradient (``optim.sparse``) is shrunk in the rows that gradient
        holds only: the optimizer moved no other row, so their step size was 0.
        """
        if scale == 0.0:
            return
        rows = {id(t.weight): r for t in self._targets if (r := touched_rows(t.weight)) is not None}
        sizes = self._step_sizes(trainer, rows)
        for t in self._targets:
            strength = self.cfg.group_strength(t.group) * scale
            size = sizes.get(id(t.weight), 0.0)
            threshold = size.mul_(strength) if isinstance(size, torch.Tensor) else size * strength
            soft_threshold_(t.weight, threshold, rows.get(id(t.weight)))

    def on_optimizer_step_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, torch.Tensor]
    ) -> None:
        # global_step has already advanced past the step that just ran.
        self.proximal_step(trainer, self.scale(trainer.global_step - 1))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        penalty = sum(
            self.cfg.group_strength(t.group) * t.weight.detach().abs().sum() for t in self._targets
        )
        zeros = sum(int((t.weight == 0).sum()) for t in self._targets)
        total = sum(t.weight.numel() for t in self._targets)
        pl_module.log("compression/l1_penalty", float(penalty))
        pl_module.log("compression/l1_sparsity", zeros / total)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.cfg.final_threshold:
            with torch.no_grad():
                for t in self._targets:
                    t.weight.masked_fill_(t.weight.abs() < self.cfg.final_threshold, 0.0)


@torch.no_grad()
def soft_threshold_(
    weight: torch.Tensor, threshold: torch.Tensor | float, rows: torch.Tensor | None = None
) -> None:
    """In place: ``w <- sign(w) * max(|w| - threshold, 0)`` (threshold scalar or per element).

    ``rows``: only these rows of ``weight`` (a tensor ``threshold`` then holds their values).
    One temporary of the rows' size, four passes (the former ``sign(w) * shrunk`` took six).
    """
    if isinstance(threshold, float) and threshold <= 0:
        return
    values = weight if rows is None else weight.index_select(0, rows)
    shrunk = values.abs().sub_(threshold).clamp_min_(0.0)
    if rows is None:
        torch.copysign(shrunk, weight, out=weight)
    else:
        weight.index_copy_(0, rows, torch.copysign(shrunk, values, out=shrunk))
