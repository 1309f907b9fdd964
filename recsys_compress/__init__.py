"""recsys-compress: train, compress and evaluate recommender models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsys_compress.export import CompressedRecommender

__all__ = ["load_compressed"]


def load_compressed(path: Any) -> CompressedRecommender:
    """Load a compressed artifact (see :func:`recsys_compress.export.load_compressed`)."""
    from recsys_compress.export import load_compressed as _load

    return _load(path)
