"""Collect ``results.json`` records and aggregate seeds into mean ± std tables."""

from __future__ import annotations

import glob
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_compress.errors import DataError
from recsys_compress.results import RESULTS_FILE


def collect_results(patterns: Iterable[str]) -> list[dict[str, Any]]:
    """Every ``results.json`` under the given run / sweep dirs or globs, sorted by path.

    A file that cannot be parsed becomes a record with ``status="unreadable"`` (never dropped).
    """
    files: set[Path] = set()
    for pattern in patterns:
        for match in glob.glob(pattern, recursive=True) or [pattern]:
            path = Path(match)
            if path.is_file() and path.name == RESULTS_FILE:
                files.add(path)
            elif path.is_dir():
                files.update(path.rglob(RESULTS_FILE))
    if not files:
        raise DataError(
            f"no {RESULTS_FILE} found under {list(patterns)}: pass run or sweep directories."
        )
    records = []
    for path in sorted(files):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            record = {"status": "unreadable", "error": str(err)}
        record.setdefault("run_dir", str(path.parent))
        records.append(record)
    return records


def config_value(record: dict[str, Any], dotted: str) -> Any:
    """``record["config"]`` looked up by a dotted key such as ``model.name`` (None if absent)."""
    value: Any = record.get("config", {})
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def record_value(record: dict[str, Any], metric: str, part: str) -> float | None:
    """A figure of a run: ``ndcg@10`` is ``record[part]["ndcg@10"]``; a dotted path such as
    ``compression.artifact_ratio`` or ``dense.test.ndcg@10`` is read from the record's root;
    ``share:ndcg@10`` is the compressed value over the dense one of a two-stage run."""
    if metric.startswith("share:"):
        name = metric.removeprefix("share:")
        value = record.get(part, {}).get(name)
        dense = record.get("dense", {}).get(part, {}).get(name)
        return value / dense if value is not None and dense else None
    if metric in record.get(part, {}):
        return float(record[part][metric])
    value: Any = record
    for key in metric.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


@dataclass
class Row:
    """One group of runs: its key values, per-metric values over seeds, and failed runs."""

    key: tuple[Any, ...]
    values: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def mean_std(self, metric: str) -> tuple[float, float] | None:
        values = self.values.get(metric, [])
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(
    records: Sequence[dict[str, Any]], group_by: Sequence[str], metrics: Sequence[str], part: str
) -> list[Row]:
    """Group completed runs by config keys; collect ``record[part][metric]`` per group."""
    rows: dict[tuple[Any, ...], Row] = {}
    for record in records:
        key = tuple(config_value(record, k) for k in group_by)
        row = rows.setdefault(key, Row(key))
        if record.get("status") != "completed":
            row.failed.append(f"{record.get('run_dir')}: {record.get('status')}")
            continue
        for metric in metrics:
            value = record_value(record, metric, part)
            if value is not None:
                row.values.setdefault(metric, []).append(value)
    return [rows[k] for k in sorted(rows, key=lambda k: tuple(map(str, k)))]


def to_markdown(rows: Sequence[Row], group_by: Sequence[str], metrics: Sequence[str]) -> str:
    """A Markdown table, ``mean ± std (n=seeds)``; failed runs are listed below it."""
    lines = [
        "| " + " | ".join([*group_by, *metrics, "runs"]) + " |",
        "|" + "---|" * (len(group_by) + len(metrics) + 1),
    ]
    notes = []
    for row in rows:
        cells = [str(v) for v in row.key]
        for metric in metrics:
            stats = row.mean_std(metric)
            cells.append("–" if stats is None else f"{stats[0]:.4f} ± {stats[1]:.4f}")
        count = max((len(v) for v in row.values.values()), default=0)
        cells.append(str(count) + (f" ({len(row.failed)} failed)" if row.failed else ""))
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- failed: {failure}" for failure in row.failed]
    return "\n".join(lines + (["", *notes] if notes else []))
