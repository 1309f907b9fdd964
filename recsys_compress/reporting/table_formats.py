"""A :class:`~recsys_compress.reporting.tables.Table` as Markdown, LaTeX (booktabs) or CSV.

Markdown and LaTeX print one column per (column group, metric): ``mean ± std`` over the runs of
the cell, the best of each column in bold, ``(n=…)`` in the cell only when the number of runs
differs between cells (else once below the table). With a reference, a metric it has numbers for
gets three columns, ours | paper | Δ (ours − paper), and the citations become footnotes. Failed
runs are listed below the table (LaTeX: as comments). CSV is tidy: one line per cell and metric,
numbers at full precision.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from recsys_compress.reporting.tables import Key, Table, decimals

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``_`` -> ``\\_``, ``%`` -> ``\\%``)."""
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


@dataclass(frozen=True)
class Style:
    """How Markdown or LaTeX writes text, symbols, bold cells, signed numbers and footnotes."""

    escape: Callable[[str], str]
    pm: str
    up: str
    down: str
    delta: str
    minus: str
    missing: str
    bold: str
    signed: str
    footnote: str


MARKDOWN = Style(
    escape=lambda text: text.replace("|", r"\|"),
    pm="±",
    up="↑",
    down="↓",
    delta="Δ",
    minus="−",
    missing="—",
    bold="**{}**",
    signed="{}",
    footnote="[{}]",
)
LATEX = Style(
    escape=latex_escape,
    pm=r"$\pm$",
    up=r"$\uparrow$",
    down=r"$\downarrow$",
    delta=r"$\Delta$",
    minus="$-$",
    missing="---",
    bold=r"\textbf{{{}}}",
    signed="${}$",
    footnote=r"\textsuperscript{{{}}}",
)


@dataclass(frozen=True)
class Column:
    """One printed column: a metric of a column group, as ours, the paper's or their delta."""

    col: Key
    metric: str
    kind: str  # "ours" | "paper" | "delta"


def columns(table: Table) -> list[Column]:
    """The printed columns, in order: per column group, per metric, ours [paper, delta]."""
    out = []
    for col in table.col_values:
        for metric in table.metrics:
            out.append(Column(col, metric, "ours"))
            if metric in table.reference_metrics:
                out += [Column(col, metric, "paper"), Column(col, metric, "delta")]
    return out


def value_text(value: Hashable) -> str:
    """A group key value as printed: lists joined by ``+`` (``prune+qat``), None as ``—``."""
    if value is None:
        return "—"
    if isinstance(value, tuple):
        return "+".join(map(str, value)) if value else "none"
    return str(value)


def _key_text(values: Key, style: Style) -> str:
    texts = [style.missing if v is None else style.escape(value_text(v)) for v in values]
    return ", ".join(texts)


def _label(table: Table, column: Column, style: Style) -> str:
    metric = style.escape(column.metric)
    if column.kind == "paper":
        return f"{metric} paper"
    if column.kind == "delta":
        return f"{metric} {style.delta}"
    arrow = style.up if table.higher[column.metric] else style.down
    ours = " ours" if column.metric in table.reference_metrics else ""
    return f"{metric} {arrow}{ours}"


def _cell(table: Table, row: Key, column: Column, style: Style) -> str:
    stats = table.stats(row, column.col, column.metric)
    paper = table.paper(row, column.col, column.metric)
    if column.kind == "paper":
        if paper is None:
            return style.missing
        value, entry = paper
        mark = style.footnote.format(table.citations.index(entry.citation) + 1)
        return f"{value:.{entry.digits}f} {mark}"
    if column.kind == "delta":
        if paper is None or stats is None:
            return style.missing
        return style.signed.format(f"{stats.mean - paper[0]:+.{table.digits}f}")
    if stats is None:
        return style.missing
    places = decimals(stats.mean, table.digits)
    text = f"{stats.mean:.{places}f}"
    if stats.std is not None:
        text += f" {style.pm} {stats.std:.{places}f}"
    if table.is_best(row, column.col, column.metric):
        text = style.bold.format(text)
    return text if table.common_n is not None else f"{text} (n={stats.n})"


def _notes(table: Table, style: Style) -> list[str]:
    """Lines under the table: how cells aggregate, the reference and its footnotes."""
    n = table.common_n
    runs = f"n={n} runs per cell" if n is not None else "the n runs given in each cell"
    best = (
        f"; best per column in bold ({style.up} higher is better, {style.down} lower is better)"
        if table.best
        else ""
    )
    notes = [f"Mean {style.pm} std over {runs}{best}."]
    reference = table.reference
    if reference is not None:
        name = style.escape(reference.name)
        if not table.reference_metrics:
            known = style.escape(", ".join(sorted(reference.metrics)))
            return [*notes, f"Reference {name} has numbers only for {known}."]
        if table.papers:
            notes.append(f"Paper: {name}; {style.delta} = ours {style.minus} paper.")
        else:
            keys = style.escape(", ".join(reference.match_keys))
            notes.append(f"No cell matched reference {name} (it matches on {keys}).")
        notes += [
            f"{style.footnote.format(i)} {style.escape(citation)}"
            for i, citation in enumerate(table.citations, 1)
        ]
    return notes


def failure_lines(table: Table) -> list[str]:
    """``run: status: error`` of each run that is not in the table."""
    return [
        f"{failure.run}: {failure.status}" + (f": {failure.error}" if failure.error else "")
        for failure in table.failures
    ]


def to_markdown(table: Table) -> str:
    """The table in Markdown, followed by its notes and the failed runs."""
    style = MARKDOWN
    cols = columns(table)
    group = [f"{_key_text(c.col, style)} · " if table.cols else "" for c in cols]
    header = [style.escape(key) for key in table.rows]
    header += [prefix + _label(table, c, style) for prefix, c in zip(group, cols, strict=True)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(table.rows) + "---:|" * len(cols),
    ]
    for row in table.row_values:
        cells = [_key_text((value,), style) for value in row]
        cells += [_cell(table, row, column, style) for column in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_notes(table, style)]
    failures = failure_lines(table)
    if failures:
        lines += ["", f"Failed or unreadable runs ({len(failures)}), not in the table:"]
        lines += [f"- {line}" for line in failures]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (to ``\\input`` into a table float) with its notes below; failed
    runs as comments. Needs ``\\usepackage{booktabs}``."""
    style = LATEX
    cols = columns(table)
    nrows = len(table.rows)
    lines = [r"\begin{tabular}{" + "l" * nrows + "r" * len(cols) + "}", r"\toprule"]
    if table.cols:
        width = len(cols) // len(table.col_values)
        groups, rules = [], []
        for index, col in enumerate(table.col_values):
            first = nrows + 1 + index * width
            groups.append(rf"\multicolumn{{{width}}}{{c}}{{{_key_text(col, style)}}}")
            rules.append(rf"\cmidrule(lr){{{first}-{first + width - 1}}}")
        lead = [style.escape(", ".join(table.cols))] + [""] * (nrows - 1)
        lines += [" & ".join(lead + groups) + r" \\", " ".join(rules)]
    header = [style.escape(key) for key in table.rows]
    header += [_label(table, column, style) for column in cols]
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    for row in table.row_values:
        cells = [_key_text((value,), style) for value in row]
        cells += [_cell(table, row, column, style) for column in cols]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip", r"{\footnotesize"]
    lines.append(" \\\\\n".join(_notes(table, style)) + r"\par}")
    lines += [f"% failed: {line}" for line in failure_lines(table)]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """One line per (row, column group, metric) cell: key values, mean, std, n, best; with a
    reference also the paper's value, ours − paper and the citation. Full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    with_reference = bool(table.reference_metrics)
    extra = ["paper", "delta", "citation"] if with_reference else []
    writer.writerow([*table.rows, *table.cols, "metric", "mean", "std", "n", "best", *extra])
    for row in table.row_values:
        for col in table.col_values:
            if (row, col) not in table.cells:
                continue
            keys = ["" if value is None else value_text(value) for value in (*row, *col)]
            for metric in table.metrics:
                stats = table.stats(row, col, metric)
                line: list[object] = [*keys, metric]
                if stats is None:
                    line += ["", "", 0, ""]
                else:
                    std = "" if stats.std is None else repr(stats.std)
                    best = "true" if table.is_best(row, col, metric) else "false"
                    line += [repr(stats.mean), std, stats.n, best]
                if with_reference:
                    paper = table.paper(row, col, metric)
                    if paper is None:
                        line += ["", "", ""]
                    else:
                        delta = "" if stats is None else repr(stats.mean - paper[0])
                        line += [repr(paper[0]), delta, paper[1].citation]
                writer.writerow(line)
    return out.getvalue()
