"""logger=wandb: offline runs under the run dir whose config, group, job type and summary match the
job's results.json, one run per multirun job (failed jobs included), and the logger.* checks.

Runs are read back with ``wandb leet inspect`` (no server, no account, no network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recsys_compress.config import LoggerConfig
from recsys_compress.errors import ConfigError
from recsys_compress.logging_wandb import flatten_record, resolve_mode
from recsys_compress.train import train
from tests.conftest import REPO
from tests.e2e.test_train import compose_config

WANDB_CLI = str(Path(sys.executable).with_name("wandb"))
TINY = [
    "data=synthetic",
    "data.synthetic.num_users=100",
    "data.synthetic.num_items=60",
    "model.dim=8",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "trainer.batch_size=512",
    "logger=wandb",
    "logger.mode=offline",
]


@pytest.fixture(autouse=True)
def _wandb_offline_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No account, no network, nothing written under ~."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, sub in (("CONFIG", "config"), ("CACHE", "cache"), ("DATA", "data")):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb-home" / sub))


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one offline run under ``run_dir/wandb``: (its summary view, its ``run`` record)."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    inspect = [WANDB_CLI, "leet", "inspect", "--json"]
    state = subprocess.run(
        [*inspect, "--summary", str(offline)], capture_output=True, text=True, check=True
    )
    records = subprocess.run([*inspect, str(offline)], capture_output=True, text=True, check=True)
    run = next(r["run"] for r in map(json.loads, records.stdout.splitlines()) if r["type"] == "run")
    return json.loads(state.stdout), run


def test_train_writes_offline_run_matching_results(tmp_path: Path) -> None:
    cfg = compose_config(
        [*TINY, "compression=[prune,qat]", "compression.dense_epochs=1", "logger.tags=[smoke]"]
    )
    record = train(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    state, run = read_run(tmp_path)
    assert on_disk["wandb"]["run_id"] == state["run_id"] == run["run_id"]
    assert Path(on_disk["wandb"]["dir"]).parent == tmp_path / "wandb"
    assert on_disk["wandb"]["mode"] == "offline" and on_disk["wandb"]["url"] is None
    assert (state["state"], state["exit_code"]) == ("finished", 0)
    assert state["config"]["model"]["name"] == "mf" and state["config"]["model"]["dim"] == 8
    assert state["config"]["seed"] == 42
    assert state["config"]["compression"]["qat"]["bits"] == 8
    assert run["job_type"] == "prune+qat" and not run.get("run_group")
    assert state["name"] == tmp_path.name and state["project"] == "recsys-compress"
    assert state["tags"] == ["smoke", "mf", "prune", "qat"]

    summary = state["summary"]
    assert summary["test/ndcg@10"] == pytest.approx(on_disk["test"]["ndcg@10"], abs=1e-9)
    assert summary["val/ndcg@10"] == pytest.approx(on_disk["val"]["ndcg@10"], abs=1e-9)
    dense_ndcg = on_disk["dense"]["test"]["ndcg@10"]
    assert summary["dense/test/ndcg@10"] == pytest.approx(dense_ndcg, abs=1e-9)
    compression = on_disk["compression"]
    for key in ("artifact_bytes", "compressed_bytes", "uncompressed_fp32_bytes"):
        assert summary[f"compression/{key}"] == compression[key]
    assert summary["dense/artifact_bytes"] == on_disk["dense"]["artifact_bytes"]
    assert summary["compression/methods"] == ["prune", "qat"]
    assert summary["status"] == "completed"
    # The flattened record is all there (None values are not stored by W&B).
    expected = {k: v for k, v in flatten_record(record).items() if v is not None}
    assert set(expected) <= set(summary)
    # Media: the per-layer table and the size-vs-NDCG@10 plot.
    table = summary["compression/layers"]
    assert table["_type"] == "table-file" and table["nrows"] == len(compression["layers"])
    assert summary["compression/size_vs_ndcg@10"]["_type"] == "image-file"
    # Per-epoch metrics flowed through Lightning (the dense stage under dense/); CSV is kept.
    assert "compression/sparsity" in summary and "dense/train/loss" in summary
    assert (tmp_path / "metrics.csv").is_file()


def test_multirun_jobs_get_own_runs_in_one_group_even_when_one_fails(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    missing = tmp_path / "missing.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_compress.train",
            "-m",
            f"hydra.sweep.dir={sweep}",
            *TINY,
            "compression=qat",
            "compression.dense_epochs=0",
            f"+data.path=null,{missing}",  # job 1 reads a missing file and fails
        ],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    ok_state, ok_run = read_run(sweep / "0")
    failed_state, failed_run = read_run(sweep / "1")
    # <sweep>/wandb links both jobs' runs, for `wandb leet <sweep>/wandb`.
    linked = sorted(p.resolve() for p in (sweep / "wandb").glob("offline-run-*"))
    assert linked == sorted(next((sweep / job / "wandb").glob("offline-run-*")) for job in "01")
    assert ok_state["run_id"] != failed_state["run_id"]
    assert ok_run["run_group"] == failed_run["run_group"] == sweep.name
    assert ok_run["job_type"] == failed_run["job_type"] == "qat"
    assert ok_state["name"].startswith("data=synthetic,")
    assert ok_state["name"].endswith(",compression.dense_epochs=0,+data.path=null")
    assert (ok_state["state"], ok_state["exit_code"]) == ("finished", 0)
    ok_record = json.loads((sweep / "0" / "results.json").read_text())
    test_ndcg = ok_record["test"]["ndcg@10"]
    assert ok_state["summary"]["test/ndcg@10"] == pytest.approx(test_ndcg, abs=1e-9)

    assert (failed_state["state"], failed_state["exit_code"]) == ("failed", 1)
    assert failed_state["summary"]["status"] == "failed"
    assert f"data.path={missing} does not exist" in failed_state["summary"]["error"]
    failed_record = json.loads((sweep / "1" / "results.json").read_text())
    assert failed_record["status"] == "failed"
    assert failed_record["wandb"]["run_id"] == failed_state["run_id"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("logger.mode=cloud", "logger.mode"),
        ("logger.name=tensorboard", "logger.name"),
        ("logger.project=team/project", "logger.project"),
        ("logger.group=''", "logger.group"),
        (f"logger.tags=[{'x' * 65}]", "logger.tags"),
    ],
)
def test_bad_logger_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config(["logger=wandb", override])


def test_wandb_logger_config_composes() -> None:
    cfg = compose_config(["logger=wandb"])
    assert cfg.logger == LoggerConfig(name="wandb")


def test_auto_mode_is_offline_without_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(ConfigError, match=r"logger\.mode or WANDB_MODE.*wandb login"):
        resolve_mode("online")


def test_auto_mode_is_online_with_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    netrc = tmp_path / "no.netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto") == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("online") == "online"
    # An explicit WANDB_MODE wins over auto's guess.
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"


def test_flatten_record_joins_keys_like_the_logged_metrics() -> None:
    record = {
        "config": {"seed": 1},
        "test": {"ndcg@10": 0.5},
        "compression": {"artifact_bytes": 10, "layers": [{"name": "a"}], "methods": ["qat"]},
        "dense": {"test": {"ndcg@10": 0.6}},
    }
    assert flatten_record(record) == {
        "test/ndcg@10": 0.5,
        "compression/artifact_bytes": 10,
        "compression/methods": ["qat"],
        "dense/test/ndcg@10": 0.6,
    }
