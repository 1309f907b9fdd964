"""to_train_config: unknown keys, wrong types and every range check name the offending key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from recsys_compress.config import (
    DataConfig,
    EvalConfig,
    TrainConfig,
    config_to_dict,
    to_train_config,
)
from recsys_compress.errors import ConfigError


def test_defaults_and_overrides():
    cfg = to_train_config({})
    assert isinstance(cfg, TrainConfig)
    assert cfg == TrainConfig()
    cfg = to_train_config(
        OmegaConf.create(
            {
                "model": {"name": "neumf", "dim": 16, "mlp_layers": [32, 8]},
                "eval": {"ks": [1, 10], "protocol": "sampled"},
                "data": {"source": "csv", "path": "/x.csv", "rating_threshold": 4},
                "trainer": {"devices": [0, 1]},
            }
        )
    )
    assert isinstance(cfg.model.mlp_layers, list)
    assert (cfg.model.name, cfg.model.dim, cfg.model.mlp_layers) == ("neumf", 16, [32, 8])
    assert cfg.eval.ks == [1, 10] and cfg.eval.protocol == "sampled"
    assert cfg.data.rating_threshold == 4.0 and isinstance(cfg.data.rating_threshold, float)
    assert cfg.trainer.devices == [0, 1]
    assert config_to_dict(cfg)["model"]["dim"] == 16
    # numeric strings are converted, as on the Hydra command line
    assert to_train_config({"model": {"dim": "32"}}).model.dim == 32


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"model": {"hidden": 3}}, "model.hidden"),
        ({"data": {"synthetic": {"users": 3}}}, "data.synthetic.users"),
    ],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=rf"invalid config at '{key}'"):
        to_train_config(override)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"model": {"dim": "abc"}}, "model.dim"),
        ({"trainer": {"max_epochs": 2.5}}, "trainer.max_epochs"),
        ({"data": {"use_cache": "maybe"}}, "data.use_cache"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"eval": {"ks": ["ten"]}}, "eval.ks"),
        ({"model": {"mlp_layers": 8}}, "model.mlp_layers"),
    ],
)
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match="invalid config") as info:
        to_train_config(override)
    assert key in str(info.value)


BAD_VALUES = [
    # data.synthetic
    ({"data": {"synthetic": {"num_users": 0}}}, "data.synthetic.num_users"),
    ({"data": {"synthetic": {"num_items": 1}}}, "data.synthetic.num_items"),
    ({"data": {"synthetic": {"interactions_per_user": 0}}}, "data.synthetic.interactions_per_user"),
    (
        {"data": {"synthetic": {"num_items": 10, "interactions_per_user": 10}}},
        "data.synthetic.interactions_per_user",
    ),
    # data
    ({"data": {"source": "netflix"}}, "data.source"),
    ({"data": {"feedback": "both"}}, "data.feedback"),
    ({"data": {"format": "xlsx"}}, "data.format"),
    # compression (true from the command line arrives as the string "True")
    ({"compression": {"l1": {"kernel": True}}}, "compression.l1.kernel"),
    ({"compression": {"l1": {"kernel": "fused"}}}, "compression.l1.kernel"),
    ({"data": {"min_user_interactions": -1}}, "data.min_user_interactions"),
    ({"data": {"min_item_interactions": -2}}, "data.min_item_interactions"),
    ({"data": {"connect_timeout": 0.0}}, "data.connect_timeout"),
    ({"data": {"source": "csv"}}, "data.path"),
    ({"data": {"source": "csv", "path": ""}}, "data.path"),
    # split
    ({"split": {"name": "kfold"}}, "split.name"),
    ({"split": {"ratios": [0.8, 0.2]}}, "split.ratios"),
    ({"split": {"ratios": [0.9, 0.2, -0.1]}}, "split.ratios"),
    ({"split": {"ratios": [0.0, 0.0, 0.0]}}, "split.ratios"),
    ({"split": {"ratios": [0.9, 0.0, 0.1]}}, "split.ratios"),
    # model
    ({"model": {"name": "transformer"}}, "model.name"),
    ({"model": {"dim": 0}}, "model.dim"),
    ({"model": {"mlp_dim": 0}}, "model.mlp_dim"),
    ({"model": {"name": "mlp", "mlp_layers": []}}, "model.mlp_layers"),
    ({"model": {"name": "neumf", "mlp_layers": []}}, "model.mlp_layers"),
    ({"model": {"mlp_layers": [8, 0]}}, "model.mlp_layers"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"model": {"dropout": -0.1}}, "model.dropout"),
    ({"model": {"init_std": -0.01}}, "model.init_std"),
    ({"model": {"alpha": 1.5}}, "model.alpha"),
    ({"model": {"alpha": -0.5}}, "model.alpha"),
    ({"model": {"name": "neumf", "pretrained_gmf": "/g"}}, "model.pretrained_mlp"),
    ({"model": {"name": "neumf", "pretrained_mlp": "/m"}}, "model.pretrained_gmf"),
    ({"model": {"name": "gmf", "pretrained_gmf": "/g", "pretrained_mlp": "/m"}}, "model=neumf"),
    # loss
    ({"loss": {"name": "hinge"}}, "loss.name"),
    ({"loss": {"num_negatives": 0}}, "loss.num_negatives"),
    ({"loss": {"name": "bpr", "num_negatives": -3}}, "loss.num_negatives"),
    # eval
    ({"eval": {"protocol": "leave_one_out"}}, "eval.protocol"),
    ({"eval": {"ks": []}}, "eval.ks"),
    ({"eval": {"ks": [5, 0]}}, "eval.ks"),
    ({"eval": {"ks": [-10]}}, "eval.ks"),
    ({"eval": {"num_negatives": 0}}, "eval.num_negatives"),
    ({"eval": {"batch_users": 0}}, "eval.batch_users"),
    # optim
    ({"optim": {"name": "lbfgs"}}, "optim.name"),
    ({"optim": {"scheduler": "plateau"}}, "optim.scheduler"),
    ({"optim": {"lr": 0.0}}, "optim.lr"),
    ({"optim": {"lr": -1e-3}}, "optim.lr"),
    ({"optim": {"weight_decay": -1e-4}}, "optim.weight_decay"),
    ({"optim": {"embedding_weight_decay": -1.0}}, "optim.embedding_weight_decay"),
    ({"optim": {"momentum": -0.9}}, "optim.momentum"),
    ({"optim": {"step_size": 0}}, "optim.step_size"),
    ({"optim": {"gamma": 1.5}}, "optim.gamma"),
    # trainer
    ({"trainer": {"max_epochs": 0}}, "trainer.max_epochs"),
    ({"trainer": {"batch_size": 0}}, "trainer.batch_size"),
    ({"trainer": {"early_stopping_patience": 0}}, "trainer.early_stopping_patience"),
    ({"trainer": {"check_val_every_n_epoch": 0}}, "trainer.check_val_every_n_epoch"),
    ({"trainer": {"progress_refresh_rate": 0}}, "trainer.progress_refresh_rate"),
    # logger
    ({"logger": {"name": "tensorboard"}}, "logger.name"),
    # combinations
    ({"loss": {"name": "mse"}}, "data.feedback=explicit"),
    ({"data": {"feedback": "explicit"}, "loss": {"name": "bce"}}, "loss=mse"),
    ({"data": {"feedback": "explicit"}, "loss": {"name": "bpr"}}, "loss=mse"),
    (
        {"data": {"feedback": "explicit", "source": "synthetic"}, "loss": {"name": "mse"}},
        "data.feedback=implicit",
    ),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        to_train_config(override)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        {"loss": {"name": "mse", "num_negatives": 0}, "data": {"feedback": "explicit"}},
        {"trainer": {"early_stopping_patience": None}},
        {"model": {"dropout": 0.0, "alpha": 0.0, "init_std": 0.0}},
        {"model": {"name": "neumf", "pretrained_gmf": "/g", "pretrained_mlp": "/m", "alpha": 1}},
        {"model": {"name": "mf", "mlp_layers": []}},  # unused by MF
        {"split": {"ratios": [8, 1, 1]}},
        {"optim": {"gamma": 1.0, "momentum": 0.0}},
        {"data": {"min_user_interactions": 0, "connect_timeout": 0.1}},
        {"data": {"synthetic": {"num_items": 2, "interactions_per_user": 1, "num_users": 1}}},
    ],
)
def test_boundary_values_are_accepted(override):
    to_train_config(override)


def test_dataclasses_validate_directly():
    with pytest.raises(ConfigError, match=r"data\.min_user_interactions"):
        DataConfig(min_user_interactions=-1)
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        EvalConfig(ks=[0])


@pytest.mark.parametrize(
    ("ks", "monitor", "explicit", "expected"),
    [
        ([5, 10, 20], "auto", False, ("ndcg@10", "max")),
        ([5, 20], "auto", False, ("ndcg@5", "max")),
        ([5, 10], "auto", True, ("rmse", "min")),
        ([5, 10], "hr@5", False, ("hr@5", "max")),
        ([5, 10], "mae", True, ("mae", "min")),
    ],
)
def test_monitor_key(ks, monitor, explicit, expected):
    assert EvalConfig(ks=ks, monitor=monitor).monitor_key(explicit) == expected


# Values that to_train_config accepts although they cannot work. The module docstring promises
# that a value out of range fails before any data is read; these fail only later (after the data
# is loaded and split) or with an error that names no key.
UNCHECKED = [
    ({"eval": {"metrics": ["hr", "bogus"]}}, "eval.metrics"),
    ({"eval": {"ks": [10, 10]}}, "eval.ks"),
    ({"eval": {"ks": [5, 10], "monitor": "ndcg@20"}}, "eval.monitor"),
    ({"split": {"name": "ratio", "seed": -1}}, "split.seed"),
]


@pytest.mark.parametrize(("override", "key"), UNCHECKED, ids=[k for _, k in UNCHECKED])
def test_unchecked_values_fail_at_config_time(override, key):
    with pytest.raises(ConfigError) as info:
        to_train_config(override)
    assert key in str(info.value)
