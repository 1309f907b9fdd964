"""Low-rank factorisation by truncated SVD: per layer, or jointly for a dot-product model.

``per_layer``: each targeted weight ``W`` (an embedding table ``[n, d]`` or a Linear weight
``[out, in]``) becomes ``left @ right`` with ``left = U_r sqrt(S_r)`` and ``right = sqrt(S_r) V_rᵀ``
(the balanced split of the best rank-r approximation), held by :class:`LowRankEmbedding` /
:class:`LowRankLinear`. An embedding gathers rows of ``left`` only, so its cost follows the batch.
The factors are standard child modules (``left``: ``nn.Embedding`` / ``nn.Linear``, ``right``:
``nn.Linear``), so the methods that act on module types act on them: QAT after SVD quantises the
factors (:func:`select_layer_targets` gives each factor its layer's group and name).

``joint_dot_product``: for a model scoring ``<p_u, q_i>`` (MF) or ``hᵀ(p_u ⊙ q_i)`` (GMF), the
score matrix ``P Qᵀ`` is what matters, not each table. :func:`jointly_reduce_dot_product` finds its
best rank-r approximation from the two tables' Gram matrices and one small SVD
(:func:`joint_transforms`), and returns ordinary tables of
dimension ``r`` (a real dimension reduction).

When: :class:`SVDLowRank` replaces the modules at the start of epoch ``at_epoch`` (0: before
training; later: after some dense training) and rebuilds the optimizer on the factors; the factors
keep training. :func:`apply_svd` does the same without a Trainer (e.g. on a trained checkpoint).

Checkpoints: factorised modules change the parameter names and shapes. The callback registers a
``load_state_dict`` pre-hook on the LightningModule in ``setup()``; Lightning calls ``setup()``
before it loads the checkpoint's weights, so the hook rebuilds the architecture the checkpoint
holds (:func:`match_state_dict`) just before ``fit(ckpt_path=...)`` / ``validate(ckpt_path=...)``
load them. Without a Trainer use :func:`convert_to_lowrank` or :func:`match_state_dict`.

Composition: pruning / L1 must not target a module SVD replaces (its dense factors would drop
their zeros); :meth:`SVDLowRank.setup` checks it on the model
(:func:`check_disjoint_from_sparsity`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from recsys_compress import ops
from recsys_compress.compression.targets import (
    Target,
    TargetSpec,
    module_group,
    replace_module,
    require_match,
    select_targets,
)
from recsys_compress.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "compression.svd"
METHODS = ("per_layer", "joint_dot_product")
USER_TABLE, ITEM_TABLE = "*user_embedding*", "*item_embedding*"
# When ``randomized`` is None: torch.svd_lowrank above RANDOMIZED_MIN_DIM on both sides; the exact
# SVD through the small side's Gram matrix (:func:`gram_svd`) for float32 / half matrices of more
# than GRAM_MIN_NUMEL elements with a side of at most RANDOMIZED_MIN_DIM (embedding tables);
# LAPACK's SVD otherwise.
RANDOMIZED_MIN_DIM = 512
GRAM_MIN_NUMEL = 5_000_000


@dataclass
class SVDConfig:
    """Settings of :class:`SVDLowRank` (``conf/compression/svd.yaml``).

    Rank: exactly one of ``rank`` (fixed r), ``param_ratio`` (keep this fraction of each layer's
    parameters, ``r = floor(ratio * n*d / (n+d))``; joint method: ``r = floor(ratio * d)``) and
    ``energy`` (smallest r keeping this fraction of ``sum σ²``). ``embedding_rank`` /
    ``linear_rank`` override the rule for one group (when they cover every targeted group, the
    three may all be null).
    """

    targets: TargetSpec = field(default_factory=TargetSpec)
    rank: int | None = None
    param_ratio: float | None = 0.5
    energy: float | None = None
    embedding_rank: int | None = None
    linear_rank: int | None = None
    method: str = "per_layer"
    at_epoch: int = 0
    randomized: bool | None = None
    oversample: int = 10
    niter: int = 2

    def __post_init__(self) -> None:
        self.targets.validate(f"{KEY}.targets")
        if self.method not in METHODS:
            raise ConfigError(f"{KEY}.method={self.method!r}: use one of {', '.join(METHODS)}.")
        rules = {"rank": self.rank, "param_ratio": self.param_ratio, "energy": self.energy}
        chosen = [name for name, value in rules.items() if value is not None]
        overrides = {"embedding": self.embedding_rank, "linear": self.linear_rank}
        covered = all(overrides.get(g) is not None for g in self.targets.groups)
        if len(chosen) > 1 or (not chosen and not covered):
            raise ConfigError(
                f"{KEY}: set exactly one of {KEY}.rank, {KEY}.param_ratio and {KEY}.energy "
                f"(got {', '.join(f'{k}={v}' for k, v in rules.items())}); set the others to "
                f"null, e.g. {KEY}.rank=8 {KEY}.param_ratio=null."
            )
        for name in ("rank", "embedding_rank", "linear_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{KEY}.{name}={value} must be a positive integer (>= 1).")
        for name in ("param_ratio", "energy"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{KEY}.{name}={value} must lie in (0, 1].")
        if self.at_epoch < 0:
            raise ConfigError(f"{KEY}.at_epoch={self.at_epoch} must be >= 0 (0: from the start).")
        if self.oversample < 0 or self.niter < 0:
            raise ConfigError(
                f"{KEY}.oversample={self.oversample} / {KEY}.niter={self.niter} must be >= 0."
            )

    def group_rank(self, group: str) -> tuple[int | None, str]:
        """The fixed rank for ``group`` (override first, then ``rank``) and its config key."""
        override = {"embedding": self.embedding_rank, "linear": self.linear_rank}.get(group)
        if override is not None:
            return override, f"{KEY}.{group}_rank"
        return self.rank, f"{KEY}.rank"


# ------------------------------------------------------------------------------------------------
# Rank selection and truncated SVD
# ------------------------------------------------------------------------------------------------


def rank_for_param_ratio(n: int, d: int, ratio: float) -> int:
    """``floor(ratio * n*d / (n+d))``: the rank whose factors hold ``ratio`` of ``n*d`` (>= 1)."""
    r = math.floor(ratio * n * d / (n + d) + 1e-9)
    return max(1, min(r, n, d))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum_{i<r} σ_i² >= energy * sum σ²`` (σ in descending order)."""
    power = singular_values.double().square()
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    r = int(torch.searchsorted(kept, torch.tensor([energy - 1e-6], dtype=kept.dtype))[0]) + 1
    return max(1, min(r, len(singular_values)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def use_randomized(n: int, d: int, randomized: bool | None) -> bool:
    """``randomized`` if set, else True for matrices larger than 512 on both sides."""
    if randomized is not None:
        return randomized
    return min(n, d) > RANDOMIZED_MIN_DIM


def use_gram(n: int, d: int, randomized: bool | None, dtype: torch.dtype = torch.float32) -> bool:
    """Whether :func:`truncated_svd` takes :func:`gram_svd`: ``randomized`` unset and a matrix
    of over 5e6 elements with a side of at most 512 (a large embedding table), not float64 (whose
    digits the squared condition number would halve; LAPACK keeps them)."""
    return (
        randomized is None
        and dtype != torch.float64
        and min(n, d) <= RANDOMIZED_MIN_DIM
        and n * d > GRAM_MIN_NUMEL
    )


def _gram_eigh(
    tall: torch.Tensor, column_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors of a tall ``[n, d]`` matrix
    (times ``diag(column_scale)``, if given) from ``tallᵀ tall``, summed in float64 over passes
    of rows (:func:`~recsys_compress.ops.row_slices`)."""
    gram = torch.zeros(tall.shape[1], tall.shape[1], dtype=torch.float64, device=tall.device)
    for rows in ops.row_slices(*tall.shape):
        part = tall[rows].to(torch.float64)
        gram.addmm_(part.T, part)
    if column_scale is not None:
        scale = column_scale.detach().to(gram)
        gram *= scale[:, None] * scale[None, :]
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    return eigenvalues.flip(0).clamp_(min=0.0).sqrt_(), vectors.flip(1)


def _roundoff(singular_values: torch.Tensor, d: int) -> float:
    """The singular value below which a Gram matrix's eigenvalue is float64 roundoff."""
    top = float(singular_values[0]) if len(singular_values) else 0.0
    return top * math.sqrt(d * torch.finfo(torch.float64).eps)


def gram_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, Vh_r)`` of ``weight``, exact, from the eigenvectors of its ``d x d`` Gram
    matrix (``d``: the small side), then ``U_r = W V_r / S_r`` a pass at a time.

    For an ``[n, d]`` table with ``n >> d`` (``d <= 512``) this is one pass over the table for
    the Gram matrix (in float64) and one for ``U_r``, which is the only large thing it allocates:
    LAPACK's SVD holds ``U`` (``n x d``) and its workspace, ``torch.svd_lowrank`` several
    ``n x (r + oversample)`` blocks and still approximates. A singular value at the Gram
    matrix's roundoff (at most ``S[0] * sqrt(d * eps)``, float64's ``eps``: the directions a
    rank-deficient table lacks) gets a zero column in ``U_r``: its direction is noise, and its
    term is ~0 either way. Squaring the matrix squares its condition number,
    which float64 absorbs for a float32 weight. ``rank`` is capped at the small side, as
    LAPACK's truncation is."""
    w = weight.detach()
    wide = w.shape[0] < w.shape[1]
    tall = w.T if wide else w
    rank = min(rank, tall.shape[1])
    s, v = _gram_eigh(tall)
    cutoff = _roundoff(s, tall.shape[1])
    s, v = s[:rank], v[:, :rank]
    inverse = torch.where(s > cutoff, 1.0 / s, torch.zeros_like(s))
    projection = (v * inverse).to(_compute_dtype(weight))
    u = torch.empty(tall.shape[0], rank, dtype=projection.dtype, device=w.device)
    for rows in ops.row_slices(*tall.shape):
        torch.mm(tall[rows].to(projection.dtype), projection, out=u[rows])
    s, vh = s.to(u.dtype), v.T.to(u.dtype)
    return (vh.T, s, u.T) if wide else (u, s, vh)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values of ``weight`` (descending), through the Gram matrix where
    :func:`truncated_svd` with ``randomized`` unset takes :func:`gram_svd` (the energy rank)."""
    w = weight.detach()
    n, d = w.shape
    if use_gram(n, d, None, w.dtype):
        return _gram_eigh(w.T if n < d else w)[0].to(_compute_dtype(w))
    return torch.linalg.svdvals(w.to(_compute_dtype(w)))


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    randomized: bool | None = None,
    oversample: int = 10,
    niter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, Vh_r)`` of ``weight``: exact (:func:`gram_svd` for a large table, else
    LAPACK's), or ``torch.svd_lowrank`` with ``rank + oversample`` columns and ``niter`` power
    iterations when that is smaller than the matrix (see :func:`use_randomized`)."""
    n, d = weight.shape
    if use_gram(n, d, randomized, weight.dtype):
        return gram_svd(weight, rank)
    w = weight.detach().to(_compute_dtype(weight))
    q = min(n, d, rank + oversample)
    if use_randomized(n, d, randomized) and q < min(n, d):
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def relative_error(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """``||W - left right||_F / ||W||_F`` (0 for a zero ``W``), a pass of
    rows (columns of a wide ``W``) at a time (:func:`~recsys_compress.ops.row_slices`): never a
    ``W``-sized temporary."""
    w = weight.detach()
    if w.shape[0] < w.shape[1]:  # ||A||_F = ||Aᵀ||_F: pass over the long side
        w, left, right = w.T, right.T, left.T
    residual = total = 0.0
    for rows in ops.row_slices(*w.shape):
        part = w[rows].to(left.dtype)
        total += float(torch.linalg.vector_norm(part, dtype=torch.float64).square())
        residual += float(
            torch.linalg.vector_norm(part - left[rows] @ right, dtype=torch.float64).square()
        )
    return math.sqrt(residual / total) if total > 0 else 0.0


def balanced_factors(
    weight: torch.Tensor,
    rank: int,
    randomized: bool | None = None,
    oversample: int = 10,
    niter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``left = U_r sqrt(S_r)``, ``right = sqrt(S_r) V_rᵀ`` and the relative error
    ``||W - left right||_F / ||W||_F`` (:func:`relative_error`)."""
    u, s, vh = truncated_svd(weight, rank, randomized, oversample, niter)
    root = s.sqrt()
    # in place where U is contiguous (gram_svd's of a tall table: U_r is all it allocated); a
    # column slice of a wider U, or a transposed one, gets a product of its own
    left = u.mul_(root) if u.is_contiguous() else u * root
    right = root[:, None] * vh
    del u
    error = relative_error(weight, left, right)
    return left.to(weight.dtype), right.to(weight.dtype), error


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _factory(module: nn.Module) -> dict[str, Any]:
    """``device`` and float ``dtype`` of ``module``'s parameters (float32 if only integer ones,
    e.g. a factorised layer whose factors QAT converted)."""
    params = list(module.parameters())
    floats = [p for p in params if p.is_floating_point()]
    return {
        "device": params[0].device,
        "dtype": floats[0].dtype if floats else torch.float32,
    }


def factor_matrix(module: nn.Module) -> torch.Tensor:
    """The ``[rows, width]`` matrix of a factor: its float ``weight`` (also of a fake-quant
    module), or the dequantised integers of a converted (QAT) module."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return module.dequantize()  # type: ignore[operator]


# ------------------------------------------------------------------------------------------------
# Factorised modules
# ------------------------------------------------------------------------------------------------


class _Factorised(nn.Module):
    """Shared by the factorised modules: ``weight ~ L @ R``, the rank, the SVD init.

    The factors are ordinary child modules (``left``, ``right``: ``nn.Embedding`` /
    ``nn.Linear``), so a method that acts on module types (QAT, pruning) acts on them as on any
    layer; ``group`` is the kind of layer they replace (a factor is compressed with its group's
    settings, see :func:`select_layer_targets`).
    """

    left: nn.Module
    right: nn.Module
    rank: int
    group: str

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L [rows, r], R [r, cols])`` with ``L @ R`` the replaced weight."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The matrix the factors represent (the replaced module's ``weight``)."""
        left, right = self.factors()
        return left @ right

    def _set_factors(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Make ``left`` and ``right`` (the :func:`balanced_factors`) the factors' weights,
        copied only where not contiguous: :meth:`from_module` builds the module on the meta
        device. New Parameters replace the old ones, so this is for a module no optimizer holds
        yet."""
        raise NotImplementedError


class LowRankEmbedding(_Factorised):
    """A table ``L @ R`` (``[n, r] @ [r, d]``): ``forward(ids) = right(left(ids)) = L[ids] @ R``.

    ``left``: ``nn.Embedding(n, r)`` holding ``L``; ``right``: ``nn.Linear(r, d, bias=False)``
    holding ``Rᵀ`` (``nn.Linear`` stores ``[out, in]``). Only the rows of ``L`` that the batch
    uses are gathered. Options of ``nn.Embedding`` (``padding_idx``, ``max_norm``, ``sparse``)
    are not carried over.
    """

    group = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.left = nn.Embedding(num_embeddings, rank, **kw)
        self.right = nn.Linear(rank, embedding_dim, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Placeholders (N(0, 0.1)); :meth:`from_module` or a state dict sets the real values."""
        nn.init.normal_(self.left.weight, std=0.1)
        nn.init.normal_(self.right.weight, std=0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.right(self.left(ids))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return factor_matrix(self.left), factor_matrix(self.right).T

    def _set_factors(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left.weight = nn.Parameter(left.contiguous())  # LAPACK's U is column-major
        self.right.weight = nn.Parameter(right.T.contiguous())

    @classmethod
    @torch.no_grad()
    def from_module(
        cls,
        module: nn.Embedding,
        rank: int,
        randomized: bool | None = None,
        oversample: int = 10,
        niter: int = 2,
    ) -> tuple[LowRankEmbedding, dict[str, Any]]:
        """The rank-``rank`` truncated SVD of ``module.weight``, and its info dict."""
        n, d = module.weight.shape
        left, right, error = balanced_factors(module.weight, rank, randomized, oversample, niter)
        new = cls(n, d, rank, device="meta", dtype=left.dtype)  # no placeholder values drawn
        new._set_factors(left, right)
        return new, _info(rank, error, module, new)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class LowRankLinear(_Factorised):
    """``nn.Linear`` with ``weight = L @ R`` (``[out, r] @ [r, in]``), run as two Linears:
    ``forward(x) = left(right(x))``, ``right = nn.Linear(in, r, bias=False)`` holding ``R``,
    ``left = nn.Linear(r, out)`` holding ``L`` and the bias."""

    group = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.right = nn.Linear(in_features, rank, bias=False, **kw)
        self.left = nn.Linear(rank, out_features, bias=bias, **kw)
        self.reset_parameters()

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias (held by ``left``)."""
        return self.left.bias  # type: ignore[return-value]

    def reset_parameters(self) -> None:
        """Placeholder values; :meth:`from_module` or a state dict sets the real ones."""
        nn.init.normal_(self.left.weight, std=1.0 / math.sqrt(self.rank))
        nn.init.normal_(self.right.weight, std=1.0 / math.sqrt(self.in_features))
        if self.left.bias is not None:
            nn.init.zeros_(self.left.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(x))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return factor_matrix(self.left), factor_matrix(self.right)

    def _set_factors(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.left.weight = nn.Parameter(left.contiguous())  # LAPACK's U is column-major
        self.right.weight = nn.Parameter(right.contiguous())

    @classmethod
    @torch.no_grad()
    def from_module(
        cls,
        module: nn.Linear,
        rank: int,
        randomized: bool | None = None,
        oversample: int = 10,
        niter: int = 2,
    ) -> tuple[LowRankLinear, dict[str, Any]]:
        """The rank-``rank`` truncated SVD of ``module.weight`` (bias copied), and its info."""
        has_bias = module.bias is not None
        left, right, error = balanced_factors(module.weight, rank, randomized, oversample, niter)
        new = cls(module.in_features, module.out_features, rank, has_bias, "meta", left.dtype)
        new._set_factors(left, right)
        if has_bias:
            new.left.bias = nn.Parameter(module.bias.detach().clone())
        return new, _info(rank, error, module, new)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


LOW_RANK_TYPES = (LowRankEmbedding, LowRankLinear)


def _info(rank: int, error: float, old: nn.Module, new: nn.Module) -> dict[str, Any]:
    return {
        "rank": rank,
        "relative_error": error,
        "params_before": _own_params(old),
        "params_after": _own_params(new),
    }


def factorize_module(
    module: nn.Module,
    rank: int,
    randomized: bool | None = None,
    oversample: int = 10,
    niter: int = 2,
) -> tuple[nn.Module, dict[str, Any]]:
    """:meth:`LowRankEmbedding.from_module` or :meth:`LowRankLinear.from_module` by type."""
    if isinstance(module, nn.Embedding):
        return LowRankEmbedding.from_module(module, rank, randomized, oversample, niter)
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_module(module, rank, randomized, oversample, niter)
    raise TypeError(f"cannot factorise a {type(module).__name__}: only Embedding / Linear")


def _matrix(module: nn.Module) -> torch.Tensor:
    """``[n, d]`` table of an Embedding, ``[out, in]`` weight of a Linear."""
    return module.weight  # type: ignore[return-value]


def convert_to_lowrank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each ``name`` in ``ranks`` by an empty factorised module of that rank, in place.

    Used to load a factorised checkpoint into a freshly built model (the values come from the
    state dict). Modules that are already factorised with that rank are left alone.
    """
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        if isinstance(module, LOW_RANK_TYPES) and module.rank == rank:
            continue
        if isinstance(module, nn.Embedding | LowRankEmbedding):
            new: nn.Module = LowRankEmbedding(
                module.num_embeddings, module.embedding_dim, rank, **_factory(module)
            )
        elif isinstance(module, nn.Linear | LowRankLinear):
            has_bias = module.bias is not None
            new = LowRankLinear(
                module.in_features, module.out_features, rank, has_bias, **_factory(module)
            )
        else:
            raise TypeError(f"{name} is a {type(module).__name__}: only Embedding / Linear")
        replace_module(model, name, new)


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    """``{name: rank}`` of every factorised module in ``model`` (for :func:`convert_to_lowrank`)."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}


def _matches(names: list[str], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def select_layer_targets(model: nn.Module, spec: TargetSpec, key: str) -> list[Target]:
    """:func:`~recsys_compress.compression.targets.select_targets`, reading each factor of a
    factorised layer as part of that layer: the factor (``<layer>.left`` / ``<layer>.right``) is
    selected when the layer's group (``embedding`` for :class:`LowRankEmbedding`, whose ``right``
    is a Linear) is in ``spec.groups``, the layer's name or its own matches ``include`` and
    neither matches ``exclude``; its target group is the layer's. So ``include: [user_embedding]``
    picks both factors of the factorised table, with the embedding settings.
    """
    spec.validate(key)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}
    found, candidates = [], []
    for name, module in model.named_modules():
        group = module_group(module)
        if group is None:
            continue
        names = [name]
        layer_name = name.rpartition(".")[0]
        if layer_name in layers and name != layer_name:
            group = layers[layer_name].group
            names.append(layer_name)
        candidates.append(f"{name} ({group})")
        if (
            group in spec.groups
            and _matches(names, list(spec.include))
            and not _matches(names, list(spec.exclude))
        ):
            found.append(Target(name, module, group))
    return require_match(found, candidates, spec, key)


def factorised_layer(root: nn.Module, name: str) -> _Factorised | None:
    """The factorised layer whose factor is module ``name`` (its ``left`` / ``right``), else
    None."""
    layer_name, _, child = name.rpartition(".")
    if child not in ("left", "right"):
        return None
    layer = root.get_submodule(layer_name) if layer_name else root
    return layer if isinstance(layer, LOW_RANK_TYPES) else None


def _inside_factorised(root: nn.Module, name: str) -> bool:
    """Whether module ``name`` lies inside a factorised layer (an ancestor of it is one)."""
    parts = name.split(".")
    return any(
        isinstance(root.get_submodule(".".join(parts[:i])) if i else root, LOW_RANK_TYPES)
        for i in range(len(parts))
    )


def _layer_targets(root: nn.Module, spec: TargetSpec) -> list[Target]:
    """The targets of ``spec`` that SVD may factorise: factors of layers factorised before are
    never factorised again."""
    key = f"{KEY}.targets"
    targets = select_targets(root, spec, key)
    plain = [t for t in targets if not _inside_factorised(root, t.name)]
    if not plain:
        raise ConfigError(
            f"{key} selects only factors of layers that are factorised already "
            f"({', '.join(t.name for t in targets)}); nothing left to factorise."
        )
    return plain


def _columns(module: nn.Module) -> int:
    """The dimension a factorisation or a joint reduction may change (table dim / in_features)."""
    if isinstance(module, nn.Embedding | LowRankEmbedding):
        return module.embedding_dim
    return module.in_features


def _saved_shape(state_dict: dict[str, Any], key: str) -> tuple[int, ...] | None:
    """Shape of the matrix saved under ``key``: its ``weight``, or the ``qweight`` of a module
    that QAT converted to integers."""
    for name in ("weight", "qweight"):
        tensor = state_dict.get(f"{key}{name}")
        if tensor is not None:
            return tuple(tensor.shape)
    return None


def _upgrade_legacy_factors(state_dict: dict[str, Any], key: str, is_embedding: bool) -> None:
    """Rename, in place, the factors of a layer saved when they were raw Parameters (``left``,
    ``right``, and the Linear's ``bias``) to the keys of the factor modules (``left.weight``,
    ``right.weight`` (transposed for an embedding), ``left.bias``)."""
    if f"{key}left" not in state_dict or f"{key}right" not in state_dict:
        return
    left, right = state_dict.pop(f"{key}left"), state_dict.pop(f"{key}right")
    state_dict[f"{key}left.weight"] = left
    state_dict[f"{key}right.weight"] = right.T.contiguous() if is_embedding else right
    if not is_embedding and f"{key}bias" in state_dict:
        state_dict[f"{key}left.bias"] = state_dict.pop(f"{key}bias")


def _rebuilt_like(module: nn.Module, state_dict: dict[str, Any], key: str) -> nn.Module | None:
    """A module of ``module``'s kind shaped like the parameters under ``key`` in ``state_dict``
    (None: it already fits, or the rows / outputs differ, which the load then reports)."""
    is_embedding = isinstance(module, nn.Embedding | LowRankEmbedding)
    if not is_embedding and not isinstance(module, nn.Linear | LowRankLinear):
        return None
    rows = module.num_embeddings if is_embedding else module.out_features
    kw = _factory(module)
    factorised = isinstance(module, LOW_RANK_TYPES)
    _upgrade_legacy_factors(state_dict, key, is_embedding)
    left, right = _saved_shape(state_dict, f"{key}left."), _saved_shape(state_dict, f"{key}right.")
    if left is not None and right is not None:
        # embedding: left [n, r], right [d, r]; linear: left [out, r], right [r, in]
        n, r = left
        d = right[0] if is_embedding else right[1]
        if n != rows or (factorised and module.rank == r and _columns(module) == d):
            return None
        if is_embedding:
            return LowRankEmbedding(n, d, r, **kw)
        return LowRankLinear(d, n, r, f"{key}left.bias" in state_dict, **kw)
    if f"{key}weight" in state_dict:
        n, d = state_dict[f"{key}weight"].shape
        if n != rows or (not factorised and _columns(module) == d):
            return None
        if factorised:
            log.warning(
                "%s: the checkpoint holds a dense weight (saved before %s was applied); "
                "restoring the dense module",
                key.rstrip("."),
                KEY,
            )
        has_bias = f"{key}bias" in state_dict
        return nn.Embedding(n, d, **kw) if is_embedding else nn.Linear(d, n, has_bias, **kw)
    return None


def match_state_dict(
    root: nn.Module,
    state_dict: dict[str, Any],
    names: list[str] | None = None,
    prefix: str = "",
) -> list[str]:
    """Rebuild modules of ``root`` so their parameters have the names and shapes of ``state_dict``.

    A module whose entry has factors (``left.weight`` / ``right.weight``, or ``qweight`` for
    factors that QAT converted) becomes an (empty) factorised module of the saved rank; one whose
    entry has a ``weight`` becomes a plain Embedding / Linear of that shape (a jointly reduced
    table, or a checkpoint saved before the factorisation). Only the second dimension may change:
    a different number of rows (outputs) is left for ``load_state_dict`` to report. Factors saved
    as raw ``left`` / ``right`` Parameters (before the factors were modules) are renamed in
    ``state_dict``. Quantised factors stay plain here: QAT's load hook (or
    ``export.load_compressed_state``) makes them integer modules. ``names``: the modules to
    consider (default: every Embedding / Linear, factorised or not); the factors inside a
    factorised module are left to it. Returns the names of the rebuilt modules.
    """
    if names is None:
        kinds = (nn.Embedding, nn.Linear, *LOW_RANK_TYPES)
        names = [n for n, m in root.named_modules() if n and isinstance(m, kinds)]
    rebuilt = []
    for name in names:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            continue
        if _inside_factorised(root, name):
            continue
        new = _rebuilt_like(module, state_dict, f"{prefix}{name}.")
        if new is not None:
            replace_module(root, name, new)
            rebuilt.append(name)
    return rebuilt


# ------------------------------------------------------------------------------------------------
# Joint reduction of a dot product
# ------------------------------------------------------------------------------------------------


def _table(table: nn.Module | torch.Tensor) -> torch.Tensor:
    from recsys_compress.models.base import all_rows  # here: config.py imports this module

    if isinstance(table, torch.Tensor):
        return table.detach()
    return all_rows(table, table.num_embeddings).detach()  # type: ignore[arg-type]


def joint_transforms(
    user_table: torch.Tensor, item_table: torch.Tensor, user_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T_p, T_q, S)`` (float64, ``[d, k]``, ``[d, k]``, ``[k]``) with ``A = P' T_p`` and
    ``B = Q T_q`` orthonormal and ``P' Qᵀ = A diag(S) Bᵀ`` (``P' = P diag(user_scale)``: GMF's
    head folded in), ``k`` the smaller of the two tables' numerical ranks: the SVD of the score
    matrix from the two tables' ``d x d`` Gram matrices, never users x items, never a
    table-sized copy.

    With ``P' = U_p S_p V_pᵀ`` and ``Q = U_q S_q V_qᵀ`` (:func:`_gram_eigh`; directions at
    roundoff dropped), ``P' Qᵀ = U_p M U_qᵀ`` for the small ``M = S_p V_pᵀ V_q S_q = U S Vᵀ``,
    so ``A = U_p U = P' V_p S_p⁻¹ U`` and ``B = Q V_q S_q⁻¹ V``: one pass over each table for its
    Gram matrix, and the callers' one pass to apply ``T`` (:func:`_transformed`). The thin QRs
    this replaced held ``Q_p``, ``Q_p U`` and LAPACK's copy of each table (3x the tables at
    1M x 100k). Squaring the tables squares their condition numbers, which float64 absorbs for
    float32 tables; float64 tables keep ~8 of their digits here (the per-layer SVD keeps LAPACK
    for them)."""
    sp, vp = _gram_eigh(user_table, user_scale)
    sq, vq = _gram_eigh(item_table)
    kp = int((sp > _roundoff(sp, len(sp))).sum())
    kq = int((sq > _roundoff(sq, len(sq))).sum())
    sp, vp, sq, vq = sp[:kp], vp[:, :kp], sq[:kq], vq[:, :kq]
    u, s, vh = torch.linalg.svd((vp * sp).T @ (vq * sq), full_matrices=False)
    return (vp / sp) @ u, (vq / sq) @ vh.T, s


def _transformed(
    table: torch.Tensor, transform: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``table @ transform`` a pass of rows at a time (:func:`~recsys_compress.ops.row_slices`),
    in the table's compute dtype, into ``out`` (zero-padded on the right where it is wider; it
    may be ``table`` itself: each pass is read before it is written)."""
    dtype = _compute_dtype(table)
    transform = transform.to(dtype)
    if out is None:
        out = table.new_empty(table.shape[0], transform.shape[1])
    k = transform.shape[1]
    for rows in ops.row_slices(*table.shape):
        part = table[rows].to(dtype) @ transform
        out[rows, k:] = 0
        out[rows, :k] = part
    return out


def joint_factors(
    user_table: torch.Tensor, item_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, S)`` with ``P Qᵀ = A diag(S) Bᵀ``, A and B with orthonormal columns (to the
    tables' conditioning: :func:`joint_transforms`, applied in the tables' dtype)."""
    p, q = user_table.detach(), item_table.detach()
    t_p, t_q, s = joint_transforms(p, q)
    dtype = _compute_dtype(p)
    return _transformed(p.to(dtype), t_p), _transformed(q.to(dtype), t_q), s.to(dtype)


def _check_joint_rank(rank: int, available: int, key: str) -> None:
    if rank > available:
        raise ConfigError(
            f"{key}={rank} exceeds the rank of the score matrix P Qᵀ ({available}, at most the "
            f"embedding dim): set {key} <= {available}, or use {KEY}.param_ratio / {KEY}.energy."
        )


@torch.no_grad()
def jointly_reduce_dot_product(
    user_table: nn.Module | torch.Tensor,
    item_table: nn.Module | torch.Tensor,
    r: int,
) -> tuple[nn.Embedding, nn.Embedding]:
    """Tables ``P' [users, r]`` and ``Q' [items, r]`` with ``P' Q'ᵀ`` the best rank-r approximation
    of ``P Qᵀ`` (Eckart–Young): ``P' = A_r sqrt(S_r)``, ``Q' = B_r sqrt(S_r)``
    (:func:`joint_transforms`; zero columns beyond the tables' numerical rank).

    A weighted dot product ``hᵀ(p ⊙ q)`` is reduced by passing ``P diag(h)`` as ``user_table``.
    """
    p, q = _table(user_table), _table(item_table)
    t_p, t_q, s = joint_transforms(p, q)
    _check_joint_rank(r, min(len(p), len(q), p.shape[1]), f"{KEY}.rank")
    return _reduced_tables(p, q, t_p, t_q, s, r, dtype=p.dtype)


def _reduced_tables(
    p: torch.Tensor,
    q: torch.Tensor,
    t_p: torch.Tensor,
    t_q: torch.Tensor,
    s: torch.Tensor,
    r: int,
    user_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Embedding, nn.Embedding]:
    """Tables ``A_r sqrt(S_r)`` and ``B_r sqrt(S_r)`` (:func:`joint_transforms`), made a pass
    at a time into the new tables (built on the meta device: no placeholder weights)."""
    t_user, t_item = _balanced(t_p, t_q, s, r, user_scale)
    tables = []
    for table, transform in ((p, t_user), (q, t_item)):
        weight = torch.empty(len(table), r, dtype=dtype or table.dtype, device=table.device)
        module = nn.Embedding(len(table), r, device="meta", dtype=weight.dtype)
        module.weight = nn.Parameter(_transformed(table, transform, weight))
        tables.append(module)
    return tables[0], tables[1]


def _balanced(
    t_p: torch.Tensor,
    t_q: torch.Tensor,
    s: torch.Tensor,
    r: int,
    user_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transforms of the raw tables to their first ``r`` balanced columns ``A sqrt(S)``,
    ``B sqrt(S)`` (``user_scale``: GMF's head, applied to the user table's columns)."""
    root = s[:r].sqrt()
    t_user = t_p[:, :r] * root
    if user_scale is not None:
        t_user = user_scale.detach().to(t_user)[:, None] * t_user
    return t_user, t_q[:, :r] * root


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def find_dot_product(
    root: nn.Module,
    targets: TargetSpec,
    key: str = KEY,
    alternative: str = f"{KEY}.method=per_layer",
) -> tuple[str, str, str | None]:
    """``(user table, item table, head)`` names of the dot product among ``targets``.

    The pair: the one targeted embedding matching ``*user_embedding*`` and the one matching
    ``*item_embedding*``, of equal dim. The head: a plain ``nn.Linear(dim, 1)`` next to the user
    table (same parent module), read as the weights ``h`` of ``hᵀ(p ⊙ q) + b``; None for a plain
    dot product. Callers verify the structure numerically before keeping a result. Errors name
    ``key`` and suggest ``alternative``.
    """
    tables = [t for t in select_targets(root, targets, f"{key}.targets") if t.group == "embedding"]
    users = [t.name for t in tables if fnmatch.fnmatchcase(t.name, USER_TABLE)]
    items = [t.name for t in tables if fnmatch.fnmatchcase(t.name, ITEM_TABLE)]
    if len(users) != 1 or len(items) != 1:
        raise ConfigError(
            f"{key}: a dot-product method needs exactly one user table ({USER_TABLE}) and one "
            f"item table ({ITEM_TABLE}) among {key}.targets; found users={users}, items={items}. "
            f"Narrow {key}.targets.include to the pair that feeds the dot product, or use "
            f"{alternative}."
        )
    user, item = users[0], items[0]
    dim = root.get_submodule(user).embedding_dim
    if root.get_submodule(item).embedding_dim != dim:
        raise ConfigError(
            f"{key}: {user} and {item} have different dims, so they do not feed a dot product; "
            f"use {alternative}."
        )
    parent = root.get_submodule(_parent(user)) if _parent(user) else root
    heads = [
        f"{_parent(user)}.{n}" if _parent(user) else n
        for n, m in parent.named_children()
        if type(m) is nn.Linear and m.in_features == dim and m.out_features == 1
    ]
    if len(heads) > 1:
        raise ConfigError(
            f"{key}: several Linear({dim}, 1) layers next to {user} ({heads}); cannot tell which "
            f"weights the dot product. Use {alternative}."
        )
    return user, item, heads[0] if heads else None


def _structure_error(key: str, model: nn.Module, user: str, item: str, alternative: str) -> str:
    return (
        f"{key}: the scores of {type(model).__name__} are not <p_u, q_i> (or h^T(p_u * q_i)) of "
        f"{user} and {item}, so a dot-product method does not apply. Use {alternative}."
    )


@torch.no_grad()
def rotate_to_spectral_basis(
    root: nn.Module, targets: TargetSpec, key: str, alternative: str
) -> list[nn.Parameter]:
    """Rewrite a dot-product model's tables, in place, in the balanced basis of its score matrix:
    ``P <- A sqrt(S)``, ``Q <- B sqrt(S)`` with ``P Qᵀ = A diag(S) Bᵀ`` (:func:`joint_transforms`;
    GMF folds ``h`` into ``P`` and sets ``h = 1``). Every score is unchanged (checked on probe
    pairs; a model that is not such a dot product is restored and raises ConfigError).

    Dimension ``j`` then carries the ``j``-th singular value, so per-row magnitudes concentrate in
    the leading dimensions for users and items alike: pruning keeps dimensions both sides keep. In
    the raw basis a user and an item each keeping 20% of 64 dimensions at random share about 2.6.
    Returns the Parameters it changed (their optimizer state no longer applies).
    """
    user_name, item_name, head_name = find_dot_product(root, targets, key, alternative)
    user_mod, item_mod = root.get_submodule(user_name), root.get_submodule(item_name)
    head = root.get_submodule(head_name) if head_name else None
    params = [user_mod.weight, item_mod.weight] + ([head.weight] if head is not None else [])
    if any(not isinstance(p, torch.Tensor) or p.ndim != 2 for p in params):
        raise ConfigError(f"{key}: {user_name} / {item_name} are not plain tables; {alternative}.")
    p, q = _table(user_mod), _table(item_mod)
    scale = head.weight[0] if head is not None else None
    t_p, t_q, s = joint_transforms(p, q, scale)
    if len(s) == 0:  # a zero table: no basis to rotate to, and nothing to gain
        log.info("%s: %s / %s score nothing (a zero table); not rotated", key, user_name, item_name)
        return []
    t_user, t_item = _balanced(t_p, t_q, s, len(s), scale)
    model = _recommender_of(root, user_name)
    if model is not None:
        _check_scores_kept(
            model,
            (user_mod, item_mod, head),
            (p, q),
            (t_user, t_item),
            _structure_error(key, model, user_name, item_name, alternative),
        )
    else:
        log.warning("%s: no Recommender holds %s; structure not verified", key, user_name)
    # in place, a pass at a time; k = len(s) columns (fewer than dim for a rank-deficient score
    # matrix, or a table with fewer rows than dims), zero-padded
    _transformed(p, t_user, params[0].detach())
    _transformed(q, t_item, params[1].detach())
    if head is not None:
        params[2].fill_(1.0)
    return params


@torch.no_grad()
def _check_scores_kept(
    model: nn.Module,
    modules: tuple[nn.Module, nn.Module, nn.Module | None],
    tables: tuple[torch.Tensor, torch.Tensor],
    transforms: tuple[torch.Tensor, torch.Tensor],
    error: str,
) -> None:
    """Raise :class:`ConfigError` (``error``) unless the scores of :func:`_probe_pairs` are
    unchanged when the tables' rows are rewritten by ``transforms`` at full rank (the head set
    to 1): true of a (weighted) dot product only. Only the probe pairs' rows of the current
    modules are rewritten, and restored (a score reading other rows would be checked on a
    partial rewrite; no model here does)."""
    user_mod, item_mod, head = modules
    users, items = _probe_pairs(user_mod, item_mod)
    rows = (users.unique(), items.unique())
    weights = (user_mod.weight, item_mod.weight)
    saved = [w[r].clone() for w, r in zip(weights, rows, strict=True)]
    saved_head = head.weight.clone() if head is not None else None
    was_training = model.training
    model.eval()
    try:
        before = model(users, items)
        dot = user_mod(users) * item_mod(items)
        dot = (dot * head.weight[0] if head is not None else dot).sum(-1)
        for weight, table, transform, ids in zip(weights, tables, transforms, rows, strict=True):
            weight[ids] = _transformed(table[ids], transform, torch.empty_like(weight[ids]))
        if head is not None:
            head.weight.fill_(1.0)
        after = model(users, items)
    finally:
        for weight, ids, old in zip(weights, rows, saved, strict=True):
            weight[ids] = old
        if head is not None and saved_head is not None:
            head.weight.copy_(saved_head)
        model.train(was_training)
    tolerance = 1e-3 * float(dot.abs().max()) + 1e-5 * float(before.abs().max()) + 1e-12
    if float((after - before).abs().max()) > tolerance:
        raise ConfigError(error)


def _recommender_of(root: nn.Module, name: str) -> nn.Module | None:
    """The innermost ``Recommender`` containing module ``name`` (for the structure check)."""
    from recsys_compress.models.base import Recommender  # here: config.py imports this module

    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        module = root.get_submodule(".".join(parts[:i])) if i else root
        if isinstance(module, Recommender):
            return module
    return None


@torch.no_grad()
def _joint_apply(root: nn.Module, cfg: SVDConfig) -> list[dict[str, Any]]:
    user_name, item_name, head_name = find_dot_product(root, cfg.targets)
    user_mod, item_mod = root.get_submodule(user_name), root.get_submodule(item_name)
    head = root.get_submodule(head_name) if head_name else None
    p, q = _table(user_mod), _table(item_mod)
    # GMF: h^T (p * q) = <p * h, q>; h is folded into the user table's transform
    scale = head.weight[0] if head is not None else None
    t_p, t_q, s = joint_transforms(p, q, scale)
    dim = p.shape[1]
    fixed, key = cfg.group_rank("embedding")
    if fixed is not None:
        rank = fixed
    elif cfg.param_ratio is not None:
        rank = max(1, math.floor(cfg.param_ratio * dim + 1e-9))
    else:
        assert cfg.energy is not None
        rank = rank_for_energy(s, cfg.energy)
    # columns beyond the numerical rank len(s) are zero-padded
    _check_joint_rank(rank, min(len(p), len(q), dim), key)

    def install(r: int) -> None:
        dtype = _factory(user_mod)["dtype"]
        new_user, new_item = _reduced_tables(p, q, t_p, t_q, s, r, scale, dtype)
        replace_module(root, user_name, new_user)
        replace_module(root, item_name, new_item)
        if head is not None and head_name is not None:
            new_head = nn.Linear(r, 1, head.bias is not None, **_factory(head))
            nn.init.ones_(new_head.weight)
            if head.bias is not None:
                new_head.bias.copy_(head.bias)
            replace_module(root, head_name, new_head)

    originals = [(user_name, user_mod), (item_name, item_mod), (head_name, head)]
    model = _recommender_of(root, user_name)
    if model is None:
        log.warning("%s: no Recommender holds %s; structure not verified", KEY, user_name)
    else:
        # At full rank the reduction is exact: changed scores mean no (weighted) dot product.
        _check_scores_kept(
            model,
            (user_mod, item_mod, head),
            (p, q),
            _balanced(t_p, t_q, s, len(s), scale),
            _structure_error(KEY, model, user_name, item_name, f"{KEY}.method=per_layer"),
        )
    install(rank)
    power = s.double().square()
    error = float((power[rank:].sum() / power.sum()).sqrt()) if power.sum() > 0 else 0.0
    report = []
    for name, old in originals:
        if name is None or old is None:
            continue
        report.append(
            {
                "name": name,
                "group": "linear" if name == head_name else "embedding",
                "method": "joint_dot_product",
                "rank": rank,
                "relative_error": error,
                "params_before": _own_params(old),
                "params_after": _own_params(root.get_submodule(name)),
                "replaced": True,
            }
        )
    return report


def _probe_pairs(user_mod: nn.Module, item_mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """256 random (user, item) pairs from a fixed generator (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(0)
    device = next(user_mod.parameters()).device
    users = torch.randint(user_mod.num_embeddings, (256,), generator=gen)
    items = torch.randint(item_mod.num_embeddings, (256,), generator=gen)
    return users.to(device), items.to(device)


# ------------------------------------------------------------------------------------------------
# Per-layer application
# ------------------------------------------------------------------------------------------------


def _layer_rank(cfg: SVDConfig, group: str, weight: torch.Tensor) -> int:
    n, d = weight.shape
    fixed, key = cfg.group_rank(group)
    if fixed is not None:
        if fixed > min(n, d):
            raise ConfigError(
                f"{key}={fixed} exceeds min(n, d)={min(n, d)} of a [{n}, {d}] {group} weight: "
                f"set {key} <= {min(n, d)}, or use {KEY}.embedding_rank / {KEY}.linear_rank / "
                f"{KEY}.param_ratio."
            )
        return fixed
    if cfg.param_ratio is not None:
        return rank_for_param_ratio(n, d, cfg.param_ratio)
    assert cfg.energy is not None
    return rank_for_energy(singular_values(weight), cfg.energy)


@torch.no_grad()
def apply_svd(module: nn.Module, cfg: SVDConfig) -> list[dict[str, Any]]:
    """Factorise the targets of ``cfg`` in ``module`` (in place) and return one dict per layer:
    ``name, group, method, rank, relative_error, params_before, params_after, replaced``.

    Works on a LightningModule or a bare model, at any point (from scratch or trained).
    Layers that no rank can shrink (``n + d >= n*d``, e.g. a ``Linear(d, 1)`` output layer) are
    kept dense (``replaced: False``).
    """
    if cfg.method == "joint_dot_product":
        return _joint_apply(module, cfg)
    report = []
    for target in _layer_targets(module, cfg.targets):
        weight = _matrix(target.module)
        n, d = weight.shape
        before = _own_params(target.module)
        entry: dict[str, Any] = {"name": target.name, "group": target.group, "method": "per_layer"}
        if n + d >= n * d:
            entry |= {"rank": None, "relative_error": 0.0, "params_before": before}
            report.append(entry | {"params_after": before, "replaced": False})
            log.info(
                "%s: %s [%d, %d] kept dense (no rank saves parameters)", KEY, target.name, n, d
            )
            continue
        rank = _layer_rank(cfg, target.group, weight)
        new, info = factorize_module(target.module, rank, cfg.randomized, cfg.oversample, cfg.niter)
        replace_module(module, target.name, new)
        if info["params_after"] >= info["params_before"]:
            log.warning(
                "%s: %s at rank %d has %d parameters, not fewer than the dense %d",
                KEY,
                target.name,
                rank,
                info["params_after"],
                info["params_before"],
            )
        report.append(entry | info | {"replaced": True})
    return report


# ------------------------------------------------------------------------------------------------
# Lightning callback
# ------------------------------------------------------------------------------------------------


def _rebuild_optimizers(trainer: L.Trainer) -> None:
    """New optimizers (and schedulers) from ``configure_optimizers`` over the current parameters.

    Kept from the old ones: the state (e.g. Adam moments) of parameters that still exist, the
    current learning rate and the schedulers' position (so a schedule does not restart). Then
    the module and every callback with ``on_optimizers_rebuilt(trainer)`` are told, so that
    hooks they put on the old optimizers (pruning's and L1's row hooks on the sparse path, L1's
    fused Adam steps) go on the new ones and the module keeps the new tables' gradients:
    without that, pruning stopped masking the tables of a sparse run after SVD had factorised
    its MLP, and L1 stopped shrinking them (until the twenty-first round).
    """
    old_optimizers = list(trainer.optimizers)
    old_schedulers = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for old, new in zip(old_optimizers, trainer.optimizers, strict=True):
        for group in new.param_groups:
            for param in group["params"]:
                if param in old.state:
                    new.state[param] = old.state[param]
        old_lrs = [g["lr"] for g in old.param_groups]
        if len(old_lrs) == len(new.param_groups) or len(set(old_lrs)) == 1:
            for i, group in enumerate(new.param_groups):
                group["lr"] = old_lrs[min(i, len(old_lrs) - 1)]
    for config, state in zip(trainer.lr_scheduler_configs, old_schedulers, strict=True):
        groups = len(config.scheduler.optimizer.param_groups)
        state = dict(state)
        for key in ("base_lrs", "_last_lr"):
            values = state.get(key)
            if isinstance(values, list) and values and len(values) != groups:
                state[key] = [values[0]] * groups
        config.scheduler.load_state_dict(state)
    for told in [trainer.lightning_module, *trainer.callbacks]:
        if hasattr(told, "on_optimizers_rebuilt"):
            told.on_optimizers_rebuilt(trainer)


def replaced_by_svd(root: nn.Module, cfg: SVDConfig) -> list[str]:
    """The modules :func:`apply_svd` would replace in ``root`` (per layer: the targets some rank
    shrinks; joint: the two tables and the GMF head)."""
    if cfg.method == "joint_dot_product":
        return [n for n in find_dot_product(root, cfg.targets) if n is not None]
    return [
        t.name
        for t in _layer_targets(root, cfg.targets)
        if sum(t.weight.shape) < t.weight.shape[0] * t.weight.shape[1]
    ]


def check_disjoint_from_sparsity(trainer: L.Trainer, root: nn.Module, cfg: SVDConfig) -> None:
    """ConfigError when a pruning or L1 callback of ``trainer`` targets a module that SVD will
    replace: the dense factors would silently drop the zeros those methods keep in its weight.
    Disjoint targets compose (e.g. prune the embeddings, factorise the MLP)."""
    from recsys_compress.compression.pruning import KEY as PRUNE_KEY
    from recsys_compress.compression.pruning import MagnitudePruning
    from recsys_compress.compression.sparsity import KEY as L1_KEY
    from recsys_compress.compression.sparsity import L1Proximal

    sparsifiers = [
        (PRUNE_KEY if isinstance(cb, MagnitudePruning) else L1_KEY, cb.cfg.targets)
        for cb in trainer.callbacks
        if isinstance(cb, MagnitudePruning | L1Proximal)
    ]
    if not sparsifiers:
        return
    replaced = replaced_by_svd(root, cfg)
    for key, spec in sparsifiers:
        theirs = [t.name for t in select_targets(root, spec, f"{key}.targets")]
        both = [
            n
            for n in theirs
            if any(n == r or n.startswith(f"{r}.") or r.startswith(f"{n}.") for r in replaced)
        ]
        if both:
            raise ConfigError(
                f"{key}.targets and {KEY}.targets overlap on {', '.join(both)}: SVD would "
                "replace their sparse weights by dense factors and silently undo the sparsity. "
                f"Make the targets disjoint, e.g. {key}.targets.groups=[embedding] "
                f"{KEY}.targets.groups=[linear], or exclude these modules from one of them "
                f"({key}.targets.exclude / {KEY}.targets.exclude)."
            )


class SVDLowRank(L.Callback):
    """Replaces the targets of ``cfg`` by their truncated SVD at the start of epoch ``at_epoch``,
    then training continues on the factors (the optimizer is rebuilt over them).

    ``report``: one dict per layer (see :func:`apply_svd`), also logged as
    ``compression/svd/<name>/{rank,relative_error}``. Checkpoint state: ``applied`` and ``ranks``
    (``{name: rank}``); the architecture itself is rebuilt from the checkpoint's weights by a
    ``load_state_dict`` pre-hook installed in :meth:`setup`.
    """

    def __init__(self, cfg: SVDConfig) -> None:
        self.cfg = cfg
        self.applied = False
        self.ranks: dict[str, int] = {}
        self.report: list[dict[str, Any]] = []
        self._names: list[str] | None = None
        self._hook: Any = None
        self._hooked: nn.Module | None = None

    def _watched_names(self, pl_module: nn.Module) -> list[str]:
        """The modules this callback may change (targets, and the head of the joint method)."""
        factorised = list(lowrank_ranks(pl_module))
        try:
            if self.cfg.method == "joint_dot_product":
                found = [n for n in find_dot_product(pl_module, self.cfg.targets) if n is not None]
            else:
                found = [t.name for t in _layer_targets(pl_module, self.cfg.targets)]
        except ConfigError:
            if not factorised:
                raise
            found = []
        return list(dict.fromkeys([*found, *factorised]))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.applied:
            check_disjoint_from_sparsity(trainer, pl_module, self.cfg)
        # Lightning calls setup() before it loads a checkpoint's weights (fit / validate / test
        # with ckpt_path), so the pre-hook is in place to rebuild the factorised architecture.
        if self._hooked is not pl_module:
            if self._hook is not None:
                self._hook.remove()
            self._names = self._watched_names(pl_module)
            self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)
            self._hooked = pl_module

    def _before_load(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
    ) -> None:
        rebuilt = match_state_dict(module, state_dict, self._names, prefix)
        if rebuilt:
            log.info("%s: rebuilt %s to match the checkpoint", KEY, ", ".join(rebuilt))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.applied or trainer.current_epoch < self.cfg.at_epoch:
            return
        if trainer.strategy.model is not pl_module:
            raise ConfigError(
                f"{KEY} replaces modules during training, which a wrapping strategy "
                f"({type(trainer.strategy).__name__}) does not see: use trainer.strategy=auto "
                "on one device, or apply_svd() to the model before fit."
            )
        self.report = apply_svd(pl_module, self.cfg)
        self.ranks = {e["name"]: e["rank"] for e in self.report if e["replaced"]}
        self.applied = True
        _rebuild_optimizers(trainer)
        for entry in self.report:
            if entry["replaced"]:
                for stat in ("rank", "relative_error"):
                    pl_module.log(
                        f"compression/svd/{entry['name']}/{stat}",
                        float(entry[stat]),
                        on_step=False,
                        on_epoch=True,
                        batch_size=1,
                    )
        before = sum(e["params_before"] for e in self.report)
        after = sum(e["params_after"] for e in self.report)
        log.info(
            "%s at epoch %d: %d layers, parameters %d -> %d",
            KEY,
            trainer.current_epoch,
            len(self.ranks),
            before,
            after,
        )

    def compression_done(self, trainer: L.Trainer) -> bool:
        """The model is factorised (checkpoint ranking starts then)."""
        return self.applied

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.applied:
            log.warning(
                "%s was never applied: training ended before %s.at_epoch=%d",
                KEY,
                KEY,
                self.cfg.at_epoch,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "ranks": dict(self.ranks),
            "method": self.cfg.method,
            "report": [dict(e) for e in self.report],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict["applied"])
        self.ranks = dict(state_dict["ranks"])
        self.report = [dict(e) for e in state_dict.get("report", [])]


__all__ = [
    "LowRankEmbedding",
    "LowRankLinear",
    "SVDConfig",
    "SVDLowRank",
    "apply_svd",
    "balanced_factors",
    "check_disjoint_from_sparsity",
    "convert_to_lowrank",
    "factor_matrix",
    "factorised_layer",
    "factorize_module",
    "find_dot_product",
    "gram_svd",
    "joint_factors",
    "jointly_reduce_dot_product",
    "lowrank_ranks",
    "match_state_dict",
    "rank_for_energy",
    "rank_for_param_ratio",
    "relative_error",
    "replaced_by_svd",
    "rotate_to_spectral_basis",
    "select_layer_targets",
    "singular_values",
    "truncated_svd",
    "use_gram",
]
