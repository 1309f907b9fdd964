"""Collect run records (``results.json`` files or W&B runs) and aggregate them into tables.

A table groups completed runs into cells by config values (row keys x column keys), aggregates
each metric over the runs of a cell (the seeds) as mean ± std, and marks the best cell of each
column. Runs that did not complete are kept as failures, never dropped. Rendering to Markdown,
LaTeX and CSV is in ``table_formats.py``; published numbers to join are in ``references.py``.
"""

from __future__ import annotations

import glob
import json
import re
import statistics
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_compress.errors import DataError
from recsys_compress.results import RESULTS_FILE

if TYPE_CHECKING:
    from recsys_compress.reporting.references import Reference, ReferenceEntry

_MISSING = object()
# Metrics where smaller is better unless overridden: sizes, ratios of sizes, times, errors.
LOWER_IS_BETTER = re.compile(r"bytes|ratio|seconds|size|params|nnz|loss|rmse|mae|mse|time")


def collect_results(patterns: Iterable[str]) -> list[dict[str, Any]]:
    """Every ``results.json`` under the given run / sweep dirs or globs, sorted by path.

    A file that cannot be parsed becomes a record with ``status="unreadable"`` (never dropped).
    """
    patterns = list(patterns)
    files: set[Path] = set()
    for pattern in patterns:
        for match in glob.glob(pattern, recursive=True) or [pattern]:
            path = Path(match)
            if path.is_file() and path.name == RESULTS_FILE:
                files.add(path)
            elif path.is_dir():
                files.update(path.rglob(RESULTS_FILE))
    if not files:
        raise DataError(f"no {RESULTS_FILE} found under {patterns}: pass run or sweep directories.")
    records = []
    for path in sorted(files):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            record = {"status": "unreadable", "error": str(err)}
        if not isinstance(record, dict):
            record = {"status": "unreadable", "error": "not a JSON object"}
        record.setdefault("run_dir", str(path.parent))
        records.append(record)
    return records


def records_from_wandb(runs: Iterable[Any], project: str) -> list[dict[str, Any]]:
    """W&B runs (objects with ``.name``, ``.state``, ``.config``, ``.summary``) as records.

    Our runs (``logger=wandb``) log the validated config as their config and the results record
    as their summary, flattened with ``/`` (``test/ndcg@10``, ``compression/artifact_ratio``);
    both are nested back, so a finished run converts to what its ``results.json`` holds. A run
    whose summary has no ``status`` (it crashed or is still running) becomes a failure.
    """
    records = []
    for run in runs:
        record = _unflatten(_public(_plain(run.summary)), "/")
        config = _unflatten(_public(_plain(run.config)), ".")
        if config:
            record["config"] = config
        if "status" not in record:
            record["status"] = f"no results (W&B state {run.state})"
        record["run_dir"] = f"wandb:{project}/{run.name}"
        records.append(record)
    return records


def fetch_wandb_records(project: str, group: str | None = None, api: Any = None) -> list[dict]:
    """The records of the runs of ``ENTITY/PROJECT`` (only those of ``group`` if given).

    ``api`` is a ``wandb.Api`` (default: a new one). Any failure to reach W&B or read a run is a
    :class:`DataError` that names the ``--wandb`` option and says to check login and network.
    """
    if project.count("/") != 1 or not all(project.split("/")):
        raise DataError(f"--wandb {project!r}: expected ENTITY/PROJECT, e.g. my-team/recsys.")
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=30)
        # Runs load their config and summary lazily: convert inside the try as well.
        records = records_from_wandb(
            api.runs(project, filters={"group": group} if group else None), project
        )
    except Exception as err:
        raise DataError(
            f"--wandb {project}: could not read runs from W&B ({type(err).__name__}: {err}). "
            "Check `wandb login` (or WANDB_API_KEY) and the network, or pass run directories."
        ) from err
    if not records:
        where = f" in group {group!r}" if group else ""
        raise DataError(f"--wandb {project}: no runs{where}; check the project and --group.")
    return records


def _plain(value: Any) -> Any:
    """Mappings (W&B summaries and their sub-dicts included) as plain nested dicts."""
    if hasattr(value, "items"):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _public(values: dict[str, Any]) -> dict[str, Any]:
    """Without W&B's own entries (``_runtime``, ``_step``, ``_wandb``)."""
    return {key: value for key, value in values.items() if not key.startswith("_")}


def _unflatten(flat: dict[str, Any], sep: str) -> dict[str, Any]:
    """``{"test/ndcg@10": 0.3}`` as ``{"test": {"ndcg@10": 0.3}}`` (already nested values too)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(sep)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            if isinstance(value, dict) and isinstance(node.get(leaf), dict):
                node[leaf].update(value)
            else:
                node[leaf] = value
    return nested


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _pretrained(record: dict[str, Any]) -> bool:
    return _lookup(record.get("config"), "model.pretrained_gmf") not in (None, _MISSING)


# Grouping keys computed from the config rather than read from it.
DERIVED_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {"pretrained": _pretrained}


def hashable(value: Any) -> Hashable:
    """A config value usable as (part of) a group key: lists as tuples, dicts as JSON text."""
    if isinstance(value, list | tuple):
        return tuple(hashable(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def group_value(record: dict[str, Any], key: str) -> Hashable:
    """The value a run is grouped (or matched to a reference) by; None where it has none.

    ``key`` is a derived key (``pretrained``: NeuMF initialised from GMF + MLP runs), a dotted
    config key (``model.name``, ``compression.prune.sparsity``) or, failing that, a dotted key of
    the record itself (``compression.methods``, ``data.num_users``).
    """
    if key in DERIVED_KEYS:
        return DERIVED_KEYS[key](record)
    value = _lookup(record.get("config"), key)
    if value is _MISSING:
        value = _lookup(record, key)
    return None if value is _MISSING else hashable(value)


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
    value = _lookup(record, metric)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if is_number else None


def higher_is_better(metric: str, higher: Iterable[str] = (), lower: Iterable[str] = ()) -> bool:
    """Ranking metrics (and shares of them): higher is better; sizes, bytes, ratios, seconds and
    errors: lower is better. ``higher`` / ``lower`` name metrics that override the rule."""
    if metric in set(higher):
        return True
    if metric in set(lower):
        return False
    return not LOWER_IS_BETTER.search(metric.removeprefix("share:"))


def decimals(value: float, digits: int) -> int:
    """Decimals to print ``value`` with: ``digits``, none for magnitudes of 1000 and above."""
    return 0 if abs(value) >= 1000 else digits


@dataclass(frozen=True)
class Stats:
    """A metric over the runs of a cell; ``std`` (sample, n - 1) is None for a single run."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class Failure:
    """A run that did not complete (or whose results could not be read)."""

    run: str
    status: str
    error: str

    @classmethod
    def of(cls, record: dict[str, Any]) -> Failure:
        error = str(record.get("error") or "").strip().splitlines()
        return cls(str(record.get("run_dir")), str(record.get("status")), error[0] if error else "")


@dataclass
class Cell:
    """The completed runs of one (row, column) group and their metric values."""

    records: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def stats(self, metric: str) -> Stats | None:
        values = self.values.get(metric, [])
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return Stats(statistics.fmean(values), std, len(values))


Key = tuple[Hashable, ...]


@dataclass
class Table:
    """Cells by (row key values, column key values); see :func:`build_table`."""

    rows: list[str]
    cols: list[str]
    metrics: list[str]
    digits: int
    row_values: list[Key]
    col_values: list[Key]
    cells: dict[tuple[Key, Key], Cell]
    failures: list[Failure]
    higher: dict[str, bool]
    best: set[tuple[Key, Key, str]]
    reference: Reference | None = None
    papers: dict[tuple[Key, Key], ReferenceEntry] = field(default_factory=dict)

    def stats(self, row: Key, col: Key, metric: str) -> Stats | None:
        cell = self.cells.get((row, col))
        return cell.stats(metric) if cell else None

    def is_best(self, row: Key, col: Key, metric: str) -> bool:
        return (row, col, metric) in self.best

    @property
    def reference_metrics(self) -> list[str]:
        """The metrics printed as ours | paper | Δ (those the reference has numbers for)."""
        return [m for m in self.metrics if self.reference and m in self.reference.metrics]

    def paper(self, row: Key, col: Key, metric: str) -> tuple[float, ReferenceEntry] | None:
        entry = self.papers.get((row, col))
        if entry is None or metric not in entry.metrics:
            return None
        return entry.metrics[metric], entry

    @property
    def citations(self) -> list[str]:
        """Citations of the matched reference entries, numbered in this order in footnotes."""
        cited = [
            self.papers[(r, c)].citation
            for r in self.row_values
            for c in self.col_values
            if (r, c) in self.papers
        ]
        return list(dict.fromkeys(cited))

    @property
    def missing_metrics(self) -> list[str]:
        """Metrics that no completed run has (a misspelt name or the wrong ``part``)."""
        return [m for m in self.metrics if not any(m in c.values for c in self.cells.values())]

    @property
    def common_n(self) -> int | None:
        """The number of runs behind every value of the table, if it is the same everywhere."""
        counts = {len(v) for cell in self.cells.values() for v in cell.values.values()}
        return counts.pop() if len(counts) == 1 else None


def build_table(
    records: Sequence[dict[str, Any]],
    rows: Sequence[str],
    cols: Sequence[str],
    metrics: Sequence[str],
    part: str = "test",
    *,
    digits: int = 4,
    higher: Iterable[str] = (),
    lower: Iterable[str] = (),
    reference: Reference | None = None,
) -> Table:
    """Group completed runs by the ``rows`` and ``cols`` keys (see :func:`group_value`) and
    collect each metric (see :func:`record_value`) per cell; other runs become failures.

    The best mean of each (column, metric) is marked where at least two rows have a value,
    comparing means as printed (``digits``), so ties are all marked. With ``reference``, each
    cell is joined to the most specific entry that all of its runs match.
    """
    higher, lower = list(higher), list(lower)
    cells: dict[tuple[Key, Key], Cell] = {}
    failures = []
    for record in records:
        if record.get("status") != "completed":
            failures.append(Failure.of(record))
            continue
        row = tuple(group_value(record, key) for key in rows)
        col = tuple(group_value(record, key) for key in cols)
        cell = cells.setdefault((row, col), Cell())
        cell.records.append(record)
        for metric in metrics:
            value = record_value(record, metric, part)
            if value is not None:
                cell.values.setdefault(metric, []).append(value)
    table = Table(
        rows=list(rows),
        cols=list(cols),
        metrics=list(metrics),
        digits=digits,
        row_values=sorted({row for row, _ in cells}, key=_sort_key),
        col_values=sorted({col for _, col in cells}, key=_sort_key),
        cells=cells,
        failures=failures,
        higher={m: higher_is_better(m, higher, lower) for m in metrics},
        best=set(),
        reference=reference,
    )
    for col in table.col_values:
        for metric in metrics:
            table.best |= _best_rows(table, col, metric)
    if reference is not None:
        for key, cell in cells.items():
            entry = reference.find(cell.records)
            if entry is not None:
                table.papers[key] = entry
    return table


def _best_rows(table: Table, col: Key, metric: str) -> set[tuple[Key, Key, str]]:
    shown = {}
    for row in table.row_values:
        stats = table.stats(row, col, metric)
        if stats is not None:
            shown[row] = round(stats.mean, decimals(stats.mean, table.digits))
    if len(shown) < 2:
        return set()
    pick = max if table.higher[metric] else min
    best = pick(shown.values())
    return {(row, col, metric) for row, value in shown.items() if value == best}


def _sort_key(values: Key) -> tuple[tuple[int, Any], ...]:
    """None first, then numbers in numeric order, then everything else as text."""
    key = []
    for value in values:
        if value is None:
            key.append((0, 0))
        elif isinstance(value, int | float):
            key.append((1, value))
        else:
            key.append((2, str(value)))
    return tuple(key)
