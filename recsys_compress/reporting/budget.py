"""Budget mode: the best compression configuration whose artifact fits a size budget.

A budget is ``budget_bytes`` (bytes of the exported artifact) or ``budget_ratio`` (a fraction
of the dense float32 model's bytes). A run under a budget first bounds its artifact from below
with the config alone (:func:`min_artifact_bytes`: bits, sparsity and rank are known before
training); a config that cannot fit is not trained (``status: over_budget`` in results.json).
A trained run whose real artifact exceeds the budget is reported as over budget too; the sweeper
gets :data:`INFEASIBLE` for both, below any NDCG. :func:`main` reads a sweep's results and
prints the best configuration within budget and the trials over it:

    python scripts/budget_report.py outputs/multirun/<sweep dir> [more sweep dirs]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from recsys_compress.compression.accounting import encoded_bytes
from recsys_compress.compression.lowrank import rank_for_param_ratio
from recsys_compress.compression.qat import scheme_for
from recsys_compress.compression.targets import Target, select_targets
from recsys_compress.config import CompressionConfig, TrainConfig
from recsys_compress.reporting.tables import record_value

INFEASIBLE = -1.0  # the sweep objective of a trial over budget (NDCG and HR are >= 0)
RESULTS_FILE = "results.json"


def budget_limit(cfg: TrainConfig, dense_bytes: int) -> int | None:
    """The budget in bytes (``budget_bytes``, or ``budget_ratio`` x the dense fp32 bytes)."""
    if cfg.budget_bytes is not None:
        return cfg.budget_bytes
    if cfg.budget_ratio is not None:
        return int(cfg.budget_ratio * dense_bytes)
    return None


def _names(targets: list[Target]) -> dict[str, Target]:
    return {t.name: t for t in targets}


def min_artifact_bytes(model: nn.Module, comp: CompressionConfig) -> int:
    """A lower bound of the artifact bytes of ``model`` compressed by ``comp``, before training.

    Per targeted weight: SVD's rank (fixed or from ``param_ratio``; ``energy`` counts as rank 1),
    pruning's final sparsity (``threshold`` counts as all zeros), QAT's bits and scales, each
    tensor in the cheaper of the dense and bitmask encodings (as the export does). Parameters
    no method targets count 16 bits when QAT rounds them to float16, else 32. The export's
    metadata (config, ids) is not counted, so the real artifact is somewhat larger.
    """
    prune = _names(select_targets(model, comp.prune.targets, "prune")) if comp.prune else {}
    svd = _names(select_targets(model, comp.svd.targets, "svd")) if comp.svd else {}
    qat = _names(select_targets(model, comp.qat.targets, "qat")) if comp.qat else {}
    targeted = {**prune, **svd, **qat}
    weights = {id(t.weight) for t in targeted.values()}
    float_bits = 16 if comp.qat is not None and comp.qat.float_dtype == "float16" else 32
    total = sum(
        encoded_bytes(p.numel(), p.numel(), float_bits)
        for p in model.parameters()
        if id(p) not in weights
    )
    for name, target in targeted.items():
        rows, cols = target.weight.shape
        shapes = [(rows, cols)]
        if name in svd and comp.svd is not None:
            fixed, _ = comp.svd.group_rank(target.group)
            ratio = comp.svd.param_ratio
            rank = fixed or (rank_for_param_ratio(rows, cols, ratio) if ratio is not None else 1)
            shapes = [(rows, rank), (rank, cols)]
        for n, d in shapes:
            numel = n * d
            nnz = numel
            if name in prune and comp.prune is not None:
                sparsity = 1.0 if comp.prune.threshold is not None else 0.0
                sparsity = max(sparsity, comp.prune.final_sparsity(target.group))
                nnz = int(numel * (1.0 - sparsity))
            bits, scales, scale_bytes = 32, 0, 4
            if name in qat and comp.qat is not None and min(n, d) > 1:
                scheme = scheme_for(comp.qat, target.group)
                bits, scale_bytes = scheme.bits, scheme.scale_bytes
                group = scheme.group_size if scheme.group_size and d % scheme.group_size == 0 else d
                scales = n * (d // group)
            total += encoded_bytes(numel, nnz, bits, scales, scale_bytes)
    return total


def budget_record(limit: int, predicted: int, artifact: int | None) -> dict[str, Any]:
    """The ``budget`` entry of results.json."""
    within = predicted <= limit and (artifact is None or artifact <= limit)
    return {
        "limit_bytes": limit,
        "predicted_min_bytes": predicted,
        "artifact_bytes": artifact,
        "within": within,
    }


def budget_objective(record: dict[str, Any], names: list[str]) -> float | None:
    """A budget sweep's objective: the first optimized metric (default the monitored val
    metric) of a run within budget; :data:`INFEASIBLE` over budget; None if it failed."""
    budget = record.get("budget")
    if budget is not None and not budget["within"]:
        return INFEASIBLE
    if record.get("status") != "completed":
        return None
    name = names[0] if names else record["monitor"].split("/", 1)[1]
    value = record_value(record, name, "val")
    return None if value is None else float(value)


def load_trials(sweep_dirs: list[Path]) -> list[dict[str, Any]]:
    """Every ``results.json`` under the sweep dirs (one level: ``<sweep>/<job>/``) that has a
    ``budget`` entry, with its job dir and Hydra overrides added."""
    trials = []
    for sweep in sweep_dirs:
        for path in sorted(sweep.glob(f"*/{RESULTS_FILE}")):
            record = json.loads(path.read_text())
            if "budget" not in record:
                continue
            overrides_file = path.parent / ".hydra" / "overrides.yaml"
            overrides = []
            if overrides_file.exists():
                lines = overrides_file.read_text().splitlines()
                overrides = [line.removeprefix("- ").strip() for line in lines if line.strip()]
            trials.append({**record, "job_dir": str(path.parent), "overrides": overrides})
    return trials


def best_within_budget(trials: list[dict[str, Any]], metric: str = "ndcg@10") -> dict | None:
    """The completed trial within budget with the highest val ``metric`` (None if none)."""
    feasible = [
        t
        for t in trials
        if t.get("status") == "completed" and t["budget"]["within"] and metric in t.get("val", {})
    ]
    return max(feasible, key=lambda t: t["val"][metric], default=None)


def format_report(trials: list[dict[str, Any]], metric: str = "ndcg@10") -> str:
    """The best trial within budget (overrides, bytes, ratio, val and test ``metric``), then
    the trials over budget."""
    if not trials:
        return "no budget trials found (results.json with a budget entry)."
    limit = trials[0]["budget"]["limit_bytes"]
    # Each trial is named by its swept overrides (those not shared by every trial).
    common = set.intersection(*(set(t["overrides"]) for t in trials))
    swept = {t["job_dir"]: " ".join(o for o in t["overrides"] if o not in common) for t in trials}
    lines = [f"budget: {limit:,} bytes; {len(trials)} trials"]
    best = best_within_budget(trials, metric)
    if best is None:
        lines.append("no trial fits the budget: raise it, or widen the search (higher sparsity, ")
        lines.append("  int4, smaller svd.param_ratio).")
    else:
        comp = best["compression"]
        lines += [
            f"best within budget: {best['job_dir']}",
            f"  overrides: {swept[best['job_dir']] or '(none)'}",
            f"  methods: {' + '.join(comp['methods'])}",
            f"  artifact: {comp['artifact_bytes']:,} bytes, {comp['artifact_ratio']:.4f} of dense",
            f"  val {metric}: {best['val'][metric]:.4f}  test {metric}: "
            f"{best['test'].get(metric, float('nan')):.4f}",
        ]
    over = [t for t in trials if not t["budget"]["within"]]
    lines.append(f"over budget: {len(over)}")
    for t in over:
        size = t["budget"]["artifact_bytes"]
        how = (
            f"artifact {size:,} bytes"
            if size is not None
            else f"skipped, >= {t['budget']['predicted_min_bytes']:,} bytes predicted"
        )
        lines.append(f"  {swept[t['job_dir']] or t['job_dir']}: {how}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun dirs of budget sweeps")
    parser.add_argument("--metric", default="ndcg@10", help="val metric to maximise")
    args = parser.parse_args(argv)
    trials = load_trials(args.sweep_dirs)
    print(format_report(trials, args.metric))
    return 0 if best_within_budget(trials, args.metric) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
