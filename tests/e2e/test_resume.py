"""Crash and resume: a run killed with SIGKILL continues with ``resume=<run dir>`` to the metrics
of an uninterrupted run, for every compression method, a composition and both stages.

The killed runs and their resumes are subprocesses started together (imports dominate their
time); the uninterrupted references train in this process meanwhile.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from recsys_compress.errors import ConfigError
from recsys_compress.resume import (
    load_run_config,
    override_keys,
    resumed_config,
    save_run_config,
)
from recsys_compress.train import train
from tests.conftest import REPO
from tests.e2e.test_train import compose_config

COMMON = [
    "data=synthetic",
    "model.dim=16",
    "trainer.batch_size=512",  # 47 steps per epoch
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
    "trainer.checkpoint_every_n_steps=5",
    "trainer.checkpoint_max_overhead=null",  # ~10 rolling checkpoints an epoch to be killed at
    "logger=none",
    "compression.dense_epochs=0",
]
# (name, overrides, the checkpoint whose appearance triggers the kill)
CASES: dict[str, tuple[list[str], str]] = {
    "prune": (["compression=prune"], "checkpoints/last.ckpt"),
    "l1": (["compression=l1"], "checkpoints/last.ckpt"),
    "svd": (["compression=svd"], "checkpoints/last.ckpt"),
    "qat": (["compression=qat"], "checkpoints/last.ckpt"),
    "prune+qat, killed in the dense stage": (
        ["compression=[prune,qat]", "compression.dense_epochs=2"],
        "dense/checkpoints/last.ckpt",
    ),
    "prune+qat, killed after the dense stage": (
        ["compression=[prune,qat]", "compression.dense_epochs=2"],
        "checkpoints/last.ckpt",
    ),
}


@dataclass
class Job:
    name: str
    overrides: list[str]
    trigger: str
    run_dir: Path
    process: subprocess.Popen | None = None
    killed_at: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _start(args: list[str], hydra_dir: Path, cache: Path) -> subprocess.Popen:
    """``python -m recsys_compress.train`` with its output in ``<hydra_dir>.log``."""
    env = {**os.environ, "RECSYS_COMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    with open(f"{hydra_dir}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "recsys_compress.train", f"hydra.run.dir={hydra_dir}", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _output(process: subprocess.Popen) -> str:
    return Path(f"{process.args[3].split('=', 1)[1]}.log").read_text()


def _kill_on_checkpoint(jobs: list[Job], seed: int) -> None:
    """SIGKILL each job at a random point: 0-0.1 s after its trigger checkpoint was written for
    the k-th time, k random in 1..12 (a stage writes ~10 rolling checkpoints per epoch here)."""
    rng = random.Random(seed)
    wanted = {job.name: rng.randint(1, 12) for job in jobs}
    seen: dict[str, set[tuple[int, int]]] = {job.name: set() for job in jobs}
    deadline: dict[str, float] = {}
    pending = list(jobs)
    while pending:
        now = time.monotonic()
        for job in list(pending):
            assert job.process is not None
            if job.process.poll() is not None:
                job.error = f"finished before it was killed:\n{_output(job.process)[-3000:]}"
                pending.remove(job)
            elif job.name in deadline:
                if now >= deadline[job.name]:
                    job.process.send_signal(signal.SIGKILL)
                    job.process.wait()
                    pending.remove(job)
            else:
                try:
                    stat = (job.run_dir / job.trigger).stat()
                except FileNotFoundError:
                    continue
                seen[job.name].add((stat.st_ino, stat.st_mtime_ns))  # each save is a new file
                if len(seen[job.name]) >= wanted[job.name]:
                    deadline[job.name] = now + rng.uniform(0.0, 0.1)
        time.sleep(0.002)


def _checkpoint_position(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    return {"epoch": ckpt["epoch"], "global_step": ckpt["global_step"], "batches_done": batches}


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case killed, then resumed with ``resume=<run dir>``; and its uninterrupted run."""
    base = tmp_path_factory.mktemp("resume")
    cache = base / "cache"
    jobs = [
        Job(name, [*COMMON, *overrides], trigger, base / f"run{i}")
        for i, (name, (overrides, trigger)) in enumerate(CASES.items())
    ]
    for job in jobs:
        job.process = _start(job.overrides, job.run_dir, cache)
    killer = threading.Thread(target=_kill_on_checkpoint, args=(jobs, int(time.time())))
    killer.start()
    references = {}
    env = pytest.MonkeyPatch()
    env.setenv("RECSYS_COMPRESS_CACHE", str(cache))
    for i, job in enumerate(jobs):
        if job.name.startswith("prune+qat") and "prune+qat" in references:
            references[job.name] = references["prune+qat"]
            continue
        record = train(compose_config(job.overrides), base / f"reference{i}")
        references[job.name] = record
        if job.name.startswith("prune+qat"):
            references["prune+qat"] = record
    env.undo()
    killer.join()
    killed_state = {}
    for job in jobs:
        assert job.error is None, f"{job.name}: {job.error}"
        for stage in ("dense", "."):
            last = job.run_dir / stage / "checkpoints" / "last.ckpt"
            if last.is_file():
                job.killed_at[stage] = _checkpoint_position(last)
        dense_record = job.run_dir / "dense" / "stage.json"
        killed_state[job.name] = dense_record.stat().st_mtime_ns if dense_record.is_file() else None
        assert not (job.run_dir / "results.json").exists()
    resumes = [
        _start(
            ["resume=" + str(job.run_dir), "trainer.progress_bar=false", "logger=none"],
            base / f"resume-hydra{i}",
            cache,
        )
        for i, job in enumerate(jobs)
    ]
    for process in resumes:
        process.wait(timeout=600)
    outputs = [_output(process) for process in resumes]
    return {
        job.name: {
            "job": job,
            "reference": references[job.name],
            "returncode": process.returncode,
            "output": output,
            "dense_record_mtime": killed_state[job.name],
        }
        for job, process, output in zip(jobs, resumes, outputs, strict=True)
    }


def _max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[key] - b[key]) for key in a)


@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_to_the_uninterrupted_metrics(
    resumed_runs: dict[str, Any], case: str
) -> None:
    run = resumed_runs[case]
    job, reference = run["job"], run["reference"]
    assert run["returncode"] == 0, run["output"][-3000:]
    assert f"Resuming {job.run_dir.resolve()}" in run["output"]
    resumed = json.loads((job.run_dir / "results.json").read_text())
    assert resumed["status"] == "completed"
    differences = {
        part: _max_difference(reference[part], resumed[part]) for part in ("val", "test")
    }
    if "dense" in reference:
        for part in ("val", "test"):
            differences[f"dense {part}"] = _max_difference(
                reference["dense"][part], resumed["dense"][part]
            )
    print(f"{case}: killed at {job.killed_at}; max |difference| {differences}")
    assert max(differences.values()) <= 1e-6, differences
    for key in ("epochs_trained", "best_epoch", "num_params"):
        assert resumed[key] == reference[key]
    assert resumed["compression"]["artifact_bytes"] == reference["compression"]["artifact_bytes"]
    assert resumed["compression"]["methods"] == reference["compression"]["methods"]


def test_a_finished_dense_stage_is_not_redone(resumed_runs: dict[str, Any]) -> None:
    run = resumed_runs["prune+qat, killed after the dense stage"]
    job = run["job"]
    assert "." in job.killed_at  # the compression stage had started
    # the resumed run read the dense stage's record instead of training it again
    assert run["dense_record_mtime"] is not None
    assert (job.run_dir / "dense" / "stage.json").stat().st_mtime_ns == run["dense_record_mtime"]


def test_resume_refuses_overrides_that_change_the_run(tmp_path: Path) -> None:
    cfg = compose_config([*COMMON, "compression=prune"])
    record = train(cfg, tmp_path / "run")
    assert record["status"] == "completed"
    given = compose_config([*COMMON, "compression=prune", "model.dim=32"])
    with pytest.raises(Exception, match=r"model.dim \(run: 16\)"):
        resumed_config(given, ["model.dim", "trainer.progress_bar"], tmp_path / "run")
    # repeating the run's own settings (and changing the display) is fine
    same = resumed_config(
        compose_config([*COMMON, "compression=prune", "trainer.progress_bar=true"]),
        ["compression", "model.dim", "trainer.progress_bar"],
        tmp_path / "run",
    )
    assert same.trainer.progress_bar and same.model == load_run_config(tmp_path / "run").model
    # checkpoint spacing by time may change (a crash-prone machine wants more frequent writes);
    # spacing by steps may not: it sets how many batches one training step takes
    assert load_run_config(tmp_path / "run").trainer.checkpoint_max_overhead is None
    plain = resumed_config(compose_config([]), ["resume"], tmp_path / "run")
    assert plain.trainer.checkpoint_max_overhead is None  # the run's own, not the default
    spaced = resumed_config(
        compose_config([*COMMON, "compression=prune", "trainer.checkpoint_max_overhead=0.2"]),
        ["trainer.checkpoint_max_overhead"],
        tmp_path / "run",
    )
    assert spaced.trainer.checkpoint_max_overhead == 0.2
    assert spaced.trainer.checkpoint_every_n_steps == cfg.trainer.checkpoint_every_n_steps
    with pytest.raises(ConfigError, match=r"trainer.checkpoint_every_n_steps \(run: "):
        resumed_config(
            compose_config([*COMMON, "compression=prune", "trainer.checkpoint_every_n_steps=7"]),
            ["trainer.checkpoint_every_n_steps"],
            tmp_path / "run",
        )
    with pytest.raises(Exception, match="not the directory of a run"):
        load_run_config(tmp_path / "elsewhere")


def test_resume_may_change_the_l1_kernel(tmp_path: Path) -> None:
    """A compiled run resumes eagerly on a machine without a C++ compiler (the fix that
    compression.l1.kernel=compiled's error names), also when compression=l1 is repeated."""
    save_run_config(
        tmp_path, compose_config([*COMMON, "compression=l1", "compression.l1.kernel=compiled"])
    )
    args = [*COMMON, "compression=l1", "compression.l1.kernel=eager"]
    resumed = resumed_config(compose_config(args), override_keys(args), tmp_path)
    assert resumed.compression.l1.kernel == "eager"
    kept = resumed_config(compose_config([*COMMON, "compression=l1"]), ["compression"], tmp_path)
    assert kept.compression.l1.kernel == "compiled"  # the run's own unless overridden
    args = [*COMMON, "compression=l1", "compression.l1.strength=0.1"]
    with pytest.raises(ConfigError, match=r"compression.l1.strength \(run: 0.0001\)"):
        resumed_config(compose_config(args), override_keys(args), tmp_path)
