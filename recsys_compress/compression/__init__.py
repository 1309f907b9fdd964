"""Compression methods as Lightning callbacks that act on nn.Embedding / nn.Linear modules.

Order is fixed: prune -> l1 -> svd -> qat; :func:`build_callbacks` returns them in that order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L

from recsys_compress.compression.accounting import SizeLogger
from recsys_compress.compression.lowrank import SVDLowRank
from recsys_compress.compression.pruning import MagnitudePruning
from recsys_compress.compression.qat import QuantizationAwareTraining
from recsys_compress.compression.sparsity import L1Proximal

if TYPE_CHECKING:
    from recsys_compress.config import CompressionConfig


def build_callbacks(cfg: CompressionConfig) -> list[L.Callback]:
    """The callbacks of the configured methods, in pipeline order, plus the size logger."""
    callbacks: list[L.Callback] = []
    if cfg.prune is not None:
        callbacks.append(MagnitudePruning(cfg.prune))
    if cfg.l1 is not None:
        callbacks.append(L1Proximal(cfg.l1))
    if cfg.svd is not None:
        callbacks.append(SVDLowRank(cfg.svd))
    if cfg.qat is not None:
        callbacks.append(QuantizationAwareTraining(cfg.qat))
    if callbacks:
        callbacks.append(SizeLogger())
    return callbacks
