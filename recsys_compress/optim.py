"""An Adam whose cost per step follows the batch's rows when embedding gradients are sparse.

With ``nn.Embedding(sparse=True)`` the gradient of a 1M-row table holds only the rows a batch
read; a dense Adam still reads and writes all rows of the weight and both moments every step
(at 1M users x 64 that is ~1.7 s of a step). :class:`RowSparseAdam` updates, for a sparse
gradient, only the rows it holds ("lazy" Adam, as ``torch.optim.SparseAdam``); dense gradients
(MLP layers, the global bias) get the ordinary Adam update. One optimizer serves both, so the
training loop calls one ``step()`` and the compression callbacks find the usual Adam state
(``step``, ``exp_avg``, ``exp_avg_sq``; ``betas`` and ``eps`` in each group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class RowSparseAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba, with torch's bias correction and ``eps`` placement) that updates only
    the rows of a sparse gradient; dense gradients get the dense update.

    The step count is per parameter (as in ``SparseAdam``): a row untouched for a while keeps its
    moments, and its next update uses the global bias correction. With a dense gradient every
    step, the result equals ``torch.optim.Adam``. ``weight_decay`` (L2 added to the gradient) is
    refused for parameters that receive sparse gradients: it would need every row each step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                state["step"] += 1
                step = float(state["step"])
                bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
                grad = param.grad
                if grad.is_sparse:
                    if decay:
                        raise RuntimeError(
                            "RowSparseAdam: weight_decay is not supported for sparse gradients "
                            "(set optim.embedding_weight_decay=0 with optim.sparse=true)."
                        )
                    grad = coalesced_grad(param)
                    _sparse_update(param, grad, state, beta1, beta2, lr, eps, bias1, bias2)
                    continue
                if decay:
                    grad = grad.add(param, alpha=decay)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias1)
        return loss


def _sparse_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    bias1: float,
    bias2: float,
) -> None:
    """The Adam update of the rows of the coalesced sparse ``grad``, in place."""
    rows, values = grad.indices()[0], grad.values()
    if rows.numel() == 0:
        return
    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1.0 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
    exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1.0 - beta2)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
    param.index_add_(0, rows, exp_avg.div_(denom), alpha=-lr / bias1)


def coalesced_grad(param: torch.Tensor) -> torch.Tensor:
    """``param.grad``, coalesced when sparse (duplicate rows summed, rows sorted) and stored back,
    so the optimizer and the compression callbacks that read it coalesce it once per step."""
    grad = param.grad
    assert grad is not None
    if grad.is_sparse and not grad.is_coalesced():
        grad = grad.coalesce()
        param.grad = grad
    return grad


def touched_rows(param: torch.Tensor) -> torch.Tensor | None:
    """The rows the last backward wrote into ``param.grad`` when it is sparse (sorted, unique),
    else None: the only rows a sparse-capable optimizer (RowSparseAdam, SGD and Adagrad without
    momentum / weight decay) changed in its last step."""
    if param.grad is None or not param.grad.is_sparse:
        return None
    return coalesced_grad(param).indices()[0]
