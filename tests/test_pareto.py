"""Pareto front, seed aggregation and the size / quality plot built from results.json files."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest

from recsys_compress.reporting.pareto import (
    aggregate_points,
    front_markdown,
    observations,
    pareto_front,
    plot_pareto,
)
from recsys_compress.reporting.tables import collect_results
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"


def brute_force_front(points: list[tuple[float, float]]) -> set[int]:
    def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q[0] <= p[0] and q[1] >= p[1] and q != p

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)}


def test_front_is_the_non_dominated_set_with_ties_and_duplicates() -> None:
    points = [
        (100.0, 0.30),  # 0: dominated by 4 (smaller, same value)
        (200.0, 0.35),  # 1: front
        (150.0, 0.28),  # 2: dominated by 0 and 4
        (200.0, 0.35),  # 3: duplicate of 1, also on the front
        (50.0, 0.30),  # 4: front (smallest)
        (300.0, 0.35),  # 5: dominated by 1 (same value, larger)
        (300.0, 0.40),  # 6: front (best value)
        (200.0, 0.33),  # 7: dominated by 1 (same size, lower value)
    ]
    assert pareto_front(points) == [4, 1, 3, 6]


def test_front_edge_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(10.0, 0.1)]) == [0]
    assert pareto_front([(10.0, 0.1), (10.0, 0.1)]) == [0, 1]
    assert pareto_front([(10.0, float("nan")), (20.0, 0.1)]) == [1]
    # a larger model is on the front only if it is strictly better
    assert pareto_front([(10.0, 0.2), (20.0, 0.2), (30.0, 0.25)]) == [0, 2]


def test_front_matches_brute_force_on_random_points_with_many_ties() -> None:
    rng = random.Random(0)
    for _ in range(200):
        points = [(float(rng.randint(1, 6)), rng.randint(0, 5) / 10) for _ in range(12)]
        front = pareto_front(points)
        assert set(front) == brute_force_front(points)
        assert len(front) == len(set(front))
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def write_run(
    root: Path,
    name: str,
    seed: int,
    methods: list[str],
    ndcg: float,
    size: int | None,
    sparsity: float | None = None,
    dense: dict[str, Any] | None = None,
    status: str = "completed",
) -> None:
    config = {
        "seed": seed,
        "model": {"name": "mf", "dim": 8},
        "trainer": {"max_epochs": 3},
        "compression": {
            "prune": None if sparsity is None else {"sparsity": sparsity},
            "qat": {"bits": 8} if "qat" in methods else None,
            "dense_epochs": 2 if dense else 0,
        },
    }
    record: dict[str, Any] = {"status": status, "seed": seed, "config": config}
    if status == "completed":
        record["test"] = {"ndcg@10": ndcg}
        record["compression"] = {"methods": methods}
        if size is not None:
            record["compression"]["artifact_bytes"] = size
        if dense:
            record["dense"] = dense
    else:
        record["error"] = "ConfigError: boom"
    run = root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(record))


def dense_of(seed: int) -> dict[str, Any]:
    return {"artifact_bytes": 8000, "test": {"ndcg@10": [0.5, 0.625, 0.75][seed]}}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Prune at two sparsities and int8 over seeds; dense sections shared between methods."""
    root = tmp_path / "sweep"
    for seed, ndcg in enumerate([0.25, 0.375, 0.5]):
        write_run(root, f"p50_{seed}", seed, ["prune"], ndcg, 4000, 0.5, dense_of(seed))
    for seed, ndcg in enumerate([0.125, 0.25]):
        size = 1000 + 500 * seed
        write_run(root, f"p90_{seed}", seed, ["prune"], ndcg, size, 0.9, dense_of(seed))
    write_run(root, "q8_0", 0, ["qat"], 0.5, 2000)
    write_run(root, "q8_1", 1, ["qat"], 0.0, None)  # no artifact: reported, not a point
    write_run(root, "broken", 0, ["qat"], 0.0, 0, status="failed")
    return root


def test_seeds_are_averaged_exactly_and_dense_points_counted_once(sweep: Path) -> None:
    found, problems = observations(collect_results([str(sweep)]))
    points = {p.label: p for p in aggregate_points(found)}
    assert set(points) == {"dense", "prune (sparsity=0.5)", "prune (sparsity=0.9)", "qat"}
    p50 = points["prune (sparsity=0.5)"]
    assert (p50.n, p50.size, p50.size_std) == (3, 4000.0, 0.0)
    assert p50.value == 0.375 and p50.value_std == 0.125
    p90 = points["prune (sparsity=0.9)"]
    assert (p90.size, p90.value) == (1250.0, 0.1875)
    assert p90.size_std == pytest.approx(353.5533906)
    # five runs carry a dense section, from three seeds: one dense model per seed
    dense = points["dense"]
    assert (dense.n, dense.size, dense.value) == (3, 8000.0, 0.625)
    assert points["qat"].n == 1
    assert len(problems) == 2
    assert any("broken: failed (ConfigError: boom)" in line for line in problems)
    assert any("q8_1: no compression.artifact_bytes" in line for line in problems)


def test_group_by_keys_define_the_configurations(sweep: Path) -> None:
    records = collect_results([str(sweep)])
    found, _ = observations(records, group_by=["model.name"])
    points = {p.label: p for p in aggregate_points(found)}
    # one configuration per method: both sparsities of prune merge
    assert set(points) == {"dense", "prune", "qat"}
    assert points["prune"].n == 5
    assert points["prune"].value == pytest.approx((0.25 + 0.375 + 0.5 + 0.125 + 0.25) / 5)


def test_settings_that_change_no_result_do_not_split_a_configuration(tmp_path: Path) -> None:
    """The progress display or L1's kernel (compiled or eager, and absent from records written
    before it existed) leave runs in one configuration."""
    for seed, (shown, kernel) in enumerate([(True, "auto"), (False, "eager"), (True, None)]):
        write_run(tmp_path, f"l1_{seed}", seed, ["l1"], 0.25 * (seed + 1), 1000)
        record = json.loads((tmp_path / f"l1_{seed}" / "results.json").read_text())
        record["config"]["trainer"]["progress_bar"] = shown
        if kernel is not None:
            record["config"]["compression"]["l1"] = {"strength": 1e-4, "kernel": kernel}
        else:
            record["config"]["compression"]["l1"] = {"strength": 1e-4}
        (tmp_path / f"l1_{seed}" / "results.json").write_text(json.dumps(record))
    found, _ = observations(collect_results([str(tmp_path)]))
    points = aggregate_points(found)
    assert [(p.label, p.n, p.value) for p in points] == [("l1", 3, 0.5)]
    write_run(tmp_path, "l1_other", 3, ["l1"], 0.0, 1000)  # another λ is another configuration
    record = json.loads((tmp_path / "l1_other" / "results.json").read_text())
    record["config"]["compression"]["l1"] = {"strength": 1e-3, "kernel": "auto"}
    (tmp_path / "l1_other" / "results.json").write_text(json.dumps(record))
    found, _ = observations(collect_results([str(tmp_path)]))
    assert sorted(p.n for p in aggregate_points(found)) == [1, 3]


def _edit(run: Path, change: Any) -> None:
    record = json.loads((run / "results.json").read_text())
    change(record["config"])
    (run / "results.json").write_text(json.dumps(record))


def test_records_without_newer_config_keys_join_the_configuration_they_agree_with(
    tmp_path: Path,
) -> None:
    """As ``skip_completed`` treats a key that an older record lacks: seeds written before
    ``trainer.batches_per_call`` existed average with the one written after (and so do their
    dense models); a record that lacks ``model.dim`` where two dims were run stays apart, and
    so does one whose value stands where another has a section."""
    for seed in range(3):
        write_run(
            tmp_path, f"p_{seed}", seed, ["prune"], 0.25 * (seed + 1), 1000, 0.5, dense_of(seed)
        )
    _edit(tmp_path / "p_0", lambda c: c["trainer"].update(batches_per_call=16))
    found, _ = observations(collect_results([str(tmp_path)]))
    points = {p.label: p for p in aggregate_points(found)}
    assert set(points) == {"prune", "dense"}
    assert (points["prune"].n, points["prune"].value) == (3, 0.5)
    assert points["prune"].config["trainer.batches_per_call"] == 16
    assert points["dense"].n == 3
    # a newer record of seed 1 (another sparsity) shares its dense model with the older one
    write_run(tmp_path, "q_1", 1, ["prune"], 0.5, 500, 0.9, dense_of(1))
    _edit(tmp_path / "q_1", lambda c: c["trainer"].update(batches_per_call=16))
    found, _ = observations(collect_results([str(tmp_path)]))
    points = {p.label: p for p in aggregate_points(found)}
    assert (points["dense"].n, points["dense"].value) == (3, 0.625)
    (tmp_path / "q_1" / "results.json").unlink()
    (tmp_path / "q_1").rmdir()
    # another value of the newer key is another configuration, which the old records cannot
    # be told apart from: then they stay on their own
    write_run(tmp_path, "p_3", 3, ["prune"], 0.0, 1000, 0.5, dense_of(0))
    _edit(tmp_path / "p_3", lambda c: c["trainer"].update(batches_per_call=1))
    found, _ = observations(collect_results([str(tmp_path)]))
    prune = [p for p in aggregate_points(found) if p.method == "prune"]
    assert sorted((p.n, p.config.get("trainer.batches_per_call", 0)) for p in prune) == [
        (1, 1),
        (1, 16),
        (2, 0),
    ]
    # a null section against the same section's keys is a difference, not a missing key
    write_run(tmp_path / "other", "a", 0, ["prune"], 0.5, 1000, 0.5)
    write_run(tmp_path / "other", "b", 1, ["prune"], 0.5, 1000, None)
    found, _ = observations(collect_results([str(tmp_path / "other")]))
    assert sorted(p.n for p in aggregate_points(found)) == [1, 1]


def test_a_two_stage_runs_dense_model_is_not_merged_with_a_dense_run(tmp_path: Path) -> None:
    """A two-stage run's dense model has a projected config (its compression settings and
    length left out), which a dense-only run's whole config always agrees with: they stay two
    points, however the records are ordered."""
    write_run(tmp_path, "two_stage", 0, ["prune"], 0.25, 1000, 0.5, dense_of(0))
    write_run(tmp_path, "none", 0, [], 0.5, 8000)
    _edit(tmp_path / "none", lambda c: c["compression"].update(dense_epochs=2))
    records = collect_results([str(tmp_path)])
    for ordered in (records, records[::-1]):
        found, _ = observations(ordered)
        dense = [p for p in aggregate_points(found) if p.method == "dense"]
        assert sorted((p.n, p.value) for p in dense) == [(1, 0.5), (1, 0.5)]
        assert sorted(p.run_dirs[0].rsplit("/", 1)[-1] for p in dense) == ["dense", "none"]


def test_records_of_three_versions_join_the_newest_configuration(tmp_path: Path) -> None:
    for seed in range(3):
        write_run(tmp_path, f"v{seed}", seed, ["qat"], 0.25 * (seed + 1), 2000)
    _edit(tmp_path / "v1", lambda c: c["trainer"].update(batches_per_call=16))
    _edit(tmp_path / "v2", lambda c: c["trainer"].update(batches_per_call=16, precision="32"))
    records = collect_results([str(tmp_path)])
    for ordered in (records, records[::-1]):
        found, _ = observations(ordered)
        (point,) = aggregate_points(found)
        assert (point.n, point.value, point.label) == (3, 0.5, "qat")
        assert point.config["trainer.precision"] == "32"


def test_front_table_and_plot_files(sweep: Path, tmp_path: Path) -> None:
    found, _ = observations(collect_results([str(sweep)]))
    points = aggregate_points(found)
    front = pareto_front([(p.size, p.value) for p in points])
    labels = [points[i].label for i in front]
    # p90 (1250 B, 0.1875) < qat (2000 B, 0.5) < dense (8000 B, 0.625); p50 is dominated by qat
    assert labels == ["prune (sparsity=0.9)", "qat", "dense"]
    table = front_markdown(points, front, "ndcg@10", "compression.artifact_bytes")
    assert "| prune (sparsity=0.9) | 1,250 ± 354 | 0.1875 ± 0.0884 | 2 |" in table
    assert "| dense | 8,000 ± 0 | 0.6250 ± 0.1250 | 3 |" in table
    png, pdf = plot_pareto(points, front, "ndcg@10", "bytes", tmp_path / "out" / "pareto")
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(PDF_MAGIC)


def load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_front_and_lists_failed_runs(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = load_script("plot_pareto").main
    prefix = tmp_path / "fig"
    assert main([str(sweep / "p*"), str(sweep / "q8_*"), str(sweep), "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "| qat | 2,000 ± 0 | 0.5000 ± 0.0000 | 1 |" in out
    assert "broken: failed" in out
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "fig.pdf").read_bytes().startswith(PDF_MAGIC)
    assert main([str(tmp_path / "nothing_here")]) == 2
