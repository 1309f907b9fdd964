"""Per-layer sensitivity analysis of a trained run: exact restoration, requested compression
during each probe, drops against an independent evaluation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from recsys_compress.compression.lowrank import LOW_RANK_TYPES, rank_for_param_ratio
from recsys_compress.compression.qat import QUANTIZED
from recsys_compress.config import to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.errors import ConfigError, DataError
from recsys_compress.metrics import FullRankingMetrics
from recsys_compress.models import build_model
from recsys_compress.reporting.sensitivity import analyze_run, validate_strengths
from recsys_compress.train import train
from tests.e2e.test_train import FAST, compose_config
from tests.test_pareto import PDF_MAGIC, PNG_MAGIC, load_script

NEUMF = [*FAST, "model=neumf", "model.dim=8", "model.mlp_layers=[16,8]"]
LAYERS = [
    "gmf_user_embedding",
    "gmf_item_embedding",
    "mlp.user_embedding",
    "mlp.item_embedding",
    "mlp.tower.0",
    "mlp.tower.2",
    "predict",
]
STRENGTHS = {"prune": [0.0, 0.5, 0.9], "svd": [0.5, 0.25], "qat": [8, 4]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny NeuMF trained 2 epochs on synthetic data, without compression."""
    root = tmp_path_factory.mktemp("sensitivity")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECSYS_COMPRESS_CACHE", str(root / "cache"))
        train(compose_config(NEUMF), root / "run")
        yield root / "run"


def dense_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def test_each_probe_compresses_one_layer_as_requested_and_restores_it(run_dir: Path) -> None:
    original = dense_state(run_dir)
    seen: list[tuple[str, str, float]] = []
    models: list[nn.Module] = []

    def check(model: nn.Module, layer: str, method: str, strength: float) -> None:
        seen.append((layer, method, strength))
        models.append(model)
        w = original[f"{layer}.weight"]
        module = model.get_submodule(layer)
        if method == "prune":
            now = module.weight.detach()
            pruned = now == 0
            assert int(pruned.sum()) == round(strength * w.numel())
            if pruned.any():
                assert w.abs()[pruned].max() <= w.abs()[~pruned].min()
            assert torch.equal(now[~pruned], w[~pruned])
        elif method == "svd":
            assert isinstance(module, LOW_RANK_TYPES)
            rank = rank_for_param_ratio(*w.shape, strength)
            assert module.rank == rank
            sigma = torch.linalg.svdvals(w.double())
            best_error = sigma[rank:].square().sum().sqrt()
            error = torch.linalg.matrix_norm(w.double() - module.dense_weight().detach().double())
            assert float(error) == pytest.approx(float(best_error), rel=1e-4, abs=1e-6)
        else:
            assert isinstance(module, QUANTIZED) and module.scheme.bits == strength
            limit = 2 ** (int(strength) - 1)
            assert -limit <= int(module.qweight.min()) and int(module.qweight.max()) < limit
            assert (module.dequantize() - w).abs().le(module.scales / 2 + 1e-7).all()
        # every other layer is untouched while this one is compressed
        others = {k: v for k, v in model.state_dict().items() if not k.startswith(layer + ".")}
        assert all(torch.equal(v, original[k]) for k, v in others.items())

    result = analyze_run(run_dir, STRENGTHS, on_probe=check)

    assert result.layers == LAYERS
    record = json.loads((run_dir / "results.json").read_text())
    assert result.baseline == pytest.approx(record["val"]["ndcg@10"], abs=1e-6)
    # every (layer, strength) probed except SVD of predict [1, 16], which no rank shrinks
    expected = [(la, m, float(s)) for m, ss in STRENGTHS.items() for la in LAYERS for s in ss]
    assert seen == [e for e in expected if e[:2] != ("predict", "svd")]
    assert len(result.probes) == len(expected)
    skipped = [p for p in result.probes if p.value is None]
    assert {(p.layer, p.method) for p in skipped} == {("predict", "svd")}
    assert all("no rank" in p.note and p.drop is None for p in skipped)
    # sparsity 0 is the identity: no drop at all
    assert all(result.drops("prune")[layer][0.0] == 0.0 for layer in LAYERS)
    for p in result.probes:
        if p.value is not None:
            assert p.drop == pytest.approx(result.baseline - p.value, abs=1e-12)
    # the model is restored exactly: same module types, same state
    model = models[0]
    assert all(m is model for m in models)
    assert {type(model.get_submodule(la)) for la in LAYERS} == {nn.Embedding, nn.Linear}
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


def independent_val_ndcg(run_dir: Path, layer: str, sparsity: float) -> float:
    """Validation NDCG@10 of the run's model with ``layer`` magnitude-pruned, computed with
    FullRankingMetrics directly (not through RecommenderModule)."""
    cfg = to_train_config(json.loads((run_dir / "results.json").read_text())["config"])
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, cfg.trainer.batch_size, cfg.seed)
    dm.setup()
    model = build_model(cfg.model, dm.num_users, dm.num_items)
    model.load_state_dict(dense_state(run_dir))
    weight = model.get_submodule(layer).weight
    flat = weight.detach().abs().flatten()
    with torch.no_grad():
        weight.view(-1)[flat.argsort()[: round(sparsity * flat.numel())]] = 0.0
    metric = FullRankingMetrics(ks=[10], metrics=["ndcg"])
    with torch.no_grad():
        for batch in dm.val_data.batches:
            scores = model.eval().score_all(batch["users"])
            scores[batch["exclude_rows"], batch["exclude_items"]] = float("-inf")
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            relevant[batch["target_rows"], batch["target_items"]] = True
            metric.update(scores, relevant)
    return float(metric.compute()["ndcg@10"])


def test_drop_matches_an_independent_evaluation(run_dir: Path) -> None:
    result = analyze_run(run_dir, {"prune": [0.9]}, metric="ndcg@10")
    (probe,) = [p for p in result.probes if p.layer == "mlp.item_embedding"]
    assert probe.value == pytest.approx(
        independent_val_ndcg(run_dir, "mlp.item_embedding", 0.9), abs=1e-6
    )
    assert probe.drop > 0.0  # pruning 90% of an embedding table of a trained model hurts


def test_cli_writes_figure_tables_and_json(run_dir: Path, tmp_path: Path) -> None:
    main = load_script("sensitivity").main
    prefix = tmp_path / "out" / "sens"
    args = [str(run_dir), "--methods", "prune", "qat", "--strengths", "prune=0,0.8"]
    assert main([*args, "qat=8", "--include", "mlp.*", "--out", str(prefix)]) == 0
    assert (tmp_path / "out" / "sens.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "out" / "sens.pdf").read_bytes().startswith(PDF_MAGIC)
    data = json.loads((tmp_path / "out" / "sens.json").read_text())
    assert data["layers"] == [la for la in LAYERS if la.startswith("mlp.")]
    assert data["strengths"] == {"prune": [0.0, 0.8], "qat": [8.0]}
    assert len(data["probes"]) == 4 * 3
    table = (tmp_path / "out" / "sens.md").read_text()
    assert "| mlp.tower.0 | +0.0000 |" in table and "| layer | int8 |" in table
    assert main([str(run_dir), "--strengths", "svd=1.5"]) == 2
    assert main([str(run_dir), "--methods", "prune", "--strengths", "qat=8"]) == 2


def test_strengths_out_of_range_are_refused() -> None:
    assert validate_strengths("qat", [8, 4]) == [8.0, 4.0]
    for method, bad in (("prune", [1.5]), ("svd", [0.0]), ("qat", [6]), ("l1", [0.1])):
        with pytest.raises(ConfigError):
            validate_strengths(method, bad)


def test_a_compressed_run_without_dense_model_is_refused(run_dir: Path, tmp_path: Path) -> None:
    record: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    record["config"]["compression"]["qat"] = {"bits": 8}
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="no dense model"):
        analyze_run(tmp_path, {"prune": [0.5]})


def test_two_stage_run_is_analysed_from_its_dense_artifact(tmp_path: Path) -> None:
    overrides = [
        *NEUMF,
        "compression=qat",
        "compression.dense_epochs=1",
        "trainer.max_epochs=1",
    ]
    record = train(compose_config(overrides), tmp_path)
    result = analyze_run(tmp_path, {"prune": [0.0]})
    assert result.baseline == pytest.approx(record["dense"]["val"]["ndcg@10"], abs=1e-6)
