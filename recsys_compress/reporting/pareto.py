"""Size / quality trade-off of many runs: seed-averaged points per compression method and their
Pareto front (smaller artifact, higher metric), as a figure and a Markdown table.

A *configuration* is a run's config without its ``seed`` and the settings that change no result
(or, with ``group_by``, the values of those config keys); its seeds are averaged into one
:class:`ParetoPoint`. A record written before a config key existed joins the configuration it
agrees with (:func:`_configurations`). Runs whose record has
a ``dense`` section (two-stage runs) also contribute the dense model they started from, counted
once per seed however many compressed runs share it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_compress.reporting.figures import save_figure
from recsys_compress.reporting.tables import record_value
from recsys_compress.results import NEUTRAL_SETTINGS

DENSE = "dense"


def _shapes_dense_stage(key: str) -> bool:
    """Whether config ``key`` can change the dense stage of a two-stage run: its length is
    ``compression.dense_epochs``, and the other compression settings only act after it."""
    if key == "compression.dense_epochs":
        return True
    return key not in ("compression", "trainer.max_epochs") and not key.startswith("compression.")


@dataclass
class Observation:
    """One (size, metric) measurement: a run's compressed model, or the dense model before it."""

    method: str
    config: dict[str, Any]
    seed: Any
    size: float
    value: float
    run_dir: str
    dense_stage: bool = False  # the dense model a two-stage run started from (its config projected)


@dataclass
class ParetoPoint:
    """One configuration of one method, its seeds aggregated."""

    method: str
    config: dict[str, Any]
    sizes: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def size(self) -> float:
        return statistics.fmean(self.sizes)

    @property
    def size_std(self) -> float:
        return statistics.stdev(self.sizes) if len(self.sizes) > 1 else 0.0

    @property
    def value(self) -> float:
        return statistics.fmean(self.values)

    @property
    def value_std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(size, value)`` points, by increasing size.

    ``q`` dominates ``p`` when ``q.size <= p.size`` and ``q.value >= p.value`` with one of them
    strict. Equal points do not dominate each other, so duplicates on the front are all kept.
    Points with a NaN coordinate are never on the front.
    """
    order = sorted(
        (i for i, (s, v) in enumerate(points) if not (math.isnan(s) or math.isnan(v))),
        key=lambda i: (points[i][0], -points[i][1]),
    )
    front: list[int] = []
    best_smaller = -math.inf  # best value among strictly smaller sizes
    start = 0
    while start < len(order):
        size = points[order[start]][0]
        end = start
        while end < len(order) and points[order[end]][0] == size:
            end += 1
        top = points[order[start]][1]  # highest value at this size (sorted first)
        if top > best_smaller:
            front += [i for i in order[start:end] if points[i][1] == top]
            best_smaller = top
        start = end
    return front


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"model": {"dim": 8}}`` -> ``{"model.dim": 8}``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_value(record: dict[str, Any], dotted: str) -> Any:
    """``record["config"]`` looked up by a dotted key such as ``model.name`` (None if absent)."""
    value: Any = record.get("config", {})
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def method_of(record: dict[str, Any]) -> str:
    """``prune+qat`` for ``compression.methods == ["prune", "qat"]``; ``dense`` when none."""
    methods = record.get("compression", {}).get("methods") or []
    return "+".join(methods) or DENSE


def _configuration(
    record: dict[str, Any], group_by: Sequence[str] | None, dense: bool
) -> dict[str, Any]:
    """The keys that identify a run's configuration (seed left out)."""
    if group_by:
        return {k: config_value(record, k) for k in group_by if not dense or _shapes_dense_stage(k)}
    config = flatten(record.get("config", {}))
    for key in ("seed", *NEUTRAL_SETTINGS):  # the display, how L1's step was computed, ...
        config.pop(key, None)
    return {k: v for k, v in config.items() if not dense or _shapes_dense_stage(k)}


def observations(
    records: Sequence[dict[str, Any]],
    metric: str = "ndcg@10",
    size: str = "compression.artifact_bytes",
    group_by: Sequence[str] | None = None,
    part: str = "test",
) -> tuple[list[Observation], list[str]]:
    """The measurements in ``records`` and one line for each run that gave none (failed runs,
    runs without ``size`` or ``metric``): such runs are reported, never silently dropped.

    The dense point of a two-stage run is ``record["dense"]["artifact_bytes"]`` (the last part of
    ``size``, looked up in the dense section) and ``record["dense"][part][metric]``.
    """
    found: list[Observation] = []
    problems: list[str] = []
    for record in records:
        run_dir = str(record.get("run_dir"))
        if record.get("status") != "completed":
            error = record.get("error")
            problems.append(f"{run_dir}: {record.get('status')}" + (f" ({error})" if error else ""))
            continue
        seed = record.get("seed", config_value(record, "seed"))
        x, y = record_value(record, size, part), record_value(record, metric, part)
        if x is None or y is None:
            missing = " and ".join(n for n, v in ((size, x), (f"{part} {metric}", y)) if v is None)
            problems.append(f"{run_dir}: no {missing} in its results.json")
        else:
            config = _configuration(record, group_by, dense=False)
            found.append(Observation(method_of(record), config, seed, x, y, run_dir))
        dense = record.get("dense")
        if not isinstance(dense, dict):
            continue
        dense_size = size.rsplit(".", 1)[-1]
        x, y = record_value(dense, dense_size, part), record_value(dense, metric, part)
        config = _configuration(record, group_by, dense=True)
        if x is None or y is None:
            problems.append(f"{run_dir}: its dense section has no {dense_size} or {part} {metric}")
        else:  # one per run that shares it: aggregate_points counts it once per seed
            found.append(Observation(DENSE, config, seed, x, y, f"{run_dir}/dense", True))
    return found, problems


def _text_of(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _configurations(
    configs: Sequence[dict[str, Any]],
) -> tuple[list[int], list[dict[str, Any]]]:
    """For each of ``configs`` (one method's, one stage's), the index of the configuration it
    belongs to, and those configurations.

    A record written before a config key existed lacks it. Like ``skip_completed``
    (:func:`recsys_compress.results.completed_run`), such a record joins a configuration whose
    keys include all of its own and that agrees with it on them, when exactly one *full* such
    configuration exists (one with no such configuration of more keys): with two, say
    ``batches_per_call=1`` and ``16`` where it lacks the key, it stays apart, since which it ran
    is unknown. A key holding a value where the other has a section (``compression.prune:
    null`` against ``compression.prune.sparsity``) is a difference: neither key set contains
    the other. The result does not depend on the records' order; configurations are compared
    by their projection onto the smaller key set, so records of one version cost one pass."""
    texts = [_text_of(c) for c in configs]
    parsed = {t: json.loads(t) for t in set(texts)}
    buckets: dict[frozenset[str], list[str]] = {}
    for text in sorted(parsed):
        buckets.setdefault(frozenset(parsed[text]), []).append(text)
    wider: dict[str, list[str]] = {text: [] for text in parsed}
    for small, members in buckets.items():
        for large, others in buckets.items():
            if not small < large:
                continue
            by_projection: dict[str, list[str]] = {}
            for other in others:
                projected = _text_of({k: parsed[other][k] for k in small})
                by_projection.setdefault(projected, []).append(other)
            for text in members:
                wider[text] += by_projection.get(text, [])
    target = {}
    for text in parsed:
        full = [other for other in wider[text] if not wider[other]]
        target[text] = full[0] if wider[text] and len(full) == 1 else text
    roots = sorted(set(target.values()))
    index = {text: i for i, text in enumerate(roots)}
    return [index[target[t]] for t in texts], [parsed[t] for t in roots]


def aggregate_points(found: Sequence[Observation]) -> list[ParetoPoint]:
    """One point per (method, configuration): seeds averaged (a record that lacks newer config
    keys joins the one configuration it agrees with: :func:`_configurations`). Labels name the
    config keys that differ between the points of a method (or the ``group_by`` values)."""
    points: dict[tuple[str, str], ParetoPoint] = {}
    for method, stage in sorted({(obs.method, obs.dense_stage) for obs in found}):
        # a two-stage run's dense model has a projected config, which any whole config of a
        # dense-only run agrees with: the two are not joined (an equal config still is one point)
        mine = [obs for obs in found if (obs.method, obs.dense_stage) == (method, stage)]
        which, configs = _configurations([obs.config for obs in mine])
        dense_seen: set[tuple[int, str]] = set()
        for obs, group in zip(mine, which, strict=True):
            if stage:  # one dense model per seed, however many runs (of any version) share it
                if (group, str(obs.seed)) in dense_seen:
                    continue
                dense_seen.add((group, str(obs.seed)))
            config = configs[group]
            key = (method, _text_of(config))
            point = points.setdefault(key, ParetoPoint(method, config))
            point.sizes.append(obs.size)
            point.values.append(obs.value)
            point.run_dirs.append(obs.run_dir)
    result = [points[k] for k in sorted(points)]
    for method in {p.method for p in result}:
        mine = [p for p in result if p.method == method]
        keys = sorted({k for p in mine for k in p.config})
        varying = [k for k in keys if len({_text(p.config.get(k)) for p in mine}) > 1]
        for p in mine:
            parts = [f"{k.rsplit('.', 1)[-1]}={_text(p.config.get(k))}" for k in varying]
            p.label = method + (f" ({', '.join(parts)})" if parts else "")
    return result


def _text(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)


def front_markdown(
    points: Sequence[ParetoPoint], front: Sequence[int], metric: str, size: str
) -> str:
    """The front as a Markdown table, smallest first: size and metric as mean ± std over seeds."""
    lines = [
        f"| configuration | {size} | {metric} | seeds |",
        "|---|---:|---:|---:|",
    ]
    for i in front:
        p = points[i]
        lines.append(
            f"| {p.label} | {p.size:,.0f} ± {p.size_std:,.0f} | "
            f"{p.value:.4f} ± {p.value_std:.4f} | {p.n} |"
        )
    return "\n".join(lines)


def plot_pareto(
    points: Sequence[ParetoPoint],
    front: Sequence[int],
    metric: str,
    size: str,
    out_prefix: str | Path,
    part: str = "test",
) -> list[Path]:
    """Size (log x) against metric, one colour per method with std error bars; the front as a
    step line with its points labelled. Writes ``<prefix>.png`` and ``<prefix>.pdf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method in sorted({p.method for p in points}):
        mine = [p for p in points if p.method == method]
        ax.errorbar(
            [p.size for p in mine],
            [p.value for p in mine],
            xerr=[p.size_std for p in mine],
            yerr=[p.value_std for p in mine],
            fmt="o",
            capsize=3,
            alpha=0.8,
            label=method,
        )
    if front:
        xs = [points[i].size for i in front]
        ys = [points[i].value for i in front]
        ax.step(xs, ys, where="post", color="black", linewidth=1.2, label="Pareto front")
        ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="black", zorder=3)
        for i in front:
            ax.annotate(
                points[i].label,
                (points[i].size, points[i].value),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"{size} (log scale)")
    ax.set_ylabel(f"{part} {metric}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_prefix)
