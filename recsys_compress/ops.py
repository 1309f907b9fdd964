"""Small autograd ops shared by the models and the compression modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


class _GradientRecord:
    """What :class:`_RowGather` knows of a registered table's dense gradient: while
    ``table.grad`` has this address, shape and version, every non-zero of it lies in the rows
    of ``ids`` (duplicates possible; an empty list: all zeros)."""

    __slots__ = ("address", "hook", "ids", "kept", "sent", "shape", "tracked", "version")

    def __init__(self) -> None:
        self.tracked = False  # rows reported by gradient_rows (pruning's dense path)
        self.kept = False  # the gradient stays allocated between steps (keep_gradient)
        self.hook: Any = None  # the table's gradient hook while kept
        self.sent = 0  # address of the gradient (its values, if sparse) a backward returned
        self.address, self.shape, self.version = 0, torch.Size(), -1
        self.ids: list[torch.Tensor] = []

    def set(self, grad: torch.Tensor, ids: list[torch.Tensor]) -> None:
        self.address, self.shape, self.version, self.ids = (
            grad.data_ptr(),
            grad.shape,
            grad._version,
            ids,
        )

    def forget(self) -> None:
        self.version, self.ids = -1, []

    def describes(self, grad: torch.Tensor | None) -> bool:
        """Whether ``grad`` is the recorded gradient, unwritten since (a sum of two gathers'
        gradients, or one accumulated into, is a fresh tensor or bumps the version)."""
        return (
            grad is not None
            and self.version >= 0
            and not grad.is_sparse
            and grad.data_ptr() == self.address
            and grad.shape == self.shape
            and grad._version == self.version
        )

    def num_ids(self) -> int:
        return sum(ids.numel() for ids in self.ids)

    def incoming(self, grad: torch.Tensor) -> None:
        """The table's gradient hook: what autograd is about to store in or add into
        ``table.grad``. The record holds only if that is the gradient our backward returned,
        alone (summed with another read of the table, it is a different tensor)."""
        sent, self.sent = self.sent, 0
        address = grad._values().data_ptr() if grad.is_sparse else grad.data_ptr()
        if address != sent:
            self.forget()


# Tables registered by track_gathered_rows / keep_gradient -> their gradient's record.
_TABLES = WeakIdKeyDictionary()


def _entry(table: torch.Tensor) -> _GradientRecord:
    entry = _TABLES.get(table)
    if entry is None:
        entry = _TABLES[table] = _GradientRecord()
    return entry


def _rows_pay(num_ids: int, num_rows: int) -> bool:
    """Whether per-step work on a batch's rows beats whole-table work: fewer than half as many
    ids as the table has rows (a 1M-row table, yes; ML-100K's tables against a batch of 4096
    ids, no). A fit's batches keep their size, so a table that fails this once stops being
    tracked and kept."""
    return 2 * num_ids < num_rows


def _drop_if_unused(table: torch.Tensor) -> None:
    entry = _TABLES.get(table)
    if entry is not None and not entry.tracked and not entry.kept:
        del _TABLES[table]


class _RowGather(torch.autograd.Function):
    """``weight[ids]`` whose backward is ``zeros.index_add_(0, ids, grad)``: the same sums in the
    same order as ``embedding_dense_backward`` on CPU (bit-identical), about 3x faster there.

    For a table registered with :func:`keep_gradient` whose kept gradient is clean outside
    recorded rows, and a batch with fewer than half as many ids as the table has rows, the
    backward returns the rows as a sparse gradient instead: autograd adds it into the kept
    dense gradient in place (the same sums in the same order), with no table-sized allocation.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        ctx.table = weight if _TABLES and weight in _TABLES else None
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        table, ctx.table = ctx.table, None
        entry = _TABLES.get(table) if table is not None else None
        if entry is not None and entry.kept and _rows_pay(ids.numel(), ctx.num_rows):
            held = table.grad
            if entry.describes(held) and not entry.sent:
                # Autograd adds this into ``held`` in place: one version later, same memory.
                # The table's hook checks that nothing else is summed with it.
                values = grad.contiguous()
                entry.version += 1
                entry.ids.append(ids)
                entry.sent = values.data_ptr()
                indices = ids.view(1, -1).to(torch.long)
                size = (ctx.num_rows, grad.shape[-1])
                sparse = torch.sparse_coo_tensor(indices, values, size, check_invariants=False)
                return sparse, None
        out = grad.new_zeros(ctx.num_rows, grad.shape[-1])
        out.index_add_(0, ids, grad.contiguous())
        if entry is not None:
            entry.sent = out.data_ptr()
            if table.grad is None:
                # Stored as the gradient as it is (no reference to ``out`` is kept: one would
                # make autograd copy it). A second read of the table in the same graph records
                # its own tensor; the sum autograd stores is neither, so the record fails.
                entry.set(out, [ids])
            else:  # summed into an existing gradient: its rows are unknown
                entry.forget()
        return out, None


def track_gathered_rows(table: torch.Tensor, on: bool = True) -> None:
    """Start (or stop) reporting which rows of ``table``'s dense gradient :func:`gather_rows`
    wrote, for :func:`gradient_rows`."""
    if on:
        _entry(table).tracked = True
    elif table in _TABLES:
        _TABLES[table].tracked = False
        _drop_if_unused(table)


def gradient_rows(table: torch.Tensor) -> torch.Tensor | None:
    """For a tracked table: ids (duplicates possible) whose rows hold every non-zero of
    ``table.grad``, when that gradient holds only what :func:`gather_rows` backwards wrote
    since it was allocated or cleared by :func:`zero_grad` (not summed with another read of the
    table, accumulated into by a dense gradient, scaled by clipping or AMP, or reduced by DDP).
    None otherwise, and for a batch about as large as the table, which then stops being
    tracked (:func:`_rows_pay`)."""
    if not _TABLES:  # nothing registered (ML-100K's tables after their first step)
        return None
    entry = _TABLES.get(table)
    if entry is None or not entry.tracked or not entry.describes(table.grad):
        return None
    if not _rows_pay(entry.num_ids(), table.shape[0]):
        track_gathered_rows(table, on=False)
        return None
    if len(entry.ids) == 1:
        return entry.ids[0]
    if not entry.ids:
        return torch.empty(0, dtype=torch.long, device=table.device)
    return torch.cat(entry.ids)


def rows_rewritten(table: torch.Tensor) -> None:
    """Say that the caller has just written ``table.grad`` in place, only within the rows
    :func:`gradient_rows` returned for it a moment before: its record stays valid."""
    entry = _TABLES.get(table)
    grad = table.grad
    if entry is not None and grad is not None and grad.data_ptr() == entry.address:
        entry.version = grad._version


def keep_gradient(table: torch.Tensor, on: bool = True) -> None:
    """Keep ``table``'s dense gradient allocated between steps (:func:`zero_grad` zeroes the
    rows written instead of dropping it), so that a batch's backward adds its rows into it in
    place: at 1M x 64 a fresh 256 MB gradient each step costs ~100 ms of page faults. Off:
    the table's gradient is released as after ``zero_grad(set_to_none=True)``."""
    if on:
        entry = _entry(table)
        if not entry.kept:
            entry.kept = True
            entry.hook = table.register_hook(entry.incoming)
    elif table in _TABLES:
        entry = _TABLES[table]
        if entry.kept:
            entry.kept = False
            entry.hook.remove()
            entry.hook = None
            entry.forget()
            table.grad = None
        _drop_if_unused(table)


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``, except for kept gradients
    (:func:`keep_gradient`) whose non-zeros lie in the rows :func:`gather_rows` backwards wrote:
    those rows are zeroed and the gradient stays. A kept gradient written any other way is
    dropped. A table whose batch was about as large as it stops being kept (:func:`_rows_pay`:
    zeroing those rows costs more than a fresh gradient)."""
    if not _TABLES:
        optimizer.zero_grad(set_to_none=True)
        return
    kept = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = _TABLES.get(param)
            if entry is None or not entry.kept or not entry.describes(param.grad):
                continue
            if _rows_pay(entry.num_ids(), param.shape[0]):
                kept.append((param, param.grad, entry))
            else:
                keep_gradient(param, on=False)
    optimizer.zero_grad(set_to_none=True)
    for param, grad, entry in kept:
        for ids in entry.ids:
            zero_rows_(grad, ids)
        param.grad = grad
        entry.set(grad, [])


class _Dropout(torch.autograd.Function):
    """Dropout whose keep-mask comes from ``torch.rand`` (see :func:`dropout`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        # Draws in float32 (float64 for float64 x) whatever x's dtype and the default dtype
        # (bf16-true training sets a bf16 default): a bf16 draw would round p to 2^-8. The
        # mask then as torch's: 0 / 1 in x's dtype, divided by 1 - p there.
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        keep = torch.rand(x.shape, device=x.device, dtype=wide).ge_(p)
        mask = keep.to(x.dtype).div_(1.0 - p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)``: each element zeroed with probability
    ``p``, the others scaled by ``1 / (1 - p)``. On the CPU its mask is ``torch.rand(...) >= p``
    (a uniform float32 draw) instead of torch's ``bernoulli_``, which took twice as long here
    (2048 x 128: 0.95 against 1.89 ms): forward and backward of a 2048 x 128 batch took
    1.37-1.41 ms against 2.27-2.33 ms, a 4096 x 32 one 0.68-0.71 against 1.14-1.27 ms (2
    threads, a timing loop outside the repo). The same distribution (P(keep) within 6e-8 of
    ``1 - p``) from the same generator (the global one, which a resumed run restores), other
    draws: a seeded run with dropout draws other masks than torch's. Elsewhere (CUDA's fused
    kernel), for p = 1 and for integer tensors, torch's own."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return nn.functional.dropout(x, p, training)
    return _Dropout.apply(x, p)


def gathered_table(embedding: nn.Module, kind: type[nn.Module] = nn.Embedding) -> bool:
    """Whether ``embedding`` is read with :func:`gather_rows` on CPU (``models.base.rows``,
    the fake-quant tables): a dense ``nn.Embedding`` (exactly ``kind``) with no padding row,
    max norm or per-id gradient scaling, whose gradient equals ``F.embedding``'s."""
    return (
        type(embedding) is kind
        and not embedding.sparse
        and embedding.padding_idx is None
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
    )


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` for 1-D ``ids``, differentiable in ``weight`` (a table or a tensor computed
    from one), with :class:`_RowGather`'s faster backward on CPU."""
    if ids.device.type == "cpu":
        return _RowGather.apply(weight, ids)
    return torch.nn.functional.embedding(ids, weight)


def _byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s rows (dim 0) as rows of 16- or 8-byte elements, where its layout allows
    (CPU, contiguous, not empty, row bytes and address multiples of the width); else ``tensor``
    itself.

    ``index_copy_`` and ``index_fill_`` on CPU pay per element as well as per byte: 4096
    random rows of a 1M x 64 float table, written as 16 complex128 values a row instead of 64
    floats, took 190 us instead of 220 (index_fill_: 160 instead of 225) with new rows each
    call, and 86 instead of 145 with rows in cache (a timing loop outside the repo). Only for
    copies and zero fills: nothing is computed on the wide values."""
    if (
        tensor.device.type != "cpu"
        or tensor.ndim == 0
        or tensor.numel() == 0
        or not tensor.is_contiguous()
    ):
        return tensor
    row_bytes = tensor[:1].numel() * tensor.element_size()
    for wide in (torch.complex128, torch.int64):
        width = wide.itemsize
        # the address itself aligned (memory from numpy may start 8 bytes past a 16-byte one)
        if row_bytes % width == 0 and tensor.data_ptr() % width == 0:
            return tensor.reshape(tensor.shape[0], -1).view(wide)
    return tensor


def copy_rows_(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``table.index_copy_(0, rows, values)`` for *unique* ``rows`` (a coalesced gradient's,
    ``torch.unique``'s): the same bytes, written as wide elements (:func:`_byte_rows`)."""
    wide, source = _byte_rows(table), _byte_rows(values)
    if wide is table or source.dtype != wide.dtype or source.shape[1:] != wide.shape[1:]:
        return table.index_copy_(0, rows, values)
    wide.index_copy_(0, rows, source)
    return table


def zero_rows_(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table.index_fill_(0, rows, 0)`` (duplicates allowed), written as wide elements."""
    _byte_rows(table).index_fill_(0, rows, 0)
    return table


# Elements per chunk of element-wise passes over large tables (a few MB of temporaries).
CHUNK = 1 << 20


def row_slices(num_rows: int, width: int) -> list[slice]:
    """Blocks of whole rows of a ``[num_rows, width]`` table, about :data:`CHUNK` elements each
    (at least one row): the passes of row-wise work over a large table."""
    rows = max(1, CHUNK // max(1, width))
    return [slice(start, start + rows) for start in range(0, num_rows, rows)]


def flat_chunks(tensor: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, ...]:
    """``tensor`` (contiguous) as flat views of at most ``size`` (default :data:`CHUNK`)
    elements (itself when it is no larger). Element-wise work on a large table then makes
    small temporaries that the allocator reuses, where a table-sized temporary is a fresh
    allocation, with its page faults (~50 ms for 256 MB), on every call."""
    size = CHUNK if size is None else size
    if tensor.numel() <= size:
        return (tensor,)
    return tensor.view(-1).split(size)


def in_groups(
    items: list[tuple[Any, ...]], size: int | None = None
) -> Iterator[list[tuple[Any, ...]]]:
    """``items`` (tuples whose first entry is a tensor of at most ``size`` elements, e.g. from
    :func:`flat_chunks`) in consecutive groups of at most ``size`` elements, for
    ``torch._foreach_*`` ops: small tables share one call (the per-op overhead dominates
    there), a large table's chunks go one at a time."""
    size = CHUNK if size is None else size
    group: list[tuple[Any, ...]] = []
    total = 0
    for item in items:
        if group and total + item[0].numel() > size:
            yield group
            group, total = [], 0
        group.append(item)
        total += item[0].numel()
    if group:
        yield group
