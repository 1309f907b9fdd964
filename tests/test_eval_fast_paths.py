"""The fast full-ranking path (one topk, sparse relevance, no float64 copy) against naive code."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_compress.config import to_train_config
from recsys_compress.data.datamodule import RecDataModule
from recsys_compress.metrics import ALL_RANKING_METRICS, FullRankingMetrics
from recsys_compress.models import build_model
from recsys_compress.module import RecommenderModule
from tests.test_metrics import as_floats, ref_full

KS = (1, 2, 5, 10)


def tied_scores(seed: int, n_users: int = 30, n_items: int = 25) -> tuple[torch.Tensor, ...]:
    """Scores from 4 values (long ties that run past every cut-off), -inf and NaN entries, and
    relevant items tied with each other and with the K-th value."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (n_users, n_items), generator=g).float()
    scores[torch.rand(n_users, n_items, generator=g) < 0.1] = -math.inf
    scores[torch.rand(n_users, n_items, generator=g) < 0.05] = math.nan
    relevant = torch.rand(n_users, n_items, generator=g) < 0.2
    relevant[::5] = False
    relevant[1, :] = True
    scores[2] = 1.0  # one long tie: every item scores the same
    return scores, relevant


@pytest.mark.parametrize("seed", range(6))
def test_index_pairs_equal_dense_matrix_and_naive_sort(seed: int) -> None:
    scores, relevant = tied_scores(seed)
    dense, pairs = FullRankingMetrics(ks=KS), FullRankingMetrics(ks=KS)
    dense.update(scores, relevant)
    rows, items = relevant.nonzero(as_tuple=True)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    pairs.update(scores, (rows[order], items[order]))  # any order of the pairs
    got = as_floats(pairs.compute())
    assert got == as_floats(dense.compute())
    assert got == pytest.approx(ref_full(scores, relevant, KS), rel=1e-6, abs=1e-7)


def test_scores_are_not_modified() -> None:
    scores, relevant = tied_scores(0)
    before = scores.clone()
    FullRankingMetrics(ks=KS).update(scores, relevant)
    assert torch.equal(scores.nan_to_num(-1.0), before.nan_to_num(-1.0))


def test_relevant_pairs_of_another_shape_raise() -> None:
    with pytest.raises(ValueError, match="1-D"):
        FullRankingMetrics().update(torch.randn(2, 5), (torch.tensor([0, 1]), torch.tensor([3])))


def tiny(model: str, batch_users: int) -> tuple[RecDataModule, RecommenderModule]:
    cfg = to_train_config(
        {
            "data": {
                "name": "synthetic",
                "source": "synthetic",
                "synthetic": {"num_users": 150, "num_items": 90, "interactions_per_user": 15},
            },
            "split": {"name": "ratio"},
            "model": {"name": model, "dim": 8, "mlp_dim": 8, "mlp_layers": [16, 8]},
            "eval": {"batch_users": batch_users},
            "logger": {"name": "none"},
        }
    )
    dm = RecDataModule(cfg.data, cfg.split, cfg.loss, cfg.eval, 256, cfg.seed)
    dm.setup()
    torch.manual_seed(0)
    net = build_model(cfg.model, dm.num_users, dm.num_items).eval()
    return dm, RecommenderModule(net, cfg.loss, cfg.optim, cfg.eval).eval()


@torch.no_grad()
def evaluated(dm: RecDataModule, module: RecommenderModule) -> dict[str, float]:
    for batch in dm.test_data.batches:
        module.test_step(batch, 0)
    return as_floats(module.test_metrics["ranking"].compute())


@pytest.mark.parametrize("model", ["mf", "neumf"])
def test_chunked_evaluation_equals_one_chunk(model: str) -> None:
    dm, module = tiny(model, 1000)
    assert len(dm.test_data.batches) == 1
    whole = evaluated(dm, module)
    for batch_users in (1, 7, 64):
        dm_chunked, _ = tiny(model, batch_users)
        assert len(dm_chunked.test_data.batches) == -(-dm.test_data.num_queries // batch_users)
        module.test_metrics["ranking"].reset()
        assert evaluated(dm_chunked, module) == pytest.approx(whole, rel=1e-6, abs=1e-9)


def test_neumf_scores_in_small_chunks_equal_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    dm, module = tiny("neumf", 1000)
    users = torch.arange(dm.num_users)
    with torch.no_grad():
        whole = module.model.score_all(users)
        width = module.model.mlp.tower[0].out_features  # 3 users a chunk
        monkeypatch.setattr(
            "recsys_compress.models.ncf.TOWER_CHUNK_ELEMENTS", 3 * dm.num_items * width
        )
        torch.testing.assert_close(module.model.score_all(users), whole)


def test_evaluation_equals_naive_ranking_with_exclusions() -> None:
    """The test loop (score_all, -inf on training and validation items, sparse targets) against
    the naive sort of each user's dense scores."""
    dm, module = tiny("mf", 32)
    got = evaluated(dm, module)
    inter, split = dm.interactions, dm.split
    with torch.no_grad():
        scores = module.model.score_all(torch.arange(dm.num_users))
    for part in (split.train, split.val):
        scores[inter.users[part], inter.items[part]] = -math.inf
    relevant = torch.zeros_like(scores, dtype=torch.bool)
    relevant[inter.users[split.test], inter.items[split.test]] = True
    ks = tuple(module.eval_cfg.ks)
    expected = ref_full(scores, relevant, ks)
    assert set(got) == {f"{m}@{k}" for m in ALL_RANKING_METRICS for k in ks}
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_evaluation_of_a_constant_model_ranks_held_out_items_last() -> None:
    """Every score tied: held-out items come after every other candidate (pessimistic ties)."""
    dm, module = tiny("mf", 16)
    with torch.no_grad():
        for p in module.model.parameters():
            p.zero_()
    got = evaluated(dm, module)
    assert max(module.eval_cfg.ks) == 20
    assert got["hr@20"] == 0.0 and got["ndcg@20"] == 0.0


@pytest.mark.parametrize("model", ["mf", "gmf", "neumf", "mlp"])
def test_scores_written_into_one_buffer_equal_fresh_ones(model: str) -> None:
    """The test loop scores every batch into one buffer (a fresh matrix of tens of MB is
    page-faulted anew each batch), released at the epoch's end: the same metrics, bit for bit,
    as a model whose ``score_all`` takes no buffer."""
    dm, module = tiny(model, 7)
    assert len(dm.test_data.batches) > 3  # the last batch is smaller: a part of the buffer

    class Fresh(type(module.model)):  # type: ignore[misc]
        def score_all(self, users: torch.Tensor) -> torch.Tensor:  # no out: called as before
            return super().score_all(users)

    buffered = evaluated(dm, module)
    # every model writes into it (NeuMF and MLP a chunk of users at a time)
    buffer = module._scores_buffer
    first = dm.test_data.batches[0]["users"]
    assert buffer is not None and buffer.numel() == 7 * dm.num_items
    with torch.no_grad():
        assert module._score_all(first).data_ptr() == buffer.data_ptr()
    # with autograd on (a step called outside an evaluation loop) it is not used
    with torch.enable_grad():
        scores = module._score_all(first)
    assert scores.data_ptr() != buffer.data_ptr() and scores.requires_grad
    # a buffer made under inference_mode cannot be written outside it: a new one is made
    module.on_validation_epoch_end()
    assert module._scores_buffer is None
    with torch.inference_mode():
        module._score_all(first)
    assert module._scores_buffer is not None and module._scores_buffer.is_inference()
    with torch.no_grad():
        module._score_all(first)
    assert not module._scores_buffer.is_inference()
    module.on_test_epoch_end()
    assert module._scores_buffer is None
    module.model.__class__ = Fresh
    module.test_metrics["ranking"].reset()
    assert evaluated(dm, module) == buffered
    assert module._scores_buffer is None


@pytest.mark.parametrize("name", ["mf", "mf_nobias", "gmf", "neumf", "mlp"])
def test_scores_into_a_buffer_are_the_same_bits(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every built-in model writes into the first ``users x items`` elements of a buffer the same
    bits as it returns without one (NeuMF and MLP in chunks of two users, an uneven last one);
    a buffer of another dtype, too small or not contiguous is not used, nor one for NeuMF or MLP
    with an output layer that is not a plain ``nn.Linear``."""
    from torch import nn

    from recsys_compress.config import ModelConfig
    from recsys_compress.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        name=name.split("_")[0], dim=8, mlp_dim=8, mlp_layers=[16, 8], use_bias=name != "mf_nobias"
    )
    model = build_model(cfg, 10, 40).eval()
    users = torch.tensor([3, 0, 7, 7, 2])
    monkeypatch.setattr("recsys_compress.models.ncf.TOWER_CHUNK_ELEMENTS", 2 * 40 * 16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        fresh = model.score_all(users)
        buffer = torch.full((5 * 40 + 13,), float("nan"))
        into = model.score_all(users, out=buffer)
        assert into.data_ptr() == buffer.data_ptr() and torch.equal(into, fresh)
        assert torch.isnan(buffer[5 * 40 :]).all()
        wrongs = (
            torch.empty(5 * 40, dtype=torch.float64),
            torch.empty(5 * 40 - 1),
            torch.empty(5 * 40 * 2)[::2],
        )
        for wrong in wrongs:
            other = model.score_all(users, out=wrong)
            assert other.data_ptr() != wrong.data_ptr() and torch.equal(other, fresh)
        if name in ("neumf", "mlp"):
            model.predict = nn.Sequential(model.predict)
            wrapped = model.score_all(users, out=buffer)
            assert wrapped.data_ptr() != buffer.data_ptr()
            torch.testing.assert_close(wrapped.squeeze(-1), fresh)
