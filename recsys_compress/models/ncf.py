"""Neural Collaborative Filtering (He et al., 2017): GMF, MLP and their fusion NeuMF."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recsys_compress import ops
from recsys_compress.models.base import (
    Recommender,
    all_rows,
    candidate_dots,
    init_embedding,
    rows,
    scores_view,
    tables_read_once,
)

# Pairs of NeuMF / MLP full ranking computed at a time, times the first tower layer's width:
# a chunk's widest intermediate (that layer's output for every pair) holds about this many
# elements (one user a chunk at least), 2^21 (8 MB), so that a chunk's passes stay in cache.
# NeuMF-32 with a [64, 32, 16] tower, against the code before 2026-12-07 (2^24 a chunk, a
# pair-wide GMF product and concatenation, ReLU out of place), alternated in one process,
# medians of 5: ML-100K's 943 x 1,682 191-309 -> 85-118 ms on 2 threads, 275 -> 161 ms on one;
# 1,024 users x ML-1M's 3,706 items 717 -> 235 ms on 2 threads, 670-874 -> 375-401 ms on one
# (the old code's fresh 64 MB intermediates took up to 220k page faults a call). There, on one
# thread, 2^22 and 2^23 took 469 and 502 ms, 2^20 and 2^19 435 and 580 ms.
TOWER_CHUNK_ELEMENTS = 1 << 21


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training path draws its mask with ``torch.rand``
    (:func:`ops.dropout`: ~40% less time than torch's ``bernoulli_``); ``inplace=True`` keeps
    torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(input)
        return ops.dropout(input, self.p, self.training)


def _plain_layer(module: nn.Module) -> bool:
    """A tower layer :meth:`_MLPBranch.rest_of_tower` may run itself: ``nn.Linear`` with a bias,
    ``nn.ReLU``, or ``nn.Dropout`` that does nothing (eval mode or p=0), with no hooks."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    if type(module) is nn.Linear:
        return module.bias is not None
    if type(module) in (nn.Dropout, Dropout):
        return not module.training or module.p == 0
    return type(module) is nn.ReLU


def _tower(in_dim: int, layers: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) blocks, Xavier-initialised as in the NCF code."""
    blocks: list[nn.Module] = []
    for size in layers:
        linear = nn.Linear(in_dim, size)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        blocks += [linear, nn.ReLU()]
        if dropout > 0:
            blocks.append(Dropout(dropout))
        in_dim = size
    return nn.Sequential(*blocks)


def _predict_layer(in_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, 1)
    nn.init.kaiming_uniform_(layer.weight, a=1, nonlinearity="sigmoid")
    nn.init.zeros_(layer.bias)
    return layer


class _MLPBranch(nn.Module):
    """User and item embeddings, concatenated and passed through the MLP tower."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int,
        layers: Sequence[int],
        dropout: float,
        init_std: float,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        init_embedding(self.user_embedding, init_std)
        init_embedding(self.item_embedding, init_std)
        self.tower = _tower(2 * dim, layers, dropout)
        self.out_dim = layers[-1]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([rows(self.user_embedding, users), rows(self.item_embedding, items)], -1)
        return self.tower(pair)

    def rest_of_tower(self, hidden: torch.Tensor) -> torch.Tensor:
        """``tower[1:](hidden)`` for the first layer's output ``hidden`` (a fresh tensor of any
        number of leading dims). When those layers are plain (:func:`_plain_layer`), ReLU runs
        in place and each ``nn.Linear`` is one ``addmm`` over the flattened pairs, as
        ``nn.Linear`` computes it: the same values, and one pair-wide tensor fewer per ReLU."""
        rest = self.tower[1:]
        if not all(_plain_layer(module) for module in rest):
            return rest(hidden)
        x = hidden
        for module in rest:
            if type(module) is nn.ReLU:
                x = x.relu_()
            elif type(module) is nn.Linear:
                flat = torch.addmm(module.bias, x.view(-1, x.shape[-1]), module.weight.T)
                x = flat.view(*x.shape[:-1], flat.shape[-1])
        return x

    def candidates(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``[B, C, out_dim]`` tower outputs for ``candidates[b]`` with ``users[b]``: with a
        plain ``nn.Linear`` first layer each user's half is read and projected once, not once
        per candidate (as :meth:`all_items`); otherwise the pairs are built."""
        first = self.tower[0]
        if type(first) is not nn.Linear:
            flat_users = users[:, None].expand_as(candidates).reshape(-1)
            out = self(flat_users, candidates.reshape(-1))
            return out.view(*candidates.shape, -1)
        user_vectors = rows(self.user_embedding, users)
        dim = user_vectors.shape[-1]
        user_part = user_vectors @ first.weight[:, :dim].T
        item_part = torch.addmm(
            first.bias, rows(self.item_embedding, candidates.reshape(-1)), first.weight[:, dim:].T
        ).view(*candidates.shape, -1)
        return self.rest_of_tower(item_part + user_part[:, None, :])

    def item_half(self) -> torch.Tensor | None:
        """``W_i q + b`` for every item: the first layer's item half and bias, projected once
        for all of a full ranking's chunks of users; None unless that layer is a plain
        ``nn.Linear`` (the user and item tables have the same width)."""
        first = self.tower[0]
        if type(first) is not nn.Linear:
            return None
        item_vectors = all_rows(self.item_embedding, self.num_items)
        return item_vectors @ first.weight[:, -item_vectors.shape[-1] :].T + first.bias

    def all_items(self, users: torch.Tensor, item_half: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, num_items, out_dim]`` tower outputs for every item.

        When the first layer is a plain ``nn.Linear``, ``W [p; q] + b = W_u p + (W_i q + b)``: the
        user and item halves are projected once and summed by broadcasting, instead of running
        the first layer on ``B x num_items`` concatenated pairs (``item_half``: the item half
        from :meth:`item_half`, if the caller has it). Otherwise pairs are built.
        """
        user_vectors = self.user_embedding(users)
        first = self.tower[0]
        if type(first) is nn.Linear:
            if item_half is None:
                item_half = self.item_half()
            dim = user_vectors.shape[-1]
            user_part = user_vectors @ first.weight[:, :dim].T
            return self.rest_of_tower(user_part[:, None, :] + item_half[None, :, :])
        item_vectors = all_rows(self.item_embedding, self.num_items)
        pair = torch.cat(
            [
                user_vectors[:, None, :].expand(-1, self.num_items, -1),
                item_vectors[None, :, :].expand(len(users), -1, -1),
            ],
            dim=-1,
        )
        return self.tower(pair)


def _score_all_chunked(
    model: MLP | NeuMF, users: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """``model._score_chunk`` over chunks of users whose widest intermediate (the first tower
    layer's output for each pair) holds about :data:`TOWER_CHUNK_ELEMENTS` (one user a chunk
    at least), each chunk written into its rows of ``out`` where it fits (:func:`scores_view`),
    else concatenated. The item side (the first layer's item half, compressed tables) is
    computed once for all the chunks."""
    first = model.mlp.tower[0]
    width = getattr(first, "out_features", 64)
    rows = max(1, TOWER_CHUNK_ELEMENTS // max(1, model.num_items * width))
    like = model.predict.weight if _plain_layer(model.predict) else None
    view = None if like is None else scores_view(out, like, len(users), model.num_items)
    with tables_read_once():
        item_half = model.mlp.item_half()
        if view is None:
            parts = [model._score_chunk(chunk, item_half=item_half) for chunk in users.split(rows)]
            return torch.cat(parts)
        for start in range(0, len(users), rows):
            chunk = users[start : start + rows]
            target = view[start : start + len(chunk)]
            model._score_chunk(chunk, out=target, item_half=item_half)
    return view


def _plus_tower(scores: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``scores += hidden @ weight`` in place: the tower outputs' share of NeuMF's split output
    layer (``scores`` a fresh or ``out`` matrix, contiguous)."""
    scores.view(-1).addmv_(hidden.reshape(-1, hidden.shape[-1]), weight)
    return scores


class GMF(Recommender):
    """Generalised MF: ``h^T (p_u * q_i) + b``."""

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        init_embedding(self.user_embedding, init_std)
        init_embedding(self.item_embedding, init_std)
        self.predict = _predict_layer(dim)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        pair = rows(self.user_embedding, users) * rows(self.item_embedding, items)
        return self.predict(pair).squeeze(-1)

    def score_all(self, users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if type(self.predict) is not nn.Linear:
            return super().score_all(users)
        weighted_users = self.user_embedding(users) * self.predict.weight
        item_table = all_rows(self.item_embedding, self.num_items)
        view = scores_view(out, weighted_users, len(users), self.num_items)
        if view is None:
            return weighted_users @ item_table.T + self.predict.bias
        return torch.mm(weighted_users, item_table.T, out=view).add_(self.predict.bias)

    def score_candidates(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``h^T (p_u * q_c) + b`` as ``(h * p_u) . q_c + b``: each user's vector read and
        weighted once, not once per candidate (``forward`` up to float rounding)."""
        if type(self.predict) is not nn.Linear:
            return super().score_candidates(users, candidates)
        weighted_users = rows(self.user_embedding, users) * self.predict.weight
        scores = candidate_dots(weighted_users, self.item_embedding, candidates)
        return scores + self.predict.bias


class MLP(Recommender):
    """NCF's MLP recommender: concatenated embeddings through a ReLU tower, then a linear score."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int,
        layers: Sequence[int],
        dropout: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.mlp = _MLPBranch(num_users, num_items, dim, layers, dropout, init_std)
        self.predict = _predict_layer(self.mlp.out_dim)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.predict(self.mlp(users, items)).squeeze(-1)

    def _score_chunk(
        self,
        users: torch.Tensor,
        out: torch.Tensor | None = None,
        item_half: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[len(users), num_items]`` scores; ``out``: a contiguous matrix of that shape to
        write them into (only with a plain ``nn.Linear`` output layer); ``item_half``: see
        :meth:`_MLPBranch.all_items`."""
        hidden = self.mlp.all_items(users, item_half)
        if out is None:
            return self.predict(hidden).squeeze(-1)
        flat = hidden.view(-1, hidden.shape[-1])  # nn.Linear's own addmm, written into out
        torch.addmm(self.predict.bias, flat, self.predict.weight.T, out=out.view(-1, 1))
        return out

    def score_candidates(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.predict(self.mlp.candidates(users, candidates)).squeeze(-1)

    def score_all(self, users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _score_all_chunked(self, users, out)


class NeuMF(Recommender):
    """GMF and MLP branches with separate embeddings, concatenated before the final layer."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int,
        mlp_dim: int,
        layers: Sequence[int],
        dropout: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.gmf_user_embedding = nn.Embedding(num_users, dim)
        self.gmf_item_embedding = nn.Embedding(num_items, dim)
        init_embedding(self.gmf_user_embedding, init_std)
        init_embedding(self.gmf_item_embedding, init_std)
        self.mlp = _MLPBranch(num_users, num_items, mlp_dim, layers, dropout, init_std)
        self.predict = _predict_layer(dim + self.mlp.out_dim)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = rows(self.gmf_user_embedding, users) * rows(self.gmf_item_embedding, items)
        return self.predict(torch.cat([gmf, self.mlp(users, items)], dim=-1)).squeeze(-1)

    def _score_chunk(
        self,
        users: torch.Tensor,
        out: torch.Tensor | None = None,
        item_half: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[len(users), num_items]`` scores (into ``out`` where given, a contiguous matrix of
        that shape; ``item_half``: see :meth:`_MLPBranch.all_items`). With a plain
        ``nn.Linear`` output layer ``w = [w_g; w_m]`` in float32 or float64 and autocast off,
        the score ``w_g . (p_u * q_i) + w_m . h_ui + b`` is computed as ``(w_g * p_u) . q_i``
        (one matmul, as GMF's) plus the tower's outputs times ``w_m``: no pair-wide GMF product
        or concatenation, ``forward`` up to float rounding. Otherwise (a bf16 model would round
        twice; autocast gives the parts different dtypes) the pairs are concatenated."""
        gmf_users = self.gmf_user_embedding(users)
        gmf_items = all_rows(self.gmf_item_embedding, self.num_items)
        hidden = self.mlp.all_items(users, item_half)
        if not self._splits_output(gmf_users):
            gmf = gmf_users[:, None, :] * gmf_items[None, :, :]
            scores = self.predict(torch.cat([gmf, hidden], dim=-1)).squeeze(-1)
            return scores if out is None else out.copy_(scores)
        weighted_users, tower_weight = self._gmf_users_and_tower_weight(gmf_users)
        scores = torch.addmm(self.predict.bias, weighted_users, gmf_items.T, out=out)
        return _plus_tower(scores, hidden, tower_weight)

    def _gmf_users_and_tower_weight(
        self, gmf_users: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The split output layer's halves: ``w_g * p_u`` and ``w_m``."""
        weight = self.predict.weight[0]
        dim = gmf_users.shape[-1]
        return gmf_users * weight[:dim], weight[dim:]

    def _splits_output(self, like: torch.Tensor) -> bool:
        """Whether the output layer is computed as its GMF and tower halves (:meth:`_score_chunk`):
        a plain ``nn.Linear`` in float32 or float64, autocast off on ``like``'s device."""
        return (
            _plain_layer(self.predict)
            and self.predict.weight.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(like.device.type)
        )

    def score_candidates(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` scores of ``candidates[b]`` for ``users[b]``; with the output layer split
        as in :meth:`_score_chunk`, the GMF half is ``(w_g * p_u) . q_c`` (:func:`candidate_dots`,
        as GMF's) and the tower's outputs times ``w_m`` are added in place: no pair-wide product
        or concatenation (1,024 users x 100 candidates, NeuMF-32, two runs of a timing loop:
        at ML-1M size 34-45 -> 19-30 ms on two threads, 35-73 -> 26-38 ms on one; at
        ML-100K size 27-32 -> 23-29 ms on one and two threads)."""
        gmf_users = rows(self.gmf_user_embedding, users)
        hidden = self.mlp.candidates(users, candidates)
        if not self._splits_output(gmf_users):
            gmf = gmf_users[:, None, :] * rows(self.gmf_item_embedding, candidates)
            return self.predict(torch.cat([gmf, hidden], dim=-1)).squeeze(-1)
        weighted_users, tower_weight = self._gmf_users_and_tower_weight(gmf_users)
        scores = candidate_dots(weighted_users, self.gmf_item_embedding, candidates)
        return _plus_tower(scores, hidden, tower_weight).add_(self.predict.bias)

    def score_all(self, users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _score_all_chunked(self, users, out)

    @torch.no_grad()
    def load_pretrained(self, gmf: GMF, mlp: MLP, alpha: float = 0.5) -> None:
        """Initialise from trained GMF and MLP models (NCF paper, Sec. 3.4.1).

        Embeddings and the tower are copied; the output layer is ``[alpha h_gmf, (1-alpha) h_mlp]``
        with bias ``alpha b_gmf + (1-alpha) b_mlp``.
        """
        self.gmf_user_embedding.load_state_dict(gmf.user_embedding.state_dict())
        self.gmf_item_embedding.load_state_dict(gmf.item_embedding.state_dict())
        self.mlp.load_state_dict(mlp.mlp.state_dict())
        self.predict.weight.copy_(
            torch.cat([alpha * gmf.predict.weight, (1 - alpha) * mlp.predict.weight], dim=1)
        )
        self.predict.bias.copy_(alpha * gmf.predict.bias + (1 - alpha) * mlp.predict.bias)
