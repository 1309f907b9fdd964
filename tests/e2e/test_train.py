"""End-to-end runs: Hydra composition, training, testing and the results record."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

import recsys_compress.train as train_py
from recsys_compress.config import TrainConfig, to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.errors import ConfigError
from recsys_compress.metrics import SampledRankingMetrics
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule
from recsys_compress.train import train
from tests.conftest import CONF_DIR, REPO

FAST = [
    "compression=none",
    "compression.dense_epochs=0",
    "data=synthetic",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "trainer.batch_size=512",
]


def compose_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose("train", overrides=overrides))


def config_groups() -> list[str]:
    overrides = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            overrides.append(f"{group.name}={option.stem}")
    return overrides


@pytest.mark.parametrize("override", config_groups())
def test_every_config_option_composes_and_validates(override: str) -> None:
    extra = ["data.path=/some/file.csv"] if override == "data=csv" else []
    if override == "loss=mse":
        extra = ["data.feedback=explicit"]
    cfg = compose_config([override, *extra])
    group, option = override.split("=")
    if group == "model":
        assert cfg.model.name == option
    if group == "split":
        assert cfg.split.name == option
    if group == "loss":
        assert cfg.loss.name == option


def test_default_config_is_mf_on_ml100k_pruned_then_int8() -> None:
    cfg = compose_config([])
    assert cfg.compression.methods() == ["prune", "qat"]
    assert cfg.compression.dense_epochs > 0
    assert cfg.compression.prune.sparsity == 0.8 and cfg.compression.qat.bits == 8
    assert (cfg.model.name, cfg.data.source, cfg.loss.name, cfg.eval.protocol) == (
        "mf",
        "ml100k",
        "bce",
        "full",
    )
    assert cfg.loss.num_negatives == 4 and cfg.trainer.batch_size == 4096


class SpoilLastEpoch(L.Callback):
    """Negates the item vectors and biases as the second epoch starts: its ranking turns upside
    down, so the best checkpoint is the first epoch's and the last weights are not the best."""

    @torch.no_grad()
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.model.item_embedding.weight.neg_()
            pl_module.model.item_bias.weight.neg_()


def test_validation_and_test_metrics_come_from_the_best_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_trainer = train_py.build_trainer
    monkeypatch.setattr(
        train_py,
        "build_trainer",
        lambda cfg, run_dir, callbacks: build_trainer(cfg, run_dir, [*callbacks, SpoilLastEpoch()]),
    )
    cfg = compose_config([*FAST, "model.dim=16", "logger=csv"])
    record = train(cfg, tmp_path)
    assert record["best_epoch"] == 0 and record["epochs_trained"] == 2
    checkpoints = tmp_path / "checkpoints"
    best_checkpoint = torch.load(checkpoints / "best.ckpt", weights_only=True)
    best = best_checkpoint["state_dict"]
    last_checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)
    # written at the end of the epoch that did not improve (Lightning 2.6 alone skips it)
    assert last_checkpoint["epoch"] == 1
    assert last_checkpoint["global_step"] == 2 * best_checkpoint["global_step"]
    last = last_checkpoint["state_dict"]
    # test: a fresh module and trainer on the best checkpoint give the record's metrics
    dm = train_py.build_datamodule(cfg)
    model = build_model(cfg.model, dm.num_users, dm.num_items)
    module = RecommenderModule(model, cfg.loss, cfg.optim, cfg.eval)
    trainer = build_trainer(cfg, tmp_path / "again", [])
    trainer.test(module, datamodule=dm, ckpt_path=checkpoints / "best.ckpt", verbose=False)
    fresh = train_py._metrics(trainer, "test")
    assert fresh == pytest.approx(record["test"], abs=1e-6)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    # the module was tested, then saved, with the best weights
    assert all(torch.equal(saved[k], best[f"model.{k}"]) for k in saved)
    assert not torch.equal(saved["item_embedding.weight"], last["model.item_embedding.weight"])
    # validation: the first epoch's logged metrics again
    logged = pd.read_csv(tmp_path / "metrics.csv")
    epoch0 = logged[logged["epoch"] == 0].dropna(subset=["val/ndcg@10"]).iloc[0]
    epoch1 = logged[logged["epoch"] == 1].dropna(subset=["val/ndcg@10"]).iloc[0]
    assert record["val"]["ndcg@10"] == pytest.approx(epoch0["val/ndcg@10"], abs=1e-6)
    assert epoch1["val/ndcg@10"] < 0.8 * epoch0["val/ndcg@10"]


def test_train_mf_writes_complete_results(tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "model.dim=16"])
    record = train(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["test"] == pytest.approx(record["test"])
    assert on_disk["status"] == "completed"
    assert on_disk["config"]["model"]["dim"] == 16
    users, items = on_disk["data"]["num_users"], on_disk["data"]["num_items"]
    assert (users, items) == (300, 200)
    # MF with biases: (users + items) * (dim + 1) + global bias
    assert on_disk["num_params"] == (users + items) * 17 + 1
    assert on_disk["dense_bytes"] == on_disk["num_params"] * 4
    assert on_disk["epochs_trained"] == 2 and on_disk["best_epoch"] in (0, 1)
    for part in ("val", "test"):
        for metric in ("hr", "recall", "precision", "ndcg", "mrr", "map"):
            for k in (5, 10, 20):
                assert 0.0 <= on_disk[part][f"{metric}@{k}"] <= 1.0
    assert on_disk["seconds_per_epoch"] > 0 and on_disk["eval_seconds"] > 0
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["seed"] == 42
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "metrics.csv").is_file()
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["user_embedding.weight"].shape == (300, 16)


def popularity_hr10(cfg: TrainConfig) -> float:
    """HR@10 of ranking the sampled test candidates by training popularity."""
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed)
    dm.setup()
    assert dm.interactions is not None and dm.split is not None
    counts = torch.bincount(dm.interactions.items[dm.split.train], minlength=dm.num_items)
    metric = SampledRankingMetrics(ks=[10])
    for batch in dm.test_data.batches:
        scores = counts[batch["candidates"]].float()
        metric.update(scores[:, 0], scores[:, 1:])
    return float(metric.compute()["hr@10"])


def test_training_beats_popularity_on_structured_data(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "compression=none",
            "data=synthetic",
            "trainer.max_epochs=15",
            "trainer.progress_bar=false",
            "optim.lr=0.01",
            "split=loo",
            "eval=sampled",
        ]
    )
    record = train(cfg, tmp_path)
    assert set(record["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}
    # 99 sampled negatives: random ranking gives HR@10 = 0.10 in expectation.
    assert record["test"]["hr@10"] > popularity_hr10(cfg) + 0.05


@pytest.mark.parametrize("model", ["gmf", "mlp", "neumf"])
def test_each_ncf_model_trains(tmp_path: Path, model: str) -> None:
    record = train(compose_config([*FAST, f"model={model}", "loss=bpr"]), tmp_path)
    assert record["status"] == "completed"
    assert math.isfinite(record["test"]["ndcg@10"])


def test_neumf_pretrained_from_gmf_and_mlp_runs(tmp_path: Path) -> None:
    gmf = train(compose_config([*FAST, "model=gmf", "model.dim=8"]), tmp_path / "gmf")
    mlp = train(compose_config([*FAST, "model=mlp", "model.dim=8"]), tmp_path / "mlp")
    cfg = compose_config(
        [
            *FAST,
            "model=neumf",
            "model.dim=8",
            "model.mlp_dim=8",
            f"model.pretrained_gmf={gmf['run_dir']}",
            f"model.pretrained_mlp={mlp['run_dir']}",
            "trainer.max_epochs=1",
        ]
    )
    record = train(cfg, tmp_path / "neumf")
    assert record["config"]["model"]["pretrained_gmf"] == gmf["run_dir"]
    assert record["test"]["ndcg@10"] > 0


def test_explicit_ratings_from_csv(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    n = 3000
    frame = pd.DataFrame(
        {
            "uid": torch.randint(0, 100, (n,), generator=rng).numpy(),
            "iid": torch.randint(0, 80, (n,), generator=rng).numpy(),
            "stars": torch.randint(1, 6, (n,), generator=rng).numpy().astype(float),
            "ts": torch.arange(n).numpy(),
        }
    )
    path = tmp_path / "ratings.csv"
    frame.to_csv(path, index=False)
    cfg = compose_config(
        [
            *FAST,
            "data=csv",
            f"data.path={path}",
            "data.user_col=uid",
            "data.item_col=iid",
            "data.rating_col=stars",
            "data.timestamp_col=ts",
            "data.feedback=explicit",
            "loss=mse",
            "optim.lr=0.05",
            "trainer.max_epochs=5",
        ]
    )
    record = train(cfg, tmp_path / "run")
    assert record["monitor"] == "val/rmse"
    # Ratings are uniform on 1..5 (std ~1.41): a model that learns the mean is near that.
    assert 0.5 < record["test"]["rmse"] < 2.0
    assert record["test"]["mae"] <= record["test"]["rmse"]


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    first = train(compose_config(FAST), tmp_path / "a")
    second = train(compose_config(FAST), tmp_path / "b")
    assert first["test"] == second["test"]
    third = train(compose_config([*FAST, "seed=7"]), tmp_path / "c")
    assert third["test"] != first["test"]


def test_same_seed_same_metrics_with_dense_stage_and_compression(tmp_path: Path) -> None:
    overrides = [*FAST, "compression=[prune,qat]", "compression.dense_epochs=1"]
    first = train(compose_config(overrides), tmp_path / "a")
    second = train(compose_config(overrides), tmp_path / "b")
    for part in ("val", "test"):
        assert first[part] == second[part]
        assert first["dense"][part] == second["dense"][part]
    assert first["compression"]["artifact_bytes"] == second["compression"]["artifact_bytes"]
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSYS_COMPRESS_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "recsys_compress.train", f"hydra.run.dir={tmp_path}/run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_run_prints_table_and_run_dir(tmp_path: Path) -> None:
    result = run_cli(FAST, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ndcg@10" in result.stdout
    assert f"Run dir: {tmp_path}/run" in result.stdout.replace("\n", "")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"
    # one summary line per epoch in train.log (the progress bar keeps none), metrics.csv's values
    lines = [
        line.split(" - ", 1)[1]
        for line in (tmp_path / "run" / "train.log").read_text().splitlines()
        if " - epoch " in line
    ]
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for epoch, line in enumerate(lines):
        rows = metrics[metrics["epoch"] == epoch]
        for key in ("train/loss", "val/ndcg@10", "val/hr@10"):
            assert f"{key} {rows[key].dropna().iloc[0]:.4f}" in line, (key, line)
    # the same run dir again: refused, the completed run stays as it was ...
    before = (tmp_path / "run" / "results.json").read_bytes()
    again = run_cli(FAST, tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a completed run" in again.stderr and "overwrite=true" in again.stderr
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    # ... unless the user asks for it
    replaced = run_cli([*FAST, "overwrite=true"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert (tmp_path / "run" / "results.json").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=transformer"], "model/transformer"),
        (["data=netflix"], "data/netflix"),
        (["eval.ks=[0,10]"], "eval.ks"),
        (["loss.num_negatives=-1"], "loss.num_negatives"),
        (["data=csv"], "data.path"),
        (["data=csv", "data.path=/nonexistent/x.csv"], "data.path"),
        (["model.dim=abc"], "model.dim"),
        (["data=synthetic", "data.synthetic.interactions_per_user=2", "split=loo"], ""),
    ],
)
def test_cli_bad_input_fails_before_training(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = run_cli(args, tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_post_training_quantization_baseline_trains_nothing(tmp_path: Path) -> None:
    """compression.qat.post_training: the dense stage's model, quantised as is (PTQ)."""
    cfg = compose_config(
        [
            *FAST,
            "compression=qat",
            "compression.dense_epochs=2",
            "compression.qat.post_training=true",
        ]
    )
    record = train(cfg, tmp_path)
    assert record["epochs_trained"] == 0 and record["best_epoch"] is None
    assert record["compression"]["structure"]["quantized"]  # integer modules, no QAT epochs
    dense = torch.load(tmp_path / "dense" / "checkpoints" / "best.ckpt", weights_only=True)
    table = dense["state_dict"]["model.user_embedding.weight"]
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    q, scales = model["user_embedding.qweight"], model["user_embedding.scales"]
    # the integers are the dense table's, rounded on its own per-row float16 scales
    assert torch.equal(scales, scales.half().float())
    assert (q.float() * scales - table).abs().max() <= 0.5 * scales.max() * (1 + 1e-4)
    assert record["test"]["ndcg@10"] == pytest.approx(record["dense"]["test"]["ndcg@10"], abs=0.02)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["compression=[prune,qat]"], r"\['prune'\] train: use compression=qat alone"),
        (["compression=qat", "compression.dense_epochs=0"], "compression.dense_epochs > 0"),
    ],
)
def test_post_training_quantization_refuses_what_cannot_work(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        compose_config([*overrides, "compression.qat.post_training=true"])
