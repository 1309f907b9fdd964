"""The benchmark suite's own measuring helpers (the timings themselves are not tests)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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


SMALL_DATA = {
    "name": "synthetic",
    "source": "synthetic",
    "synthetic": {"num_users": 300, "num_items": 200, "interactions_per_user": 20},
}


def _randomise(model: torch.nn.Module) -> None:
    """Standard-normal weights (seeded): scores spread enough that no ranking ties."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def test_the_sampled_evaluation_reference_ranks_as_ours() -> None:
    """The benchmark's plain sampled-evaluation loop does the work ours does: its ranks give
    our HR and NDCG (the ratio compares like with like)."""
    from benchmarks.evaluation import _datamodule, our_test_loop, plain_sampled_mf

    dm, module = _datamodule(SMALL_DATA, {"name": "mf", "dim": 16}, {"protocol": "sampled"})
    _randomise(module.model)
    ours = our_test_loop(dm, module)
    ranks = plain_sampled_mf(dm, module.model).double()
    assert len(ranks) == sum(len(b["users"]) for b in dm.test_data.batches)
    for k in (5, 10, 20):
        hit = (ranks <= k).double()
        assert float(ours[f"hr@{k}"]) == pytest.approx(float(hit.mean()), abs=1e-6)
        ndcg = (hit / torch.log2(ranks + 1)).mean()
        assert float(ours[f"ndcg@{k}"]) == pytest.approx(float(ndcg), abs=1e-6)
    assert 0.05 < float(ours["hr@10"]) < 0.95


def _metrics_of_top_items(dm: Any, tops: list[torch.Tensor], k: int) -> dict[str, float]:
    """Recall@k and NDCG@k (ideal: min(|held-out|, k)) of each batch's top items: the reference
    loops' output scored independently of our metric code."""
    recall, ndcg = [], []
    for batch, top in zip(dm.test_data.batches, tops, strict=True):
        assert top.shape == (len(batch["users"]), 20)
        relevant = torch.zeros(len(batch["users"]), dm.num_items, dtype=torch.bool)
        relevant[batch["target_rows"], batch["target_items"]] = True
        hits = relevant.gather(1, top[:, :k]).double()
        n_rel = relevant.sum(1).double()
        discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
        ideal = torch.cumsum(discount, 0)[n_rel.clamp(max=k).long() - 1]
        recall += (hits.sum(1) / n_rel).tolist()
        ndcg += ((hits * discount).sum(1) / ideal).tolist()
    return {f"recall@{k}": sum(recall) / len(recall), f"ndcg@{k}": sum(ndcg) / len(ndcg)}


@pytest.mark.parametrize("model", ["mf", "neumf"])
def test_the_full_ranking_references_rank_as_ours(model: str) -> None:
    """The benchmark's plain full-ranking loops (matmul + mask + topk; every pair through
    NeuMF) find the items ours finds: their top items give our recall and NDCG."""
    from benchmarks.evaluation import _datamodule, our_test_loop, plain_mf, plain_neumf

    config = {"name": "mf", "dim": 16}
    if model == "neumf":
        config = {"name": "neumf", "dim": 8, "mlp_dim": 8, "mlp_layers": [16, 8]}
    dm, module = _datamodule(SMALL_DATA, config, {"batch_users": 64})
    _randomise(module.model)
    ours = our_test_loop(dm, module)
    plain = plain_mf if model == "mf" else plain_neumf
    tops = plain(dm, module.model)
    assert len(tops) == len(dm.test_data.batches) > 1
    for k in (5, 10, 20):
        for name, value in _metrics_of_top_items(dm, tops, k).items():
            assert float(ours[name]) == pytest.approx(value, abs=1e-6), name
    assert 0.02 < float(ours["recall@20"]) < 0.9


def test_the_recommend_reference_is_one_matrix_and_checked_against_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The inference section's chunked-against-one-matrix figure: the reference is the top-k of
    one score matrix, the details name the chunk ours used, and a recommend that differs from
    the reference stops the figure instead of timing it."""
    import numpy as np

    from benchmarks.inference import chunked_against_one_matrix, one_matrix
    from recsys_compress import export
    from recsys_compress.config import ModelConfig
    from recsys_compress.export import CompressedRecommender
    from recsys_compress.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mf", dim=8), 40, 30).eval()
    served = CompressedRecommender(model, np.arange(40) + 100, np.arange(30) * 3)
    users = np.array([101, 139, 105, 120, 133])
    with torch.no_grad():
        expected = torch.topk(model.score_all(torch.tensor([1, 39, 5, 20, 33])), 10).indices
    assert one_matrix(served, users, 10).tolist() == (expected.numpy() * 3).tolist()
    monkeypatch.setattr(export, "RECOMMEND_MIN_ROWS", 2)
    details = chunked_against_one_matrix(served, users, 2)
    assert details["num_items"] == 30 and details["users_per_chunk"] == 5
    assert details["buffer_mb"] == pytest.approx(5 * 30 * 4 / 1e6)
    assert details["ms"] > 0 and details["one_matrix_ms"] > 0
    monkeypatch.setattr(export, "RECOMMEND_CHUNK_ELEMENTS", 1)
    assert chunked_against_one_matrix(served, users, 2)["users_per_chunk"] == 2
    reference = one_matrix(served, users, 10)
    # a near-tie ordered the other way: two items of the same score swapped
    with torch.no_grad():
        model.item_embedding.weight[3] = model.item_embedding.weight[reference[0, 4] // 3]
        model.item_bias.weight[3] = model.item_bias.weight[reference[0, 4] // 3]
    tied = one_matrix(served, users, 10)
    assert 9 in tied[0]
    swapped = tied.copy()
    first, second = sorted(np.flatnonzero(np.isin(tied[0], [9, reference[0, 4]])))
    swapped[0, [first, second]] = swapped[0, [second, first]]
    served.recommend = lambda user_ids, k: swapped
    chunked_against_one_matrix(served, users, 2)
    served.recommend = lambda user_ids, k: one_matrix(served, user_ids, k)[::-1]
    with pytest.raises(AssertionError, match="recommend different items"):
        chunked_against_one_matrix(served, users, 2)


def test_the_exclusion_figure_checks_ours_against_a_masked_matrix() -> None:
    """The inference section's ``exclude=seen`` figure: its reference masks the users' logged
    items in one score matrix; a recommend that ignores ``exclude`` stops the figure."""
    import numpy as np

    from benchmarks.inference import K, excluding_seen
    from recsys_compress.config import ModelConfig
    from recsys_compress.export import CompressedRecommender
    from recsys_compress.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mf", dim=8), 40, 30).eval()
    served = CompressedRecommender(model, np.arange(40) + 100, np.arange(30) * 3)
    users = np.array([101, 139, 105, 120, 133])
    with torch.no_grad():
        best = torch.topk(model.score_all(torch.tensor([1, 39, 5, 20, 33])), K).indices
    # every queried user saw their 3 best items, and user 101 once more one of them
    log = (np.r_[users.repeat(3), 101], np.r_[best[:, :3].numpy().ravel() * 3, best[0, 0] * 3])
    details = excluding_seen(served, log, users, 2)
    assert details["seen_pairs_of_these_users"] == 15 and details["log_pairs"] == 16
    assert min(details["ms"], details["without_ms"], details["reference_ms"]) > 0
    plain = served.recommend
    served.recommend = lambda user_ids, k, exclude=None: plain(user_ids, k)
    with pytest.raises(AssertionError, match="recommend different items"):
        excluding_seen(served, log, users, 2)


def test_a_section_that_raises_leaves_the_others_and_their_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scripts/bench.py``: a section that raises is reported (exit code 1, its error in the
    JSON); the sections before and after it still give their figures."""
    import importlib.util
    import types

    from benchmarks.common import Figure

    spec = importlib.util.spec_from_file_location("bench_script", REPO / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def section(name: str, fail: bool) -> types.ModuleType:
        module = types.ModuleType(f"benchmarks.{name}")

        def run(quick: bool) -> list[Figure]:
            if fail:
                raise RuntimeError("no such file")
            return [Figure(name, f"{name} figure", 0.5, 1.0)]

        module.run = run  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        return module

    for name, fail in (("first", False), ("broken", True), ("last", False)):
        section(name, fail)
    monkeypatch.setattr(bench, "SECTIONS", ["first", "broken", "last"])
    out = tmp_path / "bench.json"
    code = bench.main(["--only", "first", "broken", "last", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 1
    assert [f["name"] for f in report["figures"]] == ["first figure", "last figure"]
    assert report["errors"] == {"broken": "RuntimeError: no such file"}
    printed = capsys.readouterr().out
    assert "# broken: ERROR" in printed and "section broken stopped with RuntimeError" in printed
    assert bench.main(["--only", "first", "last", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["errors"] == {}


def test_the_large_catalogue_int8_model_is_the_dense_one_quantised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import inference

    monkeypatch.setattr(inference, "LARGE_ITEMS", 50)
    dense, int8 = inference.large_catalogue_model(), inference.large_catalogue_model(int8=True)
    assert int8.model.item_embedding.qweight.dtype == torch.int8
    assert int8.model.user_embedding.qweight.shape == (2 * inference.NUM_USERS, 64)
    users = torch.arange(0, 2000, 97)
    with torch.no_grad():
        exact, quantised = dense.model.score_all(users), int8.model.score_all(users)
    assert exact.shape == (len(users), 50)
    assert not torch.equal(exact, quantised)
    assert torch.allclose(exact, quantised, atol=0.02 * float(exact.abs().max()))


def test_the_training_reference_trains_as_ours(tmp_path: Path) -> None:
    """The benchmark's plain epoch (the epoch's tensors sliced into batches, forward, backward,
    step) and our Lightning epoch, from the same weights, end at the same weights: the
    throughput ratio compares the same work."""
    import copy

    from benchmarks.train import _plain_epoch
    from recsys_compress.config import to_train_config
    from recsys_compress.models import build_model
    from recsys_compress.module import RecommenderModule, build_optimizer
    from recsys_compress.train import build_datamodule, build_trainer

    cfg = to_train_config(
        {
            "data": SMALL_DATA,
            "split": {"name": "ratio"},
            "model": {"name": "mf", "dim": 16},
            "trainer": {"max_epochs": 1, "batch_size": 256, "progress_bar": False},
            "logger": {"name": "none"},
            "save_model": False,
        }
    )
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    plain_model = build_model(cfg.model, dm.num_users, dm.num_items)
    ours_model = copy.deepcopy(plain_model)
    start = {k: v.clone() for k, v in plain_model.state_dict().items()}
    opt = build_optimizer(plain_model, cfg.optim)
    _plain_epoch(dm, plain_model, opt, cfg.loss.name, 0, torch.device("cpu"), None)
    module = RecommenderModule(ours_model, cfg.loss, cfg.optim, cfg.eval)
    trainer = build_trainer(cfg, tmp_path, [])
    trainer.limit_val_batches = 0
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == dm.train_batches.num_batches() > 10
    trained = plain_model.state_dict()
    for name, value in ours_model.state_dict().items():
        assert not torch.equal(value, start[name]), name
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_scale_steps_run_and_report_what_they_measured(tmp_path: Path) -> None:
    """Every scale step (in this process, at a tiny size): the training steps count and time
    their optimizer steps, the compression steps leave what they promise (80% zeros, an SVD
    error, an int8 artifact smaller than the model), and the load step compares the two."""
    from benchmarks.scale import STEPS, step

    # an epoch of 30 optimizer steps, cut at 16 (one call of trainer.batches_per_call)
    size = {"num_users": 8000, "num_items": 300, "interactions_per_user": 5, "train_steps": 16}
    results = {name: step(name, size, tmp_path) for name in STEPS}
    for name in ("train", "train_rowwise"):
        result = results[name]
        assert result["steps"] == 16, name
        assert result["to_first_step_s"] > 0 and result["step_ms"] > 0, name
        assert result["epoch_s"] >= result["to_first_step_s"], name
        assert 0 < result["train_loss"] < 1.0, name  # BCE from near-zero scores: ~ln 2
    assert results["prune"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert results["l1"]["steps"] == results["qat"]["steps"] == 30
    assert 0 < results["svd"]["relative_error"] < 1
    dense_bytes = (tmp_path / "model.pt").stat().st_size
    assert results["export"]["bytes"] == (tmp_path / "model.rcz").stat().st_size
    assert results["export"]["bytes"] < dense_bytes / 2
    load = results["load"]
    assert load["artifact_bytes"] == results["export"]["bytes"]
    assert load["dense_model_pt_bytes"] == dense_bytes
    assert load["ratio"] > 0
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in results.values())
