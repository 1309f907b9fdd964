"""MF / GMF / MLP / NeuMF: scoring paths agree, gradients flow, init, factory, pre-training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys_compress import ops
from recsys_compress.config import ModelConfig
from recsys_compress.errors import ConfigError
from recsys_compress.models import GMF, MF, MLP, NeuMF, build_model, load_model_weights
from recsys_compress.models import base as models_base
from recsys_compress.models import ncf as models_ncf

N_USERS, N_ITEMS = 13, 17
LAYERS = [12, 6, 3]


def make(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if name == "mf":
        return MF(N_USERS, N_ITEMS, 8, **kw)
    if name == "mf_nobias":
        return MF(N_USERS, N_ITEMS, 8, use_bias=False, **kw)
    if name == "gmf":
        return GMF(N_USERS, N_ITEMS, 8, **kw)
    if name == "mlp":
        return MLP(N_USERS, N_ITEMS, 5, LAYERS, **kw)
    return NeuMF(N_USERS, N_ITEMS, 8, 5, LAYERS, **kw)


NAMES = ["mf", "mf_nobias", "gmf", "mlp", "neumf"]


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Parameters of order 1, so that scoring paths that disagree give visibly different scores
    (with the 0.01 embedding init every score is close to the bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def all_pairs(users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return users.repeat_interleave(N_ITEMS), torch.arange(N_ITEMS).repeat(len(users))


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_score_paths_agree(name):
    model = randomise(make(name))
    users = torch.tensor([0, 3, 3, 12, 7])
    items = torch.tensor([16, 0, 5, 2, 2])
    with torch.no_grad():
        out = model(users, items)
        assert out.shape == (5,) and out.dtype == torch.float32
        assert out.std() > 0.1  # the scores are not all equal
        all_scores = model.score_all(users)
        assert all_scores.shape == (5, N_ITEMS)
        expected = model(*all_pairs(users)).view(5, N_ITEMS)
        torch.testing.assert_close(all_scores, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(all_scores[torch.arange(5), items], out, atol=1e-5, rtol=1e-5)
        candidates = torch.randint(0, N_ITEMS, (5, 9), generator=torch.Generator().manual_seed(0))
        cand_scores = model.score_candidates(users, candidates)
        assert cand_scores.shape == (5, 9)
        pairs = model(users.repeat_interleave(9), candidates.reshape(-1)).view(5, 9)
        torch.testing.assert_close(cand_scores, pairs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            cand_scores, all_scores.gather(1, candidates), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_score_all_chunks_give_the_same_scores(name, monkeypatch):
    model = randomise(make(name))
    users = torch.arange(N_USERS)
    with torch.no_grad():
        whole = model.score_all(users)
        # one user per chunk
        monkeypatch.setattr(models_ncf, "TOWER_CHUNK_ELEMENTS", 1)
        chunked = model.score_all(users)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_generic_score_all_path_matches_fast_path(name, monkeypatch):
    model = randomise(make(name))
    users = torch.tensor([1, 4, 4, 9])
    with torch.no_grad():
        fast = model.score_all(users)
        model.mlp.tower[0] = nn.Sequential(model.mlp.tower[0])  # not exactly nn.Linear any more
        generic = model.score_all(users)
        expected = model(*all_pairs(users)).view(len(users), N_ITEMS)
        monkeypatch.setattr(models_ncf, "TOWER_CHUNK_ELEMENTS", 1)
        generic_chunked = model.score_all(users)
    torch.testing.assert_close(generic, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generic, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generic_chunked, fast, atol=1e-5, rtol=1e-5)


def test_base_class_score_all_for_wrapped_gmf_predict(monkeypatch):
    model = randomise(make("gmf"))
    users = torch.tensor([0, 5, 12])
    with torch.no_grad():
        fast = model.score_all(users)
        model.predict = nn.Sequential(model.predict)  # falls back to Recommender.score_all
        monkeypatch.setattr(models_base, "MAX_CHUNK_ELEMENTS", 1)
        generic = model.score_all(users)
    torch.testing.assert_close(generic, fast, atol=1e-5, rtol=1e-5)


class WrappedEmbedding(nn.Module):
    """An embedding-like module that is not ``nn.Embedding`` (as compression would produce)."""

    def __init__(self, inner: nn.Embedding) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids)


@pytest.mark.parametrize("name", ["mf", "gmf"])
def test_score_all_reads_tables_through_modules(name):
    model = randomise(make(name))
    users = torch.tensor([2, 3])
    with torch.no_grad():
        expected = model.score_all(users)
        model.item_embedding = WrappedEmbedding(model.item_embedding)
        if name == "mf":
            model.item_bias = WrappedEmbedding(model.item_bias)
        torch.testing.assert_close(model.score_all(users), expected, atol=1e-6, rtol=1e-6)


class ViewEmbedding(nn.Module):
    """An embedding-like module whose rows are views of its own buffer (a table that hands out
    stored memory): a candidate path must not write into them."""

    def __init__(self, inner: nn.Embedding) -> None:
        super().__init__()
        self.register_buffer("table", inner.weight.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        every_row = torch.arange(len(self.table))
        if ids.shape == (1, len(self.table)) and torch.equal(ids[0], every_row):
            return self.table[None]  # contiguous, in the buffer's storage
        if ids.dim() == 2 and bool((ids == ids[:, :1]).all()):
            return self.table[ids[:, 0]][:, None, :].expand(*ids.shape, -1)
        return self.table[ids]


def pair_scores(model: nn.Module, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The generic candidate scores: ``forward`` on every (user, candidate) pair."""
    return models_base.Recommender.score_candidates(model, users, candidates)


CANDIDATES = torch.randint(0, N_ITEMS, (6, 11), generator=torch.Generator().manual_seed(3))
CANDIDATE_USERS = torch.tensor([0, 12, 5, 5, 7, 1])


# users scored at a time by candidate_dots: all six in one piece, one at a time, or 4 and 2 (MF's
# and GMF's candidate vectors are 8 wide)
CHUNKS = {
    "one piece": models_base.CANDIDATE_CHUNK_ELEMENTS,
    "a user a chunk": 1,
    "4 then 2 users": 4 * 11 * 8,
}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("name", NAMES)
def test_candidate_scores_equal_pair_scores(name, chunk, monkeypatch):
    """Each model's candidate path (users read once per user) scores as ``forward`` on every
    pair: MF with the same arithmetic, bit for bit; the others up to float rounding. Scored a
    user at a time, the scores are the same bits as in one piece."""
    model = randomise(make(name))
    with torch.no_grad():
        whole = model.score_candidates(CANDIDATE_USERS, CANDIDATES)
        monkeypatch.setattr(models_base, "CANDIDATE_CHUNK_ELEMENTS", chunk)
        fast = model.score_candidates(CANDIDATE_USERS, CANDIDATES)
        expected = pair_scores(model, CANDIDATE_USERS, CANDIDATES)
    assert fast.shape == (6, 11) and expected.std() > 0.1
    assert torch.equal(fast, whole)
    if name.startswith("mf"):
        assert torch.equal(fast, expected)
    else:
        torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


def test_candidate_chunks_split_plain_tables_only(monkeypatch):
    """Only a plain ``nn.Embedding`` is read in chunks: another module (a fake-quantised table
    quantises itself whole on a call of as many ids as it has rows) is called once."""
    monkeypatch.setattr(models_base, "CANDIDATE_CHUNK_ELEMENTS", 1)
    table = nn.Embedding(N_ITEMS, 8).requires_grad_(False)
    calls = []
    wrapped = WrappedEmbedding(table)
    wrapped.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    vectors = torch.randn(6, 8)
    with torch.no_grad():
        chunked = models_base.candidate_dots(vectors, table, CANDIDATES)
        whole = models_base.candidate_dots(vectors, wrapped, CANDIDATES)
    assert calls == [CANDIDATES.shape]
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("name", NAMES)
def test_candidate_scores_through_other_modules(name):
    """Compressed tables (modules other than ``nn.Embedding``) and layers that are not exactly
    ``nn.Linear`` take the candidate paths' general forms, with the same scores; rows handed
    out as views of a module's memory are read, never written."""
    model = randomise(make(name))
    with torch.no_grad():
        expected = pair_scores(model, CANDIDATE_USERS, CANDIDATES)
        branch = model.mlp if name in ("mlp", "neumf") else model
        swaps = [(branch, "user_embedding", WrappedEmbedding)]
        swaps += [(branch, "item_embedding", ViewEmbedding)]
        if name == "mf":
            swaps += [(model, "item_bias", ViewEmbedding)]
        if name == "neumf":
            swaps += [(model, "gmf_user_embedding", ViewEmbedding)]
            swaps += [(model, "gmf_item_embedding", WrappedEmbedding)]
        for owner, table, kind in swaps:
            setattr(owner, table, kind(getattr(owner, table)))
        stored = {k: v.clone() for k, v in model.state_dict().items()}
        # the view forms of ViewEmbedding: one expanded row per user; the buffer itself
        same_item = CANDIDATES[:, :1].expand(-1, 11)
        every_item = torch.arange(N_ITEMS)[None]
        for users, candidates in (
            (CANDIDATE_USERS, CANDIDATES),
            (CANDIDATE_USERS, same_item),
            (CANDIDATE_USERS[:1], every_item),
        ):
            torch.testing.assert_close(
                model.score_candidates(users, candidates),
                pair_scores(model, users, candidates),
                atol=1e-5,
                rtol=1e-5,
            )
        torch.testing.assert_close(
            model.score_candidates(CANDIDATE_USERS, CANDIDATES), expected, atol=1e-5, rtol=1e-5
        )
        if name in ("gmf", "mlp", "neumf"):
            if name == "gmf":
                model.predict = nn.Sequential(model.predict)
            else:
                model.mlp.tower[0] = nn.Sequential(model.mlp.tower[0])
            general = model.score_candidates(CANDIDATE_USERS, CANDIDATES)
            torch.testing.assert_close(general, expected, atol=1e-5, rtol=1e-5)
    after = model.state_dict()  # the wrapped layers' keys are renamed, in the same order
    assert len(after) == len(stored)
    for (key, value), before in zip(after.items(), stored.values(), strict=True):
        assert torch.equal(value, before), key


@pytest.mark.parametrize("name", NAMES)
def test_candidate_scores_keep_gradients(name):
    """With autograd on, the candidate paths give the pair form's gradients (no in-place
    product on rows that autograd needs)."""
    grads = []
    for fast in (True, False):
        model = randomise(make(name)).train()
        model.zero_grad()
        scorer = model.score_candidates if fast else partial_pairs(model)
        scorer(CANDIDATE_USERS, CANDIDATES).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key, grad in grads[1].items():
        torch.testing.assert_close(grads[0][key], grad, atol=1e-4, rtol=1e-4)


def partial_pairs(model: nn.Module):
    return lambda users, candidates: pair_scores(model, users, candidates)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    users = torch.randint(0, N_USERS - 3, (64,), generator=torch.Generator().manual_seed(0))
    items = torch.randint(0, N_ITEMS, (64,), generator=torch.Generator().manual_seed(1))
    labels = (torch.arange(64) % 2).float()
    F.binary_cross_entropy_with_logits(model(users, items), labels).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None, param_name
        assert p.grad.abs().sum() > 0, param_name
    # only the rows of the batch's users get embedding gradients (users N_USERS-3.. are not in it)
    table = dict(model.named_parameters())
    key = "mlp.user_embedding.weight" if name == "mlp" else next(iter(table))
    assert table[key].grad[N_USERS - 3 :].abs().sum() == 0


@pytest.mark.parametrize("std", [0.01, 0.05])
def test_embedding_init_std(std):
    torch.manual_seed(0)
    model = NeuMF(3000, 2000, 16, 8, [8], init_std=std)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert len(embeddings) == 4
    for emb in embeddings:
        weight = emb.weight.detach()
        assert abs(weight.std().item() - std) < 0.1 * std
        assert abs(weight.mean().item()) < 0.05 * std
    mf = MF(3000, 2000, 16, init_std=std)
    assert abs(mf.user_embedding.weight.std().item() - std) < 0.1 * std
    assert mf.user_bias.weight.abs().sum() == 0 and mf.global_bias.item() == 0


def test_build_model_respects_config():
    mf = build_model(ModelConfig(name="mf", dim=6), N_USERS, N_ITEMS)
    assert isinstance(mf, MF)
    assert {k: tuple(v.shape) for k, v in mf.state_dict().items()} == {
        "user_embedding.weight": (N_USERS, 6),
        "item_embedding.weight": (N_ITEMS, 6),
        "user_bias.weight": (N_USERS, 1),
        "item_bias.weight": (N_ITEMS, 1),
        "global_bias": (1,),
    }
    mf = build_model(ModelConfig(name="mf", dim=6, use_bias=False), N_USERS, N_ITEMS)
    assert set(mf.state_dict()) == {"user_embedding.weight", "item_embedding.weight"}

    gmf = build_model(ModelConfig(name="gmf", dim=7, mlp_dim=3), N_USERS, N_ITEMS)
    assert isinstance(gmf, GMF)
    assert gmf.user_embedding.weight.shape == (N_USERS, 7)
    assert gmf.item_embedding.weight.shape == (N_ITEMS, 7)
    assert gmf.predict.weight.shape == (1, 7)

    mlp = build_model(
        ModelConfig(name="mlp", dim=7, mlp_dim=3, mlp_layers=[10, 4]), N_USERS, N_ITEMS
    )
    assert isinstance(mlp, MLP)
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {
        "mlp.user_embedding.weight": (N_USERS, 3),
        "mlp.item_embedding.weight": (N_ITEMS, 3),
        "mlp.tower.0.weight": (10, 6),
        "mlp.tower.0.bias": (10,),
        "mlp.tower.2.weight": (4, 10),
        "mlp.tower.2.bias": (4,),
        "predict.weight": (1, 4),
        "predict.bias": (1,),
    }
    # mlp_dim falls back to dim
    mlp = build_model(ModelConfig(name="mlp", dim=5, mlp_layers=[8]), N_USERS, N_ITEMS)
    assert mlp.mlp.user_embedding.weight.shape == (N_USERS, 5)
    assert mlp.mlp.tower[0].weight.shape == (8, 10)

    neumf = build_model(
        ModelConfig(name="neumf", dim=7, mlp_dim=3, mlp_layers=[10, 4], dropout=0.2),
        N_USERS,
        N_ITEMS,
    )
    assert isinstance(neumf, NeuMF)
    assert neumf.gmf_user_embedding.weight.shape == (N_USERS, 7)
    assert neumf.gmf_item_embedding.weight.shape == (N_ITEMS, 7)
    assert neumf.mlp.item_embedding.weight.shape == (N_ITEMS, 3)
    assert neumf.predict.weight.shape == (1, 7 + 4)
    dropouts = [m for m in neumf.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.2, 0.2]

    model = build_model(ModelConfig(name="gmf", dim=16, init_std=0.2), 500, 500)
    assert abs(model.user_embedding.weight.std().item() - 0.2) < 0.02


def test_dropout_only_acts_in_training():
    model = randomise(make("mlp", dropout=0.5))
    users, items = torch.arange(N_USERS), torch.arange(N_USERS) % N_ITEMS
    with torch.no_grad():
        model.eval()
        a, b = model(users, items), model(users, items)
        model.train()
        c = model(users, items)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("dtype", "default"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),  # bf16-mixed: a bf16 tensor
        (torch.bfloat16, torch.bfloat16),  # bf16-true: Lightning sets a bf16 default dtype
        (torch.float16, torch.float16),
        (torch.float64, torch.float32),
    ],
)
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(
    dtype: torch.dtype, default: torch.dtype
) -> None:
    """ops.dropout (the towers' CPU dropout): each element zeroed with probability p, whatever
    the dtype and the default dtype, the others x / (1 - p) as torch computes it (1 / (1 - p)
    in x's dtype); its backward passes the same mask; a seed repeats the draws."""
    p, n = 0.1, 2_000_000
    x = (torch.rand(n, 2, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()  # 2-D
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        torch.manual_seed(0)
        y = ops.dropout(x, p, True)
        torch.manual_seed(0)
        again = ops.dropout(x, p, True)
        other = ops.dropout(x, p, True)  # the generator moved on
    finally:
        torch.set_default_dtype(previous)
    kept = y != 0
    # binomial(2n, 0.9): sd 600 elements; 5 sd (seeded: the same draws every run). A draw in
    # bf16 (p on a grid of 2^-8) would keep ~0.2% fewer: 13 sd off.
    assert abs(int(kept.sum()) - (1 - p) * 2 * n) < 5 * (2 * n * p * (1 - p)) ** 0.5
    scale = torch.ones((), dtype=dtype).div_(1 - p)  # torch's: noise.div_(1 - p) in x's dtype
    assert y.dtype == dtype and torch.equal(y[kept], (x * scale)[kept].detach())
    grad = torch.rand(n, 2, dtype=torch.float64).to(dtype)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * scale, torch.zeros_like(grad)))
    assert torch.equal(again, y) and not torch.equal(other, y)
    # inert in eval mode or at p = 0 (the input itself), torch's own at p = 1
    assert ops.dropout(x, p, False) is x and ops.dropout(x, 0.0, True) is x
    assert not ops.dropout(x, 1.0, True).any()


def test_the_towers_dropout_module_is_ops_dropout_in_training() -> None:
    model = randomise(make("mlp", dropout=0.3)).train()
    drops = [m for m in model.mlp.tower if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is models_ncf.Dropout for m in drops)
    hidden = torch.rand(64, 16)
    torch.manual_seed(5)
    expected = ops.dropout(hidden, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(drops[0](hidden), expected)
    drops[0].eval()
    assert drops[0](hidden) is hidden
    inplace = models_ncf.Dropout(0.3, inplace=True)  # torch's own: same draws as F.dropout
    torch.manual_seed(5)
    reference = F.dropout(hidden.clone(), 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(inplace(hidden.clone()), reference)


def pretrained_pair(dim: int = 8, mlp_dim: int = 5) -> tuple[GMF, MLP]:
    gmf = randomise(GMF(N_USERS, N_ITEMS, dim), seed=2)
    mlp = randomise(MLP(N_USERS, N_ITEMS, mlp_dim, LAYERS), seed=3)
    return gmf, mlp


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_neumf_load_pretrained_mixes_scores(alpha):
    gmf, mlp = pretrained_pair()
    neumf = make("neumf")
    neumf.load_pretrained(gmf, mlp, alpha)
    neumf.eval()
    users, items = all_pairs(torch.arange(N_USERS))
    with torch.no_grad():
        expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
        torch.testing.assert_close(neumf(users, items), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(neumf.gmf_user_embedding.weight, gmf.user_embedding.weight)
    assert torch.equal(neumf.mlp.tower[2].weight, mlp.mlp.tower[2].weight)
    # copies, not shared tensors
    assert neumf.gmf_item_embedding.weight.data_ptr() != gmf.item_embedding.weight.data_ptr()


def test_build_model_loads_pretrained_from_files_and_run_dirs(tmp_path):
    gmf, mlp = pretrained_pair()
    torch.save(gmf.state_dict(), tmp_path / "gmf.pt")
    (tmp_path / "mlp_run").mkdir()
    torch.save(mlp.state_dict(), tmp_path / "mlp_run" / "model.pt")
    cfg = ModelConfig(
        name="neumf",
        dim=8,
        mlp_dim=5,
        mlp_layers=LAYERS,
        pretrained_gmf=str(tmp_path / "gmf.pt"),
        pretrained_mlp=str(tmp_path / "mlp_run"),
        alpha=0.5,
    )
    neumf = build_model(cfg, N_USERS, N_ITEMS).eval()
    users, items = all_pairs(torch.arange(N_USERS))
    with torch.no_grad():
        expected = 0.5 * gmf(users, items) + 0.5 * mlp(users, items)
        torch.testing.assert_close(neumf(users, items), expected, atol=1e-6, rtol=1e-6)


def test_load_model_weights_roundtrip_and_errors(tmp_path):
    gmf = randomise(GMF(N_USERS, N_ITEMS, 8))
    torch.save(gmf.state_dict(), tmp_path / "model.pt")
    fresh = GMF(N_USERS, N_ITEMS, 8)
    load_model_weights(fresh, tmp_path, "model.pretrained_gmf")  # a run dir
    assert torch.equal(fresh.item_embedding.weight, gmf.item_embedding.weight)

    with pytest.raises(ConfigError, match=r"model\.pretrained_gmf") as info:
        load_model_weights(GMF(N_USERS, N_ITEMS, 4), tmp_path / "model.pt", "model.pretrained_gmf")
    assert "user_embedding.weight" in str(info.value)  # names the mismatched tensor
    with pytest.raises(ConfigError, match=r"model\.pretrained_mlp"):
        load_model_weights(
            MLP(N_USERS, N_ITEMS, 8, LAYERS), tmp_path / "model.pt", "model.pretrained_mlp"
        )
    with pytest.raises(ConfigError, match=r"model\.pretrained_gmf=.*does not exist"):
        load_model_weights(
            GMF(N_USERS, N_ITEMS, 8), tmp_path / "missing.pt", "model.pretrained_gmf"
        )


def test_build_model_with_mismatched_pretrained_names_the_key(tmp_path):
    gmf, mlp = pretrained_pair(dim=8, mlp_dim=5)
    torch.save(gmf.state_dict(), tmp_path / "gmf.pt")
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    cfg = ModelConfig(
        name="neumf",
        dim=8,
        mlp_dim=6,  # the MLP was trained with 5
        mlp_layers=LAYERS,
        pretrained_gmf=str(tmp_path / "gmf.pt"),
        pretrained_mlp=str(tmp_path / "mlp.pt"),
    )
    with pytest.raises(ConfigError, match=r"model\.pretrained_mlp"):
        build_model(cfg, N_USERS, N_ITEMS)


@pytest.mark.parametrize("name", NAMES)
def test_bpr_loss_in_one_pass_equals_two_passes(name):
    """BPR scores a batch with ``score_difference`` (one forward pass over both pairs; MF reads
    each user once, ``<p_u, q_pos - q_neg>``): the loss and gradients of separate passes, up to
    float rounding, and every parameter still gets a gradient (DDP needs one for each)."""
    from recsys_compress.module import recommendation_loss

    gen = torch.Generator().manual_seed(3)
    batch = {
        "users": torch.randint(0, N_USERS, (40,), generator=gen),
        "pos_items": torch.randint(0, N_ITEMS, (40,), generator=gen),
        "neg_items": torch.randint(0, N_ITEMS, (40,), generator=gen),
    }
    one, two = randomise(make(name)), randomise(make(name))
    loss = recommendation_loss(one, batch, "bpr")
    loss.backward()
    pos, neg = two(batch["users"], batch["pos_items"]), two(batch["users"], batch["neg_items"])
    reference = -F.logsigmoid(pos - neg).mean()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert loss > 0
    for (key, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=key)
    if name == "mf":  # the user and global biases cancel in a difference: exact zeros
        assert one.user_bias.weight.grad.abs().max() == 0
        assert one.global_bias.grad.item() == 0
        assert one.item_bias.weight.grad.abs().max() > 0


def test_rows_fast_gather_is_bit_identical_to_embedding() -> None:
    """models.base.rows: values and gradients of F.embedding bit for bit (repeated ids, 2-D ids),
    and modules it cannot speed up (padding row, max norm, sparse, other types) are called."""
    gen = torch.Generator().manual_seed(4)
    table = nn.Embedding(30, 8)
    ids = torch.randint(0, 30, (7, 40), generator=gen)  # many repeats
    probe = torch.randn(7, 40, 8, generator=gen)
    fast = models_base.rows(table, ids)
    (fast * probe).sum().backward()
    fast_grad = table.weight.grad.clone()
    table.weight.grad = None
    slow = table(ids)
    (slow * probe).sum().backward()
    assert torch.equal(fast, slow) and torch.equal(fast_grad, table.weight.grad)
    assert "RowGather" in type(models_base.rows(table, ids[0]).grad_fn).__name__  # the fast path

    calls: list[str] = []
    for module in (
        nn.Embedding(30, 8, padding_idx=0),
        nn.Embedding(30, 8, max_norm=1.0),
        nn.Embedding(30, 8, sparse=True),
        nn.Sequential(nn.Embedding(30, 8)),
    ):
        module.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
        assert torch.equal(models_base.rows(module, ids), module(ids))
    assert len(calls) == 8  # each went through its module (twice: rows and the reference)


def test_gathered_rows_are_reported_only_for_the_gradient_one_gather_wrote() -> None:
    """ops.gradient_rows: the ids of a tracked table's gather_rows backward while its .grad is
    exactly what that backward wrote (or only rewritten within those rows); None for an
    untracked table, and when the gradient was summed with a second read, accumulated into or
    clipped."""
    from recsys_compress import ops

    gen = torch.Generator().manual_seed(5)
    table, other = nn.Parameter(torch.randn(50, 4, generator=gen)), nn.Parameter(torch.randn(9, 4))
    ids = torch.randint(0, 50, (12,), generator=gen)
    ops.track_gathered_rows(table)

    def backward(*reads: torch.Tensor) -> None:
        sum(ops.gather_rows(table, r).sum() for r in reads).backward()

    backward(ids)
    assert torch.equal(ops.gradient_rows(table), ids)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids] = False
    assert not table.grad[untouched].any()  # the other rows are exact zeros
    assert torch.equal(ops.gradient_rows(table), ids)  # reading it keeps it
    table.grad.index_copy_(0, ids[:2], torch.zeros(2, 4))
    assert ops.gradient_rows(table) is None  # written since
    ops.rows_rewritten(table)  # ... within those rows, says the writer
    assert torch.equal(ops.gradient_rows(table), ids)
    ops.gather_rows(other, ids % 9).sum().backward()
    assert ops.gradient_rows(other) is None  # not tracked

    table.grad = None
    assert ops.gradient_rows(table) is None  # no gradient
    backward(ids, ids[:3])  # two reads in one graph: their gradients are summed
    assert ops.gradient_rows(table) is None
    table.grad = None
    backward(ids)
    backward(ids[:3])  # accumulated into the first backward's gradient
    assert ops.gradient_rows(table) is None
    table.grad = None
    backward(ids)
    torch.nn.utils.clip_grad_norm_([table], 1e9)  # scales the gradient in place
    assert ops.gradient_rows(table) is None

    ops.track_gathered_rows(table, on=False)
    table.grad = None
    backward(ids)
    assert table not in ops._TABLES and ops.gradient_rows(table) is None


def test_kept_gradient_takes_a_batch_rows_in_place_and_clears_them() -> None:
    """ops.keep_gradient + ops.zero_grad: a table much larger than a batch keeps one dense
    gradient; each backward adds its rows into it (bit-identical to a fresh gradient) and
    zero_grad zeroes those rows. A second read in the same graph, a dense read of the whole
    table or clipping give the right gradient on the fresh path and drop the kept one; batches
    of half the table or more stop keeping it."""
    from recsys_compress import ops

    gen = torch.Generator().manual_seed(6)
    table = nn.Parameter(torch.randn(400, 4, generator=gen))
    opt = torch.optim.SGD([table], lr=0.1)
    ops.keep_gradient(table)
    ops.track_gathered_rows(table)

    def step(*reads: torch.Tensor, dense: bool = False, clip: bool = False) -> torch.Tensor:
        """One zero_grad + backward; returns the reference gradient of a fresh F.embedding."""
        ops.zero_grad(opt)
        probes = [torch.randn(len(r), 4, generator=gen) for r in reads]
        loss = sum(
            (ops.gather_rows(table, r) * p).sum() for r, p in zip(reads, probes, strict=True)
        )
        ref_table = table.detach().clone().requires_grad_()
        ref = sum((F.embedding(r, ref_table) * p).sum() for r, p in zip(reads, probes, strict=True))
        if dense:
            loss = loss + table.square().sum()
            ref = ref + ref_table.square().sum()
        loss.backward()
        ref.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([table], 1e9)
            torch.nn.utils.clip_grad_norm_([ref_table], 1e9)
        assert torch.equal(table.grad, ref_table.grad)
        return table.grad

    batches = [torch.randint(0, 400, (30,), generator=gen) for _ in range(4)]
    sparse_adds = 0
    real = torch.sparse_coo_tensor

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal sparse_adds
        sparse_adds += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "sparse_coo_tensor", counting)
        first = step(batches[0])
        address = first.data_ptr()
        for ids in batches[1:]:
            grad = step(ids)
            assert grad.data_ptr() == address  # the same gradient, its rows added in place
            assert torch.equal(ops.gradient_rows(table), ids)
        assert sparse_adds == 3  # all but the first (fresh) backward
        step(batches[0], batches[1])  # two reads: the first added in place, then summed
        assert ops.gradient_rows(table) is None
        step(batches[2])  # the kept gradient was dropped: a fresh one, then kept again
        assert torch.equal(ops.gradient_rows(table), batches[2])
        step(batches[3])
        step(batches[0], dense=True)  # a dense read of the whole table joins the sum
        assert ops.gradient_rows(table) is None
        step(batches[1])
        step(batches[2])
        step(batches[3], clip=True)
        assert ops.gradient_rows(table) is None
        step(batches[0])
    ops.zero_grad(opt)
    assert table.grad is not None and not table.grad.any()  # kept, all rows cleared

    big = torch.randint(0, 400, (200,), generator=gen)  # half the rows: not worth keeping
    step(big)  # added into the kept gradient on the fresh path: dropped
    ops.zero_grad(opt)
    assert table.grad is None and ops._TABLES[table].kept
    step(big)  # a fresh gradient of a batch this large: the table stops being kept
    ops.zero_grad(opt)
    assert table.grad is None and not ops._TABLES[table].kept
    ops.keep_gradient(table)
    step(batches[1])
    ops.keep_gradient(table, on=False)
    ops.track_gathered_rows(table, on=False)
    assert table.grad is None and table not in ops._TABLES and not table._backward_hooks


@pytest.mark.parametrize(
    ("shape", "wide"),
    [
        ((50, 64), torch.complex128),  # 256-byte rows: 16-byte elements
        ((50, 6), torch.int64),  # 24-byte rows: 8-byte elements
        ((50, 3), torch.float32),  # 12-byte rows: as they are
        ((50,), torch.float32),
        ((50, 2, 8), torch.complex128),
    ],
)
def test_row_copies_move_the_same_bytes_as_index_copy(shape, wide) -> None:
    """copy_rows_ / zero_rows_ write rows as wide elements: every bit as index_copy_ /
    index_fill_ (NaN payloads included), on tables and on row views of a larger table."""
    from recsys_compress import ops

    gen = torch.Generator().manual_seed(0)

    def random_bits(*size: int) -> torch.Tensor:
        bits = torch.randint(-(2**31), 2**31 - 1, size, generator=gen, dtype=torch.int64)
        return bits.to(torch.int32).view(torch.float32)

    base = random_bits(shape[0] + 1, *shape[1:])
    rows = torch.tensor([0, 3, 7, 20, 49])
    values = random_bits(len(rows), *shape[1:])
    nans = values.view(torch.int32).view(-1)
    nans[0], nans[-1] = 0x7F800001, -0x3FFFFF  # a signalling NaN, a quiet one with a payload
    assert torch.isnan(values).view(-1)[[0, -1]].all()
    for table in (base[:-1], base[1:]):  # base[1:]: a storage offset of one row
        assert ops._byte_rows(table).dtype == wide
        expected = table.clone().index_copy_(0, rows, values)
        got = ops.copy_rows_(table.clone(), rows, values)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
        expected = table.clone().index_fill_(0, rows, 0)
        got = ops.zero_rows_(table.clone(), torch.cat([rows, rows]))
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # Rows at an offset of one float are not re-read as wide elements: copied as they are.
    odd = random_bits(64 * 10 + 1)[1:].view(10, 64)
    assert ops._byte_rows(odd) is odd
    two = random_bits(2, 64)
    expected = odd.clone().index_copy_(0, rows[:2], two)
    ops.copy_rows_(odd, rows[:2], two)
    assert torch.equal(odd.view(torch.int32), expected.view(torch.int32))


def test_row_copies_of_unaligned_and_empty_tensors_fall_back() -> None:
    """Memory that starts 8 bytes past a 16-byte boundary (numpy's, here) is not read as
    16-byte elements (that crashed index_fill_), and empty tables or row sets copy nothing."""
    import numpy as np

    from recsys_compress import ops

    shifted = torch.from_numpy(np.arange(6401, dtype=np.float64)[1:]).view(100, 64)
    assert shifted.data_ptr() % 16 == 8
    assert ops._byte_rows(shifted).dtype == torch.int64
    rows = torch.tensor([3, 50])
    expected = shifted.clone().index_fill_(0, rows, 0)
    assert torch.equal(ops.zero_rows_(shifted.clone(), rows), expected)
    ops.zero_rows_(shifted, rows)
    assert torch.equal(shifted, expected)
    values = torch.ones(2, 64, dtype=torch.float64)
    assert torch.equal(ops.copy_rows_(shifted, rows, values)[rows], values)
    none = torch.empty(0, dtype=torch.long)
    table = torch.ones(5, 64)
    assert torch.equal(ops.copy_rows_(table, none, torch.empty(0, 64)), torch.ones(5, 64))
    assert torch.equal(ops.zero_rows_(table, none), torch.ones(5, 64))
    assert ops.copy_rows_(torch.empty(0, 64), none, torch.empty(0, 64)).shape == (0, 64)


def test_all_rows_builds_a_compressed_table_once_per_read_once_block() -> None:
    """Inside ``tables_read_once`` with autograd off, a module that is not a plain
    ``nn.Embedding`` is run once over all its rows; outside it, with autograd on (training
    through a fake-quantised table) or under autocast, every call runs it, and a plain table is
    its weight."""
    from recsys_compress.compression.lowrank import LowRankEmbedding

    torch.manual_seed(0)
    table, _ = LowRankEmbedding.from_module(nn.Embedding(12, 6), 3)
    runs = []
    table.register_forward_hook(lambda module, args, output: runs.append(len(args[0])))
    with torch.no_grad():
        expected = table(torch.arange(12))
        runs.clear()
        first = models_base.all_rows(table, 12)
        assert torch.equal(first, expected) and runs == [12]
        with models_base.tables_read_once():
            inside = models_base.all_rows(table, 12)
            assert models_base.all_rows(table, 12) is inside and runs == [12, 12]
            with models_base.tables_read_once():  # a nested block shares the outer's tables
                assert models_base.all_rows(table, 12) is inside and runs == [12, 12]
            assert models_base.all_rows(table, 12) is inside and runs == [12, 12]
            with torch.autocast("cpu", torch.bfloat16):  # nothing kept or reused under autocast
                assert models_base.all_rows(table, 12) is not inside and runs == [12, 12, 12]
            plain = nn.Embedding(4, 2)
            assert models_base.all_rows(plain, 4) is plain.weight
        models_base.all_rows(table, 12)
        assert runs == [12, 12, 12, 12]
        with models_base.tables_read_once():  # a table built under autocast is not kept
            with torch.autocast("cpu", torch.bfloat16):
                models_base.all_rows(table, 12)
            assert models_base.all_rows(table, 12).dtype == torch.float32
            assert runs == [12, 12, 12, 12, 12, 12]
    with models_base.tables_read_once():
        with torch.no_grad():
            kept = models_base.all_rows(table, 12)
        graded = models_base.all_rows(table, 12)
        again = models_base.all_rows(table, 12)
        assert graded.requires_grad and again.requires_grad and not kept.requires_grad
        assert graded is not again and runs[-3:] == [12, 12, 12]


def _tower_input(model: nn.Module, users: torch.Tensor) -> torch.Tensor:
    """The first tower layer's output for every (user, item) pair, as ``all_items`` builds it."""
    mlp = model.mlp
    first = mlp.tower[0]
    dim = mlp.user_embedding.embedding_dim
    user_part = mlp.user_embedding(users) @ first.weight[:, :dim].T
    return user_part[:, None, :] + mlp.item_half()[None, :, :]


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_the_rest_of_the_tower_runs_its_own_layers_only_where_they_are_plain(name):
    """In eval mode (Dropout inert) the in-place path gives the tower's bits; a train-mode
    Dropout, a layer that is not plain or a hook sends the input through the modules."""
    model = randomise(make(name, dropout=0.5))
    users = torch.tensor([0, 4, 4, 11])
    assert any(type(m) is models_ncf.Dropout for m in model.mlp.tower)
    with torch.no_grad():
        hidden = _tower_input(model, users)
        expected = model.mlp.tower[1:](hidden.clone())
        assert torch.equal(model.mlp.rest_of_tower(hidden.clone()), expected)
        model.train()  # dropout acts: the same random draws as the modules' own
        torch.manual_seed(3)
        dropped = model.mlp.tower[1:](hidden.clone())
        torch.manual_seed(3)
        assert torch.equal(model.mlp.rest_of_tower(hidden.clone()), dropped)
        assert not torch.equal(dropped, expected)
        model.eval()
        calls = []
        handle = model.mlp.tower[3].register_forward_hook(lambda *args: calls.append(1))
        assert torch.equal(model.mlp.rest_of_tower(hidden.clone()), expected) and calls == [1]
        handle.remove()
        model.mlp.tower[3] = nn.Sequential(model.mlp.tower[3])
        assert torch.equal(model.mlp.rest_of_tower(hidden.clone()), expected)


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_full_ranking_of_no_users_and_with_autograd(name):
    model = randomise(make(name))
    none = torch.empty(0, dtype=torch.long)
    with torch.no_grad():
        assert model.score_all(none).shape == (0, N_ITEMS)
        assert model.score_all(none, out=torch.empty(5)).shape == (0, N_ITEMS)
    users = torch.tensor([2, 9])
    scores = model.score_all(users)  # autograd on: no buffer, a graph to the weights
    scores.sum().backward()
    assert model.mlp.tower[0].weight.grad is not None
    expected = model(*all_pairs(users)).view(2, N_ITEMS)
    torch.testing.assert_close(scores.detach(), expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_neumf_full_ranking_in_other_dtypes_and_under_autocast(dtype):
    """bf16 and float64 models, and a float32 model under CPU autocast (Lightning's
    ``bf16-mixed`` evaluation), score all items and sampled candidates as ``forward`` does on
    every pair; bf16 keeps the output layer in one piece (one rounding, not two)."""
    model = randomise(make("neumf")).to(dtype)
    users = torch.tensor([1, 5, 12])
    candidates = torch.tensor([[0, 3, 16], [2, 2, 9], [15, 1, 4]])
    with torch.no_grad():
        scores = model.score_all(users)
        expected = model(*all_pairs(users)).view(3, N_ITEMS)
        pairs = model.gmf_user_embedding(users)[:, None, :] * model.gmf_item_embedding.weight
        one_rounding = model.predict(torch.cat([pairs, model.mlp.all_items(users)], -1))
        buffer = torch.full((3 * N_ITEMS,), float("nan"), dtype=dtype)
        into = model.score_all(users, out=buffer)
        sampled = model.score_candidates(users, candidates)
        gmf_pairs = model.gmf_user_embedding(users)[:, None, :] * model.gmf_item_embedding(
            candidates
        )
        hidden = model.mlp.candidates(users, candidates)
        sampled_one_rounding = model.predict(torch.cat([gmf_pairs, hidden], -1)).squeeze(-1)
    assert scores.dtype == sampled.dtype == dtype
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into, scores)
    if dtype == torch.bfloat16:
        assert torch.equal(scores, one_rounding.squeeze(-1))
        assert torch.equal(sampled, sampled_one_rounding)
    tol = 1e-9 if dtype == torch.float64 else 0.05
    torch.testing.assert_close(scores, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(sampled, expected.gather(1, candidates), atol=tol, rtol=tol)
    model = randomise(make("neumf"))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        mixed = model.score_all(users)
        mixed_sampled = model.score_candidates(users, candidates)
        expected = model(*all_pairs(users)).view(3, N_ITEMS)
    torch.testing.assert_close(mixed.float(), expected.float(), atol=0.05, rtol=0.05)
    expected_sampled = expected.gather(1, candidates).float()
    torch.testing.assert_close(mixed_sampled.float(), expected_sampled, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neumf_sampled_scores_take_the_split_output_layer_in_float32(dtype, monkeypatch):
    """float32 scores the GMF half through ``candidate_dots`` (no pair-wide product); bf16 keeps
    the concatenated layer."""
    model = randomise(make("neumf")).to(dtype)
    calls = []
    dots = models_ncf.candidate_dots
    monkeypatch.setattr(models_ncf, "candidate_dots", lambda *a: calls.append(1) or dots(*a))
    with torch.no_grad():
        model.score_candidates(torch.tensor([0, 3]), torch.tensor([[1, 2], [5, 6]]))
    assert calls == ([1] if dtype == torch.float32 else [])


def test_neumf_sampled_scores_with_autograd():
    """Sampled scoring with the output layer split keeps a graph to every weight."""
    model = randomise(make("neumf"))
    users, candidates = torch.tensor([0, 7]), torch.tensor([[1, 2, 3], [4, 4, 16]])
    scores = model.score_candidates(users, candidates)
    scores.sum().backward()
    pairs = model(users.repeat_interleave(3), candidates.reshape(-1)).view(2, 3)
    torch.testing.assert_close(scores.detach(), pairs.detach(), atol=1e-5, rtol=1e-5)
    for name in ("predict.weight", "gmf_item_embedding.weight", "mlp.tower.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_full_ranking_reads_the_item_side_once_for_all_chunks(name, monkeypatch):
    """A compressed item table (here a module that is not ``nn.Embedding``) is run once, and the
    first layer's item half projected once, per ``score_all`` however many chunks of users."""
    model = randomise(make(name))
    users = torch.arange(N_USERS)
    with torch.no_grad():
        expected = model.score_all(users)
    names = ["mlp.item_embedding"] + (["gmf_item_embedding"] if name == "neumf" else [])
    runs = {table: [] for table in names}
    for table in names:
        wrapped = WrappedEmbedding(model.get_submodule(table))
        wrapped.register_forward_hook(lambda m, args, out, table=table: runs[table].append(1))
        parent, _, attr = table.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, wrapped)
    halves = []
    item_half = model.mlp.item_half
    monkeypatch.setattr(model.mlp, "item_half", lambda: halves.append(1) or item_half())
    monkeypatch.setattr(models_ncf, "TOWER_CHUNK_ELEMENTS", 1)  # one user a chunk
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(users), expected, atol=1e-6, rtol=1e-6)
        assert runs == {table: [1] for table in names} and halves == [1]
        model.score_all(users, out=torch.empty(N_USERS * N_ITEMS))
        assert runs == {table: [1, 1] for table in names} and halves == [1, 1]
