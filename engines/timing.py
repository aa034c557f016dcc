"""Timing primitives shared by the benchmark scopes: one call's seconds, statistics, variants, round-robin."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from obsdiff.errors import first_line

from .runner_base import Runner

log = logging.getLogger(__name__)


def summarize(seconds: list[float]) -> dict:
    """Milliseconds: median, p90, IQR, stdev, mean, min over the timed iterations."""
    ms = sorted(s * 1e3 for s in seconds)
    n = len(ms)

    def q(p: float) -> float:  # linear interpolation between closest ranks
        x = p * (n - 1)
        lo = int(x)
        hi = min(lo + 1, n - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (x - lo)

    return {"median": q(0.5), "p90": q(0.9), "iqr": q(0.75) - q(0.25),
            "stdev": statistics.stdev(ms) if n > 1 else 0.0, "mean": statistics.fmean(ms), "min": ms[0], "n": n}


@dataclass
class Variant:
    model: str
    backend: str
    runner: Runner | None = None
    status: str = "ok"
    reason: str = ""
    times: list[float] = field(default_factory=list)
    stage_times: list[dict] = field(default_factory=list)
    max_abs_diff: float | None = None

    def fail(self, exc: BaseException, when: str) -> None:
        self.status, self.reason = "failed", f"{when}: {first_line(exc)}"
        log.warning("%s on %s failed %s", self.model, self.backend, self.reason)


def rotated(items: list, i: int) -> list:
    """Round i starts at a different variant, so none is always the first after a pause."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def warm(v: Variant, warmup: int, fn: Callable[[], object]) -> None:
    try:
        for _ in range(max(warmup, v.runner.min_warmup)):
            fn()
        v.runner.synchronize()
    except Exception as exc:
        v.fail(exc, "warm-up")
