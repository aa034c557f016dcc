"""The exporters' own output kept out of library output: their progress lines and warnings go to the debug log."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def fd_stdout_to(file):
    """Point file descriptor 1 at `file`: the TorchScript exporter prints whole graphs from C++ on failure."""
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded interpreters)
        yield
        return
    try:
        os.dup2(file.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def quiet():
    """The exporters print progress to stdout and warn about unrelated things: keep library output clean."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+") as native:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(buf), fd_stdout_to(native):
                warnings.simplefilter("ignore")
                yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            native.seek(0)
            output = buf.getvalue() + native.read()
            if output:
                log.debug("exporter output:\n%s", output)
