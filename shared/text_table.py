"""Plain-text tables for terminals: the operator tools, the campaigns client and the bench."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def column_widths(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """The width of each column: its widest cell, header included."""
    return [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]


def table_line(cells: Sequence[str], widths: Sequence[int], right: Collection[int] = ()) -> str:
    """One row, cells two spaces apart; the columns numbered in ``right`` are right-aligned."""
    padded = (
        cell.rjust(width) if i in right else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    )
    return "  ".join(padded).rstrip()


def text_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> str:
    """A header and its rows, columns padded to their widest cell (``right``: right-aligned)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = column_widths(header, cells)
    return "\n".join(table_line(row, widths, right) for row in [list(header), *cells])
