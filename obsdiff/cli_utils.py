"""Shared plumbing of the two command-line tools: error handling, logging, tables."""

from __future__ import annotations

import logging

import click

from obsdiff.errors import ObsdiffError


class Group(click.Group):
    """A click group that turns `ObsdiffError` into `error: <one line>` and exit code 2."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Every subcommand takes -v/-q as well, so they work after its name as well as before it."""
        if not any(p.name == "verbose" for p in cmd.params):
            cmd.params.extend(verbosity_params())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ObsdiffError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


VERBOSE_KEY = "obsdiff.verbose"  # in click's context meta (shared by the group and its subcommands)
QUIET_KEY = "obsdiff.quiet"


def verbosity_params() -> list[click.Option]:
    """-v/--verbose and -q/--quiet, for the group and each subcommand: the counts add up wherever they are given."""
    return [click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_count_verbosity,
                         help="more log output (-vv for debug)"),
            click.Option(["-q", "--quiet"], count=True, expose_value=False, callback=_count_verbosity,
                         help="less log output (errors only)")]


def _count_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> None:
    key = VERBOSE_KEY if param.name == "verbose" else QUIET_KEY
    ctx.meta[key] = ctx.meta.get(key, 0) + value  # meta is shared by the group's context and the subcommand's
    net = ctx.meta.get(VERBOSE_KEY, 0) - ctx.meta.get(QUIET_KEY, 0)
    setup_logging(net)
    # basicConfig sets the level only on its first call: a later -v (or another command in-process) sets it here
    logging.getLogger().setLevel(logging.WARNING - 10 * max(-1, min(net, 2)))


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
