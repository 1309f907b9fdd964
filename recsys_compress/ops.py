"""Small autograd ops shared by the models and the compression modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

# Tables whose gradient rows are tracked (:func:`track_gathered_rows`): table -> where the last
# gradient :class:`_RowGather` wrote for it lies (address, shape, version) and its ids, or None.
_TRACKED = WeakIdKeyDictionary()


class _RowGather(torch.autograd.Function):
    """``weight[ids]`` whose backward is ``zeros.index_add_(0, ids, grad)``: the same sums in the
    same order as ``embedding_dense_backward`` on CPU (bit-identical), about 3x faster there."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        ctx.tracked = weight if _TRACKED and weight in _TRACKED else None
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        table = grad.new_zeros(ctx.num_rows, grad.shape[-1])
        table.index_add_(0, ids, grad.contiguous())
        if ctx.tracked is not None:
            # No reference to ``table`` is kept: autograd then stores it as the gradient as it is
            # (a held reference would make it copy the table).
            _TRACKED[ctx.tracked] = (table.data_ptr(), table.shape, table._version, ids)
            ctx.tracked = None
        return table, None


def track_gathered_rows(table: torch.Tensor, on: bool = True) -> None:
    """Start (or stop) recording which rows :func:`gather_rows`'s backward writes into
    ``table``'s dense gradient, for :func:`pop_gathered_rows`."""
    if on:
        _TRACKED.setdefault(table, None)
    else:
        _TRACKED.pop(table, None)


def pop_gathered_rows(table: torch.Tensor) -> torch.Tensor | None:
    """The ids (duplicates possible) whose rows hold every non-zero of ``table.grad``, when that
    gradient is exactly what one :func:`gather_rows` backward wrote (a tracked table; not summed
    with another gather of the same table, nor accumulated into since): the gradient's other
    rows are then exact zeros. None otherwise. The record is dropped: call it once per backward
    (after it, before the next), so that no record outlives its step."""
    entry = _TRACKED.get(table)
    if entry is None:
        return None
    _TRACKED[table] = None
    address, shape, version, ids = entry
    grad = table.grad
    # The gradient autograd stored as it was: the same memory, never written since. A sum of
    # two gathers' gradients, or one accumulated into, is a fresh tensor (version 0) or bumped
    # the version of the written one.
    if (
        grad is None
        or grad.is_sparse
        or grad.data_ptr() != address
        or grad.shape != shape
        or grad._version != version
    ):
        return None
    return ids


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` for 1-D ``ids``, differentiable in ``weight`` (a table or a tensor computed
    from one), with :class:`_RowGather`'s faster backward on CPU."""
    if ids.device.type == "cpu":
        return _RowGather.apply(weight, ids)
    return torch.nn.functional.embedding(ids, weight)


# Elements per chunk of element-wise passes over large tables (a few MB of temporaries).
CHUNK = 1 << 20


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
