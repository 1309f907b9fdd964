"""Writing matplotlib figures for the reporting scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, out_prefix: str | Path) -> list[Path]:
    """Write ``fig`` as ``<prefix>.png`` and ``<prefix>.pdf`` (parents created), close it, and
    return the two paths."""
    import matplotlib.pyplot as plt

    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + ext) for ext in (".png", ".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths
