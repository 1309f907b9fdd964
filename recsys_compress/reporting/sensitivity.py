"""Per-layer sensitivity of a trained model to compression, without retraining.

Each targeted ``nn.Embedding`` / ``nn.Linear`` is compressed alone, at several strengths, and the
validation metric (full ranking) is measured; then the layer is restored exactly (the original
module object, or its weight copied back). The drop ``baseline - compressed`` says which layers
tolerate which method, e.g. to choose per-layer sparsities or bit widths.

Methods and their strengths:

- ``prune``: unstructured magnitude pruning of the layer at a sparsity in [0, 1] (0: identity);
- ``svd``: the best low-rank factorisation keeping a fraction in (0, 1] of the layer's parameters
  (:func:`~recsys_compress.compression.lowrank.rank_for_param_ratio`); layers that no rank shrinks
  (``n + d >= n*d``) are skipped;
- ``qat``: post-training quantisation of the layer to 8 or 4 bits (the project's QAT scheme,
  per-channel symmetric, without float16 rounding of the other layers).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys_compress.compression.lowrank import factorize_module, rank_for_param_ratio
from recsys_compress.compression.pruning import _keep_top
from recsys_compress.compression.qat import QATConfig, post_training_quantize
from recsys_compress.compression.targets import TargetSpec, replace_module, select_targets
from recsys_compress.config import TrainConfig, to_train_config
from recsys_compress.data.datamodule import Batch
from recsys_compress.errors import ConfigError, DataError
from recsys_compress.export import ARTIFACT_NAME, load_compressed
from recsys_compress.models import Recommender, build_model
from recsys_compress.module import RecommenderModule
from recsys_compress.reporting.figures import save_figure
from recsys_compress.results import RESULTS_FILE
from recsys_compress.train import build_datamodule

METHODS = ("prune", "svd", "qat")
DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {
    "prune": (0.0, 0.5, 0.8, 0.9, 0.95),
    "svd": (1.0, 0.5, 0.25, 0.1),
    "qat": (8, 4),
}
STRENGTH_LABELS = {
    "prune": "sparsity",
    "svd": "parameter ratio kept",
    "qat": "weight bits",
}
KEY = "sensitivity"

ProbeHook = Callable[[nn.Module, str, str, float], None]


class NotApplicable(ValueError):
    """The method cannot compress this layer (e.g. no SVD rank shrinks a ``Linear(d, 1)``)."""


@dataclass
class Probe:
    """One layer compressed by one method at one strength. ``value`` / ``drop`` are None when the
    method cannot compress the layer (``note`` says why); ``detail`` holds e.g. the SVD rank."""

    layer: str
    method: str
    strength: float
    value: float | None
    drop: float | None
    detail: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass
class SensitivityResult:
    """Every probe of one run, with the uncompressed model's validation metric."""

    run_dir: str
    metric: str
    baseline: float
    layers: list[str]
    strengths: dict[str, list[float]]
    probes: list[Probe]

    def drops(self, method: str) -> dict[str, dict[float, float | None]]:
        """``{layer: {strength: drop}}`` of one method."""
        table: dict[str, dict[float, float | None]] = {layer: {} for layer in self.layers}
        for p in self.probes:
            if p.method == method:
                table[p.layer][p.strength] = p.drop
        return table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_strengths(method: str, strengths: Sequence[float]) -> list[float]:
    """The strengths as floats; ConfigError naming ``--strengths`` when out of range."""
    if method not in METHODS:
        raise ConfigError(f"{KEY}: unknown method {method!r}; use some of {', '.join(METHODS)}.")
    values = [float(s) for s in strengths]
    if not values:
        raise ConfigError(f"{KEY}: --strengths {method}= is empty.")
    ok = {
        "prune": lambda s: 0.0 <= s <= 1.0,
        "svd": lambda s: 0.0 < s <= 1.0,
        "qat": lambda s: s in (4.0, 8.0),
    }[method]
    bad = [s for s in values if not ok(s)]
    if bad:
        allowed = {"prune": "in [0, 1]", "svd": "in (0, 1]", "qat": "4 or 8"}[method]
        raise ConfigError(f"{KEY}: --strengths {method}={bad} must be {allowed}.")
    return values


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the ``round(sparsity * numel)`` smallest ``|w|`` of one layer."""
    return _keep_top(weight.detach().abs(), sparsity)


@contextmanager
def compressed_layer(
    model: nn.Module, name: str, method: str, strength: float
) -> Iterator[dict[str, Any]]:
    """Compress layer ``name`` of ``model`` in place for the body of the ``with``, then restore
    it exactly. Yields details (SVD rank, achieved sparsity, bits). Raises NotApplicable when the
    method cannot compress this layer (no SVD rank shrinks it; a one-column table to quantise)."""
    original = model.get_submodule(name)
    weight = original.weight
    if method == "prune":
        saved = weight.detach().clone()
        mask = magnitude_mask(weight, strength)
        with torch.no_grad():
            weight.mul_(mask)
        try:
            yield {"sparsity": float((weight == 0).float().mean())}
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        return
    if method == "svd":
        n, d = weight.shape
        if n + d >= n * d:
            raise NotApplicable(f"{name} [{n}, {d}]: no rank has fewer parameters than the layer")
        rank = rank_for_param_ratio(n, d, strength)
        new, info = factorize_module(original, rank)
        replace_module(model, name, new)
        detail = {"rank": rank, "relative_error": info["relative_error"]}
    else:
        group = "embedding" if isinstance(original, nn.Embedding) else "linear"
        targets = TargetSpec(groups=[group], include=[name], exclude=[])
        try:
            post_training_quantize(
                model, QATConfig(targets=targets, bits=int(strength), float_dtype="float32")
            )
        except ConfigError as err:
            raise NotApplicable(str(err)) from None
        detail = {"bits": int(strength)}
    try:
        yield detail
    finally:
        replace_module(model, name, original)


@torch.no_grad()
def evaluate(module: RecommenderModule, batches: Sequence[Batch], metric: str) -> float:
    """``metric`` of ``module.model`` over evaluation ``batches`` (the validation step of
    training, without a Trainer)."""
    module.eval()
    ranking = module.val_metrics["ranking"]
    ranking.reset()
    for index, batch in enumerate(batches):
        module.validation_step(batch, index)
    value = float(ranking.compute()[metric])
    ranking.reset()
    return value


def layer_sensitivity(
    module: RecommenderModule,
    batches: Sequence[Batch],
    strengths: dict[str, Sequence[float]],
    metric: str = "ndcg@10",
    targets: TargetSpec | None = None,
    on_probe: ProbeHook | None = None,
    run_dir: str = "",
) -> SensitivityResult:
    """Probe every target layer of ``module.model`` with every method and strength of
    ``strengths`` (``{"prune": [0.5, 0.9], ...}``). ``on_probe(model, layer, method, strength)``
    is called while a layer is compressed. The model is left as it was."""
    model = module.model
    checked = {m: validate_strengths(m, s) for m, s in strengths.items()}
    layers = [t.name for t in select_targets(model, targets or TargetSpec(), f"{KEY}.targets")]
    baseline = evaluate(module, batches, metric)
    probes = []
    for method, values in checked.items():
        for layer in layers:
            for strength in values:
                try:
                    with compressed_layer(model, layer, method, strength) as detail:
                        if on_probe is not None:
                            on_probe(model, layer, method, strength)
                        value = evaluate(module, batches, metric)
                except NotApplicable as err:
                    probes.append(Probe(layer, method, strength, None, None, note=str(err)))
                    continue
                probes.append(Probe(layer, method, strength, value, baseline - value, detail))
    return SensitivityResult(run_dir, metric, baseline, layers, checked, probes)


def load_dense_model(run_dir: Path, num_users: int, num_items: int, cfg: TrainConfig) -> nn.Module:
    """The run's dense model: ``dense/<artifact>`` of a two-stage run, else ``model.pt`` of a run
    without compression. DataError when the run kept no dense model."""
    artifact = run_dir / "dense" / ARTIFACT_NAME
    if artifact.is_file():
        model: Recommender = load_compressed(artifact).model
    elif cfg.compression.methods():
        raise DataError(
            f"{run_dir} has no dense model: its model.pt is compressed "
            f"({'+'.join(cfg.compression.methods())}) and it has no {artifact.relative_to(run_dir)}"
            "; use a run with compression=none, or with compression.dense_epochs > 0."
        )
    else:
        path = run_dir / "model.pt"
        if not path.is_file():
            raise DataError(f"{path} not found: train the run with save_model=true.")
        model = build_model(
            replace(cfg.model, pretrained_gmf=None, pretrained_mlp=None), num_users, num_items
        )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if (model.num_users, model.num_items) != (num_users, num_items):
        raise DataError(
            f"{run_dir}: the model has {model.num_users} users / {model.num_items} items, the "
            f"data of its config {num_users} / {num_items}: the data changed since training."
        )
    return model.eval()


def analyze_run(
    run_dir: str | Path,
    strengths: dict[str, Sequence[float]] | None = None,
    metric: str = "ndcg@10",
    targets: TargetSpec | None = None,
    on_probe: ProbeHook | None = None,
) -> SensitivityResult:
    """:func:`layer_sensitivity` of a finished run's dense model on its validation split, ranked
    over the full catalogue whatever protocol the run used."""
    strengths = {m: validate_strengths(m, s) for m, s in (strengths or DEFAULT_STRENGTHS).items()}
    run_dir = Path(run_dir)
    results = run_dir / RESULTS_FILE
    if not results.is_file():
        raise DataError(f"{results} not found: pass the directory of a finished run.")
    record = json.loads(results.read_text())
    if record.get("status") != "completed":
        raise DataError(f"{run_dir} did not complete (status {record.get('status')}).")
    cfg = to_train_config(record["config"])
    name, _, k = metric.partition("@")
    if not k.isdigit():
        raise ConfigError(f"{KEY}: --metric {metric!r} must look like ndcg@10.")
    evaluation = replace(cfg.eval, protocol="full", ks=[int(k)], metrics=[name], monitor="auto")
    datamodule = build_datamodule(replace(cfg, eval=evaluation))
    model = load_dense_model(run_dir, datamodule.num_users, datamodule.num_items, cfg)
    module = RecommenderModule(model, cfg.loss, cfg.optim, evaluation, explicit=False)
    return layer_sensitivity(
        module,
        datamodule.val_data.batches,
        strengths,
        metric,
        targets,
        on_probe,
        str(run_dir),
    )


def _strength_text(method: str, strength: float) -> str:
    return f"int{int(strength)}" if method == "qat" else f"{strength:g}"


def to_markdown(result: SensitivityResult) -> str:
    """One table per method: a row per layer, a column per strength, cells = metric drop
    (positive: worse than the uncompressed model; ``–``: the method does not apply)."""
    lines = [f"Uncompressed validation {result.metric}: {result.baseline:.4f}"]
    for method, strengths in result.strengths.items():
        drops = result.drops(method)
        header = [_strength_text(method, s) for s in strengths]
        lines += [
            "",
            f"**{method}** ({STRENGTH_LABELS[method]}): drop in {result.metric}",
            "",
            "| layer | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header),
        ]
        for layer, row in drops.items():
            cells = ["–" if row.get(s) is None else f"{row[s]:+.4f}" for s in strengths]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sensitivity(result: SensitivityResult, out_prefix: str | Path) -> list[Path]:
    """One panel per method, one line per layer: metric drop against strength (stronger
    compression to the right). Writes ``<prefix>.png`` and ``<prefix>.pdf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = list(result.strengths)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(5 * len(methods), 4.2), squeeze=False, sharey=True
    )
    for ax, method in zip(axes[0], methods, strict=True):
        for index, row in enumerate(result.drops(method).values()):
            points = sorted((s, d) for s, d in row.items() if d is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=f"C{index % 10}")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        if method == "qat":
            bits = sorted(result.strengths[method])
            ax.set_xticks(bits, [_strength_text(method, b) for b in bits])
        if method in ("svd", "qat"):
            ax.invert_xaxis()  # fewer parameters / bits = stronger compression
        ax.set_xlabel(STRENGTH_LABELS[method])
        ax.set_title(method)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"drop in validation {result.metric}")
    handles = [
        Line2D([], [], color=f"C{index % 10}", marker="o", label=layer)
        for index, layer in enumerate(result.layers)
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"per-layer sensitivity (uncompressed {result.metric} {result.baseline:.4f})")
    fig.tight_layout()
    return save_figure(fig, out_prefix)


def write_outputs(result: SensitivityResult, out_prefix: str | Path) -> list[Path]:
    """``<prefix>.png``, ``.pdf``, ``.md`` (the drop tables) and ``.json`` (every probe)."""
    prefix = Path(out_prefix)
    paths = plot_sensitivity(result, prefix)
    markdown = prefix.with_name(prefix.name + ".md")
    markdown.write_text(to_markdown(result) + "\n")
    data = prefix.with_name(prefix.name + ".json")
    data.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return [*paths, markdown, data]
