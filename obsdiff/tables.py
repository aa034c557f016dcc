"""Text tables, for the commands, the memory plan and the benchmark reports."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table (readable in a terminal, pasteable into a README)."""

    def cell(v) -> str:
        if isinstance(v, float):  # 4 significant digits, never in exponent form for large values (ms, FD)
            return f"{v:.0f}" if 1e4 <= abs(v) < 1e12 else f"{v:.4g}"
        return "" if v is None else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])
