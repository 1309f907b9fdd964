"""Magnitude pruning as a Lightning callback: unstructured or structured, one-shot or gradual.

Before: nothing (the dense model trains until ``start_step``).
During: at each update step the masks are recomputed for the scheduled sparsity; after *every*
optimizer step the masks are re-applied, so pruned weights stay exactly zero under Adam's momentum.
Where a step's gradient holds only a batch's rows of a large table (sparse gradients, or a dense
one from ``gather_rows``), that per-step work is done in those rows only (the same weights).
After: the weights hold exact zeros that the export stores sparsely.

Masks and the schedule position are the callback's checkpoint state, so ``ckpt_path`` resumes
with the same masks (Lightning's ModelPruning stores none, and its sparsity decays after a resume).
Dot-product models (MF, GMF) are first rewritten in the balanced basis of their score matrix
(``basis``, :func:`~recsys_compress.compression.lowrank.rotate_to_spectral_basis`): the scores are
unchanged, but magnitudes concentrate in the leading dimensions, so the weights a user keeps meet
the weights an item keeps. On MF / ML-100K at 80% this keeps 98% of NDCG@10 instead of 87%.

Ranking across layers is scale-aware: with ``scope=group`` or ``global`` each layer's scores are
divided by their RMS before one threshold is chosen, and no layer is pruned to 100% unless
``max_layer_sparsity=1.0``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from recsys_compress import ops
from recsys_compress.callbacks import estimated_optimizer_steps, optimizer_steps_per_epoch
from recsys_compress.compression.targets import Target, TargetSpec, select_targets
from recsys_compress.errors import ConfigError
from recsys_compress.ops import copy_rows_, flat_chunks, in_groups
from recsys_compress.optim import RowHookSet, RowStep, coalesced_grad, touched_rows

log = logging.getLogger(__name__)

STRUCTURES = ("unstructured", "rows", "columns", "neurons")
SCOPES = ("layer", "row", "group", "global")
BASES = ("auto", "spectral", "none")
KEY = "compression.prune"


@dataclass
class PruneConfig:
    """Settings of :class:`MagnitudePruning` (``conf/compression/prune.yaml``)."""

    targets: TargetSpec = field(default_factory=TargetSpec)
    structure: str = "unstructured"
    scope: str = "row"
    sparsity: float | None = 0.8
    embedding_sparsity: float | None = None
    linear_sparsity: float | None = None
    threshold: float | None = None
    score: str = "taylor"
    schedule: str = "gradual"
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    end_fraction: float = 0.75
    frequency: int | None = None
    max_layer_sparsity: float = 0.99
    rewind_step: int | None = None
    basis: str = "auto"

    def __post_init__(self) -> None:
        self.targets.validate(f"{KEY}.targets")
        checks = {
            "structure": (self.structure, STRUCTURES),
            "scope": (self.scope, SCOPES),
            "score": (self.score, ("magnitude", "taylor")),
            "schedule": (self.schedule, ("one_shot", "gradual")),
            "basis": (self.basis, BASES),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"{KEY}.{name}={value!r}: use one of {', '.join(allowed)}.")
        if (self.sparsity is None) == (self.threshold is None):
            raise ConfigError(
                f"{KEY}: set exactly one of {KEY}.sparsity (fraction of weights to zero) and "
                f"{KEY}.threshold (zero |w| below it)."
            )
        for name in ("sparsity", "embedding_sparsity", "linear_sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{KEY}.{name}={value} must lie in [0, 1).")
        if not 0.0 < self.max_layer_sparsity <= 1.0:
            raise ConfigError(f"{KEY}.max_layer_sparsity={self.max_layer_sparsity}: use (0, 1].")
        if self.threshold is not None and not 0 <= self.threshold < float("inf"):
            raise ConfigError(f"{KEY}.threshold={self.threshold} must be a finite number >= 0.")
        if self.frequency is not None and self.frequency < 1:
            raise ConfigError(f"{KEY}.frequency={self.frequency} must be >= 1 optimizer steps.")
        if self.start_step < 0:
            raise ConfigError(f"{KEY}.start_step={self.start_step} must be >= 0.")
        if self.rewind_step is not None and self.rewind_step < 0:
            raise ConfigError(
                f"{KEY}.rewind_step={self.rewind_step} must be >= 0 (or null: no rewinding)."
            )
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ConfigError(f"{KEY}.end_step={self.end_step} must be > {KEY}.start_step.")
        if not 0.0 < self.end_fraction <= 1.0:
            raise ConfigError(f"{KEY}.end_fraction={self.end_fraction} must be in (0, 1].")

    def final_sparsity(self, group: str) -> float:
        """Final sparsity of ``group`` (``embedding`` / ``linear``; else the global one)."""
        override = {"embedding": self.embedding_sparsity, "linear": self.linear_sparsity}.get(group)
        return override if override is not None else float(self.sparsity or 0.0)


def cubic_sparsity(
    step: int, final: float, initial: float, start: int, end: int, frequency: int
) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3, held between updates."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    t = start + ((step - start) // frequency) * frequency
    progress = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def _structured_scores(weight: torch.Tensor, structure: str) -> torch.Tensor:
    """One score per prunable unit: rows (embedding rows / Linear output neurons) or columns."""
    if structure == "columns":
        return weight.norm(dim=0)
    return weight.norm(dim=1)


def _as_factor(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as 0/1 bytes, to multiply a float tensor by: the same product as the bool
    mask at a quarter of its cost on CPU (float x bool converts every element; float x uint8
    takes the vectorised path), and no float copy of the mask."""
    return mask.view(torch.uint8)


def _expand(unit_mask: torch.Tensor, weight: torch.Tensor, structure: str) -> torch.Tensor:
    if structure == "unstructured":
        return unit_mask
    if structure == "columns":
        return unit_mask[None, :].expand_as(weight).clone()
    return unit_mask[:, None].expand_as(weight).clone()


def _sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in ``[0, 2^32)`` ordered as the float32 ``values`` are (-0.0 counts as 0.0)."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def _from_key(key: int) -> float:
    bits = key - (1 << 31) if key >= 1 << 31 else 0xFFFFFFFF - key
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def kth_smallest(chunks: Callable[[], Iterator[torch.Tensor]], k: int) -> tuple[float, int]:
    """The exact ``k``-th smallest (1-based) of all values ``chunks()`` yields, and how many
    values are strictly smaller, by a two-pass
    radix select on the values' 32-bit keys (a 65536-bin histogram of the high 16 bits, then of
    the low 16 bits inside the chosen bin). Extra memory: one chunk and the histograms, where a
    sort, ``topk`` or ``kthvalue`` copies all values (``kthvalue`` with int64 indices: 3x)."""
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for chunk in chunks():
        high += torch.bincount(_sortable_keys(chunk) >> 16, minlength=1 << 16).cpu()
    below = torch.cumsum(high, 0)
    prefix = int(torch.searchsorted(below, torch.tensor([k]))[0])
    rank = k - (int(below[prefix - 1]) if prefix else 0)
    # The chosen bin as a closed float interval (the keys keep float order): the second pass
    # keys only the values inside it (bins holding NaN keys are keyed whole)
    lowest, highest = _from_key(prefix << 16), _from_key((prefix << 16) | 0xFFFF)
    in_range = not (math.isnan(lowest) or math.isnan(highest))
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for chunk in chunks():
        if in_range:
            values = chunk.float()
            chunk = values[(values >= lowest) & (values <= highest)]
        keys = _sortable_keys(chunk)
        keys = keys[(keys >> 16) == prefix]
        low += torch.bincount(keys & 0xFFFF, minlength=1 << 16).cpu()
    low_below = torch.cumsum(low, 0)
    suffix = int(torch.searchsorted(low_below, torch.tensor([rank]))[0])
    smaller = k - rank + (int(low_below[suffix - 1]) if suffix else 0)
    return _from_key((prefix << 16) | suffix), smaller


@dataclass
class BlockScores:
    """A layer's unstructured scores made a block of rows at a time, never held whole: ranking
    a pool of 10M x 64 tables by materialised scores held a float copy of every table (2.6 GB
    beside the model's 2.8 GB). ``blocks()`` yields the flat scores in flat order."""

    shape: torch.Size
    device: torch.device
    blocks: Callable[[], Iterator[torch.Tensor]]

    def numel(self) -> int:
        return self.shape.numel()

    def full(self) -> torch.Tensor:
        """All the scores at once: ``scope=row`` when it cannot rank in blocks (a fixed
        ``threshold``, or another target that is not 2-D)."""
        return torch.cat(list(self.blocks())).view(self.shape)


Scores = torch.Tensor | BlockScores


def _score_chunks(scores: Scores) -> Iterator[torch.Tensor]:
    """Flat chunks of ``scores``, in flat order."""
    if isinstance(scores, BlockScores):
        return scores.blocks()
    return iter(scores.detach().flatten().split(ops.CHUNK))


def _at_least(scores: Scores, threshold: float) -> torch.Tensor:
    """``scores >= threshold`` a chunk at a time."""
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    offset, flat = 0, mask.view(-1)
    for chunk in _score_chunks(scores):
        torch.ge(chunk, threshold, out=flat[offset : offset + len(chunk)])
        offset += len(chunk)
    return mask


def _keep_top_pooled(
    scores: list[Scores], scales: list[torch.Tensor | None], sparsity: float
) -> list[torch.Tensor]:
    """Masks keeping the largest ``round((1 - sparsity) * n)`` of the pooled values of
    ``scores`` (each non-negative score divided by its tensor's scale, if any; negative scores,
    the pruned-for-good marker, kept as they are). Exactly that many are kept; among equal values
    at the threshold the lower position (tensor order, then flat index) is pruned first.

    Memory: the bool masks and one chunk; the pooled values are never concatenated, and
    :class:`BlockScores` are made again for each pass rather than held."""

    def values(s: Scores, scale: torch.Tensor | None) -> Iterator[torch.Tensor]:
        for chunk in _score_chunks(s):
            yield chunk if scale is None else torch.where(chunk >= 0, chunk / scale, chunk)

    total = sum(s.numel() for s in scores)
    n_prune = min(round(sparsity * total), total)
    masks = [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if n_prune == 0:
        return masks
    threshold, n_below = kth_smallest(
        lambda: (c for s, sc in zip(scores, scales, strict=True) for c in values(s, sc)), n_prune
    )
    ties_to_prune = n_prune - n_below
    for s, scale, mask in zip(scores, scales, masks, strict=True):
        offset, flat = 0, mask.view(-1)
        for c in values(s, scale):
            m = flat[offset : offset + len(c)]
            offset += len(c)
            m.copy_(c > threshold)
            if ties_to_prune > 0:
                ties = (c == threshold).nonzero().squeeze(1)
                m[ties[ties_to_prune:]] = True
                ties_to_prune -= min(ties_to_prune, len(ties))
            else:
                m |= c == threshold
    return masks


def _keep_top(scores: Scores, sparsity: float) -> torch.Tensor:
    """Mask keeping the largest ``round((1 - sparsity) * n)`` scores exactly (ties: the lower
    index is pruned first), without copying the scores (:func:`kth_smallest`)."""
    return _keep_top_pooled([scores], [None], sparsity)[0]


def _kth_smallest_per_row(
    block: torch.Tensor, k: int, use_numpy: bool | None = None
) -> torch.Tensor:
    """The ``k``-th smallest value of every row of ``block`` (2-D), as a column.

    ``use_numpy`` (default: on the CPU) takes numpy's introselect (``np.partition``): the k-th
    values of ML-100K's 1,682 x 64 item table in ~0.2 ms, where torch 2.13's ``topk`` along rows
    takes ~0.7 ms (per-row overhead, both threads) and ``kthvalue`` ~0.8 ms (a timing loop
    outside the repo). Otherwise ``topk``, as on other devices. Both give the same value, so the
    masks do not depend on the device."""
    if block.device.type == "cpu" if use_numpy is None else use_numpy:
        values = block.detach().cpu()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()  # bfloat16 (no numpy type) and float16: exact in float32
        part = np.partition(values.numpy(), k - 1, axis=1)
        return torch.from_numpy(part[:, k - 1 : k].copy()).to(block.device, block.dtype)
    return torch.topk(block.detach(), k, dim=1, largest=False, sorted=True).values[:, k - 1 :]


def _keep_top_per_row(
    scores: torch.Tensor, sparsity: float, use_numpy: bool | None = None
) -> torch.Tensor:
    """Mask keeping the largest ``round((1 - sparsity) * cols)`` scores of every row exactly,
    so every user / item (or output neuron) keeps the same number of weights; among equal
    values at a row's threshold the lower column is pruned first, as in :func:`_keep_top`.
    A NaN score is pruned, as in the other scopes (a NaN weight stops training anyway).
    Rows are ranked a block at a time, so the temporaries stay at a few MB for any table.
    ``use_numpy``: see :func:`_kth_smallest_per_row`."""
    if scores.ndim < 2:
        return _keep_top(scores, sparsity)
    cols = scores.shape[1]
    n_prune = min(round(sparsity * cols), cols)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune == 0:
        return mask
    rows = max(1, ops.CHUNK // cols)
    for block, out in zip(scores.detach().split(rows), mask.split(rows), strict=True):
        threshold = _kth_smallest_per_row(block, n_prune, use_numpy)
        torch.gt(block, threshold, out=out)
        # No row keeps more than cols - n_prune, so on the CPU the count is short iff a row is
        # (one with ties at its threshold, whose last ties are kept back); elsewhere the ties
        # are resolved without the count, which would wait for the device.
        if out.device.type != "cpu" or int(torch.count_nonzero(out)) < out.shape[0] * (
            cols - n_prune
        ):
            keep_back = (cols - n_prune) - out.sum(dim=1, keepdim=True)
            ties = block == threshold
            from_end = ties.flip(1).cumsum(dim=1).flip(1)  # ties at or after each column
            out |= ties & (from_end <= keep_back)
    return mask


def _alive_rms(scores: Scores) -> torch.Tensor:
    """RMS of the non-negative scores (1 when there are none), summed a chunk at a time."""
    total, count, dtype = 0.0, 0, None
    for chunk in _score_chunks(scores):
        alive = chunk.clamp_min(0.0)
        total += float(alive.double().square().sum())
        count += int((chunk >= 0).sum())
        dtype = chunk.dtype
    return torch.tensor((total / count) ** 0.5 if count else 1.0, dtype=dtype, device=scores.device)


def _next_linear(model: nn.Module, name: str) -> nn.Linear | None:
    """The Linear that consumes ``name``'s output within the same Sequential, through only
    element-wise modules (activations, dropout); None when there is none."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    modules = list(parent.named_children())
    index = next(i for i, (n, _) in enumerate(modules) if n == child)
    for _, module in modules[index + 1 :]:
        if isinstance(module, nn.Linear):
            return module
        if not isinstance(module, nn.ReLU | nn.Dropout | nn.Identity | nn.Tanh | nn.Sigmoid):
            return None
    return None


def _add_abs_products(
    totals: list[torch.Tensor], weights: list[torch.Tensor], grads: list[torch.Tensor]
) -> None:
    """``totals[i] += |weights[i] * grads[i]|``, each pass one multi-tensor op over all."""
    products = torch._foreach_mul(weights, grads)
    torch._foreach_abs_(products)
    torch._foreach_add_(totals, products)


class _StepLists:
    """The argument lists of the per-step multi-tensor ops on dense gradients, built once for
    the given state tensors (Taylor sums or masks) and parameters. Assembling them every step
    (dict lookups, device checks, chunking, grouping) cost as much Python as the arithmetic on
    two small tables (~50 us a call each on an ML-100K MF); they are rebuilt when a state tensor
    is replaced (a mask update, a restored checkpoint) or a parameter's storage changes."""

    def __init__(
        self,
        state: list[torch.Tensor | None],
        params: list[nn.Parameter],
        items: list[tuple[Any, ...]],
    ) -> None:
        self._state = state
        self._params = params
        self._storage = [p.data_ptr() for p in params]
        # in_groups' groups, each transposed into one list per position of the items
        self.groups = [
            [list(part) for part in zip(*group, strict=True)] for group in in_groups(items)
        ]

    def built_for(self, state: list[torch.Tensor | None], params: list[nn.Parameter]) -> bool:
        return (
            all(a is b for a, b in zip(state, self._state, strict=True))
            and all(a is b for a, b in zip(params, self._params, strict=True))
            and [p.data_ptr() for p in params] == self._storage
        )


class MagnitudePruning(L.Callback):
    """Prunes the targets of ``cfg`` by score (|w| or |w·∂L/∂w|) on a one-shot or cubic schedule."""

    def __init__(self, cfg: PruneConfig) -> None:
        self.cfg = cfg
        self.masks: dict[str, torch.Tensor] = {}
        self.bias_masks: dict[str, torch.Tensor] = {}
        self.current_sparsity = 0.0
        self.last_update_step = -1
        self.end_step: int | None = cfg.end_step
        self.frequency = cfg.frequency or 1
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self._targets: list[Target] = []
        self._root: nn.Module | None = None
        self._taylor: dict[str, torch.Tensor] = {}
        self._taylor_spare: dict[str, torch.Tensor] = {}  # zeroed sums for reuse
        # Weights whose sparse-gradient updates run this callback's row hook (optim.sparse with
        # a RowUpdateOptimizer): Taylor sums and masks are done there, on the rows it holds.
        self._row_hooks = RowHookSet()
        self._float_masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._taylor_lists: _StepLists | None = None
        self._mask_lists: _StepLists | None = None
        # The gradient-rows path (see on_before_optimizer_step): this step's rows per target,
        # the targets whose optimizer state is zero wherever their mask is, the optimizers.
        self._grad_rows: dict[str, torch.Tensor] = {}
        self._clean_state: set[str] = set()
        self._optimizers: list[Any] = []

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # evaluating: the masks are in the weights already
            return
        self._root = pl_module
        self._targets = select_targets(pl_module, self.cfg.targets, f"{KEY}.targets")
        if self.cfg.structure in ("rows", "columns") and any(
            t.group != "embedding" for t in self._targets
        ):
            raise ConfigError(
                f"{KEY}.structure={self.cfg.structure} prunes embedding rows/columns: set "
                f"{KEY}.targets.groups=[embedding]."
            )
        if self.cfg.structure == "neurons" and any(t.group != "linear" for t in self._targets):
            raise ConfigError(
                f"{KEY}.structure=neurons prunes MLP neurons: set {KEY}.targets.groups=[linear]."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in setup(): asking for the number of steps there builds the train loader before a
        # resumed run restores its position in the epoch (and this callback's end_step).
        if self.end_step is None:
            total = estimated_optimizer_steps(trainer)
            self.end_step = max(self.cfg.start_step + 1, int(total * self.cfg.end_fraction))
        self.frequency = self.cfg.frequency or max(1, (self.end_step - self.cfg.start_step) // 20)
        self.on_optimizers_rebuilt(trainer)
        self._clean_state.clear()
        for t in self._targets:
            ops.track_gathered_rows(t.weight)

    def on_optimizers_rebuilt(self, trainer: L.Trainer) -> None:
        """The row hooks on ``trainer``'s optimizers (at the start, and after SVD rebuilt
        them: the state tensors moved with their parameters, so pruned entries stay zero)."""
        self.register_row_hooks(trainer.optimizers)
        self._optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._row_hooks.remove()
        for t in self._targets:
            ops.track_gathered_rows(t.weight, on=False)
        self._optimizers = []

    def register_row_hooks(self, optimizers: list[Any]) -> None:
        """On the sparse path (a :class:`RowUpdateOptimizer`), do the per-step work on the rows the
        optimizer has gathered: add ``|w·g|`` of the old rows to the Taylor sums and multiply the
        new rows by their masks before they are written back. The same values as the
        ``on_before_optimizer_step`` / ``on_optimizer_step_end`` path, which gathers and
        scatters each row twice more."""
        hooks = [(t.weight, self._row_hook(t)) for t in self._targets]
        self._row_hooks.register(optimizers, hooks, reads_old=self._sums_taylor)

    def _sums_taylor(self) -> bool:
        """Whether this step adds to the Taylor sums (the old weights are read then only)."""
        return self.cfg.score == "taylor" and not self._masks_final()

    def _row_hook(self, target: Target) -> Callable[[RowStep], None]:
        def hook(step: RowStep) -> None:
            if self._sums_taylor():
                assert step.old is not None  # asked for by reads_old
                self._add_taylor_rows(target, step.rows, step.old, step.grad)
            mask = self._mask(target.name, step.new.device)
            if mask is not None:
                step.new.mul_(_as_factor(mask).index_select(0, step.rows))

        return hook

    def _mask(self, name: str, device: torch.device) -> torch.Tensor | None:
        """``masks[name]`` on ``device`` (masks restored from a checkpoint arrive on the CPU)."""
        mask = self.masks.get(name)
        if mask is not None and mask.device != device:
            mask = self.masks[name] = mask.to(device)
        return mask

    def compression_done(self, trainer: L.Trainer) -> bool:
        """Whether the final sparsity has been applied (checkpoint ranking starts then)."""
        return self._masks_final()

    def _masks_final(self) -> bool:
        """No mask update is left: the final sparsity is in place (Taylor sums unneeded)."""
        if self.cfg.schedule == "one_shot" or self.cfg.threshold is not None:
            return self.last_update_step >= 0
        return self.end_step is not None and self.last_update_step >= self.end_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The basis changes at the start of the epoch of the first mask, before QAT (next in the
        # pipeline) swaps in fake-quant modules whose rounding would blur the score check.
        first_mask_now = self.cfg.start_step < trainer.global_step + optimizer_steps_per_epoch(
            trainer
        )
        if self.cfg.basis != "none" and self.last_update_step < 0 and first_mask_now:
            self._rotate(trainer)

    def on_optimizer_step_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, torch.Tensor]
    ) -> None:
        step = trainer.global_step
        if self.cfg.rewind_step is not None and step == self.cfg.rewind_step:
            self.rewind_state = {
                t.name: t.weight.detach().to("cpu", copy=True) for t in self._targets
            }
        if self._due(step):
            self.update_masks(step)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if not self._targets or self._done_in_row_hooks():
            return
        self._grad_rows = self._gradient_rows()
        # After the last mask update the sums would never be read (a quarter of the steps with
        # the default end_fraction=0.75).
        if self._sums_taylor():
            self.accumulate_taylor(self._grad_rows)
        self._mask_gradient_rows(self._grad_rows)

    def on_optimizer_step_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, torch.Tensor]
    ) -> None:
        if not self._done_in_row_hooks():
            self.apply_masks(only_touched=True)
        self._grad_rows = {}

    def _done_in_row_hooks(self) -> bool:
        """Whether this step's per-step work is all in the row hooks: every target's update
        ran one (``optim.sparse``) and no bias is masked. Saves ~0.1 ms of Python a step on
        the sparse path at 1M x 100k (a ~7 ms step)."""
        return (
            bool(self._row_hooks)
            and not self.bias_masks
            and all(self._row_hooks.covers(t.weight) for t in self._targets)
        )

    def _gradient_rows(self) -> dict[str, torch.Tensor]:
        """The targets whose dense gradient this step is non-zero only in the rows of a batch
        much smaller than the table (:func:`ops.gradient_rows`: a plain table read with
        ``gather_rows``, e.g. MF at 1M users on the dense Adam path), with those rows.

        For them, per-step work follows the batch: Taylor sums are added in those rows, and the
        pruned weights' gradients are zeroed there before the step instead of masking the whole
        table after it. With a zero gradient and zero optimizer state (moments, momentum:
        zeroed once after each mask change, :meth:`_zero_pruned_state`) Adam, AdamW, SGD and
        Adagrad leave a zero weight at zero, and every kept weight sees the same gradient and
        state as on the full-table path, so the trained weights are the same bit for bit."""
        found: dict[str, torch.Tensor] = {}
        for t in self._targets:
            # None also for a batch about as large as the table (ML-100K): full-table passes
            # are cheaper there, and ops stops recording its rows.
            ids = ops.gradient_rows(t.weight)
            if ids is None:  # masked after the step: the pruned weights' state moves again
                self._clean_state.discard(t.name)
                continue
            ids = torch.unique(ids)  # sorted, as a sparse gradient's rows
            mask = self._mask(t.name, t.weight.device)
            if mask is not None and t.name not in self._clean_state:
                self._zero_pruned_state(t, mask)
            found[t.name] = ids
        return found

    @torch.no_grad()
    def _zero_pruned_state(self, target: Target, mask: torch.Tensor) -> None:
        """Zero the pruned weights' entries of every optimizer state tensor of ``target``."""
        for optimizer in self._optimizers:
            for value in optimizer.state.get(target.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    for chunk, factor in zip(flat_chunks(value), flat_chunks(mask), strict=True):
                        chunk.mul_(_as_factor(factor))
        self._clean_state.add(target.name)

    @torch.no_grad()
    def _mask_gradient_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """Zero the pruned weights' gradient in ``rows`` (per target), before the step."""
        if not rows:
            return
        for t in self._targets:
            ids = rows.get(t.name)
            mask = None if ids is None else self._mask(t.name, t.weight.device)
            if ids is None or mask is None:
                continue
            grad = t.weight.grad
            assert grad is not None
            kept = _as_factor(mask).index_select(0, ids)
            copy_rows_(grad, ids, grad.index_select(0, ids).mul_(kept))
            ops.rows_rewritten(t.weight)  # within the rows: a kept gradient stays clean

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = self.sparsity_by_layer()
        pl_module.log("compression/prune_target_sparsity", self.current_sparsity)
        for name, value in stats.items():
            pl_module.log(f"compression/sparsity/{name}", value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "bias_masks": {k: v.cpu() for k, v in self.bias_masks.items()},
            "current_sparsity": self.current_sparsity,
            "last_update_step": self.last_update_step,
            "end_step": self.end_step,
            "rewind_state": self.rewind_state,
            # |w·g| summed since the last mask update: a run resumed between two updates
            # then ranks the weights on the same sums as an uninterrupted one.
            "taylor": {k: v.cpu() for k, v in self._taylor.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.bias_masks = dict(state_dict["bias_masks"])
        self.current_sparsity = state_dict["current_sparsity"]
        self.last_update_step = state_dict["last_update_step"]
        self.end_step = state_dict["end_step"]
        self.rewind_state = state_dict["rewind_state"]
        self._taylor = dict(state_dict.get("taylor", {}))
        self._taylor_spare = {}

    # -- mechanics --------------------------------------------------------------------------
    def _rotate(self, trainer: L.Trainer) -> None:
        """Before the first mask: the spectral basis of a dot product (see the module doc).
        ``basis=auto`` keeps the model's basis when it is not a plain dot product of float
        tables (NeuMF, MLP; or already fake-quantised by a QAT that started earlier)."""
        from recsys_compress.compression.lowrank import rotate_to_spectral_basis

        assert self._root is not None
        if self.rewind_state is not None:
            log.warning(
                "%s.basis: rewind_step %s precedes start_step, so the rewind weights are in the "
                "original basis; pruning there (set %s.basis=none to silence this).",
                KEY,
                self.cfg.rewind_step,
                KEY,
            )
            return
        try:
            changed = rotate_to_spectral_basis(
                self._root, self.cfg.targets, KEY, f"{KEY}.basis=none"
            )
        except ConfigError as err:
            if self.cfg.basis == "spectral":
                raise
            log.info("%s.basis=auto: no dot product to rotate (%s)", KEY, err)
            return
        # Moments of the old coordinates do not apply to the new ones; |w·g| sums neither.
        for optimizer in trainer.optimizers:
            for param in changed:
                optimizer.state.pop(param, None)
        self._taylor.clear()
        log.info("%s: pruning in the spectral basis of the dot product", KEY)

    def _due(self, step: int) -> bool:
        if step < self.cfg.start_step or step == self.last_update_step:
            return False
        if self.cfg.schedule == "one_shot" or self.cfg.threshold is not None:
            return self.last_update_step < 0
        assert self.end_step is not None
        if step > self.end_step and self.last_update_step >= self.end_step:
            return False
        return (step - self.cfg.start_step) % self.frequency == 0 or step >= self.end_step

    def target_sparsity(self, step: int, group: str) -> float:
        final = self.cfg.final_sparsity(group)
        if self.cfg.schedule == "one_shot":
            return final
        assert self.end_step is not None
        return cubic_sparsity(
            step,
            final,
            self.cfg.initial_sparsity,
            self.cfg.start_step,
            self.end_step,
            self.frequency,
        )

    def _scores(self, target: Target, block: slice = slice(None)) -> torch.Tensor:
        """The scores of ``target``'s units (of its rows ``block`` only, if given)."""
        weight = target.weight.detach()[block]
        taylor = self._taylor_sums(target) if self.cfg.score == "taylor" else None
        if taylor is not None:
            taylor = taylor[block]
        if self.cfg.structure != "unstructured":
            if taylor is None:
                return _structured_scores(weight, self.cfg.structure)
            return taylor.sum(dim=0 if self.cfg.structure == "columns" else 1)
        # |w| breaks ties among weights the batches never touched (zero gradient). Built in
        # place: the same sums as taylor + 1e-12 * |w| with one temporary.
        scores = weight.abs()
        if taylor is not None:
            scores.mul_(1e-12).add_(taylor)
        mask = self._mask(target.name, scores.device)
        if mask is not None:
            # Once pruned, stays pruned: a weight masked earlier scores -1 (all scores are
            # >= 0), as s * m + (m - 1): float arithmetic instead of a bool fill.
            keep = _as_factor(mask[block]).to(scores.dtype)
            scores.mul_(keep)
            scores.add_(keep.sub_(1.0))
        return scores

    def _prune_rows_in_blocks(self, target: Target, sparsity: float) -> torch.Tensor:
        """``scope=row``, unstructured: the new mask and the masked weights, a block of rows
        at a time. Scores, ranking and masking of a block stay in cache, and no table-sized
        temporary is made (at 1M x 64, each fresh table-sized tensor costs ~50 ms of page
        faults alone)."""
        weight = target.weight.detach()
        mask = torch.empty_like(weight, dtype=torch.bool)
        for block in ops.row_slices(*weight.shape):
            keep = _keep_top_per_row(self._scores(target, block), sparsity)
            mask[block] = keep
            weight[block].mul_(_as_factor(keep))
        return mask

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        """Recompute every mask for the sparsity scheduled at ``step`` and apply it."""
        if not self._targets:
            raise RuntimeError("MagnitudePruning.update_masks called before setup()")
        by_rows = (
            self.cfg.scope == "row"
            and self.cfg.structure == "unstructured"
            and self.cfg.threshold is None
            and all(t.weight.ndim == 2 for t in self._targets)
        )
        if by_rows:  # the default: every user / item / neuron keeps the same share
            for t in self._targets:
                sparsity = self.target_sparsity(step, t.group)
                self.masks[t.name] = self._prune_rows_in_blocks(t, sparsity)
        else:
            scores = {t.name: self._score_source(t) for t in self._targets}
            unit_masks = self._unit_masks(scores, step)
            del scores
            for t in self._targets:
                self.masks[t.name] = _expand(unit_masks[t.name], t.weight, self.cfg.structure)
            if self.cfg.structure == "neurons":
                for t in self._targets:
                    self._mask_neuron_neighbours(t, unit_masks[t.name])
        self._clean_state.clear()  # newly pruned weights still hold optimizer state
        self.last_update_step = step
        self._reset_taylor()
        self.current_sparsity = self.overall_sparsity()
        if self.rewind_state is not None and step >= (self.end_step or step):
            self._rewind()
            self.apply_masks()
        elif not by_rows:
            self.apply_masks()

    def _score_source(self, target: Target) -> Scores:
        """``target``'s scores for :meth:`_unit_masks`: per unit for the structured kinds (one
        per row or column, small), else :class:`BlockScores` over blocks of
        :data:`~recsys_compress.ops.CHUNK` elements of whole rows."""
        weight = target.weight
        if self.cfg.structure != "unstructured" or weight.ndim != 2:
            return self._scores(target)

        def blocks() -> Iterator[torch.Tensor]:
            for rows in ops.row_slices(*weight.shape):
                yield self._scores(target, rows).view(-1)

        return BlockScores(weight.shape, weight.device, blocks)

    def _unit_masks(self, scores: dict[str, Scores], step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        groups = {t.name: t.group for t in self._targets}
        if cfg.threshold is not None:
            return {name: _at_least(s, cfg.threshold) for name, s in scores.items()}
        if cfg.scope == "layer":
            return {
                name: _keep_top(s, self.target_sparsity(step, groups[name]))
                for name, s in scores.items()
            }
        if cfg.scope == "row":
            return {
                name: _keep_top_per_row(
                    s.full() if isinstance(s, BlockScores) else s,
                    self.target_sparsity(step, groups[name]),
                )
                for name, s in scores.items()
            }
        pools: dict[str, list[str]] = {}
        for name in scores:
            pools.setdefault("all" if cfg.scope == "global" else groups[name], []).append(name)
        masks: dict[str, torch.Tensor] = {}
        for pool, names in pools.items():
            sparsity = self.target_sparsity(step, pool)
            scales = [_alive_rms(scores[name]).clamp_min(1e-30) for name in names]
            keep = _keep_top_pooled([scores[n] for n in names], scales, sparsity)
            masks.update(zip(names, keep, strict=True))
        return self._cap_layer_sparsity(masks, scores)

    def _cap_layer_sparsity(
        self, masks: dict[str, torch.Tensor], scores: dict[str, Scores]
    ) -> dict[str, torch.Tensor]:
        """No layer beyond ``max_layer_sparsity``: keep its best units if a pooled threshold
        would prune more."""
        cap = self.cfg.max_layer_sparsity
        for name, mask in masks.items():
            if 1.0 - int(torch.count_nonzero(mask)) / mask.numel() > cap:
                masks[name] = _keep_top(scores[name], cap) | mask
        return masks

    def _mask_neuron_neighbours(self, target: Target, unit_mask: torch.Tensor) -> None:
        """A pruned neuron's bias entry, and the next layer's input column that reads it."""
        module = target.module
        if getattr(module, "bias", None) is not None:
            self.bias_masks[target.name] = unit_mask.clone()
        assert self._root is not None
        nxt = _next_linear(self._root, target.name)
        for t in self._targets:
            if nxt is not None and t.module is nxt:
                self.masks[t.name] = self.masks[t.name] & unit_mask[None, :]

    @torch.no_grad()
    def apply_masks(self, only_touched: bool = False) -> None:
        """Zero every pruned weight (and pruned neurons' biases), multiplying by the mask's
        0/1 bytes (:func:`_as_factor`).

        ``only_touched`` (after an optimizer step): a weight whose gradient is sparse
        (``optim.sparse``) is masked only in the rows that gradient holds, the only rows the
        optimizer changed, so the cost follows the batch; with a :class:`RowUpdateOptimizer` the
        row hook has done that already (:meth:`register_row_hooks`).
        """
        skip = self._grad_rows if only_touched else {}
        if only_touched and not skip and self._apply_dense_masks():
            return
        dense: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in self._targets:
            mask = self._mask(t.name, t.weight.device)
            # On skipped targets the pruned weights' gradients were zeroed before the step.
            if mask is not None and t.name not in skip:
                rows = touched_rows(t.weight) if only_touched else None
                if rows is not None:
                    if not self._row_hooks.covers(t.weight):
                        kept = _as_factor(mask).index_select(0, rows)
                        weight = t.weight.detach()
                        copy_rows_(weight, rows, weight.index_select(0, rows).mul_(kept))
                else:
                    factors = self._factor_chunks(t.name)
                    dense += zip(flat_chunks(t.weight.detach()), factors, strict=True)
            bias_mask = self.bias_masks.get(t.name)
            if bias_mask is not None:
                t.module.bias.mul_(_as_factor(bias_mask.to(t.module.bias.device)))
        for group in in_groups(dense):
            weights, factors = zip(*group, strict=True)
            torch._foreach_mul_(list(weights), list(factors))

    def _apply_dense_masks(self) -> bool:
        """The per-step masking when no target has a sparse gradient or a bias mask, from lists
        prepared once per set of masks (:class:`_StepLists`); False when it does not apply."""
        params = [t.weight for t in self._targets]
        if self.bias_masks or any(p.grad is not None and p.grad.is_sparse for p in params):
            return False
        masks = [self._mask(t.name, p.device) for t, p in zip(self._targets, params, strict=True)]
        lists = self._mask_lists
        if lists is None or not lists.built_for(masks, params):
            pairs = [
                pair
                for t, mask in zip(self._targets, masks, strict=True)
                if mask is not None
                for pair in zip(
                    flat_chunks(t.weight.detach()), self._factor_chunks(t.name), strict=True
                )
            ]
            lists = self._mask_lists = _StepLists(masks, params, pairs)
        for weights, factors in lists.groups:
            torch._foreach_mul_(weights, factors)
        return True

    def _factor_chunks(self, name: str) -> tuple[torch.Tensor, ...]:
        """``masks[name]`` to multiply the weight by, in :func:`_flat_chunks`: a float copy for
        a table of at most :data:`CHUNK` weights (cached until the mask changes; float x float
        is the fastest product), the mask's bytes for a larger one (no table-sized copy)."""
        mask = self.masks[name]
        if mask.numel() > ops.CHUNK:
            return tuple(_as_factor(m) for m in flat_chunks(mask))
        cached = self._float_masks.get(name)
        if cached is None or cached[0] is not mask:
            cached = self._float_masks[name] = (mask, mask.float())
        return (cached[1],)

    @torch.no_grad()
    def accumulate_taylor(self, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Add ``|w * ∂L/∂w|`` of the current gradients to the Taylor sums (before the optimizer
        step). A sparse gradient (``optim.sparse``) adds into its rows only (duplicates summed);
        so does a dense one whose other rows are zero (``rows``, :meth:`_gradient_rows`)."""
        rows = rows or {}
        params = [t.weight for t in self._targets]
        grads = [p.grad for p in params]
        if not rows and all(g is not None and not g.is_sparse for g in grads):
            # Every gradient dense: the sums and weights in lists prepared once (until the sums
            # are reset by a mask update), the gradients' chunks in the same order.
            sums = [self._taylor.get(t.name) for t in self._targets]
            lists = self._taylor_lists
            if lists is None or not lists.built_for(sums, params):
                sums = [self._taylor_sums(t, create=True) for t in self._targets]
                items = [
                    (total_chunk, weight_chunk, (i, c))
                    for i, (total, p) in enumerate(zip(sums, params, strict=True))
                    for c, (total_chunk, weight_chunk) in enumerate(
                        zip(flat_chunks(total), flat_chunks(p.detach()), strict=True)
                    )
                ]
                lists = self._taylor_lists = _StepLists(sums, params, items)
            chunks = [flat_chunks(g.detach()) for g in grads]
            for totals, weights, where in lists.groups:
                _add_abs_products(totals, weights, [chunks[i][c] for i, c in where])
            return
        dense: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for t in self._targets:
            if t.weight.grad is None or self._row_hooks.covers(t.weight):
                continue
            weight = t.weight.detach()
            grad = t.weight.grad
            ids = rows.get(t.name)
            if ids is not None:  # the gradient's other rows are zero
                self._add_taylor_rows(
                    t, ids, weight.index_select(0, ids), grad.index_select(0, ids)
                )
                continue
            if grad.is_sparse:
                grad = coalesced_grad(t.weight)
                held = grad.indices()[0]
                self._add_taylor_rows(t, held, weight.index_select(0, held), grad.values())
                continue
            total = self._taylor_sums(t, create=True)
            assert total is not None
            parts = (flat_chunks(total), flat_chunks(weight), flat_chunks(grad.detach()))
            dense += zip(*parts, strict=True)
        # All small tables in one multi-tensor op each (the per-op overhead dominates there).
        for group in in_groups(dense):
            _add_abs_products(*(list(part) for part in zip(*group, strict=True)))

    def _reset_taylor(self) -> None:
        """After a mask update: the |w·g| sums start again. While another update is due, the
        old tables are zeroed and kept aside for the next first add (:meth:`_taylor_sums`): at
        1M x 64 a fresh 256 MB table costs ~70 ms of page faults, zeroing one ~10 ms. After
        the last update they are released. Until a step adds into them there are no sums, as
        before (structured scores then fall back to weight norms)."""
        spare = {} if self._masks_final() else self._taylor
        for total in spare.values():
            total.zero_()
        self._taylor, self._taylor_spare = {}, spare

    def _taylor_sums(self, target: Target, create: bool = False) -> torch.Tensor | None:
        total = self._taylor.get(target.name)
        weight = target.weight
        if total is not None and total.device != weight.device:
            # sums restored from a (CPU) checkpoint join the weights' device
            total = self._taylor[target.name] = total.to(weight.device)
        if total is None and create:
            spare = self._taylor_spare.pop(target.name, None)
            fits = spare is not None and (spare.shape, spare.dtype, spare.device) == (
                weight.shape,
                weight.dtype,
                weight.device,
            )
            total = spare if fits else torch.zeros_like(weight, requires_grad=False)
            self._taylor[target.name] = total
        return total

    def _add_taylor_rows(
        self, target: Target, rows: torch.Tensor, old: torch.Tensor, grad: torch.Tensor
    ) -> None:
        """Add ``|w·g|`` of the (unique, sorted) ``rows``, given their weights and gradient.

        One ``index_add_``: on torch 2.13's CPU kernel it beats a gather, an add and an
        ``index_copy_`` of the same rows (4096 random rows of 64: 0.35 against 0.45 ms in a 1M-row
        table, 0.27 against 0.34 ms in a 100k-row one, 16 against 51 us in a 943-row one; one
        thread, a timing loop outside the repo), with the same sums: one addition per value."""
        total = self._taylor_sums(target, create=True)
        assert total is not None
        total.index_add_(0, rows, old.mul(grad).abs_())

    def _rewind(self) -> None:
        """Lottery ticket: reset surviving weights to their values at ``rewind_step``."""
        assert self.rewind_state is not None
        for t in self._targets:
            t.weight.data.copy_(self.rewind_state[t.name].to(t.weight.device))
        self.rewind_state = None

    def overall_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(torch.count_nonzero(m)) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def sparsity_by_layer(self) -> dict[str, float]:
        return {
            t.name: 1.0 - float(torch.count_nonzero(t.weight)) / t.weight.numel()
            for t in self._targets
        }
