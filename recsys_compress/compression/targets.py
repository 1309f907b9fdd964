"""What a compression method acts on: weights of ``nn.Embedding`` / ``nn.Linear`` modules chosen by
type and name globs. Methods never name a model, so a new model is compressible as it is.

Embedding tables and MLP (linear) layers form two *groups* with separate budgets, because their
weights live on very different scales (an MF table and an MLP layer are not comparable by |w|).
Bias vectors are never targets; embedding tables whose name matches ``*bias*`` (MF's per-user and
per-item biases) are excluded by default, as are normalisation layers (they are not Embedding or
Linear).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from recsys_compress.errors import ConfigError

GROUPS = ("embedding", "linear")


@dataclass
class TargetSpec:
    """Which modules a method compresses.

    ``groups``: module kinds (``embedding``, ``linear``); ``include`` / ``exclude``: globs on the
    module's qualified name (``model.user_embedding``, ``model.mlp.tower.0``, ...).
    """

    groups: list[str] = field(default_factory=lambda: ["embedding", "linear"])
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["*bias*"])

    def validate(self, key: str) -> None:
        for group in self.groups:
            if group not in GROUPS:
                raise ConfigError(
                    f"{key}.groups contains {group!r}: use a subset of {list(GROUPS)}."
                )
        if not self.groups:
            raise ConfigError(f"{key}.groups is empty: use e.g. [embedding, linear].")


@dataclass
class Target:
    """One targeted module: its qualified name, the module and its group."""

    name: str
    module: nn.Module
    group: str

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight  # type: ignore[return-value]


def module_group(module: nn.Module) -> str | None:
    """``embedding`` / ``linear`` for the module types compression understands, else None."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_targets(model: nn.Module, spec: TargetSpec, key: str) -> list[Target]:
    """The modules of ``model`` that ``spec`` selects, in ``named_modules`` order.

    Raises :class:`ConfigError` naming ``key`` when nothing matches, listing what could.
    """
    spec.validate(key)
    found, candidates = [], []
    for name, module in model.named_modules():
        group = module_group(module)
        if group is None:
            continue
        candidates.append(f"{name} ({group})")
        selected = group in spec.groups and _matches(name, spec.include)
        if selected and not _matches(name, spec.exclude):
            found.append(Target(name, module, group))
    return require_match(found, candidates, spec, key)


def require_match(
    found: list[Target], candidates: list[str], spec: TargetSpec, key: str
) -> list[Target]:
    """``found``, or a ConfigError naming ``key`` and listing the ``candidates`` when empty."""
    if not found:
        raise ConfigError(
            f"{key} (groups={list(spec.groups)}, include={list(spec.include)}, "
            f"exclude={list(spec.exclude)}) matches no module. Modules that could match: "
            f"{', '.join(candidates) or 'none'}."
        )
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``root`` (e.g. ``model.mlp.tower.0``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
