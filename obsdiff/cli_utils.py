"""Shared plumbing of the two command-line tools: error handling, logging, verbosity."""

from __future__ import annotations

import json
import logging

import click

from obsdiff.errors import (
    Interrupted,
    ObsdiffError,
    first_line,
    is_out_of_memory,
    os_error_message,
    out_of_memory_detail,
)
from obsdiff.runs.artifacts import unfinished_outputs

log = logging.getLogger(__name__)

VERBOSE_KEY = "obsdiff.verbose"  # in click's context meta (shared by the group and its subcommands)
INTERNAL_ERROR_EXIT = 1


# What to do when memory runs out, by command (the options each one has); others get the generic advice.
_MEMORY_ADVICE = {
    "prune": "lower --batch-size or --height/--width, give --max-memory GIB to plan calibration groups that fit, "
             "keep Hessians on the CPU (--hessian-device cpu) or choose another --device",
    "generate": "lower --height/--width or choose another --device",
    "eval": "lower --batch-size or --height/--width, or choose another --device",
    "bench": "lower --batch or --height/--width, or choose another --device",
}
_MEMORY_ADVICE_DEFAULT = "use a smaller image size or batch, or run on a device with more memory (--device)"


def failure(exc: BaseException, command: str | None = None) -> tuple[str, int] | None:
    """The one-line message and exit code for an exception a user can act on; None for a bug in obsdiff.

    Readers that know the path raise `ObsdiffError`s naming it (`artifacts.read_json`, the staged writers);
    the rest of this table catches what they did not anticipate, naming the path where the exception has one.
    `command` (the subcommand's name) picks the options that out-of-memory advice names.
    """
    if isinstance(exc, ObsdiffError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        removed = unfinished_outputs(exc)
        kept = (f"the unfinished {', '.join(removed)} {'was' if len(removed) == 1 else 'were'} removed" if removed
                else "no output was left half-written")
        return f"interrupted (Ctrl-C); {kept}; run the command again", Interrupted.exit_code
    if is_out_of_memory(exc):  # before OSError: ENOMEM is memory, not a path
        return (f"out of memory ({out_of_memory_detail(exc)}); "
                f"{_MEMORY_ADVICE.get(command or '', _MEMORY_ADVICE_DEFAULT)}"), 2
    if isinstance(exc, OSError):
        return os_error_message(exc), 2
    if isinstance(exc, UnicodeDecodeError):
        return f"an input file is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8", 2
    if isinstance(exc, json.JSONDecodeError):
        return (f"an input file is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "replace it with the file obsdiff wrote"), 2
    return None


class Group(click.Group):
    """A click group that ends every failed command with one line on stderr and an exit code.

    Errors a user can act on (`failure`: obsdiff's own, OS faults, undecodable files) exit 2, Ctrl-C 130
    (128 + SIGINT, the shell's convention); click's usage errors are one line too. Any other exception is a
    bug: `error: internal error: ...` and exit 1, the traceback only with -v. Exit 1 is what Python itself
    gives an uncaught exception; keeping it apart from 2 ("fix the input and run again") lets scripts and CI
    tell a bug from bad input, and -v reproduces the same failure with the traceback for the report.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Every subcommand takes -v/-q as well, so they work after its name as well as before it."""
        if not any(p.name == "verbose" for p in cmd.params):
            cmd.params.extend(verbosity_params())
        super().add_command(cmd, name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:  # the group's own options (a subcommand's are parsed in `invoke`)
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            usage_error(exc, ctx)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            usage_error(exc, ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, BrokenPipeError):
            raise  # click's own ends (and a closed pipe, which click's main quiets)
        except (Exception, KeyboardInterrupt) as exc:
            clear_progress_bars()
            known = failure(exc, ctx.invoked_subcommand)
            if known is None and ctx.meta.get(VERBOSE_KEY, 0) > 0:
                raise
            log.debug("the failure behind the error below", exc_info=exc)
            message, code = known or (f"internal error: {type(exc).__name__}: {first_line(exc)} (run with -v for "
                                      "the traceback; please report it)", INTERNAL_ERROR_EXIT)
            click.echo(f"error: {message}", err=True)
            ctx.exit(code)


def clear_progress_bars() -> None:
    """Close every open tqdm bar and wipe it from the terminal, innermost first.

    A failure leaves the bars of the loops it broke out of open: their last frame would stay above the error
    line, and tqdm redraws a bar that is garbage-collected later (at exit) below it. tqdm keeps its open bars
    in `tqdm._instances` (disabled ones are not there); closed with leave=False a bar blanks its line.
    """
    import sys

    std = sys.modules.get("tqdm.std")  # not imported: no bar was ever made
    if std is None:
        return
    bars = sorted(list(getattr(std.tqdm, "_instances", ())), key=lambda bar: -abs(getattr(bar, "pos", 0)))
    for bar in bars:
        bar.leave = False
        try:
            bar.close()
        except Exception:  # a closed or broken stream: the error line must still be printed
            log.debug("could not clear a progress bar", exc_info=True)


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


def usage_error(exc: click.UsageError, ctx: click.Context) -> None:
    """Click's usage errors as one line too (click prints usage, a hint and the error on three)."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # click shows the help: not an error
        raise exc
    where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
    click.echo(f"error: {exc.format_message()} (see {where} --help)", err=True)
    ctx.exit(exc.exit_code)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
