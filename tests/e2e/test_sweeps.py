"""Multiruns: experiment / debug / hparams_search configs, launchers and Optuna sweeps.

The sweeps run ``python -m recsys_compress.train -m ...`` as a user would, on tiny synthetic data
for one epoch, with every output under ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir

from recsys_compress.config import to_train_config
from recsys_compress.train import train
from tests.conftest import CONF_DIR, REPO

TINY = [
    "data=synthetic",
    "trainer.max_epochs=1",
    "compression.dense_epochs=0",
    "trainer.progress_bar=false",
    "trainer.batch_size=512",
    "logger=none",
    "save_model=false",
]
GRID_METHODS = sorted(p.stem for p in (CONF_DIR / "experiment" / "grid_method").glob("*.yaml"))


def compose_raw(overrides: list[str], hydra: bool = False) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def multirun(args: list[str], sweep_dir: Path | str, env: dict[str, str]) -> subprocess.Popen:
    """Start ``train -m`` (a Popen, so several can run at once); see :func:`finish`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recsys_compress.train",
            "-m",
            f"hydra.sweep.dir={sweep_dir}",
            *args,
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return output


def run_multirun(args: list[str], sweep_dir: Path, tmp_path: Path) -> str:
    cache = {"RECSYS_COMPRESS_CACHE": str(tmp_path / "cache")}
    return finish(multirun(args, sweep_dir, cache))


def results(sweep_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
    assert all(r["status"] == "completed" for r in records), records
    return records


@pytest.mark.parametrize("method", GRID_METHODS)
def test_compress_grid_presets_compose(method: str) -> None:
    raw = compose_raw(["experiment=compress_grid", f"experiment/grid_method@grid_method={method}"])
    cfg = to_train_config(raw)
    assert cfg.data.source == "ml100k" and cfg.compression.dense_epochs > 0
    expected = {
        "none": [],
        "int8": ["qat"],
        "int4": ["qat"],
        "svd50": ["svd"],
        "svd25": ["svd"],
        "prune80": ["prune"],
        "prune90": ["prune"],
        "prune80_int8": ["prune", "qat"],
        "prune90_int8": ["prune", "qat"],
    }[method]
    assert cfg.compression.methods() == expected
    if "int" in method:
        assert cfg.compression.qat.bits == int(method[-1])
    if method.startswith("prune"):
        assert cfg.compression.prune.sparsity == int(method[5:7]) / 100
    if method.startswith("svd"):
        assert cfg.compression.svd.param_ratio == int(method[3:]) / 100


def test_compress_grid_sweeps_models_methods_and_seeds_with_joblib() -> None:
    raw = compose_raw(["experiment=compress_grid"], hydra=True)
    params = raw.hydra.sweeper.params
    assert params["model"] == "mf,neumf" and params["seed"] == "0,1"
    methods = params["experiment/grid_method@grid_method"].split(",")
    assert sorted(methods) == GRID_METHODS
    assert "JoblibLauncher" in raw.hydra.launcher._target_


@pytest.mark.parametrize(
    ("dim", "mlp_dim", "layers"), [(8, 32, [32, 16, 8]), (64, 256, [256, 128, 64])]
)
def test_ncf_paper_tower_follows_the_predictive_factors(
    dim: int, mlp_dim: int, layers: list[int]
) -> None:
    cfg = to_train_config(compose_raw(["experiment=ncf_paper", f"model.dim={dim}"]))
    assert (cfg.model.name, cfg.model.dim, cfg.model.mlp_dim) == ("neumf", dim, mlp_dim)
    assert cfg.model.mlp_layers == layers
    assert (cfg.data.source, cfg.split.name, cfg.eval.protocol) == ("ml1m", "loo", "sampled")
    assert (cfg.eval.num_negatives, cfg.loss.num_negatives) == (99, 4)
    assert (cfg.optim.name, cfg.optim.lr, cfg.trainer.batch_size) == ("adam", 0.001, 256)
    assert cfg.compression.methods() == []
    gmf = to_train_config(compose_raw(["experiment=ncf_paper", "model=gmf", "data=ml100k"]))
    assert (gmf.model.name, gmf.model.dim, gmf.data.source) == ("gmf", 8, "ml100k")


def test_rendle2020_lr_is_per_example_rate_times_batch() -> None:
    cfg = to_train_config(compose_raw(["experiment=rendle2020", "trainer.batch_size=256"]))
    assert (cfg.model.name, cfg.model.use_bias, cfg.loss.name) == ("mf", True, "bce")
    assert (cfg.optim.name, cfg.loss.num_negatives) == ("sgd", 8)
    assert cfg.optim.lr == pytest.approx(0.002 * 256)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "slurm"])
def test_launchers_compose(launcher: str) -> None:
    raw = compose_raw([f"hydra/launcher={launcher}"], hydra=True)
    assert raw.hydra.launcher._target_.endswith(
        {"joblib": "JoblibLauncher", "submitit_local": "LocalLauncher", "slurm": "SlurmLauncher"}[
            launcher
        ]
    )
    if launcher == "slurm":
        assert raw.hydra.launcher.partition is None and raw.hydra.launcher.gpus_per_node == 1


def test_launchers_run_a_2x2_grid_in_parallel_in_distinct_dirs(tmp_path: Path) -> None:
    """Two multiruns at once under a sweep dir name without a timestamp (as if both started in
    the same second): joblib runs a 2 x 2 grid two jobs at a time, submitit_local one job. The
    random suffix keeps the sweeps apart; each job has its own subdir and results.json."""
    env = {"RECSYS_COMPRESS_CACHE": str(tmp_path / "cache")}
    sweep = str(tmp_path / "same_${rcz_uid:}")
    base = [*TINY, "compression=none", "trainer.max_epochs=3"]
    # 30 epochs: jobs long enough (~3-5 s) that the two workers' 1-2 s start-up skew cannot
    # make every pair of parallel jobs look sequential
    joblib = [
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        "model.dim=4,8",
        "trainer.max_epochs=30",
    ]
    submitit = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "seed=3"]
    for process in [multirun(base + joblib, sweep, env), multirun(base + submitit, sweep, env)]:
        finish(process)
    sweeps = {len(list(d.glob("*/results.json"))): d for d in tmp_path.glob("same_*")}
    assert sorted(sweeps) == [1, 4], sweeps

    grid = sweeps[4]
    records = results(grid)
    assert sorted((r["seed"], r["config"]["model"]["dim"]) for r in records) == [
        (0, 4),
        (0, 8),
        (1, 4),
        (1, 8),
    ]
    assert sorted(Path(r["run_dir"]).name for r in records) == ["0", "1", "2", "3"]
    assert {Path(r["run_dir"]).parent for r in records} == {grid}
    spans = []
    for path in sorted(grid.glob("*/results.json")):
        finished = path.stat().st_mtime
        spans.append((finished - json.loads(path.read_text())["total_seconds"], finished))
    # Two workers: some pair of jobs ran at the same time (one after another, none would).
    overlapping = [
        (i, j)
        for i, (start_a, end_a) in enumerate(spans)
        for j, (start_b, end_b) in enumerate(spans[i + 1 :], i + 1)
        if start_a < end_b and start_b < end_a
    ]
    assert overlapping, f"joblib ran the jobs one after another: {spans}"

    single = sweeps[1]
    assert results(single)[0]["seed"] == 3 and (single / ".submitit").is_dir()


def test_optuna_single_objective_reports_best_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "hparams_search=mf_optuna", "hydra.sweeper.n_trials=3"]
    run_multirun(args, sweep_dir, tmp_path)
    records = results(sweep_dir)
    assert len(records) == 3
    assert {r["config"]["model"]["dim"] for r in records} <= {16, 32, 64, 128}
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(r["val"]["ndcg@10"] for r in records))
    assert set(best["best_params"]) == {"optim.lr", "model.dim", "optim.embedding_weight_decay"}


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(bytes, ndcg): ``a`` is no larger and no worse than ``b``, and better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and a != b


def test_optuna_multi_objective_writes_the_pareto_front(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "hparams_search=compress_pareto", "hydra.sweeper.n_trials=4"]
    run_multirun(args, sweep_dir, tmp_path)
    records = results(sweep_dir)
    assert len(records) == 4
    trials = [(r["compression"]["artifact_bytes"], r["val"]["ndcg@10"]) for r in records]
    front = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["solutions"]
    front_values = [tuple(s["values"]) for s in front]
    non_dominated = [t for t in trials if not any(dominates(o, t) for o in trials)]
    assert sorted(front_values) == sorted(non_dominated)
    for solution in front:
        match = [
            r
            for r in records
            if r["config"]["model"]["dim"] == solution["params"]["model.dim"]
            and r["config"]["compression"]["qat"]["bits"]
            == solution["params"]["compression.qat.bits"]
        ]
        assert any(
            r["compression"]["artifact_bytes"] == solution["values"][0]
            and r["config"]["compression"]["prune"]["sparsity"]
            == pytest.approx(solution["params"]["compression.prune.sparsity"])
            for r in match
        )


def debug_config(name: str, extra: list[str]) -> Any:
    raw = compose_raw([f"debug={name}", "data=synthetic", "logger=csv", "save_model=false", *extra])
    return to_train_config(raw)


def test_debug_fast_dev_run_runs_one_batch_per_stage(tmp_path: Path) -> None:
    cfg = debug_config("fast_dev_run", [])
    assert cfg.trainer.fast_dev_run == 1 and cfg.compression.methods() == ["prune", "qat"]
    record = train(cfg, tmp_path)
    assert record["status"] == "completed" and record["epochs_trained"] == 1
    assert "dense" in record  # both stages ran
    assert not (tmp_path / "metrics.csv").exists()  # fast_dev_run logs nothing


def test_debug_overfit_drives_the_training_loss_down(tmp_path: Path) -> None:
    cfg = debug_config("overfit", ["trainer.max_epochs=15", "trainer.overfit_batches=2"])
    assert cfg.compression.methods() == [] and cfg.trainer.early_stopping_patience is None
    record = train(cfg, tmp_path)
    assert record["epochs_trained"] == 15
    with (tmp_path / "metrics.csv").open() as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert len(losses) == 15 and losses[-1] < 0.8 * losses[0]


def test_debug_profiler_writes_reports_into_the_run_dir(tmp_path: Path) -> None:
    cfg = debug_config("profiler", ["trainer.max_epochs=1", "compression=qat"])
    train(cfg, tmp_path)
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "QuantizationAwareTraining" in report
