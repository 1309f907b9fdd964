"""Size accounting: per layer and in total, parameters, non-zeros, bits and bytes.

The compressed size of a weight is what the export writes for it: each tensor is stored in the
cheaper of two encodings, dense (``numel * bits / 8``) or sparse (a bitmask of ``numel / 8`` bytes
plus the non-zero values), plus its quantisation scales. Keeping the rule here, and having the
export call it, makes the reported size and the artifact's size the same number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from recsys_compress import ops
from recsys_compress.compression.targets import module_group

SCALE_BYTES = 4  # float32 quantisation scales (a quantised module's ``rcz_scale_bytes`` overrides)


def dense_encoding_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def sparse_encoding_bytes(numel: int, nnz: int, bits: int) -> int:
    return math.ceil(numel / 8) + math.ceil(nnz * bits / 8)


def use_sparse_encoding(numel: int, nnz: int, bits: int) -> bool:
    """True when bitmask + values is smaller than the dense encoding."""
    return sparse_encoding_bytes(numel, nnz, bits) < dense_encoding_bytes(numel, bits)


def encoded_bytes(
    numel: int, nnz: int, bits: int, num_scales: int = 0, scale_bytes: int = SCALE_BYTES
) -> int:
    """Bytes of one tensor in its cheaper encoding, with its scales."""
    body = min(dense_encoding_bytes(numel, bits), sparse_encoding_bytes(numel, nnz, bits))
    return body + num_scales * scale_bytes


def float_bits(tensor: torch.Tensor) -> int:
    """Bits a float32 tensor is stored with: 16 when every value is exact in float16 (the codec
    then stores it as float16, losslessly), else 32. Checked a chunk at a time, stopping at the
    first chunk that is not: the whole-tensor round trip made a float16 and a float32 copy of
    the tensor (3.8 GB for a 10M x 64 table, at the end of every run)."""
    t = tensor.detach()
    if t.dtype != torch.float32:
        return 32
    for chunk in t.reshape(-1).split(ops.CHUNK):
        if not torch.equal(chunk.half().float(), chunk):
            return 32
    return 16


@dataclass
class LayerStats:
    """Size of one module's own parameters (weights, factors, biases)."""

    name: str
    group: str
    params: int
    nnz: int
    rank: int | None
    bits: int
    dense_bytes: int
    compressed_bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.params if self.params else 0.0


def _quantisation(module: nn.Module) -> tuple[int, int, int]:
    """(bits, number of scales, bytes per scale) a quantisation method recorded on ``module``
    (32, 0, 4 if none)."""
    bits = getattr(module, "rcz_bits", 32)
    num_scales = getattr(module, "rcz_num_scales", 0) if bits < 32 else 0
    return bits, num_scales, getattr(module, "rcz_scale_bytes", SCALE_BYTES)


def _own_sizes(module: nn.Module) -> tuple[int, int, int]:
    """(numel, non-zeros, compressed bytes) of ``module``'s own parameters: a quantised module's
    weight with its bits and scales, every other parameter in float (16 bits when exact)."""
    bits, num_scales, scale_bytes = _quantisation(module)
    numel = nnz = compressed = 0
    for param_name, param in module.named_parameters(recurse=False):
        quantised = bits < 32 and param_name.endswith("weight")
        count = int(torch.count_nonzero(param.detach()))
        numel, nnz = numel + param.numel(), nnz + count
        compressed += encoded_bytes(
            param.numel(),
            count,
            bits if quantised else float_bits(param),
            num_scales if quantised else 0,
            scale_bytes,
        )
    return numel, nnz, compressed


def _is_factorised(module: nn.Module) -> bool:
    return hasattr(module, "factors") and hasattr(module, "rank")


def layer_stats(model: nn.Module) -> list[LayerStats]:
    """Stats of every module that owns parameters, in ``named_modules`` order.

    A factorised (low-rank) module is one layer (``rank`` set, group ``lowrank``): it sums its
    factor modules, each counted with its own quantisation (QAT after SVD quantises the factors),
    and the factors are not reported again; its ``bits`` are the widest of its factors'.
    Quantised modules carry ``rcz_bits`` and ``rcz_num_scales`` (set by the QAT callback) and
    store only their weight quantised.
    """
    stats = []
    factorised: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{f}.") or not f for f in factorised):
            continue  # a factor: counted by its factorised layer
        if _is_factorised(module):
            factorised.append(name)
            parts = [m for m in module.modules() if any(True for _ in m.parameters(False))]
            rank: int | None = int(module.rank)
            bits = max(_quantisation(m)[0] for m in parts) if parts else 32
        else:
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            parts, rank, bits = [module], None, _quantisation(module)[0]
        sizes = [_own_sizes(m) for m in parts]
        numel = sum(s[0] for s in sizes)
        stats.append(
            LayerStats(
                name=name or "(root)",
                group=module_group(module)
                or getattr(module, "rcz_group", None)  # integer modules after QAT convert
                or ("lowrank" if rank is not None else "other"),
                params=numel,
                nnz=sum(s[1] for s in sizes),
                rank=rank,
                bits=bits,
                dense_bytes=4 * numel,
                compressed_bytes=sum(s[2] for s in sizes),
            )
        )
    return stats


def size_summary(model: nn.Module, dense_reference_bytes: int | None = None) -> dict[str, Any]:
    """Totals over :func:`layer_stats`, and the ratio to the uncompressed model's fp32 bytes."""
    stats = layer_stats(model)
    params = sum(s.params for s in stats)
    nnz = sum(s.nnz for s in stats)
    dense = sum(s.dense_bytes for s in stats)
    compressed = sum(s.compressed_bytes for s in stats)
    reference = dense_reference_bytes or dense
    return {
        "params": params,
        "nnz": nnz,
        "sparsity": 1.0 - nnz / params if params else 0.0,
        "dense_bytes": dense,
        "compressed_bytes": compressed,
        "compression_ratio": compressed / reference if reference else 1.0,
        "layers": [asdict(s) | {"sparsity": s.sparsity} for s in stats],
    }


class SizeLogger(L.Callback):
    """Logs global sparsity, compressed bytes and compression ratio of the model every epoch."""

    def __init__(self) -> None:
        self.dense_reference_bytes: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dense_reference_bytes is None:
            self.dense_reference_bytes = size_summary(pl_module)["dense_bytes"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = size_summary(pl_module, self.dense_reference_bytes)
        for key in ("sparsity", "compressed_bytes", "compression_ratio"):
            pl_module.log(f"compression/{key}", float(summary[key]))

    def state_dict(self) -> dict[str, Any]:
        return {"dense_reference_bytes": self.dense_reference_bytes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dense_reference_bytes = state_dict["dense_reference_bytes"]
