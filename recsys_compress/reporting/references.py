"""Published numbers with their citations, matched to table cells by config values.

The bundled ``references.yaml`` (next to this module) holds several sources, each named by its
top-level key (``ncf_paper``, ``rendle2020``); a user's YAML file has the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from recsys_compress.errors import DataError
from recsys_compress.reporting.tables import group_value, hashable

REFERENCES_FILE = "references.yaml"


@dataclass(frozen=True)
class ReferenceEntry:
    """Published values of some metrics for the runs whose config has every ``match`` value."""

    match: dict[str, Any]
    metrics: dict[str, float]
    citation: str
    digits: int

    def matches(self, records: Sequence[dict[str, Any]]) -> bool:
        return bool(records) and all(
            group_value(record, key) == hashable(value)
            for record in records
            for key, value in self.match.items()
        )


@dataclass(frozen=True)
class Reference:
    """The entries of one source (a bundled name) or of every source in a user's YAML file."""

    name: str
    entries: tuple[ReferenceEntry, ...]

    @property
    def metrics(self) -> set[str]:
        return {metric for entry in self.entries for metric in entry.metrics}

    @property
    def match_keys(self) -> list[str]:
        return sorted({key for entry in self.entries for key in entry.match})

    def find(self, records: Sequence[dict[str, Any]]) -> ReferenceEntry | None:
        """The most specific entry (most ``match`` keys) that every record matches, if any."""
        found = [entry for entry in self.entries if entry.matches(records)]
        if not found:
            return None
        most = max(len(entry.match) for entry in found)
        best = [entry for entry in found if len(entry.match) == most]
        if len(best) > 1:
            raise DataError(
                f"reference {self.name!r}: entries {[e.citation for e in best]} match the same "
                "runs equally well; give them distinct `match` values."
            )
        return best[0]


def bundled_sources() -> dict[str, Any]:
    """The sources of the bundled ``references.yaml``, by name."""
    text = resources.files(__package__).joinpath(REFERENCES_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def load_reference(name_or_path: str) -> Reference:
    """A bundled source by name (``ncf_paper``) or every source of a YAML file (a path)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        try:
            sources = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise DataError(f"--reference {name_or_path}: cannot read the file ({err}).") from err
        if not isinstance(sources, dict) or not sources:
            raise DataError(
                f"--reference {name_or_path}: expected a mapping of source names to "
                "{citation, digits, entries} as in recsys_compress/reporting/references.yaml."
            )
        return Reference(path.stem, _entries(sources, str(path)))
    sources = bundled_sources()
    if name_or_path not in sources:
        raise DataError(
            f"--reference {name_or_path}: no such bundled source; choose one of "
            f"{sorted(sources)} or pass the path to a YAML file of the same layout."
        )
    return Reference(name_or_path, _entries({name_or_path: sources[name_or_path]}, name_or_path))


def _entries(sources: dict[str, Any], origin: str) -> tuple[ReferenceEntry, ...]:
    entries = []
    for name, source in sources.items():
        where = f"--reference {origin}, source {name!r}"
        if not isinstance(source, dict) or not isinstance(source.get("entries"), list):
            raise DataError(f"{where}: needs `citation` and a list of `entries`.")
        citation = source.get("citation")
        if not isinstance(citation, str) or not citation.strip():
            raise DataError(f"{where}: `citation` must be a non-empty string.")
        digits = source.get("digits", 4)
        for index, entry in enumerate(source["entries"]):
            match = entry.get("match") if isinstance(entry, dict) else None
            metrics = entry.get("metrics") if isinstance(entry, dict) else None
            if not isinstance(match, dict) or not match:
                raise DataError(f"{where}, entry {index}: `match` must map config keys to values.")
            if not isinstance(metrics, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
            ):
                raise DataError(f"{where}, entry {index}: `metrics` must map metrics to numbers.")
            detail = entry.get("where")
            entries.append(
                ReferenceEntry(
                    match=dict(match),
                    metrics={str(k): float(v) for k, v in metrics.items()},
                    citation=f"{citation.strip()}, {detail}" if detail else citation.strip(),
                    digits=int(digits),
                )
            )
    return tuple(entries)
