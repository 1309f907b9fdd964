"""Tables from results.json records (or W&B runs): grouping, mean ± std, best per column,
Markdown / LaTeX / CSV, the join with published numbers, failed runs and the CLI."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from recsys_compress.errors import DataError
from recsys_compress.reporting.references import bundled_sources, load_reference
from recsys_compress.reporting.table_formats import latex_escape, to_csv, to_latex, to_markdown
from recsys_compress.reporting.tables import (
    build_table,
    collect_results,
    fetch_wandb_records,
    group_value,
    higher_is_better,
    records_from_wandb,
)
from tests.conftest import REPO

# (model, method) -> per seed: test ndcg@10, test hr@10, artifact ratio
RUNS = {
    ("mf", "prune"): [(0.30, 0.60, 0.25), (0.32, 0.62, 0.27)],
    ("mf", "qat"): [(0.31, 0.61, 0.125), (0.33, 0.63, 0.135)],
    ("neumf", "prune"): [(0.28, 0.70, 0.30), (0.26, 0.72, 0.32)],
    ("neumf", "qat"): [(0.34, 0.70, 0.28), (0.36, 0.74, 0.26)],
}
FAILED_ERROR = "ConfigError: model.dim must be >= 1 (got 0)"


def record(
    model: str, method: str, seed: int, ndcg: float, hr: float, ratio: float, **model_cfg: Any
) -> dict[str, Any]:
    config = {
        "seed": seed,
        "data": {"name": "ml1m"},
        "split": {"name": "loo"},
        "eval": {"protocol": "sampled"},
        "model": {"name": model, "dim": 64, "pretrained_gmf": None, **model_cfg},
        "compression": {"prune": {"sparsity": 0.8}} if method == "prune" else {"prune": None},
    }
    return {
        "status": "completed",
        "config": config,
        "val": {"ndcg@10": ndcg - 0.01},
        "test": {"ndcg@10": ndcg, "hr@10": hr},
        "compression": {"methods": [method], "artifact_ratio": ratio},
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 models x 2 methods x 2 seeds, plus one failed run."""
    root = tmp_path / "sweep"
    for (model, method), seeds in RUNS.items():
        for seed, values in enumerate(seeds):
            run = root / f"{model}_{method}" / str(seed)
            run.mkdir(parents=True)
            (run / "results.json").write_text(json.dumps(record(model, method, seed, *values)))
    failed = root / "broken"
    failed.mkdir()
    failed_record = {"status": "failed", "error": FAILED_ERROR + "\nmore", "run_dir": str(failed)}
    (failed / "results.json").write_text(json.dumps(failed_record))
    return root


def load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def method_table(sweep: Path, **kwargs: Any) -> Any:
    records = collect_results([str(sweep)])
    metrics = ["ndcg@10", "compression.artifact_ratio"]
    return build_table(records, ["model.name"], ["compression.methods"], metrics, **kwargs)


def test_markdown_rows_by_columns_mean_std_and_best_in_both_directions(sweep: Path) -> None:
    table = method_table(sweep)
    assert table.row_values == [("mf",), ("neumf",)]
    assert table.col_values == [(("prune",),), (("qat",),)]
    lines = to_markdown(table).splitlines()
    assert lines[0] == (
        "| model.name | prune · ndcg@10 ↑ | prune · compression.artifact_ratio ↓ "
        "| qat · ndcg@10 ↑ | qat · compression.artifact_ratio ↓ |"
    )
    assert lines[1] == "|---|---:|---:|---:|---:|"
    # ndcg@10: higher is better per column (mf in prune, neumf in qat); ratio: lower (mf in both)
    assert lines[2] == (
        "| mf | **0.3100 ± 0.0141** | **0.2600 ± 0.0141** | 0.3200 ± 0.0141 | **0.1300 ± 0.0071** |"
    )
    assert lines[3] == (
        "| neumf | 0.2700 ± 0.0141 | 0.3100 ± 0.0141 | **0.3500 ± 0.0141** | 0.2700 ± 0.0141 |"
    )
    assert lines[5].startswith("Mean ± std over n=2 runs per cell; best per column in bold")


def test_direction_rules_and_overrides(sweep: Path) -> None:
    assert higher_is_better("ndcg@10") and higher_is_better("share:ndcg@10")
    assert higher_is_better("dense.test.hr@10")
    for metric in ("compression.artifact_ratio", "compression.artifact_bytes", "eval_seconds"):
        assert not higher_is_better(metric)
    assert higher_is_better("eval_seconds", higher=["eval_seconds"])
    assert not higher_is_better("ndcg@10", lower=["ndcg@10"])
    table = method_table(sweep, higher=["compression.artifact_ratio"], lower=["ndcg@10"])
    lines = to_markdown(table).splitlines()
    assert "compression.artifact_ratio ↑" in lines[0] and "ndcg@10 ↓" in lines[0]
    assert lines[2] == (
        "| mf | 0.3100 ± 0.0141 | 0.2600 ± 0.0141 | **0.3200 ± 0.0141** | 0.1300 ± 0.0071 |"
    )
    assert lines[3] == (
        "| neumf | **0.2700 ± 0.0141** | **0.3100 ± 0.0141** | 0.3500 ± 0.0141 | "
        "**0.2700 ± 0.0141** |"
    )


def test_ties_are_all_marked_and_single_runs_show_n(tmp_path: Path) -> None:
    records = [
        record("mf", "qat", 0, 0.30, 0.6, 0.2),
        record("mf", "qat", 1, 0.32, 0.6, 0.2),
        record("gmf", "qat", 0, 0.31, 0.6, 0.2),
    ]
    table = build_table(records, ["model.name"], [], ["ndcg@10", "hr@10"])
    markdown = to_markdown(table)
    assert "| gmf | **0.3100** (n=1) | **0.6000** (n=1) |" in markdown
    assert "| mf | **0.3100 ± 0.0141** (n=2) | **0.6000 ± 0.0000** (n=2) |" in markdown
    assert "Mean ± std over the n runs given in each cell" in markdown


def test_latex_has_booktabs_rules_groups_and_escapes(sweep: Path) -> None:
    latex = to_latex(method_table(sweep))
    lines = latex.splitlines()
    assert lines[:2] == [r"\begin{tabular}{lrrrr}", r"\toprule"]
    assert lines[2] == (
        r"compression.methods & \multicolumn{2}{c}{prune} & \multicolumn{2}{c}{qat} \\"
    )
    assert lines[3] == r"\cmidrule(lr){2-3} \cmidrule(lr){4-5}"
    assert lines[4] == (
        r"model.name & ndcg@10 $\uparrow$ & compression.artifact\_ratio $\downarrow$ & "
        r"ndcg@10 $\uparrow$ & compression.artifact\_ratio $\downarrow$ \\"
    )
    assert lines[5] == r"\midrule"
    assert lines[6] == (
        r"mf & \textbf{0.3100 $\pm$ 0.0141} & \textbf{0.2600 $\pm$ 0.0141} & "
        r"0.3200 $\pm$ 0.0141 & \textbf{0.1300 $\pm$ 0.0071} \\"
    )
    assert lines[8:10] == [r"\bottomrule", r"\end{tabular}"]
    assert f"% failed: {sweep / 'broken'}: failed: {FAILED_ERROR}" in lines

    assert latex_escape("a_b 50% R&D $x #1 {y} ~^\\") == (
        r"a\_b 50\% R\&D \$x \#1 \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )
    odd = record("mf", "qat", 0, 0.3, 0.6, 0.2)
    odd["config"]["data"]["name"] = "ml_1m 50% & more"
    escaped = to_latex(build_table([odd], ["data.name"], [], ["ndcg@10"]))
    assert r"ml\_1m 50\% \& more & 0.3000 \\" in escaped.splitlines()
    assert r"data.name & ndcg@10 $\uparrow$ \\" in escaped.splitlines()


def test_csv_parses_and_holds_the_same_numbers(sweep: Path) -> None:
    table = method_table(sweep)
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    header = ["model.name", "compression.methods", "metric", "mean", "std", "n", "best"]
    assert list(rows[0]) == header
    assert len(rows) == 2 * 2 * 2
    cells = {(r["model.name"], r["compression.methods"], r["metric"]): r for r in rows}
    mf_prune = cells[("mf", "prune", "ndcg@10")]
    assert float(mf_prune["mean"]) == pytest.approx(0.31)
    assert float(mf_prune["std"]) == pytest.approx(0.0141421356, rel=1e-8)
    assert (mf_prune["n"], mf_prune["best"]) == ("2", "true")
    ratio = cells[("mf", "qat", "compression.artifact_ratio")]
    assert float(ratio["mean"]) == pytest.approx(0.13)
    assert float(ratio["std"]) == pytest.approx(0.00707106781, rel=1e-8)
    assert ratio["best"] == "true" and cells[("neumf", "qat", "ndcg@10")]["best"] == "true"
    assert cells[("neumf", "prune", "ndcg@10")]["best"] == "false"
    markdown = to_markdown(table)
    for r in rows:
        text = f"{float(r['mean']):.4f} ± {float(r['std']):.4f}"
        assert text in markdown


def test_reference_join_prints_ours_paper_and_delta(sweep: Path) -> None:
    records = collect_results([str(sweep)])
    reference = load_reference("ncf_paper")
    table = build_table(records, ["model.name"], [], ["hr@10", "ndcg@10"], reference=reference)
    lines = to_markdown(table).splitlines()
    assert lines[0] == (
        "| model.name | hr@10 ↑ ours | hr@10 paper | hr@10 Δ "
        "| ndcg@10 ↑ ours | ndcg@10 paper | ndcg@10 Δ |"
    )
    # neumf (dim 64, not pre-trained) over both methods: hr@10 0.715 vs 0.705, ndcg@10 0.31 vs 0.426
    assert lines[2] == "| mf | 0.6150 ± 0.0129 | — | — | **0.3150 ± 0.0129** | — | — |"
    assert lines[3] == (
        "| neumf | **0.7150 ± 0.0191** | 0.705 [1] | +0.0100 "
        "| 0.3100 ± 0.0476 | 0.426 [1] | -0.1160 |"
    )
    assert "Paper: ncf_paper; Δ = ours − paper." in lines
    assert (
        "[1] X. He, L. Liao, H. Zhang, L. Nie, X. Hu, T.-S. Chua. Neural Collaborative Filtering. "
        "WWW 2017, Table 2, NeuMF with 64 predictive factors, without pre-training"
    ) in lines
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    neumf_hr = next(r for r in rows if r["model.name"] == "neumf" and r["metric"] == "hr@10")
    assert float(neumf_hr["paper"]) == 0.705
    assert float(neumf_hr["delta"]) == pytest.approx(0.01)
    assert neumf_hr["citation"].startswith("X. He")
    latex = to_latex(table)
    assert r"0.705 \textsuperscript{1} & $+0.0100$" in latex
    assert r"hr@10 $\Delta$" in latex


def test_reference_matches_pretraining_and_dim(tmp_path: Path) -> None:
    reference = load_reference("ncf_paper")
    pretrained_8 = record("neumf", "qat", 0, 0.3, 0.6, 0.2, dim=8, pretrained_gmf="runs/gmf")
    scratch_8 = record("neumf", "qat", 0, 0.3, 0.6, 0.2, dim=8)
    assert group_value(pretrained_8, "pretrained") is True
    assert group_value(scratch_8, "pretrained") is False
    assert reference.find([pretrained_8]).metrics == {"hr@10": 0.684, "ndcg@10": 0.403}
    assert reference.find([scratch_8]).metrics == {"hr@10": 0.688, "ndcg@10": 0.410}
    assert reference.find([pretrained_8, scratch_8]) is None  # a cell mixing both matches neither
    full_ranking = record("neumf", "qat", 0, 0.3, 0.6, 0.2)
    full_ranking["config"]["eval"]["protocol"] = "full"
    assert reference.find([full_ranking]) is None

    rendle = load_reference("rendle2020")
    mf_192 = record("mf", "qat", 0, 0.3, 0.6, 0.2, dim=192)
    assert rendle.find([mf_192]).metrics == {"hr@10": 0.7294, "ndcg@10": 0.4523}
    table = build_table([mf_192], ["model.name"], [], ["recall@10"], reference=rendle)
    assert table.reference_metrics == []
    assert to_markdown(table).splitlines()[-1] == (
        "Reference rendle2020 has numbers only for hr@10, ndcg@10."
    )
    unmatched = build_table([mf_192], ["model.name"], [], ["ndcg@10"], reference=reference)
    lines = to_markdown(unmatched).splitlines()
    assert lines[2] == "| mf | 0.3000 | — | — |"
    assert lines[-1].startswith("No cell matched reference ncf_paper (it matches on data.name, ")


def test_bundled_references_hold_the_published_numbers() -> None:
    sources = bundled_sources()
    ncf = {
        (e["match"]["model.dim"], e["match"]["pretrained"]): e["metrics"]
        for e in sources["ncf_paper"]["entries"]
    }
    assert ncf == {
        (64, True): {"hr@10": 0.730, "ndcg@10": 0.447},
        (64, False): {"hr@10": 0.705, "ndcg@10": 0.426},
        (8, True): {"hr@10": 0.684, "ndcg@10": 0.403},
        (8, False): {"hr@10": 0.688, "ndcg@10": 0.410},
    }
    rendle = {e["match"]["model.name"]: e["metrics"] for e in sources["rendle2020"]["entries"]}
    assert rendle == {
        "mf": {"hr@10": 0.7294, "ndcg@10": 0.4523},
        "neumf": {"hr@10": 0.7093, "ndcg@10": 0.4349},
        "ials": {"hr@10": 0.7111, "ndcg@10": 0.4383},
        "slim": {"hr@10": 0.7162, "ndcg@10": 0.4468},
        "popularity": {"hr@10": 0.4535, "ndcg@10": 0.2543},
    }
    for source in sources.values():
        for entry in source["entries"]:
            assert {"data.name", "split.name", "eval.protocol"} <= set(entry["match"])


def test_reference_file_most_specific_entry_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "mine:\n  citation: Our earlier paper\n  digits: 2\n  entries:\n"
        "    - {match: {model.name: mf}, metrics: {ndcg@10: 0.2}}\n"
        "    - {where: Table 3, match: {model.name: mf, model.dim: 64}, metrics: {ndcg@10: 0.25}}\n"
    )
    reference = load_reference(str(path))
    runs = [record("mf", "qat", 0, 0.3, 0.6, 0.2)]
    table = build_table(runs, ["model.name"], [], ["ndcg@10"], reference=reference)
    markdown = to_markdown(table)
    assert "| mf | 0.3000 | 0.25 [1] | +0.0500 |" in markdown
    assert "[1] Our earlier paper, Table 3" in markdown

    path.write_text(
        "mine:\n  citation: A\n  entries:\n"
        "    - {match: {model.name: mf}, metrics: {ndcg@10: 0.2}}\n"
        "    - {match: {model.dim: 64}, metrics: {ndcg@10: 0.3}}\n"
    )
    with pytest.raises(DataError, match="equally well"):
        load_reference(str(path)).find([record("mf", "qat", 0, 0.3, 0.6, 0.2)])
    path.write_text("mine:\n  citation: A\n  entries:\n    - {match: {}, metrics: {x: 1}}\n")
    with pytest.raises(DataError, match=r"entry 0: `match`"):
        load_reference(str(path))
    with pytest.raises(DataError, match=r"choose one of \['ncf_paper', 'rendle2020'\]"):
        load_reference("ncf")


def test_failed_and_unreadable_runs_are_listed(sweep: Path) -> None:
    (sweep / "truncated").mkdir()
    (sweep / "truncated" / "results.json").write_text("{truncated")
    records = collect_results([str(sweep)])
    assert len(records) == 10
    table = method_table(sweep)
    assert [(f.run, f.status, f.error) for f in table.failures] == [
        (str(sweep / "broken"), "failed", FAILED_ERROR),
        (str(sweep / "truncated"), "unreadable", table.failures[1].error),
    ]
    lines = to_markdown(table).splitlines()
    assert lines[-3] == "Failed or unreadable runs (2), not in the table:"
    assert lines[-2] == f"- {sweep / 'broken'}: failed: {FAILED_ERROR}"
    assert lines[-1].startswith(f"- {sweep / 'truncated'}: unreadable: Expecting")


def test_dotted_paths_dense_shares_and_keys_outside_the_config(tmp_path: Path) -> None:
    run = tmp_path / "0"
    run.mkdir()
    rec = {
        "status": "completed",
        "config": {"compression": {"qat": {"bits": 8}, "prune": None}},
        "test": {"ndcg@10": 0.27},
        "dense": {"test": {"ndcg@10": 0.30}},
        "compression": {"methods": ["prune", "qat"], "artifact_ratio": 0.115},
    }
    (run / "results.json").write_text(json.dumps(rec))
    metrics = ["compression.artifact_ratio", "dense.test.ndcg@10", "share:ndcg@10", "mrr@10"]
    keys = ["compression.qat.bits", "compression.prune.sparsity", "compression.methods"]
    table = build_table(collect_results([str(tmp_path)]), keys, [], metrics)
    (row,) = table.row_values
    assert row == (8, None, ("prune", "qat"))
    assert table.stats(row, (), "compression.artifact_ratio").mean == 0.115
    assert table.stats(row, (), "dense.test.ndcg@10").mean == 0.30
    assert table.stats(row, (), "share:ndcg@10").mean == pytest.approx(0.9)
    assert table.stats(row, (), "mrr@10") is None
    assert table.missing_metrics == ["mrr@10"]
    assert "| 8 | — | prune+qat | 0.1150 | 0.3000 | 0.9000 | — |" in to_markdown(table)


def test_numeric_keys_sort_as_numbers(tmp_path: Path) -> None:
    records = []
    for dim in (128, 8, 32):
        records.append(record("mf", "qat", 0, 0.3, 0.6, 0.2, dim=dim))
    table = build_table(records, ["model.dim"], [], ["ndcg@10"])
    assert table.row_values == [(8,), (32,), (128,)]


def test_wandb_runs_convert_to_records() -> None:
    finished = SimpleNamespace(
        name="model=mf,seed=0",
        state="finished",
        config={"model": {"name": "mf", "dim": 64}, "seed": 0, "_wandb": {"cli_version": "0.31"}},
        summary={
            "status": "completed",
            "test/ndcg@10": 0.3,
            "val/ndcg@10": 0.29,
            "compression/methods": ["qat"],
            "compression/artifact_ratio": 0.27,
            "dense/test/ndcg@10": 0.31,
            "_runtime": 12.5,
        },
    )
    flat_config = SimpleNamespace(
        name="model=mf,seed=1",
        state="finished",
        config={"model.name": "mf", "model.dim": 64, "seed": 1},
        summary={"status": "completed", "test": {"ndcg@10": 0.32}, "compression": {"methods": []}},
    )
    crashed = SimpleNamespace(name="model=neumf", state="crashed", config={}, summary={})
    failed = SimpleNamespace(
        name="model=gmf", state="failed", config={}, summary={"status": "failed", "error": "boom"}
    )
    records = records_from_wandb([finished, flat_config, crashed, failed], "team/recsys")
    assert records[0] == {
        "status": "completed",
        "test": {"ndcg@10": 0.3},
        "val": {"ndcg@10": 0.29},
        "compression": {"methods": ["qat"], "artifact_ratio": 0.27},
        "dense": {"test": {"ndcg@10": 0.31}},
        "config": {"model": {"name": "mf", "dim": 64}, "seed": 0},
        "run_dir": "wandb:team/recsys/model=mf,seed=0",
    }
    assert records[1]["config"] == {"model": {"name": "mf", "dim": 64}, "seed": 1}
    assert records[2] == {
        "status": "no results (W&B state crashed)",
        "run_dir": "wandb:team/recsys/model=neumf",
    }
    table = build_table(records, ["model.name"], [], ["ndcg@10", "share:ndcg@10"])
    assert to_markdown(table).splitlines()[2] == "| mf | 0.3100 ± 0.0141 (n=2) | 0.9677 (n=1) |"
    assert [f.run for f in table.failures] == [
        "wandb:team/recsys/model=neumf",
        "wandb:team/recsys/model=gmf",
    ]
    assert table.failures[1].error == "boom"


def test_wandb_fetch_filters_by_group_and_names_the_option_on_errors() -> None:
    calls = []

    class FakeApi:
        def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[Any]:
            calls.append((path, filters))
            summary = {"status": "completed", "test/ndcg@10": 0.3}
            return [SimpleNamespace(name="r", state="finished", config={}, summary=summary)]

    (rec,) = fetch_wandb_records("team/recsys", "sweep-1", api=FakeApi())
    assert calls == [("team/recsys", {"group": "sweep-1"})]
    assert rec["test"] == {"ndcg@10": 0.3}

    class OfflineApi:
        def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[Any]:
            raise ConnectionError("api.wandb.ai unreachable")

    with pytest.raises(DataError, match=r"--wandb team/recsys: .*ConnectionError.*wandb login"):
        fetch_wandb_records("team/recsys", None, api=OfflineApi())
    with pytest.raises(DataError, match="expected ENTITY/PROJECT"):
        fetch_wandb_records("recsys", None, api=FakeApi())


def test_cli_writes_markdown_latex_csv_and_keeps_group_by(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = load_script("make_table").main
    prefix = tmp_path / "out" / "table"
    argv = [str(sweep / "*"), "--rows", "model.name", "--cols", "compression.methods"]
    argv += ["--metrics", "ndcg@10", "compression.artifact_ratio", "--out", str(prefix)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = method_table(sweep)
    assert out == to_markdown(table)
    assert f"- {sweep / 'broken'}: failed: {FAILED_ERROR}" in out
    assert prefix.with_suffix(".md").read_text() == out
    assert prefix.with_suffix(".tex").read_text() == to_latex(table)
    assert prefix.with_suffix(".csv").read_text() == to_csv(table)

    latex, csv_file = tmp_path / "t.tex", tmp_path / "t.csv"
    argv = [str(sweep), "--group-by", "model.name", "compression.prune.sparsity"]
    argv += ["--metrics", "ndcg@10", "--latex", str(latex), "--csv", str(csv_file)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| mf | — | 0.3200 ± 0.0141 |" in out.splitlines()
    assert "| mf | 0.8 | 0.3100 ± 0.0141 |" in out.splitlines()
    assert r"\toprule" in latex.read_text() and "ndcg@10" in csv_file.read_text()


def test_cli_exit_codes(
    sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    script = load_script("make_table")
    assert script.main([str(sweep / "broken")]) == 1
    err = capsys.readouterr().err
    assert f"- {sweep / 'broken'}: failed: {FAILED_ERROR}" in err
    assert "error: none of the 1 runs completed" in err
    assert script.main([str(tmp_path / "nothing_here")]) == 2
    assert "no results.json found" in capsys.readouterr().err
    assert script.main([str(sweep), "--reference", "nope"]) == 2
    assert "--reference nope" in capsys.readouterr().err

    def offline(project: str, group: str | None) -> list[dict[str, Any]]:
        raise DataError(f"--wandb {project}: could not read runs; check `wandb login`")

    monkeypatch.setattr(script, "fetch_wandb_records", offline)
    assert script.main(["--wandb", "team/recsys", "--group", "g"]) == 2
    assert "wandb login" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--group", "g"])
