"""Size accounting: encodings, per-layer stats and totals."""

from __future__ import annotations

import torch
from torch import nn

from recsys_compress.compression.accounting import encoded_bytes, layer_stats, size_summary
from recsys_compress.models import MF


def test_encoding_picks_the_cheaper_of_dense_and_bitmask() -> None:
    assert encoded_bytes(1000, 1000, 32) == 4000  # dense
    assert encoded_bytes(1000, 200, 32) == 125 + 800  # bitmask + 200 fp32 values
    assert encoded_bytes(1000, 200, 8, num_scales=10) == 125 + 200 + 40
    assert encoded_bytes(1000, 1000, 4) == 500
    assert encoded_bytes(1001, 1001, 4) == 501  # int4 rounds up to whole bytes


def test_mf_stats_count_sparsity_and_bits() -> None:
    model = MF(10, 20, 8)
    with torch.no_grad():
        model.item_embedding.weight[:, :6] = 0.0  # 75% zeros
    stats = {s.name: s for s in layer_stats(model)}
    item = stats["item_embedding"]
    assert (item.params, item.nnz, item.dense_bytes) == (160, 40, 640)
    assert item.compressed_bytes == 20 + 40 * 4
    assert stats["user_embedding"].compressed_bytes == 320
    assert stats["(root)"].params == 1  # the global bias
    model.user_embedding.rcz_bits, model.user_embedding.rcz_num_scales = 8, 10
    summary = size_summary(model, dense_reference_bytes=1000)
    user = next(s for s in summary["layers"] if s["name"] == "user_embedding")
    assert user["compressed_bytes"] == 80 + 10 * 4
    assert summary["params"] == 10 * 8 + 20 * 8 + 10 + 20 + 1
    assert summary["compression_ratio"] == summary["compressed_bytes"] / 1000


def test_linear_bias_stays_fp32_when_weight_is_quantised() -> None:
    layer = nn.Linear(16, 4)
    layer.rcz_bits, layer.rcz_num_scales = 8, 4
    (stats,) = layer_stats(layer)
    assert stats.compressed_bytes == 64 + 4 * 4 + 4 * 4


def test_float_bits_checks_every_chunk(monkeypatch) -> None:
    """16 bits only when every value round-trips through float16, in any chunk (the check runs a
    chunk at a time); 32 for other dtypes."""
    from recsys_compress import ops
    from recsys_compress.compression.accounting import float_bits

    monkeypatch.setattr(ops, "CHUNK", 10)
    exact = torch.arange(95, dtype=torch.float32).view(19, 5) / 4  # exact in float16
    assert float_bits(exact) == 16
    inexact = exact.clone()
    inexact[-1, -1] = 1.0 + 2.0**-20  # last chunk only: not a float16
    assert float_bits(inexact) == 32
    assert float_bits(exact.double()) == 32 and float_bits(exact.T) == 16
