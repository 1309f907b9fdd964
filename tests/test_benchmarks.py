"""The benchmark suite's own measuring helpers (the timings themselves are not tests)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_subprocess_reports_its_own_peak_memory_not_its_parents() -> None:
    """The scale section runs each step in a subprocess of the suite: its peak must not include
    the memory the parent held when it started it (``ru_maxrss`` survives ``exec``)."""
    import resource  # POSIX only

    held = torch.ones(192 * 2**20)  # 768 MB touched in this (parent) process
    parent_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    code = (
        "import json, pathlib; from benchmarks.common import peak_rss_mb; "
        "now = [l for l in pathlib.Path('/proc/self/status').read_text().splitlines() "
        "if l.startswith('VmRSS:')][0].split()[1]; "
        "print(json.dumps([peak_rss_mb(), int(now) / 1024]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    child_peak_mb, child_now_mb = json.loads(done.stdout.strip().splitlines()[-1])
    assert held.sum().item() == held.numel()
    assert child_now_mb <= child_peak_mb
    assert child_peak_mb < parent_peak_mb - 512, (child_peak_mb, parent_peak_mb)


def test_alternated_runs_start_one_name_later_each_round() -> None:
    from benchmarks.common import rotated

    names = ["plain", "ours", "other"]
    rounds = [rotated(names, i) for i in range(4)]
    assert rounds == [names, ["ours", "other", "plain"], ["other", "plain", "ours"], names]
    # across a round boundary no name runs twice in a row
    assert all(a[-1] != b[0] for a, b in itertools.pairwise(rounds))
    assert rotated([], 3) == []


@pytest.mark.parametrize("name", ["sparse_adam", "rowwise_adagrad"])
def test_optimizer_presets_are_the_settings_optim_group_selects(name: str) -> None:
    """The 1M x 100k benchmarks run ``optim=<name>`` as a user's run composes it."""
    from hydra import compose, initialize_config_dir

    from benchmarks.common import CONF_DIR, optim_preset
    from recsys_compress.config import OptimConfig, to_train_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = to_train_config(compose("train", overrides=[f"optim={name}"])).optim
    assert OptimConfig(**optim_preset(name)) == composed
    assert composed.sparse


def test_the_sampled_evaluation_reference_ranks_as_ours() -> None:
    """The benchmark's plain sampled-evaluation loop does the work ours does: its ranks give
    our HR and NDCG (the ratio compares like with like)."""
    from benchmarks.evaluation import _datamodule, our_test_loop, plain_sampled_mf

    data = {
        "name": "synthetic",
        "source": "synthetic",
        "synthetic": {"num_users": 300, "num_items": 200, "interactions_per_user": 20},
    }
    dm, module = _datamodule(data, {"name": "mf", "dim": 16}, {"protocol": "sampled"})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    ours = our_test_loop(dm, module)
    ranks = plain_sampled_mf(dm, module.model).double()
    assert len(ranks) == sum(len(b["users"]) for b in dm.test_data.batches)
    for k in (5, 10, 20):
        hit = (ranks <= k).double()
        assert float(ours[f"hr@{k}"]) == pytest.approx(float(hit.mean()), abs=1e-6)
        ndcg = (hit / torch.log2(ranks + 1)).mean()
        assert float(ours[f"ndcg@{k}"]) == pytest.approx(float(ndcg), abs=1e-6)
    assert 0.05 < float(ours["hr@10"]) < 0.95
