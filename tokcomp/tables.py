"""Plain-text tables for the terminal and for text artifacts."""

from __future__ import annotations


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, a dashed rule under the header, no trailing spaces."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
