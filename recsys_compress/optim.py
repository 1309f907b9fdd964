"""Optimizers whose cost per step follows the batch's rows when embedding gradients are sparse.

With ``nn.Embedding(sparse=True)`` the gradient of a 1M-row table holds only the rows a batch
read; a dense Adam still reads and writes all rows of the weight and both moments every step
(at 1M users x 64 that is ~1.7 s of a step). :class:`RowSparseAdam` updates, for a sparse
gradient, only the rows it holds ("lazy" Adam, as ``torch.optim.SparseAdam``); dense gradients
(MLP layers, the global bias) get the ordinary Adam update. One optimizer serves both, so the
training loop calls one ``step()`` and the compression callbacks find the usual Adam state
(``step``, ``exp_avg``, ``exp_avg_sq``; ``betas`` and ``eps`` in each group).
:class:`RowWiseAdagrad` does the same with one Adagrad accumulator per row.

Each random-row access of a large table costs ~0.1-0.2 ms per 4096 rows on CPU (memory latency,
not arithmetic), so the row update reads every row once and writes it once: a gather, the
arithmetic on the gathered rows, one ``index_copy_`` (Adam needs the old rows, so an
``index_add_`` of the change would read them a second time). Compression callbacks that act on
the same rows after every step (pruning masks, Taylor sums, the L1 proximal step) register a
*row hook* (:meth:`RowUpdateOptimizer.register_row_hook`, shared by both) and work on the
gathered rows before they are written back, instead of gathering and scattering them again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.optim import optimizer as torch_optimizer
from torch.utils.hooks import RemovableHandle

from recsys_compress.ops import copy_rows_


@dataclass
class RowStep:
    """One sparse-gradient update of a table's rows, as a row-update optimizer
    (:class:`RowSparseAdam`, :class:`RowWiseAdagrad`) hands it to the table's row hooks before
    it writes ``new`` back."""

    rows: torch.Tensor  # the rows the gradient holds: sorted, unique
    grad: torch.Tensor  # their gradient (duplicates summed)
    # their values before the step; None when no hook on the table reads them (every hook
    # registered with reads_old false, or returning false this step): no copy is made then
    old: torch.Tensor | None
    new: torch.Tensor  # their values after the step; a hook may change it in place
    lr: float
    divisor: Callable[[], torch.Tensor]  # computes ``denom``

    @cached_property
    def denom(self) -> torch.Tensor:
        """The optimizer's divisor of the gradient term for the rows, broadcastable to
        ``new``: the step size of each weight is ``lr / denom`` (Adam: ``sqrt(v) /
        sqrt(1 - beta2^t) + eps``; row-wise Adagrad: ``sqrt(s) + eps``, one per row). Computed
        when a hook asks."""
        return self.divisor()


RowHook = Callable[[RowStep], None]
ReadsOld = bool | Callable[[], bool]


class RowUpdateOptimizer(torch.optim.Optimizer):
    """An optimizer that updates only the rows of a sparse gradient, gathering them once and
    writing them back once, with row hooks (:meth:`register_row_hook`) run on the gathered
    rows in between."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._row_hooks: dict[int, OrderedDict[int, tuple[RowHook, ReadsOld]]] = {}

    def register_row_hook(
        self, param: torch.Tensor, hook: RowHook, reads_old: ReadsOld = True
    ) -> RemovableHandle:
        """Call ``hook(row_step)`` on every sparse-gradient update of ``param``, after the
        optimizer's arithmetic and before the rows are written back (hooks run in registration
        order and may change ``row_step.new`` in place). Dense-gradient updates of ``param`` do
        not call it. Returns a handle whose ``remove()`` unregisters the hook.

        ``reads_old``: whether the hook reads ``row_step.old``, or a function asked before each
        update. The rows are copied before the step only when some hook of ``param`` reads
        them (for 4096 rows of 64 ~20 us in a timing loop, ~60 us in training: the L1
        proximal step never reads them, pruning only while it sums Taylor scores); otherwise
        ``old`` is None."""
        hooks = self._row_hooks.setdefault(id(param), OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = (hook, reads_old)
        return handle

    def has_row_hooks(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s sparse-gradient updates call row hooks."""
        return bool(self._row_hooks.get(id(param)))

    def _row_hooks_of(self, param: torch.Tensor) -> tuple[list[RowHook], bool]:
        """``param``'s hooks, and whether one of them reads the old rows this update."""
        hooks = list(self._row_hooks.get(id(param), {}).values())
        reads = any(r() if callable(r) else r for _, r in hooks)
        return [hook for hook, _ in hooks], reads

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """One step of ``param`` (whose gradient is set) with its group's settings."""
        raise NotImplementedError

    def _write_rows(
        self,
        param: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        old: torch.Tensor | None,
        new: torch.Tensor,
        lr: float,
        divisor: Callable[[], torch.Tensor] | None,
        hooks: list[RowHook],
    ) -> None:
        """Hand the updated ``rows`` to ``param``'s row hooks (``divisor``: set when there are
        hooks), then write them back."""
        if hooks:
            assert divisor is not None
            row_step = RowStep(rows, values, old, new, lr, divisor)
            for hook in hooks:
                hook(row_step)
        copy_rows_(param, rows, new)

    def _sparse_rows(
        self, param: torch.Tensor, group: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``param``'s sparse gradient as (sorted unique rows, their summed values), None when
        it holds no row. Weight decay is refused here: it would need every row each step."""
        if group["weight_decay"]:
            raise RuntimeError(
                f"{type(self).__name__}: weight_decay is not supported for sparse gradients "
                "(set optim.embedding_weight_decay=0 with optim.sparse=true)."
            )
        grad = coalesced_grad(param)
        rows = grad.indices()[0]
        return None if rows.numel() == 0 else (rows, grad.values())


class RowSparseAdam(RowUpdateOptimizer):
    """Adam (Kingma & Ba, with torch's bias correction and ``eps`` placement) that updates only
    the rows of a sparse gradient; dense gradients get the dense update.

    The step count is per parameter (as in ``SparseAdam``): a row untouched for a while keeps its
    moments, and its next update uses the global bias correction. ``fused`` (``optim.fused``,
    the default) runs torch's fused Adam kernel on the gathered rows (and on dense gradients):
    one pass instead of eight element-wise ops, and with a dense gradient every step the result
    equals ``torch.optim.Adam(fused=True)`` bit for bit; ``fused=False`` the for-loop
    arithmetic, equal to ``torch.optim.Adam`` up to float rounding. ``weight_decay`` (L2 added
    to the gradient) is refused for parameters that receive sparse gradients: it would need
    every row each step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # Saved before the fused row update: resume with the arithmetic the run began with.
            group.setdefault("fused", False)

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            # The fused kernel takes the step on the parameter's device (as torch's
            # Adam(fused=True) keeps it); the for-loop arithmetic reads it on the CPU.
            device = param.device if group["fused"] else None
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        grad = param.grad
        assert grad is not None
        if not grad.is_sparse:
            _adam_(param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
            return
        found = self._sparse_rows(param, group)
        if found is None:
            return
        rows, values = found
        exp_avg = state["exp_avg"].index_select(0, rows)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
        new = param.index_select(0, rows)
        hooks, reads = self._row_hooks_of(param)
        old = new.clone() if reads else None
        _adam_(new, values, exp_avg, exp_avg_sq, state["step"], group, rows=True)
        copy_rows_(state["exp_avg"], rows, exp_avg)
        copy_rows_(state["exp_avg_sq"], rows, exp_avg_sq)
        divisor = None
        if hooks:  # the step count is read only then (on CUDA, a sync)
            bias2_sqrt = math.sqrt(1.0 - group["betas"][1] ** float(state["step"]))
            divisor = partial(adam_denom, exp_avg_sq, bias2_sqrt, group["eps"])
        self._write_rows(param, rows, values, old, new, group["lr"], divisor, hooks)


def _adam_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    group: dict[str, Any],
    rows: bool = False,
) -> None:
    """One Adam step of ``param`` (a parameter, or the gathered rows of one: ``rows``) in place,
    with its moments, at the step count ``step`` (already advanced)."""
    beta1, beta2 = group["betas"]
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    if group["fused"]:
        torch._fused_adam_(
            [param],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [step],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return
    t = float(step)
    bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
    if decay:
        grad = grad.add(param, alpha=decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = adam_denom(exp_avg_sq, math.sqrt(bias2), eps)
    if rows:  # the arithmetic of the row update before the fused kernel (bit for bit)
        param.add_(exp_avg.div(denom), alpha=-lr / bias1)
    else:
        param.addcdiv_(exp_avg, denom, value=-lr / bias1)


class RowWiseAdagrad(RowUpdateOptimizer):
    """Adagrad with one accumulator per embedding row for sparse gradients (TorchRec's and
    FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, the usual optimizer of large recommender tables):

        s[r] += mean_j g[r, j]^2,    w[r] -= lr * g[r] / (sqrt(s[r]) + eps)

    for the rows ``r`` a batch holds, duplicates summed first. Its state is one number per row
    (4 MB for a 1M-row table, where Adam keeps two tables of the weights' size: 512 MB at
    1M x 64), and a step reads and writes one row of weights and one number per row held.
    Dense gradients (MLP layers, the global bias) get torch's element-wise Adagrad arithmetic
    (``torch.optim.Adagrad`` without learning-rate decay). ``weight_decay`` (L2 added to the
    gradient) is refused for sparse gradients, as in :class:`RowSparseAdam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        grad, state = param.grad, self.state[param]
        assert grad is not None
        # The accumulator's shape is fixed by the first gradient: one per row for a sparse
        # one, one per weight for a dense one.
        row_wise = grad.is_sparse and param.dim() >= 2
        if not state:
            shape = param.shape[:1] if row_wise else param.shape
            state["sum"] = torch.zeros(shape, dtype=param.dtype, device=param.device)
        total = state["sum"]
        if not grad.is_sparse:
            if total.shape != param.shape:
                raise RuntimeError(_MIXED_GRADIENTS)
            if decay:
                grad = grad.add(param, alpha=decay)
            total.addcmul_(grad, grad, value=1.0)
            param.addcdiv_(grad, total.sqrt().add_(eps), value=-lr)
            return
        if not row_wise or total.shape != param.shape[:1]:
            raise RuntimeError(_MIXED_GRADIENTS)
        found = self._sparse_rows(param, group)
        if found is None:
            return
        rows, values = found
        row_total = total.index_select(0, rows).add_(values.square().flatten(1).mean(1))
        copy_rows_(total, rows, row_total)
        denom = rowwise_denom(row_total, eps, param.dim(), in_place=True)
        new = param.index_select(0, rows)
        hooks, reads = self._row_hooks_of(param)
        old = new.clone() if reads else None
        new.addcdiv_(values, denom, value=-lr)
        self._write_rows(param, rows, values, old, new, lr, lambda: denom, hooks)


def rowwise_denom(
    row_sums: torch.Tensor, eps: float, ndim: int, in_place: bool = False
) -> torch.Tensor:
    """Row-wise Adagrad's ``sqrt(s) + eps`` for accumulators ``row_sums`` (one per row), shaped
    to broadcast over rows of a ``ndim``-dimensional table (into ``row_sums`` if ``in_place``)."""
    root = row_sums.sqrt_() if in_place else row_sums.sqrt()
    return root.add_(eps).view(-1, *([1] * (ndim - 1)))


_MIXED_GRADIENTS = (
    "RowWiseAdagrad: a parameter received a sparse gradient after a dense one or the other "
    "way round (its accumulator is one per row for sparse gradients, one per weight for dense "
    "ones): keep each embedding table's sparse setting fixed through training."
)


class RowHookSet:
    """The row hooks one callback keeps on every :class:`RowUpdateOptimizer` of a run: which weights
    they cover, and their removal (a later ``fit`` registers afresh)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._params: set[int] = set()

    def register(
        self,
        optimizers: Iterable[Any],
        hooks: list[tuple[torch.Tensor, RowHook]],
        reads_old: ReadsOld = True,
    ) -> None:
        """Register ``hooks`` (weight, hook) on each :class:`RowUpdateOptimizer` among
        ``optimizers`` (torch's or Lightning's wrappers), with ``reads_old``
        (:meth:`RowUpdateOptimizer.register_row_hook`); other optimizers get none."""
        self.remove()
        for optimizer in optimizers:
            raw = getattr(optimizer, "optimizer", optimizer)
            if isinstance(raw, RowUpdateOptimizer):
                for param, hook in hooks:
                    self._handles.append(raw.register_row_hook(param, hook, reads_old))
                    self._params.add(id(param))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._params.clear()

    def __bool__(self) -> bool:
        return bool(self._handles)

    def covers(self, param: torch.Tensor) -> bool:
        """Whether a hook has handled ``param``'s last update: hooked, and its gradient sparse
        (a dense gradient takes the optimizer's dense path, which calls no hook)."""
        return id(param) in self._params and param.grad is not None and param.grad.is_sparse


def sqrt_floor(dtype: torch.dtype, bias2_sqrt: float, eps: float) -> float:
    """A floor for Adam's second moments ``v`` that leaves ``sqrt(v) / bias2_sqrt + eps``
    unchanged bit for bit: the smallest normal float, whose root divided by ``bias2_sqrt`` is
    under half a unit in the last place of ``eps``, so a ``v`` raised to it (a zero: a row or
    weight no batch has touched) still gives exactly ``eps``. torch's float ``sqrt`` is ~5x
    slower on exact zeros than on positive values on this CPU (4096 x 64 moments, two thirds
    zeros: 580 us, 113 us with the floor). 0.0 (no floor) where ``eps`` is too small for that.
    """
    info = torch.finfo(dtype)
    # half an ulp of eps is at least eps * info.eps / 4; a factor 2 covers the roundings
    if 2.0 * math.sqrt(info.tiny) / bias2_sqrt < eps * info.eps / 4:
        return info.tiny
    return 0.0


def adam_denom(exp_avg_sq: torch.Tensor, bias2_sqrt: float, eps: float) -> torch.Tensor:
    """Adam's denominator ``sqrt(v) / sqrt(1 - beta2^t) + eps`` as a new tensor, the root taken
    above :func:`sqrt_floor` (the same values, faster where ``v`` has zeros)."""
    floor = sqrt_floor(exp_avg_sq.dtype, bias2_sqrt, eps)
    return exp_avg_sq.clamp_min(floor).sqrt_().div_(bias2_sqrt).add_(eps)


def coalesced_grad(param: torch.Tensor) -> torch.Tensor:
    """``param.grad``, coalesced when sparse (duplicate rows summed, rows sorted) and stored back,
    so the optimizer and the compression callbacks that read it coalesce it once per step."""
    grad = param.grad
    assert grad is not None
    if grad.is_sparse and not grad.is_coalesced():
        grad = coalesce_rows(grad)
        param.grad = grad
    return grad


@dataclass(frozen=True)
class _SortedIds:
    """What :func:`coalesce_rows` derives from a gradient's ids."""

    ids: torch.Tensor  # a copy of the ids
    rows: torch.Tensor  # the distinct ids, sorted
    firsts: torch.Tensor  # the position in ``ids`` of each one's first occurrence
    repeats: torch.Tensor | None = None  # the positions of later occurrences, in order
    slots: torch.Tensor | None = None  # for each of those, its id's position in ``rows``


# The last ids sorted, newest last: an MF batch's user (item) ids index both the user (item)
# table and its bias table, whose gradients the optimizer takes as users, items, users, items.
# A tuple, replaced whole, so a reader never sees half of an update. Batches of more ids than
# _CACHED_IDS are not kept (each entry holds ~5 arrays of the ids' size).
_recent_sorts: tuple[_SortedIds, ...] = ()
_RECENT_SORTS = 4
_CACHED_IDS = 1 << 20


def _sort_ids(ids: torch.Tensor) -> _SortedIds:
    """Sort ``ids`` (1-D, CPU, >= 0) stably, by one numpy sort of ``id * n + position`` (a
    distinct key per position): numpy 2's vectorised sort, where ``torch.sort`` and numpy's
    stable sorts take ~5x as long on 4096 ids (~40 against ~190 us)."""
    global _recent_sorts
    recent = _recent_sorts
    for found in reversed(recent):
        if found.ids.shape == ids.shape and torch.equal(found.ids, ids):
            return found
    n = ids.numel()
    keys = np.sort(ids.numpy() * n + np.arange(n))
    order = keys % n
    ids_sorted = keys // n
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(ids_sorted[1:], ids_sorted[:-1], out=first[1:])
    if first.all():  # no repeats (a batch of 4096 of 1M users holds a handful at most)
        found = _SortedIds(ids.clone(), torch.from_numpy(ids_sorted), torch.from_numpy(order))
    else:
        later = ~first
        found = _SortedIds(
            ids.clone(),
            torch.from_numpy(ids_sorted[first]),
            torch.from_numpy(order[first]),
            torch.from_numpy(order[later]),
            torch.from_numpy(np.cumsum(first)[later] - 1),
        )
    if n <= _CACHED_IDS:
        _recent_sorts = (*recent[1 - _RECENT_SORTS :], found)
    return found


def coalesce_rows(grad: torch.Tensor) -> torch.Tensor:
    """``grad.coalesce()`` for a sparse gradient of rows (``nn.Embedding(sparse=True)``'s: one
    sparse dimension) on CPU: the rows sorted, each row's values summed in the order of the ids,
    as the dense path's backward (``index_add_``) sums them, bit for bit in float32 and float64.
    (torch's coalesce sums three or more repeats of a row in another order, so such a row may
    differ in the last bits; in float16 / bfloat16 ``index_add_`` rounds differently from the
    dense ``nn.Embedding`` backward, and is the more accurate.)

    torch's CPU coalesce copies the values a row at a time after a slow ``torch.sort``:
    ~0.65 ms for a batch of 4096 ids, ~0.35 ms for a bias table's, four times a step for MF on
    the sparse path. This takes one numpy sort per batch of ids (an MF step's table and its
    bias table share it, and then share one index tensor: do not write into a gradient's
    indices), one gather of the values and, for repeated ids, one ``index_add_`` of their rows.
    Other gradients (CUDA, several sparse dimensions) go to ``grad.coalesce()``."""
    if (
        grad.device.type != "cpu"
        or grad.sparse_dim() != 1
        or grad._nnz() == 0
        or grad.shape[0] * grad._nnz() >= 2**62  # the sort key id * n + position must fit
    ):
        return grad.coalesce()
    sort = _sort_ids(grad._indices()[0])
    values = grad._values()
    summed = values.index_select(0, sort.firsts)
    if sort.repeats is not None:
        assert sort.slots is not None
        summed.index_add_(0, sort.slots, values.index_select(0, sort.repeats))
    indices = sort.rows.view(1, -1)
    return torch.sparse_coo_tensor(
        indices, summed, grad.shape, is_coalesced=True, check_invariants=False
    )


def touched_rows(param: torch.Tensor) -> torch.Tensor | None:
    """The rows the last backward wrote into ``param.grad`` when it is sparse (sorted, unique),
    else None: the only rows a sparse-capable optimizer (RowSparseAdam, RowWiseAdagrad, SGD and
    Adagrad without momentum / weight decay) changed in its last step."""
    if param.grad is None or not param.grad.is_sparse:
        return None
    return coalesced_grad(param).indices()[0]


# The code of the wrapper torch's ``Optimizer`` puts around every subclass's ``step``.
_PROFILED_STEP = torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None).__code__


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, without torch's per-step wrapper when that has nothing to do.

    ``torch.optim.Optimizer`` wraps every subclass's ``step`` in ``profile_hook_step``: a
    profiler label, the step pre- and post-hooks (global and the optimizer's) and a no-op
    profiler entry point. With no profiler running and no hook registered that is ~30 us of
    Python a step in a timing loop (116 against 86 us for a fused Adam step over ML-100K's two
    MF tables) and ~40 us in training (275 against 233 us, alternating from step to step in a
    10-epoch run), ~2% of an ML-100K MF step (timing scripts outside the repo). Then the wrapped
    function (with its grad-mode decorator) is called directly. An LR scheduler's wrapper on
    the instance only records that the optimizer stepped; that record is kept. Anything else
    (a hook, a running profiler, a ``step`` not wrapped by torch or replaced on the instance)
    calls ``optimizer.step()``. Observers that record without the profiler (e.g. an execution
    trace) see no ``Optimizer.step`` label.
    """
    cls_step = type(optimizer).step
    own = vars(optimizer).get("step")
    scheduled = (
        own is not None
        and getattr(own, "_wrapped_by_lr_sched", False)
        and getattr(own, "__wrapped__", None) is cls_step
    )
    if (
        getattr(cls_step, "__code__", None) is not _PROFILED_STEP
        or (own is not None and not scheduled)
        or optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or torch_optimizer._global_optimizer_pre_hooks
        or torch_optimizer._global_optimizer_post_hooks
        or torch.autograd.profiler._is_profiler_enabled
        or torch._C._autograd._profiler_enabled()
    ):
        optimizer.step()
        return
    if scheduled:
        optimizer._opt_called = True  # type: ignore[attr-defined]  # as the scheduler's wrapper
    cls_step.__wrapped__(optimizer)  # torch's wrapper keeps the function it wraps there


def plain_steps(trainer: L.Trainer) -> bool:
    """Whether ``RecommenderModule`` runs its optimizer steps without Lightning's wrappers: on
    one device in full precision those only call hooks (~0.3 ms a step on CPU), so the module
    calls backward, the optimizer and the hooks that matter (on_before_optimizer_step,
    Lightning's step count) directly, every ``on_before_optimizer_step`` before
    ``optimizer.step()``. Mixed precision needs Lightning's gradient scaling, DDP its backward
    preparation: those keep the wrappers (which call ``on_before_optimizer_step`` inside the
    optimizer's step, from its closure)."""
    return type(trainer.precision_plugin) is Precision and isinstance(
        trainer.strategy, SingleDeviceStrategy
    )
