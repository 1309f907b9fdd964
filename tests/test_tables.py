"""Aggregation of results.json records into mean ± std tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_compress.errors import DataError
from recsys_compress.reporting.tables import aggregate, collect_results, to_markdown


def write_run(root: Path, name: str, model: str, ndcg: float, status: str = "completed") -> None:
    run = root / name
    run.mkdir(parents=True)
    record = {"status": status, "config": {"model": {"name": model}}, "test": {"ndcg@10": ndcg}}
    (run / "results.json").write_text(json.dumps(record))


def test_seeds_are_aggregated_and_failures_listed(tmp_path: Path) -> None:
    write_run(tmp_path, "0", "mf", 0.30)
    write_run(tmp_path, "1", "mf", 0.32)
    write_run(tmp_path, "2", "neumf", 0.28)
    write_run(tmp_path, "3", "neumf", 0.0, status="failed")
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "results.json").write_text("{truncated")
    records = collect_results([str(tmp_path)])
    assert len(records) == 5
    rows = aggregate(records, ["model.name"], ["ndcg@10"], "test")
    by_key = {row.key: row for row in rows}
    mean, std = by_key[("mf",)].mean_std("ndcg@10")
    assert mean == pytest.approx(0.31) and std == pytest.approx(0.0141421, rel=1e-4)
    assert by_key[("neumf",)].mean_std("ndcg@10") == (0.28, 0.0)
    assert len(by_key[("neumf",)].failed) == 1
    table = to_markdown(rows, ["model.name"], ["ndcg@10"])
    assert "| mf | 0.3100 ± 0.0141 | 2 |" in table
    assert "| neumf | 0.2800 ± 0.0000 | 1 (1 failed) |" in table
    assert "unreadable" in table and "failed" in table


def test_dotted_paths_and_dense_shares(tmp_path: Path) -> None:
    run = tmp_path / "0"
    run.mkdir()
    record = {
        "status": "completed",
        "config": {"compression": {"qat": {"bits": 8}}},
        "test": {"ndcg@10": 0.27},
        "dense": {"test": {"ndcg@10": 0.30}},
        "compression": {"artifact_ratio": 0.115},
    }
    (run / "results.json").write_text(json.dumps(record))
    metrics = ["compression.artifact_ratio", "dense.test.ndcg@10", "share:ndcg@10", "mrr@10"]
    rows = aggregate(collect_results([str(tmp_path)]), ["compression.qat.bits"], metrics, "test")
    (row,) = rows
    assert row.key == (8,)
    assert row.mean_std("compression.artifact_ratio") == (0.115, 0.0)
    assert row.mean_std("dense.test.ndcg@10") == (0.30, 0.0)
    assert row.mean_std("share:ndcg@10")[0] == pytest.approx(0.9)
    assert row.mean_std("mrr@10") is None


def test_no_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no results\.json"):
        collect_results([str(tmp_path / "missing")])
