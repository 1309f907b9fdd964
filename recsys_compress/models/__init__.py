"""Recommender models and the factory that builds one from ``ModelConfig``."""

from __future__ import annotations

from pathlib import Path

import torch

from recsys_compress.config import ModelConfig
from recsys_compress.errors import ConfigError
from recsys_compress.models.base import Recommender
from recsys_compress.models.mf import MF
from recsys_compress.models.ncf import GMF, MLP, NeuMF

__all__ = ["GMF", "MF", "MLP", "NeuMF", "Recommender", "build_model", "load_model_weights"]


def load_model_weights(model: Recommender, path: str | Path, key: str) -> None:
    """Load a ``model.pt`` state dict (``weights_only``) into ``model``; a run dir also works.

    A file of another architecture or size raises :class:`ConfigError` naming ``key``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist: give the model.pt (or run dir) of a run.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ConfigError(
            f"{key}={path} does not fit a {type(model).__name__} of this config ({first}): "
            "pass a checkpoint trained with the same model.dim / mlp_dim / mlp_layers and data."
        ) from None


def build_model(cfg: ModelConfig, num_users: int, num_items: int) -> Recommender:
    """The model named by ``cfg.name``; NeuMF is pre-trained from GMF and MLP runs if configured."""
    mlp_dim = cfg.mlp_dim or cfg.dim
    if cfg.name == "mf":
        return MF(num_users, num_items, cfg.dim, cfg.use_bias, cfg.init_std)
    if cfg.name == "gmf":
        return GMF(num_users, num_items, cfg.dim, cfg.init_std)
    if cfg.name == "mlp":
        return MLP(num_users, num_items, mlp_dim, cfg.mlp_layers, cfg.dropout, cfg.init_std)
    model = NeuMF(num_users, num_items, cfg.dim, mlp_dim, cfg.mlp_layers, cfg.dropout, cfg.init_std)
    if cfg.pretrained_gmf and cfg.pretrained_mlp:
        gmf = GMF(num_users, num_items, cfg.dim)
        mlp = MLP(num_users, num_items, mlp_dim, cfg.mlp_layers, cfg.dropout)
        load_model_weights(gmf, cfg.pretrained_gmf, "model.pretrained_gmf")
        load_model_weights(mlp, cfg.pretrained_mlp, "model.pretrained_mlp")
        model.load_pretrained(gmf, mlp, cfg.alpha)
    return model
