"""Matrix factorisation with biases (the dot-product model of Rendle et al., 2020)."""

from __future__ import annotations

import torch
from torch import nn

from recsys_compress.models.base import (
    Recommender,
    all_rows,
    candidate_dots,
    init_embedding,
    rows,
    scores_view,
)


class MF(Recommender):
    """``score(u, i) = <p_u, q_i> + b_u + b_i + b``; biases optional."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int,
        use_bias: bool = True,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_users, self.num_items, self.use_bias = num_users, num_items, use_bias
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        init_embedding(self.user_embedding, init_std)
        init_embedding(self.item_embedding, init_std)
        if use_bias:
            self.user_bias = nn.Embedding(num_users, 1)
            self.item_bias = nn.Embedding(num_items, 1)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.global_bias = nn.Parameter(torch.zeros(1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        scores = (rows(self.user_embedding, users) * rows(self.item_embedding, items)).sum(-1)
        if self.use_bias:
            user_bias = rows(self.user_bias, users).squeeze(-1)
            scores = scores + user_bias + rows(self.item_bias, items).squeeze(-1)
            scores = scores + self.global_bias
        return scores

    def score_difference(
        self, users: torch.Tensor, pos_items: torch.Tensor, neg_items: torch.Tensor
    ) -> torch.Tensor:
        """``<p_u, q_pos - q_neg> + b_pos - b_neg``: the user's vector is read once per triple,
        not once per pair, which halves the user table's gather and gradient rows (BPR-MF's step
        is mostly those row reads and writes). Equal to the difference of two ``forward`` calls
        up to float rounding."""
        items = torch.cat([pos_items, neg_items])
        pos, neg = rows(self.item_embedding, items).split(len(users))
        diff = (rows(self.user_embedding, users) * (pos - neg)).sum(-1)
        if not self.use_bias:
            return diff
        # The user and global biases cancel; they stay in the graph, with the exact zero
        # gradient the two-pair form gives them, so that every parameter still gets a gradient
        # (DDP without find_unused_parameters requires it) and optimizers see what they saw.
        item_bias = rows(self.item_bias, items).squeeze(-1)
        shared = rows(self.user_bias, users).squeeze(-1) + self.global_bias
        pos_bias, neg_bias = item_bias.split(len(users))
        return diff + ((shared + pos_bias) - (shared + neg_bias))

    def score_candidates(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``forward`` on every (user, candidate) pair with the same arithmetic, but each
        user's vector and bias read once, not once per candidate: sampled evaluation of 1,024
        users x 100 candidates at 1M x 100k, MF-64, 5 ms against 14 ms a batch."""
        scores = candidate_dots(rows(self.user_embedding, users), self.item_embedding, candidates)
        if self.use_bias:
            scores += rows(self.user_bias, users)  # [B, 1]: broadcast over the candidates
            scores += rows(self.item_bias, candidates).squeeze(-1)
            scores += self.global_bias
        return scores

    def score_all(self, users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        user_vectors = self.user_embedding(users)
        item_table = all_rows(self.item_embedding, self.num_items)
        view = scores_view(out, user_vectors, len(users), self.num_items)
        if not self.use_bias:
            return torch.mm(user_vectors, item_table.T, out=view)
        # One fused matmul + row bias, then one in-place pass: evaluation is dominated by passes
        # over the [users, items] matrix.
        item_bias = all_rows(self.item_bias, self.num_items).squeeze(-1) + self.global_bias
        scores = torch.addmm(item_bias, user_vectors, item_table.T, out=view)
        return scores.add_(self.user_bias(users))
