"""Budget mode: hparams_search=budget on tiny synthetic data, its report, and the budget keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from recsys_compress.config import to_train_config
from recsys_compress.errors import ConfigError
from recsys_compress.reporting.budget import (
    INFEASIBLE,
    best_within_budget,
    budget_objective,
    format_report,
    load_trials,
    main,
)
from tests.conftest import CONF_DIR, REPO


def _compose(overrides: list[str]) -> object:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_budget_search_picks_the_best_trial_within_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_compress.train",
            "-m",
            "hparams_search=budget",
            "data=synthetic",
            "trainer.max_epochs=1",
            "compression.dense_epochs=0",
            "trainer.progress_bar=false",
            "trainer.batch_size=512",
            "logger=none",
            "save_model=false",
            "budget_ratio=0.1",
            "hydra.sweeper.n_trials=6",
            "hydra.sweeper.sampler.n_startup_trials=6",  # seeded random trials
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    trials = load_trials([sweep])
    assert len(trials) == 6
    limit = trials[0]["budget"]["limit_bytes"]
    assert limit == int(0.1 * trials[0]["compression"]["uncompressed_fp32_bytes"])

    skipped = [t for t in trials if t["status"] == "over_budget"]
    trained = [t for t in trials if t["status"] == "completed"]
    assert skipped and trained, "the search should hold trials on both sides of the budget"
    for t in skipped:  # predicted over budget: never trained
        assert t["budget"]["predicted_min_bytes"] > limit
        assert not (Path(t["job_dir"]) / "checkpoints").exists()
    for t in trained:  # the prediction is a lower bound of the real artifact
        assert t["budget"]["predicted_min_bytes"] <= t["compression"]["artifact_bytes"]
        assert t["budget"]["within"] == (t["compression"]["artifact_bytes"] <= limit)

    best = best_within_budget(trials)
    assert best is not None
    assert best["compression"]["artifact_bytes"] <= limit
    feasible = [t for t in trained if t["budget"]["within"]]
    assert best["val"]["ndcg@10"] == max(t["val"]["ndcg@10"] for t in feasible)
    optuna_best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optuna_best["best_value"] == pytest.approx(best["val"]["ndcg@10"])

    assert main([str(sweep)]) == 0
    report = capsys.readouterr().out
    assert f"best within budget: {best['job_dir']}" in report
    assert f"over budget: {len(trials) - len(feasible)}" in report
    assert "compression.prune.sparsity=" in report  # the swept overrides, not the common ones
    assert "data=synthetic" not in report


def test_budget_objective_and_report_without_a_feasible_trial(tmp_path: Path) -> None:
    over = {
        "status": "over_budget",
        "budget": {
            "limit_bytes": 10,
            "predicted_min_bytes": 50,
            "artifact_bytes": None,
            "within": False,
        },
    }
    assert budget_objective(over, ["ndcg@10"]) == INFEASIBLE
    trained_over = {
        "status": "completed",
        "monitor": "val/ndcg@10",
        "val": {"ndcg@10": 0.3},
        "budget": {**over["budget"], "predicted_min_bytes": 5, "artifact_bytes": 12},
    }
    assert budget_objective(trained_over, []) == INFEASIBLE
    fits = {**trained_over, "budget": {**trained_over["budget"], "within": True}}
    assert budget_objective(fits, []) == 0.3
    job = tmp_path / "0"
    job.mkdir()
    (job / "results.json").write_text(json.dumps({**over, "run_dir": str(job)}))
    assert "no trial fits the budget" in format_report(load_trials([tmp_path]))
    assert main([str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["+budget_bytes=1000", "+budget_ratio=0.1"], "budget_bytes and budget_ratio"),
        (["+budget_bytes=0"], "budget_bytes=0"),
        (["+budget_ratio=1.5"], "budget_ratio=1.5"),
        (["+budget_ratio=0.1", "compression=none"], "a budget needs a compression method"),
        (
            ["hparams_search=compress_pareto", "+budget_ratio=0.1"],
            "optimized_metrics",
        ),
    ],
)
def test_budget_keys_are_validated(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        to_train_config(_compose(overrides))


def test_budget_config_composes() -> None:
    cfg = to_train_config(
        _compose(["hparams_search=budget", "budget_bytes=5000", "budget_ratio=null"])
    )
    assert cfg.budget_bytes == 5000 and cfg.compression.methods() == ["prune", "qat"]
    assert cfg.optimized_metrics == ["ndcg@10"]
