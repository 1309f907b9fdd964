"""Weights & Biases logging (``logger=wandb``): one W&B run per training job.

:func:`start_wandb_run` opens the job's run in ``<run dir>/wandb/`` (offline unless an API key is
configured or ``logger.mode=online``), named after the Hydra overrides, grouped by the Hydra sweep
and typed by the compression methods. :func:`wandb_logger` hands it to each Lightning Trainer, so
every metric logged with ``self.log`` flows there (the dense stage's under ``dense/``).
:func:`finish_wandb_run` ends a completed job: the summary becomes the flattened ``results.json``
record, with the per-layer compression table and a size-vs-metric plot as media.
:func:`end_wandb_run` ends a run its job left open (the job failed) with exit code 1 and the error
in the summary, so every job of a multirun is its own run.

wandb and matplotlib are imported only here and only when used (about 2 s together).
"""

from __future__ import annotations

import io
import json
import netrc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from recsys_compress.config import TrainConfig, config_to_dict
from recsys_compress.errors import ConfigError
from recsys_compress.results import RESULTS_FILE, write_json

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

# Kept out of the summary: the config is the run's config, the layers become a table.
_NOT_IN_SUMMARY = ("config", "wandb", "compression/layers")


def has_wandb_credentials() -> bool:
    """Whether a W&B API key is configured: ``WANDB_API_KEY`` (or an identity token file) in the
    environment, or a ``.netrc`` entry (``$NETRC`` or ``~/.netrc``) for the W&B server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """The W&B mode for ``logger.mode``: ``auto`` follows ``WANDB_MODE`` when it is online,
    offline or disabled, else goes online only with a configured API key.

    Raises :class:`ConfigError` for ``online`` without an API key (W&B would prompt or fail late).
    """
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "")
        if env_mode in ("online", "offline", "disabled"):
            mode = env_mode
        else:
            return "online" if has_wandb_credentials() else "offline"
    if mode == "online" and not has_wandb_credentials():
        raise ConfigError(
            "W&B mode online (logger.mode or WANDB_MODE) but no W&B API key is configured: run "
            "`wandb login` (or set WANDB_API_KEY), or use logger.mode=offline and `wandb sync` "
            "the run later."
        )
    return mode


def run_identity(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Name, group, job type and tags of the job's run.

    name: the Hydra task overrides joined (``model=neumf,compression=qat,seed=1``), else the run
    dir's name; group: ``logger.group``, else the sweep dir's name in a multirun (all jobs of one
    sweep together); job_type: the compression methods (``prune+qat``) or ``dense``.
    """
    name, group = cfg.logger.run_name, cfg.logger.group
    if HydraConfig.initialized():
        name = name or ",".join(HydraConfig.get().overrides.task)
    if group is None and (sweep := sweep_dir()) is not None:
        group = sweep.name
    methods = cfg.compression.methods()
    job_type = "+".join(methods) or "dense"
    tags = list(dict.fromkeys([*cfg.logger.tags, cfg.model.name, *(methods or ["dense"])]))
    return {"name": name or run_dir.name, "group": group, "job_type": job_type, "tags": tags}


def sweep_dir() -> Path | None:
    """The Hydra sweep directory when this job is part of a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).resolve()


def start_wandb_run(cfg: TrainConfig, run_dir: Path) -> Run | None:
    """Open the job's W&B run in ``run_dir/wandb`` with the validated config; ``None`` unless
    ``logger=wandb`` (and on DDP ranks other than 0). In a multirun the run is also linked into
    ``<sweep dir>/wandb/``, so ``wandb leet <sweep dir>/wandb`` browses all jobs together."""
    if cfg.logger.name != "wandb" or rank_zero_only.rank != 0:
        return None
    import wandb

    mode = resolve_mode(cfg.logger.mode)
    if wandb.run is not None:
        # Left open by a train() call that raised outside main(): it belongs to a failed job.
        end_wandb_run(None)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        dir=str(run_dir),
        mode=mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        config=config_to_dict(cfg),
        **run_identity(cfg, run_dir),
    )
    # Lightning logs trainer/global_step with every metric; it is each chart's x axis.
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    sweep = sweep_dir()
    if sweep is not None and mode != "disabled":
        job_run = Path(run.settings.sync_dir)
        (sweep / "wandb").mkdir(parents=True, exist_ok=True)
        link = sweep / "wandb" / job_run.name
        link.symlink_to(os.path.relpath(job_run, link.parent), target_is_directory=True)
    return run


def wandb_logger(stage_dir: Path) -> WandbLogger:
    """A Lightning logger writing to the job's open run. A stage in a subdirectory of the run dir
    (the dense stage in ``<run dir>/dense``) logs under that prefix: ``dense/val/ndcg@10``."""
    import wandb

    run = wandb.run
    if run is None:
        if rank_zero_only.rank == 0:
            raise RuntimeError("logger=wandb: start_wandb_run() must open the run before fitting")
        return WandbLogger()  # other DDP ranks log nothing
    root = Path(run.settings.root_dir)
    stage = stage_dir.resolve()
    prefix = stage.relative_to(root).as_posix() if stage.is_relative_to(root) else ""
    logger = WandbLogger(experiment=run, prefix="" if prefix == "." else prefix)
    logger.LOGGER_JOIN_CHAR = "/"
    return logger


def run_info(run: Run) -> dict[str, Any]:
    """Where the job's W&B run lives (the ``wandb`` field of results.json)."""
    mode = run.settings.mode
    return {
        "run_id": run.id,
        "dir": run.settings.sync_dir if mode != "disabled" else None,
        "mode": mode,
        "project": run.project,
        "group": run.group or None,
        "url": run.url if mode == "online" else None,
    }


def flatten_record(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The results record as ``/``-joined keys (``test/ndcg@10``, ``compression/artifact_bytes``,
    ``dense/test/ndcg@10``): the names the per-epoch metrics are logged under, so the summary's
    final values replace the last logged ones. The config and the per-layer list are left out."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if name in _NOT_IN_SUMMARY:
            continue
        if isinstance(value, dict):
            flat.update(flatten_record(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def finish_wandb_run(run: Run, record: dict[str, Any]) -> None:
    """End a completed job's run: summary = the flattened record, the per-layer compression table
    and the size-vs-metric plot as media, exit code 0."""
    import wandb

    compression = record.get("compression", {})
    media: dict[str, Any] = {}
    if layers := compression.get("layers"):
        columns = list(layers[0])
        media["compression/layers"] = wandb.Table(
            columns=columns, data=[[layer[c] for c in columns] for layer in layers]
        )
    if compression.get("methods"):
        key = record["monitor"].split("/", 1)[1]
        media[f"compression/size_vs_{key}"] = wandb.Image(_size_vs_metric_png(record, key))
    if media:
        run.log(media)
    run.summary.update(flatten_record(record))
    run.finish(exit_code=0)


def end_wandb_run(run_dir: Path | None) -> None:
    """Finish the run a job left open (it failed before :func:`finish_wandb_run`): the failed
    record of ``run_dir/results.json`` goes into the summary and the run ends with exit code 1;
    the record gains the ``wandb`` field. Does nothing when no run is open."""
    wandb = sys.modules.get("wandb")  # not imported: no run was started (logger is not wandb)
    run = wandb.run if wandb is not None else None
    if run is None:
        return
    results = run_dir / RESULTS_FILE if run_dir is not None else None
    record: dict[str, Any] = {}
    if results is not None and results.is_file():
        record = json.loads(results.read_text())
    if record.get("status") != "failed":
        record = {"status": "failed", "error": "the job ended before writing its results"}
    elif results is not None and "wandb" not in record:
        write_json(results, {**record, "wandb": run_info(run)})
    run.summary.update(flatten_record(record))
    run.finish(exit_code=1)


def _size_vs_metric_png(record: dict[str, Any], key: str) -> Any:
    """Bytes on disk against test ``key``, dense (when trained first) and compressed."""
    from matplotlib.figure import Figure
    from PIL import Image

    points = []
    if dense := record.get("dense"):
        points.append(("dense", dense["artifact_bytes"], dense["test"][key]))
    points.append(("compressed", record["compression"]["artifact_bytes"], record["test"][key]))
    fig = Figure(figsize=(4, 3), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, size, value in points:
        ax.scatter([size / 1024], [value], label=label)
    ax.set_xlabel("bytes on disk (KiB)")
    ax.set_ylabel(f"test {key}")
    ax.set_title(" + ".join(record["compression"]["methods"]))
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer)
