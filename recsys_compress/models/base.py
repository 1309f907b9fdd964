"""The interface every recommender implements, and helpers that keep models compression-agnostic.

Compression replaces ``nn.Embedding`` / ``nn.Linear`` modules by pruned, factorised or quantised
ones. Models therefore read tables through their modules (:func:`rows`, :func:`all_rows`), and
take shortcuts that read ``.weight`` directly only when a module is exactly ``nn.Linear`` /
``nn.Embedding``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from recsys_compress.ops import gather_rows, gathered_table

# Cap on the elements of one intermediate tensor of the generic Recommender.score_all, which
# runs forward on every (user, item) pair (about 64 MB of float32; MLP and NeuMF have their own).
MAX_CHUNK_ELEMENTS = 1 << 24
# Gathered candidate values scored at a time (4 MB of float32: 163 users x 100 candidates x 64).
# Scoring 1,024 users x 100 candidates x 64 in one piece (26 MB) took 26 / 38 / 46 ns a candidate
# with 3,706 / 100k / 1M items, in these chunks 15 / 32 / 41 ns (2 threads; one thread 34 / 61 /
# 74 against 31 / 60 / 63 ns); 2^18 and 2^19 values were slower, 2^21 no faster (timing loops).
CANDIDATE_CHUNK_ELEMENTS = 1 << 20


def rows(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``embedding(ids)`` for any embedding-like module. A table for which
    :func:`~recsys_compress.ops.gathered_table` holds is read on CPU with
    :func:`~recsys_compress.ops.gather_rows` instead of ``F.embedding``: the same values and
    gradients, with a faster backward (module hooks on such a table are not called)."""
    if ids.device.type == "cpu" and gathered_table(embedding):
        assert isinstance(embedding, nn.Embedding)
        if ids.dim() == 1:
            return gather_rows(embedding.weight, ids)
        out = gather_rows(embedding.weight, ids.reshape(-1))
        return out.view(*ids.shape, embedding.embedding_dim)
    return embedding(ids)


def candidate_dots(
    vectors: torch.Tensor, embedding: nn.Module, candidates: torch.Tensor
) -> torch.Tensor:
    """``[B, C]`` dot products of ``vectors[b]`` (``[B, d]``) with the rows of ``embedding`` at
    ``candidates[b, c]``, summed as ``(p * q).sum(-1)`` is (the same rounding as a model's
    forward on each pair). Without autograd the product is written into the gathered rows when
    they are memory of their own (not the module's parameters or buffers): at 1,024 users x 100
    candidates x 64 that saves a 26 MB temporary per batch. A plain ``nn.Embedding`` on CPU is
    read :data:`CANDIDATE_CHUNK_ELEMENTS` gathered values at a time, so that the gather, the
    product and the sum pass over memory still in cache: the same bits, each sum being over one
    row. Other modules are read in one piece (a fake-quantised table quantises itself whole
    once per call of as many ids as it has rows; on CUDA chunks would only add launches)."""
    needs_grad = torch.is_grad_enabled() and (
        vectors.requires_grad or any(p.requires_grad for p in embedding.parameters())
    )
    if needs_grad:
        return (rows(embedding, candidates) * vectors[:, None, :]).sum(-1)
    per_chunk = max(1, CANDIDATE_CHUNK_ELEMENTS // max(1, candidates.shape[1] * vectors.shape[1]))
    plain = type(embedding) is nn.Embedding and candidates.device.type == "cpu"
    if not plain or len(candidates) <= per_chunk:
        return _candidate_dots(vectors, embedding, candidates)
    parts = zip(vectors.split(per_chunk), candidates.split(per_chunk), strict=True)
    return torch.cat([_candidate_dots(v, embedding, c) for v, c in parts])


def _candidate_dots(
    vectors: torch.Tensor, embedding: nn.Module, candidates: torch.Tensor
) -> torch.Tensor:
    """:func:`candidate_dots` of one chunk, without autograd."""
    items = rows(embedding, candidates)
    if not items.is_contiguous() or _shares_storage(items, embedding):
        return (items * vectors[:, None, :]).sum(-1)
    return items.mul_(vectors[:, None, :]).sum(-1)


def _shares_storage(tensor: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``tensor`` lies in the storage of one of ``module``'s parameters or buffers."""
    ptr = tensor.untyped_storage().data_ptr()
    held = (*module.parameters(), *module.buffers())
    return any(t.untyped_storage().data_ptr() == ptr for t in held)


# all_rows' tables inside tables_read_once(): module id -> (module, table)
_READ_ONCE: ContextVar[dict[int, tuple[nn.Module, torch.Tensor]] | None] = ContextVar(
    "tables_read_once", default=None
)


@contextmanager
def tables_read_once() -> Iterator[None]:
    """Inside, with autograd off, :func:`all_rows` builds the full table of a module that is
    not a plain ``nn.Embedding`` (a quantised, factorised or fake-quantised one) once, and
    later calls return it: for work that reads whole tables many times while the weights stay
    as they are, such as :meth:`~recsys_compress.export.CompressedRecommender.recommend`'s
    chunks of users (an int8 table of 100k x 64 takes ~5-13 ms to dequantise). A block inside
    another shares the outer one's tables. Nothing is kept under autocast (a table built there
    has autocast's dtype)."""
    if _READ_ONCE.get() is not None:
        yield
        return
    token = _READ_ONCE.set({})
    try:
        yield
    finally:
        _READ_ONCE.reset(token)


def all_rows(embedding: nn.Module, num_rows: int) -> torch.Tensor:
    """The full table of an embedding-like module (works for any module mapping ids to vectors);
    built once per :func:`tables_read_once` block."""
    if type(embedding) is nn.Embedding:
        return embedding.weight
    device = next(embedding.parameters()).device
    built = _READ_ONCE.get()
    if built is not None and (torch.is_grad_enabled() or torch.is_autocast_enabled(device.type)):
        built = None
    if built is not None:
        module, table = built.get(id(embedding), (None, None))
        if module is embedding and table is not None and len(table) == num_rows:
            return table
    table = embedding(torch.arange(num_rows, device=device))
    if built is not None:
        built[id(embedding)] = (embedding, table)
    return table


def scores_view(
    out: torch.Tensor | None, like: torch.Tensor, rows: int, cols: int
) -> torch.Tensor | None:
    """``out``'s first ``rows * cols`` elements as a ``[rows, cols]`` matrix to write scores
    computed from ``like`` into, or None where it does not fit: no buffer, another dtype or
    device than ``like``, too few elements, not contiguous, autograd on (``out=`` ops record no
    gradient) or autocast on (its matmuls pick their own dtype)."""
    if (
        out is None
        or out.dtype != like.dtype
        or out.device != like.device
        or out.numel() < rows * cols
        or not out.is_contiguous()
        or torch.is_grad_enabled()
        or torch.is_autocast_enabled(like.device.type)
    ):
        return None
    return out.view(-1)[: rows * cols].view(rows, cols)


def takes_out(model: nn.Module) -> bool:
    """Whether ``model.score_all`` takes an ``out`` buffer (:meth:`Recommender.score_all`): the
    built-in models do (NeuMF and MLP a chunk of users at a time); custom models written before
    it may not. The bound method is inspected (a wrapper or an instance attribute may differ
    from the class's): a few microseconds a call."""
    try:
        return "out" in inspect.signature(model.score_all).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def init_embedding(embedding: nn.Embedding, std: float) -> None:
    """N(0, std) as in the NCF reference code (std=0.01)."""
    nn.init.normal_(embedding.weight, mean=0.0, std=std)


class Recommender(nn.Module):
    """Scores (user, item) pairs; ``score_all`` scores every item for a batch of users.

    Subclasses implement ``forward(users, items) -> scores`` for 1-D id tensors of equal length and
    may override ``score_all`` with a faster exact computation.
    """

    num_users: int
    num_items: int

    def score_all(self, users: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[len(users), num_items]`` scores, computed in chunks of pairs to bound memory.

        ``out``: a buffer of at least ``len(users) * num_items`` elements that a model may write
        the scores into and return a view of (:func:`scores_view`), so that an evaluation's
        batches reuse one matrix; a model whose scores come another way ignores it, as this
        generic form does. The scores are the same either way."""
        rows_per_chunk = max(1, MAX_CHUNK_ELEMENTS // (self.num_items * 64))
        items = torch.arange(self.num_items, device=users.device)
        parts = []
        for chunk in users.split(rows_per_chunk):
            pair_users = chunk.repeat_interleave(self.num_items)
            pair_items = items.repeat(len(chunk))
            parts.append(self(pair_users, pair_items).view(len(chunk), self.num_items))
        return torch.cat(parts)

    def score_difference(
        self, users: torch.Tensor, pos_items: torch.Tensor, neg_items: torch.Tensor
    ) -> torch.Tensor:
        """``score(users, pos_items) - score(users, neg_items)`` (the BPR loss's argument).

        One forward pass over the positive and the negative pairs: each table is read, and its
        gradient built, once per step instead of twice. Models whose score is linear in the item
        vector override it with a cheaper exact form."""
        scores = self(torch.cat([users, users]), torch.cat([pos_items, neg_items]))
        pos, neg = scores.split(len(users))
        return pos - neg

    def score_candidates(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` scores of ``candidates[b]`` for ``users[b]`` (sampled evaluation).

        This generic form runs ``forward`` on every (user, candidate) pair, reading each user's
        rows once per candidate. Models override it to read them once per user."""
        flat_users = users[:, None].expand_as(candidates).reshape(-1)
        return self(flat_users, candidates.reshape(-1)).view(candidates.shape)
