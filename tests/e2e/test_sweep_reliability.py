"""Sweeps survive a failing job, show it in the table, and rerun only what did not complete.

A 3-job multirun over three CSV files, one of which is missing: the other two jobs complete
(joblib launcher, 2 workers), the failed job's results.json records the error, make_table lists
it; once the file exists, the same sweep command with skip_completed=true on the same sweep dir
(basic launcher: the same job numbers) trains only the failed job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tests.conftest import REPO
from tests.e2e.test_sweeps import TINY, multirun


def _write_interactions(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(40), 12)
    items = np.concatenate([rng.choice(30, 12, replace=False) for _ in range(40)])
    frame = pd.DataFrame(
        {"user_id": users, "item_id": items, "rating": 4.0, "timestamp": np.arange(len(users))}
    )
    frame.to_csv(path, index=False)


def _run(args: list[str], sweep_dir: Path, tmp_path: Path) -> str:
    process = multirun(args, sweep_dir, {"RECSYS_COMPRESS_CACHE": str(tmp_path / "cache")})
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output


def _record(sweep_dir: Path, job: int) -> dict:
    return json.loads((sweep_dir / str(job) / "results.json").read_text())


def test_failed_job_is_recorded_listed_and_rerun_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    paths = [data / f"{name}.csv" for name in ("a", "b", "c")]
    _write_interactions(paths[0], 0)
    _write_interactions(paths[2], 2)  # b.csv is missing: job 1 fails
    sweep_dir = tmp_path / "sweep"
    args = [
        *(arg for arg in TINY if not arg.startswith("data=")),
        "compression=none",
        "data=csv",
        f"data.path={','.join(map(str, paths))}",
    ]
    _run([*args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], sweep_dir, tmp_path)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert [_record(sweep_dir, job)["status"] for job in range(3)] == [
        "completed",
        "failed",
        "completed",
    ]
    assert str(paths[1]) in _record(sweep_dir, 1)["error"]

    table = subprocess.run(
        [sys.executable, "scripts/make_table.py", str(sweep_dir), "--rows", "data.path"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert table.returncode == 0, table.stderr
    assert "Failed or unreadable runs (1)" in table.stdout
    assert f"{sweep_dir / '1'}: failed: " in table.stdout and str(paths[1]) in table.stdout

    completed = {job: (sweep_dir / str(job) / "results.json") for job in (0, 2)}
    before = {job: (p.stat().st_mtime_ns, p.read_bytes()) for job, p in completed.items()}
    _write_interactions(paths[1], 1)  # fix the cause, rerun the same sweep on the same dir
    output = _run([*args, "skip_completed=true"], sweep_dir, tmp_path)
    assert output.count("skip_completed: ") == 2
    after = {job: (p.stat().st_mtime_ns, p.read_bytes()) for job, p in completed.items()}
    assert after == before
    rerun = _record(sweep_dir, 1)
    assert rerun["status"] == "completed" and rerun["config"]["data"]["path"] == str(paths[1])
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
