"""What a running TensorRT build shows and leaves behind: its log (through Polygraphy's logger) and a
progress line while it runs. Both work without TensorRT, so they are tested everywhere."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

_TAGS = {"[U]", "[S]", "[X]", "[V]", "[I]", "[W]", "[E]", "[!]"}


class BuildLog(logging.Handler):
    """Keeps Polygraphy's log lines (TensorRT's INFO messages reach it as VERBOSE) and forwards problems."""

    def __init__(self):
        super().__init__(level=1)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.lines.append(text)
        if record.levelno >= logging.ERROR:
            log.error("TensorRT: %s", _strip_tag(text))
        elif record.levelno >= logging.WARNING:
            log.warning("TensorRT: %s", _strip_tag(text))
        else:
            log.debug("TensorRT: %s", _strip_tag(text))

    def errors(self) -> list[str]:
        """TensorRT's error lines, first first; Polygraphy's closing summary ("[!] Could not parse ...") is left
        out: the first error names the cause."""
        return [_strip_tag(line) for line in self.lines if line.startswith("[E]")]


def _strip_tag(line: str) -> str:
    tag, _, rest = line.partition(" ")
    return rest if tag in _TAGS else line


@contextlib.contextmanager
def captured_build_log(verbose: bool = False) -> Iterator[BuildLog]:
    """Route Polygraphy's logger (and TensorRT's messages through it) into a `BuildLog` while the block runs.

    TensorRT's INFO lines, where the sparse-layer report is, need Polygraphy's VERBOSE severity (EXTRA_VERBOSE
    adds TensorRT's own VERBOSE lines when `verbose`). Nothing is printed; Polygraphy's settings are restored.
    """
    from polygraphy.logger import G_LOGGER

    handler = BuildLog()
    py_logger = logging.getLogger("Polygraphy")
    saved = (G_LOGGER.use_python_logging_system, G_LOGGER.colors, py_logger.level, py_logger.propagate)
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.colors = False
    py_logger.setLevel(1)
    py_logger.propagate = False
    py_logger.addHandler(handler)
    try:
        with G_LOGGER.verbosity(G_LOGGER.EXTRA_VERBOSE if verbose else G_LOGGER.VERBOSE):
            yield handler
    finally:
        py_logger.removeHandler(handler)
        G_LOGGER.use_python_logging_system, G_LOGGER.colors = saved[0], saved[1]
        py_logger.setLevel(saved[2])
        py_logger.propagate = saved[3]


@contextlib.contextmanager
def build_progress(label: str, enabled: bool = True, interval: float = 1.0, file=None) -> Iterator[dict]:
    """A progress line (`label: 1m23s`) refreshed every `interval` seconds while the block runs.

    TensorRT gives no fraction done for the whole build, so the line shows the elapsed time: a build that
    takes twenty minutes visibly runs. Yields {"ticks": n}, the number of refreshes so far.
    """
    from obsdiff.progress import tqdm

    state = {"ticks": 0}
    stop = threading.Event()
    bar = tqdm(desc=label, bar_format="{desc}: {elapsed}", disable=not enabled, file=file or sys.stderr,
               leave=False)
    start = time.monotonic()

    def refresh() -> None:
        while not stop.wait(interval):
            state["ticks"] += 1
            bar.refresh()

    thread = threading.Thread(target=refresh, name="engine-build-progress", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()
        bar.close()
        log.info("%s: %.1f s", label, time.monotonic() - start)
