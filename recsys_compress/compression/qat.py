"""Quantisation-aware training (QAT) on torchao's fake quantisers, and its post-training baseline.

Before ``start_epoch`` the float model trains as usual. At that epoch's start each targeted
``nn.Embedding`` / ``nn.Linear`` is swapped for a fake-quant module that shares its Parameter
objects (the optimizer keeps working, no rebuild): the forward pass sees weights rounded to the
int4/int8 grid, the backward pass reaches the float weights through torchao's straight-through
estimator. After ``freeze_epoch`` the scales are computed once over the whole weight and then kept
(no longer recomputed). At ``on_fit_end`` every fake-quant module is converted into a real integer
module (``qweight`` int8, ``scales`` float32) whose forward pass dequantises what it reads.

Granularity: ``per_channel`` gives one scale per output row (an embedding row, a Linear output
neuron); ``per_group`` one scale per ``group_size`` consecutive weights of a row. Either way
quantisation is local to a row, so :class:`FakeQuantEmbedding` gathers the batch's rows first and
fake-quantises only those: the same numbers as torchao's ``FakeQuantizedEmbedding`` (which
fake-quantises the whole table every step), at a cost that follows the batch, not the table.

Scales use torchao's conventions (``torchao.quantization.qat.IntxFakeQuantizer``):
symmetric: ``w = q * s`` with ``q`` in [-128, 127] (int8) or [-8, 7] (int4), ``s = max|w| / 127.5``
(``/ 7.5``); asymmetric: ``w = q * s + z`` with a float32 offset ``z`` per scale (torchao's
"float zero-point domain"), ``q`` over the same signed range.

Checkpoints: the callback stores ``{"started", "frozen", "converted", "config"}``; fake-quant
modules keep their (frozen) scales as buffers. The callback registers a load hook on the
LightningModule that rebuilds fake-quant (or converted) modules from the keys of the state dict
being loaded, *before* the weights load, so ``trainer.fit(ckpt_path=...)`` resumes QAT, and
converted modules accept a float/fake-quant state dict (quantising it), so
``trainer.validate(ckpt_path="best")`` after a converting fit evaluates the quantised best weights.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from recsys_compress.compression.lowrank import factorised_layer, select_layer_targets
from recsys_compress.compression.targets import TargetSpec, module_group, replace_module
from recsys_compress.errors import ConfigError
from recsys_compress.ops import gather_rows, gathered_table


@functools.cache
def torchao_qat() -> SimpleNamespace:
    """torchao's QAT pieces, imported on first use (so :class:`QATConfig` stays cheap to import).

    The import's noise on CPU builds is silenced: the wheel tries to load CUDA kernels (mxfp8,
    cutlass) a CPU torch cannot load, and registers an Enum with torch's pytree; both only log
    warnings, irrelevant to the pure-PyTorch fake quantisation used here.
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives
        from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
        from torchao.quantization.qat.utils import _fake_quantize_per_channel_group
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return SimpleNamespace(
        IntxFakeQuantizeConfig=IntxFakeQuantizeConfig,
        IntxFakeQuantizer=IntxFakeQuantizer,
        ZeroPointDomain=quant_primitives.ZeroPointDomain,
        fake_quantize_per_channel_group=_fake_quantize_per_channel_group,
        do_fake_quantize_affine=quant_primitives._do_fake_quantize_affine,
    )


log = logging.getLogger(__name__)

KEY = "compression.qat"
BITS = (4, 8)
GRANULARITIES = ("per_channel", "per_group")
SCALE_DTYPES = ("float16", "float32")


@dataclass
class QATConfig:
    """Settings of :class:`QuantizationAwareTraining` (``conf/compression/qat.yaml``)."""

    targets: TargetSpec = field(default_factory=TargetSpec)
    bits: int = 8
    embedding_bits: int | None = None
    linear_bits: int | None = None
    granularity: str = "per_channel"
    group_size: int = 32
    symmetric: bool = True
    scale_dtype: str = "float16"
    float_dtype: str = "float16"
    activation_bits: int | None = None
    start_epoch: int = 0
    freeze_epoch: int | None = None
    convert_at_end: bool = True
    post_training: bool = False

    def __post_init__(self) -> None:
        self.targets.validate(f"{KEY}.targets")
        for name in ("bits", "embedding_bits", "linear_bits", "activation_bits"):
            value = getattr(self, name)
            if value is not None and value not in BITS:
                raise ConfigError(
                    f"{KEY}.{name}={value}: use 4 or 8 (integer bits of the stored values)."
                )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"{KEY}.granularity={self.granularity!r}: use one of {', '.join(GRANULARITIES)}."
            )
        if self.group_size < 2:
            raise ConfigError(
                f"{KEY}.group_size={self.group_size} must be >= 2 (weights per scale); for one "
                f"scale per row use {KEY}.granularity=per_channel."
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"{KEY}.scale_dtype={self.scale_dtype!r}: use one of {', '.join(SCALE_DTYPES)}."
            )
        if self.float_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"{KEY}.float_dtype={self.float_dtype!r}: use one of {', '.join(SCALE_DTYPES)}."
            )
        if self.scale_dtype == "float16" and not self.symmetric:
            raise ConfigError(
                f"{KEY}.scale_dtype=float16 needs {KEY}.symmetric=true: asymmetric schemes keep "
                f"float32 scales and offsets; set {KEY}.scale_dtype=float32."
            )
        if self.start_epoch < 0:
            raise ConfigError(f"{KEY}.start_epoch={self.start_epoch} must be >= 0.")
        if self.freeze_epoch is not None and self.freeze_epoch < 0:
            raise ConfigError(
                f"{KEY}.freeze_epoch={self.freeze_epoch} must be >= 0 (or null: never freeze)."
            )

    def bits_for(self, group: str) -> int:
        """Weight bits of ``group`` (``embedding`` / ``linear``), the override if set."""
        override = {"embedding": self.embedding_bits, "linear": self.linear_bits}.get(group)
        return override if override is not None else self.bits


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is quantised: bits, columns per scale, symmetric or with offsets."""

    bits: int
    group_size: int | None  # None: per channel (one scale per row)
    symmetric: bool = True
    scale_dtype: str = "float32"  # float16: symmetric scales rounded *up* to float16

    @property
    def scale_bytes(self) -> int:
        return 2 if self.scale_dtype == "float16" else 4

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def zero_point_domain(self) -> Any:
        domain = torchao_qat().ZeroPointDomain
        return domain.INT if self.symmetric else domain.FLOAT

    def columns_per_scale(self, width: int) -> int:
        return width if self.group_size is None else self.group_size

    def num_scales(self, rows: int, width: int) -> int:
        """Float values stored beside the integers (offsets of asymmetric schemes included)."""
        per_row = width // self.columns_per_scale(width)
        return rows * per_row * (1 if self.symmetric else 2)

    def fake_quantize_config(self) -> Any:
        """torchao's config for this scheme.

        Asymmetric schemes use torchao's float zero-point domain with float32 offsets: with its
        defaults (int32 zero points, integer domain) torchao 0.18 computes the qparams for the
        unsigned range and truncates the float offsets to 0, clipping most weights.
        """
        dtype = torch.int8 if self.bits == 8 else torch.int4
        granularity = "per_channel" if self.group_size is None else "per_group"
        extra: dict[str, Any] = {}
        if not self.symmetric:
            extra = {"zero_point_domain": self.zero_point_domain}
            extra["zero_point_precision"] = torch.float32
        return torchao_qat().IntxFakeQuantizeConfig(
            dtype,
            granularity,
            group_size=self.group_size,
            is_symmetric=self.symmetric,
            **extra,
        )


def scheme_for(cfg: QATConfig, group: str) -> QuantScheme:
    group_size = cfg.group_size if cfg.granularity == "per_group" else None
    return QuantScheme(cfg.bits_for(group), group_size, cfg.symmetric, cfg.scale_dtype)


def factor_scheme(scheme: QuantScheme, width: int) -> QuantScheme | None:
    """The scheme for an SVD factor whose rows hold ``width`` values (often the rank): None when
    ``width`` is 1 (a rank-1 factor: one scale per value saves nothing, it stays float), per
    channel when ``group_size`` does not divide ``width``. The rank is chosen per layer (e.g. by
    ``compression.svd.param_ratio``), so this adapts instead of refusing mid-training."""
    if width < 2:
        return None
    if scheme.group_size is not None and width % scheme.group_size:
        return QuantScheme(scheme.bits, None, scheme.symmetric, scheme.scale_dtype)
    return scheme


# Smallest scale: torchao's default eps, 2^-23 (exact in float16, as a subnormal).
SCALE_EPS = torch.finfo(torch.float32).eps
FLOAT16_NORMAL_MIN = 2.0**-14  # below it float16 values are subnormal: a fixed step of 2^-24
_LOW_BITS = (1 << 13) - 1  # float32 mantissa bits that float16 lacks


def round_up_to_float16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= each positive float32 ``scale``, as float32.

    Rounding *up* keeps every weight of the row within the integer range: with a scale rounded to
    the nearest float16 (torchao's ``scale_precision=float16``) a row's largest weights can clip by
    more than half a step.
    """
    if not scale.numel():
        return scale.clone()
    low, high = (float(v) for v in torch.aminmax(scale))
    if high > float(torch.finfo(torch.float16).max):
        raise ValueError(
            f"{KEY}.scale_dtype=float16: a scale of {high:.3g} exceeds float16's "
            f"range (weights above ~8e6); set {KEY}.scale_dtype=float32."
        )
    if low >= FLOAT16_NORMAL_MIN and scale.dtype == torch.float32:
        # All in float16's normal range, where a float16 is a float32 whose 13 lowest mantissa
        # bits are zero: carry any set low bit into the mantissa, then clear them (two integer
        # passes instead of the conversions and the comparison below).
        bits = scale.contiguous().view(torch.int32) + _LOW_BITS
        return bits.bitwise_and_(~_LOW_BITS).view(torch.float32)
    half = scale.half()
    below = half.float() < scale
    bumped = (half.view(torch.int16) + 1).view(torch.float16)  # next float16 up (scale > 0)
    return torch.where(below, bumped, half).float()


@torch.no_grad()
def symmetric_scales(rows: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Scales ``[rows, groups]`` of a symmetric scheme: ``max|w| / ((qmax - qmin) / 2)`` per group
    (torchao's formula), floored at ``SCALE_EPS`` and, for float16 scales, rounded up."""
    width = rows.shape[-1]
    per_scale = scheme.columns_per_scale(width)
    amax = rows.detach().abs()
    if amax.dtype != torch.float32:
        amax = amax.float()
    if per_scale != width:
        amax = amax.view(rows.shape[0], width // per_scale, per_scale)
    scale = amax.amax(dim=-1, keepdim=per_scale == width)
    scale = scale.div_((scheme.qmax - scheme.qmin) / 2).clamp_min_(SCALE_EPS)
    return round_up_to_float16(scale) if scheme.scale_dtype == "float16" else scale


def _own_scales(scheme: QuantScheme) -> bool:
    """Whether the qparams are computed here rather than by torchao's quantiser: float16 scales
    (torchao's rounds to nearest, which clips; see :func:`round_up_to_float16`)."""
    return scheme.symmetric and scheme.scale_dtype == "float16"


def fake_quantize(
    rows: torch.Tensor, scheme: QuantScheme, quantizer: Any, gather: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantise 2-D ``rows`` with scales computed from these rows (row-local qparams);
    ``gather``: return only those rows of the result (``out[gather]``)."""
    if _own_scales(scheme):
        return _fake_quantize_with(rows, symmetric_scales(rows, scheme), None, scheme, gather)
    out = quantizer(rows)
    return out if gather is None else gather_rows(out, gather)


# -- numerics (torchao primitives) --------------------------------------------------------------
class _SymmetricFakeQuant(torch.autograd.Function):
    """torchao's symmetric fake quantisation with constant scales, fused into one autograd node,
    optionally followed by a row gather (``ids``).

    Forward, as ``_fake_quantize_affine`` (integer zero point 0): ``clamp(round(w * (1 / s)) + 0,
    qmin, qmax) * s``. Backward, as autograd through those ops with torchao's straight-through
    round: ``where(inside, g * s, 0) * (1 / s)``, +0.0 where the clamp cut (or the level is NaN).
    The same float ops in the same order, so values and gradients are bit-identical to torchao's
    (signed zeros included: the ``+ 0`` of the zero point turns a rounded ``-0.0`` into ``+0.0``).
    With ``ids`` the output is ``out[ids]`` and the backward first sums the rows' gradients into
    a table as :func:`~recsys_compress.ops.gather_rows` does, the same sums in the same order.

    Cheaper: no per-call dtype conversions and no bool tensors: comparisons and masked writes with
    bool results are 5-20x slower than arithmetic on CPU here, so the "inside" mask is an int32
    bit mask (all ones inside, zero where clipped) ANDed onto the gradient's bits. One min/max
    pass first checks whether any level falls outside the range; when none does, the clamp and
    the mask are skipped: five passes forward (the min/max among them) instead of nine, two
    backward instead of three. With the default float16 scales, rounded up from this step's
    max|w|, that is most passes (a weight clips only at exactly half a step past the top level:
    38 of 480 table passes in a 2-epoch ML-100K run); torchao's float32 scales put about every
    other row's largest weight on the half step, so they take the masking path.
    ``scale`` must not need a gradient (ours never do: they are computed under ``no_grad`` or are
    frozen buffers).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        scale: torch.Tensor,
        qmin: int,
        qmax: int,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r, g = scale.shape
        inverse = scale.reciprocal()  # torchao's 1.0 / scale
        if g > 1:  # groups: [rows, groups, columns] against [rows, groups, 1] scales
            scale, inverse = scale.unsqueeze(-1), inverse.unsqueeze(-1)
            rows = rows.reshape(r, g, -1)
        levels = (rows * inverse).round_().add_(0)
        keep = None
        if not _within(levels, qmin, qmax):
            # |clamped - level| is 0 inside the range, >= 1 where clipped, NaN for a NaN level:
            # keep the bits where it is +-0 (abs bits 0 -> (0 - 1) >> 31 = -1), clear the rest.
            out = levels.clamp(qmin, qmax)
            keep = levels.sub_(out).view(torch.int32)
            keep.bitwise_and_(0x7FFFFFFF).sub_(1).bitwise_right_shift_(31)
            levels = out
        # else nothing clipped (the common case: scales from this step's max|w|): the clamp is a
        # no-op and every gradient passes, so neither is computed.
        ctx.save_for_backward(scale, inverse, keep, ids)
        out = levels.mul_(scale).view(r, -1)
        return out if ids is None else out.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale, inverse, keep, ids = ctx.saved_tensors
        if ids is None:
            through = grad.reshape(scale.shape[0], *scale.shape[1:-1], -1) * scale
        else:  # the summed table is ours: scale it in place
            table = grad.new_zeros(scale.shape[0], grad.shape[-1])
            grad = table.index_add_(0, ids, grad.contiguous())
            through = grad.view(scale.shape[0], *scale.shape[1:-1], -1).mul_(scale)
        if keep is not None:
            through.view(torch.int32).bitwise_and_(keep)
        return through.mul_(inverse).view(grad.shape), None, None, None, None


def _within(levels: torch.Tensor, qmin: int, qmax: int) -> bool:
    """Whether every level lies in ``[qmin, qmax]`` (one min/max pass; False for a NaN level)."""
    if not levels.numel():
        return True
    low, high = torch.aminmax(levels)
    return float(low) >= qmin and float(high) <= qmax


def _fake_quantize_with(
    rows: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    scheme: QuantScheme,
    gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantise 2-D ``rows`` with given qparams (straight-through gradient): torchao's op,
    or for symmetric float32 ``rows`` with constant scales its fused equivalent; ``gather``:
    return only those rows of the result."""
    if zero_point is None and rows.dtype == torch.float32 and not scale.requires_grad:
        return _SymmetricFakeQuant.apply(rows, scale.float(), scheme.qmin, scheme.qmax, gather)
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    out = torchao_qat().fake_quantize_per_channel_group(
        rows,
        scale,
        zero_point,
        scheme.qmin,
        scheme.qmax,
        scheme.columns_per_scale(rows.shape[-1]),
        scheme.zero_point_domain,
    )
    return out if gather is None else gather_rows(out, gather)


# Whole-weight passes (freeze, convert) go through this many rows at a time: qparams are per row,
# so chunks give the same numbers without a full-table float temporary per op.
CHUNK_ROWS = 1 << 16


@torch.no_grad()
def whole_qparams(
    weight: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales ``[rows, groups]`` (and float offsets if asymmetric) of a whole weight, as the
    fake-quant forward pass computes them."""
    if _own_scales(scheme):
        chunks = weight.detach().split(CHUNK_ROWS)
        return torch.cat([symmetric_scales(chunk, scheme) for chunk in chunks]), None
    quantizer = torchao_qat().IntxFakeQuantizer(scheme.fake_quantize_config())
    scales, offsets = [], []
    for chunk in weight.detach().float().split(CHUNK_ROWS):
        quantizer(chunk)
        scales.append(quantizer.scale.float())
        offsets.append(quantizer.zero_point.float())
    return torch.cat(scales), None if scheme.symmetric else torch.cat(offsets)


@torch.no_grad()
def _integer_values(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """The integers torchao's fake quantisation rounds ``weight`` to, as int8."""
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    out = []
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        q, _ = torchao_qat().do_fake_quantize_affine(
            weight[rows].detach().float(),
            (1, scheme.columns_per_scale(weight.shape[-1])),
            scale[rows],
            zero_point[rows],
            torch.int32,
            scheme.qmin,
            scheme.qmax,
            scheme.zero_point_domain,
        )
        out.append(q.to(torch.int8))
    return torch.cat(out)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None
) -> torch.Tensor:
    """``q * s (+ z)`` per group of columns; the same float ops as torchao's fake quantisation."""
    rows, width = q.shape
    groups = scales.shape[-1]
    out = q.float().view(rows, groups, width // groups) * scales[..., None]
    if zero_points is not None:
        out = out + zero_points[..., None]
    return out.view(rows, width)


class _QParams:
    """Mixin of the fake-quant modules: scale (and offset) buffers, computed over the whole weight
    on :meth:`freeze` and then used instead of per-step scales; the accounting attributes."""

    weight: nn.Parameter
    weight_fake_quantizer: Any
    register_buffer: Any

    def _init_qparams(self, scheme: QuantScheme, rows: int, width: int, device: Any) -> None:
        self.scheme = scheme
        groups = width // scheme.columns_per_scale(width)
        self.register_buffer("scale", torch.zeros(rows, groups, device=device))
        zero_point = None if scheme.symmetric else torch.zeros(rows, groups, device=device)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("frozen", torch.tensor(False, device=device))
        self._is_frozen = False
        self.rcz_bits = scheme.bits
        self.rcz_num_scales = scheme.num_scales(rows, width)
        self.rcz_scale_bytes = scheme.scale_bytes

    @torch.no_grad()
    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales (and offsets) over the whole weight: the frozen ones, else fresh from torchao."""
        if self._is_frozen:
            return self.scale.clone(), None if self.zero_point is None else self.zero_point.clone()
        return whole_qparams(self.weight, self.scheme)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the scales at their current whole-weight values."""
        scale, zero_point = self.compute_qparams()
        self.scale.copy_(scale)
        if zero_point is not None:
            self.zero_point.copy_(zero_point)
        self.frozen.fill_(True)
        self._is_frozen = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A float module's state (no qparams yet) loads as "not frozen".
        for name in ("scale", "zero_point", "frozen"):
            if getattr(self, name) is not None:
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        self._is_frozen = bool(self.frozen)


def _activation_quantizer(activation_bits: int | None) -> Any:
    """torchao's dynamic per-token asymmetric fake quantiser for Linear inputs (or None)."""
    if activation_bits is None:
        return None
    ao = torchao_qat()
    dtype = torch.int8 if activation_bits == 8 else torch.int4
    return ao.IntxFakeQuantizer(ao.IntxFakeQuantizeConfig(dtype, "per_token", is_symmetric=False))


class FakeQuantEmbedding(_QParams, nn.Embedding):
    """An embedding whose lookups return fake-quantised rows, fake-quantising only the rows a call
    reads (torchao's ``FakeQuantizedEmbedding`` fake-quantises the whole table every call).

    Shares ``weight`` (the float Parameter being trained) with the ``nn.Embedding`` it replaces.
    ``module(torch.arange(num_rows))`` (``all_rows``) fake-quantises the whole table.
    """

    def __init__(self, source: nn.Embedding, scheme: QuantScheme) -> None:
        nn.Embedding.__init__(
            self,
            source.num_embeddings,
            source.embedding_dim,
            source.padding_idx,
            source.max_norm,
            source.norm_type,
            source.scale_grad_by_freq,
            source.sparse,
            device="meta",  # no throw-away table: the source's Parameter is shared below
            dtype=source.weight.dtype,
        )
        self.weight = source.weight
        self.weight_fake_quantizer = torchao_qat().IntxFakeQuantizer(scheme.fake_quantize_config())
        self._init_qparams(
            scheme, source.num_embeddings, source.embedding_dim, source.weight.device
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self._quantise_table_first(flat):
            # Fewer table rows than ids (e.g. ML-100K's 943 users in a batch of 4096): quantise
            # each row once, then gather. The same values as quantising the gathered rows (the
            # qparams are row-local); a repeated row's gradient is summed before the
            # straight-through mask instead of after (equal up to float summation order).
            if self.padding_idx is None and flat.device.type == "cpu":
                # one autograd node: fake-quantise, then gather (backward: gather_rows's sums)
                rows = self._fake_quantize_rows(self.weight, None, gather=flat)
            else:
                table = self._fake_quantize_rows(self.weight, None)
                rows = F.embedding(flat, table, self.padding_idx)
            return rows.view(*ids.shape, self.embedding_dim)
        if flat.device.type == "cpu" and gathered_table(self, FakeQuantEmbedding):
            # As models.base.rows reads a plain table: F.embedding's values and gradient, with
            # the faster backward (and, on the dense path, the kept gradient of ops.zero_grad).
            rows = gather_rows(self.weight, flat)
        else:
            rows = F.embedding(
                flat,
                self.weight,
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
        if flat.numel() == 0:
            return rows.view(*ids.shape, self.embedding_dim)
        return self._fake_quantize_rows(rows, flat).view(*ids.shape, self.embedding_dim)

    def _quantise_table_first(self, flat: torch.Tensor) -> bool:
        """Whether quantising the whole table is cheaper than quantising the gathered rows (and
        gives the same result: no in-place renormalisation, per-id gradient scaling or sparse
        gradients, which act on the rows as read)."""
        return (
            self.num_embeddings <= flat.numel()
            and self.max_norm is None
            and not self.scale_grad_by_freq
            and not self.sparse
        )

    def _fake_quantize_rows(
        self, rows: torch.Tensor, ids: torch.Tensor | None, gather: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fake-quantise ``rows`` of the table (``ids``: which ones; None: all, in order);
        ``gather``: return only those rows of the result."""
        if self._is_frozen:
            scale = self.scale if ids is None else self.scale[ids]
            zero_point = self.zero_point
            if zero_point is not None and ids is not None:
                zero_point = zero_point[ids]
            return _fake_quantize_with(rows, scale, zero_point, self.scheme, gather)
        return fake_quantize(rows, self.scheme, self.weight_fake_quantizer, gather)


class FakeQuantLinear(_QParams, nn.Linear):
    """A Linear with fake-quantised weights (as torchao's ``FakeQuantizedLinear``) and optionally
    fake-quantised inputs (int8/int4 per token, asymmetric, dynamic); frozen scales supported.
    Shares ``weight`` and ``bias`` with the ``nn.Linear`` it replaces."""

    def __init__(
        self, source: nn.Linear, scheme: QuantScheme, activation_bits: int | None = None
    ) -> None:
        nn.Linear.__init__(
            self,
            source.in_features,
            source.out_features,
            source.bias is not None,
            device="meta",
            dtype=source.weight.dtype,
        )
        self.weight = source.weight
        self.bias = source.bias
        self.activation_bits = activation_bits
        self.activation_fake_quantizer = _activation_quantizer(activation_bits)
        self.weight_fake_quantizer = torchao_qat().IntxFakeQuantizer(scheme.fake_quantize_config())
        self._init_qparams(scheme, source.out_features, source.in_features, source.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        if self._is_frozen:
            w = _fake_quantize_with(self.weight, self.scale, self.zero_point, self.scheme)
        else:
            w = fake_quantize(self.weight, self.scheme, self.weight_fake_quantizer)
        return F.linear(x, w, self.bias)


# -- converted (integer) modules -----------------------------------------------------------------
class _Quantized(nn.Module):
    """``qweight`` (int8 Parameter, no grad: int4 values lie in [-8, 7]), ``scales`` and
    optional ``zero_points`` (float32 offsets) buffers, and the accounting attributes."""

    rcz_group: str

    def _init_storage(self, scheme: QuantScheme, rows: int, width: int, device: Any) -> None:
        self.scheme = scheme
        groups = width // scheme.columns_per_scale(width)
        q = torch.zeros(rows, width, dtype=torch.int8, device=device)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scales", torch.ones(rows, groups, device=device))
        zero_points = None if scheme.symmetric else torch.zeros(rows, groups, device=device)
        self.register_buffer("zero_points", zero_points)
        self.rcz_bits = scheme.bits
        self.rcz_num_scales = scheme.num_scales(rows, width)
        self.rcz_scale_bytes = scheme.scale_bytes

    @torch.no_grad()
    def set_quantized(
        self, q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None
    ) -> None:
        self.qweight.copy_(q)
        self.scales.copy_(scales)
        if self.zero_points is not None and zero_points is not None:
            self.zero_points.copy_(zero_points)

    @torch.no_grad()
    def quantize_from(
        self, weight: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None
    ) -> None:
        """Quantise a float ``weight``; with ``scale`` None, torchao computes the qparams."""
        weight = weight.to(self.scales.device, torch.float32)
        if scale is None:
            scale, zero_point = whole_qparams(weight, self.scheme)
        self.set_quantized(
            _integer_values(weight, scale, zero_point, self.scheme), scale, zero_point
        )

    def dequantize(self) -> torch.Tensor:
        """The whole float weight the integers stand for."""
        return dequantize(self.qweight, self.scales, self.zero_points)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The state of the float or fake-quant module this one replaced: quantise it (with its
        # frozen scales when it has them), so e.g. the best QAT checkpoint loads after convert.
        if prefix + "weight" in state_dict and prefix + "qweight" not in state_dict:
            weight = state_dict.pop(prefix + "weight")
            scale = state_dict.pop(prefix + "scale", None)
            zero_point = state_dict.pop(prefix + "zero_point", None)
            frozen = state_dict.pop(prefix + "frozen", None)
            if frozen is None or not bool(frozen):
                scale = zero_point = None
            self.quantize_from(weight, scale, zero_point)
            local = {k: v for k, v in state_dict.items() if k == prefix + "bias"}
            state_dict = {**local, prefix + "qweight": self.qweight, prefix + "scales": self.scales}
            if self.zero_points is not None:
                state_dict[prefix + "zero_points"] = self.zero_points
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )


class QuantizedEmbedding(_Quantized):
    """An integer embedding table; ``forward`` dequantises only the rows it gathers."""

    rcz_group = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        scheme: QuantScheme,
        padding_idx: int | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = (
            num_embeddings,
            embedding_dim,
            padding_idx,
        )
        self._init_storage(scheme, num_embeddings, embedding_dim, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # index_select copies whole rows: on CPU several times faster than ``t[flat]``, and
        # all_rows reads the whole table through here.
        flat = ids.reshape(-1)
        zero_points = None if self.zero_points is None else self.zero_points.index_select(0, flat)
        rows = dequantize(
            self.qweight.index_select(0, flat), self.scales.index_select(0, flat), zero_points
        )
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}"


class QuantizedLinear(_Quantized):
    """An integer-weight Linear (float bias); inputs are fake-quantised per token when the QAT
    module did so (what an int8 dynamic-activation kernel computes)."""

    rcz_group = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = True,
        activation_bits: int | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage(scheme, out_features, in_features, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.activation_bits = activation_bits
        self.activation_fake_quantizer = _activation_quantizer(activation_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return F.linear(x, self.dequantize(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}"


FAKE_QUANT = (FakeQuantEmbedding, FakeQuantLinear)
QUANTIZED = (QuantizedEmbedding, QuantizedLinear)


def to_fake_quant(
    module: nn.Module, scheme: QuantScheme, activation_bits: int | None = None
) -> nn.Module:
    """The fake-quant counterpart of an ``nn.Embedding`` / ``nn.Linear`` (sharing Parameters)."""
    if isinstance(module, nn.Embedding):
        return FakeQuantEmbedding(module, scheme)
    if isinstance(module, nn.Linear):
        return FakeQuantLinear(module, scheme, activation_bits)
    raise TypeError(f"cannot fake-quantise {type(module).__name__}")


@torch.no_grad()
def convert_module(module: nn.Module) -> nn.Module:
    """The integer module for a fake-quant one (its frozen scales, else fresh whole-weight ones)."""
    scale, zero_point = module.compute_qparams()
    q = _integer_values(module.weight, scale, zero_point, module.scheme)
    device = module.weight.device
    if isinstance(module, FakeQuantEmbedding):
        out: _Quantized = QuantizedEmbedding(
            module.num_embeddings, module.embedding_dim, module.scheme, module.padding_idx, device
        )
    elif isinstance(module, FakeQuantLinear):
        out = QuantizedLinear(
            module.in_features,
            module.out_features,
            module.scheme,
            module.bias is not None,
            module.activation_bits,
            device,
        )
        if module.bias is not None:
            out.bias.copy_(module.bias.detach())
    else:
        raise TypeError(f"cannot convert {type(module).__name__}: not a fake-quant module")
    out.set_quantized(q, scale, zero_point)
    return out


# -- planning ------------------------------------------------------------------------------------
@dataclass
class _Planned:
    name: str
    group: str
    scheme: QuantScheme


def plan(model: nn.Module, cfg: QATConfig) -> list[_Planned]:
    """The targets of ``cfg`` in ``model`` with their schemes; ConfigError on widths that the
    granularity cannot split.

    The factors of a layer that SVD factorised are targets when the layer is (with its group's
    settings, :func:`~recsys_compress.compression.lowrank.select_layer_targets`); their widths
    follow the rank, so they adapt (:func:`factor_scheme`): a rank-1 factor stays float, a rank
    that ``group_size`` does not divide gets per-channel scales; both are logged.
    """
    targets = select_layer_targets(model, cfg.targets, f"{KEY}.targets")
    planned, too_narrow = [], []
    bad_groups: dict[str, int] = {}
    adapted: dict[str, str] = {}
    for t in targets:
        width = t.module.weight.shape[1]
        scheme = scheme_for(cfg, t.group)
        if factorised_layer(model, t.name) is not None:
            fitted = factor_scheme(scheme, width)
            if fitted != scheme:
                adapted[t.name] = "kept float" if fitted is None else "per_channel"
            if fitted is not None:
                planned.append(_Planned(t.name, t.group, fitted))
            continue
        if width < 2:
            too_narrow.append(t.name)
        elif scheme.group_size is not None and width % scheme.group_size:
            bad_groups[t.name] = width
        planned.append(_Planned(t.name, t.group, scheme))
    if too_narrow:
        raise ConfigError(
            f"{KEY}.targets selects {', '.join(too_narrow)}, whose rows hold one value: a scale "
            f"per value saves nothing. Exclude them in {KEY}.targets.exclude (e.g. '*bias*')."
        )
    if bad_groups:
        widths = [t.module.weight.shape[1] for t in targets]
        listed = ", ".join(f"{name} (width {width})" for name, width in bad_groups.items())
        raise ConfigError(
            f"{KEY}.group_size={cfg.group_size} does not divide the row width of {listed}: use "
            f"a group_size dividing every width (e.g. {math.gcd(*widths)}), "
            f"{KEY}.granularity=per_channel, or exclude these modules in {KEY}.targets.exclude."
        )
    if adapted:
        log.warning(
            "%s: SVD factors with rows of width 1 (rank 1) stay float, and those whose width "
            "%s.group_size=%d does not divide are quantised per channel: %s. Choose "
            "compression.svd.rank (or embedding_rank / linear_rank) >= 2 and a multiple of "
            "%s.group_size to avoid this.",
            KEY,
            KEY,
            cfg.group_size,
            ", ".join(f"{name} ({how})" for name, how in adapted.items()),
            KEY,
        )
    return planned


def post_training_quantize(model: nn.Module, cfg: QATConfig) -> nn.Module:
    """The PTQ baseline: quantise the targets of ``cfg`` with the same quantisers, no training.

    Converts ``model`` in place (and returns it): targets become QuantizedEmbedding /
    QuantizedLinear with scales computed from the current weights; the float parameters left
    are rounded to float16 values when ``cfg.float_dtype`` says so.
    """
    for p in plan(model, cfg):
        current = model.get_submodule(p.name)
        fake = to_fake_quant(
            current, p.scheme, cfg.activation_bits if p.group == "linear" else None
        )
        replace_module(model, p.name, convert_module(fake))
    if cfg.float_dtype == "float16":
        round_float_params(model)
    return model


@torch.no_grad()
def round_float_params(
    root: nn.Module, state_dict: dict[str, Any] | None = None, prefix: str = ""
) -> None:
    """Round every float32 parameter of ``root`` to the nearest float16 value, in place (or, with
    ``state_dict``, the entries of that dict that will load into them). The export stores such
    tensors in 2 bytes per value; the model keeps computing in float32."""
    for name, param in root.named_parameters():
        if param.dtype != torch.float32:
            continue
        if state_dict is None:
            param.copy_(param.half().float())
        elif (key := prefix + name) in state_dict and state_dict[key].dtype == torch.float32:
            state_dict[key] = state_dict[key].half().float()


# -- the callback --------------------------------------------------------------------------------
def _named(root: nn.Module, kinds: tuple[type, ...]) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, kinds)]


class QuantizationAwareTraining(L.Callback):
    """Fake-quantises the targets of ``cfg`` from ``start_epoch``, freezes their scales after
    ``freeze_epoch``, and converts them to integer modules at the end of ``fit``.

    Targets are selected when QAT starts, so a method that replaced modules earlier is
    respected: the factors of a layer SVD factorised are quantised when the layer is targeted.
    Checkpoint state: ``{"started", "frozen", "converted", "config"}``;
    the module types are rebuilt from the checkpoint's keys by a ``load_state_dict`` pre-hook
    installed in :meth:`setup` (Lightning calls ``setup`` before it loads a checkpoint).
    """

    def __init__(self, cfg: QATConfig) -> None:
        self.cfg = cfg
        self.started = False
        self.frozen = False
        self.converted = False
        self._hook: Any = None
        self._hooked: nn.Module | None = None

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hooked is pl_module:
            return
        try:
            plan(pl_module, self.cfg)  # config errors now, not after epochs of training
        except ConfigError:
            if not _named(pl_module, FAKE_QUANT + QUANTIZED):
                raise
        if self._hook is not None:
            self._hook.remove()
        # Runs at the start of pl_module.load_state_dict, before any child loads: a checkpoint
        # written during QAT (or after convert) gets matching modules before its weights load.
        # It stays registered after fit: validate/test with ckpt_path need it too.
        self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)
        self._hooked = pl_module

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self.started and not self.converted and epoch >= self.cfg.start_epoch:
            self.start(pl_module)
            log.info("%s: fake quantisation from epoch %d", KEY, epoch)
        freeze_at = self.cfg.freeze_epoch
        if self.started and not self.frozen and freeze_at is not None and epoch > freeze_at:
            self.freeze(pl_module)
            log.info("%s: scales frozen from epoch %d", KEY, epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.cfg.convert_at_end or self.converted:
            return
        if not self.started:
            log.warning(
                "%s never started (start_epoch=%d, %d epochs trained): converting with "
                "post-training quantisation of the float weights.",
                KEY,
                self.cfg.start_epoch,
                trainer.current_epoch,
            )
            self.start(pl_module)
        self.convert(pl_module)

    def compression_done(self, trainer: L.Trainer) -> bool:
        """The model trains fake-quantised (checkpoint ranking may start then)."""
        return self.started

    def state_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "frozen": self.frozen,
            "converted": self.converted,
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config") != asdict(self.cfg):
            log.warning("%s: the checkpoint was written with another QAT config.", KEY)
        self.started = bool(state_dict["started"])
        self.frozen = bool(state_dict["frozen"])
        self.converted = bool(state_dict["converted"])
        if self._hooked is not None:
            self._sync_modules(self._hooked)

    # -- actions ---------------------------------------------------------------------------
    def start(self, root: nn.Module) -> None:
        """Swap each target for its fake-quant version (same Parameter objects)."""
        for p in plan(root, self.cfg):
            current = root.get_submodule(p.name)
            if not isinstance(current, FAKE_QUANT):
                activation_bits = self.cfg.activation_bits if p.group == "linear" else None
                replace_module(root, p.name, to_fake_quant(current, p.scheme, activation_bits))
        self.started = True

    def freeze(self, root: nn.Module) -> None:
        """From now on, each fake-quant module uses its current whole-weight scales."""
        for _, module in _named(root, FAKE_QUANT):
            module.freeze()
        self.frozen = True

    def convert(self, root: nn.Module) -> None:
        """Replace each fake-quant module by its integer module; with ``float_dtype=float16``
        round the parameters left in float (biases, excluded layers) to float16 values."""
        for name, module in _named(root, FAKE_QUANT):
            replace_module(root, name, convert_module(module))
        if self.cfg.float_dtype == "float16":
            round_float_params(root)
        self.converted = True

    # -- internals -------------------------------------------------------------------------
    def _fake(self, module: nn.Module, group: str, factor: bool = False) -> nn.Module:
        activation_bits = self.cfg.activation_bits if group == "linear" else None
        scheme = scheme_for(self.cfg, group)
        if factor:
            scheme = factor_scheme(scheme, module.weight.shape[1]) or scheme
        return to_fake_quant(module, scheme, activation_bits)

    def _sync_modules(self, root: nn.Module) -> None:
        """Make flags and module types agree after a checkpoint loaded.

        A converted model stays converted (validate/test with ``ckpt_path`` after a converting
        fit: its modules quantised the checkpoint's weights). Otherwise modules follow the flags;
        normally the load hook already swapped them.
        """
        if _named(root, QUANTIZED):
            self.started = self.converted = True
            return
        if self.started:
            if not _named(root, FAKE_QUANT):
                log.warning("%s: the checkpoint holds no fake-quant modules; starting QAT.", KEY)
                self.start(root)
            fake = [m for _, m in _named(root, FAKE_QUANT)]
            if self.frozen and not all(m._is_frozen for m in fake):
                log.warning("%s: frozen scales missing from the checkpoint; recomputing.", KEY)
                self.freeze(root)
            self.frozen = all(m._is_frozen for m in fake)

    def _before_load(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
    ) -> None:
        """Give each float module the checkpoint stores as fake-quant (``frozen`` key) or integer
        (``qweight`` key) that type, before the weights load."""
        for name, current in list(module.named_modules()):
            group = module_group(current)
            if group is None or isinstance(current, FAKE_QUANT):
                continue
            layer = factorised_layer(module, name)  # an SVD factor: its layer's settings
            group = layer.group if layer is not None else group
            key = f"{prefix}{name}."
            if key + "qweight" in state_dict:
                fake = self._fake(current, group, factor=layer is not None)
                replace_module(module, name, convert_module(fake))
                self.started = self.converted = True
            elif key + "frozen" in state_dict:
                replace_module(module, name, self._fake(current, group, factor=layer is not None))
                self.started = True
        if self.converted and self.cfg.float_dtype == "float16":
            # e.g. validate/test(ckpt_path="best") after convert: the float32 biases of the
            # checkpoint load rounded, as convert rounded them, so metrics match the export.
            round_float_params(module, state_dict, prefix)
