"""What every benchmark section returns, and the small timing / memory helpers they share.

A section is a module with ``run(quick: bool) -> list[Figure]``. Figures are ratios against a
reference measured in the same process where the issue asks for one, because the machine is shared
and noisy; absolute times and throughputs go into ``details``.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import OmegaConf


@dataclass
class Figure:
    """One measured figure and its target: passes when ``value <op> target``."""

    section: str
    name: str
    value: float
    target: float | None = None
    op: str = "<="
    unit: str = "x"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """None for figures reported without a target."""
        if self.target is None:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def median_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rotated(names: list[str], round_: int) -> list[str]:
    """The order of one round of alternated runs: each round starts one name later, so no run
    always follows the same other one (nor, with three or more, runs twice in a row)."""
    start = round_ % len(names) if names else 0
    return names[start:] + names[:start]


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1
) -> dict[str, float]:
    """Median time of each function, timed in alternation so that load on a shared machine
    hits all of them alike (a ratio of two medians taken minutes apart is mostly noise)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeat):
        for name in rotated(list(fns), i):
            fn = fns[name]
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def rss_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``: resident now,
    ``VmHWM``: its peak resident memory), in MB; OSError where there is none (not Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def peak_rss_mb() -> float:
    """This process's own peak resident memory so far, in MB.

    ``VmHWM`` on Linux: ``getrusage``'s ``ru_maxrss`` is carried across ``exec``, so a
    subprocess started by a parent that once held 3 GB reported at least 3 GB (every scale step
    of a full ``scripts/bench.py`` run read 2.9 GB, the compression section's peak). Elsewhere
    ``ru_maxrss`` (KB on Linux, bytes on macOS), an upper bound."""
    try:
        return rss_mb("VmHWM")
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def optim_preset(name: str) -> dict[str, Any]:
    """The ``optim=<name>`` config group (``conf/optim/<name>.yaml``) as a dict: a benchmark of an
    optimizer path runs the settings a user selects with it (its learning rate included)."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optim" / f"{name}.yaml"))
    assert isinstance(preset, dict)
    return {str(key): value for key, value in preset.items()}


def bare_trainer(**kwargs: Any) -> L.Trainer:
    """A CPU Trainer without logger, progress bar, checkpoints or validation: the cost of the
    training loop and the callbacks under test only."""
    return L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        **kwargs,
    )
