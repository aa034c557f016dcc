"""Shared plumbing of the two command-line tools: error handling, logging, tables."""

from __future__ import annotations

import logging

import click

from obsdiff.errors import ObsdiffError


class Group(click.Group):
    """A click group that turns `ObsdiffError` into `error: <one line>` and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ObsdiffError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


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
